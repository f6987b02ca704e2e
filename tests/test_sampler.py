"""Sampler: each filter, the penalties, seeds that ignore batch composition, logprobs."""

from __future__ import annotations

import numpy as np
import torch

from trtdist.runtime.plan import FORWARD, StepPlan
from trtdist.runtime.sampler import Sampler


def _plan(rows: list[dict], history: list[list[int]] | None = None) -> StepPlan:
    """One sequence per row; each feeds its `history` (default one token) this step."""
    history = history or [[1]] * len(rows)
    s = len(rows)
    ids = np.concatenate([np.array(h, dtype=np.int64) for h in history])
    pos = np.concatenate([np.arange(len(h)) for h in history]).astype(np.int64)
    q = np.array([len(h) for h in history], dtype=np.int64)
    floats = np.array([[r.get("temperature", 1.0), r.get("top_p", 1.0), r.get("min_p", 0.0),
                        r.get("rep", 1.0), r.get("pres", 0.0), r.get("freq", 0.0)]
                       for r in rows])
    ints = lambda k, d: np.array([r.get(k, d) for r in rows], dtype=np.int64)  # noqa: E731
    return StepPlan(FORWARD, ids, pos, q, q.copy(), np.zeros((s, 1), dtype=np.int64),
                    seq_ids=ints("sid", 0) + np.arange(s) * (1 - ints("fixed_sid", 0)),
                    prompt_lens=ints("prompt_len", 1), sample=np.ones(s, dtype=np.int64),
                    top_k=ints("top_k", 0), seeds=ints("seed", -1),
                    logprobs=ints("logprobs", -1), floats=floats)


def _sample(logits: torch.Tensor, rows: list[dict], history=None) -> np.ndarray:  # type: ignore[no-untyped-def]
    sampler = Sampler(torch.device("cpu"))
    plan = _plan(rows, history)
    sampler.observe(plan)
    return sampler.sample(logits.clone(), plan, np.arange(len(rows)))


def test_greedy_and_filters_that_leave_one_token() -> None:
    logits = torch.randn(6, 50)
    rows = [{"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0},
            {"temperature": 0.01, "top_k": 3}, {"temperature": 0.0, "top_k": 5}]
    for _ in range(5):
        out = _sample(logits, rows)
        assert out[:, 0].astype(int).tolist() == logits.argmax(-1).tolist()


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    out = _sample(logits, [{}] * 4000)
    freq = np.bincount(out[:, 0].astype(int), minlength=4) / 4000
    assert np.abs(freq - [0.5, 0.3, 0.15, 0.05]).max() < 0.04
    # top_k=2 renormalises over the two most likely tokens
    out = _sample(logits, [{"top_k": 2}] * 4000)
    freq = np.bincount(out[:, 0].astype(int), minlength=4) / 4000
    assert freq[2:].sum() == 0 and abs(freq[0] - 0.625) < 0.04
    # top_p=0.7 keeps {0.5, 0.3}; min_p=0.2 drops tokens under 0.1
    out = _sample(logits, [{"top_p": 0.7}] * 2000 + [{"min_p": 0.2}] * 2000)
    assert set(out[:2000, 0].astype(int)) <= {0, 1}
    assert set(out[2000:, 0].astype(int)) <= {0, 1, 2}


def test_seeded_rows_ignore_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    alone = _sample(logits[3:4], [{"seed": 42, "fixed_sid": 1}])
    batch = _sample(logits, [{"seed": 7 + i, "fixed_sid": 1} if i != 3 else
                             {"seed": 42, "fixed_sid": 1} for i in range(8)])
    assert alone[0, 0] == batch[3, 0]
    draws = {int(_sample(logits[3:4], [{"seed": s}])[0, 0]) for s in range(30)}
    assert len(draws) > 5  # different seeds do differ


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    sampler = Sampler(torch.device("cpu"))
    # prompt [0, 1], output so far [2, 2] (positions 2, 3); prompt_len 2
    plan = _plan([{"rep": 2.0, "pres": 0.5, "freq": 0.25, "prompt_len": 2}], [[0, 1, 2, 2]])
    sampler.observe(plan)
    pen = logits.clone()
    sampler._apply_penalties(pen, plan, np.array([0]))
    # repetition on tokens 0,1,2 (prompt and output); presence/frequency on output token 2 (x2)
    want = torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, 0.5, 0.0]])
    assert torch.allclose(pen, want), pen


def test_logprobs_are_the_models() -> None:
    logits = torch.randn(2, 30)
    out = _sample(logits, [{"temperature": 0.0, "logprobs": 3}, {"temperature": 0.0}])
    lp = torch.log_softmax(logits, -1)
    top = lp[0].topk(3)
    assert np.allclose(out[0, 1], lp[0].max().item(), atol=1e-6)
    assert out[0, 2::2].astype(int).tolist() == top.indices.tolist()
    assert np.allclose(out[0, 3::2], top.values.numpy(), atol=1e-6)
