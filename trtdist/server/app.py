"""The OpenAI-compatible HTTP API (FastAPI): completions, chat, models, health, metrics.

Request handling lives in `handlers.py` (functions of the server state and the parsed
request); `create_app` only wires routes, errors and auth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trtdist import __version__
from trtdist.server.async_engine import AsyncEngine
from trtdist.server.auth import authorized
from trtdist.server.body import read_json as _read_json
from trtdist.server.chat import ChatTemplate
from trtdist.server.handlers import chat, check_model, completions, model_card
from trtdist.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
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

    @app.post("/v1/completions")
    async def completions_route(request: Request) -> Response:
        data = await _read_json(request, state.max_body_bytes)
        return await completions(state, _parse(CompletionRequest, data))

    @app.post("/v1/chat/completions")
    async def chat_route(request: Request) -> Response:
        data = await _read_json(request, state.max_body_bytes)
        return await chat(state, _parse(ChatCompletionRequest, data))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(state, model_id)
        return model_card(state)

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
