"""Rotary embedding of q and k fused with the write of k and v into the paged KV cache.

`qkv` is the packed output of the fused QKV projection, `[T, (Hq + 2 * Hkv) * D]`. Rotary
uses the rotate-half layout (Llama / transformers) with a precomputed `cos_sin` table
`[max_positions, D]` float32: cos of the D/2 frequencies in the first half of each row, sin
in the second. Tokens whose slot is -1 (padding of a CUDA-graph bucket) are not written.
"""

from __future__ import annotations

import torch


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """`[max_positions, D]` float32: cos(p * f) | sin(p * f) for each frequency f."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq[None, :].float()  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def write_kv_cache_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter `[T, Hkv, D]` keys/values into their slots, skipping slot -1."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def rotary_and_cache_torch(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                           q_heads: int, kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: -> q `[T, Hq, D]`, k `[T, Hkv, D]` (both rotated), v `[T, Hkv, D]`.

    Rotates in the model dtype, as transformers does (cos/sin cast to it first)."""
    t, half = qkv.shape[0], head_dim // 2
    q, k, v = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1)
    cs = cos_sin[positions]  # [T, D]
    cos = torch.cat((cs[:, :half], cs[:, :half]), -1).to(qkv.dtype)[:, None, :]
    sin = torch.cat((cs[:, half:], cs[:, half:]), -1).to(qkv.dtype)[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    q = rotate(q.view(t, q_heads, head_dim))
    k = rotate(k.view(t, kv_heads, head_dim))
    v = v.reshape(t, kv_heads, head_dim)
    write_kv_cache_torch(k, v, k_cache, v_cache, slot_mapping)
    return q, k, v


def rotary_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     q_heads: int, kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere."""
    return rotary_and_cache_torch(qkv, positions, cos_sin, q_heads, kv_heads, head_dim,
                                  k_cache, v_cache, slot_mapping)
