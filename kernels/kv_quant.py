"""The FP8 (E4M3) KV cache format, and its plain-torch quantize / dequantize.

With `--kv-cache-dtype fp8` a layer's cache is K and V values `[blocks, block_size, Hkv, D]`
float8_e4m3fn, each beside its scales `[blocks, block_size, Hkv]` float32: one scale per
(token, KV head), computed when the token is written (dynamic, no calibration):
`s = max(amax(|x[t, h, :]|) / 448, 1e-12)`, `q = clamp(x / s, -448, 448)` rounded to E4M3
(ties to even). A stored scale *dequantizes*, `x ~= q.float() * s`: the convention of
`parallel/quant_fp8.py` (vLLM, TensorRT-LLM). The Triton writer (`rotary.py`) computes the
same numbers bit for bit (IEEE division, explicit rounding: `fp8_quant.quantize_by_division`).

Per token-head this costs D + 4 bytes instead of 2 * D (bf16): at D = 128, 132 / 256, i.e.
1.94x the tokens in the same memory.

Rotated keys (QuaRot-style): the cache stores K *after* RoPE multiplied by an orthogonal
`R = kv_rotation(D)` (`k @ R`, rounded to the model dtype, then quantized), and the q that
attention receives is rotated the same way, so `(q R) . (k R) = q . k`: attention reads the
dequantized cache exactly as before, no backend knows about R. Why: where q and k share a few
large channels (typical of RoPE'd q and k), a score's quantization error (E4M3's error is
relative per element) is a few large terms q_i * err(k_i); rotated, every channel carries a
share of the outliers and the D error terms average out. V is stored as it is (its
quantization error in the output does not depend on a rotation, in expectation). Measured on
SmolLM2-135M (D = 64, the perplexity test of tests/test_kv_fp8.py, CPU): the FP8 cache's
perplexity change over the unquantized cache, float32 model +1.13% -> +0.17% with R
(rotating V too: +0.18%); bfloat16 model +1.06% -> -0.22% (a random orthogonal R instead:
+0.53%; R alone, on the bf16 cache: -0.13%, bf16 rounding).

`R = H2 (x) B / sqrt(2)` in the (half, lane) split of a head's D = 2 * half channels (the
rotate-half layout): `R[i, j] = (-1)^(i // half * j // half) * B[i % half, j % half] /
sqrt(2)`, `B` block-diagonal with Walsh-Hadamard blocks `(-1)^popcount(a & b) / sqrt(n)` of
n = the largest power of two dividing half. For D a power of two (64, 128) `R` is the
normalized Sylvester-Hadamard matrix `H_D / sqrt(D)`; D = 80 / 96 use blocks of 8 / 16.
"""

from __future__ import annotations

import functools
import math

import torch
from trtdist.kernels.fp8_quant import FP8_MAX, MIN_SCALE

KV_FP8_DTYPE = torch.float8_e4m3fn
KV_SCALE_DTYPE = torch.float32


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., D]` -> (E4M3 `[..., D]`, float32 scales `[...]`), one scale per last-dim row."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_(min=MIN_SCALE)  # [...]
    # NOTE: fmax / fmin, as the Triton writer's max / min: a NaN becomes -448, so a cache never
    # holds a NaN code (attention reads whole pages, see kernels/triton_attention.py)
    bound = xf.new_tensor(FP8_MAX)
    q = torch.fmin(torch.fmax(xf / scale[..., None], -bound), bound).to(KV_FP8_DTYPE)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype
                  ) -> torch.Tensor:
    """Cache values `[..., D]` and their scales `[...]` -> `dtype`; without scales (a cache
    in the model dtype) the values are returned as they are."""
    if scale is None:
        return q
    return (q.float() * scale[..., None]).to(dtype)


def kv_rotation_block(head_dim: int) -> int:
    """The size n of `kv_rotation`'s Walsh-Hadamard blocks: the largest power of two that
    divides head_dim / 2."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"kv_rotation: head_dim must be even and positive, got {head_dim}")
    half = head_dim // 2
    return half & -half


@functools.lru_cache(maxsize=16)
def kv_rotation(head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The FP8 cache's orthogonal key rotation `R` `[D, D]` float32 (see the module docstring),
    built in float64 and rounded once; cached per (head_dim, device): do not modify it."""
    half, n = head_dim // 2, kv_rotation_block(head_dim)
    a = torch.arange(half)
    bits = a[:, None] & a[None, :] & (n - 1)  # [half, half], in-block indices
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    same_block = (a[:, None] // n) == (a[None, :] // n)
    block = torch.where(same_block, 1.0 - 2.0 * parity.double(), 0.0) / math.sqrt(n)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64) / math.sqrt(2)
    return torch.kron(h2, block).to(device=device, dtype=torch.float32)


def rotate_kv(x: torch.Tensor) -> torch.Tensor:
    """`[..., D]` -> `x @ kv_rotation(D)` computed in float32, rounded once to x's dtype."""
    return (x.float() @ kv_rotation(x.shape[-1], x.device)).to(x.dtype)
