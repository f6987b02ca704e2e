"""Decode-shaped linear layers: `y [M, N] = x [M, K] @ W [N, K]^T` for M <= GEMV_M_MAX rows,
weight in float16 / bfloat16 / float32, streamed from HBM once at (close to) read bandwidth.

At batch 1 a linear layer is a weight stream: llama3-8b reads 16 GB of weights a token. cuBLAS
picks GEMV kernels that reach ~76-86% of copy bandwidth on an H200, and some of its shapes add
a split-K reduction launch. Here each program owns BLOCK_N output channels over the whole of K
(no split-K: at M <= 4 the N dimension alone gives thousands of programs for every llama
shape, e.g. 4096 / 4 = 1024 programs for the o projection), so one launch, no workspace and
a deterministic float32 sum in a fixed order. The weight tile `[BLOCK_N, BLOCK_K]` is loaded
as wide contiguous vectors along K; each of the M rows of x (`[BLOCK_K]`, L2-resident) is
multiplied in float32; products are accumulated element-wise over the K steps and reduced
once at the end.

`gemv_torch` is the reference (`F.linear` in float32, one rounding). Configs come from
`CONFIGS`, keyed by (M bucket, N, K) and filled from `scripts/tune_gemv.py` on the GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton

GEMV_M_MAX = 4
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (BLOCK_N, BLOCK_K, num_warps) per M bucket: the float32 accumulators `[BLOCK_N, BLOCK_K]`
# per row live in registers, so more rows take a smaller tile.
DEFAULT_CONFIGS = {1: (4, 1024, 4), 2: (4, 512, 4), 4: (4, 256, 4)}
# NOTE: (m_bucket, N, K) -> config, measured by scripts/tune_gemv.py on an H200. `linear`
# takes the GEMV only for the shapes listed (those where it beat cuBLAS); `gemv_triton` called
# directly takes DEFAULT_CONFIGS for the others.
# Measured 2026-11-23 on an H200 (copy bandwidth 4,163 GB/s), `scripts/tune_gemv.py`: at M = 1
# against cuBLAS, qkv 15.4 -> 13.2 us, o 13.2 -> 9.6, gate_up 55.1 -> 52.8, down 31.2 -> 28.2,
# lm_head 237 -> 227 (4.6 TB/s of weight reads); at M = 2 it wins on all but gate_up (a tie);
# at M = 4 cuBLAS is 1.6-2x faster (four float32 accumulator tiles spill), so none is listed.
CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {
    (1, 6144, 4096): (2, 2048, 8),
    (1, 4096, 4096): (2, 2048, 8),
    (1, 28672, 4096): (2, 2048, 8),
    (1, 4096, 14336): (4, 2048, 4),
    (1, 128256, 4096): (2, 2048, 8),
    (2, 6144, 4096): (4, 2048, 8),
    (2, 4096, 4096): (2, 2048, 8),
    (2, 4096, 14336): (2, 1024, 4),
    (2, 128256, 4096): (4, 2048, 8),
}


def gemv_torch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Reference: float32 product and sum, one rounding to x's dtype."""
    y = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    return y.to(x.dtype)


@_jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, stride_xm, stride_wn, stride_om,
                 K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """Grid (cdiv(N, BLOCK_N),): BLOCK_N output channels of all M (<= BLOCK_M) rows.

    NOTE: K is a compile-time constant (a few shapes per model) so the loop trip count and the
    alignment of every row are known: full-width vector loads, no runtime K masks."""
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_n = rn < N
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + rk[None, :]  # [BN, BK]
    # NOTE: one pass over the weight per row would multiply the traffic by M, so the (at most
    # four) rows share each weight tile inside the K loop; rows past BLOCK_M compile away.
    acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    pdl_wait(PDL)  # before the first load: see the FP8 GEMV's note (kernels/fp8_gemm.py)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        if EVEN_K:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0).to(tl.float32)
            x0 = tl.load(x_ptr + kk).to(tl.float32)
        else:
            mk = kk < K
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mk[None, :], other=0.0).to(tl.float32)
            x0 = tl.load(x_ptr + kk, mask=mk, other=0.0).to(tl.float32)
        acc0 += w * x0[None, :]
        if BLOCK_M > 1:
            if EVEN_K:
                x1 = tl.load(x_ptr + stride_xm + kk, mask=M > 1, other=0.0).to(tl.float32)
            else:
                x1 = tl.load(x_ptr + stride_xm + kk, mask=mk & (M > 1), other=0.0)
                x1 = x1.to(tl.float32)
            acc1 += w * x1[None, :]
        if BLOCK_M > 2:
            if EVEN_K:
                x2 = tl.load(x_ptr + 2 * stride_xm + kk, mask=M > 2, other=0.0)
                x3 = tl.load(x_ptr + 3 * stride_xm + kk, mask=M > 3, other=0.0)
            else:
                x2 = tl.load(x_ptr + 2 * stride_xm + kk, mask=mk & (M > 2), other=0.0)
                x3 = tl.load(x_ptr + 3 * stride_xm + kk, mask=mk & (M > 3), other=0.0)
            acc2 += w * x2.to(tl.float32)[None, :]
            acc3 += w * x3.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
    pdl_trigger(PDL)
    if HAS_BIAS:
        b = tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_N], dtype=tl.float32)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + rn, (tl.sum(acc0, axis=1) + b).to(out_ty), mask=mask_n)
    if BLOCK_M > 1:
        tl.store(out_ptr + stride_om + rn, (tl.sum(acc1, axis=1) + b).to(out_ty),
                 mask=mask_n & (M > 1))
    if BLOCK_M > 2:
        tl.store(out_ptr + 2 * stride_om + rn, (tl.sum(acc2, axis=1) + b).to(out_ty),
                 mask=mask_n & (M > 2))
        tl.store(out_ptr + 3 * stride_om + rn, (tl.sum(acc3, axis=1) + b).to(out_ty),
                 mask=mask_n & (M > 3))


def _m_bucket(m: int) -> int:
    return 1 if m <= 1 else (2 if m == 2 else 4)


def gemv_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for this shape: the tuned entry or the default."""
    bucket = _m_bucket(m)
    return CONFIGS.get((bucket, n, k), DEFAULT_CONFIGS[bucket])


def gemv_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, *,
                out: torch.Tensor | None = None,
                config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """`x [M, K]` (M <= GEMV_M_MAX) @ `w [N, K]`^T (+ `bias [N]`) -> `[M, N]` in x's dtype,
    in a new tensor or `out`. No host syncs, no allocation besides the output: CUDA-graph
    capturable. `config` overrides (BLOCK_N, BLOCK_K, num_warps) (tuning, tests)."""
    if triton is None:
        raise RuntimeError("gemv_triton needs triton, which is not installed")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv_triton: want x [M, K] and w [N, K], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    m, k = x.shape
    n = w.shape[0]
    if m > GEMV_M_MAX:
        raise ValueError(f"gemv_triton: M = {m} rows, at most {GEMV_M_MAX} allowed")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise ValueError(f"gemv_triton: x and w must share one of float16, bfloat16, float32; "
                         f"got {x.dtype} and {w.dtype}")
    if x.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("gemv_triton: x and w need a unit last stride")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"gemv_triton: bias must be [{n}] contiguous, got {tuple(bias.shape)}")
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"gemv_triton: out must be [{m}, {n}] {x.dtype} with a unit last "
                         f"stride, got {tuple(out.shape)} {out.dtype}")
    if m == 0 or n == 0:
        return out
    block_n, block_k, warps = config or gemv_config(m, n, k)
    block_k = min(block_k, triton.next_power_of_2(k))
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x, w, bias if bias is not None else w, out, m, n, x.stride(0), w.stride(0),
        out.stride(0), K=k, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0,
        BLOCK_M=_m_bucket(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        **pdl_launch(x.device))
    return out


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, except for 2-D CUDA inputs of at most GEMV_M_MAX rows in float16 / bfloat16
    whose shape has a tuned entry in CONFIGS: those take `gemv_triton`."""
    if (x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_M_MAX and triton is not None
            and x.dtype in (torch.float16, torch.bfloat16) and w.dtype == x.dtype
            and (_m_bucket(x.shape[0]), w.shape[0], w.shape[1]) in CONFIGS
            and x.stride(-1) == 1 and w.stride(-1) == 1 and x.shape[0] > 0):
        return gemv_triton(x, w, bias)
    return F.linear(x, w, bias)
