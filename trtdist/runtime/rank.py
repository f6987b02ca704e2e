"""Bring one rank up: device, communicators, its model shard and its part of the KV pool."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trtdist.comm.world import World
from trtdist.engine.load import load_stage
from trtdist.engine.source import ModelSource
from trtdist.launch.device import bind_device
from trtdist.parallel.groups import ParallelGroups
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.shard import attention_shard
from trtdist.runtime.kv_cache import KVCache
from trtdist.runtime.model_runner import ModelRunner


class WorldError(RuntimeError):
    """One or more ranks failed; the message names each one."""


@dataclass(frozen=True, slots=True)
class RankOptions:
    """How each rank loads and runs its shard."""

    tp_size: int = 1
    pp_size: int = 1
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int = 256
    pp_partition: tuple[int, ...] | None = None
    verify_checksums: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")


def check_world(world: World, error: str | None) -> None:
    """Collective: raise on every rank if any rank reported an error."""
    failed = world.gather_errors(error)
    if failed:
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
        raise WorldError(f"{len(failed)} of {world.size} rank(s) failed:\n{lines}")


def start_rank(world: World, source: ModelSource, opts: RankOptions) -> ModelRunner:
    """Collective over the world. Returns this rank's runner, ready to execute plans."""
    error = None
    mapping = device = None
    try:
        mapping = Mapping(world.size, opts.tp_size, opts.pp_size, world.rank)
        device = bind_device(world.info, opts.device)
    except Exception as e:  # noqa: BLE001 - reported collectively below
        error = str(e)
    check_world(world, error)
    assert mapping is not None and device is not None
    groups = ParallelGroups.create(world, mapping, device)
    runner = None
    try:
        model = load_stage(source, mapping, groups.tp, device, opts.dtype, opts.pp_partition,
                           opts.verify_checksums, opts.seed)
        cfg = source.config
        shard = attention_shard(cfg.num_heads, cfg.num_kv_heads, mapping.tp_size,
                                mapping.tp_rank)
        kv = KVCache(len(model.layer_ids), opts.num_kv_blocks, opts.block_size, shard.kv_heads,
                     cfg.head_dim, model.dtype, device)
        runner = ModelRunner(world, groups, model, kv)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    check_world(world, error)
    assert runner is not None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return runner
