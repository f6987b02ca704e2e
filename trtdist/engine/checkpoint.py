"""Read a Hugging Face checkpoint directory (config.json + safetensors) or a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from trtdist.config import ModelConfig
from trtdist.engine.gguf_source import GGUFCheckpoint, is_gguf


class HFCheckpoint:
    """Tensors of a Hugging Face checkpoint, read lazily from (possibly sharded) safetensors."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_file(self.path / "config.json")
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
        try:
            file = self.weight_map[name]
        except KeyError:
            raise KeyError(f"checkpoint {self.path} has no tensor {name!r}") from None
        return self._handles[file].get_tensor(name)


def open_checkpoint(path: str | Path) -> HFCheckpoint | GGUFCheckpoint:
    """The checkpoint at `path`: a `.gguf` file or a Hugging Face directory."""
    return GGUFCheckpoint(path) if is_gguf(path) else HFCheckpoint(path)
