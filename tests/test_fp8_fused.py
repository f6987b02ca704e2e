"""FP8 quantization fused into its producers (`kernels/fp8_fused.py`): (add +) RMSNorm -> E4M3
and SiLU x up -> E4M3 against their torch references (the norm / activation, then
`quantize_activation_torch`), and the seam that carries the quantized activation to the FP8
linear layers (`parallel.layers.QuantizedActivation`, `models/llama.py`'s norm and MLP).

On CPU the kernels run in Triton's interpreter (float32 / float16: bit-exact there), bf16 on
a GPU.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from trtdist.kernels.fp8_fused import (
    rms_norm_quant_torch,
    rms_norm_quant_triton,
    silu_and_mul_quant_torch,
    silu_and_mul_quant_triton,
)
from trtdist.parallel import quant_fp8
from trtdist.parallel.layers import (
    ColumnParallelLinear,
    Fp8LinearMethod,
    QuantizedActivation,
    UnquantizedLinearMethod,
)
from trtdist.parallel.quant_fp8 import (
    fp8_linear_reference,
    quantize_activation,
    quantize_weight_per_channel,
)

from trtdist.models.llama import LlamaMLP, RMSNorm


def _assert_quant_close(got: tuple[torch.Tensor, torch.Tensor],
                        want: tuple[torch.Tensor, torch.Tensor], f32: bool) -> None:
    """Scales within a few ulp (float32) or one model-dtype ulp, codes at most one step apart and
    rarely (a float32 reduction order can flip one model-dtype rounding)."""
    (q, s), (rq, rs) = got, want
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == rs.shape and q.shape == rq.shape
    if f32:  # float32: the norm's sum of squares in another order moves the last bit
        torch.testing.assert_close(s, rs, rtol=1e-6, atol=0)
    else:
        # NOTE: the row's amax element itself may be one model-dtype ulp apart (bf16: up
        # to 2^-7 relative).
        torch.testing.assert_close(s, rs, rtol=8e-3, atol=0)
    codes, ref_codes = q.view(torch.uint8).int(), rq.view(torch.uint8).int()
    assert int((codes - ref_codes).abs().max()) <= 1
    assert float((codes != ref_codes).float().mean()) < 1e-2


class _OneRank:
    rank, size = 0, 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


# ---- interpreter (CPU) -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n", [200, 4096, 20000])  # one pass, one pass, chunked (> 16384)
def test_rms_norm_quant_interpreter(dtype: torch.dtype, n: int) -> None:
    torch.manual_seed(n)
    x = (torch.randn(3, n) * 2).to(dtype)
    res0 = torch.randn(3, n).to(dtype)
    w = (torch.rand(n) + 0.5).to(dtype)
    x[1] = 0  # with no residual: an all-zero row gets the minimum scale
    for static in (None, torch.tensor([0.01])):
        for residual in (None, res0):
            res = None if residual is None else residual.clone()
            q, s, r = rms_norm_quant_triton(x, res, w, 1e-5, static)
            rq, rs, rr = rms_norm_quant_torch(x, residual, w, 1e-5, static)
            _assert_quant_close((q, s), (rq, rs), f32=dtype == torch.float32)
            assert torch.equal(r, rr)
            if residual is not None:
                assert r.data_ptr() == res.data_ptr()  # updated in place
            else:
                assert r is x
            if static is not None:
                assert (s == 0.01).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("inter", [200, 4096, 17000])  # one pass, one pass, chunked
def test_silu_and_mul_quant_interpreter(dtype: torch.dtype, inter: int) -> None:
    torch.manual_seed(inter)
    x = (torch.randn(3, 2 * inter) * 3).to(dtype)
    x[2, :inter] = 0  # gate 0: SiLU 0, a zero row
    for static in (None, torch.tensor([0.02])):
        got = silu_and_mul_quant_triton(x, static)
        _assert_quant_close(got, silu_and_mul_quant_torch(x, static),
                            f32=dtype == torch.float32)
        assert float(got[1][2]) == pytest.approx(1e-12 if static is None else 0.02, rel=1e-6)


def test_fused_quant_rejects_bad_input() -> None:
    x, w = torch.randn(2, 8), torch.ones(8)
    with pytest.raises(ValueError, match="weight must be a contiguous \\[8\\]"):
        rms_norm_quant_triton(x, None, torch.ones(4), 1e-5, None)
    with pytest.raises(ValueError, match="residual must match x"):
        rms_norm_quant_triton(x, torch.randn(3, 8), w, 1e-5, None)
    with pytest.raises(ValueError, match="input_scale must hold one float32"):
        rms_norm_quant_triton(x, None, w, 1e-5, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="x must be \\[T, 2I\\]"):
        silu_and_mul_quant_triton(torch.randn(2, 7), None)


# ---- the seam: QuantizedActivation -------------------------------------------------------
def _fp8_layer(n: int, k: int, static: bool) -> ColumnParallelLinear:
    method = Fp8LinearMethod("static" if static else "dynamic")
    layer = ColumnParallelLinear(k, n, True, torch.float32, torch.device("cpu"), method)
    w, ws = quantize_weight_per_channel(torch.randn(n, k) * 0.05)
    layer.weight.data.copy_(w)
    layer.weight_scale.data.copy_(ws)
    layer.bias.data.normal_()
    if static:
        layer.input_scale.data.fill_(0.01)
    return layer


@pytest.mark.parametrize("static", [False, True])
def test_fp8_linear_takes_a_quantized_activation_cpu(static: bool) -> None:
    torch.manual_seed(0)
    layer = _fp8_layer(48, 64, static)
    assert not layer.wants_quantized_input  # the CPU path quantizes inside the reference
    assert (layer.activation_scale is None) == (not static)
    x = torch.randn(5, 64)
    q, s = quantize_activation(x, layer.activation_scale)
    y = layer(QuantizedActivation(q, s, torch.float32))
    ref = fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.input_scale,
                               layer.bias)
    assert torch.equal(y, ref)
    plain = ColumnParallelLinear(64, 48, False, torch.float32, torch.device("cpu"),
                                 UnquantizedLinearMethod())
    assert not plain.wants_quantized_input and plain.activation_scale is None
    with pytest.raises(TypeError, match="unquantized linear layer got an FP8"):
        plain(QuantizedActivation(q, s, torch.float32))


def test_quantized_activation_path_falls_back_when_the_gemm_fails(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A failing small-M kernel: `_scaled_mm` on the given E4M3 rows (it runs on CPU too), a
    warning, and the layers stop asking for quantized input."""
    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("simulated launch failure")

    monkeypatch.setattr(quant_fp8, "_fast", {"gemm": broken, "small_m_max": 16})
    torch.manual_seed(0)
    layer = _fp8_layer(48, 64, False)
    layer.use_scaled_mm = True  # as on CUDA
    assert layer.wants_quantized_input
    x = torch.randn(3, 64)
    q, s = quantize_activation(x, None)
    with caplog.at_level(logging.WARNING, logger="trtdist"):
        y = layer(QuantizedActivation(q, s, torch.float32))
    ref = fp8_linear_reference(x, layer.weight, layer.weight_scale, None, layer.bias)
    assert y.dtype == torch.float32 and float((y - ref).norm() / ref.norm()) < 1e-2
    assert "simulated launch failure" in quant_fp8._fast["off"]  # type: ignore[operator]
    assert not layer.wants_quantized_input
    assert any("FP8 Triton kernels disabled" in r.message for r in caplog.records)


@pytest.mark.parametrize("static", [False, True])
def test_llama_norm_and_mlp_fused_path_equals_unfused(static: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's fused wiring (norm -> quantized gate_up, SiLU -> quantized down), forced
    on here (the interpreter runs the kernels), against the unfused CPU path: same numbers."""
    torch.manual_seed(1)
    hidden, inter = 64, 96
    cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=inter, mlp_bias=False)
    method = Fp8LinearMethod("static" if static else "dynamic")
    mlp = LlamaMLP(cfg, SimpleNamespace(tp_size=1), _OneRank(), torch.float32,
                   torch.device("cpu"), method)
    gen = torch.Generator().manual_seed(2)
    for lin in (mlp.gate_up, mlp.down):
        method.dummy_fill(lin, gen)
    norm = RMSNorm(hidden, 1e-5, torch.float32, torch.device("cpu"))
    norm.weight.data.uniform_(0.5, 1.5)
    x, residual = torch.randn(4, hidden), torch.randn(4, hidden)

    def layer() -> tuple[torch.Tensor, torch.Tensor]:
        h, res = norm(x.clone(), residual.clone(), quant_for=mlp.gate_up)
        return mlp(h), res

    want, want_res = layer()
    calls = []
    monkeypatch.setattr(Fp8LinearMethod, "wants_quantized_input",
                        lambda self, lin: calls.append(lin) is None)
    got, got_res = layer()
    assert len(calls) == 2  # the norm asked gate_up, the MLP asked down
    assert torch.equal(got_res, want_res)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---- GPU ---------------------------------------------------------------------------------
def _need_fp8() -> torch.device:
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("t", [1, 16, 300])
def test_fused_quant_kernels_gpu(dtype: torch.dtype, t: int) -> None:
    dev = _need_fp8()
    torch.manual_seed(t)
    for n, inter in ((4096, 14336), (5120, 3456)):
        x = (torch.randn(t, n, device=dev) * 2).to(dtype)
        res0 = torch.randn(t, n, device=dev).to(dtype)
        w = (torch.rand(n, device=dev) + 0.5).to(dtype)
        g = (torch.randn(t, 2 * inter, device=dev) * 3).to(dtype)
        for static in (None, torch.tensor([0.01], device=dev)):
            res = res0.clone()
            q, s, r = rms_norm_quant_triton(x, res, w, 1e-5, static)
            rq, rs, rr = rms_norm_quant_torch(x, res0, w, 1e-5, static)
            _assert_quant_close((q, s), (rq, rs), f32=False)
            assert torch.equal(r, rr)
            _assert_quant_close(silu_and_mul_quant_triton(g, static),
                                silu_and_mul_quant_torch(g, static), f32=False)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_llama_mlp_fused_path_gpu(m: int) -> None:
    """On CUDA the FP8 MLP takes the fused path by itself; its output matches the dequantizing
    reference of the same quantized model."""
    dev = _need_fp8()
    torch.manual_seed(m)
    hidden, inter = 4096, 14336
    cfg = SimpleNamespace(hidden_size=hidden, intermediate_size=inter, mlp_bias=False)
    method = Fp8LinearMethod()
    mlp = LlamaMLP(cfg, SimpleNamespace(tp_size=1), _OneRank(), torch.bfloat16, dev, method)
    gen = torch.Generator(device=dev).manual_seed(3)
    for lin in (mlp.gate_up, mlp.down):
        method.dummy_fill(lin, gen)
    assert mlp.gate_up.wants_quantized_input and mlp.down.wants_quantized_input
    x = torch.randn(m, hidden, device=dev, dtype=torch.bfloat16)
    q, s = quantize_activation(x, None)
    y = mlp(QuantizedActivation(q, s, torch.bfloat16))
    h = fp8_linear_reference(x, mlp.gate_up.weight, mlp.gate_up.weight_scale, None, None)
    a = (torch.nn.functional.silu(h.float()[:, :inter]) * h.float()[:, inter:]).bfloat16()
    ref = fp8_linear_reference(a, mlp.down.weight, mlp.down.weight_scale, None, None)
    rel = float((y.double() - ref.double()).norm() / ref.double().norm())
    # NOTE: the SiLU output is quantized to FP8 again on both sides from bf16 values that may
    # differ by an ulp (GEMM summation order), which moves some codes by one E4M3 step (~6%):
    # measured on an H200 (2026-11-23) 0.0202 at M = 4, below 0.02 at M = 1, 16, 64. A broken
    # path is off by O(1).
    assert rel < 3e-2, rel


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 2, 4])
def test_silu_rows_split_over_programs_gpu(t: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """At one to four rows a SiLU x up row is split over programs that meet at a per-row
    barrier for the amax (`fp8_quant.row_split`): bit for bit the codes and scales of one
    program a row, each launch moving the row's counter by a whole MAX_PARTS, and the same
    again in a CUDA graph replayed several times."""
    from trtdist.kernels import fp8_quant
    from trtdist.kernels.fp8_quant import MAX_PARTS, row_split, row_sync

    dev = _need_fp8()
    inter = 14336
    torch.manual_seed(t)
    g = torch.randn(t, 2 * inter, device=dev, dtype=torch.bfloat16) * 3
    g[0, :inter] = 0  # one row's gate zero: SiLU x up is zero there, its scale the floor
    assert row_split(t, inter, g.device) > 1
    counters = row_sync(g.device)[0]
    before = counters.clone()
    split = silu_and_mul_quant_triton(g, None)
    assert bool((counters % MAX_PARTS == 0).all())
    assert torch.equal(counters[:t] - before[:t], torch.full_like(counters[:t], MAX_PARTS))
    monkeypatch.setenv(fp8_quant.ROW_SPLIT_ENV, "0")
    assert row_split(t, inter, g.device) == 1
    whole = silu_and_mul_quant_triton(g, None)
    monkeypatch.delenv(fp8_quant.ROW_SPLIT_ENV)
    assert torch.equal(split[0].view(torch.uint8), whole[0].view(torch.uint8))
    assert torch.equal(split[1], whole[1])
    _assert_quant_close(split, silu_and_mul_quant_torch(g, None), f32=False)

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        silu_and_mul_quant_triton(g, None)  # warm-up off the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = silu_and_mul_quant_triton(g, None)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[0].view(torch.uint8), whole[0].view(torch.uint8))
        assert torch.equal(out[1], whole[1])
    assert bool((counters % MAX_PARTS == 0).all())
