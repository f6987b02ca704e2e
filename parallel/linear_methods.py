"""Linear methods: how a linear layer stores and multiplies its weight (unquantized, FP8),
and the FP8 activation a producer kernel may hand the FP8 method already quantized.

Both parallel linear layers of `parallel/layers.py` delegate to one method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from trtdist.kernels import fp8_gemm_configs, gemv
from trtdist.parallel.quant import QuantConfig
from trtdist.parallel.quant_fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    check_fp8_device,
    dequantize,
    fp8_linear_amax_cuda,
    fp8_linear_cuda,
    fp8_linear_dynamic_cuda,
    fp8_linear_gated_cuda,
    fp8_linear_norm_cuda,
    fp8_linear_quantized_cuda,
    fp8_linear_quantized_reference,
    fp8_linear_reference,
    fp8_linear_rotary_cuda,
    fp8_linear_silu_cuda,
    fused_input_supported,
    fused_quantization_available,
    gated_output_supported,
    quantize_weight_per_channel,
    rotary_output_supported,
    scaled_mm_supported,
    stream_gemv_takes,
)

if TYPE_CHECKING:
    from trtdist.kernels.rotary import RotaryCacheWrite


@dataclass(frozen=True, slots=True)
class QuantizedActivation:
    """An activation already quantized to FP8 by the kernel that produced it (the fused
    RMSNorm or SiLU x up of `kernels/fp8_fused.py`), handed to a linear layer whose method
    `wants_quantized_input`: saves the separate quantization launch."""

    q: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T, 1] float32, dequantizing: x ~= q * scale
    dtype: torch.dtype  # the model dtype: the linear layer's output dtype

    @property
    def shape(self) -> torch.Size:
        """The activation's shape `[T, K]` (as the model-dtype tensor it replaces)."""
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device


@dataclass(frozen=True, slots=True)
class ActivationWithAmax:
    """An activation in the model dtype with each row's max |value| as written by the kernel
    that produced it (the SiLU x up, the attention's merge), handed to an FP8 linear layer
    whose method `wants_row_amax`: its GEMM quantizes the rows itself, per token, so no
    separate quantization launch runs. `amax` holds at least T values; only the first T
    are read."""

    x: torch.Tensor  # [T, K] model dtype
    amax: torch.Tensor  # [>= T] float32


@dataclass(frozen=True, slots=True)
class NormedActivation:
    """The row `RMSNorm(x + residual) * weight` (vLLM's fused add + norm), not computed yet:
    handed to a linear layer whose method `wants_fused_input(layer, 1, "norm")`, whose GEMM
    computes it from x and the residual itself and writes `x + residual` into `residual_out`
    (no norm launch). Without a residual it is `RMSNorm(x) * weight` and nothing is written."""

    x: torch.Tensor  # [1, K] model dtype
    residual: torch.Tensor | None  # [1, K]
    residual_out: torch.Tensor | None  # [1, K], not aliasing x or residual
    weight: torch.Tensor  # [K]
    eps: float

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def device(self) -> torch.device:
        return self.x.device

    def materialize(self) -> torch.Tensor:
        """The normalised row, computed by the norm kernels (and `residual_out` written)."""
        from trtdist.kernels.norm import add_rms_norm, rms_norm

        if self.residual is None:
            return rms_norm(self.x, self.weight, self.eps)
        assert self.residual_out is not None
        self.residual_out.copy_(self.residual)
        return add_rms_norm(self.x, self.residual_out, self.weight, self.eps)[0]


@dataclass(frozen=True, slots=True)
class GatedActivation:
    """The row `SiLU(gate) * up` of `gate_up [1, 2K]`, not computed yet: handed to a linear
    layer whose method `wants_fused_input(layer, 1, "gated")`, whose GEMM computes it
    itself."""

    gate_up: torch.Tensor  # [1, 2K] model dtype

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.gate_up.shape[:-1], self.gate_up.shape[-1] // 2))

    @property
    def device(self) -> torch.device:
        return self.gate_up.device

    def materialize(self) -> torch.Tensor:
        from trtdist.kernels.activation import silu_and_mul

        return silu_and_mul(self.gate_up)


Activation = (torch.Tensor | QuantizedActivation | ActivationWithAmax | NormedActivation
              | GatedActivation)


class LinearMethod:
    """How a linear layer stores and multiplies its weight: the seam every quantization scheme
    plugs into (unquantized, FP8; INT4 would be one more subclass).

    A method owns (1) the parameter layout it creates on a layer besides the model-dtype
    `bias`, (2) the GEMM, (3) turning one layer's sharded checkpoint tensors into the stored
    tensors (build-time quantization, or passing already-quantized ones through) and (4) the
    random weights of `--dummy-weights`. One instance serves every layer of a model.
    """

    quant = QuantConfig()

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int,
                       dtype: torch.dtype, device: torch.device) -> None:
        raise NotImplementedError

    def apply(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None) -> torch.Tensor:
        """[..., in] -> [..., out] in x's dtype, plus `bias` when given. A
        `QuantizedActivation` is accepted when `wants_quantized_input(layer)`, an
        `ActivationWithAmax` when `wants_row_amax(layer)`, a `NormedActivation` or
        `GatedActivation` when `wants_fused_input(layer, 1, "norm" / "gated")`."""
        raise NotImplementedError

    def wants_quantized_input(self, layer: nn.Module) -> bool:
        """Whether the producer of this layer's input should hand `apply` a
        `QuantizedActivation` made with `input_scale(layer)` (None: per token)."""
        return False

    def input_scale(self, layer: nn.Module) -> torch.Tensor | None:
        """The static activation scale `[1]` float32, or None (dynamic, per token)."""
        return None

    def wants_fused_input(self, layer: nn.Module, rows: int, kind: str) -> bool:
        """Whether this layer's GEMM of `rows` tokens computes its input itself: `kind`
        "norm", the producer hands `apply` a `NormedActivation` instead of running the norm
        kernel; "gated", a `GatedActivation` instead of the SiLU x up kernel; "plain", a
        model-dtype row it quantizes itself (no amax from the producer)."""
        return False

    def wants_gated_output(self, layer: nn.Module, rows: int) -> bool:
        """Whether this gate | up layer can return SiLU(gate) * up of `rows` tokens itself
        (`apply_gated`) instead of its output for the SiLU x up kernel."""
        return False

    def apply_gated(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None,
                    amax: torch.Tensor) -> torch.Tensor | None:
        """SiLU(gate) * up of this gate | up layer's output, its rows' max |value| maxed into
        `amax` (`wants_gated_output`); None when it cannot (the caller runs `apply` and the
        SiLU x up kernel)."""
        return None

    def wants_rotary_output(self, layer: nn.Module, rows: int, head_dim: int) -> bool:
        """Whether this q | k | v layer (heads of `head_dim`) can, for `rows` tokens, also do
        the rotary embedding and the write of k and v into a model-dtype paged cache
        (`apply_rotary`) instead of leaving them to the rotary kernel."""
        return False

    def apply_rotary(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None,
                     rope: RotaryCacheWrite) -> torch.Tensor | None:
        """This q | k | v layer's output with q and k rotated and k, v written into the cache
        as `rope` says (`wants_rotary_output`); None when it cannot (the caller runs `apply`
        and `rotary_and_cache`)."""
        return None

    def wants_row_amax(self, layer: nn.Module, rows: int) -> bool:
        """Whether this layer's producer should hand `apply` an `ActivationWithAmax` (the
        model-dtype rows with their amax) instead of a tensor, for a step of `rows` tokens."""
        return False

    def process(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                where: str) -> dict[str, torch.Tensor]:
        """One layer's shard as read (suffix -> tensor: `weight`, optional `bias`,
        `weight_scale` [out] and `input_scale` [1] when the checkpoint is FP8) -> the tensors
        this method stores, under the same suffixes as its parameters."""
        raise NotImplementedError

    def dummy_fill(self, layer: nn.Module, generator: torch.Generator) -> None:
        raise NotImplementedError


def empty_param(shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> nn.Parameter:
    """An uninitialised, frozen parameter (filled by the loader)."""
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def _bias(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"bias": tensors["bias"].to(dtype)} if "bias" in tensors else {}


class UnquantizedLinearMethod(LinearMethod):
    """`weight [out, in]` in the model dtype; `F.linear`, or the decode GEMV of
    `kernels/gemv.py` at M <= 2 on tuned shapes. An FP8 checkpoint read without quantization
    is dequantized to the model dtype here."""

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int,
                       dtype: torch.dtype, device: torch.device) -> None:
        layer.weight = empty_param((out_features, in_features), dtype, device)

    def apply(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, (QuantizedActivation, ActivationWithAmax)):
            raise TypeError(f"an unquantized linear layer got an FP8 {type(x).__name__}; only "
                            "FP8 layers that ask for one take it")
        if isinstance(x, (NormedActivation, GatedActivation)):
            x = x.materialize()
        return gemv.linear(x, layer.weight, bias)

    def process(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                where: str) -> dict[str, torch.Tensor]:
        w = tensors["weight"]
        if w.dtype == FP8_DTYPE:
            if "weight_scale" not in tensors:
                raise ValueError(f"{where}: FP8 weight without a weight_scale")
            w = dequantize(w, tensors["weight_scale"][:, None])
        return {"weight": w.to(dtype)} | _bias(tensors, dtype)

    def dummy_fill(self, layer: nn.Module, generator: torch.Generator) -> None:
        layer.weight.data.normal_(0.0, 0.02, generator=generator)


class Fp8LinearMethod(LinearMethod):
    """`weight [out, in]` float8_e4m3fn with `weight_scale [out]` float32 (per output
    channel), and with static activations `input_scale [1]` float32.

    GEMM (`fp8_linear_cuda`; needs compute capability >= 8.9, the error says so otherwise):
    on CUDA at M <= 16 tokens the Triton small-M GEMM of `kernels/fp8_gemm.py` (weight read
    once, activations quantized by one fused kernel), above that the fused quantization and
    `torch._scaled_mm`, activations quantized per token (dynamic) or with `input_scale`; shapes
    cuBLASLt cannot take (in or out not a multiple of 16) and CPUs use the dequantizing
    reference, which computes the same numbers in float32.
    """

    def __init__(self, activation: str = "dynamic") -> None:
        self.quant = QuantConfig("fp8", activation)

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int,
                       dtype: torch.dtype, device: torch.device) -> None:
        check_fp8_device(device)
        layer.weight = empty_param((out_features, in_features), FP8_DTYPE, device)
        layer.weight_scale = empty_param((out_features,), torch.float32, device)
        layer.input_scale = empty_param((1,), torch.float32, device) if self.quant.static else None
        layer.use_scaled_mm = device.type == "cuda" and scaled_mm_supported(out_features,
                                                                            in_features)
        layer.act_dtype = dtype

    def wants_quantized_input(self, layer: nn.Module) -> bool:
        # NOTE: only where the Triton kernels run (CUDA, cuBLASLt-compatible shape); the CPU
        # path keeps quantizing inside `fp8_linear_reference`, exactly as before.
        return bool(layer.use_scaled_mm) and fused_quantization_available()

    def input_scale(self, layer: nn.Module) -> torch.Tensor | None:
        return layer.input_scale

    def wants_fused_input(self, layer: nn.Module, rows: int, kind: str) -> bool:
        # NOTE: one token, per-token activations, where the streaming GEMV runs (the fused
        # inputs are opt-in: TRTDIST_STREAM_GEMV_FUSED)
        return (rows == 1 and not self.quant.static and bool(layer.use_scaled_mm)
                and fused_input_supported(layer.weight, layer.act_dtype, kind))

    def wants_gated_output(self, layer: nn.Module, rows: int) -> bool:
        return (rows == 1 and not self.quant.static and bool(layer.use_scaled_mm)
                and gated_output_supported(layer.weight, layer.act_dtype))

    def apply_gated(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None,
                    amax: torch.Tensor) -> torch.Tensor | None:
        if not isinstance(x, QuantizedActivation) or x.q.shape[0] != 1:
            return None
        return fp8_linear_gated_cuda(x.q, x.scale, layer.weight, layer.weight_scale.view(1, -1),
                                     bias, x.dtype, amax)

    def wants_rotary_output(self, layer: nn.Module, rows: int, head_dim: int) -> bool:
        return (rows == 1 and not self.quant.static and bool(layer.use_scaled_mm)
                and rotary_output_supported(layer.weight, layer.act_dtype, head_dim))

    def apply_rotary(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None,
                     rope: RotaryCacheWrite) -> torch.Tensor | None:
        if not isinstance(x, QuantizedActivation) or x.q.shape[0] != 1:
            return None
        return fp8_linear_rotary_cuda(x.q, x.scale, layer.weight,
                                      layer.weight_scale.view(1, -1), bias, x.dtype, rope)

    def wants_row_amax(self, layer: nn.Module, rows: int) -> bool:
        if self.wants_fused_input(layer, rows, "plain"):  # it quantizes a plain row itself
            return False
        # NOTE: per token only (static scales need no amax: the small-M GEMM quantizes a plain
        # tensor itself), only where the Triton kernels run, and only for the shapes where the
        # input-quantizing GEMM was measured to win (its table in kernels/fp8_gemm_configs.py)
        # or, at one token, where the streaming GEMV takes it (any shape).
        n, k = layer.weight.shape
        return (not self.quant.static and bool(layer.use_scaled_mm)
                and (fp8_gemm_configs.quantizing_config(rows, n, k) is not None
                     or (rows == 1 and stream_gemv_takes(layer.weight, layer.act_dtype)))
                and fused_quantization_available())

    def apply(self, layer: nn.Module, x: Activation, bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, NormedActivation | GatedActivation):
            y = None
            if layer.use_scaled_mm:
                ws = layer.weight_scale.view(1, -1)
                y = (fp8_linear_norm_cuda(x.x, x.residual, x.residual_out, x.weight, x.eps,
                                          layer.weight, ws, bias)
                     if isinstance(x, NormedActivation)
                     else fp8_linear_silu_cuda(x.gate_up, layer.weight, ws, bias))
            if y is not None:
                return y
            x = x.materialize()
        if (isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 1
                and self.wants_fused_input(layer, 1, "plain")):
            y = fp8_linear_dynamic_cuda(x, layer.weight, layer.weight_scale.view(1, -1), bias)
            if y is not None:
                return y
        if isinstance(x, ActivationWithAmax):
            if layer.use_scaled_mm:
                return fp8_linear_amax_cuda(x.x, x.amax, layer.weight,
                                            layer.weight_scale.view(1, -1), bias)
            x = x.x  # the reference quantizes per token itself: the same numbers
        if isinstance(x, QuantizedActivation):
            if layer.use_scaled_mm:
                return fp8_linear_quantized_cuda(x.q, x.scale, layer.weight,
                                                 layer.weight_scale.view(1, -1), bias, x.dtype)
            return fp8_linear_quantized_reference(x.q, x.scale, layer.weight,
                                                  layer.weight_scale, bias, x.dtype)
        if layer.use_scaled_mm:
            return fp8_linear_cuda(x, layer.weight, layer.weight_scale.view(1, -1),
                                   layer.input_scale, bias)
        return fp8_linear_reference(x, layer.weight, layer.weight_scale, layer.input_scale, bias)

    def process(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                where: str) -> dict[str, torch.Tensor]:
        w = tensors["weight"]
        if w.dtype == FP8_DTYPE:  # already quantized (an FP8 checkpoint): keep its values
            if "weight_scale" not in tensors:
                raise ValueError(f"{where}: FP8 weight without a weight_scale")
            q, scale = w, tensors["weight_scale"].float()
        else:
            q, scale = quantize_weight_per_channel(w)
        out = {"weight": q.contiguous(), "weight_scale": scale.contiguous()}
        if self.quant.static:
            if "input_scale" not in tensors:
                raise ValueError(f"{where}: static FP8 activations need an input_scale per "
                                 "linear layer: build with --calib-data FILE, or use "
                                 "dynamic activations")
            out["input_scale"] = tensors["input_scale"].float().reshape(1)
        return out | _bias(tensors, dtype)

    def dummy_fill(self, layer: nn.Module, generator: torch.Generator) -> None:
        w = torch.empty(layer.weight.shape, dtype=torch.bfloat16, device=layer.weight.device)
        q, scale = quantize_weight_per_channel(w.normal_(0.0, 0.02, generator=generator))
        layer.weight.data.copy_(q)
        layer.weight_scale.data.copy_(scale)
        if layer.input_scale is not None:
            layer.input_scale.data.fill_(4.0 / FP8_MAX)  # activations of about +-4


def make_linear_method(quant: QuantConfig | None) -> LinearMethod:
    """The linear method of a quantization config (None or 'none': unquantized)."""
    if quant is None or not quant.is_quantized:
        return UnquantizedLinearMethod()
    if quant.method == "fp8":
        return Fp8LinearMethod(quant.activation)
    raise ValueError(f"no linear method for quantization {quant.method!r}")
