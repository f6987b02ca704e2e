"""What evaluation harnesses and agent frameworks rely on, through the official openai client
against a live 2-rank server (TP=2) on the tiny model: prompt logprobs (echo), prompt lists,
streaming with n > 1, logit_bias, text offsets, rejected fields."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from helpers import load_hf
from server_helpers import LiveServer, start_server

from trtdist.engine.tiny import tiny_model_dir
from trtdist.tokenizer import Tokenizer

pytestmark = pytest.mark.mpi
PROMPT = "The quick brown fox jumps over the lazy dog. Hello world"


@pytest.fixture(scope="module")
def server() -> LiveServer:
    s = start_server(2, ["--max-model-len", "256", "--dtype", "float32"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(tiny_model_dir())


@pytest.fixture(scope="module")
def hf_logprobs():  # type: ignore[no-untyped-def]
    """ids -> transformers' log-softmax of the same model, [len(ids), vocab] fp32."""
    model = load_hf(tiny_model_dir())

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return run


def _check_prompt_logprobs(lp, ids: list[int], ref: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    got = torch.tensor(lp.token_logprobs[1:len(ids)], dtype=torch.float64)
    want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].double()
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    for i in range(1, len(ids)):  # the one most likely alternative, as asked (logprobs=1)
        (text, value), = lp.top_logprobs[i].items()
        assert abs(value - float(ref[i - 1].max())) < 1e-4


def _check_offsets(text: str, lp) -> None:  # type: ignore[no-untyped-def]
    offsets = lp.text_offset
    assert len(offsets) == len(lp.tokens) and offsets[0] == 0
    assert offsets == sorted(offsets) and offsets[-1] <= len(text)
    for token, at in zip(lp.tokens, offsets):
        if not token.startswith("<|"):  # special tokens add no text
            assert text[at:at + len(token)] == token, (token, at, text)


def test_echo_logprobs_score_a_string_prompt(client: openai.OpenAI, tok: Tokenizer,
                                             hf_logprobs) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode(PROMPT)
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, echo=True,
                                  logprobs=1, temperature=0, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith(PROMPT) and len(c.text) > len(PROMPT)
    assert len(c.logprobs.tokens) == len(ids) + 1
    ref = hf_logprobs(ids)
    _check_prompt_logprobs(c.logprobs, ids, ref)
    # the completion's token follows, greedy: transformers' argmax after the prompt
    assert abs(c.logprobs.token_logprobs[-1] - float(ref[-1].max())) < 1e-4
    _check_offsets(c.text, c.logprobs)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1


def test_echo_token_prompt_and_max_tokens_zero(client: openai.OpenAI, tok: Tokenizer,
                                               hf_logprobs) -> None:  # type: ignore[no-untyped-def]
    ids = tok.encode("Hello world! How are you today?")
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True,
                                  logprobs=1)
    c = r.choices[0]
    assert c.text == tok.decode(ids) and c.finish_reason == "length"
    assert len(c.logprobs.tokens) == len(ids) and r.usage.completion_tokens == 0
    _check_prompt_logprobs(c.logprobs, ids, hf_logprobs(ids))
    _check_offsets(c.text, c.logprobs)
    # echo without logprobs, on token ids: the prompt's text, then the completion
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=3, echo=True,
                                  temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode(ids) + plain.choices[0].text
    assert r.choices[0].logprobs is None


def test_prompt_list_with_n(client: openai.OpenAI, tok: Tokenizer) -> None:
    prompts = ["Hello world", "The quick brown fox"]
    kw = dict(model="tiny", max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=prompts, n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 16
    ids = [tok.encode(p) for p in prompts]
    by_ids = client.completions.create(prompt=ids, **kw)
    assert [c.text for c in by_ids.choices] == alone


def test_stream_n3_one_choice_per_chunk_finish_once(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=6, n=3, seed=7,
              temperature=1.0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    finishes = {0: 0, 1: 0, 2: 0}
    texts = {0: "", 1: "", 2: ""}
    for ch in chunks[:-1]:
        assert len(ch.choices) == 1 and ch.usage is None
        c = ch.choices[0]
        texts[c.index] += c.text
        finishes[c.index] += c.finish_reason is not None
    assert finishes == {0: 1, 1: 1, 2: 1}
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 18
    assert [texts[i] for i in range(3)] == [c.text for c in full.choices]
    # chat streams the same way: a role chunk, then content, one choice each
    chat = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, n=3,
        stream=True, extra_body={"ignore_eos": True}))
    assert all(len(ch.choices) == 1 for ch in chat)
    done = [ch.choices[0].index for ch in chat if ch.choices[0].finish_reason]
    assert sorted(done) == [0, 1, 2]


def test_stream_echo_and_continuous_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(
        model="tiny", prompt="Hello world", max_tokens=5, echo=True, stream=True,
        temperature=0, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    plain = client.completions.create(model="tiny", prompt="Hello world", max_tokens=5,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert chunks[0].choices[0].text.startswith("Hello world")
    assert "".join(c.choices[0].text for c in chunks if c.choices) == \
        "Hello world" + plain.choices[0].text
    used = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None for c in chunks) and used == sorted(used) and used[-1] == 5


def test_streamed_deltas_add_up_to_the_response(client: openai.OpenAI) -> None:
    """The engine's deltas, forwarded: several prompts with n = 2, echo with logprobs (a later
    choice echoes the prompt's logprobs too), a stop string that never shows, one
    finish_reason per choice, text offsets counting the characters already sent; chat
    logprobs the same way."""
    kw = dict(model="tiny", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    first = client.completions.create(prompt=PROMPT, logprobs=0, **kw).choices[0]
    ref = first.text
    # a stop string across a token boundary: its first character is held back a step
    stop = next(ref[b - 1:b + 1] for b in first.logprobs.text_offset[2:]
                if 0 < b < len(ref) - 1 and ref.find(ref[b - 1:b + 1]) == b - 1
                and " " not in ref[b - 1:b + 1])
    prompts = [PROMPT, "Hello world"]
    kw |= dict(stop=[stop], logprobs=1, echo=True, n=2)
    full = client.completions.create(prompt=prompts, **kw)
    assert full.choices[0].text == PROMPT + ref[:ref.index(stop)]
    assert full.choices[0].finish_reason == "stop"
    chunks = [ch.choices[0] for ch in client.completions.create(prompt=prompts, stream=True,
                                                                **kw) if ch.choices]
    for want in full.choices:
        got = [c for c in chunks if c.index == want.index]
        assert "".join(c.text for c in got) == want.text
        assert stop not in "".join(c.text for c in got)[len(prompts[want.index // 2]):]
        assert [c.finish_reason for c in got[:-1]] == [None] * (len(got) - 1)
        assert got[-1].finish_reason == want.finish_reason
        assert [t for c in got for t in c.logprobs.tokens] == want.logprobs.tokens
        streamed = [v for c in got for v in c.logprobs.token_logprobs]
        assert [v is None for v in streamed] == [v is None for v in want.logprobs.token_logprobs]
        assert streamed[1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=1e-4)
        sent = 0
        for c in got:
            if c.logprobs.tokens:
                assert c.logprobs.text_offset[0] == sent
            sent += len(c.text)
    chat = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**chat).choices[0]
    parts = [ch.choices[0] for ch in client.chat.completions.create(**chat, stream=True)]
    assert "".join(p.delta.content or "" for p in parts) == whole.message.content
    assert [t.token for p in parts if p.logprobs for t in p.logprobs.content] == \
        [t.token for t in whole.logprobs.content]


def test_logit_bias_forces_a_token(client: openai.OpenAI, tok: Tokenizer) -> None:
    forced = tok.encode(" fox", add_special_tokens=False)[0]
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0.8,
                                  seed=1, logit_bias={str(forced): 100},
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == tok.decode([forced] * 5)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hello", max_tokens=2,
                                  logit_bias={"999999": 5})
    assert e.value.body["param"] == "logit_bias"


@pytest.mark.parametrize("path,extra,param", [
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
])
def test_unsupported_fields_are_refused(server: LiveServer, path: str, extra: dict,
                                        param: str) -> None:
    body = ({"prompt": "hi"} if "chat" not in path
            else {"messages": [{"role": "user", "content": "hi"}]}) | extra
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_accepted_no_op_values_and_model_lookup(server: LiveServer,
                                                client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        response_format={"type": "text"}, tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f"}}])
    assert r.choices[0].message.content is not None
    assert client.models.retrieve("tiny").id == "tiny"
    missing = httpx.get(f"{server.url}/v1/models/gpt-9")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_listening_socket_lets_asyncio_disable_nagle() -> None:
    """asyncio sets TCP_NODELAY only on IPPROTO_TCP sockets; without it a streamed token waits
    for the client's delayed ACK and reaches it together with the next one."""
    import socket

    from trtdist.server.serve import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_model_without_tokenizer_streams_every_token(hf_models: dict) -> None:
    """Token-id prompts to a model with no tokenizer: no text, but each token is still its
    own chunk as soon as it exists (what a benchmark times as inter-token latency)."""
    server = start_server(1, ["--dtype", "float32", "--max-model-len", "128"],
                          model=str(hf_models["llama"]))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
        chunks = list(client.completions.create(model=None, prompt=[5, 6, 7], max_tokens=6,
                                                stream=True, extra_body={"ignore_eos": True}))
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes.count("length") == 1 and len(finishes) >= 6, finishes
    finally:
        server.stop()
