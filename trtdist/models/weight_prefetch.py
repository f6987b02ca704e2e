"""L2 weight prefetch for small decode batches: the plan (what, how much) and the side stream.

At batch 1 the GEMVs stream weights at close to copy bandwidth, but between them run short
latency-bound kernels (norm + quantize, rotary, attention) during which DRAM is idle, and
each GEMV starts by waiting on its first DRAM reads. A `WeightPrefetcher` issues, at the
start of each such gap, a bulk L2 prefetch of the head of the next GEMV's weight on a side
stream (so nothing on the main stream waits for it), and joins the side stream back at the
end of the forward (a CUDA graph's capture needs every forked stream joined).

Gaps and what is fetched in them, per decoder layer:
    after qkv:     rotary, attention, (quantize)       -> o_proj   (`o`, all by default)
    after o_proj:  add + norm (+ quantize)             -> gate_up  (`gate_up` bytes)
    after gate_up: SiLU x up (+ quantize)              -> down     (`down` bytes)
    after down:    add + norm (+ quantize)             -> next layer's qkv, or the LM head
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch
from torch import nn

from trtdist.kernels.l2_prefetch import prefetch_l2, supports_l2_prefetch

ENV_VAR = "TRTDIST_L2_PREFETCH"
_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class PrefetchPlan:
    """Bytes of each weight prefetched into L2 before its GEMV (None: all of it; 0: none),
    for steps of at most `max_tokens` tokens (decode at small batch, where GEMVs are
    memory-bound and the kernels between them latency-bound)."""

    max_tokens: int = 4
    qkv: int | None = 16 * _MIB
    o: int | None = None
    gate_up: int | None = 16 * _MIB
    down: int | None = 16 * _MIB
    lm_head: int | None = 16 * _MIB

    @classmethod
    def parse(cls, spec: str) -> PrefetchPlan | None:
        """`"0"` / `"off"`: None. Else comma-separated `key=value` over the defaults; weight
        sizes in MiB or `all`, e.g. `"o=all,gate_up=24,max_tokens=8"`."""
        spec = spec.strip()
        if spec.lower() in ("0", "off", "false", "none"):
            return None
        if spec.lower() in ("", "1", "on", "true", "default"):
            return cls()
        names = [f.name for f in fields(cls)]
        values: dict[str, int | None] = {}
        for item in spec.split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key not in names:
                raise ValueError(f"{ENV_VAR}: bad item {item!r}; expected key=value with key "
                                 f"in {names} (weights in MiB or 'all'), or '0' for off")
            if key != "max_tokens" and value.lower() == "all":
                values[key] = None
                continue
            try:
                number = int(value)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {key}={value!r} is not an integer"
                                 + ("" if key == "max_tokens" else " or 'all'")) from None
            if number < 0 or (key == "max_tokens" and number == 0):
                raise ValueError(f"{ENV_VAR}: {key}={number} must be "
                                 + ("positive" if key == "max_tokens" else ">= 0"))
            values[key] = number if key == "max_tokens" else number * _MIB
        return cls(**values)

    @classmethod
    def from_env(cls) -> PrefetchPlan | None:
        """Off unless TRTDIST_L2_PREFETCH asks for it: measured slower so far (H200, FP8
        batch 1: 2.71 -> 2.82-2.94 ms; see PERF_NOTES.md)."""
        return cls.parse(os.environ.get(ENV_VAR, "0"))


class WeightPrefetcher:
    """Issues L2 prefetches of weights on its own stream, each ordered after the work queued
    so far on the current stream; `join()` makes the current stream wait for them."""

    def __init__(self, plan: PrefetchPlan, device: torch.device) -> None:
        self.plan = plan
        self.stream = torch.cuda.Stream(device)
        self._forked = False

    @classmethod
    def for_device(cls, device: torch.device) -> WeightPrefetcher | None:
        """A prefetcher where the device has the bulk L2 prefetch and TRTDIST_L2_PREFETCH
        does not turn it off; else None."""
        if not supports_l2_prefetch(device):
            return None
        plan = PrefetchPlan.from_env()
        return None if plan is None else cls(plan, device)

    def wants(self, num_tokens: int) -> bool:
        return num_tokens <= self.plan.max_tokens

    def issue(self, layer: nn.Module, nbytes: int | None) -> None:
        """Prefetch the first `nbytes` (None: all) of `layer.weight`."""
        if nbytes == 0:
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            prefetch_l2(layer.weight, nbytes)
        self._forked = True

    def join(self) -> None:
        if self._forked:
            torch.cuda.current_stream().wait_stream(self.stream)
            self._forked = False
