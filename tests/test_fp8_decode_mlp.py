"""The one-launch FP8 decode MLP (`kernels/fp8_decode_mlp.py`: o projection + residual,
RMSNorm + quantize, gate | up + SiLU x up, down, in one persistent CUDA kernel) against the
torch reference, its grid barriers over repeated launches and CUDA-graph replays, and an FP8
stage's decode step with it on and off. Launch selection and input checks run on CPU."""

from __future__ import annotations

import pytest
import torch
from trtdist.kernels import cuda_jit
from trtdist.kernels import fp8_decode_mlp as dm
from trtdist.kernels.fp8_decode_mlp import DecodeMlpConfig, DecodeMlpScratch
from trtdist.parallel.quant_fp8 import quantize_weight_per_channel


def test_launch_selection() -> None:
    # llama3-8b on an H200's 132 SMs: 8 consumer warps x 2 steps, stages of 2 KB of K
    cfg = dm.config_for(4096, 4096, 14336, 132)
    assert cfg == DecodeMlpConfig(8, 2, 6)
    assert dm.shared_bytes(4096, 4096, 14336, 132, cfg) <= 227 * 1024
    assert dm.config_for(2048, 2048, 5632, 132) == DecodeMlpConfig(4, 1, 12)  # 11 x 512
    assert dm.config_for(576, 576, 1536, 132) is None  # SmolLM2: 576 is not 128 x warps
    # too many tiles a CTA for an SM's shared memory on a tiny GPU
    assert dm.config_for(4096, 4096, 14336, 2) is None
    assert not dm.fits(4096, 4096, 14336, 132, DecodeMlpConfig(16, 2, 4))  # 4 KB stages
    with pytest.raises(ValueError, match="nwarps"):
        DecodeMlpConfig(12, 1, 4)
    with pytest.raises(ValueError, match="steps"):
        DecodeMlpConfig(8, 5, 4)


def test_not_taken_on_cpu_or_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not dm.supports(4096, 4096, 14336, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setenv(dm.ENV, "0")
    assert not dm.supports(4096, 4096, 14336, torch.bfloat16, torch.device("cuda"))


def test_env_config_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("16", "8,1", "8,1,x"):
        monkeypatch.setenv(dm.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match="NWARPS,STEPS,STAGES"):
            dm._env_config()
    monkeypatch.setenv(dm.CONFIG_ENV, "4,2,8")
    assert dm._env_config() == DecodeMlpConfig(4, 2, 8)


def _layer(hidden: int, q: int, inter: int, dtype: torch.dtype, device: str,
           seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)

    def weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_weight_per_channel(
            torch.randn(n, k, generator=g, device=device) * k ** -0.5)

    wo, wo_s = weight(hidden, q)
    wgu, wgu_s = weight(2 * inter, hidden)
    wd, wd_s = weight(hidden, inter)
    return dict(attn=torch.randn(1, q, generator=g, device=device).to(dtype),
                residual=(torch.randn(1, hidden, generator=g, device=device) * 4).to(dtype),
                norm_weight=(1 + 0.2 * torch.randn(hidden, generator=g, device=device)).to(dtype),
                wo=wo, wo_scale=wo_s, wgu=wgu, wgu_scale=wgu_s, wd=wd, wd_scale=wd_s)


def test_bad_input_is_refused_before_launch() -> None:
    t = _layer(256, 256, 512, torch.bfloat16, "cpu")
    scratch = DecodeMlpScratch(512, torch.bfloat16, torch.device("cpu"))
    amax = torch.zeros(1)
    args = dict(t, attn_amax=amax, eps=1e-5, scratch=scratch)
    with pytest.raises(ValueError, match="attn must be contiguous"):
        dm.fp8_decode_mlp(**(args | {"attn": t["attn"].float()}))
    with pytest.raises(ValueError, match="wgu must be"):
        dm.fp8_decode_mlp(**(args | {"wgu": t["wgu"][:256]}))
    with pytest.raises(ValueError, match="scratch is for I = 64"):
        dm.fp8_decode_mlp(**(args | {"scratch": DecodeMlpScratch(64, torch.bfloat16,
                                                                   torch.device("cpu"))}))
    with pytest.raises(ValueError, match="attn_amax"):
        dm.fp8_decode_mlp(**(args | {"attn_amax": torch.zeros(1, dtype=torch.float64)}))


# ---- GPU ---------------------------------------------------------------------------------
def _need() -> torch.device:
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 MMA needs compute capability >= 8.9")
    if not cuda_jit.available(dev):
        pytest.skip("cuda.bindings / NVRTC not installed")
    return dev


def _run(t: dict[str, torch.Tensor], scratch: DecodeMlpScratch,
         config: DecodeMlpConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch on copies of the inputs -> (out, new residual)."""
    residual = t["residual"].clone()
    amax = t["attn"].float().abs().amax().reshape(1)
    out = dm.fp8_decode_mlp(t["attn"], amax, t["wo"], t["wo_scale"], residual, t["norm_weight"],
                            1e-5, t["wgu"], t["wgu_scale"], t["wd"], t["wd_scale"], scratch,
                            config=config)
    return out, residual


def _reference(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return dm.fp8_decode_mlp_torch(t["attn"], t["wo"], t["wo_scale"], t["residual"],
                                   t["norm_weight"], 1e-5, t["wgu"], t["wgu_scale"], t["wd"],
                                   t["wd_scale"])


def _assert_close(y: torch.Tensor, ref: torch.Tensor, what: str, rel: float) -> None:
    """Within `rel` of the reference in norm and 4 `rel` of its largest value anywhere. The
    kernel rounds as the separate kernels do, but its float32 sums run in another order (and
    the MMA keeps ~14 bits within each 32 products), so a model-dtype rounding can go the
    other way; where that moves a row's amax, every E4M3 code of the row moves (noise of a
    few percent: E4M3 keeps 3 mantissa bits). A wrong tile or scale is far outside this."""
    y, ref = y.float(), ref.float()
    assert not y.isnan().any(), what
    err = (y - ref).norm() / ref.norm()
    worst = (y - ref).abs().max() / ref.abs().max()
    assert err < rel and worst < 4 * rel, f"{what}: relative error {err:.2e}, worst {worst:.2e}"


SHAPES = [(4096, 4096, 14336), (2048, 2048, 5632), (1024, 2048, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,q,inter", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_the_reference_gpu(hidden: int, q: int, inter: int, dtype: torch.dtype) -> None:
    """Each stage against the reference: the residual closely; gate | up and the output
    within E4M3 noise (when a model-dtype rounding moves a row's amax, every code of that
    row moves); the output also against the reference down projection of the kernel's own
    gate | up row."""
    from trtdist.kernels.fp8_fused import rms_norm_quant_torch, silu_and_mul_quant_torch
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch
    from trtdist.kernels.fp8_quant import quantize_activation_torch

    dev = _need()
    t = _layer(hidden, q, inter, dtype, "cuda", seed=hidden + inter)
    scratch = DecodeMlpScratch(inter, dtype, dev)
    out, residual = _run(t, scratch)
    ref_out, ref_res = _reference(t)
    _assert_close(residual, ref_res, "residual", rel=2e-3)
    xq, xs = quantize_activation_torch(t["attn"], None)
    o = fp8_gemm_torch(xq, xs, t["wo"], t["wo_scale"], None, dtype)
    xq, xs, _ = rms_norm_quant_torch(o, t["residual"], t["norm_weight"], 1e-5, None)
    ref_gu = fp8_gemm_torch(xq, xs, t["wgu"], t["wgu_scale"], None, dtype)
    gu = scratch.gu.view(1, -1)
    _assert_close(gu, ref_gu, "gate | up", rel=6e-2)
    xq, xs = silu_and_mul_quant_torch(gu, None)
    _assert_close(out, fp8_gemm_torch(xq, xs, t["wd"], t["wd_scale"], None, dtype),
                  "down of the kernel's gate | up", rel=2e-2)
    _assert_close(out, ref_out, "out", rel=6e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [DecodeMlpConfig(8, 1, 4), DecodeMlpConfig(8, 1, 11),
                                 DecodeMlpConfig(4, 2, 8), DecodeMlpConfig(16, 1, 5),
                                 DecodeMlpConfig(4, 1, 12)])
def test_launch_configs_gpu(cfg: DecodeMlpConfig) -> None:
    dev = _need()
    t = _layer(4096, 4096, 14336, torch.bfloat16, "cuda", seed=7)
    out, _ = _run(t, DecodeMlpScratch(14336, torch.bfloat16, dev), cfg)
    _assert_close(out, _reference(t)[0], f"{cfg}", rel=6e-2)


@pytest.mark.gpu
def test_repeated_launches_and_graph_replay_gpu() -> None:
    """The barrier counter only grows (2 x CTAs a launch) and every launch and replay
    gives the same numbers for the same input."""
    dev = _need()
    hidden, inter = 4096, 14336
    t = _layer(hidden, hidden, inter, torch.bfloat16, "cuda", seed=3)
    scratch = DecodeMlpScratch(inter, torch.bfloat16, dev)
    ctas = torch.cuda.get_device_properties(dev).multi_processor_count
    first = _run(t, scratch)
    for i in range(2, 5):
        again = _run(t, scratch)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert scratch.counter.tolist() == [2 * ctas * i, 0]
    attn, residual = t["attn"].clone(), t["residual"].clone()
    amax = torch.zeros(1, device=dev)
    start = torch.empty_like(residual)

    def step() -> torch.Tensor:
        residual.copy_(start)
        amax.copy_(attn.float().abs().amax().reshape(1))
        return dm.fp8_decode_mlp(attn, amax, t["wo"], t["wo_scale"], residual,
                                 t["norm_weight"], 1e-5, t["wgu"], t["wgu_scale"], t["wd"],
                                 t["wd_scale"], scratch)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (1, 2, 1):
        g = torch.Generator(device="cuda").manual_seed(seed)
        attn.copy_(torch.randn(attn.shape, generator=g, device=dev))
        start.copy_(torch.randn(residual.shape, generator=g, device=dev) * 4)
        out.fill_(float("nan"))
        graph.replay()
        case = t | {"attn": attn, "residual": start}
        ref_out, ref_res = _reference(case)
        _assert_close(residual, ref_res, f"residual, seed {seed}", rel=2e-3)
        _assert_close(out, ref_out, f"out, seed {seed}", rel=6e-2)
        if seed == 2:
            kept = out.clone()
    assert not torch.equal(out, kept)  # the last replay's input differs from the second's


@pytest.mark.gpu
def test_fp8_stage_decode_step_with_and_without_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-layer FP8 stage's one-token decode step runs o .. down as one launch when the
    shape fits, and gives the separate kernels' result within the rounding slack."""
    _need()
    from test_fp8_fused import _OneRank
    from trtdist.kernels.attention import AttentionInputs, LayerKV
    from trtdist.kernels.triton_attention import TritonAttentionBackend
    from trtdist.parallel.linear_methods import Fp8LinearMethod
    from trtdist.parallel.mapping import Mapping

    from trtdist.config import ModelConfig
    from trtdist.models.llama import LlamaStage

    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=1024,
                      intermediate_size=2048, num_layers=2, num_heads=8, num_kv_heads=4,
                      head_dim=128, max_position_embeddings=256, sliding_windows=(None, None))
    dev = torch.device("cuda")
    outs = []
    for on in ("1", "0"):
        monkeypatch.setenv(dm.ENV, on)
        stage = LlamaStage(cfg, Mapping(), range(2), _OneRank(), torch.bfloat16, dev,
                           Fp8LinearMethod("dynamic"))
        assert (stage.decode_mlp is not None) == (on == "1")
        stage.attention_backend = TritonAttentionBackend()
        gen = torch.Generator(device="cuda").manual_seed(0)
        for p in stage.parameters():
            if p.dtype == torch.bfloat16:
                p.data.normal_(0.0, 0.5, generator=gen)
        for module in stage.modules():
            if isinstance(getattr(module, "method", None), Fp8LinearMethod):
                module.method.dummy_fill(module, gen)
                module.weight_scale.data *= 2.0
        bs, width = 16, 4
        g = torch.Generator(device="cuda").manual_seed(1)
        kv = [LayerKV(*(torch.randn(width + 1, bs, 4, 128, generator=g, device=dev)
                        .to(torch.bfloat16) for _ in range(2))) for _ in range(2)]
        seq_lens = torch.tensor([37], dtype=torch.int32, device=dev)
        tables = torch.arange(width, dtype=torch.int32, device=dev).view(1, width) + 1
        last = seq_lens.long() - 1
        slots = tables.long().gather(1, (last // bs)[:, None])[:, 0] * bs + last % bs
        inputs = AttentionInputs(
            query_start_loc=torch.arange(2, dtype=torch.int32, device=dev), seq_lens=seq_lens,
            block_tables=tables, slot_mapping=slots, block_size=bs, max_query_len=1,
            max_seq_len=bs * width, is_decode=True)
        ctx = stage.context(last, slots, stage.attention_backend.prepare(inputs))
        assert (ctx.decode_mlp is not None) == (on == "1")
        outs.append(stage(torch.tensor([5], device=dev), kv, ctx))
    _assert_close(outs[0], outs[1], "stage output", rel=6e-2)
