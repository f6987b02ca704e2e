"""The one-launch batch-1 decode step (`kernels/fp8_decode_step.py`) against the stage's layer
loop (one kernel per op, itself tested against transformers) on the same weights and cache."""

from __future__ import annotations

import pytest
import torch
from trtdist.kernels.fp8_decode_step import (
    DecodeStep,
    DecodeStepConfig,
    _Shape,
    smem_bytes,
    unsupported_reason,
)

CUDA = torch.cuda.is_available()
HOPPER = CUDA and torch.cuda.get_device_capability() >= (9, 0)
gpu = pytest.mark.gpu


def _stage(device: torch.device, layers: int = 2, quant: bool = True):
    """A Llama stage (hidden 2048, 16 q / 4 KV heads of 128, intermediate 4096) with random
    weights of realistic size, FP8 per-token when `quant`."""
    from test_fp8_fused import _OneRank
    from trtdist.kernels.triton_attention import TritonAttentionBackend
    from trtdist.parallel.linear_methods import Fp8LinearMethod
    from trtdist.parallel.mapping import Mapping

    from trtdist.config import ModelConfig
    from trtdist.models.llama import LlamaStage

    cfg = ModelConfig(model_type="llama", vocab_size=256, hidden_size=2048,
                      intermediate_size=4096, num_layers=layers, num_heads=16, num_kv_heads=4,
                      head_dim=128, max_position_embeddings=4096,
                      sliding_windows=(None,) * layers)
    stage = LlamaStage(cfg, Mapping(), range(layers), _OneRank(), torch.bfloat16, device,
                       Fp8LinearMethod("dynamic") if quant else None)
    if device.type == "cuda":
        stage.attention_backend = TritonAttentionBackend()
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in stage.named_parameters():
        if p.dtype == torch.bfloat16:
            if "norm" in name:
                p.data.normal_(1.0, 0.2, generator=gen)
            else:
                p.data.normal_(0.0, 1.0, generator=gen)
    for module in stage.modules():
        if isinstance(getattr(module, "method", None), Fp8LinearMethod):
            module.method.dummy_fill(module, gen)
    return stage, cfg


def test_not_built_on_cpu() -> None:
    stage, _ = _stage(torch.device("cpu"), layers=1)
    assert unsupported_reason(stage) == "needs CUDA with cuda.bindings"
    assert DecodeStep.build(stage) is None


def test_shared_memory_fits_llama3_8b() -> None:
    """The ring of llama3-8b's default launch fits an H100 / H200 SM with 11 stages."""
    shape = _Shape(4096, 14336, 32, 8, 128)
    assert smem_bytes(shape, DecodeStepConfig(kc=1024), 11, 16) <= 227 * 1024
    assert smem_bytes(shape, DecodeStepConfig(kc=1024), 12, 16) > 227 * 1024
    assert smem_bytes(shape, DecodeStepConfig(), 6, 16) <= 227 * 1024


def _need() -> torch.device:
    if not HOPPER:
        pytest.skip("needs a compute capability 9.0 GPU")
    return torch.device("cuda")


def _kv(stage, cfg, seq_len: int, bs: int = 16, seed: int = 1):
    """Random caches holding `seq_len - 1` keys in scattered blocks, and the step's inputs."""
    from trtdist.kernels.attention import AttentionInputs, LayerKV

    dev = stage.device
    width = -(-4096 // bs)
    g = torch.Generator(device=dev).manual_seed(seed)
    blocks = width + 1
    kv = [LayerKV(*(torch.randn(blocks, bs, cfg.num_kv_heads, cfg.head_dim, generator=g,
                                device=dev).to(torch.bfloat16) for _ in range(2)))
          for _ in range(cfg.num_layers)]
    table = (torch.randperm(width, generator=g, device=dev) + 1).to(torch.int32)[None, :]
    last = seq_len - 1
    slot = table[0, last // bs].long() * bs + last % bs
    inputs = AttentionInputs(
        query_start_loc=torch.arange(2, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32, device=dev), block_tables=table,
        slot_mapping=slot.view(1), block_size=bs, max_query_len=1, max_seq_len=bs * width,
        is_decode=True)
    return kv, inputs, torch.tensor([last], device=dev)


def _run(stage, kv, inputs, positions, token: int, use_step: bool) -> torch.Tensor:
    if not use_step:
        stage._decode_step = False
    elif not stage._decode_step:
        stage._decode_step = DecodeStep(stage)
    ctx = stage.context(positions, inputs.slot_mapping, stage.attention_backend.prepare(inputs))
    out = stage(torch.tensor([token], device=stage.device), kv, ctx)
    assert (stage.decode_step() is not None) == use_step
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _dequantized_twin(stage, cfg):
    """The same model in bfloat16 with the FP8 weights dequantized: the reference both FP8
    paths approximate (their error is the per-token activation quantization)."""
    twin, _ = _stage(stage.device, cfg.num_layers, quant=False)
    params = dict(stage.named_parameters())
    for name, p in twin.named_parameters():
        src = params[name]
        if src.dtype == torch.float8_e4m3fn:
            scale = params[name.replace("weight", "weight_scale")]
            p.data.copy_(src.float() * scale[:, None])
        else:
            p.data.copy_(src)
    return twin


@gpu
@pytest.mark.parametrize("seq_len", [1, 7, 129, 700, 4000])
def test_step_equals_the_layer_loop_gpu(seq_len: int) -> None:
    """Against the model with dequantized weights and unquantized activations, the step is
    as close as the layer loop (both quantize activations per token; their sums run in
    other orders, so E4M3 codes near a rounding boundary may differ); the cache row written
    agrees to the model dtype's rounding and nothing else in the cache moves. The lengths
    cover one key, one partition, several, and the most partitions."""
    dev = _need()
    stage, cfg = _stage(dev)
    kv_a, inputs, pos = _kv(stage, cfg, seq_len)
    kv_b = [type(x)(x.k.clone(), x.v.clone()) for x in kv_a]
    kv_c = [type(x)(x.k.clone(), x.v.clone()) for x in kv_a]
    loop = _run(stage, kv_a, inputs, pos, 11, use_step=False)
    out = _run(stage, kv_b, inputs, pos, 11, use_step=True)
    twin = _dequantized_twin(stage, cfg)
    ctx = twin.context(pos, inputs.slot_mapping, twin.attention_backend.prepare(inputs))
    ref = twin(torch.tensor([11], device=dev), kv_c, ctx)
    assert not out.isnan().any()
    err_loop, err_step, apart = _rel(loop, ref), _rel(out, ref), _rel(out, loop)
    print(f"seq_len {seq_len}: loop {err_loop:.4f} step {err_step:.4f} apart {apart:.4f}")
    assert err_step < 1.25 * err_loop + 2e-3, (err_loop, err_step, apart)
    slot = int(inputs.slot_mapping[0])
    blk, off = divmod(slot, inputs.block_size)
    for a, b, c in zip(kv_a, kv_b, kv_c):
        for ca, cb, cc in ((a.k, b.k, c.k), (a.v, b.v, c.v)):
            row_loop, row_step = _rel(ca[blk, off], cc[blk, off]), _rel(cb[blk, off], cc[blk, off])
            assert row_step < 1.25 * row_loop + 2e-3, (row_loop, row_step)
            ca[blk, off] = cb[blk, off]
            assert torch.equal(ca, cb)  # only the new token's row was written


@gpu
def test_step_is_deterministic_and_graph_capturable_gpu() -> None:
    """Two eager runs and a CUDA-graph replay give the same bits (the row work is repeated
    by every CTA in a fixed order; the grid-barrier and work counters are reset each launch)."""
    dev = _need()
    stage, cfg = _stage(dev, layers=3)
    kv, inputs, pos = _kv(stage, cfg, 300)
    first = _run(stage, kv, inputs, pos, 5, use_step=True).clone()
    second = _run(stage, kv, inputs, pos, 5, use_step=True).clone()
    assert torch.equal(first, second)
    ctx = stage.context(pos, inputs.slot_mapping,
                        stage.attention_backend.prepare_for_capture(inputs))
    ids = torch.tensor([5], device=dev)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = stage(ids, kv, ctx)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, first)


@gpu
def test_shared_memory_size_matches_the_kernel_gpu() -> None:
    """`smem_bytes` computes the kernel's SMEM_BYTES (read back from the compiled source)."""
    from trtdist.kernels import cuda_jit
    from trtdist.kernels.fp8_decode_step import SOURCE

    dev = _need()
    for h, i, hq, hkv, kc, stages, ds in ((4096, 14336, 32, 8, 1024, 11, 2),
                                           (2048, 4096, 16, 4, 2048, 5, 1)):
        defines = dict(H=h, I=i, HQ=hq, HKV=hkv, D=128, BS=16, NWARPS=8, KC=kc, STAGES=stages,
                       DS=ds, P_MAX=16, PART_MIN=128)
        fn = cuda_jit.load(SOURCE, "decode_step_smem_bytes", defines, dev)
        out = torch.zeros(1, dtype=torch.int32, device=dev)
        fn.launch(1, 1, (out.data_ptr(),), (cuda_jit.POINTER,), pdl=False)
        shape = _Shape(h, i, hq, hkv, 128)
        assert int(out) == smem_bytes(shape, DecodeStepConfig(kc=kc, ds=ds), stages, 16)


@gpu
@pytest.mark.parametrize("config", [DecodeStepConfig(kc=1024, ds=2),
                                    DecodeStepConfig(kc=1024, ds=4),
                                    DecodeStepConfig(stages=3, part_min=128)])
def test_launch_configs_gpu(config: DecodeStepConfig) -> None:
    dev = _need()
    stage, cfg = _stage(dev)
    kv_a, inputs, pos = _kv(stage, cfg, 500)
    kv_b = [type(x)(x.k.clone(), x.v.clone()) for x in kv_a]
    kv_c = [type(x)(x.k.clone(), x.v.clone()) for x in kv_a]
    loop = _run(stage, kv_a, inputs, pos, 3, use_step=False)
    stage._decode_step = DecodeStep(stage, config)
    ctx = stage.context(pos, inputs.slot_mapping, stage.attention_backend.prepare(inputs))
    out = stage(torch.tensor([3], device=dev), kv_b, ctx)
    twin = _dequantized_twin(stage, cfg)
    ctx = twin.context(pos, inputs.slot_mapping, twin.attention_backend.prepare(inputs))
    ref = twin(torch.tensor([3], device=dev), kv_c, ctx)
    assert _rel(out, ref) < 1.25 * _rel(loop, ref) + 2e-3, (_rel(out, ref), _rel(loop, ref))


def test_launch_config_is_validated() -> None:
    with pytest.raises(ValueError, match="intermediate_size / ds"):
        DecodeStep._check(DecodeStepConfig(kc=2048, ds=4), 4096, 14336, 4096)
    with pytest.raises(ValueError, match="multiple of 128 x nwarps"):
        DecodeStep._check(DecodeStepConfig(kc=1000), 4096, 14336, 4096)
    DecodeStep._check(DecodeStepConfig(), 4096, 14336, 4096)


@gpu
def test_opt_in_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off unless TRTDIST_DECODE_STEP=1 (slower than the layer loop so far)."""
    dev = _need()
    stage, _ = _stage(dev, layers=1)
    monkeypatch.delenv("TRTDIST_DECODE_STEP", raising=False)
    assert DecodeStep.build(stage) is None
    monkeypatch.setenv("TRTDIST_DECODE_STEP", "1")
    assert isinstance(DecodeStep.build(stage), DecodeStep)


@gpu
def test_bf16_stage_is_not_built_gpu() -> None:
    dev = _need()
    stage, _ = _stage(dev, layers=1, quant=False)
    assert unsupported_reason(stage) == "FP8 weights with dynamic per-token activations only"
