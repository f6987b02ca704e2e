"""Attention backends: per-step metadata built once, then one forward per layer.

A backend turns the step's attention inputs (device tensors the runtime filled once per
step, see `runtime/inputs.py`) into its own metadata with `prepare`, once per step and not
per layer; layers pass that metadata back to `forward` without looking inside. Two backends:

- `TorchAttentionBackend`: the plain-torch reference (`paged_attention.py`): the CPU path
  and the test oracle. Needs the per-sequence lengths on the host.
- `TritonAttentionBackend` (`triton_attention.py`): the CUDA default. Packed variable-length
  queries over the paged cache: prefill chunks attend to their cached prefix plus themselves
  (chunked prefill, prefix reuse); decode is split over the KV length (flash-decoding).

Contract shared by both (the runtime relies on it):
- The K/V of the step's new tokens are already in the cache when `forward` runs (the fused
  rotary + KV-write kernel of `rotary.py` put them there); `forward` also receives them
  packed (`k`, `v`: `[T, kv_heads, head_dim]`) so a prefill kernel may read the new tokens
  from there instead of gathering them from the cache.
- Padded decode rows (CUDA-graph buckets) have `seq_lens == 0`, a block table row of zeros
  (block 0 is the reserved null block) and slot -1: their output is zeros, never NaN, and
  nothing is written.
- Under CUDA-graph capture `forward` must launch a fixed amount of work whatever the
  lengths: `prepare_for_capture` gives metadata whose host-side maxima are the bucket's
  upper bounds (`max_seq_len` = max_model_len), and the kernels mask what lies beyond.
- An FP8 cache (`--kv-cache-dtype fp8`) comes with `k_scale` / `v_scale` (format:
  `kv_quant.py`); attention is then exact to the dequantized cache values, the new tokens'
  K/V included (read back from the cache, not from the packed `k` / `v`).
- `row_amax` (optional): each output row's max |value| (as stored, in the model dtype) is
  maxed into it, for an FP8 o projection that quantizes its input itself. The caller zeroes
  it beforehand (at decode the layer's norm kernel does, see `models/llama.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch
from trtdist.kernels.fp8_quant import check_row_amax, max_rows_into
from trtdist.kernels.paged_attention import (
    AttentionMetadata,
    paged_attention_torch,
    paged_decode_torch,
)

log = logging.getLogger("trtdist")


@dataclass(frozen=True, slots=True)
class AttentionInputs:
    """What the runtime hands a backend once per step. Device tensors may be views of
    persistent (graph-static) buffers."""

    query_start_loc: torch.Tensor  # [S+1] int32, offsets of each sequence in the packed batch
    seq_lens: torch.Tensor  # [S] int32, tokens in the cache after this step (incl. the new)
    block_tables: torch.Tensor  # [S, W] int32, W = ceil(max_model_len / block_size)
    slot_mapping: torch.Tensor  # [T] int64, cache slot of every new token; -1 = padding
    block_size: int
    max_query_len: int  # host: longest query in the step (1 for decode)
    max_seq_len: int  # host: longest seq_len (an upper bound under CUDA graphs)
    is_decode: bool  # every sequence has exactly one new token
    # Host copies of the per-sequence lengths; None under CUDA graphs (the torch backend,
    # which needs them, never runs in a graph).
    query_lens_host: tuple[int, ...] | None = None
    seq_lens_host: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class LayerKV:
    """One layer's share of the paged KV pool, as the layer hands it to the KV write and to
    its attention backend. Scales only for an FP8 cache."""

    k: torch.Tensor  # [num_blocks, block_size, Hkv, D], model dtype or float8_e4m3fn
    v: torch.Tensor
    k_scale: torch.Tensor | None = None  # [num_blocks, block_size, Hkv] float32 (FP8 only)
    v_scale: torch.Tensor | None = None


class AttentionBackend(Protocol):
    name: str

    def prepare(self, inputs: AttentionInputs) -> object:
        """Once per step: metadata for every layer's `forward`."""
        ...

    def prepare_for_capture(self, inputs: AttentionInputs) -> object:
        """Metadata for a CUDA-graph capture of a decode bucket (`inputs` are static
        buffers sized for the bucket; replays only refill those buffers)."""
        ...

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: object, scale: float,
                sliding_window: int | None = None, *, k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None,
                row_amax: torch.Tensor | None = None) -> torch.Tensor:
        """q `[T, Hq, D]`, k/v `[T, Hkv, D]` (already in the cache), caches
        `[num_blocks, block_size, Hkv, D]` (FP8: with scales `[num_blocks, block_size,
        Hkv]`) -> `[T, Hq, D]`; `row_amax` as in the module docstring."""
        ...


class TorchAttentionBackend:
    """The plain-torch reference backend (CPU default, test oracle)."""

    name = "torch"

    def prepare(self, inputs: AttentionInputs) -> AttentionMetadata:
        if inputs.query_lens_host is None or inputs.seq_lens_host is None:
            raise ValueError("the torch attention backend needs host-side lengths")
        # NOTE: the batched decode gathers every column of the block table; keep only the
        # columns the longest sequence uses (the fixed width serves CUDA graphs).
        used = -(-inputs.max_seq_len // inputs.block_size)
        return AttentionMetadata(
            query_start_loc=inputs.query_start_loc, context_lens=inputs.seq_lens,
            block_tables=inputs.block_tables[:, :used], slot_mapping=inputs.slot_mapping,
            query_lens_host=inputs.query_lens_host, context_lens_host=inputs.seq_lens_host,
            block_size=inputs.block_size, is_decode=inputs.is_decode)

    def prepare_for_capture(self, inputs: AttentionInputs) -> AttentionMetadata:
        raise RuntimeError("the torch attention backend does not run inside CUDA graphs")

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: object, scale: float,
                sliding_window: int | None = None, *, k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None,
                row_amax: torch.Tensor | None = None) -> torch.Tensor:
        assert isinstance(meta, AttentionMetadata)
        check_row_amax(row_amax, q.shape[0], q.device, "attention")
        fn = paged_decode_torch if meta.is_decode else paged_attention_torch
        out = fn(q, k_cache, v_cache, meta, scale, sliding_window, k_scale=k_scale,
                 v_scale=v_scale)
        if row_amax is not None:
            max_rows_into(row_amax, out)
        return out


def default_backend(device: torch.device, name: str = "auto") -> AttentionBackend:
    """`auto`: Triton on CUDA, torch elsewhere. `torch` / `triton` force one."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown attention backend {name!r}; use auto, torch or triton")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttentionBackend()
    try:
        from trtdist.kernels.triton_attention import TritonAttentionBackend
    except ImportError as e:
        if name == "triton":
            raise ValueError(f"the triton attention backend is not available: {e}") from e
        log.warning("triton attention backend unavailable (%s); using the torch backend", e)
        return TorchAttentionBackend()
    return TritonAttentionBackend()
