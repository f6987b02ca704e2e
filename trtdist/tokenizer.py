"""Tokenizer from a checkpoint's tokenizer.json (the `tokenizers` library, no transformers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """Encode/decode plus the special tokens and chat template from tokenizer_config.json."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.exists():
            raise FileNotFoundError(f"no tokenizer.json in {path}; the model directory needs "
                                    "its tokenizer files")
        self._tok = _HFTokenizer.from_file(str(file))
        cfg_file = path / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        template = self.config.get("chat_template")
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        self.chat_template: str | None = template
        self.eos_token_ids = self._eos_ids(path)

    def special_token(self, key: str) -> str | None:
        """A special token's text from tokenizer_config.json (e.g. "bos_token")."""
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def _eos_ids(self, path: Path) -> tuple[int, ...]:
        ids: list[int] = []
        gen = path / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += eos if isinstance(eos, list) else ([] if eos is None else [eos])
        tok = self.special_token("eos_token")
        if tok is not None and (i := self._tok.token_to_id(tok)) is not None:
            ids.append(i)
        return tuple(dict.fromkeys(int(i) for i in ids))

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
