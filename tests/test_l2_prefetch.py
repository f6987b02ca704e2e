"""L2 weight prefetch (kernels/l2_prefetch.py, models/weight_prefetch.py): the plan's parsing,
the kernel's PTX (compiled here without a GPU), and on a GPU: memory untouched, and decode
with prefetch (graphs and eager) giving the logits of decode without."""

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

from trtdist import DistributedLLM
from trtdist.models.weight_prefetch import ENV_VAR, PrefetchPlan, WeightPrefetcher

MIB = 1 << 20


def test_plan_parses_sizes_and_rejects_bad_items() -> None:
    assert PrefetchPlan.parse("0") is None and PrefetchPlan.parse("off") is None
    assert PrefetchPlan.parse("1") == PrefetchPlan() == PrefetchPlan.parse("")
    plan = PrefetchPlan.parse("o=all, gate_up=24,down=0,max_tokens=8")
    assert plan == PrefetchPlan(max_tokens=8, o=None, gate_up=24 * MIB, down=0)
    for bad, match in (("o", "expected key=value"), ("up=3", "expected key=value"),
                       ("qkv=x", "is not an integer or 'all'"), ("qkv=-1", "must be >= 0"),
                       ("max_tokens=all", "is not an integer$"),
                       ("max_tokens=0", "must be positive")):
        with pytest.raises(ValueError, match=match):
            PrefetchPlan.parse(bad)


def test_no_prefetcher_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, "1")
    assert WeightPrefetcher.for_device(torch.device("cpu")) is None


_AOT_SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtdist.kernels import l2_prefetch as m

    sig = {"base_ptr": "*u8", "nbytes": "i64", "CHUNK": "constexpr", "PER_PROGRAM": "constexpr"}
    src = ASTSource(m._l2_prefetch_kernel, sig, {"CHUNK": m.CHUNK, "PER_PROGRAM": m.PER_PROGRAM},
                    {(0,): [["tt.divisibility", 16]]})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    lines = [ln for ln in k.asm["ptx"].splitlines() if "cp.async.bulk.prefetch.L2.global" in ln]
    assert len(lines) == 1 and "@p" in lines[0], lines  # one predicated prefetch a thread
    assert "ld.global" not in k.asm["ptx"] and "st.global" not in k.asm["ptx"]
    assert len(k.asm["cubin"]) > 0
    print("compiled")
""")


def test_prefetch_kernel_compiles_for_hopper() -> None:
    """Without a GPU: PTX and cubin for sm_90; one predicated bulk prefetch per thread and
    no load or store."""
    import triton.backends

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
def test_prefetch_leaves_memory_unchanged() -> None:
    from trtdist.kernels.l2_prefetch import prefetch_l2

    _need_hopper()
    for n, dtype in ((3 * MIB + 48, torch.uint8), (1000, torch.bfloat16), (17, torch.float32)):
        t = torch.randint(0, 100, (n,), device="cuda").to(dtype)
        before = t.clone()
        for nbytes in (None, 0, 5, 4096, 10 ** 9):
            prefetch_l2(t, nbytes)
        torch.cuda.synchronize()
        assert torch.equal(t, before)
    with pytest.raises(ValueError, match="contiguous"):
        prefetch_l2(torch.zeros(8, 8, device="cuda").t())


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["none", "fp8"])
def test_decode_with_prefetch_equals_without(hf_models: dict[str, Path], quant: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph replay and eager decode with the prefetcher give the logits of a model without
    it (bit for bit: a prefetch changes no value, and the kernels are the same)."""
    from test_graphs import _decode_plan

    _need_hopper()
    logits = []
    for spec in ("o=all,qkv=1,gate_up=1,down=1,lm_head=1,max_tokens=8", "0"):
        monkeypatch.setenv(ENV_VAR, spec)
        with DistributedLLM(hf_models["llama"], dtype="bfloat16", device="cuda", block_size=4,
                            max_model_len=128, max_batch_size=8, num_kv_blocks=160,
                            cuda_graph_batch_sizes=(1, 2, 4, 8), quant=quant) as llm:
            runner = llm._runner
            assert (runner.model.weight_prefetcher is None) == (spec == "0")
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
