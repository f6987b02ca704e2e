"""DistributedLLM / SamplingParams: in-process (1 rank), spawned worlds, stop handling."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
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
                          ({"n": 0}, r"n must be in \[1, 64\]"),
                          ({"logprobs": 50}, r"logprobs must be in \[0, 20\]"),
                          ({"max_tokens": -1}, r"max_tokens must be in \[0, 2147483647\]")]:
        with pytest.raises(ValueError, match=match):
            SamplingParams(**kwargs)


WRONG_PARAMS = [  # (kwargs, the field the message must name)
    ({"n": 2.5}, "n must be an integer"), ({"n": True}, "n must be an integer"),
    ({"n": 65}, r"n must be in \[1, 64\]"),
    ({"max_tokens": "16"}, "max_tokens must be an integer"),
    ({"max_tokens": 2**31}, "max_tokens must be in"),
    ({"ignore_eos": "no"}, "ignore_eos must be True or False"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty must be a finite number"),
    ({"top_p": float("nan")}, "top_p must be a finite number"),
    ({"min_p": float("nan")}, "min_p must be a finite number"),
    ({"presence_penalty": float("nan")}, "presence_penalty must be a finite number"),
    ({"frequency_penalty": float("-inf")}, "frequency_penalty must be a finite number"),
    ({"top_k": 9223372036854775808}, "top_k must be"), ({"top_k": 2**31}, "top_k must be"),
    ({"top_k": 1.5}, "top_k must be an integer"),
    ({"seed": 2**63}, r"seed must be in \[0, 2\^63\)"), ({"seed": "1"}, "seed must be"),
    ({"logprobs": 2.0}, "logprobs must be an integer"),
    ({"min_tokens": 2**40}, "min_tokens must be in"),
    ({"stop_token_ids": [2**63]}, "stop_token_ids must be token ids"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids must be token ids"),
    ({"skip_special_tokens": 1}, "skip_special_tokens must be True or False"),
]


@pytest.mark.parametrize("kwargs,match", WRONG_PARAMS, ids=[str(k) for k, _ in WRONG_PARAMS])
def test_sampling_params_wrong_types_and_huge_values_name_the_field(kwargs: dict,
                                                                    match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_top_k_beyond_the_vocabulary_is_refused_and_the_engine_keeps_working(
        llm: DistributedLLM) -> None:
    with pytest.raises(ValueError, match=r"top_k must be at most the vocabulary size \(301\)"):
        llm.generate([PROMPT], SamplingParams(top_k=302, max_tokens=2))
    out, = llm.generate([PROMPT], SamplingParams(top_k=301, max_tokens=2, ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 2
    assert SamplingParams(temperature=0, n=2, seed=2**63 - 1).temperature == 0.0


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


_NO_SHUTDOWN_SCRIPT = """
import sys
from trtdist import DistributedLLM, SamplingParams

llm = DistributedLLM("tiny", tp_size=2, num_kv_blocks=64)
llm.generate("hi", SamplingParams(max_tokens=2))
mode = sys.argv[1]
print("ready", flush=True)
if mode == "exit":
    sys.exit(3)
if mode == "raise":
    raise RuntimeError("boom")
if mode == "sigint":
    while True:
        llm.generate(["hi", "there"], SamplingParams(max_tokens=8, ignore_eos=True))
"""


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if token.encode() in open(f"/proc/{entry}/environ", "rb").read():
                    found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.mpi
@pytest.mark.parametrize("mode,codes", [("eof", {0}), ("exit", {3}), ("raise", {1}),
                                        ("sigint", {-signal.SIGINT, 130})])
def test_spawned_world_exits_without_shutdown(mode: str, codes: set[int],
                                              tmp_path: Path) -> None:
    """The script never calls shutdown(): the world must still stop and every process go."""
    script = tmp_path / "no_shutdown.py"
    script.write_text(_NO_SHUTDOWN_SCRIPT)
    token = f"TRTDIST_TEST_TOKEN={uuid.uuid4().hex}"
    env = mpi_env({token.split("=")[0]: token.split("=")[1]})
    # NOTE: a suite started in the background by a shell without job control (`cmd &` in a
    # script) inherits SIGINT ignored, and an ignored SIGINT survives exec: the script would
    # never see the Ctrl-C this test sends. A user's terminal gives the default disposition.
    proc = subprocess.Popen([sys.executable, str(script), mode], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    if mode == "sigint":
        time.sleep(1.0)  # inside the generate loop
        proc.send_signal(signal.SIGINT)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the script did not exit ({mode}); it hangs at exit") from None
    stderr = proc.stderr.read()
    assert rc in codes, stderr[-3000:]
    for _ in range(100):  # the spawned workers and Open MPI's daemon follow the leader
        left = _processes_with(token)
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


def test_a_failed_engine_step_fails_the_streams_and_calls_on_fatal(
        hf_models: dict[str, Path]) -> None:
    """A step that raises (here: a value no validation would let through, planted past it)
    must end every open stream with an error and hand the failure to `on_fatal`, which the
    server uses to take the world down, instead of leaving a server that answers 503
    forever. A refused request fails alone."""
    import asyncio

    from trtdist.server.async_engine import AsyncEngine
    from trtdist.server.metrics import ServerMetrics
    from trtdist.server.protocol import APIError

    fatal: list[str] = []
    own = DistributedLLM(hf_models["llama"], dtype="float32", block_size=4, max_model_len=64)
    engine = own.engine
    assert engine is not None
    bad = SamplingParams(max_tokens=4)
    object.__setattr__(bad, "logprobs", 2**64)  # overflows the int64 step plan

    async def main() -> tuple[list[object], list[object]]:
        a = AsyncEngine(engine, ServerMetrics("fatal-test"), on_fatal=fatal.append)
        a.start()
        results: list[list[object]] = [[], []]

        async def drain(stream, out: list[object]) -> None:  # type: ignore[no-untyped-def]
            try:
                async for item in stream:
                    out.append(item)
            except APIError as e:
                out.append(e)

        refused = a.submit("refused", PROMPT, SamplingParams(top_k=10_000))
        await drain(refused, results[0])
        await drain(a.submit("bad", PROMPT, bad), results[1])
        assert a._done.wait(120), "the engine thread did not stop after the failure"
        return results[0], results[1]

    refused, failed = asyncio.run(main())
    own.shutdown()
    assert isinstance(refused[-1], APIError) and refused[-1].status == 400
    assert isinstance(failed[-1], APIError) and failed[-1].status == 500
    assert "engine failure: OverflowError" in failed[-1].message
    assert fatal and "the engine loop failed" in fatal[0]
