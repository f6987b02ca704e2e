"""Which positions of a step score which prompt tokens, the result layout, the plan's wire
format for the new fields, and logit bias in the sampler."""

from __future__ import annotations

import numpy as np
import torch

from trtdist.runtime.plan import FORWARD, StepPlan
from trtdist.runtime.prompt_logprobs import prompt_targets, result_shape, with_prompt_rows
from trtdist.runtime.sampler import Sampler


def _plan(**kw) -> StepPlan:  # type: ignore[no-untyped-def]
    # seq 0: prompt [10..16] (7 tokens), chunk at positions 2..4 (3 tokens), next token 15
    # seq 1: prompt of 4 tokens, last chunk: positions 2..3; its last position predicts output
    # seq 2: decoding (position 9), no prompt logprobs
    ids = np.array([12, 13, 14, 22, 23, 99], dtype=np.int64)
    pos = np.array([2, 3, 4, 2, 3, 9], dtype=np.int64)
    q = np.array([3, 2, 1], dtype=np.int64)
    return StepPlan(FORWARD, ids, pos, q, np.array([5, 4, 10]), np.zeros((3, 1), np.int64),
                    prompt_lens=np.array([7, 4, 3]), sample=np.array([0, 1, 1]),
                    logprobs=np.array([-1, 1, -1]), prompt_logprobs=np.array([2, 0, -1]),
                    next_prompt_token=np.array([15, -1, -1]), **kw)


def test_targets_are_the_next_prompt_tokens_inside_the_prompt() -> None:
    t = prompt_targets(_plan())
    assert t.counts.tolist() == [3, 1, 0]
    assert t.token_index.tolist() == [0, 1, 2, 3]  # seq 1's last position is not a prompt row
    assert t.target_ids.tolist() == [13, 14, 15, 23]
    assert t.top_k == 2
    # 2 sampled rows, 4 prompt rows, wide enough for 2 alternatives
    assert result_shape(_plan()) == (6, 6)
    rows = with_prompt_rows(np.ones((2, 4)), torch.full((4, 6), 2.0, dtype=torch.float64))
    assert rows.shape == (6, 6) and rows[:2, 4:].sum() == 0 and (rows[2:] == 2).all()


def test_plan_round_trips_prompt_and_bias_fields() -> None:
    plan = _plan(bias_counts=np.array([0, 2, 1]), bias_ids=np.array([5, 7, 9]),
                 bias_values=np.array([1.5, -100.0, 100.0]))
    back = StepPlan.decode(plan.encode())
    for name in ("prompt_logprobs", "next_prompt_token", "bias_counts", "bias_ids",
                 "bias_values", "input_ids", "logprobs"):
        assert np.array_equal(getattr(back, name), getattr(plan, name)), name


def test_logit_bias_is_added_per_row() -> None:
    plan = _plan(bias_counts=np.array([0, 2, 1]), bias_ids=np.array([5, 7, 9]),
                 bias_values=np.array([30.0, -30.0, 30.0]))
    logits = torch.zeros(2, 20)
    logits[0, 7] = 10.0  # seq 1 would pick 7; its bias forbids it and lifts 5
    logits[1, 3] = 10.0  # seq 2 would pick 3; its bias lifts 9
    plan_greedy = StepPlan(**{**{f: getattr(plan, f) for f in plan.__slots__},
                              "floats": np.zeros((3, 6))})
    out = Sampler(torch.device("cpu")).sample(logits, plan_greedy, np.array([1, 2]))
    assert out[:, 0].tolist() == [5, 9]
    # the logprobs reported are the model's, before the bias
    assert abs(out[0, 1] - float(torch.log_softmax(logits[0], -1)[5])) < 1e-6
