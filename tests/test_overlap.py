"""Overlap scheduling: step N+1 is planned and launched before step N's tokens reach the
leader. Outputs must not change: stops seen one step late never leak an extra token."""

from __future__ import annotations

import random

import pytest

from trtdist import DistributedLLM, SamplingParams


def _requests(tokenizer_vocab: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts, params = [], []
    for i in range(16):
        prompts.append([rng.randrange(4, tokenizer_vocab) for _ in range(rng.randint(2, 30))])
        kind = i % 4
        if kind == 0:  # stops on max_tokens; penalties count fed-back tokens on the device
            p = SamplingParams(max_tokens=rng.randint(1, 25), temperature=0.0, ignore_eos=True,
                               repetition_penalty=1.3, presence_penalty=0.5,
                               frequency_penalty=0.4 * (i % 8 == 0))
        elif kind == 1:  # EOS, with a seed
            p = SamplingParams(max_tokens=40, temperature=1.0, seed=i, frequency_penalty=0.3)
        elif kind == 2:  # stop token ids (two common ones of the tiny model)
            p = SamplingParams(max_tokens=40, temperature=0.8, seed=i, ignore_eos=True,
                               stop_token_ids=(rng.randrange(4, 60), rng.randrange(4, 60)))
        else:  # stop strings
            p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True,
                               stop=["e", "th"], min_tokens=2)
        params.append(p)
    return prompts, params


def _run(overlap: bool, prompts: list[list[int]], params: list[SamplingParams],
         **kwargs: object) -> tuple[list[tuple], dict]:
    with DistributedLLM("tiny", device="cpu", overlap=overlap, **kwargs) as llm:
        outs = llm.generate(prompts, params)
        engine = llm.engine
        assert engine is not None
        stats = dict(engine.stats, free=engine.allocator.num_free,
                     blocks=engine.allocator.num_blocks)
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason)
            for o in outs for c in o.outputs], stats


@pytest.mark.parametrize("max_batch_size", [16, 3])
def test_overlap_changes_no_output_and_emits_no_extra_token(max_batch_size: int) -> None:
    prompts, params = _requests(380, seed=max_batch_size)
    plain, s0 = _run(False, prompts, params, max_batch_size=max_batch_size)
    ahead, s1 = _run(True, prompts, params, max_batch_size=max_batch_size)
    assert s0["overlapped_steps"] == 0
    assert s1["overlapped_steps"] > 10, "the overlap path was not exercised"
    assert ahead == plain
    for (tokens, _, reason, _), p in zip(ahead, params):
        assert len(tokens) <= p.max_tokens
        if reason == "stop" and p.stop_token_ids:
            assert tokens[-1] in p.stop_token_ids
    assert {r for _, _, r, _ in ahead} >= {"length", "stop"}
    assert s1["free"] == s1["blocks"] and s0["free"] == s0["blocks"]


def test_step_timer_records_only_when_enabled() -> None:
    from trtdist.runtime.step_timing import StepTimer

    t = StepTimer()
    t.host(0.5)
    assert t.summary() == {}
    t.enabled = True
    t.host(0.002)
    t.host(0.004)
    assert abs(t.summary()["leader_host_ms_per_step"] - 3.0) < 1e-9
    t.reset()
    assert t.summary() == {}


def test_step_timer_reports_host_time_without_cpu_compute() -> None:
    from trtdist.runtime.step_timing import StepTimer

    t = StepTimer(enabled=True)
    t.host(0.010)
    t.host(0.006)
    t.cpu_compute(0.004)  # the forward and sampler a CPU leader ran itself
    s = t.summary()
    assert abs(s["leader_host_ms_per_step"] - 8.0) < 1e-9
    assert abs(s["leader_host_ms_per_step_excl_cpu_compute"] - 6.0) < 1e-9
