"""Fused Triton kernels (RMSNorm, residual-add RMSNorm, SiLU x up, rotary + paged KV write)
against float64 torch references.

Without CUDA the Triton functions are called directly on CPU tensors and run in Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1): fp32 and fp16 on small shapes. The
`gpu` tests run the real sizes (Llama-3-8B shapes) in bf16 / fp16 / fp32. Outputs are poisoned
with NaN before each run, so a lane the kernel skips cannot pass by leftover luck.
"""

from __future__ import annotations

import pytest
import torch
from trtdist.kernels import activation, norm
from trtdist.kernels.activation import silu_and_mul, silu_and_mul_torch, silu_and_mul_triton
from trtdist.kernels.norm import (
    add_rms_norm,
    add_rms_norm_torch,
    add_rms_norm_triton,
    rms_norm,
    rms_norm_torch,
    rms_norm_triton,
)
from trtdist.kernels.rotary import (
    cos_sin_table,
    rotary_and_cache,
    rotary_and_cache_torch,
    rotary_and_cache_triton,
    write_kv_cache_torch,
)

CPU_DTYPES = [torch.float32, torch.float16]
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# ||out - ref|| / ||ref|| against float64: a few ulps of each dtype
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
gpu = pytest.mark.gpu


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return float((out.double() - ref).norm() / ref.norm())


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (normal numbers), as float32."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    exp = torch.frexp(x.float().abs().clamp_min(torch.finfo(dtype).tiny)).exponent
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exp - bits)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, g: torch.Generator, dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device, dtype)


# --------------------------------------------------------------------------------------------
# RMSNorm


def _check_rms_norm(rows: int, hidden: int, dtype: torch.dtype, device: str, seed: int) -> None:
    g = _gen(seed)
    x = _randn(rows, hidden, g=g, dtype=dtype, device=device)
    w = (1 + 0.1 * _randn(hidden, g=g, dtype=torch.float64, device=device)).to(dtype)
    out = torch.full_like(x, float("nan"))
    got = rms_norm_triton(x, w, 1e-5, out=out)
    assert got is out
    want = rms_norm_torch(x.double(), w.double(), 1e-5)
    assert _rel(got, want) < TOL[dtype]
    # a fresh output tensor, and the same numbers
    assert torch.equal(rms_norm_triton(x, w, 1e-5), got)


def _check_add_rms_norm(rows: int, hidden: int, dtype: torch.dtype, device: str,
                        seed: int) -> None:
    g = _gen(seed)
    x = _randn(rows, hidden, g=g, dtype=dtype, device=device)
    residual = _randn(rows, hidden, g=g, dtype=dtype, device=device)
    w = (1 + 0.1 * _randn(hidden, g=g, dtype=torch.float64, device=device)).to(dtype)
    want_sum = x + residual  # the model-dtype add, as torch does it
    want = rms_norm_torch(want_sum.double(), w.double(), 1e-5)
    res = residual.clone()
    out = torch.full_like(x, float("nan"))
    got, got_res = add_rms_norm_triton(x, res, w, 1e-5, out=out)
    assert got is out and got_res is res  # residual updated in place
    assert torch.equal(got_res, want_sum)
    assert _rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_rms_norm_interpreter(dtype: torch.dtype, hidden: int) -> None:
    _check_rms_norm(5, hidden, dtype, "cpu", seed=hidden)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hidden", [64, 100])
def test_add_rms_norm_interpreter(dtype: torch.dtype, hidden: int) -> None:
    _check_add_rms_norm(5, hidden, dtype, "cpu", seed=hidden + 1)


@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_rms_norm_two_pass_interpreter(dtype: torch.dtype,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows wider than the one-pass limit loop over chunks; shrink the limit to test it small."""
    monkeypatch.setattr(norm, "_MAX_ONE_PASS", 32)
    _check_rms_norm(3, 200, dtype, "cpu", seed=7)
    _check_add_rms_norm(3, 200, dtype, "cpu", seed=8)


def test_norm_out_may_alias_x_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    g = _gen(3)
    for limit in (16384, 32):  # one pass, then the chunk loop
        monkeypatch.setattr(norm, "_MAX_ONE_PASS", limit)
        x = _randn(4, 96, g=g, dtype=torch.float32, device="cpu")
        r = _randn(4, 96, g=g, dtype=torch.float32, device="cpu")
        w = _randn(96, g=g, dtype=torch.float32, device="cpu")
        want = rms_norm_torch(x, w, 1e-6)
        want_add, want_res = add_rms_norm_torch(x, r, w, 1e-6)
        x2 = x.clone()
        assert _rel(rms_norm_triton(x2, w, 1e-6, out=x2), want) < TOL[torch.float32]
        got, res = add_rms_norm_triton(x, r, w, 1e-6, out=x)
        assert got is x and _rel(got, want_add) < TOL[torch.float32]
        assert torch.equal(res, want_res)


def test_norm_leading_dims_and_weight_promotion_interpreter() -> None:
    """`[B, S, N]` rows; an fp32 weight promotes the output as `weight * h.to(x.dtype)` does."""
    g = _gen(4)
    x = _randn(2, 3, 64, g=g, dtype=torch.float16, device="cpu")
    w = _randn(64, g=g, dtype=torch.float32, device="cpu")
    got = rms_norm_triton(x, w, 1e-5)
    want = rms_norm_torch(x, w, 1e-5)
    assert got.dtype == want.dtype == torch.float32 and got.shape == x.shape
    assert _rel(got, want) < 1e-3


def test_norm_rejects_bad_input() -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="weight must be a contiguous \\[8\\]"):
        rms_norm_triton(x, torch.ones(4), 1e-5)
    with pytest.raises(ValueError, match="residual must match x"):
        add_rms_norm_triton(x, torch.zeros(2, 8, dtype=torch.float16), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="dtypes must be float16, bfloat16 or float32"):
        rms_norm_triton(x.double(), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="out must be"):
        rms_norm_triton(x, torch.ones(8), 1e-5, out=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rms_norm_triton(torch.zeros(8, 2).t(), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="out must not alias residual"):
        r = torch.zeros(2, 8)
        add_rms_norm_triton(x, r, torch.ones(8), 1e-5, out=r)


def test_norm_dispatch_on_cpu_is_the_reference() -> None:
    g = _gen(5)
    x = _randn(3, 32, g=g, dtype=torch.float32, device="cpu")
    r = _randn(3, 32, g=g, dtype=torch.float32, device="cpu")
    w = _randn(32, g=g, dtype=torch.float32, device="cpu")
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))
    out = torch.full_like(x, float("nan"))
    assert torch.equal(rms_norm(x, w, 1e-5, out=out), rms_norm_torch(x, w, 1e-5))
    r0 = r.clone()
    got, res = add_rms_norm(x, r, w, 1e-5)
    want, want_res = add_rms_norm_torch(x, r0, w, 1e-5)
    assert torch.equal(got, want) and torch.equal(res, want_res) and torch.equal(r, r0)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hidden", [4096, 8192, 5120, 16384, 20000])
@pytest.mark.parametrize("rows", [1, 7, 512])
def test_rms_norm_gpu(dtype: torch.dtype, hidden: int, rows: int) -> None:
    _check_rms_norm(rows, hidden, dtype, "cuda", seed=hidden + rows)
    _check_add_rms_norm(rows, hidden, dtype, "cuda", seed=hidden + rows + 1)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [4096, 8192])
def test_norm_matches_torch_to_one_ulp_gpu(dtype: torch.dtype, hidden: int) -> None:
    """The kernel keeps transformers' roundings, so only the float32 reduction order differs:
    nearly every value equals rms_norm_torch's. With a unit weight the rest are one ulp away;
    a general weight w can stretch one ulp of the normalised row to |w| ulps before the last
    rounding, so two ulps of the output there."""
    g = _gen(11)
    x = _randn(256, hidden, g=g, dtype=dtype, device="cuda")
    r = _randn(256, hidden, g=g, dtype=dtype, device="cuda")
    w_rand = (1 + 0.1 * _randn(hidden, g=g, dtype=torch.float64, device="cuda")).to(dtype)
    for w, ulps in ((torch.ones_like(w_rand), 1), (w_rand, 2)):
        want, want_res = add_rms_norm_torch(x, r, w, 1e-5)
        for got in (rms_norm_triton(want_res, w, 1e-5),
                    add_rms_norm_triton(x, r.clone(), w, 1e-5)[0]):
            diff = (got.float() - want.float()).abs()
            ulp = _ulp(torch.maximum(got.float().abs(), want.float().abs()), dtype)
            assert bool((diff <= ulps * ulp).all())
            assert float((diff == 0).float().mean()) > 0.99


# --------------------------------------------------------------------------------------------
# SiLU(gate) x up


def _check_silu(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int) -> None:
    g = _gen(seed)
    x = 2 * _randn(*shape, g=g, dtype=dtype, device=device)
    out = torch.full((*shape[:-1], shape[-1] // 2), float("nan"), dtype=dtype, device=device)
    got = silu_and_mul_triton(x, out=out)
    assert got is out
    want = silu_and_mul_torch(x.double())
    assert _rel(got, want) < TOL[dtype]
    if got.numel() >= 4096:  # enough values for the error norms to be compared
        # one rounding: at least as close to the exact value as the reference, up to noise
        assert _rel(got, want) <= _rel(silu_and_mul_torch(x), want) * 1.05 + 1e-7


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("shape", [(3, 128), (70, 200), (2, 3, 96)])
def test_silu_and_mul_interpreter(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _check_silu(shape, dtype, "cpu", seed=sum(shape))


def test_silu_rejects_bad_input_and_dispatches_on_cpu() -> None:
    with pytest.raises(ValueError, match="x must be \\[..., 2I\\]"):
        silu_and_mul_triton(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="out must be"):
        silu_and_mul_triton(torch.zeros(2, 8), out=torch.zeros(2, 8))
    with pytest.raises(ValueError, match="dtype must be"):
        silu_and_mul_triton(torch.zeros(2, 8, dtype=torch.float64))
    x = torch.randn(3, 16, generator=_gen(1))
    assert torch.equal(silu_and_mul(x), silu_and_mul_torch(x))
    assert activation.triton is not None  # the interpreter tests above ran real Triton


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("rows", [1, 64, 300, 8192])
@pytest.mark.parametrize("inter", [14336, 11008, 100])
def test_silu_and_mul_gpu(dtype: torch.dtype, rows: int, inter: int) -> None:
    _check_silu((rows, 2 * inter), dtype, "cuda", seed=rows + inter)


# --------------------------------------------------------------------------------------------
# rotary + paged KV write


def _rotary_case(t: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, device: str,
                 seed: int, pos_dtype: torch.dtype = torch.int64):  # type: ignore[no-untyped-def]
    """qkv, positions, table, caches as views of a fused [layers, 2, blocks, bs, Hkv, D]
    tensor (NaN-poisoned), slots (scattered, every third token from the second one -1)."""
    g = _gen(seed)
    qkv = _randn(t, (hq + 2 * hkv) * d, g=g, dtype=dtype, device=device)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    max_pos = 4 * t + 64
    cos_sin = cos_sin_table(inv_freq.to(device), max_pos)
    positions = torch.randint(0, max_pos, (t,), generator=g).to(device, pos_dtype)
    blocks = -(-t // bs) + 2
    slots = torch.randperm(blocks * bs, generator=g)[:t]
    slots[1::3] = -1
    fused = torch.full((2, 2, blocks, bs, hkv, d), float("nan"), dtype=dtype, device=device)
    return qkv, positions, cos_sin, fused, slots.to(device)


def _check_rotary(t: int, hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype, device: str,
                  seed: int, pos_dtype: torch.dtype = torch.int64) -> None:
    qkv, positions, cos_sin, fused, slots = _rotary_case(t, hq, hkv, d, bs, dtype, device,
                                                         seed, pos_dtype)
    k_cache, v_cache = fused[1, 0], fused[1, 1]  # strided views of layer 1
    # float64 reference on copies (the kernel rotates qkv in place)
    k64 = torch.zeros(k_cache.shape, dtype=torch.float64, device=device)
    q_want, k_want, v_want = rotary_and_cache_torch(
        qkv.double(), positions.long(), cos_sin, hq, hkv, d, k64, k64.clone(), slots)
    # the transformers-style reference in the model dtype
    scratch = torch.zeros_like(k_cache)
    q_hf, k_hf, _ = rotary_and_cache_torch(qkv.clone(), positions, cos_sin, hq, hkv, d,
                                           scratch, scratch.clone(), slots)
    qkv_in = qkv.clone()
    q, k, v = rotary_and_cache_triton(qkv, positions, cos_sin, hq, hkv, d, k_cache, v_cache,
                                      slots)
    # views of qkv, rotated in place
    assert q.data_ptr() == qkv.data_ptr() and q.shape == (t, hq, d)
    assert k.shape == v.shape == (t, hkv, d)
    assert torch.equal(qkv[:, :hq * d].view(t, hq, d), q)
    assert torch.equal(v.reshape(t, -1), qkv_in[:, (hq + hkv) * d:])
    assert _rel(q, q_want) < TOL[dtype] and _rel(k, k_want) < TOL[dtype]
    assert torch.equal(v.double(), v_want)
    # within rounding of the model-dtype reference: its casts of cos / sin, its two products
    # and its sum each err by at most half an ulp of |x1| + |x2| (|cos|, |sin| <= 1, the
    # result's size is at most that), the kernel's single rounding likewise: 2.5 ulps in all
    eps = torch.finfo(dtype).eps
    x_in = qkv_in[:, :(hq + hkv) * d].float().view(t, hq + hkv, d)
    x1, x2 = x_in.chunk(2, -1)
    bound = 2.5 * eps * (x1.abs() + x2.abs()).repeat(1, 1, 2)  # [T, Hq + Hkv, D]
    for got, hf, b in ((q, q_hf, bound[:, :hq]), (k, k_hf, bound[:, hq:])):
        assert bool(((got.float() - hf.float()).abs() <= b).all())
    # the cache: exactly the returned k and v at each valid slot, NaN (untouched) elsewhere
    want_cache = torch.full_like(fused, float("nan"))
    write_kv_cache_torch(k, v, want_cache[1, 0], want_cache[1, 1], slots)
    assert torch.equal(fused.isnan(), want_cache.isnan())
    valid = ~fused.isnan()
    assert torch.equal(fused[valid], want_cache[valid])
    assert int(valid.sum()) == 2 * int((slots >= 0).sum()) * hkv * d


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 16), (8, 2, 80), (4, 1, 96), (2, 1, 64)])
def test_rotary_and_cache_interpreter(dtype: torch.dtype, hq: int, hkv: int, d: int) -> None:
    _check_rotary(9, hq, hkv, d, 4, dtype, "cpu", seed=hq * d)


def test_rotary_int32_indices_interpreter() -> None:
    _check_rotary(6, 4, 2, 32, 8, torch.float32, "cpu", seed=2, pos_dtype=torch.int32)


def test_rotary_rejects_bad_input_and_dispatches_on_cpu() -> None:
    qkv, positions, cos_sin, fused, slots = _rotary_case(5, 4, 2, 16, 4, torch.float32, "cpu",
                                                         seed=1)
    kc, vc = fused[0, 0], fused[0, 1]
    with pytest.raises(ValueError, match="qkv must be \\[T, \\(Hq \\+ 2 \\* Hkv\\) \\* D\\]"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 4, 1, 16, kc, vc, slots)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 3, 2, 16, kc, vc, slots)
    with pytest.raises(ValueError, match="slot_mapping must be int32 or int64"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 4, 2, 16, kc, vc, slots.float())
    with pytest.raises(ValueError, match="v_cache must be"):
        rotary_and_cache_triton(qkv, positions, cos_sin, 4, 2, 16, kc, vc[..., :8], slots)
    with pytest.raises(ValueError, match="cos_sin must be"):
        rotary_and_cache_triton(qkv, positions, cos_sin[:, :8], 4, 2, 16, kc, vc, slots)
    # dispatch on CPU: the reference, qkv untouched
    qkv0 = qkv.clone()
    kc.zero_(), vc.zero_()
    got = rotary_and_cache(qkv, positions, cos_sin, 4, 2, 16, kc, vc, slots)
    k2, v2 = torch.zeros_like(kc), torch.zeros_like(vc)
    want = rotary_and_cache_torch(qkv0, positions, cos_sin, 4, 2, 16, k2, v2, slots)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert torch.equal(qkv, qkv0) and torch.equal(kc, k2) and torch.equal(vc, v2)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (32, 32, 128), (16, 2, 64), (8, 1, 80),
                                      (12, 4, 96), (8, 8, 256), (64, 8, 128)])
@pytest.mark.parametrize("t,bs", [(1, 16), (37, 16), (1024, 128), (8192, 64)])
def test_rotary_and_cache_gpu(dtype: torch.dtype, hq: int, hkv: int, d: int, t: int,
                              bs: int) -> None:
    _check_rotary(t, hq, hkv, d, bs, dtype, "cuda", seed=t + d)


@gpu
def test_rotary_int32_indices_gpu() -> None:
    _check_rotary(300, 32, 8, 128, 16, torch.bfloat16, "cuda", seed=5, pos_dtype=torch.int32)


# --------------------------------------------------------------------------------------------
# CUDA graphs


@gpu
def test_fused_kernels_replay_in_a_cuda_graph() -> None:
    """Captured once through the dispatch functions, replayed on new inputs copied into the
    static buffers: equal to eager runs (no host sync, no data-dependent Python inside)."""
    dtype, t, hq, hkv, d, hidden, inter = torch.bfloat16, 8, 32, 8, 128, 4096, 14336
    g = _gen(21)
    qkv, positions, cos_sin, fused, slots = _rotary_case(t, hq, hkv, d, 16, dtype, "cuda", 21)
    x = _randn(t, hidden, g=g, dtype=dtype, device="cuda")
    res = _randn(t, hidden, g=g, dtype=dtype, device="cuda")
    w = _randn(hidden, g=g, dtype=dtype, device="cuda")
    gate_up = _randn(t, 2 * inter, g=g, dtype=dtype, device="cuda")
    normed, act = torch.empty_like(x), torch.empty(t, inter, dtype=dtype, device="cuda")
    kc, vc = fused[0, 0], fused[0, 1]

    def step() -> None:
        rotary_and_cache(qkv, positions, cos_sin, hq, hkv, d, kc, vc, slots)
        add_rms_norm(x, res, w, 1e-5, out=normed)
        silu_and_mul(gate_up, out=act)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    new = _rotary_case(t, hq, hkv, d, 16, dtype, "cuda", 22)
    inputs = [(qkv, new[0]), (positions, new[1]), (slots, new[4]),
              (x, _randn(t, hidden, g=g, dtype=dtype, device="cuda")),
              (res, _randn(t, hidden, g=g, dtype=dtype, device="cuda")),
              (gate_up, _randn(t, 2 * inter, g=g, dtype=dtype, device="cuda"))]
    for static, value in inputs:
        static.copy_(value)
    eager_fused = torch.full_like(fused, float("nan"))
    q_e, k_e, v_e = rotary_and_cache(qkv.clone(), positions, cos_sin, hq, hkv, d,
                                     eager_fused[0, 0], eager_fused[0, 1], slots)
    n_e, r_e = add_rms_norm(x, res.clone(), w, 1e-5)
    a_e = silu_and_mul(gate_up)
    fused.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(qkv[:, :hq * d].view(t, hq, d), q_e)
    assert torch.equal(normed, n_e) and torch.equal(res, r_e) and torch.equal(act, a_e)
    assert torch.equal(fused.isnan(), eager_fused.isnan())
    assert torch.equal(fused.nan_to_num(), eager_fused.nan_to_num())
