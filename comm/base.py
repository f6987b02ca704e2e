"""The one interface every tensor communicator offers.

Ranks are numbered inside the communicator's group (0..size-1). All calls are collective
over the group except send/recv. Operations are in place where they can be, so that they
can run inside CUDA-graph capture with fixed buffers.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Communicator(Protocol):
    rank: int
    size: int

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the group, in place; returns it."""
        ...

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `tensor` along dim 0 into a new tensor."""
        ...

    def gather(self, tensor: torch.Tensor, dst: int) -> torch.Tensor:
        """Concatenate every rank's `tensor` (same shape on all) along dim 0 on group rank
        `dst`, which gets a new `[size * N, ...]` tensor; the other ranks get `tensor` back.
        Collective; on NCCL it may be captured in a CUDA graph."""
        ...

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite `tensor` with rank `src`'s, in place; returns it."""
        ...

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send a contiguous tensor to group rank `dst`."""
        ...

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into the preallocated contiguous `tensor` from group rank `src`."""
        ...

    def barrier(self) -> None:
        ...

    def destroy(self) -> None:
        """Release the communicator (and the MPI group it owns). Collective."""
        ...
