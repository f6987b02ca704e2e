"""Device-side token counts for repetition / presence / frequency penalties.

Each sequence that uses a penalty owns one row of two persistent device tensors:
`prompt_seen [rows, vocab]` (bool, the token occurs in the prompt) and `counts [rows, vocab]`
(int32, occurrences among the output tokens). Repetition penalises every token seen so far
(prompt or output), presence / frequency only the output tokens: the semantics of the
per-sequence history this replaces (tests/_reference/sampler.py).

A token counts once per position: the state remembers how far each row has seen
(`seen_len`) and counts a fed token only if its position is at or past it. Recomputation
after preemption re-feeds the same tokens at the same positions, so it leaves the counts
alone; a chunk that starts at position 0 (a fresh or fully recomputed sequence) clears the
row first. Rows are assigned by seq_id and freed by `plan.released`; all host bookkeeping is
numpy over the step's sequences (no per-sequence Python), and the device update is one
host-to-device copy and two scatters per step.
"""

from __future__ import annotations

import numpy as np
import torch

from trtdist.runtime.plan import StepPlan


def penalised(floats: np.ndarray) -> np.ndarray:
    """[S] bool: the sequences (rows of `plan.floats`) that use any penalty."""
    return (floats[:, 3] != 1.0) | (floats[:, 4] != 0.0) | (floats[:, 5] != 0.0)


class PenaltyState:
    """Token counts of the penalised sequences, on `device`, `vocab` columns wide."""

    def __init__(self, device: torch.device, vocab: int, rows: int = 8) -> None:
        self.device, self.vocab = device, vocab
        self.seq_ids = np.full(rows, -1, dtype=np.int64)  # [rows] owner, -1 = free
        self.seen_len = np.zeros(rows, dtype=np.int64)  # [rows] positions already counted
        self.prompt_seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)
        self.counts = torch.zeros(rows, vocab, dtype=torch.int32, device=device)
        self._one = torch.ones((), dtype=torch.int32, device=device)

    @property
    def capacity(self) -> int:
        return int(self.seq_ids.size)

    def _grow(self, need: int) -> None:
        rows = max(need, 2 * self.capacity)
        add = rows - self.capacity
        self.seq_ids = np.concatenate([self.seq_ids, np.full(add, -1, dtype=np.int64)])
        self.seen_len = np.concatenate([self.seen_len, np.zeros(add, dtype=np.int64)])
        pad = (add, self.vocab)
        self.prompt_seen = torch.cat([self.prompt_seen, torch.zeros(
            pad, dtype=torch.bool, device=self.device)])
        self.counts = torch.cat([self.counts, torch.zeros(pad, dtype=torch.int32,
                                                          device=self.device)])

    def rows_of(self, seq_ids: np.ndarray) -> np.ndarray:
        """[n] the state row of each sequence, -1 for those without one."""
        if seq_ids.size == 0:
            return np.zeros(0, dtype=np.int64)
        match = self.seq_ids[None, :] == seq_ids[:, None]  # [n, rows]
        return np.where(match.any(1), match.argmax(1), -1)

    def release(self, seq_ids: np.ndarray) -> None:
        if seq_ids.size:
            self.seq_ids[np.isin(self.seq_ids, seq_ids)] = -1

    def _assign(self, seq_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, new): the rows of `seq_ids`, free rows assigned to those without one (the
        caller clears them)."""
        rows = self.rows_of(seq_ids)
        new = rows < 0
        if new.any():
            free = np.nonzero(self.seq_ids < 0)[0]
            if free.size < new.sum():
                self._grow(self.capacity + int(new.sum()) - free.size)
                free = np.nonzero(self.seq_ids < 0)[0]
            rows[new] = free[:int(new.sum())]
            self.seq_ids[rows[new]] = seq_ids[new]
        return rows, new

    def observe(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> None:
        """Count the tokens the plan feeds to penalised sequences; drop released ones.
        `input_ids` `[T]` on the device: the step's token ids as the model read them, needed
        when the plan's host ids hold placeholders for tokens sampled on the device
        (overlap, `plan.FEEDBACK`); without it the plan's ids are used."""
        self.release(plan.released)
        pen = penalised(plan.floats)
        if not pen.any():
            return
        seqs = np.nonzero(pen)[0]  # [P] plan sequences
        rows, new = self._assign(plan.seq_ids[seqs])
        starts = np.concatenate([[0], np.cumsum(plan.query_lens)])[:-1]
        first_pos = plan.positions[starts[seqs]] if plan.num_tokens else np.zeros(0, np.int64)
        clear = new | (first_pos == 0)
        self.seen_len[rows[clear]] = 0
        row_of_seq = np.full(plan.num_seqs, -1, dtype=np.int64)
        row_of_seq[seqs] = rows
        tok_row = np.repeat(row_of_seq, plan.query_lens)  # [T]
        tok_plen = np.repeat(plan.prompt_lens, plan.query_lens)  # [T]
        pos = plan.positions
        keep = (tok_row >= 0) & (pos >= self.seen_len[np.maximum(tok_row, 0)])
        in_prompt = np.nonzero(keep & (pos < tok_plen))[0]  # [Tp] token indices
        in_output = np.nonzero(keep & (pos >= tok_plen))[0]  # [To]
        self.seen_len[rows] = np.maximum(self.seen_len[rows], plan.context_lens[seqs])
        cleared = rows[clear]
        a, b = cleared.size, cleared.size + in_prompt.size
        if input_ids is None:  # the flat indices into the state, on the host
            if (plan.input_ids[keep] < 0).any():
                raise ValueError("penalty counts: the plan holds placeholder ids of tokens "
                                 "sampled on the device; pass the step's device input_ids")
            flat = tok_row * self.vocab + plan.input_ids
            packed = np.concatenate([cleared, flat[in_prompt], flat[in_output]])
            idx = torch.from_numpy(packed).to(self.device, non_blocking=True)
        else:  # token ids read on the device: rows and token indices travel, not ids
            tok = np.concatenate([in_prompt, in_output])
            packed = np.concatenate([cleared, tok_row[tok], tok])
            dev = torch.from_numpy(packed).to(self.device, non_blocking=True)
            m = tok.size
            ids = input_ids.index_select(0, dev[a + m:]).long()  # [Tp + To]
            idx = torch.cat([dev[:a], dev[a:a + m] * self.vocab + ids])
        if a:
            self.prompt_seen.index_fill_(0, idx[:a], False)
            self.counts.index_fill_(0, idx[:a], 0)
        if b > a:
            self.prompt_seen.view(-1).index_fill_(0, idx[a:b], True)
        if idx.numel() > b:
            # NOTE: index_add_ (duplicates add up), not index_put_(accumulate=True): no sync
            self.counts.view(-1).index_add_(0, idx[b:], self._one.expand(idx.numel() - b))

    def apply(self, logits: torch.Tensor, logit_rows: torch.Tensor, state_rows: torch.Tensor,
              floats: torch.Tensor) -> None:
        """Penalise, in place, rows `logit_rows` of `logits` with the counts of `state_rows`
        (both `[P]` on the device); `floats` `[P, 3]`: repetition, presence, frequency."""
        sel = logits.index_select(0, logit_rows)  # [P, V]
        counts = self.counts.index_select(0, state_rows)  # [P, V] int32
        present = counts > 0
        seen = self.prompt_seen.index_select(0, state_rows) | present
        rep, pres, freq = floats[:, 0:1], floats[:, 1:2], floats[:, 2:3]
        sel = torch.where(seen, torch.where(sel > 0, sel / rep, sel * rep), sel)
        # NOTE: the reference's exact expression, so the adjusted logits match bit for bit.
        sel = sel - (freq * counts.to(sel.dtype) + pres * present.to(sel.dtype))
        logits.index_copy_(0, logit_rows, sel)
