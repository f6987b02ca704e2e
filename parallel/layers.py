"""Tensor-parallel layers. Each holds only its shard and gets its TP communicator passed in.

Weights follow torch's Linear layout `[out_features, in_features]`; how they are stored and
multiplied is the layer's linear method (`parallel/linear_methods.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from trtdist.comm.base import Communicator
from trtdist.kernels import gemv
from trtdist.parallel.linear_methods import (
    Activation,
    ActivationWithAmax,
    Fp8LinearMethod,
    GatedActivation,
    LinearMethod,
    NormedActivation,
    QuantizedActivation,
    UnquantizedLinearMethod,
    empty_param,
    make_linear_method,
)

if TYPE_CHECKING:
    from trtdist.kernels.rotary import RotaryCacheWrite

__all__ = ["Activation", "ActivationWithAmax", "ColumnParallelLinear", "Fp8LinearMethod",
           "GatedActivation", "LinearMethod", "NormedActivation", "ParallelLMHead",
           "QuantizedActivation", "RowParallelLinear", "UnquantizedLinearMethod",
           "VocabParallelEmbedding", "make_linear_method"]


class _Linear(nn.Module):
    """What both parallel linear layers share: the linear method owns the weight's layout and
    GEMM; a bias, when there is one, stays in the model dtype."""

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device, quant: LinearMethod | None) -> None:
        super().__init__()
        self.method = quant or UnquantizedLinearMethod()
        self.method.create_weights(self, out_features, in_features, dtype, device)
        self.bias = empty_param((out_features,), dtype, device) if bias else None

    @property
    def wants_quantized_input(self) -> bool:
        """See `LinearMethod.wants_quantized_input`."""
        return self.method.wants_quantized_input(self)

    def wants_row_amax(self, rows: int) -> bool:
        """See `LinearMethod.wants_row_amax`."""
        return self.method.wants_row_amax(self, rows)

    def wants_fused_input(self, rows: int, kind: str) -> bool:
        """See `LinearMethod.wants_fused_input`."""
        return self.method.wants_fused_input(self, rows, kind)

    def wants_gated_output(self, rows: int) -> bool:
        """See `LinearMethod.wants_gated_output`."""
        return self.method.wants_gated_output(self, rows)

    def wants_rotary_output(self, rows: int, head_dim: int) -> bool:
        """See `LinearMethod.wants_rotary_output`."""
        return self.method.wants_rotary_output(self, rows, head_dim)

    @property
    def activation_scale(self) -> torch.Tensor | None:
        """The static FP8 input scale, or None (per token, or unquantized)."""
        return self.method.input_scale(self)


class ColumnParallelLinear(_Linear):
    """Y_local = X @ W_local^T: the output features are split; no communication.
    `quant` picks the linear method (default: unquantized)."""

    def __init__(self, in_features: int, out_local: int, bias: bool, dtype: torch.dtype,
                 device: torch.device, quant: LinearMethod | None = None) -> None:
        super().__init__(out_local, in_features, bias, dtype, device, quant)

    def forward(self, x: Activation) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    def forward_gated(self, x: Activation, amax: torch.Tensor) -> torch.Tensor | None:
        """A gate | up layer's SiLU(gate) * up (see `LinearMethod.apply_gated`), or None."""
        return self.method.apply_gated(self, x, self.bias, amax)

    def forward_rotary(self, x: Activation, rope: RotaryCacheWrite) -> torch.Tensor | None:
        """A q | k | v layer's output, rotated and written into the cache as `rope` says (see
        `LinearMethod.apply_rotary`), or None."""
        return self.method.apply_rotary(self, x, self.bias, rope)


class RowParallelLinear(_Linear):
    """Y = sum over ranks of X_local @ W_local^T: the input features are split, then an
    all-reduce. A bias is added once, after the reduction. With FP8 each rank's weight slice
    has its own per-output-channel scales (its GEMM is complete before the all-reduce)."""

    def __init__(self, in_local: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device, comm: Communicator,
                 quant: LinearMethod | None = None) -> None:
        super().__init__(out_features, in_local, bias, dtype, device, quant)
        self.comm = comm

    def forward(self, x: Activation) -> torch.Tensor:
        y = self.comm.all_reduce(self.method.apply(self, x, None))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Each rank holds rows [start, end) of the table; ids outside give zeros, then the
    all-reduce assembles the full embedding."""

    def __init__(self, vocab_start: int, vocab_end: int, local_rows: int, hidden: int,
                 dtype: torch.dtype, device: torch.device, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_start, self.vocab_end = vocab_start, vocab_end
        self.weight = nn.Parameter(torch.empty(local_rows, hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.comm.size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.comm.all_reduce(out)


class ParallelLMHead(nn.Module):
    """Vocab-parallel logits: each rank computes its slice, then a gather assembles
    `[T, vocab_size]` (padding columns dropped) on group rank 0 only, the rank that samples;
    the other ranks get their own slice `[T, V_local]` back (they only take part)."""

    SAMPLING_RANK = 0

    def __init__(self, local_rows: int, hidden: int, vocab_size: int, dtype: torch.dtype,
                 device: torch.device, comm: Communicator) -> None:
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.weight = nn.Parameter(torch.empty(local_rows, hidden, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = gemv.linear(x, self.weight)  # [T, V_local]
        if self.comm.size == 1:
            return local[:, : self.vocab_size]
        gathered = self.comm.gather(local, self.SAMPLING_RANK)  # [tp*T, V_local] on rank 0
        if self.comm.rank != self.SAMPLING_RANK:
            return local
        t = x.shape[0]
        full = gathered.view(self.comm.size, t, local.shape[1]).permute(1, 0, 2).reshape(t, -1)
        return full[:, : self.vocab_size]
