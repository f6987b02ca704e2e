"""Incremental detokenization: same text as decoding everything, constant work per token."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trtdist.engine.tiny import tiny_model_dir
from trtdist.runtime.detokenize import IncrementalDetokenizer
from trtdist.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_model_dir())


def _feed(d: IncrementalDetokenizer, ids: list[int], chunk: int = 1) -> str:
    out = []
    for i in range(0, len(ids), chunk):
        if d.append(ids[i:i + chunk]) is not None:
            break
        out.append(d.take_delta())
    d.flush()
    out.append(d.take_delta(finished=True))
    return "".join(out)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 383), min_size=1, max_size=60), chunk=st.integers(1, 3))
def test_deltas_concatenate_to_the_full_decode(tok: Tokenizer, ids: list[int],
                                               chunk: int) -> None:
    d = IncrementalDetokenizer(tok)
    assert _feed(d, ids, chunk) == tok.decode(ids)
    assert d.text == tok.decode(ids)


def test_multibyte_characters_wait_for_completion(tok: Tokenizer) -> None:
    ids = tok.encode("héllo wörld ✓ 日本", add_special_tokens=False)  # byte-level pieces
    d = IncrementalDetokenizer(tok)
    seen = []
    for t in ids:
        d.append([t])
        delta = d.take_delta()
        assert "\ufffd" not in delta
        seen.append(delta)
    d.flush()
    seen.append(d.take_delta(finished=True))
    assert "".join(seen) == "héllo wörld ✓ 日本"


def test_stop_string_cuts_and_never_shows_held_text(tok: Tokenizer) -> None:
    text = "The quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop=["over the", "zzz"])
    shown = ""
    for t in ids:
        stop = d.append([t])
        shown += d.take_delta(finished=stop is not None)
        assert "over" not in shown or stop is not None
        if stop:
            break
    assert d.stopped == "over the"
    assert shown == "The quick brown fox jumps "
    d2 = IncrementalDetokenizer(tok, stop=["over the"], include_stop_str_in_output=True)
    assert _feed(d2, ids) == "The quick brown fox jumps over the"


def test_work_per_token_is_constant_for_long_outputs(tok: Tokenizer) -> None:
    """8,000 tokens and four stop strings that never match: the tokens decoded per step at
    the end equal those at the start (counted, not timed)."""
    rng = random.Random(0)
    words = [tok.encode(" " + w, add_special_tokens=False) for w in
             ("fox", "dog", "model", "cache", "block", "world", "hello", "GPU")]
    ids: list[int] = []
    while len(ids) < 8000:
        ids += rng.choice(words)
    d = IncrementalDetokenizer(tok, stop=["<stop>", "###", "END OF", "\n\n\n"])
    per_step = []
    for t in ids[:8000]:
        before = d.decoded_tokens
        assert d.append([t]) is None
        d.take_delta()
        per_step.append(d.decoded_tokens - before)
    assert max(per_step[-1000:]) == max(per_step[:1000]) <= 2 * 6 + 1
    assert sum(per_step[-1000:]) <= sum(per_step[:1000]) * 1.05


def test_engine_detokenizes_a_constant_number_of_tokens_per_step(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Through the engine: a 400-token output with stop strings decodes about the same
    number of tokens per step at the end as at the start."""
    from trtdist import DistributedLLM, SamplingParams

    with DistributedLLM("tiny", device="cpu", max_model_len=512) as llm:
        engine = llm.engine
        assert engine is not None
        engine.add_request("r", [5, 6, 7], SamplingParams(
            max_tokens=400, temperature=0.0, ignore_eos=True, stop=["<x>", "zz", "END", "@@"]))
        per_step = []
        while engine.has_unfinished:
            before = engine.stats["detokenized_tokens"]
            engine.step()
            per_step.append(engine.stats["detokenized_tokens"] - before)
    decode = per_step[1:]  # the first step is the prefill
    assert len(decode) >= 390
    assert max(decode[-50:]) <= 2 * 6 + 1 and max(decode[:50]) <= 2 * 6 + 1
