"""Rotary embedding of q and k fused with the write of k and v into the paged KV cache.

`qkv` is the packed output of the fused QKV projection, `[T, (Hq + 2 * Hkv) * D]`. Rotary
uses the rotate-half layout (Llama / transformers) with a precomputed `cos_sin` table
`[max_positions, D]` float32: cos of the D/2 frequencies in the first half of each row, sin
in the second. Tokens whose slot is -1 (padding of a CUDA-graph bucket) are not written.

An FP8 cache (`k_scale` / `v_scale` given, caches float8_e4m3fn) stores each token's K and V
quantized per KV head with their scales (format: `kv_quant.py`): k after RoPE *and* the
format's orthogonal rotation `R = kv_rotation(D)`, rounded to the model dtype first, and v.
The returned q (and k) are then rotated by R too, so attention over the dequantized cache
computes the same scores as without R.

The Triton kernel rotates in float32 (cos/sin straight from the float32 table; R as a fast
Walsh-Hadamard transform: butterflies of adds and subtracts in registers) and rounds once to
the model dtype; the reference, like transformers, casts cos/sin to the model dtype and rounds
each product and the sum. In fp32 the two agree to rounding; in bf16 / fp16 the kernel is the
closer to the exact rotation, and within about one ulp of the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton
from trtdist.kernels.fp8_quant import FP8_MAX, MIN_SCALE
from trtdist.kernels.fp8_quant import quantize_by_division as _quantize_e4m3
from trtdist.kernels.kv_quant import (
    KV_FP8_DTYPE,
    KV_SCALE_DTYPE,
    kv_rotation_block,
    quantize_kv,
    rotate_kv,
)

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# NOTE: jitted code may only read globals that are tl.constexpr.
_FP8_MAX_C = tl.constexpr(FP8_MAX) if triton is not None else FP8_MAX
_MIN_SCALE_C = tl.constexpr(MIN_SCALE) if triton is not None else MIN_SCALE


@dataclass(frozen=True, slots=True)
class RotaryCacheWrite:
    """What `rotary_and_cache` does after a q | k | v projection, as one layer's arguments: a
    GEMM that can do it in its epilogue takes this (`fp8_gemv_stream_rotary`) instead of
    leaving it to the rotary kernel. Model-dtype caches only (an FP8 cache's rotation spans a
    head, beyond a GEMM unit's rows)."""

    positions: torch.Tensor  # [T] int32 | int64
    slot_mapping: torch.Tensor  # [T] int32 | int64, -1: not written
    cos_sin: torch.Tensor  # [max_positions, D] float32
    q_heads: int
    kv_heads: int
    head_dim: int
    k_cache: torch.Tensor  # [blocks, block_size, Hkv, D] model dtype
    v_cache: torch.Tensor

    def check(self, n: int, dtype: torch.dtype, device: torch.device) -> None:
        """Raise ValueError unless this fits a one-token q | k | v row of `n` values of
        `dtype` on `device`: shapes, dtypes and devices only (no device reads)."""
        d = self.head_dim
        if d <= 0 or d % 16 or n != (self.q_heads + 2 * self.kv_heads) * d:
            raise ValueError(f"RotaryCacheWrite: want head_dim a positive multiple of 16 and "
                             f"(q_heads + 2 kv_heads) * head_dim = {n}; got {self.q_heads}, "
                             f"{self.kv_heads} heads of {d}")
        for name, idx in (("positions", self.positions), ("slot_mapping", self.slot_mapping)):
            if idx.numel() != 1 or idx.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"RotaryCacheWrite: {name} must be one int32 or int64 "
                                 f"value, got {idx.dtype} {tuple(idx.shape)}")
        cs = self.cos_sin
        if (cs.dim() != 2 or cs.shape[1] != d or cs.stride(1) != 1
                or cs.dtype != torch.float32):
            raise ValueError(f"RotaryCacheWrite: cos_sin must be [max_positions, {d}] float32 "
                             f"with a unit last stride, got {tuple(cs.shape)} {cs.dtype}")
        for name, c in (("k_cache", self.k_cache), ("v_cache", self.v_cache)):
            if (c.dim() != 4 or c.shape[1:] != self.k_cache.shape[1:]
                    or c.shape[2:] != (self.kv_heads, d) or c.dtype != dtype):
                raise ValueError(f"RotaryCacheWrite: {name} must be [blocks, block_size, "
                                 f"{self.kv_heads}, {d}] {dtype}, got {tuple(c.shape)} {c.dtype}")
        devices = {t.device for t in (self.positions, self.slot_mapping, cs, self.k_cache,
                                      self.v_cache)}
        if devices != {device}:
            raise ValueError(f"RotaryCacheWrite: all tensors must be on {device}, got "
                             f"{sorted(map(str, devices))}")


def split_qkv(qkv: torch.Tensor, q_heads: int, kv_heads: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[T, Hq, D]`, k and v `[T, Hkv, D]`: views of the packed `[T, (Hq + 2 Hkv) D]` row."""
    t, qs, kvs = qkv.shape[0], q_heads * head_dim, kv_heads * head_dim
    return (qkv[:, :qs].view(t, q_heads, head_dim),
            qkv[:, qs:qs + kvs].view(t, kv_heads, head_dim),
            qkv[:, qs + kvs:].view(t, kv_heads, head_dim))


def cos_sin_table(inv_freq: torch.Tensor, max_positions: int) -> torch.Tensor:
    """`[max_positions, D]` float32: cos(p * f) | sin(p * f) for each frequency f."""
    pos = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = pos[:, None] * inv_freq[None, :].float()  # [P, D/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)


def write_kv_cache_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                         k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> None:
    """Scatter `[T, Hkv, D]` keys/values into their slots, skipping slot -1. With scales
    (`[blocks, block_size, Hkv]`, an FP8 cache) they are quantized per token-head first."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    if k_scale is not None and v_scale is not None:
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        # NOTE: indexed by (block, offset), not through a flat view: the pool's scales are
        # strided views (head-major within a block, see runtime/kv_cache.py)
        block, offset = slot_mapping // k_cache.shape[1], slot_mapping % k_cache.shape[1]
        k_scale[block, offset] = ks
        v_scale[block, offset] = vs
        # NOTE: index_put_ has no float8 kernel on CPU: copy the bytes, indexed by (block,
        # offset), as an FP8 pool's V is a token-minor view (runtime/kv_cache.py).
        k_cache.view(torch.uint8)[block, offset] = k.view(torch.uint8)
        v_cache.view(torch.uint8)[block, offset] = v.view(torch.uint8)
        return
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def rotary_and_cache_torch(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                           q_heads: int, kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                           k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference: -> q `[T, Hq, D]`, k `[T, Hkv, D]` (both rotated), v `[T, Hkv, D]`.

    Rotates in the model dtype, as transformers does (cos/sin cast to it first). With an FP8
    cache q and k are then multiplied by the format's `kv_rotation` (`rotate_kv`: float32,
    rounded once) before k is quantized."""
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
    if k_scale is not None:
        q, k = rotate_kv(q), rotate_kv(k)
    write_kv_cache_torch(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    return q, k, v


@_jit
def _rotary_and_cache_kernel(qkv_ptr, qkv_stride, pos_ptr, pos_stride, cs_ptr, cs_stride,
                             slot_ptr, slot_stride,
                             kc_ptr, kc_s0, kc_s1, kc_s2, kc_s3,
                             vc_ptr, vc_s0, vc_s1, vc_s2, vc_s3,
                             ks_ptr, ks_s0, ks_s1, ks_s2, vs_ptr, vs_s0, vs_s1, vs_s2,
                             HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                             HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
                             ROT_BLOCK: tl.constexpr, ROT_NORM: tl.constexpr, PDL: tl.constexpr):
    """Grid (T, cdiv(HQ + HKV, BLOCK_H)) over the rotated heads of one token.

    Within a qkv row the q heads and then the k heads lie back to back, so rotated head h is at
    `h * D` for h < HQ + HKV; k head j = h - HQ also owns v head j at `(HQ + HKV + j) * D` and
    writes both into the cache. Each row of the tile is one head's two halves, padded to
    HALF_PAD lanes (head_dim 80 / 96 -> 64 lanes of 40 / 48). KV_FP8: a row is also one
    (token, KV head) of the FP8 cache, so its scale is the row's amax (see `kv_quant.py`), and
    every row (q and k) is multiplied by the format's rotation `R = H2 (x) B / sqrt(2)`:
    `[o1 o2] R = [(o1 + o2) B, (o1 - o2) B] / sqrt(2)`, each `. B` (unnormalized Walsh-Hadamard
    blocks of ROT_BLOCK) a butterfly transform in float32 (`_hadamard`), then one multiply by
    ROT_NORM = 1 / sqrt(2 * ROT_BLOCK)."""
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    half: tl.constexpr = D // 2
    d = tl.arange(0, HALF_PAD)  # [HP]
    dmask = d < half
    mask = (heads < HQ + HKV)[:, None] & dmask[None, :]  # [BH, HP]

    # NOTE: before the wait: the positions, the cache slots (the step's inputs, written
    # before its first kernel) and the cos | sin table (a constant) are not the previous
    # kernel's output; loaded after it, position -> cos | sin were two round trips on this
    # latency-bound kernel's critical path.
    pos = tl.load(pos_ptr + t * pos_stride).to(tl.int64)
    slot = tl.load(slot_ptr + t * slot_stride).to(tl.int64)
    cos = tl.load(cs_ptr + pos * cs_stride + d, mask=dmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * cs_stride + half + d, mask=dmask,
                  other=0.0).to(tl.float32)[None, :]
    pdl_wait(PDL)

    row = qkv_ptr + t * qkv_stride
    lo = row + heads[:, None] * D + d[None, :]  # [BH, HP] first halves
    x1 = tl.load(lo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(lo + half, mask=mask, other=0.0).to(tl.float32)
    # rotate-half: x * cos + cat(-x2, x1) * sin
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if KV_FP8:
        # NOTE: float32 throughout (exact sums and differences but for their order), rounded
        # once to the model dtype below
        r1, r2 = (_hadamard(r1 + r2, BLOCK_H, HALF_PAD, ROT_BLOCK) * ROT_NORM,
                  _hadamard(r1 - r2, BLOCK_H, HALF_PAD, ROT_BLOCK) * ROT_NORM)
    o1 = r1.to(qkv_ptr.dtype.element_ty)
    o2 = r2.to(qkv_ptr.dtype.element_ty)
    pdl_trigger(PDL)
    tl.store(lo, o1, mask=mask)
    tl.store(lo + half, o2, mask=mask)

    # NOTE: a branch uniform over the program: with HQ a multiple of BLOCK_H, the programs of
    # q heads only (4 of Llama-3-8B's 5) skip the cache write, its loads and quantization.
    if tl.program_id(1) * BLOCK_H + BLOCK_H > HQ:
        block = slot // BLOCK_SIZE
        offset = slot % BLOCK_SIZE
        kv_head = heads - HQ  # [BH], negative for q heads (masked off)
        # NOTE: slot -1 marks padding (CUDA-graph buckets): nothing of it reaches the cache.
        kv_mask = mask & ((heads >= HQ) & (slot >= 0))[:, None]
        k_dst = (kc_ptr + block * kc_s0 + offset * kc_s1 + kv_head[:, None] * kc_s2
                 + d[None, :] * kc_s3)
        v_src = row + (HQ + HKV + kv_head[:, None]) * D + d[None, :]
        v_dst = (vc_ptr + block * vc_s0 + offset * vc_s1 + kv_head[:, None] * vc_s2
                 + d[None, :] * vc_s3)
        v1 = tl.load(v_src, mask=kv_mask, other=0.0)
        v2 = tl.load(v_src + half, mask=kv_mask, other=0.0)
        if KV_FP8:
            row_mask = (heads >= HQ) & (heads < HQ + HKV) & (slot >= 0)  # [BH]
            # NOTE: k is quantized as the model dtype holds it (what the reference quantizes).
            k1 = o1.to(tl.float32)
            k2 = o2.to(tl.float32)
            ks = _row_scale(k1, k2)  # [BH]
            fp8 = kc_ptr.dtype.element_ty
            tl.store(k_dst, _quantize_e4m3(k1, ks[:, None]).to(fp8), mask=kv_mask)
            tl.store(k_dst + half * kc_s3, _quantize_e4m3(k2, ks[:, None]).to(fp8), mask=kv_mask)
            tl.store(ks_ptr + block * ks_s0 + offset * ks_s1 + kv_head * ks_s2, ks, mask=row_mask)
            v1 = v1.to(tl.float32)
            v2 = v2.to(tl.float32)
            vs = _row_scale(v1, v2)
            tl.store(v_dst, _quantize_e4m3(v1, vs[:, None]).to(fp8), mask=kv_mask)
            tl.store(v_dst + half * vc_s3, _quantize_e4m3(v2, vs[:, None]).to(fp8), mask=kv_mask)
            tl.store(vs_ptr + block * vs_s0 + offset * vs_s1 + kv_head * vs_s2, vs, mask=row_mask)
        else:
            tl.store(k_dst, o1.to(kc_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(k_dst + half * kc_s3, o2.to(kc_ptr.dtype.element_ty), mask=kv_mask)
            tl.store(v_dst, v1, mask=kv_mask)
            tl.store(v_dst + half * vc_s3, v2, mask=kv_mask)


@_jit
def _hadamard(x, BH: tl.constexpr, HP: tl.constexpr, BLOCK: tl.constexpr):
    """`x @ B` for float32 `x` `[BH, HP]`, B the unnormalized block-diagonal Walsh-Hadamard
    matrix of `kv_rotation` (`kv_quant.py`: `(-1)^popcount(a & b)` within diagonal blocks of
    BLOCK, a power of two dividing HP): log2(BLOCK) butterfly stages, stage S mapping lanes
    (a, b = a + S) of every pair (bit S of a clear) to (a + b, a - b). Padding lanes (beyond
    half, whole blocks of zeros) stay zero. Exact sums and differences in float32, the result
    differs from the float32 product only by the order of its sums."""
    for i in tl.static_range(BLOCK.bit_length() - 1):
        x = _butterfly(x, BH, HP, 1 << i)
    return x


@_jit
def _butterfly(x, BH: tl.constexpr, HP: tl.constexpr, S: tl.constexpr):
    """One stage of `_hadamard`: lane a of `[BH, HP]` becomes x[a] + x[a ^ S] where bit S of a
    is clear, x[a ^ S] - x[a] where it is set.

    NOTE: the partner's value comes by an xor reduction of the pair's bit patterns, xored
    again with the lane's own (exact): where the pair lies in one thread that folds away,
    where it spans lanes it is one warp shuffle per value (float sums, x[a] + x[b] for both,
    would need a second shuffle for x[a] - x[b]). Measured (sm_90 SASS, Llama-3-8B's tile):
    154 instructions for both halves' six stages; two ieee `tl.dot`s by a sign matrix took
    ~1700 and 20 KB of shared memory."""
    y = tl.reshape(x, [BH, HP // (2 * S), 2, S])  # axis 2: bit S of the lane
    sign = 1.0 - 2.0 * tl.arange(0, 2).to(tl.float32)[None, None, :, None]  # +1 | -1
    bits = y.to(tl.int32, bitcast=True)
    partner = (tl.xor_sum(bits, 2, keep_dims=True) ^ bits).to(tl.float32, bitcast=True)
    return tl.reshape(partner + sign * y, [BH, HP])


@_jit
def _row_scale(x1, x2):
    """The dequantizing scale of each row of two `[BH, HP]` halves (masked lanes hold 0):
    max(amax / 448, 1e-12), the IEEE division of the reference."""
    amax = tl.maximum(tl.max(tl.abs(x1), 1), tl.max(tl.abs(x2), 1))
    return tl.maximum(tl.math.div_rn(amax, _FP8_MAX_C), _MIN_SCALE_C)


def rotary_and_cache_triton(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                            q_heads: int, kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                            k_scale: torch.Tensor | None = None,
                            v_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> q `[T, Hq, D]`, k `[T, Hkv, D]` (both rotated), v `[T, Hkv, D]`: views of `qkv`.

    IN PLACE: q and k are rotated inside `qkv` (its row stride may be anything, its last
    stride must be 1); rotated k and v go to `k_cache` / `v_cache` `[blocks, block_size, Hkv,
    D]` at `slot_mapping[t]` (int64 or int32, -1 = skip), through the caches' strides (so
    they may be views of one `[layers, 2, blocks, bs, Hkv, D]` tensor). `positions` (int64 or
    int32) must index rows of `cos_sin`: not checked, as that would sync with the host. No
    allocation, no host syncs: CUDA-graph capturable. An FP8 cache (float8_e4m3fn) takes its
    scales `k_scale` / `v_scale` `[blocks, block_size, Hkv]` float32 (any strides); then q
    and k are also multiplied by the format's rotation (`kv_quant.kv_rotation`), in float32
    after RoPE, before the one rounding to the model dtype."""
    if triton is None:
        raise RuntimeError("rotary_and_cache_triton needs triton, which is not installed")
    _check(qkv, positions, cos_sin, q_heads, kv_heads, head_dim, k_cache, v_cache, slot_mapping,
           k_scale, v_scale)
    t = qkv.shape[0]
    q, k, v = split_qkv(qkv, q_heads, kv_heads, head_dim)
    if t == 0:
        return q, k, v
    fp8 = k_scale is not None
    half_pad = triton.next_power_of_2(head_dim // 2)
    heads = q_heads + kv_heads
    block_h, warps = rotary_config(heads, half_pad)
    rot_block = kv_rotation_block(head_dim)
    _rotary_and_cache_kernel[(t, triton.cdiv(heads, block_h))](
        qkv, qkv.stride(0), positions, positions.stride(0), cos_sin, cos_sin.stride(0),
        slot_mapping, slot_mapping.stride(0),
        k_cache, *k_cache.stride(), v_cache, *v_cache.stride(),
        *_scale_args(k_scale, k_cache), *_scale_args(v_scale, v_cache),
        HQ=q_heads, HKV=kv_heads, D=head_dim, HALF_PAD=half_pad, BLOCK_H=block_h,
        BLOCK_SIZE=k_cache.shape[1], KV_FP8=fp8, ROT_BLOCK=rot_block,
        ROT_NORM=(2 * rot_block) ** -0.5,
        num_warps=warps, **pdl_launch(qkv.device, row=t == 1))
    return q, k, v


def rotary_config(heads: int, half_pad: int) -> tuple[int, int]:
    """(BLOCK_H, num_warps) of the rotary + cache-write launch: ~512-lane tiles (8 heads of
    128: Llama-3-8B's 32 + 8 heads in 5 full programs), 2 warps (bf16: 8 lanes a thread,
    16-byte access)."""
    return min(triton.next_power_of_2(heads), max(1, 512 // half_pad)), 2


def _scale_args(scale: torch.Tensor | None, cache: torch.Tensor
                ) -> tuple[torch.Tensor, int, int, int]:
    """A scale tensor and its three strides; without one (a model-dtype cache) the cache
    stands in, with zero strides: the kernel never touches it (KV_FP8 is off)."""
    if scale is None:
        return cache, 0, 0, 0
    return scale, *scale.stride()


def _check(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, q_heads: int,
           kv_heads: int, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
           slot_mapping: torch.Tensor, k_scale: torch.Tensor | None,
           v_scale: torch.Tensor | None) -> None:
    """Shapes, dtypes and strides only: nothing here reads device memory."""
    fn = "rotary_and_cache_triton"
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"{fn}: head_dim must be even and positive, got {head_dim}")
    if q_heads <= 0 or kv_heads <= 0 or q_heads % kv_heads:
        raise ValueError(f"{fn}: q_heads ({q_heads}) must be a positive multiple of kv_heads "
                         f"({kv_heads})")
    width = (q_heads + 2 * kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"{fn}: qkv must be [T, (Hq + 2 * Hkv) * D] = [T, {width}] with a "
                         f"unit last stride, got {tuple(qkv.shape)} strides {tuple(qkv.stride())}")
    if qkv.dtype not in _DTYPES:
        raise ValueError(f"{fn}: qkv dtype must be float16, bfloat16 or float32, got {qkv.dtype}")
    t = qkv.shape[0]
    for name, idx in (("positions", positions), ("slot_mapping", slot_mapping)):
        if idx.shape != (t,) or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{fn}: {name} must be int32 or int64 of shape [{t}], got "
                             f"{idx.dtype} {tuple(idx.shape)}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.stride(1) != 1:
        raise ValueError(f"{fn}: cos_sin must be [max_positions, {head_dim}] with a unit last "
                         f"stride, got {tuple(cos_sin.shape)}")
    fp8 = k_scale is not None or v_scale is not None
    cache_dtype = KV_FP8_DTYPE if fp8 else qkv.dtype
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if (cache.dim() != 4 or cache.shape[2:] != (kv_heads, head_dim)
                or cache.shape[:2] != k_cache.shape[:2] or cache.dtype != cache_dtype):
            raise ValueError(f"{fn}: {name} must be [blocks, block_size, {kv_heads}, "
                             f"{head_dim}] {cache_dtype} (as k_cache), got {tuple(cache.shape)} "
                             f"{cache.dtype}")
    scales = [x for x in (k_scale, v_scale) if x is not None]
    if fp8:
        want = (*k_cache.shape[:3],)
        if len(scales) != 2 or any(x.shape != want or x.dtype != KV_SCALE_DTYPE
                                   for x in scales):
            got = [None if x is None else (tuple(x.shape), x.dtype) for x in (k_scale, v_scale)]
            raise ValueError(f"{fn}: an FP8 cache needs both k_scale and v_scale, "
                             f"{list(want)} float32; got {got}")
    devices = {x.device for x in (qkv, positions, cos_sin, k_cache, v_cache, slot_mapping,
                                  *scales)}
    if len(devices) != 1:
        raise ValueError(f"{fn}: all tensors must be on one device, got "
                         f"{sorted(map(str, devices))}")


def rotary_and_cache(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                     q_heads: int, kv_heads: int, head_dim: int, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, *,
                     k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere.

    Use the returned tensors: on CUDA q and k are rotated in place inside `qkv` and the three
    are views of it (see `rotary_and_cache_triton`); the reference leaves `qkv` alone."""
    if qkv.is_cuda and triton is not None:
        return rotary_and_cache_triton(qkv, positions, cos_sin, q_heads, kv_heads, head_dim,
                                       k_cache, v_cache, slot_mapping, k_scale=k_scale,
                                       v_scale=v_scale)
    return rotary_and_cache_torch(qkv, positions, cos_sin, q_heads, kv_heads, head_dim,
                                  k_cache, v_cache, slot_mapping, k_scale=k_scale,
                                  v_scale=v_scale)
