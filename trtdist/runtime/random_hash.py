"""Counter-based random numbers for sampling: a pure function of (seed, position, token id).

A splitmix64 finalizer over int64 torch ops (the same on CPU and CUDA, batched over every
row and candidate at once). The noise of one (seed, position) row does not depend on what
else is in the batch nor on which candidates another row keeps, so a seeded request draws the
same tokens alone or batched, and after preemption and recomputation.
"""

from __future__ import annotations

import torch

_U64 = 1 << 64


def _signed(x: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return x - _U64 if x >= 1 << 63 else x


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 (multiplication wraps modulo 2**64)."""
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def uniform(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1), float32 `[N, K]`, for int64 `seeds [N]`, `positions [N]`
    and token `ids [N, K]`: 24 random bits per value, never 0 or 1."""
    key = mix64(mix64(seeds * _GOLDEN + 1) ^ positions)  # [N] one stream per row
    z = mix64(key[:, None] + (ids + 1) * _GOLDEN)  # [N, K]
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel(seeds: torch.Tensor, positions: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise `[N, K]`: argmax(logits + noise) draws from softmax(logits)
    (the exponential race argmax(p / q), q ~ Exp(1), in log space)."""
    return -torch.log(-torch.log(uniform(seeds, positions, ids)))
