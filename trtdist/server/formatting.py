"""OpenAI response pieces built from engine outputs: logprobs blocks (completions and chat),
text offsets, usage. Pure functions of the outputs and the tokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trtdist.outputs import CompletionOutput, RequestOutput, TokenLogprob
from trtdist.tokenizer import Tokenizer


class TokenTexts:
    """Token ids -> their text, as the logprobs blocks show them."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> str:
        """The token as written in `tokens` / `top_logprobs` (special tokens included)."""
        return self.tokenizer.decode([token_id], False) if self.tokenizer else str(token_id)

    def piece(self, token_id: int) -> str:
        """What the token adds to the returned text (special tokens add nothing)."""
        return self.tokenizer.decode([token_id], True) if self.tokenizer else ""

    def text(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), True) if self.tokenizer else ""


def completion_logprobs(texts: TokenTexts, c: CompletionOutput, start: int = 0,
                        prompt: tuple[list[int], list[TokenLogprob | None]] | None = None,
                        text_start: int = 0) -> dict[str, Any] | None:
    """The `logprobs` block of a completions choice for the output tokens from `start`,
    preceded by the prompt's tokens when `prompt` (ids, logprobs) is given (echo). Each
    `text_offset` is where the token's text starts in the choice's text, counting from
    `text_start` (the characters of it already sent, when streaming)."""
    if c.logprobs is None and prompt is None:
        return None
    ids: list[int] = []
    entries: list[TokenLogprob | None] = []
    if prompt is not None:
        ids += prompt[0]
        entries += prompt[1]
    for lp in (c.logprobs or [])[start:]:
        ids.append(lp.token_id)
        entries.append(lp)
    offsets, at = [], text_start
    for t in ids:
        offsets.append(at)
        at += len(texts.piece(t))
    return {"tokens": [texts.token(t) for t in ids],
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {texts.token(t): v for t, v in e.top}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(texts: TokenTexts, c: CompletionOutput, start: int = 0) -> dict[str, Any] | None:
    if c.logprobs is None:
        return None
    content = []
    for lp in c.logprobs[start:]:
        text = texts.token(lp.token_id)
        content.append({"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": texts.token(t), "logprob": v,
                                          "bytes": list(texts.token(t).encode())}
                                         for t, v in lp.top]})
    return {"content": content}


def usage(outputs: Sequence[RequestOutput], prompt_lens: Sequence[int]) -> dict[str, int]:
    """Of a request's final (cumulative) outputs, summed over its prompts (each prompt counted
    once, whatever `n`)."""
    return usage_of(sum(prompt_lens), sum(len(c.token_ids) for out in outputs
                                          for c in out.outputs))


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def echo_prompt(out: RequestOutput, prompt_logprobs: Sequence[TokenLogprob | None] | None = None
                ) -> tuple[list[int], list[TokenLogprob | None]]:
    """(prompt ids, their logprobs) for echo: `prompt_logprobs`, else the output's, else all
    None (none were computed)."""
    ids = list(out.prompt_token_ids)
    lps = prompt_logprobs if prompt_logprobs is not None else out.prompt_logprobs
    return ids, list(lps) if lps is not None else [None] * len(ids)
