"""MPI world and the tensor communicators (NCCL for GPU tensors, MPI for CPU tensors)."""

from trtdist.comm.base import Communicator
from trtdist.comm.mpi_comm import MpiCommunicator
from trtdist.comm.world import World

__all__ = ["Communicator", "MpiCommunicator", "World", "make_communicator"]


def make_communicator(mpi_comm, device) -> Communicator:  # type: ignore[no-untyped-def]
    """NCCL on a CUDA device, MPI on the CPU; both over the ranks of `mpi_comm`, which the
    communicator then owns (its `destroy()` frees it)."""
    if device.type == "cuda":
        from trtdist.comm.nccl import NcclCommunicator

        return NcclCommunicator(mpi_comm, device)
    return MpiCommunicator(mpi_comm)
