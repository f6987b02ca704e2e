"""The streaming one-token FP8 GEMV (`kernels/fp8_gemv_stream.py`) against the torch reference
in every input mode and launch config, its dispatch from the small-M GEMM, and chains of it
with row kernels that let it launch early (programmatic dependent launch), eager and in a CUDA
graph; its config validation on CPU."""

from __future__ import annotations

import pytest
import torch
from test_fp8_gemv_cuda import _abs_sum, _assert_close, _need
from trtdist.kernels import fp8_gemv_stream as stream
from trtdist.kernels.fp8_gemv_stream import StreamGemvConfig, smem_bytes
from trtdist.parallel.quant_fp8 import quantize_weight_per_channel


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
    monkeypatch.setenv(stream.CONFIG_ENV, "512:6:4")
    assert stream.default_config(4096) == StreamGemvConfig(kc=512, stages=6, nwarps=4)
    monkeypatch.setenv(stream.CONFIG_ENV, "1024:4:4, 14336=2048:6:4")
    assert stream.default_config(4096) == StreamGemvConfig(kc=1024, stages=4, nwarps=4)
    assert stream.default_config(14336) == StreamGemvConfig(kc=2048, stages=6, nwarps=4)
    monkeypatch.setenv(stream.CONFIG_ENV, "x=1024:4:4")
    with pytest.raises(ValueError, match="bad K"):
        stream.default_config(4096)
    monkeypatch.delenv(stream.CONFIG_ENV)
    assert stream.default_config(4096) == StreamGemvConfig()
    assert stream.default_config(4096 + 512) == StreamGemvConfig(kc=512, stages=12, nwarps=4)
    assert stream.default_config(4096 + 128) is None


def test_shared_memory_two_ctas_fit_an_sm() -> None:
    """llama3-8b's shapes leave room for a second CTA (the next kernel) on a 228 KB SM."""
    cfg = StreamGemvConfig(kc=1024, stages=4)
    for k, units in ((4096, 3), (4096, 14), (14336, 2)):
        assert 2 * (smem_bytes(cfg, k, units) + 1024) <= 228 * 1024, k


def test_off_by_default_and_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(stream.ENV, raising=False)
    assert not stream.enabled()
    monkeypatch.setenv(stream.ENV, "1")
    assert stream.enabled()
    assert not stream.supports(1, 4096, 4096, torch.bfloat16, torch.bfloat16,
                               torch.device("cpu"))


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
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch
    from trtdist.kernels.fp8_quant import quantize_activation_triton

    dev = _hopper()
    torch.manual_seed(n + k)
    w, ws = quantize_weight_per_channel(torch.randn(n, k, device=dev) * 0.02)
    x = (torch.randn(1, k, device=dev) * 3).to(dtype)
    x[0, : k // 3] = 0
    bias = torch.randn(n, device=dev, dtype=dtype)
    amax = torch.zeros(16, device=dev)
    amax[0] = x.float().abs().amax()
    static = (amax[:1] / 448 * 1.7).contiguous()
    for b in (None, bias):
        xq, xs = quantize_activation_triton(x, None)
        ref = fp8_gemm_torch(xq, xs, w, ws, b, dtype)
        for mode, xin, sc in ((0, xq, xs.reshape(1)), (1, x, amax)):
            out = torch.full((1, n), float("nan"), device=dev, dtype=dtype)
            stream.fp8_gemv_stream(xin, sc, mode, w, ws, b, out)
            _assert_close(out, ref, _abs_sum(xq, xs, w, ws, b), f"mode {mode} bias {b is not None}")
        xq2, xs2 = quantize_activation_triton(x, static)
        out = torch.full((1, n), float("nan"), device=dev, dtype=dtype)
        stream.fp8_gemv_stream(x, static, 2, w, ws, b, out)
        _assert_close(out, fp8_gemm_torch(xq2, xs2, w, ws, b, dtype),
                      _abs_sum(xq2, xs2, w, ws, b), f"static bias {b is not None}")


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
