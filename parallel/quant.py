"""Which quantization scheme an engine uses, as recorded in its config.json (`build.quant`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANT_METHODS = ("none", "fp8")
ACTIVATION_SCHEMES = ("dynamic", "static")


@dataclass(frozen=True, slots=True)
class QuantConfig:
    """`method` 'none' or 'fp8'. For FP8: weights E4M3 with one scale per output channel;
    activations quantized per token at run time ('dynamic') or with one calibrated scale per
    linear layer ('static')."""

    method: str = "none"
    activation: str = "dynamic"

    def __post_init__(self) -> None:
        if self.method not in QUANT_METHODS:
            raise ValueError(f"unknown quantization {self.method!r}; supported: "
                             f"{', '.join(QUANT_METHODS)}")
        if self.activation not in ACTIVATION_SCHEMES:
            raise ValueError(f"unknown activation scheme {self.activation!r}; supported: "
                             f"{', '.join(ACTIVATION_SCHEMES)}")

    @property
    def is_quantized(self) -> bool:
        return self.method != "none"

    @property
    def static(self) -> bool:
        return self.method == "fp8" and self.activation == "static"

    def to_dict(self) -> dict[str, Any] | None:
        """The `build.quant` entry of an engine config (None when unquantized)."""
        if not self.is_quantized:
            return None
        return {"method": self.method, "weight": "e4m3 per-channel",
                "activation": self.activation,
                "activation_granularity": "per-tensor" if self.static else "per-token"}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantConfig:
        if not d:
            return cls()
        return cls(str(d.get("method", "none")), str(d.get("activation", "dynamic")))
