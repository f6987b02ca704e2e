"""The per-token FP8 activation quantization fused into the kernel that produces the
activation: (add +) RMSNorm -> E4M3, and SiLU(gate) x up -> E4M3.

Each returns `(xq [T, K] float8_e4m3fn, scale [T, 1] float32)` equal to running the model-dtype
kernel (`kernels/norm.py`, `kernels/activation.py`) and then `kernels/fp8_quant.py`'s
quantization: the activation is rounded to the model dtype first (as the separate kernels'
intermediate tensor is), then quantized per token (`scale = max(amax / 448, 1e-12)`) or with
the static `input_scale`, with the same explicit E4M3 rounding. Saved per layer: one launch
and the write + read of the model-dtype activation (three launches of the decoder layer's 14
become fused into their producers).

NOTE: the amax needs the whole row, so one program owns one token row (grid (T,)); rows up to
the one-pass width stay in registers, wider ones are recomputed chunk by chunk (a pass for the
amax, a pass to quantize: the inputs are read twice, the second time from L2). At one to four
rows on a GPU (decode) a SiLU x up row (14,336 wide in llama3-8b) is split over programs that
meet at a per-row barrier for the amax (`fp8_quant.row_split`): one program a row is
instruction-bound there (6.7 -> 3.0 us at batch 1 on an H200). Norm rows (4,096) gain
nothing: the barrier costs what the split saves (3.1 -> 3.7 us measured), so they stay whole.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton
from trtdist.kernels.fp8_quant import (
    FP8_DTYPE,
    _quantize,
    check_row_amax,
    dynamic_scale,
    inverse_scale,
    quantize_activation_torch,
    row_amax_across_parts,
    row_split,
    row_sync,
)
from trtdist.kernels.norm import add_residual, add_rms_norm_torch, rms_norm_torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_ONE_PASS_NORM = 16384
_MAX_ONE_PASS_SILU = 16384  # gate + up + product: ~96 registers a thread at 16 warps
_TL_DTYPES = ({torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
              if triton is not None else {})


# ---- references --------------------------------------------------------------------------
def rms_norm_quant_torch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                         eps: float, input_scale: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> `(xq, scale, residual_out)`: `kernels/norm.py`'s (add +) RMSNorm then the FP8
    quantization. Without a residual, `residual_out` is `x`."""
    if residual is None:
        y, residual = rms_norm_torch(x, weight, eps), x
    else:
        y, residual = add_rms_norm_torch(x, residual, weight, eps)
    xq, xs = quantize_activation_torch(y.reshape(-1, y.shape[-1]), input_scale)
    return xq, xs, residual


def silu_and_mul_quant_torch(x: torch.Tensor, input_scale: torch.Tensor | None
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, 2I]` -> `(xq [T, I], scale [T, 1])`: SiLU(gate) x up then the FP8 quantization.

    NOTE: SiLU x up in float32 with one rounding to the model dtype, as the CUDA path's
    `silu_and_mul_triton` (torch's `silu_and_mul_torch` rounds SiLU(gate) first: one ulp
    apart in bf16 / fp16, which can move the row's amax and so every code by one step)."""
    gate, up = x.float().chunk(2, dim=-1)
    y = (F.silu(gate) * up).to(x.dtype)
    return quantize_activation_torch(y.reshape(-1, y.shape[-1]), input_scale)


# ---- kernels -----------------------------------------------------------------------------
@_jit
def _scale_of(amax, in_scale_ptr, STATIC: tl.constexpr):
    if STATIC:
        return tl.load(in_scale_ptr).to(tl.float32)
    else:
        return dynamic_scale(amax)


@_jit
def _normed(src_row, w_ptr, c, mask, rstd, Y_DTYPE: tl.constexpr):
    """One chunk of `weight * (h * rstd).to(x dtype)` rounded to the output dtype, in float32
    (the roundings of `kernels/norm.py`)."""
    hf = tl.load(src_row + c, mask=mask, other=0.0).to(tl.float32)
    normed = (hf * rstd).to(src_row.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    return (normed * w).to(Y_DTYPE).to(tl.float32)


@_jit
def _rms_norm_quant_kernel(x_ptr, x_stride, res_ptr, res_stride, w_ptr, q_ptr, q_stride, s_ptr,
                           in_scale_ptr, clear_ptr, eps, N: tl.constexpr,
                           HAS_RESIDUAL: tl.constexpr, STATIC: tl.constexpr,
                           Y_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                           CLEAR: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows,). With HAS_RESIDUAL, `res <- x + res` in place (rounded to the model dtype),
    then normalise res; the normalised row (model dtype) is quantized to E4M3. With CLEAR,
    `clear[row] = 0` as well."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    res_row = res_ptr + row * res_stride
    q_row = q_ptr + row * q_stride
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < N
        # NOTE: the weight (a constant) before the wait, off the critical path (see
        # `kernels/norm.py`)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        hf = add_residual(x_row + cols, res_row + cols, mask, HAS_RESIDUAL)
        rstd = tl.rsqrt(tl.sum(hf * hf, axis=0) / N + eps)
        normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        y = (normed * w).to(Y_DTYPE).to(tl.float32)
        scale = _scale_of(tl.max(tl.abs(y), axis=0), in_scale_ptr, STATIC)
        pdl_trigger(PDL)
        tl.store(q_row + cols, _quantize(y, inverse_scale(scale)).to(q_ptr.dtype.element_ty),
                 mask=mask)
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
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        if not STATIC:
            for start in range(0, N, BLOCK):
                c = start + cols
                y = _normed(src_row, w_ptr, c, c < N, rstd, Y_DTYPE)
                amax = tl.maximum(amax, tl.abs(y))
        scale = _scale_of(tl.max(amax, axis=0), in_scale_ptr, STATIC)
        inv = inverse_scale(scale)
        pdl_trigger(PDL)
        for start in range(0, N, BLOCK):
            c = start + cols
            mask = c < N
            y = _normed(src_row, w_ptr, c, mask, rstd, Y_DTYPE)
            tl.store(q_row + c, _quantize(y, inv).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)
    if CLEAR:
        # NOTE: after the wait: the layer's later producers max their rows' amax onto this
        # zero (see `row_amax`'s note in models/llama.py).
        tl.store(clear_ptr + row, 0.0)


@_jit
def _silu_mul(x_row, c, mask, INTER: tl.constexpr, Y_DTYPE: tl.constexpr):
    """One chunk of SiLU(gate) x up rounded to the model dtype, in float32 (the numbers of
    `kernels/activation.py`'s kernel)."""
    gate = tl.load(x_row + c, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + INTER + c, mask=mask, other=0.0).to(tl.float32)
    return (gate / (1.0 + tl.exp(-gate)) * up).to(Y_DTYPE).to(tl.float32)


@_jit
def _silu_mul_quant_kernel(x_ptr, x_stride, q_ptr, q_stride, s_ptr, in_scale_ptr,
                           INTER: tl.constexpr, STATIC: tl.constexpr, Y_DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows,): SiLU(gate) x up of one token row, quantized to E4M3 with its amax."""
    pdl_wait(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    q_row = q_ptr + row * q_stride
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:
        mask = cols < INTER
        y = _silu_mul(x_row, cols, mask, INTER, Y_DTYPE)
        scale = _scale_of(tl.max(tl.abs(y), axis=0), in_scale_ptr, STATIC)
        pdl_trigger(PDL)
        tl.store(q_row + cols, _quantize(y, inverse_scale(scale)).to(q_ptr.dtype.element_ty),
                 mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        if not STATIC:
            for start in range(0, INTER, BLOCK):
                c = start + cols
                amax = tl.maximum(amax, tl.abs(_silu_mul(x_row, c, c < INTER, INTER, Y_DTYPE)))
        scale = _scale_of(tl.max(amax, axis=0), in_scale_ptr, STATIC)
        inv = inverse_scale(scale)
        pdl_trigger(PDL)
        for start in range(0, INTER, BLOCK):
            c = start + cols
            mask = c < INTER
            y = _silu_mul(x_row, c, mask, INTER, Y_DTYPE)
            tl.store(q_row + c, _quantize(y, inv).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


@_jit
def _silu_mul_quant_split_kernel(x_ptr, x_stride, q_ptr, q_stride, s_ptr, cnt_ptr, amax_ptr,
                                 INTER: tl.constexpr, Y_DTYPE: tl.constexpr,
                                 CHUNK: tl.constexpr, PARTS: tl.constexpr, PDL: tl.constexpr):
    """Grid (rows, PARTS), dynamic scales: each part SiLU x up's CHUNK columns of a row."""
    pdl_wait(PDL)
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * x_stride
    c = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    mask = c < INTER
    y = _silu_mul(x_row, c, mask, INTER, Y_DTYPE)
    amax = row_amax_across_parts(cnt_ptr, amax_ptr, row, tl.program_id(1),
                                 tl.max(tl.abs(y), axis=0), PARTS)
    scale = dynamic_scale(amax)
    pdl_trigger(PDL)
    tl.store(q_ptr + row.to(tl.int64) * q_stride + c,
             _quantize(y, inverse_scale(scale)).to(q_ptr.dtype.element_ty), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(s_ptr + row, scale)


# ---- launchers ---------------------------------------------------------------------------
def _whole_row(width: int, max_block: int) -> tuple[int, bool, int]:
    block = min(triton.next_power_of_2(width), max_block)
    return block, block >= width, 4 if block <= 1024 else 8 if block <= 4096 else 16


def norm_row_config(width: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) of the one-program-a-row norm + quantize launch."""
    return _whole_row(width, _MAX_ONE_PASS_NORM)


def silu_row_config(inter: int) -> tuple[int, bool, int]:
    """(BLOCK, ONE_PASS, num_warps) of the one-program-a-row SiLU x up + quantize launch."""
    return _whole_row(inter, _MAX_ONE_PASS_SILU)


def _check_scale(input_scale: torch.Tensor | None, fn: str) -> None:
    if input_scale is not None and (input_scale.numel() != 1
                                    or input_scale.dtype != torch.float32):
        raise ValueError(f"{fn}: input_scale must hold one float32 value, got shape "
                         f"{tuple(input_scale.shape)} {input_scale.dtype}")


def _outputs(rows: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((rows, k), dtype=FP8_DTYPE, device=device),
            torch.empty((rows, 1), dtype=torch.float32, device=device))


def rms_norm_quant_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                          eps: float, input_scale: torch.Tensor | None, *,
                          clear: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`x [T, N]` (and `residual [T, N]`, updated IN PLACE to `x + residual`) -> `(xq [T, N]
    E4M3, scale [T, 1] float32, residual_out)`: `rms_norm_quant_torch`'s numbers in one launch.
    Without a residual, `residual_out` is `x`. `clear` (float32, contiguous, >= T elements):
    its first T elements are zeroed by the same launch (the row-amax slots that the layer's
    later producers max into). No host syncs: CUDA-graph capturable."""
    fn = "rms_norm_quant_triton"
    if triton is None:
        raise RuntimeError(f"{fn} needs triton, which is not installed")
    if x.dim() != 2 or x.stride(-1) != 1 or x.dtype not in _DTYPES:
        raise ValueError(f"{fn}: x must be a 2-D float16/bfloat16/float32 tensor with a unit "
                         f"last stride, got {tuple(x.shape)} {x.dtype} {tuple(x.stride())}")
    t, n = x.shape
    if weight.shape != (n,) or weight.stride(0) != 1 or weight.dtype not in _DTYPES:
        raise ValueError(f"{fn}: weight must be a contiguous [{n}] float tensor, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.stride(-1) != 1):
        raise ValueError(f"{fn}: residual must match x ({tuple(x.shape)}, {x.dtype}) with a "
                         f"unit last stride, got {tuple(residual.shape)}, {residual.dtype}")
    _check_scale(input_scale, fn)
    check_row_amax(clear, t, x.device, fn, "clear")
    xq, xs = _outputs(t, n, x.device)
    res = residual if residual is not None else x
    if t == 0:
        return xq, xs, res
    block, one_pass, warps = norm_row_config(n)
    _rms_norm_quant_kernel[(t,)](
        x, x.stride(0), res, res.stride(0), weight, xq, xq.stride(0), xs,
        input_scale if input_scale is not None else xs, clear if clear is not None else xs,
        eps, N=n, HAS_RESIDUAL=residual is not None, STATIC=input_scale is not None,
        Y_DTYPE=_TL_DTYPES[torch.promote_types(x.dtype, weight.dtype)], BLOCK=block,
        ONE_PASS=one_pass, CLEAR=clear is not None, num_warps=warps,
        **pdl_launch(x.device, row=t == 1))
    return xq, xs, res


def silu_and_mul_quant_triton(x: torch.Tensor, input_scale: torch.Tensor | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """`x [T, 2I]` (gate | up) -> `(xq [T, I] E4M3, scale [T, 1] float32)`:
    `silu_and_mul_quant_torch`'s numbers (up to the one-ulp difference of the model-dtype
    kernel, see `kernels/activation.py`) in one launch. No host syncs: CUDA-graph capturable."""
    fn = "silu_and_mul_quant_triton"
    if triton is None:
        raise RuntimeError(f"{fn} needs triton, which is not installed")
    if x.dim() != 2 or x.shape[-1] % 2 or x.stride(-1) != 1 or x.dtype not in _DTYPES:
        raise ValueError(f"{fn}: x must be [T, 2I] float16/bfloat16/float32 with a unit last "
                         f"stride, got {tuple(x.shape)} {x.dtype} {tuple(x.stride())}")
    _check_scale(input_scale, fn)
    t, inter = x.shape[0], x.shape[1] // 2
    xq, xs = _outputs(t, inter, x.device)
    if t == 0 or inter == 0:
        return xq, xs
    parts = row_split(t, inter, x.device) if input_scale is None else 1
    if parts > 1:
        chunk = triton.next_power_of_2(-(-inter // parts))
        _silu_mul_quant_split_kernel[(t, parts)](
            x, x.stride(0), xq, xq.stride(0), xs, *row_sync(x.device), INTER=inter,
            Y_DTYPE=_TL_DTYPES[x.dtype], CHUNK=chunk, PARTS=parts,
            num_warps=max(1, min(8, chunk // 256)), **pdl_launch(x.device, row=t == 1))
        return xq, xs
    block, one_pass, warps = silu_row_config(inter)
    _silu_mul_quant_kernel[(t,)](
        x, x.stride(0), xq, xq.stride(0), xs, input_scale if input_scale is not None else xs,
        INTER=inter, STATIC=input_scale is not None, Y_DTYPE=_TL_DTYPES[x.dtype], BLOCK=block,
        ONE_PASS=one_pass, num_warps=warps, **pdl_launch(x.device, row=t == 1))
    return xq, xs
