"""The FP8 (E4M3) KV cache format, and its plain-torch quantize / dequantize.

With `--kv-cache-dtype fp8` a layer's cache is K and V values `[blocks, block_size, Hkv, D]`
float8_e4m3fn, each beside its scales `[blocks, block_size, Hkv]` float32: one scale per
(token, KV head), computed when the token is written (dynamic, no calibration):
`s = max(amax(|x[t, h, :]|) / 448, 1e-12)`, `q = clamp(x / s, -448, 448)` rounded to E4M3
(ties to even). A stored scale *dequantizes*, `x ~= q.float() * s`: the convention of
`parallel/quant_fp8.py` (vLLM, TensorRT-LLM). The Triton writer (`rotary.py`) computes the
same numbers bit for bit (IEEE division, explicit rounding: `fp8_quant._quantize`).

Per token-head this costs D + 4 bytes instead of 2 * D (bf16): at D = 128, 132 / 256, i.e.
1.94x the tokens in the same memory.
"""

from __future__ import annotations

import torch
from trtdist.kernels.fp8_quant import FP8_MAX, MIN_SCALE

KV_FP8_DTYPE = torch.float8_e4m3fn
KV_SCALE_DTYPE = torch.float32


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., D]` -> (E4M3 `[..., D]`, float32 scales `[...]`), one scale per last-dim row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_(min=MIN_SCALE)  # [...]
    q = (xf / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor:
    """Cache values `[..., D]` and their scales `[...]` -> `dtype`; without scales (a cache
    in the model dtype) the values are returned as they are."""
    if scale is None:
        return q
    return (q.float() * scale[..., None]).to(dtype)
