"""The step plan: what every rank runs in one step, sent leader -> all as one int64 buffer.

Layout of the buffer (all int64):
    header  [kind, T, S, max_blocks, flags]
    input_ids[T] positions[T] query_lens[S] context_lens[S] block_tables[S*max_blocks]
Slot mappings are derived on each rank from positions and block tables, so they never travel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FORWARD, SHUTDOWN = 0, 1
RETURN_ALL_LOGITS = 1
_HEADER = 5


@dataclass(frozen=True, slots=True)
class StepPlan:
    kind: int
    input_ids: np.ndarray  # [T] tokens of all scheduled sequences, packed
    positions: np.ndarray  # [T]
    query_lens: np.ndarray  # [S] new tokens per sequence
    context_lens: np.ndarray  # [S] cached tokens per sequence after this step
    block_tables: np.ndarray  # [S, max_blocks]
    flags: int = 0

    def __post_init__(self) -> None:
        t, s = self.input_ids.size, self.query_lens.size
        if self.positions.size != t or int(self.query_lens.sum()) != t:
            raise ValueError(f"step plan: {t} tokens but positions {self.positions.size} and "
                             f"query lengths summing to {int(self.query_lens.sum())}")
        if self.context_lens.size != s or self.block_tables.shape[0] != s:
            raise ValueError("step plan: per-sequence arrays disagree on the number of sequences")

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.size)

    @classmethod
    def shutdown(cls) -> StepPlan:
        e = np.zeros(0, dtype=np.int64)
        return cls(SHUTDOWN, e, e, e, e, np.zeros((0, 0), dtype=np.int64))

    def encode(self) -> np.ndarray:
        header = np.array([self.kind, self.num_tokens, self.num_seqs,
                           self.block_tables.shape[1], self.flags], dtype=np.int64)
        return np.concatenate([header, self.input_ids, self.positions, self.query_lens,
                               self.context_lens, self.block_tables.reshape(-1)]).astype(np.int64)

    @classmethod
    def decode(cls, buf: np.ndarray) -> StepPlan:
        kind, t, s, mb, flags = (int(x) for x in buf[:_HEADER])
        o = _HEADER
        parts = []
        for n in (t, t, s, s, s * mb):
            parts.append(buf[o:o + n])
            o += n
        if o != buf.size:
            raise ValueError(f"step plan buffer has {buf.size} entries, header implies {o}")
        return cls(kind, parts[0], parts[1], parts[2], parts[3], parts[4].reshape(s, mb), flags)
