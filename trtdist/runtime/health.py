"""Rank liveness: heartbeats both ways between the leader and every worker.

A worker whose process dies is reported by mpirun/srun themselves; this catches the ranks
that stay alive but stop answering (stopped, deadlocked, stuck in a driver call), which
would otherwise leave the whole world waiting forever. The leader's beats let workers notice a
leader that vanished (e.g. a killed `python` process that had spawned them). Heartbeats
travel on a communicator of their own so they never mix with the step plans.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

_TAG = 77


class Heartbeat:
    """Collective: every rank creates one. Workers beat to the leader and watch it; the
    leader beats to every worker and watches them all. `on_failure(rank, seconds)` is
    called once, on the rank that noticed."""

    def __init__(self, comm: MPI.Intracomm, interval: float = 0.5, timeout: float = 10.0,
                 on_failure: Callable[[int, float], None] | None = None) -> None:
        self.comm = comm.Dup()
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.interval, self.timeout = interval, timeout
        self.on_failure = on_failure
        self.enabled = self.size > 1 and MPI.Query_thread() == MPI.THREAD_MULTIPLE
        self._stop = threading.Event()
        self.last_seen = [time.monotonic()] * self.size
        self._pending: list[MPI.Request] = []
        self._thread = threading.Thread(target=self._loop, name="trtdist-heartbeat",
                                        daemon=True)
        if self.enabled:
            self._thread.start()

    def _loop(self) -> None:
        msg = np.array([self.rank], dtype=np.int64)
        buf = np.empty(1, dtype=np.int64)
        status = MPI.Status()
        peers = range(1, self.size) if self.rank == 0 else [0]
        reported = False
        tick = time.monotonic()
        while not self._stop.wait(self.interval):
            if (now := time.monotonic()) - tick > max(self.timeout / 2, 4 * self.interval):
                # NOTE: this thread itself did not run for a while (the process was stopped
                # and resumed, or starved): every peer looks late to it, and blaming one would
                # name the wrong rank. Give each peer a fresh timeout from now instead.
                self.last_seen = [now] * self.size
            tick = now
            self._pending = [r for r in self._pending if not r.Test()]
            self._pending += [self.comm.Isend(msg, dest=p, tag=_TAG) for p in peers]
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                self.comm.Recv(buf, source=status.Get_source(), tag=_TAG)
                self.last_seen[status.Get_source()] = time.monotonic()
            now = time.monotonic()
            late = [(p, now - self.last_seen[p]) for p in peers
                    if now - self.last_seen[p] > self.timeout]
            if late and not reported and self.on_failure is not None:
                reported = True
                self.on_failure(*max(late, key=lambda x: x[1]))

    def stop(self) -> None:
        """Collective: stop the thread and free the communicator."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.comm.Barrier()
        buf = np.empty(1, dtype=np.int64)  # drain heartbeats still in flight before freeing
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
            self.comm.Recv(buf, source=status.Get_source(), tag=_TAG)
        self.comm.Barrier()  # every beat has been received: our sends are complete
        MPI.Request.Waitall(self._pending)
        self.comm.Free()
