"""A live `mpirun -n 2 trtdist serve` on the tiny model, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from helpers import hf_reference, load_hf
from server_helpers import LiveServer, start_server

from trtdist.engine.tiny import tiny_model_dir
from trtdist.server.chat import ChatTemplate
from trtdist.tokenizer import Tokenizer

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def server() -> LiveServer:
    s = start_server(2, ["--max-model-len", "256", "--max-tokens-per-request", "1000"])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


def _kv_used(server: LiveServer) -> float:
    return server.metric("trtdist:kv_cache_used_blocks")


def _wait_idle(server: LiveServer) -> None:
    import time

    for _ in range(200):
        if _kv_used(server) == 0 and server.metric("trtdist:num_requests_running") == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"KV blocks still used: {_kv_used(server)}")


def test_models_health_version(server: LiveServer, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_completion_and_chat(client: openai.OpenAI) -> None:
    """Greedy text and token counts equal transformers' on the same model and prompt."""
    tok = Tokenizer(tiny_model_dir())
    model = load_hf(tiny_model_dir())
    ids = tok.encode("Hello world")
    c = client.completions.create(model="tiny", prompt="Hello world", max_tokens=7,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert c.choices[0].text == tok.decode(hf_reference(model, ids, 7)[1])
    assert c.choices[0].finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens) == (len(ids), 7)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = ChatTemplate(tok.chat_template or "", None, None).render(messages, True)
    ids = tok.encode(text, add_special_tokens=False)
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == tok.decode(hf_reference(model, ids, 5)[1])
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (len(ids), 5)


def test_streaming_with_usage_matches_non_streaming(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    chat = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "count"}], max_tokens=6,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].usage.completion_tokens == 6


def test_seed_reproducible_and_logprobs(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=10, temperature=1.0,
              top_p=0.9, extra_body={"ignore_eos": True, "top_k": 50})
    a = client.completions.create(**kw, seed=123)
    b = client.completions.create(**kw, seed=123)
    others = {client.completions.create(**kw, seed=s).choices[0].text for s in range(6)}
    assert a.choices[0].text == b.choices[0].text and len(others) > 1
    lp = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, logprobs=2,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert len(lp.choices[0].logprobs.token_logprobs) == 3
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user",
                                                                   "content": "x"}],
                                          max_tokens=2, logprobs=True, top_logprobs=3)
    assert len(chat.choices[0].logprobs.content[0].top_logprobs) == 3


def test_n_and_stop(client: openai.OpenAI) -> None:
    c = client.completions.create(model="tiny", prompt="Hello", max_tokens=6, n=3, seed=1,
                                  extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2]
    assert c.usage.completion_tokens == 18
    ref = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0,
                                    extra_body={"ignore_eos": True}).choices[0].text
    stop = ref[4:6]
    cut = client.completions.create(model="tiny", prompt="Hello", max_tokens=20, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == ref[:ref.index(stop)]


BAD = [  # (path, body or raw string, status, error type, message fragment)
    ("/v1/completions", "{not json", 400, "invalid_request_error", "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "invalid_request_error", "must be a JSON object"),
    ("/v1/completions", {}, 400, "invalid_request_error", "prompt: Field required"),
    ("/v1/completions", {"prompt": ""}, 400, "invalid_request_error", "the prompt is empty"),
    ("/v1/completions", {"prompt": []}, 400, "invalid_request_error", "the prompt is empty"),
    ("/v1/completions", {"prompt": 5}, 400, "invalid_request_error", "prompt"),
    ("/v1/completions", {"prompt": "a " * 400}, 400, "invalid_request_error",
     "maximum context length is 256"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, 400, "invalid_request_error",
     "However, you requested"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "invalid_request_error",
     "max_tokens: 0 is only allowed with echo"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "invalid_request_error",
     "max_tokens: Input should be greater than or equal to 0"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "invalid_request_error",
     "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -0.5}, 400, "invalid_request_error",
     "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "invalid_request_error",
     "temperature: Input should be less than or equal to 2"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "invalid_request_error", "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "invalid_request_error", "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "invalid_request_error", "top_k"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 400, "invalid_request_error", "min_p"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "invalid_request_error", "n: Input"),
    ("/v1/completions", {"prompt": "hi", "n": 1000}, 400, "invalid_request_error", "n: Input"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 400, "invalid_request_error",
     "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": -2.5}, 400,
     "invalid_request_error", "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "invalid_request_error",
     "logprobs"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 400, "invalid_request_error", "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", ""]}, 400, "invalid_request_error",
     "stop sequences must be non-empty"),
    ("/v1/completions", {"prompt": "hi", "stop": 7}, 400, "invalid_request_error", "stop"),
    ("/v1/completions", {"prompt": [1, 2, 99999]}, 400, "invalid_request_error",
     "prompt token ids must be in"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 404, "invalid_request_error",
     "the model 'gpt-9' does not exist"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "invalid_request_error", "stream_options is only allowed when stream is true"),
    ("/v1/completions", {"prompt": "x" * 2_000_000}, 413, "invalid_request_error",
     "limit"),
    ("/v1/chat/completions", {}, 400, "invalid_request_error", "messages: Field required"),
    ("/v1/chat/completions", {"messages": []}, 400, "invalid_request_error", "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_request_error", "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_request_error", "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "invalid_request_error",
     "top_logprobs requires logprobs"),
    ("/v1/nothing", {}, 404, "invalid_request_error", "Not Found"),
    # Values past what the engine takes are refused up front; the server keeps serving.
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 9223372036854775808}, 400,
     "invalid_request_error", "top_k must be"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 2**31}, 400,
     "invalid_request_error", "top_k must be"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "top_k": 100000}, 400,
     "invalid_request_error", "top_k must be at most the vocabulary size"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stop_token_ids": [2**70]}, 400,
     "invalid_request_error", "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 2**64}, 400,
     "invalid_request_error", "seed"),
    ("/v1/completions", '{"prompt": "a \\ud800 b", "max_tokens": 2}', 400,
     "invalid_request_error", "lone surrogate"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', 400,
     "invalid_request_error", "lone surrogate"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "\ud800"}]}]}, 400, "invalid_request_error", "lone surrogate"),
    ("/v1/completions", '{"prompt": "hi", "x": ' + "[" * 5000 + "]" * 5000 + "}", 400,
     "invalid_request_error", "nested too deeply"),
    ("/v1/completions", {"prompt": "hi", "n": 8, "max_tokens": 200}, 400,
     "invalid_request_error", "--max-tokens-per-request"),
]


@pytest.mark.parametrize("path,body,status,etype,fragment", BAD,
                         ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_errors(server: LiveServer, path: str, body: object, status: int,
                                      etype: str, fragment: str) -> None:
    data = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + path, content=data,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == etype and fragment in err["message"], err


def test_server_keeps_serving_after_bad_input(client: openai.OpenAI) -> None:
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_non_json_content_type_is_refused(server: LiveServer, content_type: str | None) -> None:
    """Blind cross-site POSTs (forms, text/plain) need no CORS preflight; refuse them."""
    headers = {"content-type": content_type} if content_type else {}
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "hi"}', headers=headers)
    assert r.status_code == 415, r.text
    assert "application/json" in r.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                    headers={"content-type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_default_max_tokens_fills_the_per_request_cap(server: LiveServer) -> None:
    """A chat request without max_tokens gets the room left, at most the cap over n."""
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "hi"}], "n": 8, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8 * (1000 // 8)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 16  # OpenAI's completions default


def _median_keepalive_ms(url: str, count: int = 25) -> float:
    import statistics
    import time

    with httpx.Client() as c:
        c.get(url)  # connect
        times = []
        for _ in range(count):
            start = time.perf_counter()
            assert c.get(url).status_code == 200
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def test_keepalive_requests_are_not_held_by_nagle(server: LiveServer) -> None:
    """The same kind of app on a listening socket made with protocol 0 (what serve._bind used
    to do) waits for the client's delayed ACK on every keep-alive response; ours must not."""
    import socket
    import threading
    import time

    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    ref = FastAPI()

    @ref.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # protocol 0: no TCP_NODELAY
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(ref, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not uv.started:
            time.sleep(0.05)
        nagle = _median_keepalive_ms(f"http://127.0.0.1:{port}/health")
        ours = _median_keepalive_ms(f"{server.url}/health")
    finally:
        uv.should_exit = True
        thread.join()
    assert ours < nagle / 4, f"median keep-alive /health {ours:.2f} ms vs {nagle:.2f} ms " \
                             "with Nagle's delay"


def test_200_concurrent_streams_then_all_blocks_free(server: LiveServer) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
        stream = await client.completions.create(
            model="tiny", prompt=f"request number {i}", max_tokens=8 + i % 9, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        usage, pieces = None, 0
        async for chunk in stream:
            if chunk.choices:
                pieces += 1
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        assert pieces > 0
        return usage, 8 + i % 9

    async def main() -> list[tuple[int, int]]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x",
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        limits=httpx.Limits(max_connections=256)))
        return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(main())
    assert all(got == want for got, want in results)
    _wait_idle(server)


def test_disconnect_mid_stream_frees_blocks(server: LiveServer) -> None:
    try:
        aborted = server.metric("trtdist:request_success_total", 'finished_reason="abort"')
    except KeyError:
        aborted = 0.0
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": "long story", "max_tokens": 240, "stream": True,
                            "ignore_eos": True}) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert _kv_used(server) > 0
    _wait_idle(server)
    assert server.metric("trtdist:request_success_total", 'finished_reason="abort"') \
        == aborted + 1
