"""FP8 (E4M3) activation quantization in one launch: per token (dynamic) or per tensor (static).

`quantize_activation_triton(x, input_scale)` returns the same `(xq [M, K] float8_e4m3fn,
scale [M, 1] float32)` as `parallel.quant_fp8.quantize_activation` (the torch reference,
four to five small kernels: abs/amax, divide, clamp, cast): `scale = max(amax(row) / 448,
1e-12)` (dynamic) or `input_scale` (static), `xq = clamp(x * (1 / scale), -448, 448)` rounded
to E4M3. Both divisions (`amax / 448` and the row's reciprocal) are IEEE round-to-nearest
(`div_rn`) and the rounding to E4M3 is done explicitly in the interpreter
(`_round_to_e4m3`, ties to even like torch's cast), so the kernel's output is bit-equal to the
reference on a GPU and in Triton's interpreter alike.
"""

from __future__ import annotations

import os

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3FN value
MIN_SCALE = 1e-12  # mirrors parallel.quant_fp8._MIN_SCALE (an all-zero row stays finite)
# NOTE: jitted code may only read globals that are tl.constexpr (the interpreter is lenient).
_FP8_MAX_C = tl.constexpr(FP8_MAX) if triton is not None else FP8_MAX
_MIN_SCALE_C = tl.constexpr(MIN_SCALE) if triton is not None else MIN_SCALE
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK = 4096


def check_row_amax(slots: torch.Tensor | None, rows: int, device: torch.device, where: str,
                   name: str = "row_amax") -> None:
    """Row-amax slots (the handoff of a producer's per-row max |value| to the FP8 GEMM that
    quantizes its output, `kernels/fp8_gemm.py`) must be a contiguous float32 tensor of at
    least `rows` elements on `device`; None passes."""
    if slots is not None and (slots.dtype != torch.float32 or not slots.is_contiguous()
                              or slots.numel() < rows or slots.device != device):
        raise ValueError(f"{where}: {name} must be a contiguous float32 tensor of >= {rows} "
                         f"elements on {device}, got {tuple(slots.shape)} {slots.dtype} on "
                         f"{slots.device}")


def max_rows_into(row_amax: torch.Tensor, out: torch.Tensor) -> None:
    """`row_amax[:T] = max(row_amax[:T], max |out[t]|)` for rows `[T, ...]` (torch ops: the
    reference and prefill paths of the producers)."""
    t = out.shape[0]
    torch.maximum(row_amax[:t], out.reshape(t, -1).abs().amax(dim=1).float(),
                  out=row_amax[:t])


def quantize_activation_torch(x: torch.Tensor, input_scale: torch.Tensor | None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: `parallel.quant_fp8.quantize_activation` (imported lazily: imports flow
    parallel -> kernels)."""
    from trtdist.parallel.quant_fp8 import quantize_activation

    return quantize_activation(x, input_scale)


@_jit
def _round_to_e4m3(v):
    """float32 `v` within [-448, 448] -> the nearest E4M3 value (ties to even), as float32.

    NOTE: explicit so that the kernel's numbers are the same on a GPU and in Triton's
    interpreter (whose float32 -> float8 cast mis-rounds when the rounding carries into the
    exponent: 31.78 -> 16); the cast of the rounded value is then exact everywhere. Normal
    E4M3 (|v| >= 2^-6) keeps 3 mantissa bits: round float32's 23 at bit 20, ties to even.
    Subnormal E4M3 is a multiple of 2^-9: adding and subtracting 1.5 * 2^14 (float32 spacing
    2^-9 there) rounds to it, ties to even. The sign is put back by bits (-x is 0 - x in
    Triton, which would lose -0)."""
    bits = v.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    sign = bits ^ mag
    normal = (mag + 0x7FFFF + ((mag >> 20) & 1)) & -1048576  # clear the low 20 bits
    a = mag.to(tl.float32, bitcast=True)
    sub = ((a + 24576.0) - 24576.0).to(tl.int32, bitcast=True)
    return (tl.where(a < 0.015625, sub, normal) | sign).to(tl.float32, bitcast=True)


# NOTE: on a GPU the float32 -> E4M3 cast (`cvt.rn.satfinite.e4m3x2.f32`) rounds to nearest
# even, as `_round_to_e4m3` does, so there the explicit rounding is skipped: it was about a
# third of the SiLU x up + quantize kernel's instructions, which is instruction-bound at
# large batches. The interpreter (whose cast mis-rounds) keeps it.
_EXPLICIT_ROUND = (tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1") if triton is not None
                   else True)


@_jit
def inverse_scale(scale):
    """`1 / scale`, correctly rounded (what `_quantize` multiplies by)."""
    return tl.math.div_rn(1.0, scale)


@_jit
def dynamic_scale(amax):
    """The per-token scale of a row whose max |value| is `amax`: `max(amax / 448, 1e-12)`."""
    return tl.maximum(tl.math.div_rn(amax, _FP8_MAX_C), _MIN_SCALE_C)


@_jit
def _saturate(v):
    """`clamp(v, -448, 448)`, to be cast to E4M3: float32 rounded to an E4M3 value in the
    interpreter, left to the cast's identical rounding on a GPU."""
    v = tl.minimum(tl.maximum(v, -_FP8_MAX_C), _FP8_MAX_C)
    if _EXPLICIT_ROUND:
        v = _round_to_e4m3(v)
    return v


@_jit
def quantize_by_division(x, scale):
    """`clamp(x / scale, -448, 448)` with an IEEE division per element, to be cast to E4M3:
    the FP8 KV cache's formula (`kv_quant.py`, whose per-(token, head) scales are written by
    the same kernel, so no consumer needs the reciprocal form)."""
    return _saturate(tl.math.div_rn(x, scale))


@_jit
def _quantize(x, inv):
    """`clamp(x * inv, -448, 448)` (`inv` = `inverse_scale(scale)`), to be cast to E4M3."""
    return _saturate(x * inv)


# ---- rows split over several programs (decode: a handful of token rows) -----------------
# NOTE: at one to four token rows a per-row program is one SM doing all of a row's
# divisions and roundings (instruction-bound: 6.7 us for the 14,336-wide SiLU x up row of
# llama3-8b at batch 1). Split across programs, the row's amax needs every part: the parts
# meet at a per-row barrier in global memory. All parts of a row must be resident at once, so
# the split is used only where rows * parts is well under the SM count, on a GPU (never in
# the interpreter, which runs programs one after another).
MAX_SPLIT_ROWS = 4
MAX_PARTS = 64  # a launch moves a row's counter by exactly this much
_MAX_PARTS_C = tl.constexpr(MAX_PARTS) if triton is not None else MAX_PARTS
ROW_SPLIT_ENV = "TRTDIST_ROW_SPLIT"  # "0": one program a row always
_row_syncs: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def row_sync(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row barrier of `device`: counters `[MAX_SPLIT_ROWS]` int64 (a multiple of
    MAX_PARTS between launches) and the parts' amaxes `[MAX_SPLIT_ROWS, MAX_PARTS]` float32.
    Allocated once and kept: CUDA graphs replay into their addresses. Kernels on one stream
    use them one after another."""
    bufs = _row_syncs.get(device)
    if bufs is None:
        bufs = (torch.zeros(MAX_SPLIT_ROWS, dtype=torch.int64, device=device),
                torch.zeros((MAX_SPLIT_ROWS, MAX_PARTS), dtype=torch.float32, device=device))
        _row_syncs[device] = bufs
    return bufs


def row_split(rows: int, width: int, device: torch.device, chunk: int = 1024) -> int:
    """How many programs share each row (1 = one program a row): split rows of a small batch
    into `chunk`-wide parts where the GPU allows it (see the note above)."""
    if (device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
            or os.environ.get(ROW_SPLIT_ENV, "1") == "0" or rows > MAX_SPLIT_ROWS
            or width <= chunk):
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    parts = -(-width // chunk)
    return parts if parts <= MAX_PARTS and rows * parts <= sms // 2 else 1


@_jit
def row_amax_across_parts(cnt_ptr, amax_ptr, row, part, amax, PARTS: tl.constexpr):
    """The amax of a row whose PARTS programs (grid axis 1) each hold the amax of their part:
    each stores its own and adds to the row's counter (part 0 adds the rest of MAX_PARTS, so
    a launch moves the counter by exactly MAX_PARTS and nothing is ever reset), waits until
    the counter passes its launch's end, then reads every part's amax. One atomic and one
    polling load a program. NOTE: the first version (acq_rel atomics, slots reset by the last
    part to leave) ran the FP8 batch-1 step 0.37 ms slower over 128 split launches a step
    (H200: 3.41 against 3.04 ms), ~3 us a launch."""
    tl.store(amax_ptr + row * _MAX_PARTS_C + part, amax)
    tl.debug_barrier()
    inc = tl.where(part == 0, 1 + _MAX_PARTS_C - PARTS, 1).to(tl.int64)
    ticket = tl.atomic_add(cnt_ptr + row, inc, sem="release")
    end = (ticket // _MAX_PARTS_C + 1) * _MAX_PARTS_C
    seen = tl.atomic_add(cnt_ptr + row, 0, sem="acquire")
    while seen < end:
        seen = tl.atomic_add(cnt_ptr + row, 0, sem="acquire")
    offs = tl.arange(0, _MAX_PARTS_C)
    parts = tl.load(amax_ptr + row * _MAX_PARTS_C + offs, mask=offs < PARTS, other=0.0,
                    cache_modifier=".cg")
    return tl.max(parts, axis=0)


@_jit
def _quant_fp8_kernel(x_ptr, x_stride, q_ptr, q_stride, s_ptr, in_scale_ptr, K: tl.constexpr,
                      STATIC: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr,
                      PDL: tl.constexpr):
    """Grid (M,): one program per token row. Dynamic: pass 1 takes the row's amax, pass 2
    quantizes (with ONE_PASS the row stays in registers between them).

    NOTE: K is a compile-time constant (a model has a handful of hidden sizes): the compiler
    then knows the row alignment and issues 16-byte loads; the interpreter also needs it."""
    pdl_wait(PDL)
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
        scale = dynamic_scale(tl.max(amax, axis=0))
    inv = inverse_scale(scale)
    pdl_trigger(PDL)
    if ONE_PASS:
        mask = cols < K
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        q = _quantize(x, inv)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        for k0 in range(0, K, BLOCK):
            mask = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=mask, other=0.0).to(tl.float32)
            q = _quantize(x, inv)
            tl.store(q_row + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def quant_row_config(k: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the quantize launch: 8 bf16 values (16 bytes) a thread and load."""
    block = min(triton.next_power_of_2(k), _MAX_BLOCK)
    return block, max(1, min(8, block // 512))


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
    block, warps = quant_row_config(k)
    in_scale = input_scale if input_scale is not None else scale  # unused when dynamic
    _quant_fp8_kernel[(m,)](
        x, x.stride(0), xq, xq.stride(0), scale, in_scale, K=k,
        STATIC=input_scale is not None, BLOCK=block, ONE_PASS=k <= block,
        num_warps=warps, **pdl_launch(x.device, row=m == 1))
    return xq, scale
