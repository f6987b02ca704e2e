"""This rank's share of the paged KV pool: its layers, its KV heads, every block id."""

from __future__ import annotations

import torch


class KVCache:
    """One fused tensor `[layers, 2, num_blocks + 1, block_size, kv_heads, head_dim]`.

    Block ids are global: block b is the same slot on every rank (the leader allocates).
    Block 0 is the reserved null block, never handed out: padded rows of CUDA-graph buckets
    point at it. `num_blocks` counts the usable blocks, ids 1..num_blocks.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        if num_blocks < 1:
            raise ValueError(f"KV cache needs at least one block, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.data = torch.zeros(num_layers, 2, num_blocks + 1, block_size, kv_heads, head_dim,
                                dtype=dtype, device=device)
        self.layers = [(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return num_layers * 2 * block_size * kv_heads * head_dim * dtype.itemsize
