"""Output kinds (SamplingParams.output_kind): DELTA outputs concatenate to the CUMULATIVE
result, FINAL_ONLY emits once, and a DELTA stream's per-step work does not grow with the
output's length (counted, not timed)."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from trtdist import DistributedLLM, SamplingParams
from trtdist.engine.tiny import tiny_model_dir
from trtdist.outputs import RequestOutput
from trtdist.tokenizer import Tokenizer

PROMPT = "Once upon a time"
# byte-level pieces of "é" (c3 a9) and "ö" (c3 b6): biased up, sampling mixes them, so the
# output has two-byte characters whose halves arrive one step apart
_UTF8_BIAS = {131: 100.0, 106: 100.0, 118: 100.0}


@pytest.fixture(scope="module")
def llm() -> DistributedLLM:
    with DistributedLLM("tiny", device="cpu", max_model_len=256, num_kv_blocks=256) as llm:
        yield llm


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_model_dir())


def _run(llm: DistributedLLM, params: list[SamplingParams]) -> list[list[RequestOutput]]:
    """Every output of every request, requests in the order of `params` (the prefix cache
    emptied first, so two runs compute the same batches)."""
    assert llm.engine is not None
    llm.engine.allocator.reset_prefix_cache()
    outs: dict[str, list[RequestOutput]] = {}
    for out in llm.stream([PROMPT] * len(params), params):
        outs.setdefault(out.request_id, []).append(out)
    return [outs[r] for r in sorted(outs, key=lambda r: int(r.rsplit("-", 1)[1]))]


def _join(outs: list[RequestOutput], n: int) -> list[tuple]:
    """Per completion: (ids, text, logprobs, finish_reason, stop_reason, finishes) of the
    concatenated deltas."""
    joined = []
    for i in range(n):
        cs = [c for o in outs for c in o.outputs if c.index == i]
        lps = None if cs[0].logprobs is None else [lp for c in cs for lp in c.logprobs]
        joined.append(([t for c in cs for t in c.token_ids], "".join(c.text for c in cs), lps,
                       cs[-1].finish_reason, cs[-1].stop_reason,
                       sum(c.finish_reason is not None for c in cs)))
    return joined


def _stop_across_tokens(tok: Tokenizer, ids: list[int]) -> tuple[str, int]:
    """A two-character string that straddles a token boundary of `ids`' text and first
    occurs there: (the string, where it starts)."""
    text = tok.decode(ids)
    for j in range(3, len(ids)):
        b = len(tok.decode(ids[:j]))
        if 1 <= b < len(text) - 1 and text[b - 1] != " " and text.find(text[b - 1:b + 1]) == b - 1:
            return text[b - 1:b + 1], b - 1
    raise AssertionError(f"no token boundary to split a stop string across in {text!r}")


def test_delta_outputs_concatenate_to_the_cumulative_result(llm: DistributedLLM,
                                                            tok: Tokenizer) -> None:
    greedy = dict(max_tokens=40, temperature=0.0, ignore_eos=True)
    ref, = llm.generate(PROMPT, SamplingParams(**greedy))
    ids = ref.outputs[0].token_ids
    stop, at = _stop_across_tokens(tok, ids)
    text = ref.outputs[0].text
    false_alarm = text[at:at + 2] + "\u2603"  # its first two characters occur; it never does
    cases = [
        SamplingParams(**greedy, logprobs=2),
        SamplingParams(**greedy, stop=[stop], logprobs=1),
        SamplingParams(**greedy, stop=[stop], include_stop_str_in_output=True),
        SamplingParams(**greedy, stop=[false_alarm, "\u2603\u2603\u2603"]),
        SamplingParams(max_tokens=30, temperature=1.0, seed=3, ignore_eos=True,
                       logit_bias=_UTF8_BIAS),
        SamplingParams(max_tokens=30, temperature=1.0, seed=5, ignore_eos=True,
                       logit_bias=_UTF8_BIAS, stop=["\u00e9\u00f6"], logprobs=0),
        SamplingParams(n=3, max_tokens=24, temperature=1.0, seed=11, ignore_eos=True,
                       logprobs=1, stop=[stop, "ab"]),
    ]
    cumulative = _run(llm, cases)
    delta = _run(llm, [replace(p, output_kind="delta") for p in cases])
    for p, cum, dl in zip(cases, cumulative, delta):
        final = cum[-1]
        assert final.finished and dl[-1].finished and not any(o.finished for o in dl[:-1])
        want = [(c.token_ids, c.text, c.logprobs, c.finish_reason, c.stop_reason, 1)
                for c in final.outputs]
        assert _join(dl, p.n) == want, p
        # nothing a stop string claims is ever shown, and text is never retracted
        for c in final.outputs:
            shown = ""
            for o in dl:
                shown += "".join(x.text for x in o.outputs if x.index == c.index)
                assert c.text.startswith(shown)
    # the cases test what they claim
    stopped = cumulative[1][-1].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == text[:at]
    assert cumulative[3][-1].outputs[0].text == text  # the false alarm released its text
    utf8 = cumulative[4][-1].outputs[0].text
    assert any(ch in utf8 for ch in "\u00e9\u00f6"), utf8
    # a DELTA output carries only the new tokens: most carry one, none carries them all
    assert max(len(c.token_ids) for o in delta[0] for c in o.outputs) < 40 / 4
    # the prompt's tokens go out by reference, once per output
    assert all(o.prompt_token_ids == ref.prompt_token_ids for o in delta[0])


def test_final_only_emits_once_and_generate_is_cumulative(llm: DistributedLLM) -> None:
    base = dict(n=2, max_tokens=12, temperature=1.0, seed=2, ignore_eos=True, logprobs=1,
                prompt_logprobs=1)
    cum, = _run(llm, [SamplingParams(**base)])
    final, = _run(llm, [SamplingParams(**base, output_kind="final_only")])
    assert len(final) == 1 and final[0].finished
    assert final[0].outputs == cum[-1].outputs
    assert final[0].prompt_logprobs == cum[-1].prompt_logprobs
    delta, = _run(llm, [SamplingParams(**base, output_kind="delta")])
    # DELTA: the prompt's logprobs once, in the first output
    assert delta[0].prompt_logprobs == cum[-1].prompt_logprobs
    assert all(o.prompt_logprobs is None for o in delta[1:])
    # generate returns the cumulative result whatever the kind (one delta holds everything)
    for kind in ("cumulative", "delta", "final_only"):
        assert llm.engine is not None
        llm.engine.allocator.reset_prefix_cache()
        out, = llm.generate(PROMPT, SamplingParams(**base, output_kind=kind))
        assert out.outputs == cum[-1].outputs, kind


def test_output_kind_is_validated() -> None:
    with pytest.raises(ValueError, match="output_kind must be one of 'cumulative', 'delta', "
                                         "'final_only', got 'deltas'"):
        SamplingParams(output_kind="deltas")


def _long_model(tmp_path: Path) -> Path:
    """The tiny model cut to its first layer, with room for 8,000+ positions (RoPE has no
    length limit): the CPU path's decode attention reads the whole context every step, and
    one layer keeps a test of 8,000 steps short. It still babbles words (tiny.py)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "tiny-long"
    shutil.copytree(tiny_model_dir(), path)
    weights = load_file(path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("model.layers.")
               or k.startswith("model.layers.0.")}, path / "model.safetensors",
              metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(
        cfg | {"num_hidden_layers": 1, "max_position_embeddings": 8192}))
    return path


def test_a_delta_stream_copies_a_constant_number_of_items_per_step(tmp_path: Path) -> None:
    """An 8,000-token DELTA output with four stop strings (none matches): the token ids and
    logprobs copied into outputs, and the tokens detokenized, per step at the end equal those
    at the start. A CUMULATIVE request's copies grow with its length (the counter can fail)."""
    stops = ["<stop>", "###", "END OF", "\n\n\n"]
    with DistributedLLM(_long_model(tmp_path), device="cpu", max_model_len=8192,
                        num_kv_blocks=8192 // 16 + 8) as llm:
        engine = llm.engine
        assert engine is not None
        rng = random.Random(0)
        engine.add_request("d", [rng.randrange(5, 384) for _ in range(3)], SamplingParams(
            max_tokens=8000, temperature=0.0, ignore_eos=True, stop=stops, logprobs=1,
            output_kind="delta"))
        copied, decoded, emitted, longest = [], [], 0, 0
        while engine.has_unfinished:
            c0, d0 = engine.stats["copied_output_items"], engine.stats["detokenized_tokens"]
            for out in engine.step():
                emitted += sum(len(c.token_ids) for c in out.outputs)
                longest = max(longest, *(len(c.text) for c in out.outputs))
            copied.append(engine.stats["copied_output_items"] - c0)
            decoded.append(engine.stats["detokenized_tokens"] - d0)
        assert emitted == 8000 and len(copied) >= 8000
        assert longest <= 64  # a delta's text: a few tokens' worth, never the whole output
        first, last = copied[1:1001], copied[-1000:]  # copied[0]: the prefill step
        assert max(last) <= max(first) <= 2 * 8  # a few tokens held back, with their logprobs
        assert sum(last) <= sum(first) * 1.05
        assert max(decoded[-1000:]) <= max(decoded[1:1001]) <= 2 * 6 + 1

        engine.add_request("c", [5, 6, 7], SamplingParams(max_tokens=200, temperature=0.0,
                                                          ignore_eos=True, stop=stops))
        grows = []
        while engine.has_unfinished:
            c0 = engine.stats["copied_output_items"]
            engine.step()
            grows.append(engine.stats["copied_output_items"] - c0)
        assert grows[-1] >= 200 and grows[-1] - grows[10] >= 150
