"""The FP8 (E4M3) KV cache (`--kv-cache-dtype fp8`): format, write, read, pool, end to end.

- Format: the per token-head quantization, and the orthogonal key rotation (`kv_rotation`)
  the cache applies to q and k (attention scores unchanged to rounding).
- Write: the Triton rotary + KV-write kernel against its torch reference (CPU: Triton's
  interpreter in fp32 / fp16; GPU: bf16 too). V, whose input both share, must be bit-equal;
  K is bit-equal to the reference quantization of the kernel's own rotated k; q and k are
  RoPE'd and rotated as the reference does, to rounding.
- Read: the Triton backend and the torch backend against a float64 reference over the
  dequantized cache. Unowned cache slots hold NaN (values and scales), and so do the packed
  k / v a prefill receives: FP8 attention reads the new tokens back from the cache.
- End to end (mpirun): an engine with an FP8 KV cache equals transformers whose attention
  sees q and K rotated and K/V quantized and dequantized the same way; SmolLM2-135M's
  perplexity moves < 1%.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MPI_SCRIPTS, load_hf, mpirun, need_devices, relative_error, trtdist_cli
from test_triton_attention import Case, _fields
from trtdist.kernels.attention import AttentionInputs, TorchAttentionBackend
from trtdist.kernels.kv_quant import (
    KV_FP8_DTYPE,
    dequantize_kv,
    kv_rotation,
    kv_rotation_block,
    quantize_kv,
    rotate_kv,
)
from trtdist.kernels.rotary import cos_sin_table, rotary_and_cache_torch, rotary_and_cache_triton
from trtdist.kernels.triton_attention import TritonAttentionBackend

from trtdist.runtime.kv_cache import KVCache, resolve_kv_cache_dtype
from trtdist.runtime.rank import RankOptions

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
NAN = math.nan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal, NaN where NaN (untouched slots)."""
    a, b = a.float(), b.float()
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def _same_kv(q: torch.Tensor, s: torch.Tensor, ref_q: torch.Tensor, ref_s: torch.Tensor) -> bool:
    """E4M3 codes and their scales as the reference wrote them, NaN where NaN. On CPU bit for
    bit. NOTE: on CUDA torch divides by a scalar as a multiply by its reciprocal, so its
    amax / 448 differed from the kernel's IEEE division in the last bit or two (H200,
    2026-11-23): there scales must agree within a few ulp, and an FP8 code may then move by
    one step, rarely (the same allowance as the activation quantization's test)."""
    if not q.is_cuda:
        return _same(q, ref_q) and _same(s, ref_s)
    nan_q, nan_s = q.float().isnan(), s.isnan()
    if not (torch.equal(nan_q, ref_q.float().isnan()) and torch.equal(nan_s, ref_s.isnan())):
        return False
    if not torch.allclose(s[~nan_s], ref_s[~nan_s], rtol=1e-6, atol=0):
        return False
    codes = q.view(torch.uint8)[~nan_q].int()
    ref_codes = ref_q.view(torch.uint8)[~nan_q].int()
    if codes.numel() == 0:
        return True
    # a one-step move of a code is one unit in its magnitude bits (same sign)
    diff = (codes - ref_codes).abs()
    return bool(diff.max() <= 1) and float((diff > 0).float().mean()) < 1e-2


# ------------------------------------------------------------------------------------------
# format


def test_quantize_kv_format() -> None:
    g = torch.Generator().manual_seed(0)
    sizes = torch.logspace(-3, 3, 7, dtype=torch.float64)[:, None, None]
    x = torch.randn(7, 3, 64, generator=g, dtype=torch.float64) * sizes
    x[2, 1] = 0.0  # an all-zero row stays finite
    x[4, 0, 5] = NAN  # a NaN row: its scale is NaN, its codes are not (-448, as on the GPU)
    q, s = quantize_kv(x)
    assert q.dtype == KV_FP8_DTYPE and q.shape == x.shape and s.shape == (7, 3)
    assert s.dtype == torch.float32 and s[2, 1] == 1e-12 and (q[2, 1].float() == 0).all()
    assert s[4, 0].isnan() and not q.float().isnan().any() and (q[4, 0].float() == -448).all()
    ok = ~s.isnan()
    # the largest magnitude of each row maps onto 448, the largest E4M3 value
    assert (q.float().abs().amax(-1)[ok & (s > 1e-12)] == 448).all()
    # dequantized: within half an E4M3 ulp (2^-4 relative for normals) plus the subnormal step
    back = dequantize_kv(q, s, torch.float64)
    err = (back - x).abs()[ok]
    bound = 1.001 * (x.abs() * 2.0 ** -4 + s[..., None].double() * 2.0 ** -10)[ok]
    assert bool((err <= bound).all())
    assert dequantize_kv(x, None, torch.float32) is x  # a model-dtype cache passes through


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


@pytest.mark.parametrize("d", [2, 16, 24, 64, 80, 96, 128, 256])
def test_kv_rotation_is_orthogonal_and_keeps_scores(d: int) -> None:
    r = kv_rotation(d).double()
    assert r.shape == (d, d) and kv_rotation(d).dtype == torch.float32
    assert (r @ r.T - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-7
    # powers of two: the normalized Walsh-Hadamard matrix; else H2 (x) block-diagonal B
    n = kv_rotation_block(d)
    assert n == {24: 4, 80: 8, 96: 16}.get(d, d // 2)
    if d & (d - 1) == 0:
        torch.testing.assert_close(r, _sylvester(d) / math.sqrt(d), rtol=0, atol=1e-7)
    block = torch.block_diag(*[_sylvester(n)] * (d // 2 // n))
    want = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), block)
    torch.testing.assert_close(r, want / math.sqrt(2 * n), rtol=0, atol=1e-7)
    # q.k is unchanged (to float32 rounding), an outlier channel spreads over 2 * n channels
    g = torch.Generator().manual_seed(d)
    q, k = torch.randn(5, 3, d, generator=g), torch.randn(7, 3, d, generator=g)
    k[..., 0] = 40.0
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double())
    got = torch.einsum("qhd,khd->hqk", rotate_kv(q).double(), rotate_kv(k).double())
    assert _rel(got, scores) < 1e-6
    spread = rotate_kv(torch.eye(d)[:1])  # channel 0
    assert int((spread != 0).sum()) == 2 * n
    assert rotate_kv(k).dtype == k.dtype and rotate_kv(k.half()).dtype == torch.float16
    with pytest.raises(ValueError, match="head_dim must be even and positive, got 7"):
        kv_rotation(7)


def test_rotation_shrinks_the_score_error_of_outlier_keys() -> None:
    """Why the cache rotates: where q and k share a few large channels (as RoPE'd q and k of
    real models do) a score's quantization error is a few large terms; rotated, every channel
    carries a share of the outliers and the errors average out. (Measured here: 1.3% -> 0.5%.
    NOTE: outliers in k alone are not helped: E4M3's error is relative per element.)"""
    g = torch.Generator().manual_seed(0)
    d = 64
    q = torch.randn(64, d, generator=g, dtype=torch.float64)
    k = torch.randn(256, d, generator=g, dtype=torch.float64)
    q[:, :2] *= 10.0  # two outlier channels, shared
    k[:, :2] *= 30.0
    scores = q @ k.T

    def err(qq: torch.Tensor, kk: torch.Tensor) -> float:
        return _rel(qq @ dequantize_kv(*quantize_kv(kk), torch.float64).T, scores)

    plain = err(q, k)
    rotated = err(rotate_kv(q), rotate_kv(k))
    assert rotated < 0.6 * plain, (plain, rotated)


def test_pool_holds_scales_and_sizes_by_them() -> None:
    layers, bs, hkv, d = 3, 16, 2, 128
    fp8 = KVCache(layers, 5, bs, hkv, d, KV_FP8_DTYPE, torch.device("cpu"))
    bf16 = KVCache(layers, 5, bs, hkv, d, torch.bfloat16, torch.device("cpu"))
    assert fp8.scales is not None and fp8.scales.shape == (layers, 2, 6, hkv, bs)
    assert bf16.scales is None and bf16.layers[0].k_scale is None
    for i, layer in enumerate(fp8.layers):  # views of the pool, not copies
        assert layer.k.data_ptr() == fp8.data[i, 0].data_ptr()
        assert layer.v_scale is not None
        assert layer.v_scale.data_ptr() == fp8.scales[i, 1].data_ptr()
        assert layer.k_scale is not None and layer.k_scale.shape == (6, bs, hkv)
        assert layer.k_scale.stride() == (hkv * bs, 1, bs)  # head-major pages
    for pool in (fp8, bf16):
        assert pool.block_bytes == KVCache.bytes_per_block(layers, bs, hkv, d, pool.dtype)
        assert pool.nbytes == 6 * pool.block_bytes
    # 128 bytes of E4M3 + a 4-byte scale per token-head, against 256 bytes of bf16
    ratio = bf16.block_bytes / fp8.block_bytes
    print(f"\nKV capacity, fp8 / bf16 at head_dim {d}: {ratio:.4f}x")
    assert ratio == 256 / 132


def test_kv_cache_dtype_is_validated() -> None:
    cpu = torch.device("cpu")
    assert resolve_kv_cache_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.float32, cpu) == KV_FP8_DTYPE
    with pytest.raises(ValueError, match="auto, fp8; got 'int8'"):
        resolve_kv_cache_dtype("int8", torch.float32, cpu)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8"):
        RankOptions(kv_cache_dtype="fp16")
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(ValueError, match="compute capability >= 8.9"):
            resolve_kv_cache_dtype("fp8", torch.bfloat16, torch.device("cuda"))


# ------------------------------------------------------------------------------------------
# write: rotary + quantized KV write


def _write_case(t: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, seed: int
                ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(t, (hq + 2 * hkv) * d, generator=g) * 3).to(DEV, dtype)
    qkv[1, (hq + hkv) * d:(hq + hkv + 1) * d] = 0  # a zero v row: scale 1e-12, values 0
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos_sin = cos_sin_table(inv_freq.to(DEV), 4 * t + 64)
    positions = torch.randint(0, 4 * t + 64, (t,), generator=g).to(DEV)
    blocks = -(-t // bs) + 2
    slots = torch.randperm(blocks * bs, generator=g)[:t]  # scattered, blocks partly filled
    slots[2::5] = -1  # padding: never written
    # two layers' fused pool, NaN-poisoned, scales head-major as in the runtime's pool; layer
    # 1's strided views are written
    values = torch.full((2, 2, blocks, bs, hkv, d), NAN).to(DEV, KV_FP8_DTYPE)
    scales = torch.full((2, 2, blocks, hkv, bs), NAN, device=DEV).transpose(-1, -2)
    return qkv, positions, cos_sin, slots.to(DEV), values, scales


def _check_write(t: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype,
                 seed: int) -> None:
    qkv, positions, cos_sin, slots, values, scales = _write_case(t, hq, hkv, d, bs, dtype, seed)
    ref_values, ref_scales = values.clone(), scales.clone()
    q_ref, k_ref, _ = rotary_and_cache_torch(
        qkv.clone(), positions, cos_sin, hq, hkv, d, ref_values[1, 0], ref_values[1, 1], slots,
        k_scale=ref_scales[1, 0], v_scale=ref_scales[1, 1])
    # RoPE alone (a model-dtype cache: no kv rotation), in float64
    plain = torch.full((2, *values.shape[2:]), NAN, dtype=torch.float64, device=DEV)
    q_rope, k_rope, _ = rotary_and_cache_torch(
        qkv.double(), positions, cos_sin.double(), hq, hkv, d, plain[0], plain[1], slots)
    q, k, v = rotary_and_cache_triton(qkv, positions, cos_sin, hq, hkv, d, values[1, 0],
                                      values[1, 1], slots, k_scale=scales[1, 0],
                                      v_scale=scales[1, 1])
    # q and k: RoPE'd and rotated by kv_rotation, as the reference (to rounding) ...
    assert _rel(q, q_ref) < TOL[dtype] and _rel(k, k_ref) < TOL[dtype]
    r = kv_rotation(d).double()
    assert _rel(q, q_rope @ r.to(DEV)) < TOL[dtype]
    assert _rel(k, k_rope @ r.to(DEV)) < TOL[dtype]
    # ... so the scores are RoPE's (GQA: q head h reads KV head h // (hq // hkv))
    kk = k.double().repeat_interleave(hq // hkv, 1)
    kk_rope = k_rope.repeat_interleave(hq // hkv, 1)
    assert _rel(torch.einsum("thd,shd->hts", q.double(), kk),
                torch.einsum("thd,shd->hts", q_rope, kk_rope)) < 2 * TOL[dtype]
    # V (not rotated: the same input) as the reference wrote it; untouched slots NaN
    assert _same_kv(values[1, 1], scales[1, 1], ref_values[1, 1], ref_scales[1, 1])
    assert values[0].float().isnan().all() and scales[0].isnan().all()
    valid = slots >= 0
    flat_s = scales[1].flatten(1, 2)  # [2, blocks * bs, Hkv]
    assert flat_s[:, slots[valid]].isfinite().all()
    untouched = torch.ones(flat_s.shape[1], dtype=torch.bool, device=DEV)
    untouched[slots[valid]] = False
    assert flat_s[:, untouched].isnan().all()
    # K: exactly the reference quantization of the kernel's own rotated k (model dtype) ...
    kq, ks = quantize_kv(k[valid])
    flat_v = values[1].flatten(1, 2)  # [2, blocks * bs, Hkv, D]
    assert _same_kv(flat_v[0, slots[valid]], flat_s[0, slots[valid]], kq, ks)
    # ... and close to the reference's: their rotations differ by about an ulp of the model
    # dtype, which moves some values across an E4M3 rounding boundary (measured: bf16 1.5%,
    # fp16 0.55%, fp32 1e-6 in the interpreter and 1.5e-4 on an H200 with the former tl.dot
    # rotation, whose float32 sums ran in another order: a few of the 8k codes one E4M3 step
    # apart; the butterflies sum in yet another order, in the interpreter as on a GPU)
    ref_k = dequantize_kv(ref_values[1, 0].flatten(0, 1)[slots[valid]],
                          ref_scales[1, 0].flatten(0, 1)[slots[valid]], torch.float64)
    bound = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]
    assert _rel(dequantize_kv(kq, ks, torch.float64), ref_k) < bound
    assert _rel(ref_k, k_ref[valid]) < 5e-2  # and E4M3 is near the rotated k itself
    assert torch.equal(v, qkv[:, (hq + hkv) * d:].view(t, hkv, d))


@pytest.mark.parametrize("dtype,hq,hkv,d,bs", [
    (torch.float32, 4, 2, 16, 4),
    (torch.float16, 6, 3, 24, 8),  # head_dim 24: halves padded 12 -> 16 lanes
    (torch.float32, 2, 2, 64, 16),
    (torch.float16, 4, 2, 80, 4),  # halves of 40 -> 64 lanes, rotation blocks of 8
    (torch.float32, 2, 1, 16, 4),  # halves of 8: 8 lanes, one rotation block of 8
    (torch.float32, 4, 2, 96, 8),  # halves of 48 -> 64 lanes, rotation blocks of 16
    # programs of 8 heads: 0-7 q only (no cache write), 8-15 q and k
    (torch.float32, 12, 4, 128, 4),
])
def test_write_kernel_matches_reference(dtype: torch.dtype, hq: int, hkv: int, d: int,
                                        bs: int) -> None:
    _check_write(11, hq, hkv, d, bs, dtype, seed=hq + d)


def test_write_bad_inputs() -> None:
    qkv, positions, cos_sin, slots, values, scales = _write_case(5, 4, 2, 16, 4,
                                                                 torch.float32, 3)
    kc, vc, ks, vs = values[1, 0], values[1, 1], scales[1, 0], scales[1, 1]
    with pytest.raises(ValueError, match="k_cache must be .* torch.float32"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 4, 2, 16, kc, vc, slots)
    with pytest.raises(ValueError, match="needs both k_scale and v_scale"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 4, 2, 16, kc, vc, slots, k_scale=ks)
    with pytest.raises(ValueError, match="float32"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 4, 2, 16, kc, vc, slots, k_scale=ks,
                                v_scale=vs.double())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (8, 8, 64, 64), (32, 4, 96, 32)])
def test_gpu_write_kernel_matches_reference(dtype: torch.dtype, hq: int, hkv: int, d: int,
                                            bs: int) -> None:
    _check_write(300, hq, hkv, d, bs, dtype, seed=d + bs)


# ------------------------------------------------------------------------------------------
# read: attention over the FP8 cache


class FP8Case(Case):
    """`Case` with its cache quantized to E4M3 + scales, one token's K and V all zero, and
    the packed k / v poisoned with NaN. Slots no sequence owns: K and the scales stay NaN
    (never read); V holds finite garbage (+-448 codes): attention reads V by whole pages,
    relying on the writer never storing a NaN code (`kv_quant.quantize_kv`).

    `v_token_minor` (default, the pool's layout): `tensors()` hands V as a token-minor view
    `[blocks, Hkv, D, bs]` -> `[blocks, bs, Hkv, D]` (runtime/kv_cache.py); else D-contiguous."""

    def __init__(self, *args: object, decades: tuple[float, float] | None = None,
                 v_token_minor: bool = True, **kwargs: object) -> None:
        """`decades` (lo, hi): each cached token-head's K and V are multiplied by 10 ** -u,
        u uniform in [lo, hi), so the scales of one tile span hi - lo decades."""
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.v_token_minor = v_token_minor
        if decades is not None:
            g = torch.Generator().manual_seed(7)
            shape = (*self.k_cache.shape[:3], 1)
            lo, hi = decades
            for x in (self.k_cache, self.v_cache):
                x *= 10.0 ** -(lo + (hi - lo) * torch.rand(shape, generator=g))
        owned = ~self.k_cache.isnan().any(-1)  # [blocks, bs, Hkv]
        if owned.any():  # the first owned token: zero K and V
            b, s_, _ = (int(i) for i in owned.nonzero()[0])
            self.k_cache[b, s_] = 0.0
            self.v_cache[b, s_] = 0.0
        self.k8, self.k_scale = quantize_kv(self.k_cache)
        self.v8, self.v_scale = quantize_kv(self.v_cache)
        unowned = self.v_cache.isnan().any(-1)  # [blocks, bs, Hkv]
        garbage = torch.full(self.v8.shape, 448.0).to(KV_FP8_DTYPE)
        self.v8 = torch.where(unowned[..., None], garbage, self.v8)
        # head-major pages, as the runtime's pool stores them: [blocks, bs, Hkv] views
        self.k_scale, self.v_scale = (x.transpose(1, 2).contiguous().transpose(1, 2)
                                      for x in (self.k_scale, self.v_scale))
        self.k = torch.full_like(self.k, NAN)
        self.v = torch.full_like(self.v, NAN)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """q, k, v (NaN), K/V values (E4M3) and scales, on the device."""
        def scales(x: torch.Tensor) -> torch.Tensor:  # keeps the head-major strides
            return x.transpose(1, 2).to(self.device).transpose(1, 2)

        v8 = self.v8.to(self.device)
        if self.v_token_minor:
            v8 = v8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        return (self.dev(self.q), self.dev(self.k), self.dev(self.v), self.k8.to(self.device),
                v8, scales(self.k_scale), scales(self.v_scale))

    def reference(self, window: int | None) -> torch.Tensor:
        """float64 softmax attention of the dtype-rounded queries over the dequantized cache
        (not rounded to the model dtype: the kernels must match these values)."""
        q = self.dev(self.q).double()
        kc = dequantize_kv(self.k8, self.k_scale, torch.float64).to(q.device)
        vc = dequantize_kv(self.v8, self.v_scale, torch.float64).to(q.device)
        out, start = torch.zeros_like(q), 0
        for i, (c, n) in enumerate(zip(self.ctx_lens, self.q_lens)):
            if c:
                blocks = self.tables[i, :-(-c // self.bs)].long()
                rep = q.shape[1] // kc.shape[2]
                k = kc[blocks].flatten(0, 1)[:c].repeat_interleave(rep, 1)  # [c, Hq, D]
                v = vc[blocks].flatten(0, 1)[:c].repeat_interleave(rep, 1)
                s = torch.einsum("qhd,khd->hqk", q[start:start + n], k) / q.shape[-1] ** 0.5
                qp = torch.arange(c - n, c, device=q.device)[:, None]
                kp = torch.arange(c, device=q.device)[None, :]
                allowed = kp <= qp
                if window:
                    allowed &= qp - kp < window
                s = s.masked_fill(~allowed, float("-inf"))
                out[start:start + n] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
            start += n
        return out


def _run_fp8(backend: object, case: FP8Case, meta: object, window: int | None,
             tensors: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    q, k, v, kc, vc, ks, vs = tensors or case.tensors()
    ws = getattr(meta, "workspace", None)
    if ws is not None and ws.out is not None:
        ws.out.fill_(NAN)
        ws.lse.fill_(NAN)
    if CUDA:  # the caching allocator hands this NaN block to the output's torch.empty
        torch.full(q.shape, NAN, dtype=q.dtype, device=q.device)
    return backend.forward(q, k, v, kc, vc, meta, q.shape[-1] ** -0.5,  # type: ignore[attr-defined]
                           window, k_scale=ks, v_scale=vs)


def _torch_inputs(case: FP8Case) -> AttentionInputs:
    base = case.inputs()
    return AttentionInputs(**{**_fields(base), "query_lens_host": tuple(case.q_lens),
                              "seq_lens_host": tuple(case.ctx_lens)})


def check_fp8(case: FP8Case, window: int | None, backend: TritonAttentionBackend | None = None,
              torch_too: bool = True) -> None:
    want = case.reference(window)
    backends: list[tuple[object, object]] = []
    tb = backend or TritonAttentionBackend()
    backends.append((tb, tb.prepare(case.inputs())))
    if torch_too:
        ref = TorchAttentionBackend()
        backends.append((ref, ref.prepare(_torch_inputs(case))))
    rows = torch.cat([torch.full((n,), c > 0) for c, n in zip(case.ctx_lens, case.q_lens)])
    for b, meta in backends:
        name = type(b).__name__
        if isinstance(b, TorchAttentionBackend):
            # NOTE: SDPA turns a NaN key or value into NaN even where masked, and answers a
            # padded row (no keys) with NaN: the reference backend, which never runs padded
            # rows (no CUDA graphs), is poisoned with finite garbage and checked on real rows.
            q, k, v, kc, vc, ks, vs = case.tensors()
            kc, vc = (x.float().nan_to_num(nan=-448.0).to(KV_FP8_DTYPE) for x in (kc, vc))
            got = _run_fp8(b, case, meta, window, (q, k, v, kc, vc, ks.nan_to_num(nan=3.0),
                                                   vs.nan_to_num(nan=3.0)))[rows]
            err = _rel(got, want[rows])
        else:
            got = _run_fp8(b, case, meta, window)
            err = _rel(got, want)
            for i, c in enumerate(case.ctx_lens):  # padded rows are exactly zero
                if c == 0:
                    assert (got[sum(case.q_lens[:i]):sum(case.q_lens[:i + 1])] == 0).all()
        assert not got.isnan().any(), name
        assert err < TOL[case.dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,window,target", [
    (torch.float32, 8, 2, 16, 4, None, 1000),  # split over partitions, GQA (dot path)
    (torch.float32, 4, 4, 16, 16, 7, 1000),  # MHA (dot-free path), window
    (torch.float16, 8, 1, 80, 16, None, 1),  # fp16: fp16 dots; head_dim 80
    (torch.float16, 12, 4, 32, 8, 300, 1000),  # GQA 3, window across partitions
])
def test_decode_fp8(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int,
                    window: int | None, target: int) -> None:
    case = FP8Case([9, 1, 600, 16, 0, 4], [1] * 6, hq, hkv, d, bs, dtype, seed=hq + d)
    check_fp8(case, window, TritonAttentionBackend(target_programs=target))


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,window", [
    (torch.float32, 4, 4, 16, 4, None),
    (torch.float32, 8, 2, 16, 16, 5),
    (torch.float16, 8, 1, 80, 16, None),
    (torch.float16, 6, 2, 32, 8, 100),  # a window wider than a key tile
])
def test_prefill_fp8(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int,
                     window: int | None) -> None:
    # whole prompts, chunks after a cached prefix, a decode row inside a mixed batch, a
    # query longer than one BLOCK_M tile after a prefix; partially filled last blocks; a
    # window starting mid-tile well inside a long prefix
    case = FP8Case([7, 19, 1, 33, 140, 200, 300], [7, 5, 1, 12, 100, 1, 50], hq, hkv, d, bs,
                   dtype, seed=hq * d)
    check_fp8(case, window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp8_attention_scales_spanning_decades(dtype: torch.dtype) -> None:
    """fp16 dots take `p * v_scale` relative to the tile's largest V scale: a cache whose
    values are all 1e-3 to 1e-4 (scales ~1e-6: `p * scale` alone falls below fp16's
    normal range, measured 6e-3 relative error), spread over a decade within each tile,
    decode (split and not) and prefill."""
    for target in (1, 1000):
        case = FP8Case([9, 300, 64], [1] * 3, 8, 2, 32, 8, dtype, seed=3, decades=(3, 4))
        check_fp8(case, None, TritonAttentionBackend(target_programs=target))
    case = FP8Case([40, 130], [40, 30], 8, 2, 32, 8, dtype, seed=4, decades=(3, 4))
    check_fp8(case, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_fp8_attention_with_a_head_dim_contiguous_v(dtype: torch.dtype) -> None:
    """V in the K layout (head dim contiguous, not the pool's token-minor one) is still read
    right: decode (split and not) and prefill after a cached prefix."""
    for target in (1, 1000):
        case = FP8Case([9, 300, 64], [1] * 3, 8, 2, 32, 8, dtype, seed=5, v_token_minor=False)
        check_fp8(case, None, TritonAttentionBackend(target_programs=target))
    check_fp8(FP8Case([40, 130], [40, 30], 8, 2, 32, 8, dtype, seed=6, v_token_minor=False),
              None)


def test_fp8_attention_bad_inputs() -> None:
    case = FP8Case([4], [4], 4, 2, 16, 4)
    backend = TritonAttentionBackend()
    meta = backend.prepare(case.inputs())
    q, k, v, kc, vc, ks, vs = case.tensors()
    with pytest.raises(ValueError, match="float8_e4m3fn with k_scale and v_scale"):
        backend.forward(q, k, v, kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="v_scale"):
        backend.forward(q, k, v, kc, vc, meta, 1.0, k_scale=ks)
    with pytest.raises(ValueError, match=r"k_scale \[blocks, block_size, Hkv\]"):
        backend.forward(q, k, v, kc, vc, meta, 1.0, k_scale=ks[..., :1], v_scale=vs)
    nb, bs, hkv, d = vc.shape  # neither head-dim-contiguous nor token-minor
    odd = vc.new_empty(nb, d, bs, hkv).permute(0, 2, 3, 1)
    with pytest.raises(ValueError, match="token-minor"):
        backend.forward(q, k, v, kc, odd, meta, 1.0, k_scale=ks, v_scale=vs)


# ------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 queries, long contexts, graph capture


def _mixed_batch(hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype) -> FP8Case:
    q_lens = [1, 17, 512, 128, 300, 1, 64]
    prefixes = [0, 100, 0, 1000, 37, 2000, 511]
    return FP8Case([p + n for p, n in zip(prefixes, q_lens)], q_lens, hq, hkv, d, bs, dtype,
                   seed=d * bs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (8, 8, 64, 64), (32, 4, 96, 32),
                                         (16, 2, 256, 16)])
@pytest.mark.parametrize("window", [None, 500])
def test_gpu_fp8_decode_and_prefill(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int,
                                    window: int | None) -> None:
    decode = FP8Case([1, 700, 2048, 0, 33, 4096 + 7], [1] * 6, hq, hkv, d, bs, dtype,
                     seed=d + bs)
    check_fp8(decode, window, torch_too=False)
    check_fp8(_mixed_batch(hq, hkv, d, bs, dtype), window, torch_too=False)
    if window is None and hq == 32 and hkv == 8:  # V with a contiguous head dim (not the pool's)
        decode.v_token_minor = False
        check_fp8(decode, window, torch_too=False)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_gpu_fp8_decode_graph_replay(batch: int) -> None:
    """Decode over the FP8 cache captured in a CUDA graph (prepare_for_capture), replayed
    on new lengths and contents: equals the reference and the eager run."""
    max_model_len, bs, hq, hkv, d, dtype = 4096, 16, 32, 8, 128, torch.bfloat16
    width = max_model_len // bs
    g = torch.Generator().manual_seed(batch)

    def lengths() -> list[int]:
        lens = torch.randint(1, max_model_len if batch <= 8 else 1024, (batch,),
                             generator=g).tolist()
        if batch > 1:
            lens[-1] = 0  # a padded row
        return lens

    cases = [FP8Case(lengths(), [1] * batch, hq, hkv, d, bs, dtype, seed=batch + r,
                     width=width) for r in range(3)]
    nb = max(c.k8.shape[0] for c in cases)
    kc = torch.zeros(nb, bs, hkv, d, device="cuda", dtype=KV_FP8_DTYPE)
    vc = torch.zeros_like(kc)
    ks = torch.zeros(nb, bs, hkv, device="cuda")
    vs = torch.zeros_like(ks)
    q = torch.zeros(batch, hq, d, device="cuda", dtype=dtype)
    static = cases[0].inputs()

    def load(case: FP8Case) -> None:
        n = case.k8.shape[0]
        for dst, src in ((kc, case.k8), (vc, case.v8)):
            dst.view(torch.uint8).fill_(0x7F)  # E4M3 NaN
            dst[:n].copy_(src.to("cuda"))
        for dst, src in ((ks, case.k_scale), (vs, case.v_scale)):
            dst.fill_(NAN)
            dst[:n].copy_(src.to("cuda"))
        q.copy_(case.dev(case.q))
        new = case.inputs()
        static.seq_lens.copy_(new.seq_lens)
        static.block_tables.copy_(new.block_tables)

    backend = TritonAttentionBackend(hq, hkv, d)
    meta = backend.prepare_for_capture(
        AttentionInputs(**{**_fields(static), "max_seq_len": max_model_len}))
    nan_kv = torch.full((batch, hkv, d), NAN, device="cuda", dtype=dtype)
    args = (q, nan_kv, nan_kv, kc, vc, meta, d ** -0.5)
    load(cases[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: compiles, allocates the workspace
        backend.forward(*args, k_scale=ks, v_scale=vs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(*args, k_scale=ks, v_scale=vs)
    for case in cases[1:] + cases[:1]:
        load(case)
        out.fill_(NAN)
        graph.replay()
        eager_meta = backend.prepare(AttentionInputs(
            **{**_fields(static), "max_seq_len": max(case.ctx_lens)}))
        eager = backend.forward(q, nan_kv, nan_kv, kc, vc, eager_meta, d ** -0.5, k_scale=ks,
                                v_scale=vs)
        want = case.reference(None)
        assert not out.isnan().any()
        assert _rel(out, want) < TOL[dtype]
        assert _rel(out, eager) < 1e-2
        if batch > 1:
            assert (out[-1] == 0).all()


# ------------------------------------------------------------------------------------------
# end to end


PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128, 1, 77, 31, 200, 8, 19, 23]
NEW_TOKENS = 24


def _fake_quant_reference(path: Path) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """transformers in float32 whose attention sees q and k rotated by `kv_rotation` and every
    K/V row quantized to E4M3 with its own scale and dequantized (what the FP8 cache holds),
    and the plain model's logits."""
    from helpers import hf_reference
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def fp8_kv_attention(module, query, key, value,  # type: ignore[no-untyped-def]
                         *args, **kwargs):
        # the cache's rotation of RoPE'd q and k (scores unchanged but for rounding)
        query, key = rotate_kv(query), rotate_kv(key)
        key = dequantize_kv(*quantize_kv(key), key.dtype)  # [B, Hkv, S, D]: per token-head
        value = dequantize_kv(*quantize_kv(value), value.dtype)
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("trtdist_fp8_kv", fp8_kv_attention)
    AttentionMaskInterface.register("trtdist_fp8_kv", sdpa_mask)  # sliding windows too
    model = load_hf(path)
    plain = hf_reference(model, PROMPT, 0)[0]
    model.config._attn_implementation = "trtdist_fp8_kv"
    logits, tokens = hf_reference(model, PROMPT, NEW_TOKENS)
    return logits, tokens, plain


@pytest.mark.mpi
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_engine_with_fp8_kv_cache_matches_fake_quant_transformers(
        tp: int, pp: int, kind: str, hf_models: dict[str, Path], tmp_path: Path) -> None:
    """GQA + llama3 rope (llama) and a sliding window (mistral): logits of one prefill and of
    two chunks (the second reads the first from the FP8 cache), and greedy decoding."""
    need_devices(tp * pp)
    want, tokens, plain = _fake_quant_reference(hf_models[kind])
    out = tmp_path / "out.npz"
    mpirun(tp * pp, [str(MPI_SCRIPTS / "run_kv_cache_dtype.py"), str(out), str(tp), str(pp),
                     "float32", "fp8", ",".join(map(str, PROMPT)), str(NEW_TOKENS),
                     str(hf_models[kind])])
    res = np.load(out)
    assert str(res["kv_dtype"]) == "torch.float8_e4m3fn"
    ours, chunked = torch.from_numpy(res["logits"]), torch.from_numpy(res["chunked"])
    err, err_plain = relative_error(ours, want), relative_error(ours, plain)
    print(f"\n{kind} tp={tp} pp={pp}: vs fake-quant transformers {err:.2e}, vs unquantized "
          f"{err_plain:.2e}")
    assert err <= 1e-4, f"logits relative error {err:.2e}"
    assert relative_error(chunked, want) <= 1e-4
    # the FP8 cache is really in use: the unquantized model is much further away
    assert err_plain > 30 * max(err, 1e-6)
    assert res["tokens"].tolist() == tokens


def test_prefix_reuse_reads_the_shared_blocks_with_their_scales() -> None:
    """A prompt served twice: the second run reuses the first's full blocks (values and
    scales, by block id) and decodes the same tokens as an engine without prefix caching."""
    from trtdist.llm import DistributedLLM
    from trtdist.sampling_params import SamplingParams

    prompt = [(7 * i) % 250 + 3 for i in range(45)]  # two full blocks of 16 to reuse
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = []
    for caching in (True, False):
        with DistributedLLM("tiny", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=40,
                            block_size=16, max_batch_size=4,
                            enable_prefix_caching=caching) as llm:
            first = llm.generate([prompt], params)[0].outputs[0].token_ids
            assert llm.engine is not None
            hits = llm.engine.allocator.prefix_hits
            second = llm.generate([prompt], params)[0].outputs[0].token_ids
            assert llm.engine.allocator.prefix_hits - hits == (2 if caching else 0)
            assert second == first
            outs.append(first)
    assert outs[0] == outs[1]


@pytest.mark.mpi
def test_cli_flag_reaches_the_pool_and_the_bench_result() -> None:
    """`--kv-cache-dtype fp8` through the CLI: two pipeline stages, each with its own FP8
    pool; the bench JSON names the dtype and the bytes of a block (scales included)."""
    need_devices(2)
    proc = trtdist_cli(2, ["bench", "tiny", "--pp-size", "2", "--kv-cache-dtype", "fp8",
                           "--num-kv-blocks", "40", "--num-requests", "3", "--input-len", "6",
                           "--output-len", "4"])
    got = json.loads(proc.stdout)
    assert got["kv_cache_dtype"] == "fp8_e4m3" and got["kv_blocks"] == 40
    # the tiny model: 4 layers (2 on the leader's stage), 2 KV heads of 16, blocks of 32 (the
    # FP8 cache's default block size)
    assert got["kv_bytes_per_block"] == KVCache.bytes_per_block(2, 32, 2, 16, KV_FP8_DTYPE)
    assert got["kv_bytes_per_block"] == 2 * 2 * 32 * 2 * (16 + 4)
    assert got["output_tokens_per_s"] > 0
    # decode graphs on a GPU (every bucket captured), none on CPU
    assert (got["cuda_graphs"] > 0) == torch.cuda.is_available()
    proc = trtdist_cli(1, ["generate", "tiny", "--prompt", "Hi", "--kv-cache-dtype", "int8"],
                       check=False)
    assert proc.returncode != 0 and "--kv-cache-dtype: invalid choice: 'int8'" in proc.stderr
    proc = trtdist_cli(1, ["generate", "tiny", "--prompt", "Hi", "--block-size", "24"],
                       check=False)
    assert proc.returncode != 0 and "expected a power of two such as 16 or 32, got 24" in (
        proc.stderr)


def test_default_block_size_follows_the_cache_dtype() -> None:
    """16 tokens a block, 32 for an FP8 cache (its V is read in runs of block_size bytes);
    an explicit block size wins."""
    from trtdist.llm import DistributedLLM, default_block_size

    assert default_block_size("auto") == 16 and default_block_size("fp8") == 32
    with DistributedLLM("tiny", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=16,
                        max_model_len=64) as llm:
        assert llm.options.block_size == 32 and llm.engine is not None
        assert llm.engine.allocator.block_size == 32
    with DistributedLLM("tiny", dtype="float32", kv_cache_dtype="fp8", num_kv_blocks=16,
                        max_model_len=64, block_size=8) as llm:
        assert llm.options.block_size == 8


def test_smollm2_fp8_kv_cache_perplexity() -> None:
    """Only the KV cache in FP8 (weights and activations bf16): the perplexity of the fixed
    ~2,800-token text (prefilled in 1,024-token chunks; every attention read goes through the
    cache) moves by well under the issue's 1%, thanks to the cache's key rotation."""
    from test_fp8 import _EVAL_TEXT, _smollm2_dir

    from trtdist.eval import perplexity
    from trtdist.llm import DistributedLLM

    src = _smollm2_dir()
    ppl = {}
    for kv in ("auto", "fp8"):
        with DistributedLLM(src, dtype="bfloat16", max_model_len=4096, num_kv_blocks=300,
                            max_batch_size=4, kv_cache_dtype=kv) as llm:
            assert str(llm._runner.kv.data.dtype) == ("torch.float8_e4m3fn" if kv == "fp8"
                                                     else "torch.bfloat16")
            ppl[kv] = perplexity(llm, _EVAL_TEXT.read_text(), chunk=1024)
    change = ppl["fp8"] / ppl["auto"] - 1
    print(f"\nSmolLM2-135M perplexity: KV cache bfloat16 {ppl['auto']:.4f}, fp8 "
          f"{ppl['fp8']:.4f} ({100 * change:+.3f}%)")
    assert ppl["auto"] < 30, ppl
    assert ppl["fp8"] != ppl["auto"]  # the FP8 cache is in use
    # NOTE: measured on CPU: 13.8206 -> 13.7904 (-0.22%); without the key rotation
    # (kv_quant.kv_rotation) 13.9669 (+1.06%), over the 1% goal. The rotation alone
    # (bf16 cache) moves it by -0.13%: bf16 rounding, the noise floor of this figure. In
    # float32: +0.17% (+1.13% without the rotation).
    assert abs(change) < 0.005, ppl
