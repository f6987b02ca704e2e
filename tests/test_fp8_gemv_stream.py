"""The streaming one-token FP8 GEMV (`kernels/fp8_gemv_stream.py`) against the torch reference
in every input mode and launch config, its dispatch from the small-M GEMM, and chains of it
with row kernels that let it launch early (programmatic dependent launch), eager and in a CUDA
graph; its config validation on CPU."""

from __future__ import annotations

import os

import pytest
import torch
from test_fp8_gemv_cuda import _abs_sum, _assert_close, _need, check_every_mode
from trtdist.kernels import fp8_gemv_stream as stream
from trtdist.kernels.fp8_gemv_stream import StreamGemvConfig, smem_bytes
from trtdist.parallel.quant_fp8 import quantize_weight_per_channel


@pytest.fixture(autouse=True)
def _stream_every_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test models' shapes (e.g. a 192-unit qkv) are ones the default dispatch leaves to
    the CUDA GEMV (`worth_streaming`); a launch table of the default launch streams them all."""
    monkeypatch.setenv(stream.CONFIG_ENV, "2048:6:4:3")


def test_config_validation_and_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    assert StreamGemvConfig().fits(4096) and StreamGemvConfig().fits(14336)
    assert not StreamGemvConfig(kc=2048).fits(14336 + 1024)
    with pytest.raises(ValueError, match="multiple of 128 x nwarps"):
        StreamGemvConfig(kc=768, nwarps=4)
    with pytest.raises(ValueError, match="stages"):
        StreamGemvConfig(stages=1)
    assert StreamGemvConfig.parse("2048:3:8") == StreamGemvConfig(kc=2048, stages=3, nwarps=8)
    with pytest.raises(ValueError, match="kc:stages:nwarps"):
        StreamGemvConfig.parse("2048x3")
    assert StreamGemvConfig.parse("2048:6:4:5").prefill_stages == 5
    assert StreamGemvConfig.parse("2048:6:4").prefill_stages == StreamGemvConfig().prefill_stages
    monkeypatch.setenv(stream.CONFIG_ENV, "512:6:4")
    assert stream.default_config(4096) == StreamGemvConfig(kc=512, stages=6, nwarps=4)
    monkeypatch.setenv(stream.CONFIG_ENV, "1024:4:4:2, 14336=2048:6:4:3")
    assert stream.default_config(4096) == StreamGemvConfig(kc=1024, stages=4, nwarps=4,
                                                           prefill_stages=2)
    assert stream.default_config(14336) == StreamGemvConfig()
    monkeypatch.setenv(stream.CONFIG_ENV, "2048:6:4:3, 4096x4096=2048:6:4:0")
    assert stream.default_config(4096, 4096) == StreamGemvConfig(prefill_stages=0)
    assert stream.default_config(4096, 6144) == StreamGemvConfig(prefill_stages=3)
    monkeypatch.setenv(stream.CONFIG_ENV, "x=1024:4:4")
    with pytest.raises(ValueError, match="bad shape"):
        stream.default_config(4096)
    monkeypatch.setenv(stream.CONFIG_ENV, "1024:4")
    with pytest.raises(ValueError, match="prefill_stages"):
        stream.default_config(4096)
    monkeypatch.delenv(stream.CONFIG_ENV)
    assert stream.default_config(4096) == StreamGemvConfig()
    assert stream.default_config(4096 + 512) == StreamGemvConfig(kc=512, stages=18, nwarps=4,
                                                                  prefill_stages=12)
    assert stream.default_config(4096 + 128) is None


def test_shared_memory_fits_llama3_8b() -> None:
    """The default ring fits one CTA an SM for llama3-8b's shapes (at most 227 KB), and a
    1 KB x 4 ring leaves room for a second CTA (the next kernel) on a 228 KB SM."""
    for k, units in ((4096, 3), (4096, 14), (14336, 2)):
        assert smem_bytes(StreamGemvConfig(), k, units) <= stream.SMEM_LIMIT, k
        assert 2 * (smem_bytes(StreamGemvConfig(1024, 4), k, units) + 1024) <= 228 * 1024, k


def test_on_by_default_never_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(stream.ENV, raising=False)
    monkeypatch.delenv(stream.FUSED_ENV, raising=False)
    assert stream.enabled()
    assert stream.PROLOGUE_KINDS["0"] == ()  # fused inputs off unless asked (slower so far)
    assert not stream.supports(1, 4096, 4096, torch.bfloat16, torch.bfloat16,
                               torch.device("cpu"))
    monkeypatch.setenv(stream.ENV, "0")
    assert not stream.enabled()
    monkeypatch.setenv(stream.ENV, "yes")
    with pytest.raises(ValueError, match="TRTDIST_STREAM_GEMV must be 0 or 1"):
        stream.enabled()


def test_row_kernels_trigger_early_only_where_a_streaming_gemv_ran(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 models' multi-wave GEMVs keep late-triggering row kernels before them: the early
    trigger is per device, set by the first streaming launch there (or forced by the env)."""
    from trtdist.kernels import _triton

    monkeypatch.setattr(_triton, "_streaming_devices", set())
    monkeypatch.delenv(_triton.EARLY_ENV, raising=False)
    here, there = torch.device("cuda", 0), torch.device("cuda", 1)
    assert not _triton.early_trigger(here)
    _triton.mark_streaming(torch.device("cuda:0"))
    assert _triton.early_trigger(here) and not _triton.early_trigger(there)
    monkeypatch.setenv(_triton.EARLY_ENV, "0")
    assert not _triton.early_trigger(here)
    monkeypatch.setenv(_triton.EARLY_ENV, "1")
    assert _triton.early_trigger(there)
    monkeypatch.setenv(_triton.EARLY_ENV, "early")
    with pytest.raises(ValueError, match="TRTDIST_PDL_EARLY must be 0 or 1"):
        _triton.early_trigger(here)


def test_default_dispatch_streams_only_even_2kb_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama3-8b's one-GPU shapes split within 5% of even over an H200's 132 SMs in 2 KB
    copies; a tensor-parallel qkv shard (192 units) or a K of 7168 (1 KB copies) keep the CUDA
    GEMV unless a launch table says otherwise."""
    dev = torch.device("cuda", 7)
    monkeypatch.setitem(stream._sms, dev, 132)
    monkeypatch.delenv(stream.CONFIG_ENV, raising=False)
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        assert stream._shape_ok(n, k, dev), (n, k)
    assert not stream._shape_ok(3072, 4096, dev)  # 2 units on 60 CTAs, 1 on 72
    assert not stream._shape_ok(4096, 7168, dev)  # 512-byte copies
    monkeypatch.setenv(stream.CONFIG_ENV, "2048:6:4")
    assert stream._shape_ok(3072, 4096, dev)


def test_prefill_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="prefill_stages"):
        StreamGemvConfig(prefill_stages=-1)
    monkeypatch.setenv(stream.PREFILL_ENV, "3")
    assert stream.default_config(4096).prefill_stages == 3
    monkeypatch.setenv(stream.PREFILL_ENV, "some")
    with pytest.raises(ValueError, match="TRTDIST_STREAM_GEMV_PREFILL"):
        stream.default_config(4096)


def test_fused_input_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setenv(stream.FUSED_ENV, "sometimes")
    with pytest.raises(ValueError, match="TRTDIST_STREAM_GEMV_FUSED must be one of"):
        stream.supports_prologue(4096, 4096, torch.bfloat16, cpu)
    monkeypatch.setenv(stream.FUSED_ENV, "norm")
    assert not stream.supports_prologue(4096, 14336, torch.bfloat16, cpu, "gated")
    assert stream.PROLOGUE_KINDS["1"] == ("norm", "gated", "plain")


def _rope(**changes: object):
    from trtdist.kernels.rotary import RotaryCacheWrite

    cache = torch.zeros(3, 16, 2, 128, dtype=torch.bfloat16)
    args = dict(positions=torch.zeros(1, dtype=torch.int32),
                slot_mapping=torch.zeros(1, dtype=torch.int64), cos_sin=torch.zeros(64, 128),
                q_heads=4, kv_heads=2, head_dim=128, k_cache=cache, v_cache=cache.clone())
    return RotaryCacheWrite(**{**args, **changes})


def test_rotary_output_switch_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rotary epilogue's switch, its shared memory at llama3-8b's qkv, and the checks of
    what it is handed (shapes, dtypes, devices: a message naming the field and what fits)."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(stream.ROTARY_ENV, raising=False)
    assert stream.rotary_enabled()
    assert not stream.supports_rotary(6144, 4096, torch.bfloat16, 128, cpu)
    monkeypatch.setenv(stream.ROTARY_ENV, "0")
    assert not stream.rotary_enabled()
    monkeypatch.setenv(stream.ROTARY_ENV, "on")
    with pytest.raises(ValueError, match="TRTDIST_STREAM_GEMV_ROTARY must be 0 or 1"):
        stream.rotary_enabled()
    assert (smem_bytes(StreamGemvConfig(), 4096, 3, rotary=True)
            == smem_bytes(StreamGemvConfig(), 4096, 3) + 3 * 16 * 4 <= stream.SMEM_LIMIT)
    _rope().check(1024, torch.bfloat16, cpu)
    bad = [(dict(head_dim=120), "multiple of 16"), (dict(q_heads=5), "= 1024"),
           (dict(positions=torch.zeros(2, dtype=torch.int32)), "positions must be one"),
           (dict(slot_mapping=torch.zeros(1)), "slot_mapping must be one int32 or int64"),
           (dict(cos_sin=torch.zeros(64, 128, dtype=torch.bfloat16)), "cos_sin must be"),
           (dict(cos_sin=torch.zeros(64, 64)), "cos_sin must be"),
           (dict(k_cache=torch.zeros(3, 16, 2, 128, dtype=torch.float16)), "k_cache must be"),
           (dict(v_cache=torch.zeros(3, 8, 2, 128, dtype=torch.bfloat16)), "v_cache must be"),
           (dict(cos_sin=torch.zeros(64, 128, device="meta")), "all tensors must be on cpu")]
    for changes, match in bad:
        with pytest.raises(ValueError, match=match):
            _rope(**changes).check(1024, torch.bfloat16, cpu)


def test_linear_methods_rotary_seam() -> None:
    """Only the FP8 method's one-token CUDA GEMMs take the rotary epilogue; the base method
    (unquantized) declines and returns None, so the layer runs the rotary kernel."""
    from trtdist.parallel.layers import ColumnParallelLinear
    from trtdist.parallel.linear_methods import Fp8LinearMethod

    cpu = torch.device("cpu")
    plain = ColumnParallelLinear(64, 3 * 64, False, torch.float32, cpu)
    assert not plain.wants_rotary_output(1, 16)
    assert plain.forward_rotary(torch.zeros(1, 64), _rope()) is None
    fp8 = ColumnParallelLinear(64, 3 * 64, False, torch.bfloat16, cpu, Fp8LinearMethod())
    assert not fp8.wants_rotary_output(1, 16)  # CPU: the reference path


# ---- GPU ---------------------------------------------------------------------------------
def _hopper() -> torch.device:
    dev = _need()
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA bulk copies need compute capability 9.0")
    return dev


SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (256, 1024), (4096, 3072),
          (2112, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_mode_matches_the_reference_gpu(n: int, k: int, dtype: torch.dtype) -> None:
    _hopper()
    check_every_mode(stream.fp8_gemv_stream, n, k, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [StreamGemvConfig(512, 2, 4), StreamGemvConfig(2048, 3, 8),
                                 StreamGemvConfig(1024, 8, 2, min_blocks=1),
                                 StreamGemvConfig(512, 5, 1, prefill=False),
                                 StreamGemvConfig(1024, 4, 4, early_trigger=False)], ids=str)
def test_launch_configs_gpu(cfg: StreamGemvConfig) -> None:
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch
    from trtdist.parallel.quant_fp8 import quantize_activation

    dev = _hopper()
    for n, k in ((4096, 4096), (4096, 14336)):
        if not cfg.fits(k):
            continue
        w, ws = quantize_weight_per_channel(torch.randn(n, k, device=dev) * 0.02)
        xq, xs = quantize_activation(torch.randn(1, k, device=dev, dtype=torch.bfloat16), None)
        out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        stream.fp8_gemv_stream(xq, xs.reshape(1), 0, w, ws, None, out, config=cfg)
        _assert_close(out, fp8_gemm_torch(xq, xs, w, ws, None, torch.bfloat16),
                      _abs_sum(xq, xs, w, ws), str(cfg))


def _layer_chain(dev: torch.device, layers: int = 3, h: int = 2048, inter: int = 5632):
    """A stand-in for the FP8 decode layers' GEMV / row-kernel sequence (norm + quantize ->
    qkv-sized GEMV -> norm + quantize -> gate | up -> SiLU x up + quantize -> down), as a
    function of the input row, with the weights it closes over."""
    from trtdist.kernels.fp8_fused import rms_norm_quant_triton, silu_and_mul_quant_triton
    from trtdist.kernels.fp8_gemm import fp8_gemm_small_m

    gen = torch.Generator(device=dev).manual_seed(1)
    mats = []
    for _ in range(layers):
        mats.append([quantize_weight_per_channel(torch.randn(n, k, device=dev, generator=gen)
                                                 / k ** 0.5)
                     for n, k in ((h, h), (2 * inter, h), (h, inter))])
    ln = torch.rand(h, device=dev, generator=gen, dtype=torch.bfloat16) + 0.5
    bf = torch.bfloat16

    def run(x: torch.Tensor) -> torch.Tensor:
        res = x.clone()
        y = x
        for (wa, sa), (wg, sg), (wd, sd) in mats:
            xq, xs, _ = rms_norm_quant_triton(y, res, ln, 1e-5, None)
            y = fp8_gemm_small_m(xq, xs, wa, sa, None, bf)
            xq, xs, _ = rms_norm_quant_triton(y, res, ln, 1e-5, None)
            gu = fp8_gemm_small_m(xq, xs, wg, sg, None, bf)
            xq, xs = silu_and_mul_quant_triton(gu, None)
            y = fp8_gemm_small_m(xq, xs, wd, sd, None, bf)
        return torch.cat([y, res], dim=1)

    return run


@pytest.mark.gpu
def test_chain_with_early_row_kernels_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The streaming GEMVs behind row kernels that let them launch at their start (and the
    GEMVs letting the row kernels launch at theirs) give the bits of the same chain run one
    kernel after another, eager and replayed from a CUDA graph."""
    from trtdist.kernels import fp8_gemm

    dev = _hopper()
    run = _layer_chain(dev)
    x = torch.randn(1, 2048, device=dev, dtype=torch.bfloat16)
    monkeypatch.setenv(stream.ENV, "0")
    monkeypatch.setenv("TRTDIST_PDL_EARLY", "0")
    plain = run(x)
    monkeypatch.setenv(stream.ENV, "1")
    monkeypatch.setenv("TRTDIST_PDL_EARLY", "1")
    calls = []
    real = fp8_gemm.fp8_gemv_stream
    monkeypatch.setattr(fp8_gemm, "fp8_gemv_stream",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    eager = run(x)
    assert len(calls) == 9 and dev not in fp8_gemm._stream_gemv_off  # every GEMV streamed
    # one-token sums in another order than the Triton gemv's: within the model dtype's
    # rounding of each output, compounded over 9 GEMVs of a random chain
    torch.testing.assert_close(eager, plain, rtol=0.05, atol=0.05)
    xin = x.clone()
    out = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run(xin)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out.copy_(run(xin))
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, eager)


# ---- GEMMs that compute their own input (modes 3-5) ---------------------------------------
def _close_to(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Within 1% of the reference's largest output: the fused input is the kernels' row up to
    float32 summation order (the norm's sum of squares, the SiLU's exp), which may move an
    element by one model-dtype step and, rarely, the row's amax (and so every code) with it."""
    err = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
    assert err < 0.01, f"{what}: {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_input_matches_the_fused_norm_kernel_gpu(dtype: torch.dtype,
                                                      with_residual: bool) -> None:
    from trtdist.kernels.fp8_fused import rms_norm_quant_torch
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch

    dev = _hopper()
    torch.manual_seed(3)
    n, k = 6144, 4096
    w, ws = quantize_weight_per_channel(torch.randn(n, k, device=dev) * 0.02)
    x = (torch.randn(1, k, device=dev) * 2).to(dtype)
    res = (torch.randn(1, k, device=dev) * 4).to(dtype) if with_residual else None
    nw = (torch.rand(k, device=dev) + 0.5).to(dtype)
    bias = torch.randn(n, device=dev, dtype=dtype)
    xq, xs, res_sum = rms_norm_quant_torch(x, None if res is None else res.clone(), nw, 1e-5,
                                           None)
    ref = fp8_gemm_torch(xq, xs, w, ws, bias, dtype)
    res_out = torch.full_like(x, float("nan")) if with_residual else None
    out = torch.full((1, n), float("nan"), device=dev, dtype=dtype)
    stream.fp8_gemv_stream_norm(x, res, res_out, nw, 1e-5, w, ws, bias, out)
    _close_to(out, ref, f"norm {dtype}")
    if with_residual:
        assert torch.equal(res_out, res_sum)  # x + residual, rounded as torch rounds it
    with pytest.raises(ValueError, match="alias"):
        stream.fp8_gemv_stream_norm(x, x, x, nw, 1e-5, w, ws, bias, out)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", [(4096, 14336), (2048, 8192), (4096, 4096)])
def test_silu_and_dynamic_inputs_gpu(n: int, k: int) -> None:
    from trtdist.kernels.fp8_fused import silu_and_mul_quant_torch
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch
    from trtdist.kernels.fp8_quant import quantize_activation_triton

    dev = _hopper()
    torch.manual_seed(n + k)
    w, ws = quantize_weight_per_channel(torch.randn(n, k, device=dev) * 0.02)
    gu = (torch.randn(1, 2 * k, device=dev) * 3).to(torch.bfloat16)
    xq, xs = silu_and_mul_quant_torch(gu, None)
    out = torch.full((1, n), float("nan"), device=dev, dtype=torch.bfloat16)
    stream.fp8_gemv_stream_silu(gu, w, ws, None, out)
    _close_to(out, fp8_gemm_torch(xq, xs, w, ws, None, torch.bfloat16), "silu")
    x = gu[:, :k].contiguous()
    xq, xs = quantize_activation_triton(x, None)  # IEEE-rounded scale, as the kernel's
    stream.fp8_gemv_stream_dynamic(x, w, ws, None, out)
    _assert_close(out, fp8_gemm_torch(xq, xs, w, ws, None, torch.bfloat16),
                  _abs_sum(xq, xs, w, ws), "dynamic")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_output_gpu(dtype: torch.dtype) -> None:
    """The gate | up GEMM returning SiLU(gate) * up: the GEMM's outputs rounded, then SiLU x up
    in float32 rounded once (kernels/activation.py), and its max |value| in the amax slot."""
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch
    from trtdist.kernels.fp8_quant import quantize_activation_triton

    dev = _hopper()
    torch.manual_seed(7)
    inter, k = 14336, 4096
    w, ws = quantize_weight_per_channel(torch.randn(2 * inter, k, device=dev) * 0.02)
    x = (torch.randn(1, k, device=dev) * 2).to(dtype)
    bias = torch.randn(2 * inter, device=dev, dtype=dtype) * 0.1
    xq, xs = quantize_activation_triton(x, None)
    for b in (None, bias):
        gu = fp8_gemm_torch(xq, xs, w, ws, b, dtype).float()
        gate, up = gu[:, :inter], gu[:, inter:]
        ref = (gate / (1 + torch.exp(-gate)) * up).to(dtype)
        out = torch.full((1, inter), float("nan"), device=dev, dtype=dtype)
        amax = torch.zeros(4, device=dev)
        for _ in range(2):  # a second launch maxes onto the first: the same value
            stream.fp8_gemv_stream_gated(xq, xs.reshape(1), 0, w, ws, b, out, amax)
        _close_to(out, ref, f"gated {dtype} bias {b is not None}")
        assert float(amax[0]) == float(out.float().abs().max())
        assert not amax[1:].any()
    with pytest.raises(ValueError, match="2I rows"):
        stream.fp8_gemv_stream_gated(xq, xs.reshape(1), 0, w, ws, None, out[:, :16], amax)


def _within_one_step(y: torch.Tensor, ref: torch.Tensor, what: str) -> int:
    """Every element of `y` equal to `ref`'s or one model-dtype step from it (float32
    contraction order in the rotation: rare); returns how many differ."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[ref.dtype]
    r = ref.float()
    step = torch.exp2(torch.floor(torch.log2(r.abs().clamp_min(2.0 ** -14))) - mant)
    diff = (y.float() - r).abs()
    assert not y.isnan().any() and bool((diff <= step).all()), (what, float(diff.max()))
    return int((diff > 0).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,k", [(32, 8, 128, 4096), (8, 2, 64, 2048)])
def test_rotary_output_matches_gemv_then_rotary_kernel_gpu(dtype: torch.dtype, hq: int,
                                                           hkv: int, d: int, k: int) -> None:
    """The q | k | v GEMM with rotary and the cache write in its epilogue against the GEMV
    followed by `rotary_and_cache_triton`: the row and the cache row agree to one model-dtype
    step (the rotation's float32 contraction order), nothing else in the pool (a view of a
    [layers, 2, blocks, bs, Hkv, D] tensor) moves, slot -1 writes no cache, positions and
    slots int32 or int64, with and without a bias."""
    from trtdist.kernels.fp8_quant import quantize_activation_triton
    from trtdist.kernels.rotary import RotaryCacheWrite, cos_sin_table, rotary_and_cache_triton

    dev = _hopper()
    torch.manual_seed(d + k)
    n = (hq + 2 * hkv) * d
    w, ws = quantize_weight_per_channel(torch.randn(n, k, device=dev) * 0.02)
    x = (torch.randn(1, k, device=dev) * 2).to(dtype)
    xq, xs = quantize_activation_triton(x, None)
    bias = (torch.randn(n, device=dev) * 0.1).to(dtype)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, d, 2, device=dev).float() / d)
    cos_sin = cos_sin_table(inv_freq, 4096)
    pool = torch.randn(2, 2, 9, 16, hkv, d, device=dev).to(dtype)
    differing = 0
    for pos_t, slot_t, position, slot, b in ((torch.int32, torch.int64, 1000, 37, None),
                                             (torch.int64, torch.int32, 3, 5, bias),
                                             (torch.int32, torch.int64, 4095, -1, bias)):
        positions = torch.tensor([position], dtype=pos_t, device=dev)
        slots = torch.tensor([slot], dtype=slot_t, device=dev)
        ref, ref_pool = torch.empty(1, n, device=dev, dtype=dtype), pool.clone()
        stream.fp8_gemv_stream(xq, xs.reshape(1), 0, w, ws, b, ref)
        rotary_and_cache_triton(ref, positions, cos_sin, hq, hkv, d, ref_pool[1, 0],
                                ref_pool[1, 1], slots)
        out, before = torch.full((1, n), float("nan"), device=dev, dtype=dtype), pool.clone()
        rope = RotaryCacheWrite(positions, slots, cos_sin, hq, hkv, d, pool[1, 0], pool[1, 1])
        stream.fp8_gemv_stream_rotary(xq, xs.reshape(1), 0, w, ws, b, out, rope)
        what = f"{dtype} position {position} slot {slot}"
        differing += _within_one_step(out, ref, what)
        differing += _within_one_step(pool, ref_pool, what + " cache")
        moved = (pool != before).flatten(0, 3).any(-1).any(-1).view(2, 2, 9, 16)
        if slot < 0:
            assert not moved.any(), what
        else:  # only the slot's k and v rows of layer 1
            assert moved[1, :, slot // 16, slot % 16].all() and int(moved.sum()) == 2, what
    assert differing <= 0.01 * 3 * (n + 2 * hkv * d), differing
    with pytest.raises(ValueError, match="RotaryCacheWrite"):
        stream.fp8_gemv_stream_rotary(xq, xs.reshape(1), 0, w[:-16], ws[:-16], None,
                                      out[:, :-16], rope)


def _twin_error(stage, cfg, seq_len: int, monkeypatch: pytest.MonkeyPatch,
                fused: bool) -> tuple[float, torch.Tensor]:
    """A one-token decode of the FP8 stage, against its twin with dequantized weights."""
    from test_fp8_decode_step import _dequantized_twin, _kv, _rel, _run

    monkeypatch.setenv(stream.ENV, "1" if fused else "0")
    kv_a, inputs, pos = _kv(stage, cfg, seq_len)
    kv_c = [type(x)(x.k.clone(), x.v.clone()) for x in kv_a]
    out = _run(stage, kv_a, inputs, pos, 11, use_step=False)
    twin = _dequantized_twin(stage, cfg)
    ctx = twin.context(pos, inputs.slot_mapping, twin.attention_backend.prepare(inputs))
    ref = twin(torch.tensor([11], device=stage.device), kv_c, ctx)
    return _rel(out, ref), out


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["0", "norm", "1", "gated", "rotary"])
@pytest.mark.parametrize("seq_len", [1, 129, 2000])
def test_stage_with_fused_inputs_gpu(seq_len: int, fused: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Llama stage whose one-token GEMMs stream (and, `fused`, compute their norms and SiLU
    x up themselves, or SiLU x up / rotary + cache write in their epilogues) is as close to
    the model with dequantized weights as the stage with the shipped kernels."""
    from test_fp8_decode_step import _stage

    dev = _hopper()
    stage, cfg = _stage(dev)
    monkeypatch.setenv(stream.ENV, "1")
    monkeypatch.setenv(stream.GATED_ENV, "1" if fused == "gated" else "0")
    monkeypatch.setenv(stream.ROTARY_ENV, "1" if fused == "rotary" else "0")
    fused = "0" if fused in ("gated", "rotary") else fused
    monkeypatch.setenv(stream.FUSED_ENV, fused)
    assert all(layer.fuses_one_token() == (fused != "0") for layer in stage.layers.values())
    mlp, attn = stage.layers["0"].mlp, stage.layers["0"].attn
    assert mlp.gate_up.wants_gated_output(1) == (os.environ[stream.GATED_ENV] == "1")
    assert attn.qkv.wants_rotary_output(1, 128) == (os.environ[stream.ROTARY_ENV] == "1")
    assert mlp.down.wants_row_amax(1) == (fused == "0")  # streaming: amax at any shape
    err_loop, loop = _twin_error(stage, cfg, seq_len, monkeypatch, fused=False)
    err_fused, out = _twin_error(stage, cfg, seq_len, monkeypatch, fused=True)
    print(f"seq_len {seq_len}: separate kernels {err_loop:.4f} fused inputs {err_fused:.4f}")
    assert not out.isnan().any()
    assert err_fused < 1.25 * err_loop + 2e-3, (err_loop, err_fused)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", ["1", "0"])
def test_stage_with_fused_inputs_in_a_graph_gpu(fused: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager and CUDA-graph replays give the same bits (each CTA reduces the row in a fixed
    order; the residual pair is the stage's own); "0": the separate norms, with the gated
    and rotary epilogues (the defaults)."""
    from test_fp8_decode_step import _kv, _stage

    dev = _hopper()
    monkeypatch.setenv(stream.ENV, "1")
    monkeypatch.setenv(stream.FUSED_ENV, fused)
    monkeypatch.delenv(stream.GATED_ENV, raising=False)
    monkeypatch.delenv(stream.ROTARY_ENV, raising=False)
    stage, cfg = _stage(dev, layers=3)
    stage._decode_step = False
    kv, inputs, pos = _kv(stage, cfg, 300)
    ids = torch.tensor([5], device=dev)
    ctx = stage.context(pos, inputs.slot_mapping, stage.attention_backend.prepare(inputs))
    first = stage(ids, kv, ctx).clone()
    assert torch.equal(stage(ids, kv, ctx), first)
    ctx = stage.context(pos, inputs.slot_mapping,
                        stage.attention_backend.prepare_for_capture(inputs))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        out = stage(ids, kv, ctx)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, first)
