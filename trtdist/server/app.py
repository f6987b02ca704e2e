"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, metrics."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trtdist import __version__
from trtdist.outputs import CompletionOutput, RequestOutput
from trtdist.sampling_params import SamplingParams
from trtdist.server.async_engine import AsyncEngine
from trtdist.server.auth import authorized
from trtdist.server.body import read_json as _read_json
from trtdist.server.chat import ChatTemplate
from trtdist.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from trtdist.server.sse import ending_with_done
from trtdist.tokenizer import Tokenizer


# The cap on n x max_tokens of one request, and so the default max_tokens of a chat request
# that names none (the room left in the context, at most this over n).
DEFAULT_MAX_TOKENS_PER_REQUEST = 32768


@dataclass(slots=True)
class ServerState:
    engine: AsyncEngine
    tokenizer: Tokenizer | None
    model_name: str
    max_model_len: int
    vocab_size: int
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    chat_template: ChatTemplate | None = None
    max_tokens_per_request: int = DEFAULT_MAX_TOKENS_PER_REQUEST  # n x max_tokens


def _validation_error(e: ValidationError) -> APIError:
    err = e.errors()[0]
    param = ".".join(str(x) for x in err["loc"]) or None
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{param}: {msg}" if param else msg, param=param)


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _validation_error(e) from None


def _usage(prompt_len: int, out: RequestOutput) -> dict[str, int]:
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt_len, "completion_tokens": completion,
            "total_tokens": prompt_len + completion}


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="trtdist", version=__version__)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(),
                            status_code=e.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):  # type: ignore[no-untyped-def]
        if state.api_key and request.url.path.startswith("/v1"):
            if not authorized(request.headers.get("authorization"), state.api_key):
                return JSONResponse(APIError(401, "a valid API key is required (Authorization: "
                                                  "Bearer <key>)", code="invalid_api_key").body(),
                                    status_code=401)
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{state.model_name!r}", param="model", code="model_not_found")

    def prompt_ids(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if state.tokenizer is None:
                raise APIError(400, "this model has no tokenizer; send token ids",
                               param="prompt")
            return state.tokenizer.encode(prompt)
        bad = [t for t in prompt if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {state.vocab_size}); got "
                                f"{bad[0]}", param="prompt")
        return list(prompt)

    def budget(ids: list[int], max_tokens: int | None, default: int | None,
               n: int = 1) -> int:
        limit, cap = state.max_model_len, state.max_tokens_per_request
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens, and "
                                f"the prompt has {len(ids)}; shorten the prompt.",
                           param="prompt", code="context_length_exceeded")
        room = limit - len(ids)
        if max_tokens is None:  # the room left, within the per-request cap
            tokens = min(default or room, room, max(cap // n, 1))
        else:
            tokens = max_tokens
        if tokens > room:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                                f"However, you requested {len(ids) + tokens} tokens "
                                f"({len(ids)} in the prompt, {tokens} for the completion).",
                           param="max_tokens", code="context_length_exceeded")
        if n * tokens > cap:
            raise APIError(400, f"n x max_tokens = {n} x {tokens} = {n * tokens} exceeds this "
                                f"server's limit of {cap} output tokens per request "
                                "(--max-tokens-per-request)", param="max_tokens",
                           code="max_tokens_per_request_exceeded")
        return tokens

    def sampling(req: Any, max_tokens: int, logprobs: int | None) -> SamplingParams:
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as e:  # bounds the request model does not know (types, ranges)
            raise APIError(400, str(e), param=str(e).split(" ", 1)[0]) from None

    def token_text(token_id: int) -> str:
        return state.tokenizer.decode([token_id], False) if state.tokenizer else str(token_id)

    def completion_logprobs(c: CompletionOutput, start: int = 0) -> dict[str, Any] | None:
        if c.logprobs is None:
            return None
        lps = c.logprobs[start:]
        return {"tokens": [token_text(lp.token_id) for lp in lps],
                "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in lps],
                "text_offset": []}

    def chat_logprobs(c: CompletionOutput, start: int = 0) -> dict[str, Any] | None:
        if c.logprobs is None:
            return None
        content = []
        for lp in c.logprobs[start:]:
            text = token_text(lp.token_id)
            content.append({"token": text, "logprob": lp.logprob,
                            "bytes": list(text.encode()),
                            "top_logprobs": [{"token": token_text(t), "logprob": v,
                                              "bytes": list(token_text(t).encode())}
                                             for t, v in lp.top]})
        return {"content": content}

    async def collect(stream: AsyncIterator[RequestOutput]) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        assert final is not None
        return final

    def stream_response(rid: str, kind: str, prompt_len: int, params: SamplingParams,
                        stream: AsyncIterator[RequestOutput], include_usage: bool,
                        created: int) -> StreamingResponse:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        hold = max((len(s) for s in params.stop), default=1) - 1

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
            body = {"id": rid, "object": obj, "created": created, "model": state.model_name,
                    "choices": choices, **extra}
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            sent_text = [0] * params.n
            sent_tokens = [0] * params.n
            if kind == "chat":
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}
                             for i in range(params.n)])
            last = None
            async for out in stream:
                last = out
                choices = []
                for c in out.outputs:
                    done = c.finish_reason is not None
                    # Hold back what a stop string or an unfinished UTF-8 character may change.
                    end = len(c.text) if done else len(c.text) - hold
                    while not done and end > sent_text[c.index] and c.text[end - 1] == "\ufffd":
                        end -= 1
                    delta = c.text[sent_text[c.index]:max(end, sent_text[c.index])]
                    new_tokens = len(c.token_ids) > sent_tokens[c.index]
                    if not delta and not done and not new_tokens:
                        continue
                    lp_start = sent_tokens[c.index]
                    sent_text[c.index] += len(delta)
                    sent_tokens[c.index] = len(c.token_ids)
                    if not delta and not done:
                        continue
                    if kind == "chat":
                        choices.append({"index": c.index, "delta": {"content": delta},
                                        "logprobs": chat_logprobs(c, lp_start),
                                        "finish_reason": c.finish_reason})
                    else:
                        choices.append({"index": c.index, "text": delta,
                                        "logprobs": completion_logprobs(c, lp_start),
                                        "finish_reason": c.finish_reason,
                                        "stop_reason": c.stop_reason})
                if choices:
                    yield chunk(choices)
            if include_usage and last is not None:
                yield chunk([], usage=_usage(prompt_len, last))
            yield "data: [DONE]\n\n"

        return StreamingResponse(ending_with_done(events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req: CompletionRequest = _parse(CompletionRequest, await _read_json(
            request, state.max_body_bytes))
        check_model(req.model)
        ids = prompt_ids(req.prompt)  # type: ignore[arg-type]
        max_tokens = budget(ids, req.max_tokens, 16, req.n)
        params = sampling(req, max_tokens, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream = state.engine.submit(rid, ids, params)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(rid, "completion", len(ids), params, stream, include,
                                   created)
        out = await collect(stream)
        prefix = req.prompt if (req.echo and isinstance(req.prompt, str)) else ""
        return JSONResponse({
            "id": rid, "object": "text_completion", "created": created,
            "model": state.model_name,
            "choices": [{"index": c.index, "text": prefix + c.text,
                         "logprobs": completion_logprobs(c), "finish_reason": c.finish_reason,
                         "stop_reason": c.stop_reason} for c in out.outputs],
            "usage": _usage(len(ids), out)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, await _read_json(
            request, state.max_body_bytes))
        check_model(req.model)
        if state.chat_template is None or state.tokenizer is None:
            raise APIError(400, "this model has no chat template; use /v1/completions",
                           param="messages")
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        text = state.chat_template.render(messages, req.add_generation_prompt)
        ids = state.tokenizer.encode(text, add_special_tokens=False)
        max_tokens = budget(ids, req.max_completion_tokens or req.max_tokens, None, req.n)
        params = sampling(req, max_tokens, req.requested_logprobs())
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = state.engine.submit(rid, ids, params)
        if req.stream:
            include = bool(req.stream_options and req.stream_options.include_usage)
            return stream_response(rid, "chat", len(ids), params, stream, include, created)
        out = await collect(stream)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created,
            "model": state.model_name,
            "choices": [{"index": c.index,
                         "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c), "finish_reason": c.finish_reason,
                         "stop_reason": c.stop_reason} for c in out.outputs],
            "usage": _usage(len(ids), out)})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "trtdist", "max_model_len": state.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        e = state.engine
        if not e.healthy:
            return JSONResponse({"status": "unhealthy"}, status_code=503)
        if not e.accepting:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.engine.metrics.registry),
                                 media_type=CONTENT_TYPE_LATEST)

    return app
