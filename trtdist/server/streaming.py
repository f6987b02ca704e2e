"""Server-sent events for streamed completions and chat completions.

One choice per chunk, as OpenAI streams: a request with several prompts and `n` completions
each has `len(prompts) * n` choices, indexed prompt-major. Each choice's `finish_reason`
is sent exactly once; usage once at the end (`include_usage`) and, with
`continuous_usage_stats`, the usage so far in every chunk. A chunk is written as soon as a
token's text exists, holding back only what a stop string or an unfinished UTF-8 character
may still change.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from trtdist.outputs import CompletionOutput, RequestOutput
from trtdist.server.formatting import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    echo_prompt,
    usage,
)


@dataclass(slots=True)
class PromptStream:
    """One prompt's engine stream and what its choices echo."""

    outputs: AsyncIterator[RequestOutput]
    prompt_len: int
    echo_text: str | None = None  # completions with echo: the prompt's text
    echo_logprobs: bool = False  # ... and its tokens' logprobs


@dataclass(slots=True)
class StreamSpec:
    kind: str  # "chat" or "completion"
    request_id: str
    created: int
    model: str
    n: int
    stop_hold: int  # characters a stop string may still claim
    include_usage: bool = False
    continuous_usage: bool = False


@dataclass(slots=True)
class _Choice:
    sent_text: int = 0
    sent_tokens: int = 0
    started: bool = False
    finished: bool = False
    echoed: int = 0  # characters of echoed prompt sent (not part of the output's text)


async def merge(streams: Sequence[AsyncIterator[RequestOutput]]
                ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several streams as they come. Closing the merged iterator
    (client gone) cancels the readers, which aborts the requests still running."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def _delta(c: CompletionOutput, st: _Choice, hold: int) -> str:
    done = c.finish_reason is not None
    end = len(c.text) if done else len(c.text) - hold
    while not done and end > st.sent_text and c.text[end - 1] == "\ufffd":
        end -= 1
    return c.text[st.sent_text:max(end, st.sent_text)]


async def sse_events(spec: StreamSpec, prompts: Sequence[PromptStream],
                     texts: TokenTexts) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if spec.kind == "chat" else "text_completion"
    choices = [_Choice() for _ in range(len(prompts) * spec.n)]
    latest: list[RequestOutput | None] = [None] * len(prompts)
    prompt_lens = [p.prompt_len for p in prompts]

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        body = {"id": spec.request_id, "object": obj, "created": spec.created,
                "model": spec.model, "choices": [choice] if choice else [], **extra}
        if spec.continuous_usage and "usage" not in body:
            body["usage"] = usage(latest, prompt_lens)
        return f"data: {json.dumps(body)}\n\n"

    if spec.kind == "chat":
        for i in range(len(choices)):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
    async for p, out in merge([ps.outputs for ps in prompts]):
        latest[p] = out
        ps = prompts[p]
        for c in out.outputs:
            index = p * spec.n + c.index
            st = choices[index]
            if st.finished:
                continue
            done = c.finish_reason is not None
            delta = _delta(c, st, spec.stop_hold)
            new_tokens = len(c.token_ids) > st.sent_tokens
            echo = ps.echo_text is not None and not st.started
            # NOTE: a model without a tokenizer has no text to stream: each new token is
            # still a chunk (empty text), so clients see the tokens arrive as they do.
            if not (delta or done or echo or (new_tokens and (c.logprobs is not None
                                                              or texts.tokenizer is None))):
                continue
            lp_start, text_start = st.sent_tokens, st.sent_text
            st.sent_text += len(delta)
            st.sent_tokens = len(c.token_ids)
            st.finished = done
            if spec.kind == "chat":
                yield chunk({"index": index, "delta": {"content": delta},
                             "logprobs": chat_logprobs(texts, c, lp_start),
                             "finish_reason": c.finish_reason})
                continue
            prefix = ps.echo_text if echo else ""
            assert prefix is not None
            st.started = True
            logprobs = completion_logprobs(
                texts, c, lp_start, echo_prompt(out) if echo and ps.echo_logprobs else None,
                text_start + st.echoed)
            st.echoed += len(prefix)
            yield chunk({"index": index, "text": prefix + delta, "logprobs": logprobs,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    if spec.include_usage:
        yield chunk(None, usage=usage(latest, prompt_lens))
    yield "data: [DONE]\n\n"
