"""FP8 (E4M3) quantization math: weights per output channel, activations per token (dynamic)
or per tensor (static), and the two GEMMs that consume them.

Scales follow the convention of vLLM / TensorRT-LLM / compressed-tensors: a stored scale `s`
*dequantizes*, `x ~= q.float() * s`, with `s = amax / 448` (448 = the largest E4M3 value).

- `fp8_linear_cuda`: at M <= 16 (decode) the Triton small-M GEMM of `kernels/fp8_gemm.py`;
  above, the fused quantization of `kernels/fp8_quant.py` and `torch._scaled_mm` (cuBLASLt
  FP8, compute capability >= 8.9) with row-wise scales: `scale_a [M, 1]` per token,
  `scale_b [1, N]` per output channel, bf16 out.
- `fp8_linear_reference`: the same numbers in float32 on any device (the CPU path): the
  activations go through the identical per-token quantize -> dequantize, the weight is
  dequantized, so results equal the quantized model up to float32 summation order.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from trtdist.kernels.rotary import RotaryCacheWrite

_log = logging.getLogger("trtdist")

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# NOTE: an all-zero row or token gets this scale (not 0), so dividing by it stays finite.
_MIN_SCALE = 1e-12


def quantize_to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` rounded to E4M3, saturated at +-448 (E4M3FN has no infinity: values past
    448 would become NaN). `scale` broadcasts against `x`. Weights (build time)."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows_to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Activations: `x * (1 / scale)` (float32, the reciprocal correctly rounded) rounded to
    E4M3, saturated at +-448. NOTE: a multiply by the row's reciprocal rather than a division
    per element (as vLLM and TensorRT-LLM quantize): the GEMM that consumes a model-dtype
    activation quantizes it on the fly (`kernels/fp8_gemm.py`, once per program), where an
    IEEE division per element would cost ~10 instructions. Every kernel uses this formula."""
    return (x.float() * torch.reciprocal(scale.float())).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """The dequantizing per-token scale of rows whose max |value| is `amax`."""
    return (amax.float() / FP8_MAX).clamp_(min=_MIN_SCALE)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (E4M3 [N, K], float32 scale [N]) with scale = amax(row) / 448."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp_(min=_MIN_SCALE)  # [N]
    return quantize_to_fp8(w, scale[:, None]), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (E4M3 [M, K], float32 scale [M, 1]), one scale per row."""
    scale = scale_from_amax(x.float().abs().amax(dim=-1, keepdim=True))
    return quantize_rows_to_fp8(x, scale), scale


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (dynamic, `input_scale` None) or with a calibrated per-tensor scale (static:
    values beyond the calibrated range saturate). Returns (E4M3 [M, K], scale [M, 1])."""
    if input_scale is None:
        return quantize_per_token(x)
    # NOTE: materialised (not an expand view): row-wise _scaled_mm wants a contiguous [M, 1].
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()  # [M, 1]
    return quantize_rows_to_fp8(x, scale), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    """E4M3 values times their (broadcasting) scale, in `dtype`."""
    return (q.float() * scale.float()).to(dtype)


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    """DeepSeek-style block scales: `q [N, K]` with `scale_inv [ceil(N/bn), ceil(K/bk)]`, one
    (dequantizing) scale per bn x bk tile. Returns float32 [N, K]."""
    bn, bk = block
    n, k = q.shape
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"block-wise scale of shape {tuple(scale_inv.shape)} does not match a "
                         f"[{n}, {k}] weight in {bn}x{bk} blocks (expected {want})")
    s = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return q.float() * s


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         input_scale: torch.Tensor | None,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """The FP8 GEMM's numbers in float32 on any device: `[M, K] x [N, K] -> [M, N]` in x's
    dtype. Exact to the quantized model (activations quantized the same way as on GPU)."""
    xq, xs = quantize_activation(x.reshape(-1, x.shape[-1]), input_scale)
    y = F.linear(dequantize(xq, xs), dequantize(weight, weight_scale[:, None]))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_linear_quantized_reference(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                                   weight_scale: torch.Tensor, bias: torch.Tensor | None,
                                   out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_linear_reference` for an activation already quantized (`xq [M, K]` E4M3, `xs
    [M, 1]`): the same float32 numbers, `[M, N]` in `out_dtype`."""
    y = F.linear(dequantize(xq, xs), dequantize(weight, weight_scale[:, None]))
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def check_fp8_device(device: torch.device) -> None:
    """Raise unless `device` can run FP8 GEMMs (CPU: the reference path; CUDA: cc >= 8.9)."""
    if device.type != "cuda":
        return
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"FP8 GEMMs need compute capability 8.9 or newer (Ada, Hopper, "
                         f"Blackwell); {name} on {device} has {cc[0]}.{cc[1]}. Use an "
                         "unquantized engine (--quant none) on this GPU")


def scaled_mm_supported(n: int, k: int) -> bool:
    """cuBLASLt FP8 needs both the reduction and output dimensions to be multiples of 16."""
    return n % 16 == 0 and k % 16 == 0


_fast: dict[str, object] = {}  # the Triton kernels once imported; {"off": reason} if not


def _fast_kernels() -> dict[str, object]:
    """Import `kernels.fp8_quant` / `kernels.fp8_gemm` once; on failure warn and stay on the
    torch path (a broken kernel must not take FP8 inference down)."""
    if not _fast:
        try:
            # NOTE: the fused producers too (models call them directly): if any of these
            # fails to import, the FP8 layers stop asking for quantized input.
            from trtdist.kernels.fp8_fused import (
                rms_norm_quant_triton,
                silu_and_mul_quant_triton,
            )
            from trtdist.kernels.fp8_gemm import (
                SMALL_M_MAX,
                fp8_gemm_small_m,
                fp8_gemm_small_m_quantizing,
                fp8_linear_small_m,
            )
            from trtdist.kernels.fp8_quant import quantize_activation_triton
        except Exception as e:  # noqa: BLE001 - any import failure means: use torch
            _disable_fast(f"import failed: {e!r}")
        else:
            _fast.update(quant=quantize_activation_triton, small_m=fp8_linear_small_m,
                         gemm=fp8_gemm_small_m, gemm_quantizing=fp8_gemm_small_m_quantizing,
                         small_m_max=SMALL_M_MAX,
                         norm_quant=rms_norm_quant_triton, silu_quant=silu_and_mul_quant_triton)
    return _fast


def fused_quantization_available() -> bool:
    """Whether the Triton kernels that produce FP8 activations (`kernels/fp8_fused.py`) and the
    small-M GEMM are usable (imported, not disabled after a failure)."""
    return "off" not in _fast_kernels()


def _disable_fast(reason: str) -> None:
    _fast.clear()
    _fast["off"] = reason
    _log.warning("FP8 Triton kernels disabled, using torch quantization + _scaled_mm: %s",
                 reason)


def fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale_row: torch.Tensor,
                    input_scale: torch.Tensor | None,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """FP8 linear on CUDA; `weight_scale_row` is the weight scale as `[1, N]` float32.

    - M <= SMALL_M_MAX (decode): `kernels.fp8_gemm.fp8_linear_small_m`, a bandwidth-bound
      Triton GEMM reading each FP8 weight once, output written directly in x's dtype.
    - larger M: the fused Triton quantization (`kernels.fp8_quant`, one launch) and
      `torch._scaled_mm` (cuBLASLt) with row-wise scales and `use_fast_accum=True`.
    If the Triton kernels fail to import or to run, a warning is logged once and the torch
    quantization (`quantize_activation`) is used from then on.

    NOTE: row-wise scaling in `_scaled_mm` only produces bf16, so fp16/fp32 models get a bf16
    result cast back (one extra rounding, far below the FP8 error)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])  # [M, K]
    fast = _fast_kernels()
    xq = xs = None
    if "off" not in fast:
        try:
            if x2.shape[0] <= fast["small_m_max"] and x2.stride(-1) == 1:  # type: ignore[operator]
                y = fast["small_m"](x2, weight, weight_scale_row.view(-1),  # type: ignore[operator]
                                    input_scale, bias)
                return y.reshape(*shape[:-1], weight.shape[0])
            xq, xs = fast["quant"](x2.contiguous(), input_scale)  # type: ignore[operator]
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or launch
            _disable_fast(f"{type(e).__name__}: {e}")
            xq = xs = None
    if xq is None:
        xq, xs = quantize_activation(x2, input_scale)  # [M, K], [M, 1]
    y = _scaled_mm(xq, xs, weight, weight_scale_row, bias, x.dtype)
    return y.reshape(*shape[:-1], weight.shape[0])


def _scaled_mm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
               weight_scale_row: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale_row,
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(out_dtype)


def fp8_linear_quantized_cuda(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                              weight_scale_row: torch.Tensor, bias: torch.Tensor | None,
                              out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_linear_cuda` for an activation already quantized by the kernel that produced it
    (`kernels/fp8_fused.py`): `xq [M, K]` E4M3, `xs [M, 1]` float32 -> `[M, N]` in
    `out_dtype`. The small-M GEMM at M <= SMALL_M_MAX (falling back as there), else
    `torch._scaled_mm`."""
    fast = _fast_kernels()
    if "off" not in fast and xq.shape[0] <= fast["small_m_max"]:  # type: ignore[operator]
        try:
            return fast["gemm"](xq, xs, weight, weight_scale_row.view(-1),  # type: ignore[operator]
                                bias, out_dtype)
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or launch
            _disable_fast(f"{type(e).__name__}: {e}")
    return _scaled_mm(xq, xs, weight, weight_scale_row, bias, out_dtype)


# ---- one-token GEMMs on the streaming GEMV (kernels/fp8_gemv_stream.py, Hopper) ----
_fused_input_off: list[str] = []  # set once a launch failed: the layers stop asking


def fused_input_supported(weight: torch.Tensor, dtype: torch.dtype, kind: str) -> bool:
    """Whether a one-token FP8 GEMM of `weight` can take its input unnormalised (`kind`
    "norm": RMSNorm of x + residual), ungated ("gated": SiLU x up) or unquantized ("plain")
    and compute it itself, per CTA, in the launch that streams the weight
    (`kernels/fp8_gemv_stream.py`: Hopper; opt-in, TRTDIST_STREAM_GEMV_FUSED)."""
    if _fused_input_off or not weight.is_cuda:
        return False
    from trtdist.kernels import fp8_gemv_stream

    n, k = weight.shape
    return fp8_gemv_stream.supports_prologue(n, k, dtype, weight.device, kind)


def _fused_input(launch: str, *args: object) -> torch.Tensor | None:
    """Run `fp8_gemv_stream.<launch>(*args)`, or None after turning the fused inputs off (with
    a warning) when it fails: the caller then computes the input the usual way."""
    from trtdist.kernels import fp8_gemv_stream

    try:
        return getattr(fp8_gemv_stream, launch)(*args)
    except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or launch
        _fused_input_off.append(f"{type(e).__name__}: {e}")
        _log.warning("FP8 GEMMs with fused inputs disabled (%s failed: %s); using the norm / "
                     "SiLU kernels", launch, _fused_input_off[0])
        return None


def fp8_linear_norm_cuda(x: torch.Tensor, residual: torch.Tensor | None,
                         residual_out: torch.Tensor | None, norm_weight: torch.Tensor,
                         eps: float, weight: torch.Tensor, weight_scale_row: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor | None:
    """`fp8_linear(RMSNorm(x + residual) * norm_weight)` of one token in one launch, writing
    `x + residual` into `residual_out` (`fused_input_supported`); None if the launch failed."""
    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)
    return _fused_input("fp8_gemv_stream_norm", x, residual, residual_out, norm_weight, eps,
                        weight, weight_scale_row.view(-1), bias, out)


def fp8_linear_silu_cuda(gate_up: torch.Tensor, weight: torch.Tensor,
                         weight_scale_row: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor | None:
    """`fp8_linear(SiLU(gate) * up)` of one token `[1, 2K]` in one launch; None if it failed."""
    out = torch.empty((1, weight.shape[0]), dtype=gate_up.dtype, device=gate_up.device)
    return _fused_input("fp8_gemv_stream_silu", gate_up, weight, weight_scale_row.view(-1),
                        bias, out)


def fp8_linear_dynamic_cuda(x: torch.Tensor, weight: torch.Tensor,
                            weight_scale_row: torch.Tensor,
                            bias: torch.Tensor | None) -> torch.Tensor | None:
    """`fp8_linear(x)` of one token `[1, K]`, quantized per token inside the launch (no
    quantize kernel, no amax slot); None if it failed."""
    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)
    return _fused_input("fp8_gemv_stream_dynamic", x, weight, weight_scale_row.view(-1), bias,
                        out)


def stream_gemv_takes(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a one-token FP8 GEMM of `weight` with a model-dtype input runs on the streaming
    GEMV (`kernels/fp8_gemv_stream.py`, Hopper), which quantizes from a row amax at any
    shape."""
    if not weight.is_cuda:
        return False
    from trtdist.kernels import fp8_gemv_stream

    n, k = weight.shape
    return fp8_gemv_stream.supports(1, n, k, dtype, dtype, weight.device)


def gated_output_supported(weight: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a one-token FP8 gate | up GEMM of `weight [2I, K]` can return SiLU(gate) * up
    with its row amax directly (`kernels/fp8_gemv_stream.py`: with the streaming GEMV, unless
    TRTDIST_STREAM_GEMV_GATED=0)."""
    if _fused_input_off or not weight.is_cuda:
        return False
    from trtdist.kernels import fp8_gemv_stream

    n, k = weight.shape
    return (fp8_gemv_stream.gated_enabled() and n % 32 == 0
            and fp8_gemv_stream.supports(1, n, k, FP8_DTYPE, dtype, weight.device))


def fp8_linear_gated_cuda(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                          weight_scale_row: torch.Tensor, bias: torch.Tensor | None,
                          out_dtype: torch.dtype, amax: torch.Tensor) -> torch.Tensor | None:
    """SiLU(gate) * up `[1, I]` of the one-token gate | up GEMM of the E4M3 row `xq` (scale
    `xs`), its max |value| maxed into `amax[0]` (`gated_output_supported`); None if the launch
    failed."""
    out = torch.empty((1, weight.shape[0] // 2), dtype=out_dtype, device=xq.device)
    return _fused_input("fp8_gemv_stream_gated", xq, xs.reshape(1), 0, weight,
                        weight_scale_row.view(-1), bias, out, amax)


def rotary_output_supported(weight: torch.Tensor, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether a one-token FP8 q | k | v GEMM of `weight` can also rotate q and k and write k
    and v into a model-dtype cache (`kernels/fp8_gemv_stream.py`: with the streaming GEMV,
    unless TRTDIST_STREAM_GEMV_ROTARY=0)."""
    if _fused_input_off or not weight.is_cuda:
        return False
    from trtdist.kernels import fp8_gemv_stream

    n, k = weight.shape
    return fp8_gemv_stream.supports_rotary(n, k, dtype, head_dim, weight.device)


def fp8_linear_rotary_cuda(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor,
                           weight_scale_row: torch.Tensor, bias: torch.Tensor | None,
                           out_dtype: torch.dtype, rope: RotaryCacheWrite) -> torch.Tensor | None:
    """The one-token q | k | v row `[1, N]` of the E4M3 row `xq` (scale `xs`), q and k rotated
    and k, v written into the cache (`rotary_output_supported`); None if the launch failed."""
    out = torch.empty((1, weight.shape[0]), dtype=out_dtype, device=xq.device)
    return _fused_input("fp8_gemv_stream_rotary", xq, xs.reshape(1), 0, weight,
                        weight_scale_row.view(-1), bias, out, rope)


def fp8_linear_amax_cuda(x: torch.Tensor, row_amax: torch.Tensor, weight: torch.Tensor,
                         weight_scale_row: torch.Tensor,
                         bias: torch.Tensor | None) -> torch.Tensor:
    """`fp8_linear_cuda` (per token) of the model-dtype `x [M, K]` whose rows' max |value| the
    producer wrote into `row_amax` (>= M float32 values): at M <= SMALL_M_MAX one launch, the
    small-M GEMM quantizing its tiles from the amax; otherwise (or if the kernel fails) the
    amax is not needed and `fp8_linear_cuda` quantizes as usual. Same numbers either way."""
    fast = _fast_kernels()
    m = x.shape[0]
    if ("off" not in fast and x.dim() == 2 and m <= fast["small_m_max"]  # type: ignore[operator]
            and m <= row_amax.numel() and x.stride(-1) == 1):
        try:
            return fast["gemm_quantizing"](x, row_amax, None, weight,  # type: ignore[operator]
                                           weight_scale_row.view(-1), bias)
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile or launch
            _disable_fast(f"{type(e).__name__}: {e}")
    return fp8_linear_cuda(x, weight, weight_scale_row, None, bias)
