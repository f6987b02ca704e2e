"""Handlers of the OpenAI endpoints: parsed request + server state -> response.

Completions take one prompt or a list (choices prompt-major, `n` per prompt, usage summed);
`echo` with `logprobs` scores the prompt's tokens too (the first one null), as vLLM does, and
`max_tokens` 0 with `echo` returns the prompt alone. Every request passes the engine's own
checks (`runtime/validation.py`) before it is queued.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from trtdist.outputs import RequestOutput
from trtdist.runtime.validation import RequestError, check_request, default_max_tokens
from trtdist.sampling_params import SamplingParams
from trtdist.server.formatting import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    echo_prompt,
    usage,
)
from trtdist.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from trtdist.server.sse import ending_with_done
from trtdist.server.streaming import PromptStream, StreamSpec, sse_events

if TYPE_CHECKING:
    from trtdist.server.app import ServerState


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"the model {name!r} does not exist; this server serves "
                            f"{state.model_name!r}", param="model", code="model_not_found")


def _prompt_ids(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        return list(prompt)  # checked against the vocabulary by check_request
    if state.tokenizer is None:
        raise APIError(400, "this model has no tokenizer; send token ids", param="prompt")
    return state.tokenizer.encode(prompt)


def _check(state: ServerState, ids: list[int], params: SamplingParams) -> None:
    """The engine's own request checks (runtime/validation.py), as a 400 before queueing."""
    try:
        check_request(ids, params, state.vocab_size, state.max_model_len,
                      strict_max_tokens=True)
    except RequestError as e:
        raise APIError(400, str(e), param=e.param, code=e.code) from None


def _submit_all(state: ServerState, rid: str, requests: list[tuple[list[int], SamplingParams]]
                ) -> list[AsyncIterator[RequestOutput]]:
    """Queue every prompt of a request (`rid-i`); if one is refused, abort the others."""
    streams: list[AsyncIterator[RequestOutput]] = []
    try:
        for i, (ids, params) in enumerate(requests):
            sub = rid if len(requests) == 1 else f"{rid}-{i}"
            streams.append(state.engine.submit(sub, ids, params))
    except APIError:
        for i in range(len(streams)):
            state.engine.abort(rid if len(requests) == 1 else f"{rid}-{i}")
        raise
    return streams


async def _collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
    final = None
    async for out in stream:
        final = out
    assert final is not None
    return final


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    # A stream that must end early (shutdown, engine failure) ends with an error event and
    # [DONE], never a cut (see sse.py).
    return StreamingResponse(ending_with_done(events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _max_tokens(state: ServerState, prompt_len: int, asked: int | None, default: int | None,
                completions: int) -> int:
    """`max_tokens` of each of a request's `completions` (n x prompts) outputs: as asked, or
    the default (the room left in the context, at most the per-request cap shared out);
    n x prompts x max_tokens may not exceed --max-tokens-per-request."""
    cap = state.max_tokens_per_request
    if asked is None:
        tokens = min(default_max_tokens(prompt_len, state.max_model_len, default),
                     max(cap // completions, 1))
    else:
        tokens = asked
    if completions * tokens > cap:
        raise APIError(400, f"{completions} completion(s) x max_tokens {tokens} = "
                            f"{completions * tokens} exceeds this server's limit of {cap} "
                            "output tokens per request (--max-tokens-per-request)",
                       param="max_tokens", code="max_tokens_per_request_exceeded")
    return tokens


def _sampling(req: Any, *args: Any) -> SamplingParams:
    try:
        return req.sampling_params(*args)
    except ValueError as e:  # bounds the request model does not know (types, ranges)
        raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None


def _stream_spec(state: ServerState, kind: str, rid: str, created: int, req: Any,
                 params: SamplingParams) -> StreamSpec:
    """A stream's shape. Its requests' params ask for deltas (protocol.py), so the stream only
    forwards what the engine emits."""
    opts = req.stream_options
    return StreamSpec(kind, rid, created, state.model_name, params.n,
                      include_usage=bool(opts and opts.include_usage),
                      continuous_usage=bool(opts and opts.continuous_usage_stats))


async def completions(state: ServerState, req: CompletionRequest) -> Response:
    check_model(state, req.model)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens: 0 is only allowed with echo (to score the prompt)",
                       param="max_tokens")
    texts = TokenTexts(state.tokenizer)
    # echo + logprobs: the prompt's tokens are scored too (first one null), as vLLM does
    prompt_lps = req.logprobs if req.echo and req.logprobs is not None else None
    requests = []
    for prompt in req.prompts:
        ids = _prompt_ids(state, prompt)
        max_tokens = _max_tokens(state, len(ids), req.max_tokens, 16,
                                 req.n * len(req.prompts))
        params = _sampling(req, max_tokens, req.logprobs, prompt_lps)
        _check(state, ids, params)
        requests.append((ids, params))
    echo_texts = [(p if isinstance(p, str) else texts.text(ids)) if req.echo else None
                  for p, (ids, _) in zip(req.prompts, requests)]
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    streams = _submit_all(state, rid, requests)
    if req.stream:
        prompts = [PromptStream(s, len(ids), echo, prompt_lps is not None)
                   for s, (ids, _), echo in zip(streams, requests, echo_texts)]
        spec = _stream_spec(state, "completion", rid, created, req, requests[0][1])
        return _sse(sse_events(spec, prompts, texts))
    outs = await asyncio.gather(*(_collect(s) for s in streams))
    choices = []
    for p, out in enumerate(outs):
        echo = echo_texts[p]
        prompt = echo_prompt(out) if echo is not None and prompt_lps is not None else None
        for c in out.outputs:
            choices.append({"index": p * req.n + c.index, "text": (echo or "") + c.text,
                            "logprobs": completion_logprobs(texts, c, 0, prompt),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                         "model": state.model_name, "choices": choices,
                         "usage": usage(outs, [len(ids) for ids, _ in requests])})


async def chat(state: ServerState, req: ChatCompletionRequest) -> Response:
    check_model(state, req.model)
    if state.chat_template is None or state.tokenizer is None:
        raise APIError(400, "this model has no chat template; use /v1/completions",
                       param="messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages") from None
    text = state.chat_template.render(messages, req.add_generation_prompt)
    ids = state.tokenizer.encode(text, add_special_tokens=False)
    asked = req.max_completion_tokens or req.max_tokens
    max_tokens = _max_tokens(state, len(ids), asked, None, req.n)
    params = _sampling(req, max_tokens, req.requested_logprobs())
    _check(state, ids, params)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream, = _submit_all(state, rid, [(ids, params)])
    texts = TokenTexts(state.tokenizer)
    if req.stream:
        spec = _stream_spec(state, "chat", rid, created, req, params)
        return _sse(sse_events(spec, [PromptStream(stream, len(ids))], texts))
    out = await _collect(stream)
    return JSONResponse({
        "id": rid, "object": "chat.completion", "created": created,
        "model": state.model_name,
        "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                     "logprobs": chat_logprobs(texts, c), "finish_reason": c.finish_reason,
                     "stop_reason": c.stop_reason} for c in out.outputs],
        "usage": usage([out], [len(ids)])})


def model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "trtdist", "max_model_len": state.max_model_len}
