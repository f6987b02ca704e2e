"""Auth, back-pressure, graceful shutdown and rank failures of a live server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import httpx
import pytest
from server_helpers import start_server

pytestmark = pytest.mark.mpi


def test_api_key_and_max_queue() -> None:
    server = start_server(2, ["--api-key", "sekrit", "--max-queue", "2", "--max-batch-size",
                              "1"])
    try:
        body = {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(f"{server.url}/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{server.url}/v1/completions", json=body,
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
        auth = {"Authorization": "Bearer sekrit"}

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(
                    f"{server.url}/v1/completions", headers=auth,
                    json={"prompt": f"p{i}", "max_tokens": 60, "ignore_eos": True})
                    for i in range(12)))

        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert 200 in codes and 503 in codes, codes
        busy = next(r for r in responses if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
        ok = [r.json() for r in responses if r.status_code == 200]
        assert all(o["usage"]["completion_tokens"] == 60 for o in ok)
    finally:
        server.stop()


def test_sigterm_finishes_running_requests_and_every_rank_exits_zero() -> None:
    server = start_server(2, ["--shutdown-timeout", "20"])
    got: list[str] = []
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": "go", "max_tokens": 150, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}},
                      timeout=60) as r:
        lines = r.iter_lines()
        got.append(next(lines))
        os.kill(server.leader_pid, signal.SIGTERM)
        started = time.time()
        got += [line for line in lines if line]
    rc, log = server.wait(timeout=30)
    assert rc == 0, log[-2000:]
    assert time.time() - started < 20
    assert got[-1] == "data: [DONE]" and '"completion_tokens": 150' in got[-2]
    assert "all ranks stopped" in log and "worker stopped" in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")


def test_killed_worker_takes_the_world_down_naming_it() -> None:
    server = start_server(2)
    workers = [p for p in _children(server.proc.pid) if p != server.leader_pid]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    rc, log = server.wait(timeout=30)
    assert rc != 0
    assert "rank 1" in log, log[-2000:]


def test_hung_worker_turns_health_503_and_exits_nonzero() -> None:
    server = start_server(2, ["--worker-timeout", "2"])
    workers = [p for p in _children(server.proc.pid) if p != server.leader_pid]
    os.kill(workers[0], signal.SIGSTOP)
    try:
        start = time.time()
        status = 200
        while time.time() - start < 15 and status != 503:
            try:
                status = httpx.get(f"{server.url}/health", timeout=2).status_code
            except httpx.HTTPError:
                break
            time.sleep(0.2)
        assert status == 503, "health never reported the hung rank"
        rc, log = server.wait(timeout=30)
        assert rc != 0
        assert "rank 1 stopped answering" in log, log[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(workers[0], signal.SIGCONT)
            os.kill(workers[0], signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """Rank processes under mpirun (they run `trtdist.cli serve`)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"trtdist.cli" in cmd and int(entry) != pid and _descends(int(entry), pid):
            out.append(int(entry))
    return sorted(out)


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        try:
            pid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid == ancestor:
            return True
    return False


def test_hung_leader_is_noticed_by_the_workers() -> None:
    server = start_server(2, ["--worker-timeout", "2"])
    os.kill(server.leader_pid, signal.SIGSTOP)
    try:
        rc, log = server.wait(timeout=30)
        assert rc != 0
        assert "rank 0 stopped answering" in log, log[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.leader_pid, signal.SIGCONT)
            os.kill(server.leader_pid, signal.SIGKILL)
