"""Rank discovery from each launcher's environment."""

from __future__ import annotations

import pytest
from trtdist.launch.env import RankInfo, discover_rank


@pytest.mark.parametrize("env,want", [
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8",
      "OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"},
     RankInfo(3, 8, 3, 4, "openmpi")),
    ({"PMI_RANK": "5", "PMI_SIZE": "8", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"},
     RankInfo(5, 8, 1, 4, "mpich")),
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
      "SLURM_NTASKS_PER_NODE": "4(x2)"}, RankInfo(6, 8, 2, 4, "slurm")),
    ({}, RankInfo(0, 1, 0, 1, "none")),
])
def test_discover_rank(env: dict[str, str], want: RankInfo) -> None:
    assert discover_rank(env) == want


def test_stale_parent_variables_are_ignored() -> None:
    # A spawned world inherits its parent's OMPI_* variables; the MPI values win.
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    assert discover_rank(env, mpi_rank=2, mpi_size=4) == RankInfo(2, 4, 2, 4, "mpi")


def test_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK='x' is not an integer"):
        discover_rank({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})
