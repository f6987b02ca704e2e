"""Triton when it is installed: `triton`, `tl` and `jit`; without it, `jit` leaves a kernel a
plain function that is never launched (CPU-only installs run the torch references)."""

from __future__ import annotations

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
