"""Persistent block-table rows: the leader hands each running sequence a row, and every
rank keeps the same table, updated by the (row, column, block) changes each plan carries.

NOTE: sending whole padded tables every step costs O(S * max_blocks) per plan (about 1 MB at
256 sequences with long contexts); a decode step changes a block table only when a sequence
crosses a block boundary (one sequence in `block_size`). So the leader keeps, per row, how
many of its blocks the ranks already hold (`sent`), and a plan carries only the new ones plus
the rows assigned since the last plan (cleared to the null block 0 before the updates).

A sequence keeps its row from admission to finish or preemption; a freed row is reused at
once. That is safe because every rank applies the changes of plan N+1 only after it filled
plan N's inputs (plans execute in broadcast order), and the leader never changes a row's
existing entries while it is held: KV block tables only grow (`KVBlockAllocator`).

The leader also keeps each row's sampling settings as numpy columns, written once at
admission, so a step's per-sequence columns are gathers by row, not rebuilt per step.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

import numpy as np

from trtdist.runtime.sequence import Sequence

# int columns fixed at admission, in this order
STATIC_INT_FIELDS = ("seq_ids", "prompt_lens", "top_k", "seeds", "logprobs", "bias_len")


def table_rows(max_batch_size: int, pp_size: int) -> int:
    """Rows of the persistent table: sequences running at once. Running sequences exceed
    `max_batch_size` only by those held in flight by other batches (at most `pp_size`
    batches, plus one with overlap)."""
    return max_batch_size * (pp_size + 1)


class TableRows:
    """Leader: row assignment, the static sampling columns of each row, and the table
    changes not yet sent to the ranks."""

    def __init__(self, num_rows: int) -> None:
        if num_rows < 1:
            raise ValueError(f"the block table needs at least one row, got {num_rows}")
        self.num_rows = num_rows
        self._free = list(range(num_rows - 1, -1, -1))  # a stack: low rows first
        self.sent = np.zeros(num_rows, dtype=np.int64)  # [rows] blocks the ranks hold
        self.ints = np.zeros((len(STATIC_INT_FIELDS), num_rows), dtype=np.int64)
        self.floats = np.zeros((num_rows, 6), dtype=np.float64)  # plan.FLOAT_FIELDS
        # prompt logprobs asked for (completion 0 only), else -1
        self.prompt_logprobs = np.full(num_rows, -1, dtype=np.int64)
        self._cleared: list[int] = []  # rows assigned since the last plan

    @property
    def num_free(self) -> int:
        return len(self._free)

    def assign(self, seq: Sequence) -> int:
        """Give `seq` a row (raises if none is free: the scheduler checks `num_free`)."""
        if seq.row >= 0:
            raise ValueError(f"sequence {seq.seq_id} already holds row {seq.row}")
        if not self._free:
            raise RuntimeError("no block-table row is free")
        row = self._free[-1]
        p = seq.params
        # NOTE: columns first, so a value that does not fit int64 (which validation refuses)
        # raises before the row is taken
        self.ints[:, row] = (seq.seq_id, seq.prompt_len, p.top_k,
                             -1 if seq.seed is None else seq.seed,
                             -1 if p.logprobs is None else p.logprobs, len(p.logit_bias))
        self.floats[row] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                            p.presence_penalty, p.frequency_penalty)
        self.prompt_logprobs[row] = (p.prompt_logprobs if p.prompt_logprobs is not None
                                     and seq.index == 0 else -1)
        seq.row = self._free.pop()
        self.sent[row] = 0
        self._cleared.append(row)
        return row

    def release(self, seq: Sequence) -> None:
        """`seq` finished or was preempted: its row is free for the next admission."""
        if seq.row >= 0:
            self._free.append(seq.row)
            seq.row = -1

    def changes(self, rows: np.ndarray, tables: Seq[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(cleared rows [Z], updates [U, 3] of (row, column, block)) that bring the ranks'
        rows `rows` up to `tables` (the allocator's lists, in the same order). The caller
        passes only the rows whose table may have grown (the scheduler knows them)."""
        lens = np.fromiter(map(len, tables), np.int64, len(tables))
        sent = self.sent[rows]
        grew = np.flatnonzero(lens > sent)
        cleared, self._cleared = np.array(self._cleared, dtype=np.int64), []
        if grew.size == 0:
            return cleared, np.zeros((0, 3), dtype=np.int64)
        first, count = sent[grew], lens[grew] - sent[grew]  # [G] new columns of each row
        total = int(count.sum())
        out = np.empty((total, 3), dtype=np.int64)
        out[:, 0] = np.repeat(rows[grew], count)
        out[:, 1] = np.arange(total) + np.repeat(first - (np.cumsum(count) - count), count)
        # O(changes): about one sequence in block_size gains a block per decode step
        out[:, 2] = np.fromiter(itertools.chain.from_iterable(
            tables[i][a:] for i, a in zip(grew.tolist(), first.tolist())), np.int64, total)
        self.sent[rows[grew]] = lens[grew]
        return cleared, out
