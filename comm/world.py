"""The MPI world: who we are, sub-groups, and the small control-plane messages.

NOTE: control-plane messages are numpy buffers (Bcast/Send of int64/float64/uint8), never
pickled objects: a rank only ever interprets fixed, typed layouts from its peers.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI
from trtdist.launch.env import RankInfo, discover_rank


def _poll(request: MPI.Request, spin_s: float = 0.005, max_sleep_s: float = 0.002) -> None:
    # NOTE: spin first (a busy server's next plan arrives within a few ms), then back off.
    start = time.perf_counter()
    sleep = 5e-5
    while not request.Test():
        if time.perf_counter() - start > spin_s:
            time.sleep(sleep)
            sleep = min(sleep * 2, max_sleep_s)


class World:
    """An MPI intracommunicator plus where this process sits in it."""

    def __init__(self, comm: MPI.Intracomm | None = None) -> None:
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.info: RankInfo = discover_rank(mpi_rank=self.rank, mpi_size=self.size)
        if comm is not None and self.info.launcher == "mpi":
            # A world made by spawning: ranks share one node; local rank = rank.
            self.info = RankInfo(self.rank, self.size, self.rank, self.size, "spawn")

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def split(self, color: int, key: int) -> MPI.Intracomm:
        """Collective: the ranks passing the same `color` form one group, ordered by `key`."""
        return self.comm.Split(color, key)

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast_array(self, array: np.ndarray | None, dtype: np.dtype, root: int = 0,
                    idle_wait: bool = False) -> np.ndarray:
        """Broadcast a 1-D array whose length only `root` knows.

        With `idle_wait`, a receiving rank polls for the message and sleeps between polls
        once it has waited a while, instead of spinning a core inside MPI."""
        n = np.array([0 if array is None else array.size], dtype=np.int64)
        if idle_wait:  # MPI matches a non-blocking broadcast only with non-blocking ones
            request = self.comm.Ibcast(n, root=root)
            request.Wait() if self.rank == root else _poll(request)
        else:
            self.comm.Bcast(n, root=root)
        buf = (np.ascontiguousarray(array, dtype=dtype) if self.rank == root
               else np.empty(int(n[0]), dtype=dtype))
        if n[0]:
            self.comm.Bcast(buf, root=root)
        return buf

    def bcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        arr = None if data is None else np.frombuffer(data, dtype=np.uint8)
        return self.bcast_array(arr, np.dtype(np.uint8), root).tobytes()

    def allreduce_min(self, value: int) -> int:
        buf = np.array([value], dtype=np.int64)
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MIN)
        return int(buf[0])

    def gather_errors(self, error: str | None) -> list[tuple[int, str]]:
        """Collective: every rank learns which ranks failed and why."""
        data = (error or "").encode()
        lengths = np.zeros(self.size, dtype=np.int64)
        self.comm.Allgather(np.array([len(data)], dtype=np.int64), lengths)
        if not lengths.any():
            return []
        buf = np.empty(int(lengths.sum()), dtype=np.uint8)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self.comm.Allgatherv(np.frombuffer(data, dtype=np.uint8),
                             [buf, lengths.tolist(), offsets.tolist(), MPI.BYTE])
        return [(r, buf[o:o + n].tobytes().decode(errors="replace"))
                for r, (o, n) in enumerate(zip(offsets, lengths)) if n]

    def abort(self, message: str, code: int = 1) -> None:
        """Print `message` naming this rank and bring the whole world down."""
        print(f"[trtdist rank {self.rank}] fatal: {message}", file=sys.stderr, flush=True)
        self.comm.Abort(code)
