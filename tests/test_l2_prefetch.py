"""The next GEMV's weight prefetched into L2 from the tail of the current one
(kernels/l2_prefetch.py): the plan's parsing, the targets and the model's chain, the PTX of
the GEMVs with the prefetch (compiled here without a GPU), and on a GPU: every GEMV's result
identical with and without it, the prefetched weight untouched, and decode (graphs and
eager) giving the logits of decode without."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import relative_error
from trtdist.kernels.l2_prefetch import ENV_VAR, L2Prefetch, L2PrefetchPlan

MIB = 1 << 20


def test_plan_parses_sizes_and_rejects_bad_items() -> None:
    assert L2PrefetchPlan.parse("0") is None and L2PrefetchPlan.parse("off") is None
    assert L2PrefetchPlan.parse("1") == L2PrefetchPlan() == L2PrefetchPlan.parse("")
    plan = L2PrefetchPlan.parse("o=all, gate_up=24,down=0,max_tokens=8")
    assert plan == L2PrefetchPlan(max_tokens=8, o=None, gate_up=24 * MIB, down=0)
    for bad, match in (("o", "expected key=value"), ("up=3", "expected key=value"),
                       ("qkv=x", "is not an integer or 'all'"), ("qkv=-1", "must be >= 0"),
                       ("max_tokens=all", "is not an integer$"),
                       ("max_tokens=0", "must be positive")):
        with pytest.raises(ValueError, match=match):
            L2PrefetchPlan.parse(bad)


def test_no_prefetch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    assert L2PrefetchPlan.for_device(torch.device("cpu")) is None


def test_target_rounds_to_16_bytes_and_gates_on_rows() -> None:
    layer = torch.nn.Linear(40, 10, bias=False)  # 400 float32 weights: 1600 bytes
    assert L2Prefetch(layer, None, 4).target(4) == (layer.weight, 1600)
    w, n = L2Prefetch(layer, 1000, 4).target(1)
    assert w is layer.weight and n == 992
    assert L2Prefetch(layer, 10 ** 9, 4).target(2)[1] == 1600
    assert L2Prefetch(layer, 1000, 4).target(5) is None  # more rows than the plan's bound
    assert L2Prefetch(layer, 15, 4).target(1) is None  # nothing left after rounding


def _stage(last: bool):
    from test_fp8_fused import _OneRank
    from trtdist.parallel.mapping import Mapping

    from trtdist.config import ModelConfig
    from trtdist.models.llama import LlamaStage

    cfg = ModelConfig(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=256, sliding_windows=(None,) * 4)
    mapping = Mapping(world_size=2, pp_size=2, rank=1 if last else 0)
    layers = range(2, 4) if last else range(2)
    return LlamaStage(cfg, mapping, layers, _OneRank(), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("last", [False, True])
def test_model_links_each_gemv_to_the_next(last: bool) -> None:
    """qkv -> o -> gate_up -> down -> the next layer's qkv; the last stage's last down ->
    the LM head; the stage's last GEMV fetches nothing; None unlinks."""
    stage = _stage(last)
    plan = L2PrefetchPlan(max_tokens=2, qkv=1 * MIB, o=None, gate_up=0, down=3 * MIB,
                          lm_head=5 * MIB)
    stage.link_l2_prefetch(plan)
    a, b = stage.layers.values()
    expect = [(a.attn.qkv, a.attn.o, None), (a.attn.o, None, None),
              (a.mlp.gate_up, a.mlp.down, 3 * MIB), (a.mlp.down, b.attn.qkv, 1 * MIB),
              (b.attn.qkv, b.attn.o, None), (b.attn.o, None, None),
              (b.mlp.gate_up, b.mlp.down, 3 * MIB)]
    for cur, nxt, nbytes in expect:
        if nxt is None and cur in (a.attn.o, b.attn.o):  # gate_up = 0: nothing
            assert cur.l2_next is None
            continue
        assert cur.l2_next == L2Prefetch(nxt, nbytes, 2)
    if last:
        assert b.mlp.down.l2_next == L2Prefetch(stage.lm_head, 5 * MIB, 2)
    else:
        assert b.mlp.down.l2_next is None
    stage.link_l2_prefetch(None)
    assert all(getattr(m, "l2_next", None) is None for m in stage.modules())


_AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtdist.kernels import gemv as m

    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*bf16",
           "nxt_ptr": "*u8", "nxt_bytes": "i64", "M": "i32", "N": "i32", "stride_xm": "i32",
           "stride_wn": "i32", "stride_om": "i32"}
    consts = dict(K=4096, HAS_BIAS=False, EVEN_K=True, BLOCK_M=1, BLOCK_N=2, BLOCK_K=2048,
                  PDL=True, NT=256)
    for name in consts:
        sig[name] = "constexpr"
    for nxt in (True, False):
        sig["NEXT"] = "constexpr"
        src = ASTSource(m._gemv_kernel, sig, consts | {"NEXT": nxt},
                        {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]],
                         (4,): [["tt.divisibility", 16]]})
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        lines = [ln for ln in k.asm["ptx"].splitlines()
                 if "cp.async.bulk.prefetch.L2.global" in ln]
        # one predicated prefetch a thread, and none without NEXT
        assert len(lines) == (1 if nxt else 0) and all("@p" in ln for ln in lines), lines
    print("compiled")
""")


def test_gemv_prefetch_compiles_for_hopper() -> None:
    """Without a GPU: the bf16 GEMV's PTX for sm_90 has one predicated bulk prefetch a thread
    with NEXT, none without."""
    try:
        import triton.backends
    except ImportError:
        pytest.skip("triton is not installed")
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True,
                         text=True)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


def _need_hopper() -> None:
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the bulk L2 prefetch needs compute capability >= 9.0")


@pytest.mark.gpu
@pytest.mark.parametrize("nbytes", [16, 4096 * 16 + 48, 3 * MIB + 16, 64 * MIB])
def test_gemvs_equal_with_and_without_prefetch(nbytes: int) -> None:
    """The bf16 GEMV, the FP8 Triton GEMV tile and the FP8 CUDA GEMV give bit-identical
    results with a prefetch of `nbytes` of another weight, which stays untouched."""
    from trtdist.kernels import fp8_gemv_cuda
    from trtdist.kernels.fp8_gemm import fp8_gemm_small_m, fp8_gemm_small_m_quantizing
    from trtdist.kernels.gemv import gemv_triton
    from trtdist.parallel.quant_fp8 import quantize_per_token, quantize_weight_per_channel

    _need_hopper()
    torch.manual_seed(0)
    nxt = torch.randint(0, 255, (64 * MIB + 4096,), dtype=torch.uint8, device="cuda")
    before = nxt.clone()
    target = (nxt, nbytes)
    for n, k in ((4096, 4096), (6144, 4096), (4096, 14336)):
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.05
        assert torch.equal(gemv_triton(x, w), gemv_triton(x, w, prefetch=target))
        wq, ws = quantize_weight_per_channel(w)
        xq, xs = quantize_per_token(x)
        plain = fp8_gemm_small_m(xq, xs, wq, ws, None, torch.bfloat16)
        assert torch.equal(plain, fp8_gemm_small_m(xq, xs, wq, ws, None, torch.bfloat16,
                                                   prefetch=target))
        amax = x.abs().amax(dim=1).float()
        plain = fp8_gemm_small_m_quantizing(x, amax, None, wq, ws, None)
        assert torch.equal(plain, fp8_gemm_small_m_quantizing(x, amax, None, wq, ws, None,
                                                              prefetch=target))
        if fp8_gemv_cuda.supports(1, n, k, x.dtype, x.dtype, x.device):
            out = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
            cfg = fp8_gemv_cuda.default_config(k)
            plain = fp8_gemv_cuda.fp8_gemv_cuda(x, amax, 1, wq, ws, None, out.clone(),
                                                config=cfg)
            got = fp8_gemv_cuda.fp8_gemv_cuda(x, amax, 1, wq, ws, None, out, config=cfg,
                                              prefetch=target)
            assert torch.equal(plain, got)
    torch.cuda.synchronize()
    assert torch.equal(nxt, before)


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_decode_with_prefetch_equals_without(hf_models: dict[str, Path], quant: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph replay and eager decode with every GEMV prefetching the next weight give the
    logits of a model without it (bit for bit: a prefetch changes no value)."""
    from test_graphs import _decode_plan

    from trtdist import DistributedLLM

    _need_hopper()
    logits = []
    for spec in ("o=all,qkv=1,gate_up=1,down=1,lm_head=1,max_tokens=8", "0"):
        monkeypatch.setenv(ENV_VAR, spec)
        with DistributedLLM(hf_models["llama"], dtype="bfloat16", device="cuda", block_size=4,
                            max_model_len=128, max_batch_size=8, num_kv_blocks=160,
                            cuda_graph_batch_sizes=(1, 2, 4, 8), quant=quant) as llm:
            runner = llm._runner
            linked = [m for m in runner.model.modules() if getattr(m, "l2_next", None)]
            assert bool(linked) == (spec != "0")
            torch.manual_seed(0)
            runner.kv.data[:, :, 1:].normal_()
            rng = np.random.default_rng(0)
            got = []
            for s in (1, 3, 8):
                plan = _decode_plan(rng, s, 4, runner.kv.num_blocks)
                with torch.inference_mode():
                    got.append(runner._forward(plan).float().cpu())
                    graphs, runner.graphs = runner.graphs, None
                    got.append(runner._forward(plan).float().cpu())
                    runner.graphs = graphs
            logits.append(got)
    for a, b in zip(*logits):
        assert relative_error(a.double(), b.double()) == 0.0
