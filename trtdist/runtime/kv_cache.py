"""This rank's share of the paged KV pool: its layers, its KV heads, every block id; and
its share of the host swap space that preempted sequences' blocks wait in."""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

from trtdist.kernels.attention import LayerKV
from trtdist.kernels.kv_quant import KV_FP8_DTYPE, KV_SCALE_DTYPE

log = logging.getLogger("trtdist")
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every context

#: `--kv-cache-dtype` values: auto = the model's dtype; fp8 = E4M3 with per token-head scales
KV_CACHE_DTYPES = ("auto", "fp8")


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype,
                           device: torch.device) -> torch.dtype:
    """The element type of the KV pool for `--kv-cache-dtype name`."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                         f"got {name!r}")
    if name == "auto":
        return model_dtype
    if device.type == "cuda":
        # NOTE: the Triton kernels convert E4M3 in hardware (cvt.e4m3), from sm_89 on.
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ValueError(f"--kv-cache-dtype fp8 needs a GPU of compute capability >= 8.9 "
                             f"(Ada, Hopper or newer); {torch.cuda.get_device_name(device)} "
                             f"is {major}.{minor}: use --kv-cache-dtype auto")
    return KV_FP8_DTYPE


def kv_cache_dtype_name(dtype: torch.dtype) -> str:
    """How logs and benchmark results name a pool's element type: fp8_e4m3, bfloat16, ..."""
    return "fp8_e4m3" if dtype == KV_FP8_DTYPE else str(dtype).removeprefix("torch.")


class KVCache:
    """One fused tensor `[layers, 2, num_blocks + 1, block_size, kv_heads, head_dim]`.

    Block ids are global: block b is the same slot on every rank (the leader allocates).
    Block 0 is the reserved null block, never handed out: padded rows of CUDA-graph buckets
    point at it. `num_blocks` counts the usable blocks, ids 1..num_blocks.

    An FP8 pool (`dtype` float8_e4m3fn) also holds `scales` `[layers, 2, num_blocks + 1,
    kv_heads, block_size]` float32, one per token and KV head (format: `kernels/kv_quant.py`).
    Anything that moves a block's K/V must move its scales too. `layers[i]` is layer i's
    `LayerKV` (views, no copies); its scales are `[num_blocks + 1, block_size, kv_heads]`
    views of the head-major storage. In an FP8 pool V is stored token-minor within a block,
    `[kv_heads, head_dim, block_size]`, and `LayerKV.v` is a `[num_blocks + 1, block_size,
    kv_heads, head_dim]` view of that (strides `(*, 1, head_dim * block_size, block_size)`).

    `host_blocks` slots of host memory take whole blocks, scales included, as raw bytes:
    `swap_out` / `swap_in` copy blocks there and back in the device's stream order, so they
    need no synchronization with the steps around them. On a GPU, `pin_host_async` page-locks
    the slots in the background (seconds for many GiB); the first copy waits for it.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 host_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"KV cache needs at least one block, got {num_blocks}")
        if host_blocks < 0:
            raise ValueError(f"the host swap space needs host_blocks >= 0, got {host_blocks}")
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.device = device
        self.data = torch.zeros(num_layers, 2, num_blocks + 1, block_size, kv_heads, head_dim,
                                dtype=dtype, device=device)
        self.scales: torch.Tensor | None = None
        if dtype == KV_FP8_DTYPE:
            # NOTE: head-major within a block: the attention kernels, one program per KV head,
            # then read a page's scales as one contiguous run, not one float per 32-byte sector
            self.scales = torch.zeros(num_layers, 2, num_blocks + 1, kv_heads, block_size,
                                      dtype=KV_SCALE_DTYPE, device=device)
            s = self.scales.transpose(-1, -2)  # [layers, 2, blocks + 1, block_size, kv_heads]
            # NOTE: V token-minor: attention's P @ V reduces over tokens, and an 8-bit operand
            # has no transposing shared-memory load, so the kernels want tokens contiguous
            # (as K has its reduction axis, head_dim, contiguous). [blocks+1, bs, Hkv, D] view:
            v = self.data[:, 1].view(num_layers, num_blocks + 1, kv_heads, head_dim,
                                     block_size).permute(0, 1, 4, 2, 3)
            self.layers = [LayerKV(self.data[i, 0], v[i], s[i, 0], s[i, 1])
                           for i in range(num_layers)]
        else:
            self.layers = [LayerKV(self.data[i, 0], self.data[i, 1]) for i in range(num_layers)]
        # (device pool as bytes [layers, 2, blocks + 1, ...], host slots [host_blocks, bytes])
        self._swap_pools: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pinned = False
        self._pinning: threading.Thread | None = None
        self.host_blocks = host_blocks
        if host_blocks:
            for pool in (self.data, self.scales):
                if pool is None:
                    continue
                raw = pool.view(torch.uint8)
                host = torch.empty(host_blocks, raw[:, :, 0].numel(), dtype=torch.uint8)
                self._swap_pools.append((raw, host))

    def pin_host_async(self) -> None:
        """Start page-locking the host slots (GPU pools), so the copies are asynchronous DMA.
        Call it after CUDA-graph capture: a capture forbids such calls from any thread."""
        if self._swap_pools and self.device.type == "cuda" and self._pinning is None:
            # NOTE: a new thread's current device is 0: it sets this rank's, or the call
            # would make a context on GPU 0
            index = (self.device.index if self.device.index is not None
                     else torch.cuda.current_device())
            self._pinning = threading.Thread(target=self._pin, args=(index,),
                                             name="trtdist-swap-pin", daemon=True)
            self._pinning.start()

    def _pin(self, device_index: int) -> None:
        # NOTE: registered in place, not `pin_memory=True`: torch's pinned allocator rounds a
        # request up to a power of two, which would pin up to twice the swap space. The
        # binding releases the GIL, so the rank goes on serving meanwhile.
        done: list[torch.Tensor] = []
        try:
            torch.cuda.set_device(device_index)
            cudart = torch.cuda.cudart()
            for _, host in self._swap_pools:
                err = int(cudart.cudaHostRegister(host.data_ptr(), host.nbytes,
                                                  _HOST_REGISTER_PORTABLE))
                if err != 0:
                    raise RuntimeError(f"CUDA error {err}")
                done.append(host)
        except Exception as e:  # noqa: BLE001 - copies still work, synchronously
            for host in done:
                torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
            log.warning("could not page-lock %.2f GiB of host memory for the swap space (%s): "
                        "swaps copy synchronously; lower --swap-space", self.host_nbytes / 2**30,
                        e)
            return
        self._pinned = True

    def _wait_pinned(self) -> None:
        if self._pinning is not None:
            self._pinning.join()
            self._pinning = None

    @property
    def host_nbytes(self) -> int:
        """Bytes of the host swap space."""
        return sum(host.nbytes for _, host in self._swap_pools)

    def _index(self, blocks: np.ndarray) -> torch.Tensor:
        idx = torch.from_numpy(np.ascontiguousarray(blocks, dtype=np.int64))
        if self.device.type != "cuda":
            return idx
        # NOTE: from pinned memory, so the upload is queued on the stream, not a host sync
        return idx.pin_memory().to(self.device, non_blocking=True)

    def swap_out(self, pairs: np.ndarray) -> None:
        """Copy device blocks `pairs[:, 0]` into host slots `pairs[:, 1]` (queued on the
        current stream: anything queued after may overwrite the blocks)."""
        if not pairs.size:
            return
        self._wait_pinned()
        idx = self._index(pairs[:, 0])
        runs = _runs(pairs[:, 1])
        for raw, host in self._swap_pools:
            staged = raw.index_select(2, idx).movedim(2, 0).reshape(len(pairs), -1)
            for a, b, slot in runs:
                host[slot:slot + b - a].copy_(staged[a:b], non_blocking=True)

    def swap_in(self, pairs: np.ndarray) -> None:
        """Copy host slots `pairs[:, 0]` into device blocks `pairs[:, 1]` (queued on the
        current stream, before anything queued after reads them)."""
        if not pairs.size:
            return
        self._wait_pinned()
        idx = self._index(pairs[:, 1])
        runs = _runs(pairs[:, 0])
        n = len(pairs)
        for raw, host in self._swap_pools:
            staged = torch.empty((n, host.shape[1]), dtype=torch.uint8, device=self.device)
            for a, b, slot in runs:
                staged[a:b].copy_(host[slot:slot + b - a], non_blocking=True)
            shape = (n, *raw.shape[:2], *raw.shape[3:])
            raw.index_copy_(2, idx, staged.view(shape).movedim(0, 2))

    @property
    def nbytes(self) -> int:
        """Bytes of the pool, scales included."""
        return self.data.nbytes + (self.scales.nbytes if self.scales is not None else 0)

    @property
    def block_bytes(self) -> int:
        """Bytes of one block (`bytes_per_block` of this pool)."""
        return self.nbytes // (self.num_blocks + 1)

    def release(self) -> None:
        """Drop the pool's tensors (the runner's close; graphs must be gone first)."""
        self._wait_pinned()
        if self._pinned:
            cudart = torch.cuda.cudart()
            for _, host in self._swap_pools:
                cudart.cudaHostUnregister(host.data_ptr())
            self._pinned = False
        self._swap_pools.clear()
        del self.data, self.scales, self.layers

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        """Bytes one block takes over this rank's layers and KV heads, scales included."""
        per_head = head_dim * dtype.itemsize
        if dtype == KV_FP8_DTYPE:
            per_head += KV_SCALE_DTYPE.itemsize
        return num_layers * 2 * block_size * kv_heads * per_head


def _runs(slots: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, first slot) of each run of consecutive slots in `slots`: one copy each."""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), len(slots)]
    return [(a, b, int(slots[a])) for a, b in zip(starts, ends)]
