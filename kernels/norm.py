"""RMSNorm, alone and fused with the residual add that precedes it.

Numerics follow transformers' LlamaRMSNorm: normalise in float32, cast back to the model
dtype, then multiply by the weight in the model dtype; the residual add happens in the model
dtype. The fused form returns `(norm(x + residual), x + residual)`.

The Triton kernels keep those roundings (the residual sum is rounded to the model dtype before
it is squared, the normalised row is rounded to the model dtype before the weight multiply), so
in bf16 / fp16 they equal the reference up to the float32 reduction order: the same value, or
one ulp apart where that order flips a rounding.
"""

from __future__ import annotations

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton

# NOTE: one row lives in registers up to this width (16 warps x 32 lanes x 32 values); wider
# rows take the two-pass loop (sum of squares, then normalise), re-reading the row from L2.
_MAX_ONE_PASS = 16384
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def add_rms_norm_torch(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_torch(residual, weight, eps), residual


@_jit
def add_residual(x_ptrs, res_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """One chunk of a row as float32: x, or with HAS_RESIDUAL `x + residual` rounded to the
    residual's dtype (as `x + residual` in torch) and stored back into the residual: it is that
    rounded value which is normalised."""
    h = tl.load(x_ptrs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
             ).to(res_ptrs.dtype.element_ty)
        tl.store(res_ptrs, h, mask=mask)
    return h.to(tl.float32)


@_jit
def _rms_norm_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, out_ptr, out_stride, eps,
                     N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    """One program per row. With HAS_RESIDUAL, `res <- x + res` in place, then normalise res.

    NOTE: the hidden size N is a compile-time constant (fixed per model): exact masks, and the
    chunk loop stays a static range (which Triton's interpreter needs)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    res_row = res_ptr + row * res_stride
    out_row = out_ptr + row * out_stride
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < N
        # NOTE: the weight (a constant) before the wait: loaded after the row's reduction it
        # was a DRAM round trip on this latency-bound kernel's critical path.
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        hf = add_residual(x_row + cols, res_row + cols, mask, HAS_RESIDUAL)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
        normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        pdl_trigger(PDL)
        tl.store(out_row + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        pdl_wait(PDL)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            hf = add_residual(x_row + c, res_row + c, mask, HAS_RESIDUAL)
            acc += hf * hf
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / N + eps)
        src_row = res_row if HAS_RESIDUAL else x_row
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            # NOTE: each chunk is read back before it is written, so `out` may alias x.
            hf = tl.load(src_row + c, mask=mask, other=0.0).to(tl.float32)
            normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_row + c, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """`[..., N]` -> `[R, N]` (a view for the usual layouts) with a unit last stride."""
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides "
                         f"{tuple(t.stride())}")
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            out: torch.Tensor | None, fn: str) -> torch.Tensor:
    if triton is None:
        raise RuntimeError(f"{fn} needs triton, which is not installed")
    n = x.shape[-1]
    if x.dtype not in _DTYPES or weight.dtype not in _DTYPES:
        raise ValueError(f"{fn}: dtypes must be float16, bfloat16 or float32, got x {x.dtype}, "
                         f"weight {weight.dtype}")
    if weight.shape != (n,) or weight.stride(0) != 1 or weight.device != x.device:
        raise ValueError(f"{fn}: weight must be a contiguous [{n}] on {x.device}, got "
                         f"{tuple(weight.shape)} on {weight.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"{fn}: residual must match x ({tuple(x.shape)}, {x.dtype}), got "
                         f"{tuple(residual.shape)}, {residual.dtype}")
    # NOTE: the weight multiply promotes like torch's `weight * h.to(x.dtype)`.
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if out is None:
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != out_dtype or out.device != x.device:
        raise ValueError(f"{fn}: out must be {tuple(x.shape)} {out_dtype} on {x.device}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    x2, o2 = _rows(x, "x"), _rows(out, "out")
    r2 = _rows(residual, "residual") if residual is not None else x2
    if residual is not None and r2.data_ptr() != residual.data_ptr():
        raise ValueError(f"{fn}: residual must be updated in place, so it must be viewable "
                         "as [rows, hidden]")
    if o2.data_ptr() != out.data_ptr():
        raise ValueError(f"{fn}: out must be viewable as [rows, hidden]")
    rows = x2.shape[0]
    if rows == 0:
        return out
    block = min(triton.next_power_of_2(n), _MAX_ONE_PASS)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _rms_norm_kernel[(rows,)](
        x2, x2.stride(0), r2, r2.stride(0), weight, o2, o2.stride(0), eps,
        N=n, HAS_RESIDUAL=residual is not None, BLOCK=block, ONE_PASS=block >= n,
        num_warps=num_warps, **pdl_launch(x.device))  # before GEMVs of many waves
    return out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm of `[..., N]` rows (N any size; one pass up to 16384) -> a new tensor or `out`.

    `out` (same shape, dtype `promote(x.dtype, weight.dtype)`) may alias `x`. No host syncs:
    CUDA-graph capturable."""
    return _launch(x, None, weight, eps, out, "rms_norm_triton")


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float, *, out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> `(norm(x + residual), x + residual)`.

    IN PLACE: `residual` is overwritten with `x + residual` and is the second tensor returned.
    The normalised rows go to a new tensor or to `out`, which may alias `x` (not `residual`).
    No host syncs: CUDA-graph capturable."""
    if out is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError("add_rms_norm_triton: out must not alias residual")
    return _launch(x, residual, weight, eps, out, "add_rms_norm_triton"), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatch: the Triton kernel on CUDA (`out` as there), the reference elsewhere."""
    if x.is_cuda and triton is not None:
        return rms_norm_triton(x, weight, eps, out=out)
    y = rms_norm_torch(x, weight, eps)
    return y if out is None else out.copy_(y)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float, *, out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the Triton kernel on CUDA, the reference elsewhere.

    Use the returned tensors: on CUDA `residual` is updated in place (see
    `add_rms_norm_triton`); the reference leaves its inputs alone."""
    if x.is_cuda and triton is not None:
        return add_rms_norm_triton(x, residual, weight, eps, out=out)
    y, res = add_rms_norm_torch(x, residual, weight, eps)
    return (y if out is None else out.copy_(y)), res
