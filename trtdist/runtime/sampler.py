"""Token sampling on the last pipeline stage, batched on the device.

Per step, for the sampled rows: penalties (repetition / presence / frequency, from the
device-side token counts of `runtime/penalties.py`) and logit bias, then greedy, or
temperature with top-k, top-p and min-p, drawn by the Gumbel-max trick (the exponential race
argmax(p / q), q ~ Exp(1), in log space). The noise is counter-based (`random_hash.py`), keyed
by (seed, position, token id): a seeded sequence draws the same tokens whatever else is in the
batch, and after preemption and recomputation; unseeded rows get seeds drawn on the host.

Hot-path rules: every decision (greedy-only, top-k bound, logprobs asked, penalties present)
is made on the host from the plan; the step's parameters travel in one host-to-device copy;
the results (token ids, logprobs, prompt-logprob rows) are packed into one tensor and come
back in one device-to-host copy into a pinned buffer reused across steps, the only sync
(`sample` waits for it; `sample_async` returns a `SampledStep` to wait on later).
"""

from __future__ import annotations

import numpy as np
import torch

from trtdist.kernels._triton import triton
from trtdist.kernels.sampling import greedy_sample_triton
from trtdist.runtime.host_transfer import PinnedRing, SampledStep
from trtdist.runtime.penalties import PenaltyState, penalised
from trtdist.runtime.plan import StepPlan
from trtdist.runtime.random_hash import gumbel

_NEG_INF = float("-inf")
TOPK_LIMIT = 1024  # when every sampled row keeps at most this many tokens, topk replaces sort
_PARAMS = 10  # per row: temperature top_p min_p repetition presence frequency | top_k seed pos


def result_width(max_logprobs: int) -> int:
    """Columns of a result row: token, its logprob, then (id, logprob) per alternative."""
    return 2 + 2 * max_logprobs


class Sampler:
    """Samples the last stage's logits. `vocab_size` sizes the penalty state (taken from the
    first logits seen when not given); `seed` seeds the host generator of the unseeded rows'
    per-step seeds (None: fresh entropy)."""

    def __init__(self, device: torch.device, vocab_size: int | None = None,
                 seed: int | None = None) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.penalties: PenaltyState | None = None
        self._pending: list[StepPlan] = []  # observed before the vocabulary was known
        self._rng = np.random.default_rng(seed)  # seeds of unseeded rows
        cuda = device.type == "cuda"
        self._params_ring = PinnedRing(torch.int64) if cuda else None  # host -> device
        self._results_ring = PinnedRing(torch.float64) if cuda else None  # device -> host
        self.host_copies = 0  # device-to-host copies made (one per sampled step)

    # ---- penalty state -------------------------------------------------------------
    def observe(self, plan: StepPlan, input_ids: torch.Tensor | None = None) -> None:
        """Count the tokens fed to sequences that use penalties; drop released ones.
        `input_ids`: the step's token ids on the device (see `PenaltyState.observe`)."""
        if self.penalties is None:
            if self.vocab_size is None:
                if penalised(plan.floats).any() or self._pending:
                    if input_ids is not None:
                        raise ValueError("observe: device input ids need the vocabulary size:"
                                         " construct the Sampler with vocab_size")
                    self._pending.append(plan)
                return
            self.penalties = PenaltyState(self.device, self.vocab_size)
        self.penalties.observe(plan, input_ids)

    def _state(self, vocab: int) -> PenaltyState:
        if self.penalties is None:
            self.vocab_size = self.vocab_size or vocab
            self.penalties = PenaltyState(self.device, self.vocab_size)
            for plan in self._pending:
                self.penalties.observe(plan)
            self._pending.clear()
        return self.penalties

    # ---- host to device ------------------------------------------------------------
    def _staged(self, host: np.ndarray) -> torch.Tensor:
        """One host-to-device copy of int64 `host` (through a reused pinned buffer)."""
        if self._params_ring is None:
            return torch.from_numpy(host.copy())
        return self._params_ring.to_device(host, self.device)

    def _params(self, plan: StepPlan, rows: np.ndarray, state_rows: np.ndarray) -> torch.Tensor:
        """[N, 10] int64 on the device: the floats (bit-cast), top_k, seed, position."""
        n = rows.size
        seeds = plan.seeds[rows].copy()
        unseeded = seeds < 0
        if unseeded.any():
            seeds[unseeded] = self._rng.integers(0, 1 << 62, size=int(unseeded.sum()))
        host = np.empty((n, _PARAMS), dtype=np.int64)
        host[:, :6] = np.ascontiguousarray(plan.floats[rows], dtype=np.float64).view(np.int64)
        host[:, 6] = plan.top_k[rows]
        host[:, 7] = seeds
        host[:, 8] = plan.context_lens[rows]  # the position of the token drawn
        host[:, 9] = state_rows
        return self._staged(host)

    # ---- the step ------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray,
               prompt_rows: torch.Tensor | None = None) -> np.ndarray:
        """logits [N, V] float32 for plan sequences `rows` -> result rows [N, width] float64
        (`result_width`), followed by `prompt_rows` (prompt-logprob rows, already in the
        result layout, see `runtime/prompt_logprobs.py`) padded to one width."""
        return self.sample_async(logits, plan, rows, prompt_rows).wait()

    def sample_async(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray,
                     prompt_rows: torch.Tensor | None = None) -> SampledStep:
        """`sample` without waiting: the results' copy to the host is enqueued, and the
        returned `SampledStep` waits for it (so the host can prepare the next step)."""
        return self.to_host(self.sample_device(logits, plan, rows, prompt_rows))

    def to_host(self, out: torch.Tensor) -> SampledStep:
        """Start the one device-to-host copy of a step's result rows (`sample_device`)."""
        self.host_copies += 1
        return SampledStep.start(out, self._results_ring)

    @torch.inference_mode()
    def sample_device(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray,
                      prompt_rows: torch.Tensor | None = None,
                      tokens_out: torch.Tensor | None = None) -> torch.Tensor:
        """Like `sample`, left on the device: float64 `[N + P, width]`; column 0 of the
        first N rows holds the sampled token ids. `tokens_out` (`[N]` integers on the
        device, or None) receives the token ids too (the next step's inputs)."""
        n = logits.shape[0]
        f = plan.floats[rows]  # [N, 6] host copy of the parameters: every decision is here
        greedy = f[:, 0] == 0
        k = max(int(plan.logprobs[rows].max(initial=-1)), 0)
        want_logprobs = bool((plan.logprobs[rows] >= 0).any())
        if (n and prompt_rows is None and not want_logprobs and greedy.all()
                and not plan.bias_ids.size and not penalised(f).any()
                and logits.device.type == "cuda" and triton is not None):
            # NOTE: plain greedy (the common decode step) in one launch: no parameters to
            # stage, nothing to adjust (see kernels/sampling.py).
            if self._pending:
                self._state(logits.shape[1])
            out = torch.empty(n, result_width(0), dtype=torch.float64, device=self.device)
            greedy_sample_triton(logits, out, tokens_out)
            return out
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        tokens = None
        if n:
            params, adjusted = self._adjusted(logits, plan, rows)
            tokens = adjusted.argmax(dim=-1)  # [N]
            if not greedy.all():
                tokens = self._draw(adjusted, params, f, plan.top_k[rows], greedy, tokens)
            if tokens_out is not None:
                tokens_out.copy_(tokens)
        return self._results(n, tokens, raw_logprobs, k, prompt_rows)

    @torch.inference_mode()
    def adjusted_logits(self, logits: torch.Tensor, plan: StepPlan,
                        rows: np.ndarray) -> torch.Tensor:
        """The logits after penalties and logit bias (what greedy takes the argmax of)."""
        return self._adjusted(logits, plan, rows)[1]

    def _adjusted(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(params [N, 10] on the device, logits after penalties and bias: `logits` itself
        when neither applies, else a copy)."""
        n, vocab = logits.shape
        if self._pending:  # plans observed before the vocabulary size was known
            self._state(vocab)
        pen = penalised(plan.floats[rows])
        state_rows = np.full(n, -1, dtype=np.int64)
        if pen.any():
            state_rows[pen] = self._state(vocab).rows_of(plan.seq_ids[rows[pen]])
            pen &= state_rows >= 0  # never observed: nothing seen, nothing to penalise
        params = self._params(plan, rows, state_rows)
        if not pen.any() and not plan.bias_ids.size:
            return params, logits
        adjusted = logits.clone(memory_format=torch.contiguous_format)
        if pen.any():
            self._penalise(adjusted, params, pen, state_rows)
        if plan.bias_ids.size:
            self._apply_bias(adjusted, plan, rows)
        return params, adjusted

    def _penalise(self, logits: torch.Tensor, params: torch.Tensor, pen: np.ndarray,
                  state_rows: np.ndarray) -> None:
        assert self.penalties is not None
        sel = np.nonzero(pen)[0]
        if sel.size == pen.size:  # every row: no index tensors to build
            idx = torch.arange(pen.size, device=self.device)
        else:
            idx = torch.from_numpy(sel).to(self.device, non_blocking=True)
        p = params.index_select(0, idx)
        floats = p[:, 3:6].view(torch.float64).to(logits.dtype)
        self.penalties.apply(logits, idx, p[:, 9], floats)

    def _apply_bias(self, logits: torch.Tensor, plan: StepPlan, rows: np.ndarray) -> None:
        """Add each sequence's logit_bias to its row: one scatter for the whole batch."""
        owner = np.repeat(np.arange(plan.num_seqs), plan.bias_counts)  # [B] plan sequence
        row_of = np.full(plan.num_seqs, -1, dtype=np.int64)
        row_of[rows] = np.arange(rows.size)
        r = row_of[owner]
        keep = r >= 0  # sequences not sampled in this step ignore their bias
        if not keep.any():
            return
        vocab = logits.shape[1]
        flat = r[keep] * vocab + plan.bias_ids[keep]  # [B'] into the flattened logits
        packed = np.stack([flat, np.ascontiguousarray(plan.bias_values[keep]).view(np.int64)])
        dev = torch.from_numpy(packed).to(self.device, non_blocking=True)  # [2, B']
        # NOTE: index_add_, not index_put_(accumulate=True): no hidden sync on CUDA
        logits.view(-1).index_add_(0, dev[0], dev[1].view(torch.float64).to(logits.dtype))

    def _draw(self, logits: torch.Tensor, params: torch.Tensor, f: np.ndarray,
              top_k: np.ndarray, greedy: np.ndarray, greedy_tokens: torch.Tensor
              ) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and the Gumbel-max draw for every row at once;
        greedy rows keep `greedy_tokens`. `f` and `top_k`: the rows' parameters on the host,
        which pick the cheapest path that serves every row."""
        vocab = logits.shape[1]
        fl = params[:, :6].view(torch.float64).to(torch.float32)  # [N, 6]
        temperature, top_p, min_p = fl[:, 0], fl[:, 1], fl[:, 2]
        k_dev = params[:, 6]
        g = temperature == 0  # [N] the greedy rows
        scaled = logits / torch.where(g, 1.0, temperature)[:, None]
        sampled_k, fs = top_k[~greedy], f[~greedy]
        if not ((0 < sampled_k) & (sampled_k < vocab)).any() and (fs[:, 1] >= 1).all() \
                and (fs[:, 2] <= 0).all():
            # NOTE: no row filters: Gumbel-max over the whole vocabulary, no softmax, no sort.
            ids = torch.arange(vocab, device=self.device).expand(logits.shape[0], vocab)
            drawn = (scaled + gumbel(params[:, 7], params[:, 8], ids)).argmax(dim=-1)
            return torch.where(g, greedy_tokens, drawn)
        if (sampled_k > 0).all() and int(sampled_k.max()) <= min(TOPK_LIMIT, vocab):
            # NOTE: every sampled row keeps at most K tokens: a partial selection, no sort.
            cand_l, cand_ids = scaled.topk(int(sampled_k.max()), dim=-1)  # [N, K] descending
        else:
            cand_l, cand_ids = scaled.sort(dim=-1, descending=True)  # [N, V]
        rank = torch.arange(cand_l.shape[1], device=self.device)[None, :]
        drop = (k_dev[:, None] > 0) & (rank >= k_dev[:, None])
        probs = torch.softmax(cand_l.masked_fill(drop, _NEG_INF), dim=-1)
        drop |= (probs.cumsum(-1) - probs) > top_p[:, None]  # keeps at least the top token
        drop |= probs < min_p[:, None] * probs[:, :1]
        noise = gumbel(params[:, 7], params[:, 8], cand_ids)  # keyed by token id, not rank
        choice = (cand_l.masked_fill(drop, _NEG_INF) + noise).argmax(dim=-1)  # [N]
        drawn = cand_ids.gather(1, choice[:, None])[:, 0]
        return torch.where(g, greedy_tokens, drawn)

    def _results(self, n: int, tokens: torch.Tensor | None, raw_logprobs: torch.Tensor | None,
                 k: int, prompt_rows: torch.Tensor | None) -> torch.Tensor:
        """Pack tokens, logprobs and prompt rows into one device tensor."""
        p = 0 if prompt_rows is None else prompt_rows.shape[0]
        width = result_width(k)
        if prompt_rows is not None:
            width = max(width, prompt_rows.shape[1])
        out = torch.zeros(n + p, width, dtype=torch.float64, device=self.device)
        if n:
            assert tokens is not None
            out[:n, 0] = tokens.double()
            if raw_logprobs is None:
                out[:n, 1] = float("nan")  # no row asked for logprobs
            else:
                out[:n, 1] = raw_logprobs.gather(1, tokens[:, None])[:, 0].double()
                if k:
                    top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
                    out[:n, 2:result_width(k):2] = top_ids.double()
                    out[:n, 3:result_width(k):2] = top_lp.double()
        if prompt_rows is not None:
            out[n:, :prompt_rows.shape[1]] = prompt_rows
        return out
