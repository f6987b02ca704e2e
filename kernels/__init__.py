"""Compute kernels, each beside its plain-torch reference."""

from trtdist.kernels.paged_attention import (
    AttentionMetadata,
    paged_attention,
    paged_attention_torch,
    paged_decode_torch,
    write_kv_cache,
)

__all__ = ["AttentionMetadata", "paged_attention", "paged_attention_torch",
           "paged_decode_torch", "write_kv_cache"]
