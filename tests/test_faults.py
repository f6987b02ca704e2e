"""Auth, back-pressure, graceful shutdown and rank failures of a live server, each with
tensor parallelism (TP=2) and with pipeline parallelism (PP=2)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, mpi_env
from server_helpers import LiveServer, serve_command, start_server

from trtdist.server.auth import authorized, resolve_api_key

pytestmark = pytest.mark.mpi

# Every fault test runs on both kinds of world: its ranks split by tensor or by pipeline.
PARALLEL = pytest.mark.parametrize("sizes", [["--tp-size", "2"], ["--pp-size", "2"]],
                                   ids=["tp2", "pp2"])


def test_api_key_sources_and_scheme(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key("flag", None, {}) == "flag"
    assert resolve_api_key(None, str(key_file), {"TRTDIST_API_KEY": "env"}) == "from-file"
    assert resolve_api_key(None, None, {"TRTDIST_API_KEY": "env"}) == "env"
    assert resolve_api_key(None, None, {}) is None
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key("a", str(key_file), {})
    with pytest.raises(ValueError, match="cannot read --api-key-file"):
        resolve_api_key(None, str(tmp_path / "missing"), {})
    assert authorized("Bearer k", "k") and authorized("bearer k", "k")
    assert authorized("BEARER  k ", "k")
    assert not authorized("Basic k", "k") and not authorized("Bearer kk", "k")
    assert not authorized(None, "k") and not authorized("Bearer", "k")


@PARALLEL
def test_api_key_and_max_queue(sizes: list[str], tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("sekrit\n")
    server = start_server(2, [*sizes, "--api-key-file", str(key_file), "--max-queue", "2",
                              "--max-batch-size", "1"])
    try:
        assert "sekrit" not in open(f"/proc/{server.leader_pid}/cmdline").read()
        body = {"prompt": "hi", "max_tokens": 2}
        r = httpx.post(f"{server.url}/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{server.url}/v1/completions", json=body,
                       headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert httpx.get(f"{server.url}/health").status_code == 200  # health needs no key
        r = httpx.post(f"{server.url}/v1/completions", json=body,
                       headers={"Authorization": "bearer sekrit"})  # RFC 7235: any case
        assert r.status_code == 200, r.text
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


@PARALLEL
def test_sigterm_finishes_running_requests_and_every_rank_exits_zero(sizes: list[str]) -> None:
    server = start_server(2, [*sizes, "--shutdown-timeout", "20"])
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


@PARALLEL
def test_killed_worker_takes_the_world_down_naming_it(sizes: list[str]) -> None:
    server = start_server(2, sizes)
    workers = [p for p in _children(server.proc.pid) if p != server.leader_pid]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    rc, log = server.wait(timeout=30)
    assert rc != 0
    assert "rank 1" in log, log[-2000:]


@PARALLEL
def test_hung_worker_turns_health_503_and_exits_nonzero(sizes: list[str]) -> None:
    server = start_server(2, [*sizes, "--worker-timeout", "2"])
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
        # Resumed, the worker finds every peer late (its own stop); it must not blame them.
        os.kill(workers[0], signal.SIGCONT)
        rc, log = server.wait(timeout=30)
        assert rc != 0
        assert "[trtdist rank 0] fatal: rank 1 stopped answering" in log, log[-2000:]
        assert "rank 0 stopped answering" not in log, log[-2000:]
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


@PARALLEL
def test_hung_leader_is_noticed_by_the_workers(sizes: list[str]) -> None:
    server = start_server(2, [*sizes, "--worker-timeout", "2"])
    os.kill(server.leader_pid, signal.SIGSTOP)
    try:
        rc, log = server.wait(timeout=30)
        assert rc != 0
        assert "rank 0 stopped answering" in log, log[-2000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.leader_pid, signal.SIGCONT)
            os.kill(server.leader_pid, signal.SIGKILL)


def _stream(server: LiveServer, max_tokens: int, got: list[str], signal_after: int,
            send: object) -> None:
    """Stream a completion; after `signal_after` lines call `send()`; collect every line."""
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"prompt": "go", "max_tokens": max_tokens, "stream": True,
                            "ignore_eos": True, "stream_options": {"include_usage": True}},
                      timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(signal_after):
            got.append(next(lines))
        send()  # type: ignore[operator]
        got += [line for line in lines if line]


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
@PARALLEL
def test_signal_to_the_top_process_stops_in_order(sizes: list[str], how: str) -> None:
    """`trtdist serve` started without mpirun is the top process: a terminal's Ctrl-C (SIGINT
    to its process group) or SIGTERM to it (docker stop, systemd, Kubernetes) finishes the
    running stream and every process exits 0. (Under a bare mpirun both kill every rank.)"""
    server = start_server(2, [*sizes, "--shutdown-timeout", "30"], launcher=True)
    top = server.proc.pid

    def send() -> None:
        if how == "ctrl-c":
            os.killpg(top, signal.SIGINT)
        else:
            os.kill(top, signal.SIGTERM)

    got: list[str] = []
    _stream(server, 120, got, 3, send)
    rc, log = server.wait(timeout=60)
    assert rc == 0, log[-3000:]
    assert got[-1] == "data: [DONE]" and '"completion_tokens": 120' in got[-2], got[-3:]
    assert "all ranks stopped" in log and "worker stopped" in log, log[-3000:]


@PARALLEL
def test_stream_past_the_shutdown_timeout_ends_with_an_error_event(sizes: list[str]) -> None:
    """A stream that cannot finish in --shutdown-timeout (or is cut short by a second signal)
    ends with an OpenAI error event and [DONE], not a cut connection; exit code 0."""
    server = start_server(2, [*sizes, "--shutdown-timeout", "0"], launcher=True)
    got: list[str] = []
    _stream(server, 480, got, 2, lambda: os.kill(server.proc.pid, signal.SIGTERM))
    rc, log = server.wait(timeout=60)
    assert rc == 0, log[-3000:]
    assert got[-1] == "data: [DONE]", got[-3:]
    error = json.loads(got[-2].removeprefix("data: "))["error"]
    assert error["code"] == "shutting_down" and "shut down" in error["message"], error
    assert '"completion_tokens"' not in "".join(got)


def test_second_signal_aborts_the_streams_with_an_error_event() -> None:
    server = start_server(2, ["--tp-size", "2", "--shutdown-timeout", "60"], launcher=True)

    def twice() -> None:
        os.killpg(server.proc.pid, signal.SIGINT)
        time.sleep(0.2)  # two signals at once would arrive as one
        os.killpg(server.proc.pid, signal.SIGINT)

    got: list[str] = []
    _stream(server, 480, got, 2, twice)
    rc, log = server.wait(timeout=60)
    assert rc == 0, log[-3000:]
    assert got[-1] == "data: [DONE]" and '"error"' in got[-2], got[-3:]


@pytest.mark.parametrize("launcher", [False, True], ids=["mpirun", "top-process"])
def test_taken_port_stops_every_rank_with_an_error(launcher: bool) -> None:
    """A leader that cannot listen stops the whole world with an error naming it (the other
    ranks used to load the model and wait for it at their first collective, forever)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        # NOTE: the timeout only keeps a regression from hanging the suite
        run = subprocess.run(serve_command(port, 2, ["--tp-size", "2"], launcher),
                             env=mpi_env(None), cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-2000:]
    assert f"rank 0: cannot listen on 127.0.0.1:{port}" in out, out[-2000:]
