"""Rank liveness: workers send heartbeats, the leader notices a rank that stops.

A worker whose process dies is reported by mpirun/srun themselves; this catches the ranks
that stay alive but stop answering (stopped, deadlocked, stuck in a driver call), which
would otherwise leave the whole world waiting forever. Heartbeats travel on a communicator
of their own so they never mix with the step plans.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

_TAG = 77


class Heartbeat:
    """Collective: every rank creates one; workers send, the leader watches."""

    def __init__(self, comm: MPI.Intracomm, interval: float = 0.5, timeout: float = 10.0,
                 on_failure: Callable[[int, float], None] | None = None) -> None:
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.interval, self.timeout = interval, timeout
        self.on_failure = on_failure
        self.enabled = self.size > 1 and MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._stop = threading.Event()
        self.last_seen = [time.monotonic()] * self.size
        target = self._watch if self.rank == 0 else self._beat
        self._thread = threading.Thread(target=target, name="trtdist-heartbeat", daemon=True)
        if self.enabled:
            self._thread.start()

    def _beat(self) -> None:
        msg = np.array([self.rank], dtype=np.int64)
        pending: list[MPI.Request] = []
        while not self._stop.wait(self.interval):
            pending = [r for r in pending if not r.Test()]
            pending.append(self.comm.Isend(msg, dest=0, tag=_TAG))
        MPI.Request.Waitall(pending) if pending else None

    def _watch(self) -> None:
        buf = np.empty(1, dtype=np.int64)
        status = MPI.Status()
        reported = False
        while not self._stop.wait(self.interval / 2):
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                self.comm.Recv(buf, source=status.Get_source(), tag=_TAG)
                self.last_seen[status.Get_source()] = time.monotonic()
            now = time.monotonic()
            late = [(r, now - t) for r, t in enumerate(self.last_seen)
                    if r != 0 and now - t > self.timeout]
            if late and not reported and self.on_failure is not None:
                reported = True
                rank, age = max(late, key=lambda x: x[1])
                self.on_failure(rank, age)

    def stop(self) -> None:
        """Collective: stop the thread and free the communicator."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.comm.Barrier()
        if self.rank == 0:  # drain heartbeats still in flight before freeing
            buf = np.empty(1, dtype=np.int64)
            status = MPI.Status()
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                self.comm.Recv(buf, source=status.Get_source(), tag=_TAG)
        self.comm.Barrier()
        self.comm.Free()
