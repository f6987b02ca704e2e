"""The sampler before the batched rewrite (issue 9), kept verbatim as the reference the new
one is compared against in distribution (tests/test_sampler.py). Not used by the product."""

from __future__ import annotations

import numpy as np
import torch

from trtdist.runtime.plan import StepPlan

_NEG_INF = float("-inf")


def result_width(max_logprobs: int) -> int:
    """Columns of a result row: token, its logprob, then (id, logprob) per alternative."""
    return 2 + 2 * max_logprobs


class ReferenceSampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.history: dict[int, list[int]] = {}  # token ids by position, penalised seqs only
        self._generator = torch.Generator(device=device)
        self._generator.seed()

    def observe(self, plan: StepPlan) -> None:
        """Track the tokens fed to sequences that use penalties; drop released ones."""
        for sid in plan.released.tolist():
            self.history.pop(sid, None)
        penal = (plan.floats[:, 3] != 1.0) | (plan.floats[:, 4] != 0.0) | (plan.floats[:, 5] != 0.0)
        if not penal.any():
            return
        starts = np.concatenate([[0], np.cumsum(plan.query_lens)])
        for i in np.nonzero(penal)[0].tolist():
            a, b = int(starts[i]), int(starts[i + 1])
            hist = self.history.setdefault(int(plan.seq_ids[i]), [])
            del hist[int(plan.positions[a]):]
            hist.extend(plan.input_ids[a:b].tolist())

    def _apply_penalties(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray) -> None:
        for r, i in enumerate(rows.tolist()):
            rep, pres, freq = plan.floats[i, 3:6]
            if rep == 1.0 and pres == 0.0 and freq == 0.0:
                continue
            hist = self.history.get(int(plan.seq_ids[i]), [])
            seen = torch.tensor(hist, dtype=torch.long, device=self.device)
            row = logits[r]
            if rep != 1.0 and seen.numel():
                ids = seen.unique()
                vals = row[ids]
                row[ids] = torch.where(vals > 0, vals / rep, vals * rep)
            out = seen[int(plan.prompt_lens[i]):]
            if (pres != 0.0 or freq != 0.0) and out.numel():
                counts = torch.bincount(out, minlength=row.numel()).to(row.dtype)
                row -= freq * counts + pres * (counts > 0).to(row.dtype)

    def _apply_bias(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray) -> None:
        """Add each sequence's logit_bias to its row: one scatter for the whole batch."""
        owner = np.repeat(np.arange(plan.num_seqs), plan.bias_counts)  # [B] plan sequence
        row_of = np.full(plan.num_seqs, -1, dtype=np.int64)
        row_of[rows] = np.arange(rows.size)
        r = row_of[owner]
        keep = r >= 0  # sequences not sampled in this step ignore their bias
        if not keep.any():
            return
        dev = self.device
        logits.index_put_((torch.from_numpy(r[keep]).to(dev),
                           torch.from_numpy(plan.bias_ids[keep]).to(dev)),
                          torch.from_numpy(plan.bias_values[keep]).to(dev, logits.dtype),
                          accumulate=True)

    def _noise(self, plan: StepPlan, rows: np.ndarray, vocab: int) -> torch.Tensor:
        q = torch.empty(len(rows), vocab, device=self.device)
        q.exponential_(generator=self._generator)
        for r, i in enumerate(rows.tolist()):
            seed = int(plan.seeds[i])
            if seed >= 0:
                position = int(plan.context_lens[i])  # the position of the token drawn
                g = torch.Generator(device=self.device)
                g.manual_seed((seed * 1_000_003 + position) % (2**63))
                q[r].exponential_(generator=g)
        return q

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray) -> np.ndarray:
        """logits [N, V] float32 for plan sequences `rows` -> result rows [N, width]."""
        n, vocab = logits.shape
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        self._apply_penalties(logits, plan, rows)
        if plan.bias_ids.size:
            self._apply_bias(logits, plan, rows)
        f = torch.from_numpy(plan.floats[rows]).to(self.device, torch.float32)
        temperature, top_p, min_p = f[:, 0], f[:, 1], f[:, 2]
        top_k = torch.from_numpy(plan.top_k[rows]).to(self.device)
        greedy = temperature == 0
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
            sorted_l, order = scaled.sort(dim=-1, descending=True)
            rank = torch.arange(vocab, device=self.device)[None, :]
            drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
            probs = torch.softmax(sorted_l.masked_fill(drop, _NEG_INF), dim=-1)
            drop |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keeps at least the top token
            drop |= probs < min_p[:, None] * probs[:, :1]
            sorted_l = sorted_l.masked_fill(drop, _NEG_INF)
            filtered = torch.full_like(scaled, _NEG_INF).scatter_(1, order, sorted_l)
            probs = torch.softmax(filtered, dim=-1)
            drawn = (probs / self._noise(plan, rows, vocab)).argmax(dim=-1)
            tokens = torch.where(greedy, tokens, drawn)
        k = max(int(plan.logprobs[rows].max(initial=-1)), 0)
        out = torch.empty(n, result_width(k), dtype=torch.float64, device=self.device)
        out[:, 0] = tokens.double()
        out[:, 1] = raw_logprobs.gather(1, tokens[:, None])[:, 0].double()
        if k:
            top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
            out[:, 2::2] = top_ids.double()
            out[:, 3::2] = top_lp.double()
        return out.cpu().numpy()
