"""Per-request sampling and stopping settings (vLLM / OpenAI semantics)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
MAX_N = 64  # most completions per request (the OpenAI API's 128 is more than a batch wants)
MAX_INT32 = 2**31 - 1  # bound of token counts, top_k and token ids (the runtime's int32 ops)
_INT_FIELDS = ("n", "max_tokens", "top_k", "min_tokens")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
# What each RequestOutput of a request carries (vLLM's RequestOutputKind): everything so far,
# only what is new since the request's previous output, or nothing until the final one.
CUMULATIVE, DELTA, FINAL_ONLY = "cumulative", "delta", "final_only"
OUTPUT_KINDS = (CUMULATIVE, DELTA, FINAL_ONLY)


def _check_types(p: SamplingParams) -> None:
    """Wrong Python types fail here, naming the field, not deep in the engine."""
    def is_int(v: object) -> bool:
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    for name in _INT_FIELDS:
        v = getattr(p, name)
        if not is_int(v):
            raise ValueError(f"{name} must be an integer, got {v!r}")
        object.__setattr__(p, name, int(v))
    for name in ("seed", "logprobs", "prompt_logprobs"):
        v = getattr(p, name)
        if v is not None:
            if not is_int(v):
                raise ValueError(f"{name} must be an integer or None, got {v!r}")
            object.__setattr__(p, name, int(v))
    for name in _FLOAT_FIELDS:
        v = getattr(p, name)
        if not isinstance(v, numbers.Real) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
        object.__setattr__(p, name, float(v))
    for name in _BOOL_FIELDS:
        v = getattr(p, name)
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False, got {v!r}")
    if not all(is_int(t) and 0 <= t <= MAX_INT32 for t in p.stop_token_ids):
        raise ValueError(f"stop_token_ids must be token ids in [0, {MAX_INT32}], got "
                         f"{list(p.stop_token_ids)}")
    object.__setattr__(p, "stop_token_ids", tuple(int(t) for t in p.stop_token_ids))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature 0 means greedy. top_k 0 (or -1) disables top-k; top_p 1 and min_p 0 disable
    theirs. A `seed` makes sampling reproducible whatever else is in the batch. `logprobs`
    asks for the sampled token's log-probability plus that many most likely alternatives;
    `prompt_logprobs` the same for every prompt token after the first (vLLM's names).
    `max_tokens` 0 generates nothing (useful with `prompt_logprobs`, to score a prompt).
    `logit_bias` maps token ids to a value added to their logits before sampling (OpenAI's
    range, -100 to 100); it is kept as sorted (id, bias) pairs.
    `output_kind` says what the engine's outputs of the request carry: "cumulative" (each a
    snapshot of everything so far; what `DistributedLLM.generate` returns), "delta" (only the
    new token ids, text and logprobs since the request's previous output; the text never
    shows what a stop string may still claim) or "final_only" (one cumulative output when the
    request finishes).
    """

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: str = CUMULATIVE
    extra: dict[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_types(self)
        bias = self.logit_bias
        items = bias.items() if isinstance(bias, dict) else bias
        try:
            pairs = tuple(sorted((int(t), float(b)) for t, b in items))
        except (TypeError, ValueError):
            raise ValueError("logit_bias must map token ids to numbers") from None
        object.__setattr__(self, "logit_bias", pairs)
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        checks = [
            (1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}], got {self.n}"),
            (0 <= self.max_tokens <= MAX_INT32,
             f"max_tokens must be in [0, {MAX_INT32}], got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 <= self.top_k <= MAX_INT32,
             f"top_k must be -1 or 0 (off), or in [1, {MAX_INT32}], got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0,
             f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2,
             f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
             f"prompt_logprobs must be in [0, {MAX_LOGPROBS}], got {self.prompt_logprobs}"),
            (all(-100 <= b <= 100 for _, b in self.logit_bias),
             "logit_bias values must be in [-100, 100]"),
            (all(0 <= t <= MAX_INT32 for t, _ in self.logit_bias),
             f"logit_bias token ids must be in [0, {MAX_INT32}]"),
            (self.seed is None or 0 <= self.seed < 2**63, f"seed must be in [0, 2^63), got "
                                                          f"{self.seed}"),
            (0 <= self.min_tokens <= self.max_tokens,
             f"min_tokens must be in [0, max_tokens], got {self.min_tokens}"),
            (all(isinstance(s, str) and s for s in self.stop),
             "stop must be non-empty strings"),
            (self.output_kind in OUTPUT_KINDS,
             f"output_kind must be one of {', '.join(map(repr, OUTPUT_KINDS))}, got "
             f"{self.output_kind!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
