"""Llama-family decoder (Llama 2/3, Mistral, Qwen2): the part one rank runs.

A `LlamaStage` holds the layers of one pipeline stage, sharded for one tensor-parallel rank.
Stage 0 also owns the embedding; the last stage owns the final norm and the LM head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trtdist.comm.base import Communicator
from trtdist.config import ModelConfig
from trtdist.kernels.paged_attention import AttentionMetadata, paged_attention, write_kv_cache
from trtdist.models.rope import RotaryEmbedding
from trtdist.parallel.layers import (
    ColumnParallelLinear,
    LinearMethod,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.shard import attention_shard, vocab_range


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the scale, as transformers does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, tp: Communicator,
                 window: int | None, dtype: torch.dtype, device: torch.device,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        shard = attention_shard(cfg.num_heads, cfg.num_kv_heads, mapping.tp_size,
                                mapping.tp_rank)
        self.q_heads, self.kv_heads, self.head_dim = shard.q_heads, shard.kv_heads, cfg.head_dim
        self.q_size, self.kv_size = self.q_heads * cfg.head_dim, self.kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.window = window
        self.qkv = ColumnParallelLinear(cfg.hidden_size, self.q_size + 2 * self.kv_size,
                                        cfg.qkv_bias, dtype, device, quant)
        self.o = RowParallelLinear(self.q_size, cfg.hidden_size, cfg.o_bias, dtype, device, tp,
                                   quant)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = RotaryEmbedding.apply(q.view(t, self.q_heads, self.head_dim), cos, sin)
        k = RotaryEmbedding.apply(k.view(t, self.kv_heads, self.head_dim), cos, sin)
        v = v.view(t, self.kv_heads, self.head_dim)
        k_cache, v_cache = kv_cache
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, meta, self.scale, self.window)
        return self.o(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, tp: Communicator,
                 dtype: torch.dtype, device: torch.device,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        if cfg.intermediate_size % mapping.tp_size:
            raise ValueError(f"intermediate_size {cfg.intermediate_size} is not divisible by "
                             f"tp_size {mapping.tp_size}")
        self.inter = cfg.intermediate_size // mapping.tp_size
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, 2 * self.inter, cfg.mlp_bias,
                                            dtype, device, quant)
        self.down = RowParallelLinear(self.inter, cfg.hidden_size, cfg.mlp_bias, dtype, device, tp,
                                      quant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.inter, dim=-1)
        return self.down(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mapping: Mapping, tp: Communicator, index: int,
                 dtype: torch.dtype, device: torch.device,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.attn = LlamaAttention(cfg, mapping, tp, cfg.sliding_windows[index], dtype, device,
                                   quant)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = LlamaMLP(cfg, mapping, tp, dtype, device, quant)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        h = h + self.attn(self.input_norm(h), cos, sin, kv_cache, meta)
        return h + self.mlp(self.post_norm(h))


class LlamaStage(nn.Module):
    """One pipeline stage of one TP rank. Parameter names are the engine file's names."""

    def __init__(self, cfg: ModelConfig, mapping: Mapping, layers: range, tp: Communicator,
                 dtype: torch.dtype, device: torch.device,
                 quant: LinearMethod | None = None) -> None:
        super().__init__()
        self.cfg, self.mapping, self.layer_ids = cfg, mapping, layers
        self.dtype, self.device = dtype, device
        start, end, local = vocab_range(cfg.vocab_size, mapping.tp_size, mapping.tp_rank)
        self.embed = (VocabParallelEmbedding(start, end, local, cfg.hidden_size, dtype, device, tp)
                      if mapping.is_first_stage else None)
        self.rope = RotaryEmbedding(cfg, device)
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(cfg, mapping, tp, i, dtype, device, quant) for i in layers
        })
        if mapping.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.lm_head = ParallelLMHead(local, cfg.hidden_size, cfg.vocab_size, dtype, device,
                                          tp)

    def forward(self, tokens_or_hidden: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                meta: AttentionMetadata) -> torch.Tensor:
        """Stage 0 takes token ids `[T]`; later stages take hidden states `[T, hidden]`.
        Returns hidden states `[T, hidden]` (after the final norm on the last stage)."""
        h = self.embed(tokens_or_hidden) if self.embed is not None else tokens_or_hidden
        cos, sin = self.rope.cos_sin(positions, h.dtype)
        for layer, cache in zip(self.layers.values(), kv_caches):
            h = layer(h, cos, sin, cache, meta)
        return self.norm(h) if self.mapping.is_last_stage else h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32, full vocabulary on every TP rank."""
        return self.lm_head(hidden).float()
