"""Read a Hugging Face checkpoint directory (config.json + safetensors), including FP8
checkpoints in the formats vLLM and TensorRT-LLM read, or a GGUF file."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from trtdist.config import ModelConfig
from trtdist.engine.gguf_source import GGUFCheckpoint, is_gguf
from trtdist.parallel.quant import QUANT_METHODS, QuantConfig
from trtdist.parallel.quant_fp8 import FP8_DTYPE, dequantize_blockwise


@dataclass(frozen=True, slots=True)
class CheckpointQuant:
    """How an already-quantized checkpoint stores its linear layers.

    `format` 'fp8' (`quantization_config.quant_method: "fp8"`: `weight_scale` per tensor or
    per channel, or DeepSeek-style `weight_scale_inv` per `weight_block_size` tile) or
    'compressed-tensors' (float 8-bit weights with `weight_scale`, optional `input_scale`).
    `static_inputs`: the checkpoint holds per-tensor `input_scale`s.
    """

    format: str
    block: tuple[int, int] | None = None
    static_inputs: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "weight_block_size": list(self.block) if self.block
                else None, "static_inputs": self.static_inputs}


def checkpoint_quant(hf_config: dict[str, Any]) -> CheckpointQuant | None:
    """Parse `quantization_config`; None for an unquantized checkpoint. Anything but FP8
    fails, naming what it found and what is supported."""
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"FP8 checkpoint format {qc.get('fmt')!r} is not supported "
                             "(only e4m3)")
        block = qc.get("weight_block_size")
        if block is not None and len(block) != 2:
            raise ValueError(f"weight_block_size must have 2 entries, got {block}")
        return CheckpointQuant("fp8", tuple(int(b) for b in block) if block else None,
                               qc.get("activation_scheme", "dynamic") == "static")
    if method == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        if not groups:
            raise ValueError("compressed-tensors quantization_config has no config_groups")
        static = False
        for g in groups:
            w = g.get("weights") or {}
            if (w.get("type"), w.get("num_bits")) != ("float", 8):
                raise ValueError(f"compressed-tensors weights of type {w.get('type')!r} with "
                                 f"{w.get('num_bits')} bits are not supported (only float 8-bit"
                                 " = FP8)")
            if w.get("strategy", "tensor") not in ("tensor", "channel"):
                raise ValueError(f"compressed-tensors FP8 weight strategy {w.get('strategy')!r}"
                                 " is not supported (tensor or channel)")
            act = g.get("input_activations")
            static |= bool(act) and not act.get("dynamic", True)
        return CheckpointQuant("compressed-tensors", None, static)
    raise ValueError(f"checkpoint quantization {method!r} is not supported; supported: fp8 "
                     "(quant_method 'fp8' or FP8 compressed-tensors)")


def resolve_quant(name: str, ckpt_quant: CheckpointQuant | None,
                  static: bool = False) -> QuantConfig:
    """The scheme for a checkpoint: `name` 'auto' (FP8 if the checkpoint is FP8, else none),
    'none' or 'fp8'. Activations are static when the checkpoint holds input scales or
    `static` (a calibration) says so, else dynamic."""
    if name not in ("auto", *QUANT_METHODS):
        raise ValueError(f"unknown quantization {name!r}; use auto, {', '.join(QUANT_METHODS)}")
    method = ("fp8" if ckpt_quant is not None else "none") if name == "auto" else name
    if method == "none":
        return QuantConfig()
    static = static or (ckpt_quant is not None and ckpt_quant.static_inputs)
    return QuantConfig(method, "static" if static else "dynamic")


class HFCheckpoint:
    """Tensors of a Hugging Face checkpoint, read lazily from (possibly sharded) safetensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_file(self.path / "config.json")
        self.quant = checkpoint_quant(json.loads((self.path / "config.json").read_text()))
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not files:
                extra = (" (found PyTorch .bin files: convert them to safetensors)"
                         if list(self.path.glob("*.bin")) else "")
                raise FileNotFoundError(f"no *.safetensors files in {self.path}{extra}")
            weight_map = {}
        self._handles = {}
        for name in files:
            file = self.path / name
            if not file.exists():
                raise FileNotFoundError(f"checkpoint file {file} listed in the index is missing")
            try:
                handle = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"cannot read {file}: {e}") from None
            self._handles[name] = handle
            if not index.exists():
                weight_map.update({k: name for k in handle.keys()})
        self.weight_map = weight_map

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        """A tensor by name. For FP8 checkpoints, `<proj>.weight_scale` is always per output
        channel ([out] float32; per-tensor scales are broadcast), and block-wise weights come
        back dequantized (float32) for the engine to requantize per channel."""
        if self.quant is not None:
            if name.endswith(".weight_scale"):
                return self._channel_scale(name.removesuffix("_scale"))
            if self.quant.block is not None and name.endswith(".weight"):
                w = self._raw(name)
                if w.dtype == FP8_DTYPE:
                    return dequantize_blockwise(w, self._raw(name + "_scale_inv"),
                                                self.quant.block)
                return w
        return self._raw(name)

    def _channel_scale(self, weight_name: str) -> torch.Tensor:
        if weight_name not in self:
            raise KeyError(f"checkpoint {self.path} has no tensor {weight_name!r}")
        if weight_name + "_scale" not in self:
            raise ValueError(f"FP8 checkpoint {self.path} has no {weight_name}_scale: a layer "
                             "left unquantized (mixed-precision checkpoints are not supported)")
        handle = self._handles[self.weight_map[weight_name]]
        out_rows = handle.get_slice(weight_name).get_shape()[0]
        s = self._raw(weight_name + "_scale").float()
        if s.numel() == 1:
            return s.reshape(1).expand(out_rows).contiguous()
        if s.numel() != out_rows:
            raise ValueError(f"checkpoint {self.path}: {weight_name}_scale has shape "
                             f"{tuple(s.shape)}; expected one scale or one per output channel "
                             f"({out_rows})")
        return s.reshape(out_rows)

    def _raw(self, name: str) -> torch.Tensor:
        try:
            file = self.weight_map[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}") from None
        return self._handles[file].get_tensor(name)


def open_checkpoint(path: str | Path) -> HFCheckpoint | GGUFCheckpoint:
    """The checkpoint at `path`: a `.gguf` file or a Hugging Face directory."""
    return GGUFCheckpoint(path) if is_gguf(path) else HFCheckpoint(path)
