"""The step plan: what every rank runs in one step, sent leader -> all as one int64 buffer.

Layout (int64; float fields travel bit-cast to int64):
    header  [kind, T, S, max_blocks, flags, R, B, Z, U, X, Y]
    per token     input_ids[T] positions[T]
    per sequence  query_lens context_lens seq_ids prompt_lens sample top_k seeds logprobs
                  prompt_logprobs next_prompt_token bias_counts [S]
                  tables: block_tables[S*max_blocks], or with TABLE_ROWS rows[S]
                  floats[S*6] (temperature top_p min_p repetition presence frequency)
    released[R]   sequences whose sampler state the last stage can drop
    logit bias    bias_ids[B] bias_values[B] (sequence i owns the next bias_counts[i] pairs)
    table changes cleared_rows[Z] table_updates[U*3] (row, column, block)
    KV swaps      swap_out[X*2] (device block, host slot) swap_in[Y*2] (host slot, device block)
Block tables travel in one of two ways. The engine's plans set TABLE_ROWS: sequence i uses
row rows[i] of the persistent table every rank keeps (`runtime/block_table.py`); the plan
first zeroes `cleared_rows`, then writes `table_updates`, so a decode step carries O(changed
blocks), not O(S * max_blocks). Plans built by hand (one-sequence probes, eval, warm-up)
carry whole padded tables instead and leave the persistent table alone.
`prompt_logprobs` >= 0 asks the last stage for the log-probabilities of this chunk's prompt
tokens (each predicted by the position before it); `next_prompt_token` is the prompt token
just after the chunk (-1 if none), the target of the chunk's last position.
Every rank makes the swap copies before the step's forward, swap-outs first (swap preemption,
`runtime/scheduler.py`; the copies themselves: `KVCache.swap_out` / `swap_in`).
Slot mappings are derived on each rank from positions and block tables, so they never travel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FORWARD, SHUTDOWN = 0, 1
RETURN_ALL_LOGITS = 1
# Some input ids are -1 - r: the token the sequence sampled in the previous step, row r of
# that step's sampled rows, read on the device (overlap scheduling).
FEEDBACK = 2
# Block tables are rows of the persistent per-rank table plus changes (see above).
TABLE_ROWS = 4
_HEADER = 11
_INT_FIELDS = ("query_lens", "context_lens", "seq_ids", "prompt_lens", "sample", "top_k",
               "seeds", "logprobs", "prompt_logprobs", "next_prompt_token", "bias_counts")
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition", "presence", "frequency")

_EMPTY = np.zeros(0, dtype=np.int64)


def _ints(n: int, value: int = 0) -> np.ndarray:
    return np.full(n, value, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class StepPlan:
    kind: int
    input_ids: np.ndarray  # [T] tokens of all scheduled sequences, packed
    positions: np.ndarray  # [T]
    query_lens: np.ndarray  # [S] new tokens per sequence
    context_lens: np.ndarray  # [S] cached tokens per sequence after this step
    block_tables: np.ndarray  # [S, max_blocks]; [S, 0] with TABLE_ROWS
    flags: int = 0
    seq_ids: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S]
    prompt_lens: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S]
    sample: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] 1: chunk ends the sequence
    top_k: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] 0 = off
    seeds: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] -1 = unseeded
    logprobs: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] -1: none
    floats: np.ndarray = field(default_factory=lambda: np.zeros((0, 6)))  # [S, 6] FLOAT_FIELDS
    released: np.ndarray = field(default_factory=lambda: _EMPTY)  # [R]
    prompt_logprobs: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] -1: none
    next_prompt_token: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] -1: none
    bias_counts: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] logit_bias pairs
    bias_ids: np.ndarray = field(default_factory=lambda: _EMPTY)  # [B]
    bias_values: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [B] float64
    rows: np.ndarray = field(default_factory=lambda: _EMPTY)  # [S] table rows (TABLE_ROWS)
    cleared_rows: np.ndarray = field(default_factory=lambda: _EMPTY)  # [Z]
    table_updates: np.ndarray = field(  # [U, 3] (row, column, block)
        default_factory=lambda: np.zeros((0, 3), dtype=np.int64))
    swap_out: np.ndarray = field(  # [X, 2] (device block, host slot)
        default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    swap_in: np.ndarray = field(  # [Y, 2] (host slot, device block)
        default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    def __post_init__(self) -> None:
        t, s = self.input_ids.size, self.query_lens.size
        if self.positions.size != t or int(self.query_lens.sum()) != t:
            raise ValueError(f"step plan: {t} tokens but positions {self.positions.size} and "
                             f"query lengths summing to {int(self.query_lens.sum())}")
        if self.context_lens.size != s or self.block_tables.shape[0] != s:
            raise ValueError("step plan: per-sequence arrays disagree on the number of sequences")
        if self.flags & TABLE_ROWS:
            if self.rows.size != s or self.block_tables.shape[1] != 0:
                raise ValueError(f"step plan with table rows: {self.rows.size} rows for {s} "
                                 f"sequences and tables of width {self.block_tables.shape[1]} "
                                 "(must be 0)")
        elif self.rows.size or self.cleared_rows.size or self.table_updates.size:
            raise ValueError("step plan: table rows and changes need the TABLE_ROWS flag")
        if self.table_updates.ndim != 2 or self.table_updates.shape[1] != 3:
            raise ValueError(f"step plan: table updates must be [U, 3] (row, column, block), "
                             f"got shape {self.table_updates.shape}")
        for name in ("swap_out", "swap_in"):
            a = getattr(self, name)
            if a.ndim != 2 or a.shape[1] != 2:
                raise ValueError(f"step plan: {name} must be [N, 2] block pairs, got shape "
                                 f"{a.shape}")
        # Defaults for plans built without sampling settings (greedy, every sequence sampled).
        defaults = {"seq_ids": np.arange(s), "prompt_lens": self.context_lens,
                    "sample": _ints(s, 1), "top_k": _ints(s), "seeds": _ints(s, -1),
                    "logprobs": _ints(s, -1), "prompt_logprobs": _ints(s, -1),
                    "next_prompt_token": _ints(s, -1), "bias_counts": _ints(s)}
        for name, value in defaults.items():
            if getattr(self, name).size != s:
                object.__setattr__(self, name, np.asarray(value, dtype=np.int64))
        if self.floats.shape != (s, 6):
            f = np.zeros((s, 6))
            f[:, 1] = f[:, 3] = 1.0  # top_p 1, repetition 1; temperature 0 = greedy
            object.__setattr__(self, "floats", f)
        if int(self.bias_counts.sum()) != self.bias_ids.size or \
                self.bias_ids.size != self.bias_values.size:
            raise ValueError(f"step plan: logit bias counts sum to {int(self.bias_counts.sum())}"
                             f" but {self.bias_ids.size} ids and {self.bias_values.size} values")

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.size)

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.size)

    @classmethod
    def shutdown(cls) -> StepPlan:
        return cls(SHUTDOWN, _EMPTY, _EMPTY, _EMPTY, _EMPTY, np.zeros((0, 0), dtype=np.int64))

    def encode(self) -> np.ndarray:
        header = np.array([self.kind, self.num_tokens, self.num_seqs, self.block_tables.shape[1],
                           self.flags, self.released.size, self.bias_ids.size,
                           self.cleared_rows.size, self.table_updates.shape[0],
                           self.swap_out.shape[0], self.swap_in.shape[0]], dtype=np.int64)
        parts = [header, self.input_ids, self.positions]
        parts += [getattr(self, name) for name in _INT_FIELDS]
        parts += [self.rows if self.flags & TABLE_ROWS else self.block_tables.reshape(-1),
                  np.ascontiguousarray(self.floats, dtype=np.float64).reshape(-1).view(np.int64),
                  self.released, self.bias_ids,
                  np.ascontiguousarray(self.bias_values, dtype=np.float64).view(np.int64),
                  self.cleared_rows, self.table_updates.reshape(-1),
                  self.swap_out.reshape(-1), self.swap_in.reshape(-1)]
        return np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

    @classmethod
    def decode(cls, buf: np.ndarray) -> StepPlan:
        kind, t, s, mb, flags, r, b, z, u, x, y = (int(v) for v in buf[:_HEADER])
        o = _HEADER

        def take(n: int) -> np.ndarray:
            nonlocal o
            o += n
            return buf[o - n:o]

        ids, pos = take(t), take(t)
        ints = {name: take(s) for name in _INT_FIELDS}
        with_rows = bool(flags & TABLE_ROWS)
        rows = take(s) if with_rows else _EMPTY
        tables = _EMPTY.reshape(s, 0) if with_rows else take(s * mb).reshape(s, mb)
        floats = take(s * 6).view(np.float64).reshape(s, 6)
        released = take(r)
        bias_ids, bias_values = take(b), take(b).view(np.float64)
        cleared, updates = take(z), take(3 * u).reshape(u, 3)
        swap_out, swap_in = take(2 * x).reshape(x, 2), take(2 * y).reshape(y, 2)
        if o != buf.size:
            raise ValueError(f"step plan buffer has {buf.size} entries, header implies {o}")
        return cls(kind, ids, pos, ints.pop("query_lens"), ints.pop("context_lens"), tables,
                   flags, floats=floats, released=released, bias_ids=bias_ids,
                   bias_values=bias_values, rows=rows, cleared_rows=cleared,
                   table_updates=updates, swap_out=swap_out, swap_in=swap_in, **ints)
