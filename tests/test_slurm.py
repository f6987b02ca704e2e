"""The single-node sbatch script on a real (one-node) Slurm: Debian's slurm-wlm and munge,
started here as root; the job serves the tiny model with 2 CPU ranks and answers a request."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ROOT, mpi_env
from server_helpers import free_port

pytestmark = pytest.mark.mpi


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _ensure_installed() -> None:
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-qq"], env=env)
    proc = _run(["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"], env=env)
    assert proc.returncode == 0, f"could not install slurm-wlm and munge:\n{proc.stderr[-2000:]}"


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld, slurmd and munged needs root")
    _ensure_installed()
    root = tmp_path_factory.mktemp("slurm")
    started: list[int] = []
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        key.write_bytes(os.urandom(1024))
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
    if _run(["pgrep", "-x", "munged"]).returncode != 0:
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        proc = _run(["runuser", "-u", "munge", "--", "munged", "--force"])
        assert proc.returncode == 0, proc.stderr
        started += [int(p) for p in _run(["pgrep", "-x", "munged"]).stdout.split()]
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=trtdist-test
SlurmctldHost={host}
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    env = dict(os.environ, SLURM_CONF=str(conf))
    try:
        for daemon in ("slurmctld", "slurmd"):
            proc = _run([daemon], env=env)
            assert proc.returncode == 0, f"{daemon} failed: {proc.stderr}"
        for _ in range(120):
            state = _run(["sinfo", "-h", "-o", "%t"], env=env).stdout.strip()
            if state in ("idle", "mix"):
                break
            time.sleep(0.5)
        else:
            log = (root / "slurmctld.log").read_text()[-2000:]
            raise AssertionError(f"the Slurm node never became idle ({state!r}):\n{log}")
        yield env | {"_root": str(root)}
    finally:
        pids = [_pid(root / f"{name}.pid") for name in ("slurmd", "slurmctld")] + started
        for pid in pids:
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 15)


def test_single_node_sbatch_serves_and_ends_cleanly(slurm: dict[str, str]) -> None:
    out = Path(slurm["_root"]) / "job.out"
    env = mpi_env(slurm) | {"TRTDIST_SMOKE_TEST": "1", "PORT": str(free_port()),
                            "MODEL": "tiny"}
    proc = _run(["sbatch", "--wait", "--ntasks-per-node=2", f"--output={out}",
                 str(ROOT / "slurm" / "serve-single-node.sbatch")], env=env, cwd=ROOT)
    text = out.read_text() if out.exists() else ""
    assert proc.returncode == 0, f"{proc.stdout}{proc.stderr}\n{text[-3000:]}"
    assert "serving 'tiny'" in text and "tp=2 pp=1, 2 ranks" in text
    assert '"object":"text_completion"' in text and '"completion_tokens":8' in text
    assert "all ranks stopped" in text and "trtdist: exited with 0" in text
