"""All rank arithmetic in one place (mirrors TensorRT-LLM's `Mapping`).

Tensor parallelism is innermost: ranks of one TP group are consecutive, so a TP group stays
inside one node when a node holds a multiple of tp_size ranks.

Example, world_size=8, tp_size=4, pp_size=2:

    rank         0 1 2 3 | 4 5 6 7
    tp_rank      0 1 2 3 | 0 1 2 3
    pp_rank      0 0 0 0 | 1 1 1 1
    tp groups    [0,1,2,3] [4,5,6,7]
    pp groups    [0,4] [1,5] [2,6] [3,7]
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Mapping:
    """Where `rank` sits in a world of `world_size = tp_size * pp_size` ranks."""

    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def __post_init__(self) -> None:
        for name in ("world_size", "tp_size", "pp_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError(
                f"world size {self.world_size} != tp_size {self.tp_size} x pp_size "
                f"{self.pp_size} = {self.tp_size * self.pp_size}; start exactly "
                f"{self.tp_size * self.pp_size} ranks or change --tp-size/--pp-size"
            )
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")

    def with_rank(self, rank: int) -> Mapping:
        return Mapping(self.world_size, self.tp_size, self.pp_size, rank)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_group(self) -> list[int]:
        start = self.pp_rank * self.tp_size
        return list(range(start, start + self.tp_size))

    @property
    def pp_group(self) -> list[int]:
        return [self.tp_rank + i * self.tp_size for i in range(self.pp_size)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """World rank of the same TP slot one stage earlier, or None on the first stage."""
        return None if self.is_first_stage else self.rank - self.tp_size

    @property
    def next_stage_rank(self) -> int | None:
        return None if self.is_last_stage else self.rank + self.tp_size

    @property
    def last_stage_leader(self) -> int:
        """World rank of TP rank 0 on the last stage: the rank that samples."""
        return (self.pp_size - 1) * self.tp_size

    def rank_of(self, tp_rank: int, pp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank

    def to_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}
