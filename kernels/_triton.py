"""Triton when it is installed: `triton`, `tl` and `jit`; without it, `jit` leaves a kernel a
plain function that is never launched (CPU-only installs run the torch references).

Also programmatic dependent launch (PDL, Hopper and newer): a kernel launched with
`**pdl_launch(device)` may start while the kernel before it on the stream drains. It must
call `pdl_wait(PDL)` before its first load and store (loading constant data such as a weight
tile before it is allowed, but measured slower for the FP8 GEMV, see `fp8_gemm.py`), and
`pdl_trigger(PDL)` once its main work is done, to let the next kernel launch. At batch 1 on
an H200 this took the FP8 step from 2.96 to 2.71 ms and bf16 from 4.24 to 4.00 ms
(`scripts/bench_pdl.py` measures the effect on stand-in kernels).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

try:
    import triton
    import triton.language as tl

    jit: Callable[[Any], Any] = triton.jit
except ImportError:
    triton = None  # type: ignore[assignment]
    tl = None  # type: ignore[assignment]

    def jit(fn: Any) -> Any:
        return fn

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # no Triton, or one without grid dependency control: PDL stays off
    gdc_wait = gdc_launch_dependents = None

PDL_ENV = "TRTDIST_PDL"  # "0" turns programmatic dependent launch off
# "1" / "0": row kernels let the next kernel launch at their start / after their work; unset:
# at their start on a device where the streaming FP8 GEMV has run (kernels/fp8_gemv_stream.py)
EARLY_ENV = "TRTDIST_PDL_EARLY"
_pdl_on: dict[Any, bool] = {}
_streaming_devices: set[Any] = set()


def pdl_enabled(device: Any) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA device of compute capability 9.0
    or newer, a Triton with grid dependency control, not the interpreter, not turned off
    by TRTDIST_PDL=0."""
    if device.type != "cuda":
        return False
    on = _pdl_on.get(device)
    if on is None:
        import torch

        on = (gdc_wait is not None and os.environ.get("TRITON_INTERPRET") != "1"
              and os.environ.get(PDL_ENV, "1") != "0"
              and torch.cuda.get_device_capability(device) >= (9, 0))
        _pdl_on[device] = on
    return on


def mark_streaming(device: Any) -> None:
    """Record that a GEMV streaming its weights before its wait (one CTA an SM, e.g.
    `fp8_gemv_stream`) launches on `device`: from then on one-token row kernels there let the
    next kernel launch at their start (`early_trigger`). The engine's graph runner warms every
    bucket up eagerly before capturing it, so the captured row kernels already see it."""
    _streaming_devices.add(device)


def early_trigger(device: Any) -> bool:
    """Whether one-token row kernels on `device` let the next kernel launch at their start
    (TRTDIST_PDL_EARLY if set, else: a streaming GEMV has launched there, `mark_streaming`).
    A GEMV after them that streams its weights before its wait is then resident, and
    streaming, while they run. Multi-wave GEMVs after them (bf16 models, the Triton FP8
    GEMV) would lose slots to it (fifth and tenth sessions, PERF_NOTES.md), so a device that
    never ran a streaming GEMV keeps the late trigger."""
    v = os.environ.get(EARLY_ENV)
    if v is not None:
        if v not in ("0", "1"):
            raise ValueError(f"{EARLY_ENV} must be 0 or 1 (or unset), got {v!r}")
        return v == "1"
    return device in _streaming_devices


def pdl_launch(device: Any, row: bool = False) -> dict[str, Any]:
    """Launch keyword arguments for a kernel with a `PDL` constexpr: `{"PDL": True,
    "launch_pdl": True}` where PDL is on, else `{"PDL": False}`. `row`: a row kernel's launch
    for one token (one short wave, followed by a one-token GEMV), which gets `PDL = 2`
    (trigger at its start) where `early_trigger(device)`."""
    if not pdl_enabled(device):
        return {"PDL": False}
    return {"PDL": 2 if row and early_trigger(device) else True, "launch_pdl": True}


if triton is not None:
    @jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel on the stream has completed (its writes visible).
        A no-op without PDL. With PDL = 2 the next kernel may launch first (early trigger)."""
        if PDL:
            if PDL == 2:
                gdc_launch_dependents()
            gdc_wait()

    @jit
    def pdl_trigger(PDL: tl.constexpr):
        """Let the next PDL kernel launch (once every program has called this or exited).
        Called late, after a program's main work: the next kernel's programs become resident
        and wait, and early ones took issue slots from instruction-bound row kernels (the
        FP8 batch-1 step went 3.1 -> 4.05 ms with the trigger right after the wait)."""
        if PDL:
            gdc_launch_dependents()
else:
    def pdl_wait(PDL: Any) -> None:  # noqa: N803 - mirrors the constexpr name
        return None

    def pdl_trigger(PDL: Any) -> None:  # noqa: N803
        return None
