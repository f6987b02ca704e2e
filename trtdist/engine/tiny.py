"""The built-in tiny model: a 4-layer Llama with random weights and a real BPE tokenizer.

It lets `trtdist serve` / `generate` run on a fresh machine with no checkpoint and no GPU.
It is written once as an ordinary Hugging Face directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) so it goes through the real loaders.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_VERSION = 2
_CORPUS = """The quick brown fox jumps over the lazy dog. Distributed inference splits a model
across many GPUs: tensor parallelism shards every layer, pipeline parallelism gives each GPU a
slice of the layers. A paged KV cache stores keys and values in fixed-size blocks so that many
requests share memory without fragmentation. The scheduler batches requests in flight, adding
new prompts while others are still decoding. Hello world! How are you today? I am a tiny
language model with random weights, so what I say means nothing at all. 0 1 2 3 4 5 6 7 8 9
"""
CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)
SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start|>", "<|end|>"]


def cache_root() -> Path:
    """Where trtdist caches generated files ($TRTDIST_CACHE, else ~/.cache/trtdist)."""
    root = os.environ.get("TRTDIST_CACHE") or os.path.join(Path.home(), ".cache", "trtdist")
    return Path(root)


def _write_tokenizer(out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
        "chat_template": CHAT_TEMPLATE, "model_max_length": 512,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2))
    return tok.get_vocab_size()


def _write_model(out: Path, vocab: int, eos_ids: list[int], bos: int,
                 readable: list[int]) -> None:
    hidden, inter, layers, heads, kv_heads = 64, 128, 4, 4, 2
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": 16,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": bos, "eos_token_id": eos_ids,
    }
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape: int, std: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    hd = hidden // heads
    w = {"model.embed_tokens.weight": rnd(vocab, hidden, std=1.0),
         "model.norm.weight": torch.ones(hidden), "lm_head.weight": rnd(vocab, hidden, std=0.3)}
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
              p + "self_attn.k_proj.weight": rnd(kv_heads * hd, hidden),
              p + "self_attn.v_proj.weight": rnd(kv_heads * hd, hidden),
              p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
              p + "mlp.gate_proj.weight": rnd(inter, hidden),
              p + "mlp.up_proj.weight": rnd(inter, hidden),
              p + "mlp.down_proj.weight": rnd(hidden, inter),
              p + "input_layernorm.weight": torch.ones(hidden),
              p + "post_attention_layernorm.weight": torch.ones(hidden)}
    # Random weights babble; let them babble words: only tokens that decode to readable text
    # (and the end-of-text token, rarely) get non-zero output rows.
    mask = torch.zeros(vocab, 1)
    mask[readable] = 1.0
    mask[eos_ids[0]] = 0.5
    w["lm_head.weight"] *= mask
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": eos_ids}, indent=2))


def tiny_model_dir() -> Path:
    """Path of the tiny model, creating it on first use (safe when many ranks race)."""
    target = cache_root() / f"tiny-llama-v{TINY_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        vocab = _write_tokenizer(tmp, 384)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        eos = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|end|>")]
        readable = [i for i in range(vocab) if len(text := tok.decode([i]).strip()) > 1
                    and text.isascii() and text.isalpha()]
        _write_model(tmp, vocab, eos, tok.token_to_id("<|begin_of_text|>"), readable)
        try:
            os.rename(tmp, target)  # atomic: the first rank to finish wins
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
