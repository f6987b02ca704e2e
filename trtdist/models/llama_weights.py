"""Shard rules for Llama-family checkpoints: Hugging Face tensors -> one rank's engine tensors.

Q/K/V are fused into `attn.qkv` and gate/up into `mlp.gate_up` so each runs as one GEMM.

FP8 checkpoints add per-output-channel `weight_scale` [out] (sharded with the output rows, like
a bias: column-parallel layers split them, row-parallel layers keep them whole since every rank
produces every output channel) and per-tensor `input_scale` (fused layers take the largest of
their parts, which all see the same input; every rank holds it whole).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from trtdist.config import ModelConfig
from trtdist.parallel.layers import LinearMethod
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.shard import attention_shard, shard_dim, shard_heads, shard_vocab

Reader = Callable[[str], torch.Tensor]
# The engine's linear layers (everything else stays in the model dtype).
LINEAR_LAYERS = ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")


def linear_prefix(name: str) -> str | None:
    """`layers.3.attn.qkv` for `layers.3.attn.qkv.weight`; None for tensors of no linear."""
    prefix = name.rsplit(".", 1)[0]
    return prefix if prefix.split(".", 2)[-1] in LINEAR_LAYERS else None


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


def shard_llama(read: Reader, cfg: ModelConfig, mapping: Mapping, layers: range,
                weight_scales: bool = False,
                input_scales: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine name, tensor) for every tensor of this rank's shard. The tensors of one
    linear layer come one after another. With `weight_scales` (an FP8 checkpoint) `read`
    also answers `<proj>.weight_scale` ([out] float32) and with `input_scales`
    `<proj>.input_scale` ([1])."""
    tp, r = mapping.tp_size, mapping.tp_rank
    heads = attention_shard(cfg.num_heads, cfg.num_kv_heads, tp, r)
    hd = cfg.head_dim

    def qkv(kind: str) -> torch.Tensor:
        q = shard_heads(read(f"{kind}q_proj.{suffix}"), heads.q_start, heads.q_heads, hd)
        k = shard_heads(read(f"{kind}k_proj.{suffix}"), heads.kv_start, heads.kv_heads, hd)
        v = shard_heads(read(f"{kind}v_proj.{suffix}"), heads.kv_start, heads.kv_heads, hd)
        return torch.cat([q, k, v], dim=0)

    rows = ("weight_scale",) if weight_scales else ()  # 1-D, sharded like the output rows

    def input_scale(*names: str) -> torch.Tensor:
        try:
            scales = torch.stack([read(n + ".input_scale").float().reshape(()) for n in names])
        except KeyError as e:  # static activations, yet one layer lacks its scale
            raise ValueError(f"{e.args[0]} (static FP8 activations need an input_scale for "
                             "every linear layer)") from None
        return scales.amax().reshape(1)

    if mapping.is_first_stage:
        yield "embed.weight", shard_vocab(read("model.embed_tokens.weight"), tp, r)
    for i in layers:
        p, e = f"model.layers.{i}.", f"layers.{i}."
        yield e + "input_norm.weight", read(p + "input_layernorm.weight")
        yield e + "post_norm.weight", read(p + "post_attention_layernorm.weight")
        for suffix in ("weight", *rows, *(("bias",) if cfg.qkv_bias else ())):
            yield e + f"attn.qkv.{suffix}", qkv(p + "self_attn.")
        if input_scales:
            yield e + "attn.qkv.input_scale", input_scale(*(p + f"self_attn.{x}_proj" for x in
                                                            "qkv"))
        yield e + "attn.o.weight", shard_dim(read(p + "self_attn.o_proj.weight"), 1, tp, r,
                                             "o_proj")
        for suffix in (*rows, *(("bias",) if cfg.o_bias else ())):
            yield e + f"attn.o.{suffix}", read(p + f"self_attn.o_proj.{suffix}")
        if input_scales:
            yield e + "attn.o.input_scale", input_scale(p + "self_attn.o_proj")
        for suffix in ("weight", *rows, *(("bias",) if cfg.mlp_bias else ())):
            gate = shard_dim(read(p + f"mlp.gate_proj.{suffix}"), 0, tp, r, "gate_proj")
            up = shard_dim(read(p + f"mlp.up_proj.{suffix}"), 0, tp, r, "up_proj")
            yield e + f"mlp.gate_up.{suffix}", torch.cat([gate, up], dim=0)
        if input_scales:
            yield e + "mlp.gate_up.input_scale", input_scale(p + "mlp.gate_proj",
                                                             p + "mlp.up_proj")
        yield e + "mlp.down.weight", shard_dim(read(p + "mlp.down_proj.weight"), 1, tp, r,
                                               "down_proj")
        for suffix in (*rows, *(("bias",) if cfg.mlp_bias else ())):
            yield e + f"mlp.down.{suffix}", read(p + f"mlp.down_proj.{suffix}")
        if input_scales:
            yield e + "mlp.down.input_scale", input_scale(p + "mlp.down_proj")
    if mapping.is_last_stage:
        yield "norm.weight", read("model.norm.weight")
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        yield "lm_head.weight", shard_vocab(read(head), tp, r)


def process_linears(tensors: Iterable[tuple[str, torch.Tensor]], method: LinearMethod,
                    dtype: torch.dtype, where: str,
                    extra: dict[str, torch.Tensor] | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Turn a shard stream into stored tensors: each linear layer's tensors go through
    `method.process` (quantization, or dequantizing an FP8 checkpoint for an unquantized
    model); the rest is cast to `dtype`. `extra` adds tensors by engine name (calibrated
    `input_scale`s)."""
    extra = dict(extra or {})
    group: dict[str, torch.Tensor] = {}
    current: str | None = None

    def flush() -> Iterator[tuple[str, torch.Tensor]]:
        assert current is not None
        for suffix in ("input_scale",):
            if (n := f"{current}.{suffix}") in extra:
                group[suffix] = extra.pop(n)
        for suffix, t in method.process(group, dtype, f"{where}: {current}").items():
            yield f"{current}.{suffix}", t
        group.clear()

    for name, tensor in tensors:
        prefix = linear_prefix(name)
        if prefix != current and current is not None:
            yield from flush()
        current = prefix
        if prefix is None:
            yield name, tensor.to(dtype)
        else:
            group[name[len(prefix) + 1:]] = tensor
    if current is not None:
        yield from flush()
