"""Server-sent events for streamed completions and chat completions.

One choice per chunk, as OpenAI streams: a request with several prompts and `n` completions
each has `len(prompts) * n` choices, indexed prompt-major. Each choice's `finish_reason`
is sent exactly once; usage once at the end (`include_usage`) and, with
`continuous_usage_stats`, the usage so far in every chunk.

NOTE: the engine emits deltas (SamplingParams.output_kind "delta"): each output carries only
the new tokens, text and logprobs of the completions that have something to show, and its
text never holds what a stop string or an unfinished UTF-8 character may still change
(runtime/detokenize.py). This module only forwards them: one chunk per completion output,
as soon as the engine has it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from trtdist.outputs import RequestOutput, TokenLogprob
from trtdist.server.formatting import (
    TokenTexts,
    chat_logprobs,
    completion_logprobs,
    echo_prompt,
    usage_of,
)


@dataclass(slots=True)
class PromptStream:
    """One prompt's engine stream (of deltas) and what its choices echo."""

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
    include_usage: bool = False
    continuous_usage: bool = False


@dataclass(slots=True)
class _Choice:
    sent_text: int = 0  # characters of the output's text sent (text offsets count from it)
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


async def sse_events(spec: StreamSpec, prompts: Sequence[PromptStream],
                     texts: TokenTexts) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if spec.kind == "chat" else "text_completion"
    choices: list[_Choice | None] = [None] * (len(prompts) * spec.n)  # None: not started
    # the prompt's logprobs come in its first output only (echo of a later choice uses them)
    prompt_lps: list[list[TokenLogprob | None] | None] = [None] * len(prompts)
    prompt_tokens = sum(p.prompt_len for p in prompts)
    completion_tokens = 0  # forwarded so far

    def chunk(choice: dict[str, Any] | None, **extra: Any) -> str:
        body = {"id": spec.request_id, "object": obj, "created": spec.created,
                "model": spec.model, "choices": [choice] if choice else [], **extra}
        if spec.continuous_usage and "usage" not in body:
            body["usage"] = usage_of(prompt_tokens, completion_tokens)
        return f"data: {json.dumps(body)}\n\n"

    if spec.kind == "chat":
        for i in range(len(choices)):
            yield chunk({"index": i, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None})
    async for p, out in merge([ps.outputs for ps in prompts]):
        ps = prompts[p]
        if out.prompt_logprobs is not None:
            prompt_lps[p] = out.prompt_logprobs
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            index = p * spec.n + c.index
            if spec.kind == "chat":
                yield chunk({"index": index, "delta": {"content": c.text},
                             "logprobs": chat_logprobs(texts, c),
                             "finish_reason": c.finish_reason})
                continue
            st = choices[index]
            echo = st is None and ps.echo_text is not None
            if st is None:
                st = choices[index] = _Choice()
            prefix = ps.echo_text if echo else ""
            assert prefix is not None
            logprobs = completion_logprobs(
                texts, c, 0, echo_prompt(out, prompt_lps[p]) if echo and ps.echo_logprobs
                else None, st.sent_text + st.echoed)
            st.sent_text += len(c.text)
            st.echoed += len(prefix)
            yield chunk({"index": index, "text": prefix + c.text, "logprobs": logprobs,
                         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    if spec.include_usage:
        yield chunk(None, usage=usage_of(prompt_tokens, completion_tokens))
    yield "data: [DONE]\n\n"
