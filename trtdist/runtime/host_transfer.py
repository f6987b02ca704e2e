"""Pinned host buffers for the sampler's per-step copies, reused across steps.

A buffer is reused only once the copy that last used it has finished (its event) and, for
results, once the caller has read them (`SampledStep.wait`), so several steps can be in
flight (overlap scheduling) without allocating pinned memory per step and without syncing.
"""

from __future__ import annotations

import numpy as np
import torch


class _Pinned:
    """One pinned buffer, the event of the last copy through it, and whether a result in it
    waits to be read."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.buffer = torch.empty(0, dtype=dtype, pin_memory=True)
        self.event = torch.cuda.Event()
        self.busy = False

    def reserve(self, size: int) -> torch.Tensor:
        """The first `size` values of the buffer, grown (doubling, rarely) if needed."""
        if self.buffer.numel() < size:
            self.buffer = torch.empty(max(size, 2 * self.buffer.numel()),
                                      dtype=self.buffer.dtype, pin_memory=True)
        return self.buffer[:size]


class PinnedRing:
    """Pinned buffers of one dtype; a new one only while every other is in use."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.entries: list[_Pinned] = []
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        """The side stream this ring's device-to-host copies of `device` run on."""
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def acquire(self) -> _Pinned:
        for entry in self.entries:
            if not entry.busy and entry.event.query():
                return entry
        entry = _Pinned(self.dtype)
        self.entries.append(entry)
        return entry

    def to_device(self, host: np.ndarray, device: torch.device) -> torch.Tensor:
        """One non-blocking host-to-device copy of `host` (this ring's dtype)."""
        entry = self.acquire()
        staged = entry.reserve(host.size)
        staged.numpy()[:] = host.reshape(-1)
        out = staged.to(device, non_blocking=True).view(host.shape)
        entry.event.record()
        return out


class SampledStep:
    """A step's result rows on their way to the host: `wait()` blocks until the one copy is
    done and returns them (float64 `[rows, width]`)."""

    def __init__(self, rows: np.ndarray | None, entry: _Pinned | None = None,
                 shape: tuple[int, int] = (0, 0)) -> None:
        self._rows, self._entry, self._shape = rows, entry, shape

    @classmethod
    def start(cls, out: torch.Tensor, ring: PinnedRing | None) -> SampledStep:
        """Enqueue the copy of the device tensor `out` [rows, width] float64 (CPU: at once)."""
        if out.device.type != "cuda":
            return cls(out.numpy())
        assert ring is not None
        entry = ring.acquire()
        entry.busy = True
        # NOTE: on a side stream, so the next step's kernels (already queued behind this one
        # with overlap scheduling) do not wait for the copy's latency (~several us a step at
        # batch 1); `record_stream` keeps `out`'s memory until the copy has read it.
        stream = ring.copy_stream(out.device)
        stream.wait_stream(torch.cuda.current_stream(out.device))
        with torch.cuda.stream(stream):
            entry.reserve(out.numel()).view(out.shape).copy_(out, non_blocking=True)
            entry.event.record(stream)
        out.record_stream(stream)
        return cls(None, entry, (out.shape[0], out.shape[1]))

    def ready(self) -> bool:
        """True when `wait()` would not block."""
        return self._entry is None or self._entry.event.query()

    def wait(self) -> np.ndarray:
        if self._rows is None:
            assert self._entry is not None
            self._entry.event.synchronize()  # the step's one sync
            n = self._shape[0] * self._shape[1]
            self._rows = self._entry.buffer[:n].numpy().reshape(self._shape).copy()
            self._entry.busy = False  # NOTE: the buffer serves a later step from now on
            self._entry = None
        return self._rows
