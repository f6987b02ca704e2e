"""Static step inputs: persistent device buffers refilled once per step.

Every per-step input of the forward pass (token ids, positions, slot mapping, query start
offsets, sequence lengths, block tables, the rows whose logits are needed) lives at a fixed
offset of ONE int32 device buffer, sized once for `max_num_tokens` tokens and
`max_batch_size` sequences, block tables at the fixed width `ceil(max_model_len /
block_size)`. A step packs its values into a pinned host buffer of the same layout with numpy
(vectorised, no loop over sequences) and issues ONE non-blocking host-to-device copy of the
used prefix. Views of fixed buffers never move, so CUDA graphs captured on them stay valid.

The engine's plans name each sequence's row of a persistent block table (`table`, host
memory, `[table_rows, W]`) and carry only its changes (`runtime/block_table.py`); `fill`
applies them, then gathers the step's rows into the block-table section of the host buffer,
so the one copy still carries them. Hand-built plans carry whole tables instead.

NOTE: two host buffers alternate, each guarded by an event recorded after its copy, so that
packing step N+1 never overwrites bytes the copy of step N has not read yet, while the host
may still run one step ahead of the GPU. On CPU the "device" buffer is the host buffer.

Layout (int32 units; slot_mapping first so its int64 view is 8-byte aligned):
    slot_mapping int64[T] | input_ids[T] | positions[T] | query_start_loc[S+1] |
    seq_lens[S] | logits_rows[S] | block_tables[S, W]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trtdist.kernels.attention import AttentionInputs
from trtdist.runtime.plan import RETURN_ALL_LOGITS, TABLE_ROWS, StepPlan


@dataclass(frozen=True, slots=True)
class StepViews:
    """Device views for one step (prefixes of the persistent buffers)."""

    input_ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    logits_rows: torch.Tensor | None  # [N] int32 rows of the packed batch; None: every row
    attention: AttentionInputs


class StepInputs:
    """Persistent step-input buffers of one rank (see the module docstring)."""

    def __init__(self, max_num_tokens: int, max_batch_size: int, max_model_len: int,
                 block_size: int, device: torch.device, table_rows: int | None = None) -> None:
        """`table_rows`: rows of the persistent block table (default `table_rows(
        max_batch_size, 1)`, see `runtime/block_table.py`)."""
        table_rows = 2 * max_batch_size if table_rows is None else table_rows
        if min(max_num_tokens, max_batch_size, max_model_len, block_size, table_rows) < 1:
            raise ValueError("step inputs need positive sizes, got max_num_tokens "
                             f"{max_num_tokens}, max_batch_size {max_batch_size}, "
                             f"max_model_len {max_model_len}, block_size {block_size}, "
                             f"table_rows {table_rows}")
        # NOTE: a decode step of max_batch_size sequences has that many tokens.
        t = self.max_tokens = max(max_num_tokens, max_batch_size)
        s = self.max_seqs = max_batch_size
        w = self.width = -(-max_model_len // block_size)
        self.block_size, self.max_model_len, self.device = block_size, max_model_len, device
        # the persistent block table: row r holds the blocks of the sequence given row r
        self.table = np.zeros((table_rows, w), dtype=np.int32)  # [table_rows, W]
        self._offsets: dict[str, tuple[int, int]] = {}
        o = 0
        for name, n in (("slot_mapping", 2 * t), ("input_ids", t), ("positions", t),
                        ("query_start_loc", s + 1), ("seq_lens", s), ("logits_rows", s),
                        ("block_tables", s * w)):
            self._offsets[name] = (o, n)
            o += n
        self.size = o
        self._bt_offset = self._offsets["block_tables"][0]
        cuda = device.type == "cuda"
        count = 2 if cuda else 1
        self._host = [torch.zeros(o, dtype=torch.int32, pin_memory=cuda) for _ in range(count)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(count)]
        self._turn = 0
        self.device_buf = (torch.zeros(o, dtype=torch.int32, device=device) if cuda
                           else self._host[0])
        self.dev = self._views(self.device_buf)
        self._host_np = [self._numpy_views(h.numpy()) for h in self._host]
        # Per host buffer: the (rows, columns) of its block tables that may be non-zero;
        # everything outside is zero, so a step clears only what the last one wrote.
        self._dirty = [(0, 0)] * count

    # ---- layout --------------------------------------------------------------------
    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        v = {name: buf[o:o + n] for name, (o, n) in self._offsets.items()}
        v["slot_mapping"] = v["slot_mapping"].view(torch.int64)
        v["block_tables"] = v["block_tables"].view(self.max_seqs, self.width)
        return v

    def _numpy_views(self, buf: np.ndarray) -> dict[str, np.ndarray]:
        v = {name: buf[o:o + n] for name, (o, n) in self._offsets.items()}
        v["slot_mapping"] = v["slot_mapping"].view(np.int64)
        v["block_tables"] = v["block_tables"].reshape(self.max_seqs, self.width)
        return v

    def _check(self, plan: StepPlan, rows: int) -> None:
        if plan.num_tokens > self.max_tokens or rows > self.max_seqs:
            raise ValueError(f"step of {plan.num_tokens} tokens and {rows} sequences exceeds "
                             f"the static inputs ({self.max_tokens} tokens, {self.max_seqs} "
                             "sequences: max_num_tokens / max_batch_size)")
        if plan.block_tables.shape[1] > self.width:
            raise ValueError(f"block tables of width {plan.block_tables.shape[1]} exceed the "
                             f"fixed width {self.width} (max_model_len {self.max_model_len})")
        if plan.flags & TABLE_ROWS:
            n_rows, u = self.table.shape[0], plan.table_updates
            bad_rows = [r for r in (plan.rows, plan.cleared_rows, u[:, 0])
                        if r.size and (r.min() < 0 or r.max() >= n_rows)]
            if bad_rows or (u.size and (u[:, 1].min() < 0 or u[:, 1].max() >= self.width)):
                raise ValueError(f"step plan names block-table rows or columns outside the "
                                 f"persistent table ({n_rows} rows, {self.width} columns)")

    def _step_tables(self, plan: StepPlan) -> np.ndarray:
        """[S, max_blocks] this step's block tables: the plan's own, or (TABLE_ROWS) its rows
        of the persistent table after applying the plan's changes (once per plan)."""
        if not plan.flags & TABLE_ROWS:
            return plan.block_tables
        table = self.table
        if plan.cleared_rows.size:
            table[plan.cleared_rows] = 0
        u = plan.table_updates
        if u.size:
            table[u[:, 0], u[:, 1]] = u[:, 2]
        width = -(-int(plan.context_lens.max(initial=0)) // self.block_size)
        return table[plan.rows, :width]

    # ---- per step ------------------------------------------------------------------
    def fill(self, plan: StepPlan, pad_to: int | None = None) -> StepViews:
        """Pack `plan` and copy it to the device. `pad_to` (a CUDA-graph bucket, decode
        only) adds padding rows: token 0, position 0, slot -1, seq_len 0, block table row 0
        (the null block); the views then cover the whole bucket."""
        t, s = plan.num_tokens, plan.num_seqs
        rows = s if pad_to is None else pad_to
        if pad_to is not None and (t != s or pad_to < s):
            raise ValueError(f"padding to {pad_to} rows needs a decode step of at most that "
                             f"many sequences, got {s} sequences and {t} tokens")
        self._check(plan, rows)
        tables = self._step_tables(plan)  # [S, max_blocks]
        h = self._host_np[self._turn]
        event = self._events[self._turn]
        if event is not None:
            event.synchronize()  # the copy that last read this host buffer has finished
        bs, n_tok = self.block_size, rows if pad_to is not None else t
        ql = plan.query_lens
        h["input_ids"][:t] = plan.input_ids
        h["positions"][:t] = plan.positions
        qsl = h["query_start_loc"]
        qsl[0] = 0
        qsl[1:s + 1] = np.cumsum(ql)
        h["seq_lens"][:s] = plan.context_lens
        seq_of_token = np.repeat(np.arange(s), ql)
        pos = plan.positions
        h["slot_mapping"][:t] = tables[seq_of_token, pos // bs].astype(np.int64) * bs + pos % bs
        bt, (dr, dc) = h["block_tables"], self._dirty[self._turn]
        bt[:dr, :dc] = 0
        bt[:s, :tables.shape[1]] = tables
        self._dirty[self._turn] = tables.shape
        if pad_to is not None and rows > s:
            h["input_ids"][t:rows] = 0
            h["positions"][t:rows] = 0
            h["slot_mapping"][t:rows] = -1
            h["seq_lens"][s:rows] = 0
            qsl[s + 1:rows + 1] = np.arange(s + 1, rows + 1)  # one (padding) token per row
        all_rows = bool(plan.flags & RETURN_ALL_LOGITS)
        sampled = np.flatnonzero(plan.sample)
        n_logits = sampled.size
        if not all_rows:
            h["logits_rows"][:n_logits] = qsl[1:][sampled] - 1
        used = self._bt_offset + rows * self.width
        if self.device.type == "cuda":
            self.device_buf[:used].copy_(self._host[self._turn][:used], non_blocking=True)
            event.record()
            self._turn ^= 1
        d = self.dev
        every = all_rows or (n_logits == s and pad_to is None and t == s)
        attn = AttentionInputs(
            query_start_loc=d["query_start_loc"][:rows + 1], seq_lens=d["seq_lens"][:rows],
            block_tables=d["block_tables"][:rows], slot_mapping=d["slot_mapping"][:n_tok],
            block_size=bs, max_query_len=int(ql.max(initial=0)),
            max_seq_len=int(plan.context_lens.max(initial=0)), is_decode=t == s,
            query_lens_host=tuple(ql.tolist()), seq_lens_host=tuple(plan.context_lens.tolist()))
        return StepViews(d["input_ids"][:n_tok], d["positions"][:n_tok],
                         None if every else d["logits_rows"][:n_logits], attn)

    def capture_inputs(self, bucket: int) -> StepViews:
        """Views for capturing a decode graph of `bucket` rows: static buffers at their
        fixed addresses and host-side maxima that bound any replay."""
        d = self.dev
        attn = AttentionInputs(
            query_start_loc=d["query_start_loc"][:bucket + 1], seq_lens=d["seq_lens"][:bucket],
            block_tables=d["block_tables"][:bucket], slot_mapping=d["slot_mapping"][:bucket],
            block_size=self.block_size, max_query_len=1, max_seq_len=self.max_model_len,
            is_decode=True)
        return StepViews(d["input_ids"][:bucket], d["positions"][:bucket], None, attn)
