"""Shard rules for Llama-family checkpoints: Hugging Face tensors -> one rank's engine tensors.

Q/K/V are fused into `attn.qkv` and gate/up into `mlp.gate_up` so each runs as one GEMM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from trtdist.config import ModelConfig
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.shard import attention_shard, shard_dim, shard_heads, shard_vocab

Reader = Callable[[str], torch.Tensor]


def required_hf_names(cfg: ModelConfig, mapping: Mapping, layers: range) -> list[str]:
    """The checkpoint tensors this rank reads."""
    names: list[str] = []
    if mapping.is_first_stage:
        names.append("model.embed_tokens.weight")
    for i in layers:
        p = f"model.layers.{i}."
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        if cfg.qkv_bias:
            names += [p + f"self_attn.{x}_proj.bias" for x in "qkv"]
        if cfg.o_bias:
            names.append(p + "self_attn.o_proj.bias")
        names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if cfg.mlp_bias:
            names += [p + f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    if mapping.is_last_stage:
        names.append("model.norm.weight")
        names.append("model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight")
    return list(dict.fromkeys(names))


def shard_llama(read: Reader, cfg: ModelConfig, mapping: Mapping,
                layers: range) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) for every tensor of this rank's shard."""
    tp, r = mapping.tp_size, mapping.tp_rank
    heads = attention_shard(cfg.num_heads, cfg.num_kv_heads, tp, r)
    hd = cfg.head_dim

    def qkv(kind: str) -> torch.Tensor:
        q = shard_heads(read(f"{kind}q_proj.{suffix}"), heads.q_start, heads.q_heads, hd)
        k = shard_heads(read(f"{kind}k_proj.{suffix}"), heads.kv_start, heads.kv_heads, hd)
        v = shard_heads(read(f"{kind}v_proj.{suffix}"), heads.kv_start, heads.kv_heads, hd)
        return torch.cat([q, k, v], dim=0)

    if mapping.is_first_stage:
        yield "embed.weight", shard_vocab(read("model.embed_tokens.weight"), tp, r)
    for i in layers:
        p, e = f"model.layers.{i}.", f"layers.{i}."
        yield e + "input_norm.weight", read(p + "input_layernorm.weight")
        yield e + "post_norm.weight", read(p + "post_attention_layernorm.weight")
        for suffix in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            yield e + f"attn.qkv.{suffix}", qkv(p + "self_attn.")
        yield e + "attn.o.weight", shard_dim(read(p + "self_attn.o_proj.weight"), 1, tp, r,
                                             "o_proj")
        if cfg.o_bias:
            yield e + "attn.o.bias", read(p + "self_attn.o_proj.bias")
        for suffix in ("weight", "bias") if cfg.mlp_bias else ("weight",):
            gate = shard_dim(read(p + f"mlp.gate_proj.{suffix}"), 0, tp, r, "gate_proj")
            up = shard_dim(read(p + f"mlp.up_proj.{suffix}"), 0, tp, r, "up_proj")
            yield e + f"mlp.gate_up.{suffix}", torch.cat([gate, up], dim=0)
        yield e + "mlp.down.weight", shard_dim(read(p + "mlp.down_proj.weight"), 1, tp, r,
                                               "down_proj")
        if cfg.mlp_bias:
            yield e + "mlp.down.bias", read(p + "mlp.down_proj.bias")
    if mapping.is_last_stage:
        yield "norm.weight", read("model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        yield "lm_head.weight", shard_vocab(read(head), tp, r)
