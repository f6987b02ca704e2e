"""Prompt log-probabilities: which positions of a step score which prompt tokens, computing
them on the last stage, and the layout of the result rows that carry them to the leader.

A step's result (see `Sampler.sample`) has one row per sampled sequence, then one row per
scored prompt token, all `result_width(k)` wide for the largest `k` asked for in the step:
(token id, its logprob, then k pairs of (id, logprob) of the most likely tokens). A chunk of
prompt tokens at positions [nc, nc + n) scores the prompt tokens at [nc + 1, nc + n], those
that lie inside the prompt: position p's logits predict the token at p + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trtdist.runtime.plan import StepPlan
from trtdist.runtime.sampler import result_width


@dataclass(frozen=True, slots=True)
class PromptTargets:
    counts: np.ndarray  # [S] prompt tokens each sequence scores in this step
    token_index: np.ndarray  # [P] row of the step's hidden states that predicts each target
    target_ids: np.ndarray  # [P] the prompt token scored
    top_k: int  # most alternatives asked for by any scored sequence

    @property
    def num_rows(self) -> int:
        return int(self.token_index.size)


def prompt_targets(plan: StepPlan) -> PromptTargets:
    """Derived from the plan alone, so the last stage and the leader agree on it."""
    s = plan.num_seqs
    counts = np.zeros(s, dtype=np.int64)
    asked = np.nonzero(plan.prompt_logprobs >= 0)[0]
    if asked.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return PromptTargets(counts, empty, empty, 0)
    starts = np.concatenate([[0], np.cumsum(plan.query_lens)])
    index, targets = [], []
    # NOTE: a loop over the (rare) sequences that ask for prompt logprobs, not the batch.
    for i in asked.tolist():
        n, end = int(plan.query_lens[i]), int(plan.context_lens[i])
        nc = end - n
        count = max(0, min(end, int(plan.prompt_lens[i]) - 1) - nc)
        if count == 0:
            continue
        a = int(starts[i])
        ids = plan.input_ids[a + 1:a + n]
        if count == n:  # the last position predicts the first token of the next chunk
            ids = np.append(ids, plan.next_prompt_token[i])
        counts[i] = count
        index.append(np.arange(a, a + count))
        targets.append(ids[:count])
    if not index:  # asked, but these chunks hold no prompt token to score
        empty = np.zeros(0, dtype=np.int64)
        return PromptTargets(counts, empty, empty, 0)
    top_k = int(plan.prompt_logprobs[counts > 0].max())
    return PromptTargets(counts, np.concatenate(index).astype(np.int64),
                         np.concatenate(targets).astype(np.int64), top_k)


def result_shape(plan: StepPlan) -> tuple[int, int]:
    """(rows, columns) of the step's result: sampled rows, then prompt-token rows."""
    rows = np.nonzero(plan.sample)[0]
    k = max(int(plan.logprobs[rows].max(initial=-1)), 0)
    t = prompt_targets(plan)
    return rows.size + t.num_rows, result_width(max(k, t.top_k))


def prompt_logprobs_of(model, hidden: torch.Tensor,  # type: ignore[no-untyped-def]
                       plan: StepPlan) -> torch.Tensor | None:
    """Last stage, every TP rank (the gather of the vocab-parallel logits is collective):
    on the sampling rank (TP rank 0) result rows [P, width] float64 on the device for the
    plan's scored prompt tokens; None on the other ranks, or if none are asked for."""
    t = prompt_targets(plan)
    if t.num_rows == 0:
        return None
    dev = hidden.device
    index = torch.from_numpy(t.token_index).to(dev, non_blocking=True)
    logits = model.compute_logits(hidden.index_select(0, index))  # [P, V] on TP rank 0 only
    if model.mapping.tp_rank != 0:
        return None
    logprobs = torch.log_softmax(logits, dim=-1)  # [P, V] fp32
    targets = torch.from_numpy(t.target_ids).to(dev, non_blocking=True)
    out = torch.empty(t.num_rows, result_width(t.top_k), dtype=torch.float64, device=dev)
    out[:, 0] = targets.double()
    out[:, 1] = logprobs.gather(1, targets[:, None])[:, 0].double()
    if t.top_k:
        top_lp, top_ids = logprobs.topk(t.top_k, dim=-1)
        out[:, 2::2] = top_ids.double()
        out[:, 3::2] = top_lp.double()
    return out


def with_prompt_rows(sampled: np.ndarray, prompt: torch.Tensor | None) -> np.ndarray:
    """The sampler's rows followed by the prompt-token rows, padded to one width (the layout
    `Sampler.sample(..., prompt_rows=...)` builds on the device)."""
    if prompt is None:
        return sampled
    rows = prompt.cpu().numpy()
    width = max(sampled.shape[1], rows.shape[1])
    out = np.zeros((sampled.shape[0] + rows.shape[0], width), dtype=np.float64)
    out[:sampled.shape[0], :sampled.shape[1]] = sampled
    out[sampled.shape[0]:, :rows.shape[1]] = rows
    return out
