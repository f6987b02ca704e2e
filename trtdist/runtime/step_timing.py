"""Where a step's time goes on the leader: host time between steps and GPU idle time.

NOTE: both are measured without adding a sync. The host time is wall time of `step` minus
the time spent waiting for results. The GPU's idle time comes from two CUDA events per step
on the leader's stream, one before a step's first kernel is enqueued and one after its last:
the GPU reaches the "start" event of step N+1 only once the host has enqueued it, so the gap
between step N's "end" and step N+1's "start" is time the GPU had nothing to run. The
events are read once, at the end (`summary`), when every one of them has completed.

On CPU the leader's `execute` runs the forward and the sampler itself (work a GPU does while
the host moves on), so the host time there includes compute; `cpu_compute` records that part
and `summary` also reports the host time without it, the figure that tracks the leader's
own Python on a CPU machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class StepTimer:
    """Collects per-step timings; `enabled` False costs nothing (the default)."""

    enabled: bool = False
    host_s: list[float] = field(default_factory=list)
    cpu_compute_s: list[float] = field(default_factory=list)
    _events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(default_factory=list)
    _open: torch.cuda.Event | None = None

    def gpu_begin(self, device: torch.device) -> None:
        if self.enabled and device.type == "cuda":
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()

    def gpu_end(self, device: torch.device) -> None:
        if self.enabled and device.type == "cuda" and self._open is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._open, end))
            self._open = None

    def host(self, seconds: float) -> None:
        if self.enabled:
            self.host_s.append(seconds)

    def cpu_compute(self, seconds: float) -> None:
        if self.enabled:
            self.cpu_compute_s.append(seconds)

    def reset(self) -> None:
        self.host_s.clear()
        self.cpu_compute_s.clear()
        self._events.clear()

    def summary(self) -> dict[str, float]:
        """`leader_host_ms_per_step` (mean; on CPU also `..._excl_cpu_compute`) and, on
        CUDA, `gpu_busy_ms_per_step` and `gpu_idle_fraction` (idle gaps between steps over
        the span of all steps)."""
        out: dict[str, float] = {}
        if self.host_s:
            out["leader_host_ms_per_step"] = 1e3 * sum(self.host_s) / len(self.host_s)
            if self.cpu_compute_s:
                out["leader_host_ms_per_step_excl_cpu_compute"] = 1e3 * (
                    sum(self.host_s) - sum(self.cpu_compute_s)) / len(self.host_s)
        if len(self._events) >= 2:
            self._events[-1][1].synchronize()
            busy = sum(a.elapsed_time(b) for a, b in self._events)
            span = self._events[0][0].elapsed_time(self._events[-1][1])
            idle = sum(max(0.0, self._events[i][1].elapsed_time(self._events[i + 1][0]))
                       for i in range(len(self._events) - 1))
            out["gpu_busy_ms_per_step"] = busy / len(self._events)
            out["gpu_idle_fraction"] = idle / span if span > 0 else 0.0
        return out
