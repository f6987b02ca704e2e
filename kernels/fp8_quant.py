"""FP8 (E4M3) activation quantization in one launch: per token (dynamic) or per tensor (static).

`quantize_activation_triton(x, input_scale)` returns the same `(xq [M, K] float8_e4m3fn,
scale [M, 1] float32)` as `parallel.quant_fp8.quantize_activation` (the torch reference,
four to five small kernels: abs/amax, divide, clamp, cast): `scale = max(amax(row) / 448,
1e-12)` (dynamic) or `input_scale` (static), `xq = clamp(x / scale, -448, 448)` rounded to
E4M3. Both divisions are IEEE round-to-nearest (`div_rn`), so on a GPU the kernel's output is
bit-equal to the reference.

NOTE: Triton 3.6's interpreter rounds float32 -> float8 wrongly when the rounding carries into
the exponent (31.78 -> 16 instead of 32), so under the interpreter only the scales are
comparable; the quantized values are tested on a GPU.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # NOTE: CPU-only installs run the torch reference; kernels never launch.
    triton = None

    def _jit(fn):  # type: ignore[no-untyped-def]
        return fn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3FN value
MIN_SCALE = 1e-12  # mirrors parallel.quant_fp8._MIN_SCALE (an all-zero row stays finite)
# NOTE: jitted code may only read globals that are tl.constexpr (the interpreter is lenient).
_FP8_MAX_C = tl.constexpr(FP8_MAX) if triton is not None else FP8_MAX
_MIN_SCALE_C = tl.constexpr(MIN_SCALE) if triton is not None else MIN_SCALE
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK = 4096


def quantize_activation_torch(x: torch.Tensor, input_scale: torch.Tensor | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: `parallel.quant_fp8.quantize_activation` (imported lazily: imports flow
    parallel -> kernels)."""
    from trtdist.parallel.quant_fp8 import quantize_activation

    return quantize_activation(x, input_scale)


@_jit
def _quant_fp8_kernel(x_ptr, x_stride, q_ptr, q_stride, s_ptr, in_scale_ptr, K: tl.constexpr,
                      STATIC: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr):
    """Grid (M,): one program per token row. Dynamic: pass 1 takes the row's amax, pass 2
    quantizes (with ONE_PASS the row stays in registers between them).

    NOTE: K is a compile-time constant (a model has a handful of hidden sizes): the compiler
    then knows the row alignment and issues 16-byte loads; the interpreter also needs it."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_stride
    q_row = q_ptr + row * q_stride
    cols = tl.arange(0, BLOCK)
    if STATIC:
        scale = tl.load(in_scale_ptr).to(tl.float32)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), _FP8_MAX_C), _MIN_SCALE_C)
    if ONE_PASS:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_FP8_MAX_C), _FP8_MAX_C)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -_FP8_MAX_C), _FP8_MAX_C)
            tl.store(q_row + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def quantize_activation_triton(x: torch.Tensor, input_scale: torch.Tensor | None, *,
                               out: tuple[torch.Tensor, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[M, K]` activations -> `(xq [M, K] float8_e4m3fn, scale [M, 1] float32)`, per token
    (`input_scale` None) or with the static per-tensor `input_scale` (one float32 element).
    `out` may supply both outputs (preallocated). No host syncs: CUDA-graph capturable."""
    if triton is None:
        raise RuntimeError("quantize_activation_triton needs triton, which is not installed")
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(-1) != 1:
        raise ValueError(f"quantize_activation_triton: x must be a 2-D float16/bfloat16/float32 "
                         f"tensor with a unit last stride, got shape {tuple(x.shape)} "
                         f"{x.dtype} strides {tuple(x.stride())}")
    if input_scale is not None and (input_scale.numel() != 1
                                    or input_scale.dtype != torch.float32):
        raise ValueError(f"quantize_activation_triton: input_scale must hold one float32 value, "
                         f"got shape {tuple(input_scale.shape)} {input_scale.dtype}")
    m, k = x.shape
    if out is None:
        xq = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
        scale = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    else:
        xq, scale = out
        if (xq.shape != (m, k) or xq.dtype != FP8_DTYPE or xq.stride(-1) != 1
                or scale.shape != (m, 1) or scale.dtype != torch.float32
                or not scale.is_contiguous()):
            raise ValueError(f"quantize_activation_triton: out must be ([{m}, {k}] float8_e4m3fn, "
                             f"[{m}, 1] float32 contiguous), got ({tuple(xq.shape)} {xq.dtype}, "
                             f"{tuple(scale.shape)} {scale.dtype})")
    if k == 0:
        raise ValueError("quantize_activation_triton: x has no columns (K = 0)")
    if m == 0:
        return xq, scale
    block = min(triton.next_power_of_2(k), _MAX_BLOCK)
    in_scale = input_scale if input_scale is not None else scale  # unused when dynamic
    _quant_fp8_kernel[(m,)](
        x, x.stride(0), xq, xq.stride(0), scale, in_scale, K=k,
        STATIC=input_scale is not None, BLOCK=block, ONE_PASS=k <= block,
        num_warps=max(1, min(8, block // 512)))  # 8 bf16 values (16 bytes) per thread and load
    return xq, scale
