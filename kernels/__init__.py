"""Compute kernels, each beside its plain-torch reference."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trtdist.kernels.paged_attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_torch,
    paged_decode_torch,
    write_kv_cache,
)

if TYPE_CHECKING:
    from trtdist.kernels.triton_attention import TritonAttentionBackend, TritonAttentionMetadata

__all__ = ["AttentionMetadata", "TritonAttentionBackend", "TritonAttentionMetadata",
           "paged_attention", "paged_attention_torch", "paged_decode_torch", "write_kv_cache"]


def __getattr__(name: str) -> object:
    # Lazy: importing the package must not import triton (absent on CPU-only installs).
    if name in ("TritonAttentionBackend", "TritonAttentionMetadata"):
        from trtdist.kernels import triton_attention

        return getattr(triton_attention, name)
    raise AttributeError(f"module 'trtdist.kernels' has no attribute {name!r}")
