"""SiLU(gate) x up over the fused gate/up projection output `[T, 2 * I]` -> `[T, I]`.

The Triton kernel computes `silu(gate) * up` in float32 and rounds once to the model dtype;
torch rounds `silu(gate)` to the model dtype first, so in bf16 / fp16 the two may differ by one
ulp (the kernel being the closer to the exact value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton
from trtdist.kernels.fp8_quant import check_row_amax, max_rows_into

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


@_jit
def _silu_and_mul_kernel(x_ptr, x_stride, out_ptr, out_stride, amax_ptr, INTER: tl.constexpr,
                         BLOCK: tl.constexpr, AMAX: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, cdiv(I, BLOCK)): each program reads BLOCK gates and ups, writes BLOCK. With
    AMAX it also maxes its part's max |output| (as rounded) into `amax[row]`.

    NOTE: INTER is a compile-time constant (fixed per model) so the compiler sees the up half's
    alignment and issues 16-byte vector loads for both halves."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    x_row = x_ptr + row * x_stride
    gate = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + INTER + cols, mask=mask, other=0.0).to(tl.float32)
    y = (gate / (1.0 + tl.exp(-gate)) * up).to(out_ptr.dtype.element_ty)
    pdl_trigger(PDL)
    tl.store(out_ptr + row * out_stride + cols, y, mask=mask)
    if AMAX:
        # NOTE: masked columns hold SiLU(0) x 0 = 0. One relaxed atomic a program: the kernel
        # that reads the amax waits for this launch to complete.
        tl.atomic_max(amax_ptr + row, tl.max(tl.abs(y.to(tl.float32)), axis=0), sem="relaxed")


def silu_and_mul_triton(x: torch.Tensor, *, out: torch.Tensor | None = None,
                        row_amax: torch.Tensor | None = None) -> torch.Tensor:
    """`[..., 2I]` -> `[..., I]` in a new tensor or in `out` (same dtype, unit last stride).

    `row_amax` (float32, contiguous, >= rows elements, zero or a lower bound beforehand):
    each output row's max |value| is maxed into it (for the FP8 GEMM that quantizes this
    output itself, `kernels/fp8_gemm.py`). No host syncs: CUDA-graph capturable."""
    if triton is None:
        raise RuntimeError("silu_and_mul_triton needs triton, which is not installed")
    if x.dtype not in _DTYPES:
        raise ValueError(f"silu_and_mul_triton: dtype must be float16, bfloat16 or float32, "
                         f"got {x.dtype}")
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"silu_and_mul_triton: x must be [..., 2I] with a contiguous last "
                         f"dimension, got shape {tuple(x.shape)} strides {tuple(x.stride())}")
    inter = x.shape[-1] // 2
    shape = (*x.shape[:-1], inter)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
    elif out.shape != shape or out.dtype != x.dtype or out.stride(-1) != 1:
        raise ValueError(f"silu_and_mul_triton: out must be {shape} {x.dtype} with a unit last "
                         f"stride, got {tuple(out.shape)} {out.dtype} {tuple(out.stride())}")
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    o2 = out if out.dim() == 2 else out.view(-1, inter)
    rows = x2.shape[0]
    check_row_amax(row_amax, rows, x.device, "silu_and_mul_triton")
    if rows == 0 or inter == 0:
        return out
    # NOTE: small batches (decode) take small blocks so that enough programs fill the GPU.
    block = min(triton.next_power_of_2(inter), 1024 if rows >= 64 else 256)
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x2, x2.stride(0), o2, o2.stride(0), row_amax if row_amax is not None else o2,
        INTER=inter, BLOCK=block, AMAX=row_amax is not None,
        num_warps=max(1, block // 256),  # 8 values per thread: 16-byte loads in bf16
        **pdl_launch(x.device, row=rows == 1))
    return out


def silu_and_mul(x: torch.Tensor, *, out: torch.Tensor | None = None,
                 row_amax: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA (`out` and `row_amax` as there), the reference
    elsewhere."""
    if x.is_cuda and triton is not None:
        return silu_and_mul_triton(x, out=out, row_amax=row_amax)
    y = silu_and_mul_torch(x)
    if row_amax is not None:
        max_rows_into(row_amax, y.reshape(-1, y.shape[-1]))
    return y if out is None else out.copy_(y)
