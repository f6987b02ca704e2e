"""Model configuration parsed from a Hugging Face config.json, validated once."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_ROPE_TYPES = ("default", "linear", "llama3")


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use one of "
                         f"{', '.join(sorted(set(DTYPES)))} or 'auto'") from None


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The architecture of a Llama-family model (Llama 2/3, Mistral, Qwen2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = field(default_factory=tuple)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"model_type {self.model_type!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_attention_heads {self.num_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if len(self.sliding_windows) != self.num_layers:
            raise ValueError(f"sliding_windows has {len(self.sliding_windows)} entries for "
                             f"{self.num_layers} layers")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in _ROPE_TYPES:
            raise ValueError(f"rope scaling type {rope_type!r} is not supported; supported: "
                             f"{', '.join(_ROPE_TYPES)}")

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict (transformers 4.x and 5.x layouts)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"config.json model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported (only 'silu')")
        try:
            hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            layers = int(hf["num_hidden_layers"])
            inter, vocab = int(hf["intermediate_size"]), int(hf["vocab_size"])
        except KeyError as e:
            raise ValueError(f"config.json lacks required field {e.args[0]!r}") from None
        kv_heads = int(hf.get("num_key_value_heads") or heads)
        head_dim = int(hf.get("head_dim") or hidden // heads)
        # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta/rope_scaling
        rope = dict(hf.get("rope_parameters") or {})
        theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling = dict(hf.get("rope_scaling") or {}) or rope
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = {}
        windows = _sliding_windows(hf, model_type, layers)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        attn_bias = bool(hf.get("attention_bias", False))
        return cls(
            model_type=model_type, vocab_size=vocab, hidden_size=hidden,
            intermediate_size=inter, num_layers=layers, num_heads=heads,
            num_kv_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)), rope_theta=theta,
            rope_scaling=scaling or None,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attn_bias, o_bias=attn_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)), sliding_windows=windows,
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
            torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(data)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sliding_windows"] = list(self.sliding_windows)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        d = dict(d)
        d["sliding_windows"] = tuple(d.get("sliding_windows", ()))
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    def checkpoint_dtype(self) -> torch.dtype:
        return DTYPES.get(self.torch_dtype, torch.float32)


def _sliding_windows(hf: dict[str, Any], model_type: str, layers: int) -> tuple[int | None, ...]:
    window = hf.get("sliding_window")
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * layers
    types = hf.get("layer_types")
    if types and len(types) == layers:
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if model_type == "qwen2":  # layers from max_window_layers on use the window
        first = int(hf.get("max_window_layers", layers))
        return tuple(int(window) if i >= first else None for i in range(layers))
    return (int(window),) * layers


# Shapes for --dummy-weights speed work (Llama-3 8B and 70B as published).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "torch_dtype": "bfloat16",
    },
    "llama3-70b": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 8192,
        "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 8192,
        "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": [128001, 128009],
        "torch_dtype": "bfloat16",
    },
}
