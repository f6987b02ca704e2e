"""The row-amax handoff of FP8 per-token activations: the kernel that produces an activation
(SiLU x up, the decode attention) maxes each row's max |value| into a slot, and the small-M
FP8 GEMM quantizes the model-dtype rows itself from it (`kernels/fp8_gemm.py` X_MODE 1; with
a static scale, X_MODE 2). Every path must give the numbers of quantizing first
(`quantize_activation`) and then multiplying.

On CPU the kernels run in Triton's interpreter; the `gpu` tests compare a whole FP8 decoder
layer and a CUDA-graph decode step with the handoff on and off.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_triton_attention import Case
from trtdist.kernels.activation import silu_and_mul_torch, silu_and_mul_triton
from trtdist.kernels.attention import TorchAttentionBackend
from trtdist.kernels.fp8_fused import rms_norm_quant_triton
from trtdist.kernels.fp8_gemm import (
    fp8_gemm_small_m,
    fp8_gemm_small_m_quantizing,
    fp8_gemm_torch,
    fp8_linear_small_m,
)
from trtdist.kernels.fp8_gemm_configs import Fp8GemmConfig
from trtdist.kernels.fp8_quant import quantize_activation_triton
from trtdist.kernels.triton_attention import TritonAttentionBackend
from trtdist.parallel.quant_fp8 import (
    quantize_activation,
    quantize_rows_to_fp8,
    quantize_weight_per_channel,
    scale_from_amax,
)

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
CONFIGS = [
    Fp8GemmConfig("gemv", 1, 2, 64, 1, 4, 1, True, False, False),
    Fp8GemmConfig("gemv", 4, 4, 64, 1, 4, 1, False, True, True),
    Fp8GemmConfig("gemv", 2, 4, 64, 2, 4, 1, True, True, False),  # split-K with the fixup
    Fp8GemmConfig("dot", 16, 32, 64, 2, 4, 2),
    Fp8GemmConfig("dot_swap", 16, 32, 64, 1, 4, 2),
]


def test_activation_quantization_multiplies_by_the_reciprocal() -> None:
    """The formula every kernel follows: x * (1 / scale), the reciprocal correctly rounded.
    A division per element differs from it on some values (which is why this is pinned)."""
    torch.manual_seed(0)
    x = torch.randn(64, 1024) * 7
    q, s = quantize_activation(x, None)
    torch.testing.assert_close(s, scale_from_amax(x.abs().amax(-1, keepdim=True)), rtol=0, atol=0)
    inv = 1.0 / s
    want = (x * inv).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(quantize_rows_to_fp8(x, s).view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-bm{c.block_m}-s{c.split_k}")
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("static", [False, True])
def test_gemm_quantizing_equals_quantize_then_gemm(cfg: Fp8GemmConfig, m: int,
                                                   dtype: torch.dtype, static: bool) -> None:
    """Quantizing inside the GEMM gives bit-for-bit the GEMM of the pre-quantized rows."""
    if m > cfg.block_m:
        pytest.skip("config holds fewer rows")
    torch.manual_seed(m)
    x = (torch.randn(m, 256) * 3).to(dtype).to(DEV)
    w, ws = (t.to(DEV) for t in quantize_weight_per_channel(torch.randn(48, 256)))
    bias = torch.randn(48).to(dtype).to(DEV)
    s_in = torch.tensor([0.004], device=DEV) if static else None  # some values saturate
    # NOTE: the Triton quantize kernel (the launch the handoff replaces): on CUDA, torch's
    # reference divides the amax by 448 as a multiply by 1/448, one ulp off at times.
    xq, xs = quantize_activation_triton(x, s_in)
    amax = torch.full((16,), math.nan, device=DEV)  # only the first m are read
    amax[:m] = x.float().abs().amax(-1)
    got = fp8_gemm_small_m_quantizing(x, None if static else amax, s_in, w, ws, bias,
                                      config=cfg)
    want = fp8_gemm_small_m(xq, xs, w, ws, bias, dtype, config=cfg)
    assert got.dtype == dtype and torch.equal(got, want)
    ref = fp8_gemm_torch(xq, xs, w, ws, bias, dtype)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-3, atol=1e-3)
    if static:  # fp8_linear_small_m: this one launch (given a tile), or quantize + GEMM
        assert torch.equal(fp8_linear_small_m(x, w, ws, s_in, bias, config=cfg), want)
        assert torch.equal(fp8_linear_small_m(x, w, ws, s_in, bias), fp8_gemm_small_m(
            xq, xs, w, ws, bias, dtype))


def test_gemm_quantizing_rejects_bad_input() -> None:
    x = torch.randn(2, 64, device=DEV)
    w, ws = (t.to(DEV) for t in quantize_weight_per_channel(torch.randn(32, 64)))
    amax = torch.ones(16, device=DEV)
    with pytest.raises(ValueError, match="exactly one of row_amax"):
        fp8_gemm_small_m_quantizing(x, amax, torch.ones(1, device=DEV), w, ws, None)
    with pytest.raises(ValueError, match="exactly one of row_amax"):
        fp8_gemm_small_m_quantizing(x, None, None, w, ws, None)
    with pytest.raises(ValueError, match="row_amax must hold >= 2"):
        fp8_gemm_small_m_quantizing(x, amax[:1], None, w, ws, None)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        fp8_gemm_small_m_quantizing(x.to(torch.float8_e4m3fn), amax, None, w, ws, None)


@pytest.mark.parametrize("rows,inter", [(1, 200), (3, 1100)])
def test_silu_row_amax(rows: int, inter: int) -> None:
    """The output is unchanged, and each row's amax (of the stored values) is maxed in."""
    torch.manual_seed(rows)
    x = torch.randn(rows, 2 * inter, dtype=torch.float16, device=DEV) * 4
    plain = silu_and_mul_triton(x)
    amax = torch.zeros(8, device=DEV)
    amax[rows:] = 7.0  # past the rows: untouched
    amax[0] = 1e6  # a larger value already there stays (max, not store)
    got = silu_and_mul_triton(x, row_amax=amax)
    assert torch.equal(got, plain)
    want = plain.float().abs().amax(-1)
    want[0] = 1e6
    assert torch.equal(amax[:rows], want) and bool((amax[rows:] == 7.0).all())


def test_silu_row_amax_rejects_bad_slots() -> None:
    x = torch.randn(3, 64, device=DEV)
    with pytest.raises(ValueError, match="row_amax must be a contiguous float32"):
        silu_and_mul_triton(x, row_amax=torch.zeros(2, device=DEV))
    with pytest.raises(ValueError, match="row_amax must be a contiguous float32"):
        silu_and_mul_triton(x, row_amax=torch.zeros(4, dtype=torch.float16, device=DEV))


def test_norm_quant_clears_the_slots() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 256, device=DEV)
    weight = torch.rand(256, device=DEV)
    slots = torch.full((8,), 5.0, device=DEV)
    q, s, _ = rms_norm_quant_triton(x, None, weight, 1e-5, None, clear=slots)
    q2, s2, _ = rms_norm_quant_triton(x, None, weight, 1e-5, None)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    assert slots[:3].tolist() == [0.0] * 3 and slots[3:].tolist() == [5.0] * 5
    with pytest.raises(ValueError, match="clear must be a contiguous float32"):
        rms_norm_quant_triton(x, None, weight, 1e-5, None, clear=slots[:2])


@pytest.mark.parametrize("target", [1, 10_000])  # one slice (no merge) / split + merge
def test_decode_attention_row_amax(target: int) -> None:
    """Decode maxes each output row's amax in the partial kernel (one slice) or the merge."""
    case = Case([37, 0, 90], [1, 1, 1], hq=4, hkv=2, d=16, bs=8)
    backend = TritonAttentionBackend(target_programs=target)
    meta = backend.prepare(case.inputs())
    q, k, v, kc, vc = (case.dev(t) for t in (case.q, case.k, case.v, case.k_cache,
                                             case.v_cache))
    amax = torch.zeros(4, device=DEV)
    amax[3] = 9.0
    out = backend.forward(q, k, v, kc, vc, meta, 0.25, None, row_amax=amax)
    plain = backend.forward(q, k, v, kc, vc, meta, 0.25, None)
    assert torch.equal(out, plain)
    want = out.reshape(3, -1).abs().amax(-1)
    assert torch.equal(amax[:3], want) and amax[1].item() == 0.0 and amax[3].item() == 9.0


def test_prefill_and_torch_backend_row_amax() -> None:
    """Prefill (Triton) and the torch backend take the amax with torch ops: same contract."""
    case = Case([20, 9], [5, 9], hq=4, hkv=2, d=16, bs=8)
    q, k, v, kc, vc = (case.dev(t) for t in (case.q, case.k, case.v, case.k_cache,
                                             case.v_cache))
    backend = TritonAttentionBackend()
    amax = torch.zeros(16, device=DEV)
    out = backend.forward(q, k, v, kc, vc, backend.prepare(case.inputs()), 0.25, None,
                          row_amax=amax)
    assert torch.equal(amax[:14], out.reshape(14, -1).abs().amax(-1).float())
    assert bool((amax[14:] == 0).all())
    torch_backend = TorchAttentionBackend()
    inputs = case.inputs()
    from dataclasses import replace

    inputs = replace(inputs, query_lens_host=tuple(case.q_lens),
                     seq_lens_host=tuple(case.ctx_lens))
    amax.zero_()
    ref = torch_backend.forward(q, k, v, kc, vc, torch_backend.prepare(inputs), 0.25, None,
                                row_amax=amax)
    assert torch.equal(amax[:14], ref.reshape(14, -1).abs().amax(-1).float())
    with pytest.raises(ValueError, match="row_amax must be a contiguous float32"):
        backend.forward(q, k, v, kc, vc, backend.prepare(case.inputs()), 0.25, None,
                        row_amax=amax[:3])


def test_silu_reference_dispatch_row_amax() -> None:
    """`silu_and_mul` off CUDA keeps the contract (torch ops)."""
    from trtdist.kernels.activation import silu_and_mul

    x = torch.randn(2, 64)
    amax = torch.zeros(4)
    y = silu_and_mul(x, row_amax=amax)
    assert torch.equal(y, silu_and_mul_torch(x))
    assert torch.equal(amax[:2], y.abs().amax(-1)) and bool((amax[2:] == 0).all())


# ---- a whole stage ------------------------------------------------------------------------
def _fp8_stage(monkeypatch: pytest.MonkeyPatch, amax_on: bool, dtype: torch.dtype):
    """A two-layer FP8 (per token) LlamaStage with random weights (the same every call). On
    CPU the Triton paths are forced on (they run in the interpreter)."""
    from test_fp8_fused import _OneRank
    from trtdist.parallel.linear_methods import Fp8LinearMethod
    from trtdist.parallel.mapping import Mapping

    from trtdist.config import ModelConfig
    from trtdist.models.llama import ROW_AMAX_ROWS, LlamaStage

    monkeypatch.setenv("TRTDIST_FP8_ROW_AMAX", "1" if amax_on else "0")
    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=256, sliding_windows=(None, None))
    device = torch.device(DEV)
    stage = LlamaStage(cfg, Mapping(), range(2), _OneRank(), dtype, device,
                       Fp8LinearMethod("dynamic"))
    stage.attention_backend = TritonAttentionBackend()
    gen = torch.Generator(device=DEV).manual_seed(0)
    for p in stage.parameters():
        if p.dtype == dtype:
            p.data.normal_(0.0, 0.5, generator=gen)
    for module in stage.modules():
        if isinstance(getattr(module, "method", None), Fp8LinearMethod):
            module.method.dummy_fill(module, gen)
            module.weight_scale.data *= 25.0  # weights of about +-0.5, as the others
            if not CUDA:
                module.use_scaled_mm = True  # the Triton path, in the interpreter
    if not CUDA and amax_on:
        stage.row_amax = torch.zeros(ROW_AMAX_ROWS)
    return stage, cfg


def _decode_step(stage, cfg, rows: int) -> torch.Tensor:
    from trtdist.kernels.attention import AttentionInputs, LayerKV

    bs, width = 16, 4
    g = torch.Generator(device=DEV).manual_seed(1)
    kv = [LayerKV(*(torch.randn(rows * width + 1, bs, 2, 16, generator=g, device=DEV)
                    .to(stage.dtype) for _ in range(2))) for _ in range(2)]
    seq_lens = torch.tensor([5 + 3 * i for i in range(rows)], dtype=torch.int32, device=DEV)
    tables = torch.arange(rows * width, dtype=torch.int32, device=DEV).view(rows, width) + 1
    last = seq_lens.long() - 1
    slots = tables.long().gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
    inputs = AttentionInputs(
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32, device=DEV),
        seq_lens=seq_lens, block_tables=tables, slot_mapping=slots, block_size=bs,
        max_query_len=1, max_seq_len=bs * width, is_decode=True)
    ctx = stage.context(last, slots, stage.attention_backend.prepare(inputs))
    assert (ctx.row_amax is not None) == (stage.row_amax is not None and rows <= 16)
    ids = torch.arange(rows, device=DEV) * 7 % cfg.vocab_size
    return stage(ids, kv, ctx)


def _quantizing_tiles(monkeypatch: pytest.MonkeyPatch, which: tuple[str, ...]) -> None:
    """Give the stage's o ([64, 64]) and / or down ([64, 96]) shapes input-quantizing tiles
    for every small-M bucket (gemv at 1 row, tl.dot above), and the plain GEMM the same
    tiles (the same float32 summation order: only the quantization's place differs)."""
    from trtdist.kernels import fp8_gemm_configs as cfgs

    tiles = {1: Fp8GemmConfig("gemv", 1, 8, 64, 1, 4, 1),
             4: Fp8GemmConfig("gemv", 4, 4, 64, 1, 4, 1, False, True),
             16: Fp8GemmConfig("dot", 16, 32, 64, 1, 4, 2)}
    quantizing, plain = {}, dict(cfgs.CONFIGS)
    for name, (n, k) in (("o", (64, 64)), ("down", (64, 96))):
        for bucket, tile in tiles.items():
            plain[(bucket, n, k)] = tile
            if name in which:
                quantizing[(bucket, n, k)] = tile
    monkeypatch.setattr(cfgs, "QUANTIZING", quantizing)
    monkeypatch.setattr(cfgs, "CONFIGS", plain)


@pytest.mark.parametrize("which", [("o", "down"), ("down",), ()])
@pytest.mark.parametrize("rows", [1, 3] + ([16, 17] if CUDA else []))
def test_fp8_stage_decode_equal_with_and_without_the_handoff(
        rows: int, which: tuple[str, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step of an FP8 (per-token) stage: the handoff changes no bit of the output;
    it is in use at <= 16 rows for the shapes whose input-quantizing GEMM has a tile."""
    if CUDA and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need compute capability >= 8.9")
    _quantizing_tiles(monkeypatch, which)
    dtype = torch.bfloat16 if CUDA else torch.float32
    outs = []
    for on in (False, True):
        stage, cfg = _fp8_stage(monkeypatch, on, dtype)
        assert (stage.row_amax is not None) == on
        users = which if rows <= 16 else ()
        assert all(layer.row_amax_users(rows) == users for layer in stage.layers.values())
        outs.append(_decode_step(stage, cfg, rows))
    assert not outs[0].isnan().any()
    assert torch.equal(outs[0], outs[1])
