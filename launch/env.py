"""Find this process's rank, world size and node-local rank from the launcher's environment.

NOTE: this is the only module that reads rank variables from the environment. Everything
else receives a `RankInfo` or a `Mapping`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping as _Env
from dataclasses import dataclass

# (launcher name, rank var, size var, local-rank var, local-size var), first match wins.
# Open MPI 4 and 5 export OMPI_COMM_WORLD_*; MPICH / Intel MPI (Hydra) export PMI_* and
# MPI_LOCALRANKID; Slurm's srun exports SLURM_*.
_LAUNCHERS: tuple[tuple[str, str, str, str, str], ...] = (
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
)


@dataclass(frozen=True, slots=True)
class RankInfo:
    """Where this process sits in the world, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_size: int
    launcher: str

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a world of {self.world_size}")
        if not 0 <= self.local_rank < max(self.local_size, 1):
            raise ValueError(
                f"rank {self.rank}: local rank {self.local_rank} outside local size "
                f"{self.local_size}"
            )


def _int(env: _Env[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value.split("(")[0].split(",")[0])
    except ValueError:
        raise ValueError(f"launcher variable {name}={value!r} is not an integer") from None


def discover_rank(env: _Env[str, str] | None = None, mpi_rank: int | None = None,
                  mpi_size: int | None = None) -> RankInfo:
    """Read the rank layout from launcher variables.

    `mpi_rank`/`mpi_size`, when given, are the authoritative MPI world values (a spawned
    world or a singleton has no launcher variables, or stale ones from the parent); the
    environment then only supplies the local rank.
    """
    env = os.environ if env is None else env
    for name, rank_var, size_var, local_var, local_size_var in _LAUNCHERS:
        if rank_var in env and size_var in env:
            rank, size = _int(env, rank_var), _int(env, size_var)
            if mpi_size is not None and (size != mpi_size or rank != mpi_rank):
                continue  # stale variables inherited from a parent world
            local = _int(env, local_var) if local_var in env else rank
            local_size = _int(env, local_size_var) if local_size_var in env else size
            return RankInfo(rank, size, local, max(local_size, local + 1), name)
    rank = mpi_rank if mpi_rank is not None else 0
    size = mpi_size if mpi_size is not None else 1
    return RankInfo(rank, size, rank, size, "mpi" if mpi_size is not None else "none")
