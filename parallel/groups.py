"""The communicators one rank needs: its TP group and its PP group (same TP slot)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trtdist.comm import Communicator, World, make_communicator
from trtdist.parallel.mapping import Mapping


@dataclass(slots=True)
class ParallelGroups:
    """Communicators for one rank. `pp` ranks are stage indices (group rank == pp_rank)."""

    mapping: Mapping
    tp: Communicator
    pp: Communicator

    @classmethod
    def create(cls, world: World, mapping: Mapping, device: torch.device) -> ParallelGroups:
        """Collective over the world: every rank must call it in the same order."""
        if mapping.world_size != world.size:
            raise ValueError(f"mapping is for {mapping.world_size} ranks but the MPI world has "
                             f"{world.size}; start tp_size x pp_size = {mapping.world_size} ranks")
        tp_mpi = world.split(color=mapping.pp_rank, key=mapping.tp_rank)
        pp_mpi = world.split(color=mapping.tp_rank, key=mapping.pp_rank)
        return cls(mapping, make_communicator(tp_mpi, device), make_communicator(pp_mpi, device))

    def destroy(self) -> None:
        """Collective: release both communicators."""
        self.tp.destroy()
        self.pp.destroy()
