"""The decode GEMV kernel (kernels/gemv.py) against a float64 reference.

Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1): fp32 and fp16 on small shapes. The `gpu` tests take llama3-8b's shapes
in bf16, every M bucket, and CUDA-graph capture. Outputs are poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch
from trtdist.kernels.gemv import DEFAULT_CONFIGS, GEMV_M_MAX, gemv_torch, gemv_triton

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
gpu = pytest.mark.gpu


def _case(m: int, n: int, k: int, dtype: torch.dtype, device: str, bias: bool, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype).to(device)
    b = torch.randn(n, generator=g).to(dtype).to(device) if bias else None
    return x, w, b


def _check(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
           config: tuple[int, int, int] | None = None) -> None:
    out = torch.full((x.shape[0], w.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    gemv_triton(x, w, b, out=out, config=config)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOL[x.dtype], (tuple(x.shape), tuple(w.shape), err)
    # the reference function is the same numbers up to float32 summation order
    assert torch.allclose(gemv_torch(x, w, b).double(), out.double(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(8, 64), (13, 96), (33, 200)])
def test_gemv_matches_reference(dtype: torch.dtype, m: int, n: int, k: int) -> None:
    for bias in (False, True):
        x, w, b = _case(m, n, k, dtype, "cuda" if torch.cuda.is_available() else "cpu", bias)
        _check(x, w, b, config=(4, 32, 1))


def test_gemv_strided_rows_and_default_configs() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, _ = _case(3, 12, 128, torch.float32, device, False)
    wide = torch.zeros(3, 200, device=device)
    wide[:, :128] = x
    _check(wide[:, :128], w, None, config=(4, 64, 1))
    assert set(DEFAULT_CONFIGS) == {1, 2, 4}


def test_gemv_rejects_bad_input() -> None:
    x, w, _ = _case(5, 8, 64, torch.float32, "cpu", False)
    with pytest.raises(ValueError, match=f"at most {GEMV_M_MAX}"):
        gemv_triton(x, w)
    with pytest.raises(ValueError, match="want x"):
        gemv_triton(x[:1], w[:, :32])
    with pytest.raises(ValueError, match="share one of"):
        gemv_triton(x[:1], w.half())
    with pytest.raises(ValueError, match="bias"):
        gemv_triton(x[:1], w, torch.zeros(3))


LLAMA3_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]


@gpu
@pytest.mark.parametrize("n,k", LLAMA3_8B)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_gemv_llama_shapes_gpu(n: int, k: int, m: int) -> None:
    x, w, b = _case(m, n, k, torch.bfloat16, "cuda", False, seed=m)
    _check(x, w, b)


@gpu
def test_gemv_graph_capture_gpu() -> None:
    x, w, b = _case(1, 4096, 4096, torch.bfloat16, "cuda", True)
    out = torch.empty(1, 4096, dtype=torch.bfloat16, device="cuda")
    gemv_triton(x, w, b, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemv_triton(x, w, b, out=out)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = torch.nn.functional.linear(x.double(), w.double(), b.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < TOL[torch.bfloat16]
