"""FP8 (E4M3) quantization math: weights per output channel, activations per token (dynamic)
or per tensor (static), and the two GEMMs that consume them.

Scales follow the convention of vLLM / TensorRT-LLM / compressed-tensors: a stored scale `s`
*dequantizes*, `x ~= q.float() * s`, with `s = amax / 448` (448 = the largest E4M3 value).

- `fp8_linear_cuda`: `torch._scaled_mm` (cuBLASLt FP8, compute capability >= 8.9) with
  row-wise scales: `scale_a [M, 1]` per token, `scale_b [1, N]` per output channel, bf16 out.
- `fp8_linear_reference`: the same numbers in float32 on any device (the CPU path): the
  activations go through the identical per-token quantize -> dequantize, the weight is
  dequantized, so results equal the quantized model up to float32 summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# NOTE: an all-zero row or token gets this scale (not 0), so dividing by it stays finite.
_MIN_SCALE = 1e-12


def quantize_to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` rounded to E4M3, saturated at +-448 (E4M3FN has no infinity: values past
    448 would become NaN). `scale` broadcasts against `x`."""
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_weight_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] weight -> (E4M3 [N, K], float32 scale [N]) with scale = amax(row) / 448."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {tuple(w.shape)}")
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp_(min=_MIN_SCALE)  # [N]
    return quantize_to_fp8(w, scale[:, None]), scale


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (E4M3 [M, K], float32 scale [M, 1]), one scale per row."""
    scale = (x.float().abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_(min=_MIN_SCALE)
    return quantize_to_fp8(x, scale), scale


def quantize_activation(x: torch.Tensor, input_scale: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (dynamic, `input_scale` None) or with a calibrated per-tensor scale (static:
    values beyond the calibrated range saturate). Returns (E4M3 [M, K], scale [M, 1])."""
    if input_scale is None:
        return quantize_per_token(x)
    # NOTE: materialised (not an expand view): row-wise _scaled_mm wants a contiguous [M, 1].
    scale = input_scale.float().reshape(1, 1).expand(x.shape[0], 1).contiguous()  # [M, 1]
    return quantize_to_fp8(x, scale), scale


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


def fp8_linear_cuda(x: torch.Tensor, weight: torch.Tensor, weight_scale_row: torch.Tensor,
                    input_scale: torch.Tensor | None,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """`torch._scaled_mm` with per-token (or static, broadcast) activation scales and
    per-channel weight scales. `weight_scale_row` is the weight scale as `[1, N]` float32.

    NOTE: row-wise scaling only produces bf16, so fp16/fp32 models get a bf16 result cast
    back (one extra rounding, far below the FP8 error)."""
    shape = x.shape
    xq, xs = quantize_activation(x.reshape(-1, shape[-1]), input_scale)  # [M, K], [M, 1]
    y = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale_row,
                         out_dtype=torch.bfloat16)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(x.dtype).reshape(*shape[:-1], weight.shape[0])
