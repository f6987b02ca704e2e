"""Start a world of ranks from a plain `python` process (MPI dynamic process management).

The parent becomes rank 0 of the merged world; the children run `argv` and call
`join_parent_world()` to obtain the same merged communicator.
"""

from __future__ import annotations

import os

from mpi4py import MPI

# Open MPI refuses to run as root, or more ranks than cores, unless told; a user who runs
# `python exp.py` as root in a container expects it to work like mpirun --allow-run-as-root.
_ROOT_ENV = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
             "PRTE_ALLOW_RUN_AS_ROOT", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM")


def _prepare_environment() -> None:
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        for name in _ROOT_ENV:
            os.environ.setdefault(name, "1")
    os.environ.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
    os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")


class SpawnedWorld:
    """A world made by spawning: the merged intracommunicator (`comm`) plus the
    parent-child intercommunicator it came from.

    NOTE: Open MPI 5 hangs in MPI_Comm_disconnect on the merged communicator; freeing it
    and disconnecting the original intercommunicator detaches the processes cleanly.
    """

    def __init__(self, inter: MPI.Intercomm, high: bool) -> None:
        self.inter = inter
        self.comm: MPI.Intracomm = inter.Merge(high=high)

    def close(self) -> None:
        """Collective over parent and children: detach them (idempotent)."""
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.inter.Disconnect()


def spawn_world(num_children: int, command: str, args: list[str]) -> SpawnedWorld:
    """Spawn `num_children` processes running `command args` and merge them with this one;
    this process is rank 0 of the merged world."""
    if num_children < 1:
        raise ValueError(f"need at least one child to spawn, got {num_children}")
    _prepare_environment()
    return SpawnedWorld(MPI.COMM_SELF.Spawn(command, args=args, maxprocs=num_children),
                        high=False)


def join_parent_world() -> SpawnedWorld:
    """In a spawned child: the world merged with the parent (parent is rank 0)."""
    parent = MPI.Comm.Get_parent()
    if parent == MPI.COMM_NULL:
        raise RuntimeError("this process was not spawned by a trtdist parent")
    return SpawnedWorld(parent, high=True)
