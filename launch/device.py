"""Bind a rank to its device: GPU `local_rank` when CUDA is present, else the CPU."""

from __future__ import annotations

import os

import torch
from trtdist.launch.env import RankInfo


def cpu_threads_per_rank(info: RankInfo) -> int:
    """Share the node's cores among the ranks on it instead of oversubscribing them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(info.local_size, 1))


def bind_device(info: RankInfo, device: str = "auto") -> torch.device:
    """Return the device this rank computes on, and make it current.

    `device` is "auto" (GPU `local_rank` if CUDA is available), "cuda" or "cpu".
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be 'auto', 'cuda' or 'cpu', got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        torch.set_num_threads(cpu_threads_per_rank(info))
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"rank {info.rank}: --device cuda asked for, but CUDA is not available")
    count = torch.cuda.device_count()
    if info.local_rank >= count:
        raise RuntimeError(
            f"rank {info.rank}: local rank {info.local_rank} needs GPU {info.local_rank}, but "
            f"this node has {count} visible GPU(s); start at most {count} ranks per node"
        )
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)
