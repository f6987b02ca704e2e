"""DistributedLLM / SamplingParams: in-process (1 rank), spawned worlds, stop handling."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, mpi_env

from trtdist import DistributedLLM, SamplingParams


@pytest.fixture(scope="module")
def llm(hf_models: dict[str, Path]):  # type: ignore[no-untyped-def]
    with DistributedLLM(hf_models["llama"], dtype="float32", block_size=4,
                        max_model_len=128) as llm:
        yield llm
        assert llm.engine.allocator.num_free == llm.engine.allocator.num_blocks


PROMPT = [5, 17, 42, 7, 99, 3, 250, 11]


def test_n_greater_than_one_shares_prompt_and_differs(llm: DistributedLLM) -> None:
    prompt = [200 + i for i in range(9)]  # not seen before: nothing of it is cached yet
    computed = llm.engine.stats["prompt_tokens"]
    out, = llm.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3,
                                                 ignore_eos=True))
    # completion 0 computes the 9 prompt tokens; the 3 others share its 2 full blocks of 4
    # and compute only the last prompt token
    assert llm.engine.stats["prompt_tokens"] - computed == 9 + 3 * 1
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 8 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again, = llm.generate([prompt], SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=3,
                                                   ignore_eos=True))
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stop_token_ids_max_tokens_and_min_tokens(llm: DistributedLLM) -> None:
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = llm.generate([PROMPT], greedy)[0].outputs[0]
    assert ref.finish_reason == "length" and len(ref.token_ids) == 12
    stop_at = ref.token_ids[4]
    first = ref.token_ids.index(stop_at)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    assert out.token_ids == ref.token_ids[:first + 1]
    later = llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0.0,
                                                  ignore_eos=True, stop_token_ids=[stop_at],
                                                  min_tokens=first + 1))[0].outputs[0]
    assert len(later.token_ids) > first + 1


def test_streaming_and_abort_return_blocks(llm: DistributedLLM) -> None:
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    seen = []
    stream = llm.stream([PROMPT, PROMPT[:3]], params)
    for out in stream:
        assert not out.finished
        seen.append((out.request_id, len(out.outputs[0].token_ids)))
        if len(seen) == 5:
            break
    stream.close()  # aborts what is still running
    # a snapshot per request per step, each one token longer: streamed, not collected at the end
    a, b = seen[0][0], seen[1][0]
    assert a != b and seen == [(a, 1), (b, 1), (a, 2), (b, 2), (a, 3)]
    assert not llm.engine.requests  # both aborted, long before their 30 tokens
    alloc = llm.engine.allocator
    assert not llm.engine.has_unfinished and alloc.num_free == alloc.num_blocks


def test_bad_requests_are_refused_with_reasons(llm: DistributedLLM) -> None:
    with pytest.raises(ValueError, match="the prompt is empty"):
        llm.generate([[]])
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 301\)"):
        llm.generate([[5, 999]])
    with pytest.raises(ValueError,
                       match="maximum context length is 128 tokens, and the prompt has 200"):
        llm.generate([[1] * 200])
    for kwargs, match in [({"temperature": -1}, "temperature must be >= 0"),
                          ({"top_p": 0}, r"top_p must be in \(0, 1\]"),
                          ({"n": 0}, "n must be >= 1"),
                          ({"logprobs": 50}, r"logprobs must be in \[0, 20\]"),
                          ({"max_tokens": -1}, "max_tokens must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)


def test_stop_strings_on_the_tiny_model() -> None:
    with DistributedLLM("tiny", num_kv_blocks=64) as tiny:
        ref = tiny.generate("Hello world", SamplingParams(max_tokens=16, temperature=0.0,
                                                          ignore_eos=True))[0].outputs[0]
        assert ref.text
        stop = ref.text[3:5]
        out = tiny.generate("Hello world", SamplingParams(max_tokens=16, temperature=0.0,
                                                          ignore_eos=True, stop=[stop]))
        c = out[0].outputs[0]
        assert c.finish_reason == "stop" and c.stop_reason == stop
        assert c.text == ref.text[:ref.text.index(stop)]


@pytest.mark.mpi
def test_scaling_experiment_spawns_worlds_in_a_loop() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "scaling_experiment.py"),
                           "--settings", "1x1,2x1,1x2,2x2", "--requests", "4",
                           "--max-tokens", "6"], capture_output=True, text=True,
                          env=mpi_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln.split() for ln in proc.stdout.strip().splitlines()[1:]]
    assert [(int(r[0]), int(r[1])) for r in lines] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    firsts = {" ".join(r[4:]) for r in lines}
    assert len(firsts) == 1, f"settings disagree: {firsts}"  # same greedy tokens everywhere


@pytest.mark.parametrize("tp", [1, 2])
def test_prompt_logprobs_equal_transformers_with_chunks_and_cache(
        tp: int, hf_models: dict[str, Path]) -> None:
    from helpers import load_hf, need_devices

    need_devices(tp)
    prompt = [5, 17, 42, 7, 99, 3, 250, 11, 8, 9, 10, 12, 13, 14]
    with torch.no_grad():
        ref = torch.log_softmax(load_hf(hf_models["llama"])(torch.tensor([prompt])).logits[0],
                                dim=-1)
    # chunks of 5 prompt tokens; the second run finds the prompt in the prefix cache, which
    # a scored prompt must not use
    # tp 2: the logits are gathered to the sampling rank, which alone computes log-softmax
    with DistributedLLM(hf_models["llama"], dtype="float32", block_size=4, max_model_len=64,
                        max_num_tokens=5, tp_size=tp) as llm:
        for _ in range(2):
            out, = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))
            assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
            lps = out.prompt_logprobs
            assert lps is not None and lps[0] is None and len(lps) == len(prompt)
            for i in range(1, len(prompt)):
                assert lps[i].token_id == prompt[i]
                assert abs(lps[i].logprob - float(ref[i - 1, prompt[i]])) < 1e-4
                top = ref[i - 1].topk(2)
                assert [t for t, _ in lps[i].top] == top.indices.tolist()
        # logit_bias: +100 on one token makes it every sampled token
        out, = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=1.0, seed=5,
                                                     logit_bias={77: 100.0}, ignore_eos=True))
        assert out.outputs[0].token_ids == [77] * 4
        with pytest.raises(ValueError, match=r"logit_bias token ids must be in \[0, 301\)"):
            llm.generate([prompt], SamplingParams(logit_bias={301: 1.0}))
