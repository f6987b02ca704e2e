"""The next GEMV's weight into L2 from the tail of the current one (Hopper's bulk prefetch).

At batch 1 a decode layer is four weight streams (qkv, o, gate_up, down) with short
latency-bound kernels between them (norms, rotary, attention, SiLU), during which DRAM sits
idle, and each GEMV starts with a DRAM round trip. Here each program of a decode GEMV,
once its own weight tile is read (after its PDL trigger, before its stores), issues a
`cp.async.bulk.prefetch.L2.global` of its share of the head of the weight that the model
multiplies next. The prefetches are fire-and-forget on each SM's copy engine, spread over
every program of the grid (one SM's engine alone streams far below DRAM speed), and they
run while the GEMV's last programs finish and the row kernels after it run; the next GEMV
then starts from L2.

The sixth session's version (PERF_NOTES.md) issued the same prefetches from separate
kernels on a side stream: the extra launches and the cross-stream graph edges cost more than
the GEMVs gained. This one adds no launch and no edge.

A prefetch changes no memory and has no completion to wait for: results are identical with
and without it (the tests check that, and that the PTX issues the instruction).
`L2PrefetchPlan` says how many bytes of which weight, `L2Prefetch` is one GEMV's target.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import tl, triton

ENV_VAR = "TRTDIST_L2_NEXT"
CHUNK = 4096  # bytes a thread prefetches at most (a multiple of 16, as the instruction needs)
_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class L2PrefetchPlan:
    """Bytes of each weight prefetched into L2 by the GEMV before it (None: all of it; 0:
    none), for calls of at most `max_tokens` rows (decode at small batch: the weight-bound
    GEMVs). The names are the linear layer each amount is for: `qkv` is fetched by the
    previous layer's down projection, `o` by qkv, `gate_up` by o, `down` by gate_up,
    `lm_head` by the last layer's down."""

    max_tokens: int = 4
    qkv: int | None = 8 * _MIB
    o: int | None = None
    gate_up: int | None = 8 * _MIB
    down: int | None = 4 * _MIB
    lm_head: int | None = 8 * _MIB

    @classmethod
    def parse(cls, spec: str) -> L2PrefetchPlan | None:
        """`"0"` / `"off"`: None. `"1"` / `"on"`: the defaults. Else comma-separated
        `key=value` over the defaults, weights in MiB or `all`, e.g. `"o=all,qkv=16"`."""
        spec = spec.strip().lower()
        if spec in ("0", "off", "false", "none"):
            return None
        if spec in ("", "1", "on", "true", "default"):
            return cls()
        names = [f.name for f in fields(cls)]
        values: dict[str, Any] = {}
        for item in spec.split(","):
            key, sep, value = (s.strip() for s in item.partition("="))
            if not sep or key not in names:
                raise ValueError(f"{ENV_VAR}: bad item {item!r}; expected key=value with key "
                                 f"in {names} (weights in MiB or 'all'), or 'off'")
            if key != "max_tokens" and value == "all":
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
    def for_device(cls, device: torch.device) -> L2PrefetchPlan | None:
        """The plan of TRTDIST_L2_NEXT (default: off) where the device has the bulk
        prefetch, else None."""
        plan = cls.parse(os.environ.get(ENV_VAR, "0"))
        return plan if plan is not None and supports_l2_prefetch(device) else None


@dataclass(frozen=True, slots=True)
class L2Prefetch:
    """What one linear layer's decode GEMV prefetches: the first `nbytes` (None: all) of
    `module.weight` (read at call time), for calls of at most `max_tokens` rows."""

    module: torch.nn.Module
    nbytes: int | None
    max_tokens: int

    def target(self, rows: int) -> tuple[torch.Tensor, int] | None:
        """(tensor, bytes) to prefetch for a call of `rows` rows, or None."""
        if rows > self.max_tokens:
            return None
        w = self.module.weight
        total = w.numel() * w.element_size()
        n = (total if self.nbytes is None else min(total, self.nbytes)) & ~15
        if n <= 0 or not w.is_contiguous() or w.data_ptr() % 16:
            return None
        return w, n


def supports_l2_prefetch(device: torch.device) -> bool:
    """A CUDA device with the bulk prefetch (compute capability 9.0+), Triton, and not the
    interpreter (which runs no inline PTX)."""
    return (triton is not None and device.type == "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"
            and torch.cuda.get_device_capability(device) >= (9, 0))


def launch_args(target: tuple[torch.Tensor, int] | None, like: torch.Tensor
                ) -> tuple[torch.Tensor, int, bool]:
    """(bytes view of the weight, bytes, NEXT) for a GEMV launch; `like` stands in for the
    pointer when there is nothing to fetch."""
    if target is None:
        return like, 0, False
    w, n = target
    return w.view(-1).view(torch.uint8), n, True


if triton is not None:
    _CHUNK = tl.constexpr(CHUNK)

    @_jit
    def prefetch_share(base_ptr, nbytes, prog, nprog, NT: tl.constexpr):
        """Program `prog` of `nprog` prefetches its share of `nbytes` from `base_ptr` (a uint8
        pointer, 16-byte aligned; nbytes a multiple of 16): up to NT threads issue one bulk
        prefetch of at most CHUNK bytes each. NT should be the program's thread count (one
        element a thread)."""
        share = (tl.cdiv(tl.cdiv(nbytes, nprog), 16) * 16).to(tl.int64)
        t = tl.arange(0, NT).to(tl.int64)
        off = prog.to(tl.int64) * share + t * _CHUNK
        size = tl.minimum(tl.minimum(share - t * _CHUNK, _CHUNK), nbytes - off)
        size = tl.maximum(size, 0).to(tl.int32)
        # NOTE: predicated in the asm (inline asm takes no mask); a share's tail beyond NT *
        # CHUNK bytes is not fetched (a hint: nothing is wrong, only less is fetched)
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
            "=r,l,r", [base_ptr + off, size], dtype=tl.int32, is_pure=False, pack=1)
else:
    def prefetch_share(*args: Any, **kwargs: Any) -> None:
        return None
