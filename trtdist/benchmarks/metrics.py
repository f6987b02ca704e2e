"""Latency / throughput statistics shared by the online and the offline benchmarks.

Definitions (the same as vLLM's `bench serve` and SGLang's `bench_serving`):
- TTFT: request sent -> first output text arrives.
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request (needs 2+ tokens).
- ITL: the gap between two consecutive streamed chunks (offline: consecutive tokens), all
  gaps of all requests pooled.
- E2EL: request sent -> last byte of the response.
- goodput: requests per second that met every SLO given (`ttft`, `tpot`, `e2el`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
#: how many distinct error messages a result keeps (with their counts)
MAX_ERROR_MESSAGES = 5
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
SLO_METRICS = ("ttft", "tpot", "e2el")


def stats(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, std, p50, p90, p99 (linear interpolation, so p50 <= p90 <= p99) of values * scale.

    Empty input gives zeros plus `count: 0`, so every result has the same keys.
    """
    if len(values) == 0:
        return {"count": 0, "mean": 0.0, "std": 0.0,
                **{f"p{p}": 0.0 for p in PERCENTILES}}
    a = np.asarray(values, dtype=np.float64) * scale
    pct = np.percentile(a, PERCENTILES)
    return {"count": int(a.size), "mean": float(a.mean()), "std": float(a.std()),
            **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}}


def parse_slo(text: str) -> dict[str, float]:
    """'ttft=200ms,tpot=50ms' -> {'ttft': 0.2, 'tpot': 0.05} (seconds)."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep or name not in SLO_METRICS:
            raise ValueError(f"--slo items are METRIC=VALUE with METRIC one of "
                             f"{', '.join(SLO_METRICS)}; got {item!r}")
        value = value.strip().lower()
        unit = next((u for u in ("us", "ms", "s") if value.endswith(u)), "ms")
        number = value[: len(value) - len(unit)] if value.endswith(unit) else value
        try:
            seconds = float(number) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"--slo {name}: expected a number with a unit (us, ms, s; ms if "
                             f"none), got {value!r}") from None
        if not seconds > 0:
            raise ValueError(f"--slo {name}: the limit must be positive, got {value!r}")
        out[name] = seconds
    if not out:
        raise ValueError(f"--slo is empty; give e.g. ttft=200ms,tpot=50ms, got {text!r}")
    return out


@dataclass(slots=True)
class RequestResult:
    """One request as the client saw it (times in seconds, from `time.perf_counter`)."""

    ok: bool
    start: float = 0.0
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.latency - self.ttft) / (self.output_len - 1)

    def meets(self, slo: dict[str, float]) -> bool:
        values = {"ttft": self.ttft, "tpot": self.tpot, "e2el": self.latency}
        return self.ok and all((v := values[k]) is None or v <= limit
                               for k, limit in slo.items())


def error_summary(results: Sequence[RequestResult]) -> dict[str, Any]:
    """How many failed and the first distinct messages with their counts (never hidden)."""
    counts: dict[str, int] = {}
    for r in results:
        if not r.ok:
            counts[r.error] = counts.get(r.error, 0) + 1
    first = [{"message": m, "count": c} for m, c in list(counts.items())[:MAX_ERROR_MESSAGES]]
    return {"failed": sum(counts.values()), "distinct": len(counts), "first": first}


def summarize(results: Sequence[RequestResult], duration: float,
              slo: dict[str, float] | None = None) -> dict[str, Any]:
    """The result of one load point; latencies in milliseconds, throughputs per second."""
    ok = [r for r in results if r.ok]
    inputs = sum(r.prompt_len for r in ok)
    outputs = sum(r.output_len for r in ok)
    tpots = [t for r in ok if (t := r.tpot) is not None]
    per_s = 1.0 / duration if duration > 0 else 0.0
    out: dict[str, Any] = {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": error_summary(results),
        "duration_s": duration,
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(ok) * per_s,
        "output_throughput": outputs * per_s,
        "total_token_throughput": (inputs + outputs) * per_s,
        "ttft_ms": stats([r.ttft for r in ok], 1e3),
        "tpot_ms": stats(tpots, 1e3),
        "itl_ms": stats([g for r in ok for g in r.itl], 1e3),
        "e2el_ms": stats([r.latency for r in ok], 1e3),
    }
    good = sum(r.meets(slo) for r in results) if slo else len(ok)
    out["goodput"] = {"slo_ms": {k: v * 1e3 for k, v in (slo or {}).items()},
                      "good_requests": good, "request_goodput": good * per_s}
    return out
