"""Every collective under mpirun: MPI on CPU in CI, NCCL (with CUDA-graph capture) on GPUs."""

from __future__ import annotations

import pytest
from helpers import MPI_SCRIPTS, mpirun, need_devices


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpi_communicator(n: int) -> None:
    proc = mpirun(n, [str(MPI_SCRIPTS / "check_comm.py"), "cpu"])
    assert f"comm ok: {n} ranks on cpu" in proc.stdout


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 4])
def test_nccl_communicator_and_graph_capture(n: int) -> None:
    need_devices(n)
    proc = mpirun(n, [str(MPI_SCRIPTS / "check_comm.py"), "cuda"])
    assert f"comm ok: {n} ranks on cuda" in proc.stdout
