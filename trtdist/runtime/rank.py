"""Bring one rank up: device, communicators, its model shard and its part of the KV pool."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from trtdist.comm.world import World
from trtdist.engine.load import load_stage
from trtdist.engine.source import ModelSource
from trtdist.kernels.attention import default_backend
from trtdist.launch.device import bind_device
from trtdist.parallel.groups import ParallelGroups
from trtdist.parallel.mapping import Mapping
from trtdist.parallel.shard import attention_shard
from trtdist.runtime.block_table import table_rows
from trtdist.runtime.graph_runner import (
    CUDAGraphRunner,
    graph_batch_sizes,
    measure_decode_memory,
)
from trtdist.runtime.inputs import StepInputs
from trtdist.runtime.kv_cache import (
    KV_CACHE_DTYPES,
    KVCache,
    kv_cache_dtype_name,
    resolve_kv_cache_dtype,
)
from trtdist.runtime.model_runner import ModelRunner

log = logging.getLogger("trtdist")


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
    kv_cache_fraction: float = 0.9
    num_kv_blocks: int | None = None
    max_model_len: int | None = None
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    pp_partition: tuple[int, ...] | None = None
    verify_checksums: bool = True
    seed: int = 0
    enforce_eager: bool = False  # never capture CUDA graphs (vLLM's name)
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # None: the default ladder
    attention_backend: str = "auto"  # auto (triton on CUDA, torch elsewhere), torch, triton
    quant: str = "auto"  # linear method where the model does not fix it (see load_stage)
    kv_cache_dtype: str = "auto"  # auto (the model dtype) or fp8 (E4M3, per token-head scales)
    # GiB of host memory per rank for swap preemption; None: 16 GiB on a GPU (at most a
    # quarter of the rank's share of free host memory), none on CPU, whose pool is in host
    # memory already; 0: preemption always recomputes.
    swap_space: float | None = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0 < self.kv_cache_fraction <= 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        for name in ("max_batch_size", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be auto, torch or triton, got "
                             f"{self.attention_backend!r}")
        if self.swap_space is not None and not 0 <= self.swap_space < float("inf"):
            raise ValueError(f"swap_space must be a number of GiB >= 0, got {self.swap_space}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                             f"{self.kv_cache_dtype!r}")
        if self.cuda_graph_batch_sizes is not None:
            object.__setattr__(self, "cuda_graph_batch_sizes",
                               tuple(int(b) for b in self.cuda_graph_batch_sizes))
            graph_batch_sizes(self.max_batch_size, self.cuda_graph_batch_sizes)  # validates


def check_world(world: World, error: str | None) -> None:
    """Collective: raise on every rank if any rank reported an error."""
    failed = world.gather_errors(error)
    if failed:
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
        raise WorldError(f"{len(failed)} of {world.size} rank(s) failed:\n{lines}")


def _available_memory(device: torch.device, ranks_on_node: int) -> int:
    """Bytes this rank may still use: free GPU memory, or its share of the node's RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        avail = info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return avail // max(ranks_on_node, 1)


def kv_blocks_that_fit(bytes_per_block: int, device: torch.device, opts: RankOptions,
                       max_model_len: int, ranks_on_node: int, rank: int,
                       reserved: int = 0) -> int:
    """Blocks for `kv_cache_fraction` of the memory left after the weights and the
    `reserved` bytes of CUDA graphs (TensorRT-LLM's kv_cache_free_gpu_mem_fraction), capped
    at what max_batch_size full-length sequences use. One more block than returned is
    allocated: the null block."""
    left = max(_available_memory(device, ranks_on_node) - reserved, 0)
    fit = int(opts.kv_cache_fraction * left) // bytes_per_block - 1
    if opts.num_kv_blocks is not None:
        if opts.num_kv_blocks > fit:
            raise ValueError(f"rank {rank}: --num-kv-blocks {opts.num_kv_blocks} needs "
                             f"{opts.num_kv_blocks * bytes_per_block / 2**30:.2f} GiB but only "
                             f"{fit} blocks fit in the memory left")
        return opts.num_kv_blocks
    useful = -(-max_model_len // opts.block_size) * opts.max_batch_size
    return min(fit, useful)


DEFAULT_SWAP_SPACE_GIB = 16


def swap_slots_that_fit(bytes_per_block: int, device: torch.device, opts: RankOptions,
                        num_blocks: int, ranks_on_node: int, rank: int) -> int:
    """Host swap slots (one KV block each) for `opts.swap_space`, at most `num_blocks`: a
    swap space larger than the device pool would hold sequences that could never all run."""
    share = _available_memory(torch.device("cpu"), ranks_on_node)
    if opts.swap_space is None:
        if device.type != "cuda":
            return 0
        want = min(DEFAULT_SWAP_SPACE_GIB << 30, share // 4)
    else:
        want = int(opts.swap_space * 2**30)
        if want > share // 2:
            raise ValueError(f"rank {rank}: --swap-space {opts.swap_space:g} GiB is more than "
                             f"half of this rank's share of the free host memory "
                             f"({share / 2**30:.1f} GiB); lower it (0 turns swapping off)")
    return min(want // bytes_per_block, num_blocks)


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
    start = time.perf_counter()
    reserved = 0
    use_graphs = device.type == "cuda" and not opts.enforce_eager
    try:
        model = load_stage(source, mapping, groups.tp, device, opts.dtype, opts.pp_partition,
                           opts.verify_checksums, opts.seed, opts.quant)
        model.attention_backend = default_backend(device, opts.attention_backend)
        if use_graphs and model.attention_backend.name == "torch":
            log.warning("rank %d: the torch attention backend cannot run in CUDA graphs; "
                        "decode runs eagerly", world.rank)
            use_graphs = False
        cfg = source.config
        shard = attention_shard(cfg.num_heads, cfg.num_kv_heads, mapping.tp_size,
                                mapping.tp_rank)
        max_len = min(opts.max_model_len or cfg.max_position_embeddings,
                      cfg.max_position_embeddings)
        inputs = StepInputs(opts.max_num_tokens, opts.max_batch_size, max_len, opts.block_size,
                            device, table_rows(opts.max_batch_size, mapping.pp_size))
        hidden_in = (None if mapping.is_first_stage else
                     torch.zeros(inputs.max_tokens, cfg.hidden_size, dtype=model.dtype,
                                 device=device))
        buckets = graph_batch_sizes(opts.max_batch_size, opts.cuda_graph_batch_sizes)
        kv_dtype = resolve_kv_cache_dtype(opts.kv_cache_dtype, model.dtype, device)
        per_block = KVCache.bytes_per_block(len(model.layer_ids), opts.block_size,
                                            shard.kv_heads, cfg.head_dim, kv_dtype)
        if use_graphs:
            # NOTE: capture needs the real pool, but the pool is sized from the memory left:
            # run the largest bucket's decode body once eagerly on a two-block pool first.
            scratch = KVCache(len(model.layer_ids), 1, opts.block_size, shard.kv_heads,
                              cfg.head_dim, kv_dtype, device)
            try:
                peak = measure_decode_memory(model, inputs, hidden_in, scratch.layers,
                                             buckets[-1])
                reserved = int(peak * 1.25) + (64 << 20)
            except Exception as e:  # noqa: BLE001 - the same on every rank (same code)
                log.warning("rank %d: decode warm-up for CUDA graphs failed (%s: %s); decode "
                            "runs eagerly", world.rank, type(e).__name__, e)
                use_graphs = False
            del scratch
            torch.cuda.empty_cache()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        blocks = kv_blocks_that_fit(per_block, device, opts, max_len, world.info.local_size,
                                    world.rank, reserved)
        host_blocks = swap_slots_that_fit(per_block, device, opts, blocks,
                                          world.info.local_size, world.rank)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    check_world(world, error)
    # NOTE: every rank allocates the same number of blocks (and swap slots), so a block id
    # names the same slot everywhere; the leader's allocators hand them out.
    blocks = world.allreduce_min(blocks)
    host_blocks = world.allreduce_min(host_blocks)
    graphs = None
    try:
        kv = KVCache(len(model.layer_ids), blocks, opts.block_size, shard.kv_heads,
                     cfg.head_dim, kv_dtype, device, host_blocks)
        if use_graphs:
            graphs = CUDAGraphRunner(model, kv.layers, inputs, hidden_in, buckets)
            try:
                graphs.capture()
            except Exception as e:  # noqa: BLE001
                log.warning("rank %d: CUDA-graph capture failed (%s: %s); decode runs eagerly",
                            world.rank, type(e).__name__, e)
                graphs = None
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    check_world(world, error)
    # NOTE: graphs on every rank or on none: a replay all-reduces `bucket` rows, an eager
    # step only the real ones, and the TP peers of a collective must agree on its size.
    if world.allreduce_min(int(graphs is not None)) == 0 and graphs is not None:
        log.warning("rank %d: another rank could not capture CUDA graphs; decode runs "
                    "eagerly", world.rank)
        graphs = None
    try:
        runner = ModelRunner(world, groups, model, kv, inputs, hidden_in, graphs)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        graph_note = (f"{len(graphs.graphs)} CUDA graphs captured in "
                      f"{graphs.capture_seconds:.1f} s" if graphs else "eager (no CUDA graphs)")
        log.info("rank %d (tp %d, pp %d) on %s: layers %d-%d, %.1f MiB of weights, %d KV "
                 "blocks (%s, %d B each, %.1f MiB), %d swap slots (%.1f MiB of host memory), "
                 "attention %s, %s, ready in %.1f s",
                 world.rank, mapping.tp_rank, mapping.pp_rank, device, model.layer_ids.start,
                 model.layer_ids.stop - 1, weights / 2**20, blocks, kv_cache_dtype_name(kv.dtype),
                 per_block, kv.nbytes / 2**20, host_blocks, kv.host_nbytes / 2**20,
                 model.attention_backend.name, graph_note,
                 time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001
        error = f"{type(e).__name__}: {e}"
    check_world(world, error)
    assert runner is not None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    kv.pin_host_async()  # after graph capture (see there)
    return runner
