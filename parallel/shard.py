"""Shard rules: which slice of a full weight each tensor-parallel rank holds.

Pure functions over ints and tensors so that build (offline, all ranks at once) and
on-the-fly loading (each rank its own) use the same arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _even(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} = {total} is not divisible by tp_size {parts}")
    return total // parts


@dataclass(frozen=True, slots=True)
class AttentionShard:
    """Heads one TP rank holds. GQA-aware: when tp_size > num_kv_heads, each KV head is
    replicated on tp_size / num_kv_heads consecutive ranks (their query heads all use it)."""

    q_start: int
    q_heads: int
    kv_start: int
    kv_heads: int

    @property
    def q_heads_per_kv(self) -> int:
        return self.q_heads // self.kv_heads


def attention_shard(num_heads: int, num_kv_heads: int, tp_size: int,
                    tp_rank: int) -> AttentionShard:
    if num_heads % num_kv_heads:
        raise ValueError(f"num_attention_heads {num_heads} is not a multiple of "
                         f"num_key_value_heads {num_kv_heads}")
    if num_heads % tp_size:
        raise ValueError(f"{tp_size} tensor-parallel ranks cannot split {num_heads} attention "
                         f"heads evenly; choose a tp_size that divides {num_heads}")
    q_local = num_heads // tp_size
    if num_kv_heads >= tp_size:
        kv_local = _even(num_kv_heads, tp_size, "num_key_value_heads")
        kv_start = tp_rank * kv_local
    else:
        if tp_size % num_kv_heads:
            raise ValueError(f"tp_size {tp_size} exceeds num_key_value_heads {num_kv_heads} "
                             f"and is not a multiple of it, so KV heads cannot be replicated "
                             "evenly")
        kv_local = 1
        kv_start = tp_rank // (tp_size // num_kv_heads)
    return AttentionShard(tp_rank * q_local, q_local, kv_start, kv_local)


def shard_dim(tensor: torch.Tensor, dim: int, tp_size: int, tp_rank: int,
              what: str = "tensor") -> torch.Tensor:
    """The tp_rank-th of tp_size equal slices along `dim`."""
    size = _even(tensor.shape[dim], tp_size, f"{what} dim {dim}")
    return tensor.narrow(dim, tp_rank * size, size)


def vocab_range(vocab_size: int, tp_size: int, tp_rank: int) -> tuple[int, int, int]:
    """(start, end, padded_local) rows of the vocabulary on this rank. The vocabulary is
    padded up to a multiple of tp_size; padded rows are zero and their logits masked."""
    local = -(-vocab_size // tp_size)
    start = min(tp_rank * local, vocab_size)
    return start, min(start + local, vocab_size), local


def shard_vocab(tensor: torch.Tensor, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Rows of an embedding / LM head for this rank, zero-padded to the local size."""
    start, end, local = vocab_range(tensor.shape[0], tp_size, tp_rank)
    out = torch.zeros((local, *tensor.shape[1:]), dtype=tensor.dtype)
    out[: end - start] = tensor[start:end]
    return out


def shard_heads(tensor: torch.Tensor, start: int, count: int, head_dim: int) -> torch.Tensor:
    """Rows [start*head_dim, (start+count)*head_dim) of a Q/K/V projection (weight or bias)."""
    return tensor[start * head_dim:(start + count) * head_dim]
