"""Request checks against the model: the one place that decides whether a prompt and its
sampling settings fit, used by `LLMEngine.add_request` (Python API) and by the HTTP server
(which calls it before queueing, so the client gets the error as a 400 at once)."""

from __future__ import annotations

from collections.abc import Sequence

from trtdist.sampling_params import SamplingParams


class RequestError(ValueError):
    """A request that cannot run; `param` names the offending field (OpenAI's `param`)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


def check_request(prompt_ids: Sequence[int], params: SamplingParams, vocab_size: int,
                  max_model_len: int, strict_max_tokens: bool = False) -> None:
    """Raise `RequestError` unless the request fits the model.

    With `strict_max_tokens` (the HTTP API), asking for more tokens than the context has room
    for is an error; otherwise (the Python API) generation just stops at the context's end.
    """
    n = len(prompt_ids)
    if n == 0:
        raise RequestError("the prompt is empty", "prompt")
    lo, hi = min(prompt_ids), max(prompt_ids)
    if lo < 0 or hi >= vocab_size:
        raise RequestError(f"prompt token ids must be in [0, {vocab_size}), got "
                           f"{lo if lo < 0 else hi}", "prompt")
    # A prompt that is only scored (max_tokens 0) may fill the whole context.
    if n > max_model_len or (n == max_model_len and params.max_tokens > 0):
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens, "
                           f"and the prompt has {n}; shorten the prompt.", "prompt",
                           "context_length_exceeded")
    if strict_max_tokens and n + params.max_tokens > max_model_len:
        raise RequestError(f"This model's maximum context length is {max_model_len} tokens. "
                           f"However, you requested {n + params.max_tokens} tokens ({n} in the "
                           f"prompt, {params.max_tokens} for the completion).", "max_tokens",
                           "context_length_exceeded")
    if params.top_k > vocab_size:
        raise RequestError(f"top_k must be at most the vocabulary size ({vocab_size}), got "
                           f"{params.top_k}", "top_k")
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise RequestError(f"logit_bias token ids must be in [0, {vocab_size}), got {bad[0]}",
                           "logit_bias")


def default_max_tokens(prompt_len: int, max_model_len: int, default: int | None) -> int:
    """`max_tokens` when a request names none: `default`, or the room left in the context."""
    room = max(max_model_len - prompt_len, 0)
    return min(default, room) if default is not None else room
