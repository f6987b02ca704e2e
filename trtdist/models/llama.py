"""Llama-family decoder (Llama 2/3, Mistral, Qwen2): the part one rank runs.

A `LlamaStage` holds the layers of one pipeline stage, sharded for one tensor-parallel rank.
Stage 0 also owns the embedding; the last stage owns the final norm and the LM head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trtdist.comm.base import Communicator
from trtdist.config import ModelConfig
from trtdist.kernels.activation import silu_and_mul
from trtdist.kernels.attention import AttentionBackend, LayerKV, TorchAttentionBackend
from trtdist.kernels.fp8_decode_step import DecodeStep
from trtdist.kernels.fp8_fused import rms_norm_quant_triton, silu_and_mul_quant_triton
from trtdist.kernels.norm import add_rms_norm, rms_norm
from trtdist.kernels.rotary import (
    RotaryCacheWrite,
    cos_sin_table,
    rotary_and_cache,
    split_qkv,
)
from trtdist.models.rope import inv_frequencies
from trtdist.parallel.layers import (
    ActivationWithAmax,
    ColumnParallelLinear,
    GatedActivation,
    LinearMethod,
    NormedActivation,
    ParallelLMHead,
    QuantizedActivation,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.shard import attention_shard, vocab_range

# NOTE: "0" turns off the row-amax handoff to the FP8 o and down projections (A/B measures).
ROW_AMAX_ENV = "TRTDIST_FP8_ROW_AMAX"
ROW_AMAX_ROWS = 16  # steps of at most this many tokens use it (the small-M FP8 GEMM's range)


@dataclass(frozen=True, slots=True)
class StepContext:
    """What every layer of one step needs besides its hidden states (built once per step)."""

    positions: torch.Tensor  # [T] int32 or int64
    slot_mapping: torch.Tensor  # [T] int64, -1 = padding (not written)
    meta: object  # the attention backend's metadata (opaque to the layers)
    backend: AttentionBackend
    # [ROW_AMAX_ROWS] float32 or None: see `LlamaStage.row_amax`
    row_amax: torch.Tensor | None = None
    # [2, 1, hidden] or None: see `LlamaStage.residual_pair`
    residual_pair: torch.Tensor | None = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                quant_for: ColumnParallelLinear | None = None,
                clear: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | QuantizedActivation, torch.Tensor]:
        """vLLM style: returns `(norm(x + residual), x + residual)`; without a residual,
        `(norm(x), x)`. Numerics as transformers' LlamaRMSNorm (see kernels/norm.py).
        When `quant_for` (the linear layer that consumes the output) wants FP8 input, the
        normalised rows come back quantized (`QuantizedActivation`, one fused kernel), and
        that kernel also zeroes `clear[:T]` when given."""
        if quant_for is not None and x.dim() == 2 and quant_for.wants_quantized_input:
            q, scale, residual = rms_norm_quant_triton(x, residual, self.weight, self.eps,
                                                       quant_for.activation_scale, clear=clear)
            dtype = torch.promote_types(x.dtype, self.weight.dtype)  # what the norm returns
            return QuantizedActivation(q, scale, dtype), residual
        if residual is None:
            return rms_norm(x, self.weight, self.eps), x
        return add_rms_norm(x, residual, self.weight, self.eps)


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

    def forward(self, x: torch.Tensor, cos_sin: torch.Tensor, kv: LayerKV,
                ctx: StepContext, row_amax: torch.Tensor | None = None) -> torch.Tensor:
        """`row_amax` (zeroed by the norm before): the attention maxes its output rows' amax
        into it and the FP8 o projection quantizes from it."""
        t = x.shape[0]
        qkv = None
        if kv.k_scale is None and self.qkv.wants_rotary_output(t, self.head_dim):
            # one token, FP8: the GEMM's epilogue rotates and writes the cache (one launch)
            qkv = self.qkv.forward_rotary(x, RotaryCacheWrite(
                ctx.positions, ctx.slot_mapping, cos_sin, self.q_heads, self.kv_heads,
                self.head_dim, kv.k, kv.v))
        if qkv is not None:
            q, k, v = split_qkv(qkv, self.q_heads, self.kv_heads, self.head_dim)
        else:
            # Rotary on q and k, and the write of k and v into the paged cache, in one op.
            q, k, v = rotary_and_cache(self.qkv(x), ctx.positions, cos_sin, self.q_heads,
                                       self.kv_heads, self.head_dim, kv.k, kv.v,
                                       ctx.slot_mapping, k_scale=kv.k_scale,
                                       v_scale=kv.v_scale)
        amax = row_amax if row_amax is not None and self.o.wants_row_amax(t) else None
        o = ctx.backend.forward(q, k, v, kv.k, kv.v, ctx.meta, self.scale, self.window,
                                k_scale=kv.k_scale, v_scale=kv.v_scale,
                                row_amax=amax)  # [T, Hq, D]
        o = o.reshape(t, self.q_size)
        return self.o(o if amax is None else ActivationWithAmax(o, amax))


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

    def forward(self, x: torch.Tensor | QuantizedActivation,
                row_amax: torch.Tensor | None = None) -> torch.Tensor:
        """`row_amax` (zeroed by the norm before, see `LlamaStage.row_amax`): the SiLU x up
        kernel maxes its rows' amax into it and the FP8 down projection quantizes from it."""
        t = x.shape[0]
        if (row_amax is not None and self.gate_up.wants_gated_output(t)
                and self.down.wants_row_amax(t)):
            act = self.gate_up.forward_gated(x, row_amax)  # SiLU x up in the GEMM's epilogue
            if act is not None:
                return self.down(ActivationWithAmax(act, row_amax))
        h = self.gate_up(x)  # [T, 2I]
        if h.dim() == 2 and row_amax is not None and self.down.wants_row_amax(h.shape[0]):
            return self.down(ActivationWithAmax(silu_and_mul(h, row_amax=row_amax), row_amax))
        if h.dim() == 2 and self.down.wants_quantized_input:
            q, scale = silu_and_mul_quant_triton(h, self.down.activation_scale)
            return self.down(QuantizedActivation(q, scale, h.dtype))
        return self.down(silu_and_mul(h))


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

    def fuses_one_token(self) -> bool:
        """Whether a one-token step runs the layer's norms inside the FP8 GEMMs that consume
        them (`LinearMethod.wants_fused_input`): qkv and gate | up normalise their input
        (and down, where it can, gates its own)."""
        return (self.attn.qkv.wants_fused_input(1, "norm")
                and self.mlp.gate_up.wants_fused_input(1, "norm"))

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos_sin: torch.Tensor,
                kv_cache: LayerKV, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream travels beside the layer output (vLLM style): the add that
        closes one block is fused with the norm that opens the next."""
        if ctx.residual_pair is not None and h.shape[0] == 1 and self.fuses_one_token():
            return self._forward_fused(h, residual, cos_sin, kv_cache, ctx.residual_pair, ctx)
        # NOTE: the slot is handed on only behind a norm that zeroes it (the fused FP8 one);
        # o and down each then take it where their GEMM wants it (`wants_row_amax`).
        amax = ctx.row_amax
        attn_amax = amax if amax is not None and self.attn.qkv.wants_quantized_input else None
        mlp_amax = amax if amax is not None and self.mlp.gate_up.wants_quantized_input else None
        x, residual = self.input_norm(h, residual, quant_for=self.attn.qkv, clear=attn_amax)
        x, residual = self.post_norm(self.attn(x, cos_sin, kv_cache, ctx, attn_amax), residual,
                                     quant_for=self.mlp.gate_up, clear=mlp_amax)
        return self.mlp(x, mlp_amax), residual

    def _forward_fused(self, h: torch.Tensor, residual: torch.Tensor | None,
                       cos_sin: torch.Tensor, kv_cache: LayerKV, pair: torch.Tensor,
                       ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """One token with no norm or SiLU launch: each GEMM computes its input (see
        `fuses_one_token`). The residual sums go to the stage's pair of rows: the input norm
        writes row 0 (reading row 1, the previous layer's), the post-attention norm row 1, so
        no launch writes a row it (or a concurrent CTA) still reads."""
        first = residual is None
        x = NormedActivation(h, residual, None if first else pair[0], self.input_norm.weight,
                             self.input_norm.eps)
        residual = h if first else pair[0]
        a = self.attn(x, cos_sin, kv_cache, ctx, None)
        y = NormedActivation(a, residual, pair[1], self.post_norm.weight, self.post_norm.eps)
        gu = self.mlp.gate_up(y)
        act = (GatedActivation(gu) if self.mlp.down.wants_fused_input(1, "gated")
               else silu_and_mul(gu))
        return self.mlp.down(act), pair[1]

    def row_amax_users(self, rows: int) -> tuple[str, ...]:
        """Which projections take their input with its row amax at `rows` tokens (tests,
        profiles): a subset of ("o", "down")."""
        return tuple(name for name, lin, before in (
            ("o", self.attn.o, self.attn.qkv), ("down", self.mlp.down, self.mlp.gate_up))
            if lin.wants_row_amax(rows) and before.wants_quantized_input)


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
        # [max_positions, head_dim] float32 cos | sin, indexed by position (not a parameter).
        self.register_buffer("cos_sin", cos_sin_table(inv_frequencies(cfg).to(device),
                                                      cfg.max_position_embeddings),
                             persistent=False)
        self.layers = nn.ModuleDict({
            str(i): LlamaDecoderLayer(cfg, mapping, tp, i, dtype, device, quant) for i in layers
        })
        if mapping.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
            self.lm_head = ParallelLMHead(local, cfg.hidden_size, cfg.vocab_size, dtype, device,
                                          tp)
        self.attention_backend: AttentionBackend = TorchAttentionBackend()
        # NOTE: FP8 per-token activations at decode: the attention output and SiLU x up rows
        # go to the o / down GEMMs in the model dtype with each row's amax, and the GEMM
        # quantizes them (no quantize launch; measured in PERF_NOTES.md, eighth session).
        # One slot a token row serves both uses of every layer: the layer's input norm zeroes
        # it, the attention maxes into it, the o GEMM reads it; the post-attention norm
        # zeroes it, SiLU x up maxes, the down GEMM reads. Each writer runs after the
        # previous reader on the stream (PDL kernels wait for the previous launch).
        self.row_amax = (torch.zeros(ROW_AMAX_ROWS, dtype=torch.float32, device=device)
                         if quant is not None and quant.quant.method == "fp8"
                         and not quant.quant.static and device.type == "cuda"
                         and os.environ.get(ROW_AMAX_ENV, "1") != "0" else None)

        # NOTE: one-token FP8 steps whose GEMMs compute their own inputs
        # (`LlamaDecoderLayer.fuses_one_token`) keep the residual stream in these two rows
        # instead of updating it in place: every CTA of the GEMM that adds it reads it whole.
        self.residual_pair = (torch.zeros(2, 1, cfg.hidden_size, dtype=dtype, device=device)
                              if quant is not None and quant.quant.method == "fp8"
                              and not quant.quant.static and device.type == "cuda" else None)

        # The one-launch batch-1 decode step (kernels/fp8_decode_step.py, opt-in), made at the
        # first one-token decode (weights loaded by then); False: off, or the stage does not
        # fit it.
        self._decode_step: DecodeStep | None | bool = None

    def decode_step(self) -> DecodeStep | None:
        """The stage's one-launch batch-1 decode kernel, or None (see `DecodeStep.build`)."""
        if self._decode_step is None:
            self._decode_step = DecodeStep.build(self) or False
        return self._decode_step or None

    def context(self, positions: torch.Tensor, slot_mapping: torch.Tensor,
                meta: object) -> StepContext:
        amax = (self.row_amax if self.row_amax is not None
                and positions.shape[0] <= ROW_AMAX_ROWS else None)
        pair = self.residual_pair if positions.shape[0] == 1 else None
        return StepContext(positions, slot_mapping, meta, self.attention_backend, amax, pair)

    def forward(self, tokens_or_hidden: torch.Tensor,
                kv_caches: Sequence[LayerKV],
                ctx: StepContext) -> torch.Tensor:
        """Stage 0 takes token ids `[T]`; later stages take hidden states `[T, hidden]`.
        Returns hidden states `[T, hidden]`: after the final norm on the last stage, else
        the residual stream's sum (what the next stage receives)."""
        h = self.embed(tokens_or_hidden) if self.embed is not None else tokens_or_hidden
        seq_lens = getattr(ctx.meta, "seq_lens", None)
        if (h.shape[0] == 1 and seq_lens is not None and getattr(ctx.meta, "is_decode", False)
                and h.is_cuda and (step := self.decode_step()) is not None):
            out, residual = step(h, kv_caches, seq_lens, ctx.meta.block_tables[0],
                                 ctx.slot_mapping)
            return self.norm(out, residual)[0]
        residual = None
        for layer, cache in zip(self.layers.values(), kv_caches):
            h, residual = layer(h, residual, self.cos_sin, cache, ctx)
        if self.mapping.is_last_stage:
            return self.norm(h, residual)[0]
        return h if residual is None else h + residual

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 on TP rank 0 (the sampling rank); the other TP
        ranks take part in the gather and get their vocabulary slice `[N, V_local]` (in the
        model's dtype: nobody reads it). `out` (that shape and dtype) receives the result,
        converted in the one copy (a CUDA graph's static output)."""
        logits = self.lm_head(hidden)
        if out is not None:
            return out.copy_(logits)
        return logits.float() if self.mapping.tp_rank == ParallelLMHead.SAMPLING_RANK else logits
