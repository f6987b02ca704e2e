"""Server-sent events that always end: an error event and `[DONE]`, never a cut stream."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from trtdist.server.protocol import APIError

log = logging.getLogger("trtdist.server")

DONE = "data: [DONE]\n\n"


def event(body: object) -> str:
    return f"data: {json.dumps(body)}\n\n"


async def ending_with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """Pass `events` through; if it fails (shutdown timeout, engine or rank failure), send
    the error as an OpenAI error event, then `[DONE]`. A client that disconnects cancels the
    task (not an Exception), which passes through."""
    try:
        async for e in events:
            yield e
    except Exception as e:  # noqa: BLE001 - turned into an error event
        if not isinstance(e, APIError):
            log.exception("stream failed")
            e = APIError(500, f"the stream failed: {type(e).__name__}", "internal_error")
        yield event(e.body())
        yield DONE
