"""Reading a request body: JSON only, bounded in size and depth, valid Unicode throughout."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request

from trtdist.server.protocol import APIError


def _check_content_type(request: Request) -> None:
    # NOTE: a browser may POST text/plain or form bodies to any origin without a CORS
    # preflight; requiring JSON keeps blind cross-site requests out.
    value = request.headers.get("content-type", "")
    kind = value.split(";", 1)[0].strip().lower()
    if kind != "application/json" and not (kind.startswith("application/")
                                           and kind.endswith("+json")):
        raise APIError(415, f"the Content-Type must be application/json, got "
                            f"{value or 'none'!r}", code="unsupported_media_type")


def _check_unicode(data: Any) -> None:
    # json.loads accepts escaped lone surrogates ("\ud800"), which no tokenizer can encode.
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("unicode_escape").decode()
        raise APIError(400, f"the request contains a lone surrogate ({bad}); strings must be "
                            "valid Unicode") from None


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request's JSON object, or an APIError (413, 415 or 400) saying what is wrong."""
    _check_content_type(request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body has {length} bytes; the limit is {limit}",
                       code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes",
                           code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        _check_unicode(data)
    except RecursionError:  # pragma: no cover - loads already bounds the depth
        raise APIError(400, "the request body is nested too deeply") from None
    return data
