"""Paged attention over packed variable-length sequences: the plain-torch reference.

The KV cache of one layer is two tensors `[num_blocks, block_size, kv_heads, head_dim]`.
A sequence's tokens live in the blocks its block table lists, in order. One step carries a
packed batch: sequence i contributes `query_lens[i]` new tokens (a prefill chunk, or 1 for
decode) whose K/V are first written into the cache, then every new token attends to all of
its sequence's cached tokens up to and including itself.

An FP8 cache (float8_e4m3fn values with per token-head scales `[num_blocks, block_size,
kv_heads]`, see `kv_quant.py`) is dequantized to the query's dtype as it is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from trtdist.kernels.kv_quant import dequantize_kv


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Per-step attention inputs, shared by every layer of the step."""

    query_start_loc: torch.Tensor  # [S+1] int32, offsets of each sequence in the packed batch
    context_lens: torch.Tensor  # [S] int32, cached tokens after this step (incl. new ones)
    block_tables: torch.Tensor  # [S, max_blocks] int32
    slot_mapping: torch.Tensor  # [T] int64, cache slot of every new token
    query_lens_host: tuple[int, ...]
    context_lens_host: tuple[int, ...]
    block_size: int
    is_decode: bool  # every sequence has exactly one new token

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values `[T, kv_heads, head_dim]` into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor, length: int,
            dtype: torch.dtype) -> torch.Tensor:
    # [nb, bs, H, D] -> [length, H, D], dequantized (FP8) to `dtype`
    values = cache[blocks].flatten(0, 1)[:length]
    return dequantize_kv(values, None if scale is None else scale[blocks].flatten(0, 1)[:length],
                         dtype)


def paged_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta: AttentionMetadata, scale: float,
                          sliding_window: int | None = None, *,
                          k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q: [T, Hq, D] -> [T, Hq, D]. Reads K/V (already written) from the paged cache."""
    q_heads, kv_heads = q.shape[1], k_cache.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    bs = meta.block_size
    start = 0
    for i, (n, ctx) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        nb = -(-ctx // bs)
        blocks = meta.block_tables[i, :nb].long()
        k = _gather(k_cache, k_scale, blocks, ctx, q.dtype)  # [ctx, Hkv, D]
        v = _gather(v_cache, v_scale, blocks, ctx, q.dtype)
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        q_pos = torch.arange(ctx - n, ctx, device=q.device)[:, None]  # [n, 1]
        k_pos = torch.arange(ctx, device=q.device)[None, :]  # [1, ctx]
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= q_pos - k_pos < sliding_window
        qi = q[start:start + n].transpose(0, 1)  # [Hq, n, D]
        o = F.scaled_dot_product_attention(qi, k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=mask, scale=scale)
        out[start:start + n] = o.transpose(0, 1)
        start += n
    return out


def paged_decode_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       meta: AttentionMetadata, scale: float,
                       sliding_window: int | None = None, *,
                       k_scale: torch.Tensor | None = None,
                       v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Decode only (one query token per sequence), batched: one gather and one SDPA for the
    whole batch instead of a loop over sequences. q: [S, Hq, D] -> [S, Hq, D]."""
    s, q_heads, d = q.shape
    kv_heads = k_cache.shape[2]
    tables = meta.block_tables.long()  # [S, max_blocks]
    length = tables.shape[1] * meta.block_size

    def gather(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        values = cache[tables].reshape(s, length, kv_heads, d)  # a copy (gather) either way
        if scales is not None:
            values = dequantize_kv(values, scales[tables].reshape(s, length, kv_heads), q.dtype)
        return values.transpose(1, 2)  # [S, Hkv, L, D]

    k, v = gather(k_cache, k_scale), gather(v_cache, v_scale)
    k_pos = torch.arange(length, device=q.device)[None, :]
    ctx = meta.context_lens.long()[:, None]  # [S, 1]; the query sits at position ctx - 1
    mask = k_pos < ctx
    if sliding_window is not None:
        mask &= (ctx - 1) - k_pos < sliding_window
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=q_heads != kv_heads)
    return out[:, :, 0, :]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None, *,
                    k_scale: torch.Tensor | None = None,
                    v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch point: faster kernels plug in here with the same signature."""
    fn = paged_decode_torch if meta.is_decode else paged_attention_torch
    return fn(q, k_cache, v_cache, meta, scale, sliding_window, k_scale=k_scale,
              v_scale=v_scale)
