"""Communicator for CPU tensors over MPI, zero-copy through numpy views.

NOTE: numpy has no bfloat16, so bf16 tensors travel as int16 views for point-to-point and
broadcast (bytes only), and are summed in float32 for all-reduce.
"""

from __future__ import annotations

import numpy as np
import torch
from mpi4py import MPI


def _view(tensor: torch.Tensor) -> np.ndarray:
    if tensor.device.type != "cpu":
        raise ValueError(f"MpiCommunicator works on CPU tensors, got one on {tensor.device}")
    if not tensor.is_contiguous():
        raise ValueError("MpiCommunicator needs contiguous tensors")
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


class MpiCommunicator:
    """Tensor collectives over an mpi4py intracommunicator."""

    def __init__(self, comm: MPI.Intracomm) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        if tensor.dtype in (torch.bfloat16, torch.float16):
            acc = tensor.float()
            self.comm.Allreduce(MPI.IN_PLACE, acc.numpy(), op=MPI.SUM)
            tensor.copy_(acc)
            return tensor
        self.comm.Allreduce(MPI.IN_PLACE, _view(tensor), op=MPI.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
        if self.size == 1:
            return out.copy_(tensor)
        self.comm.Allgather(_view(tensor), _view(out))
        return out

    def gather(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        if not 0 <= dst < self.size:
            raise ValueError(f"gather: dst must be a group rank in [0, {self.size}), got {dst}")
        tensor = tensor.contiguous()
        if self.rank != dst:
            if self.size > 1:
                self.comm.Gather(_view(tensor), None, root=dst)
            return tensor
        out = torch.empty((self.size * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
        if self.size == 1:
            return out.copy_(tensor)
        self.comm.Gather(_view(tensor), _view(out), root=dst)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        if self.size > 1:
            self.comm.Bcast(_view(tensor), root=src)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        self.comm.Send(_view(tensor.contiguous()), dest=dst, tag=_TENSOR_TAG)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        self.comm.Recv(_view(tensor), source=src, tag=_TENSOR_TAG)
        return tensor

    def barrier(self) -> None:
        self.comm.Barrier()

    def destroy(self) -> None:
        if self.comm not in (MPI.COMM_WORLD, MPI.COMM_SELF, MPI.COMM_NULL):
            self.comm.Free()
        self.comm = MPI.COMM_NULL


_TENSOR_TAG = 17
