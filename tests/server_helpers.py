"""Start and stop a live `mpirun -n N trtdist serve` for tests."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
from helpers import ROOT, mpi_env, mpirun_path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    port: int
    leader_pid: int
    log: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics").text
        for line in text.splitlines():
            if line.startswith(name + "{") and labels in line:
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait(self, timeout: float = 120) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"server did not exit within {timeout} s:\n"
                                 + "".join(self.log)[-3000:]) from None
        time.sleep(0.3)  # let the reader thread take the last lines
        return self.proc.returncode, "".join(self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            import os
            import signal

            os.kill(self.leader_pid, signal.SIGTERM)
            self.wait()


def serve_command(port: int, n: int = 2, args: list[str] | None = None,
                  launcher: bool = False, model: str | None = "tiny") -> list[str]:
    """`mpirun -n N trtdist serve MODEL --port PORT ARGS`, or with `launcher` the plain
    `trtdist serve ...` (ARGS then name the sizes), which runs mpirun itself."""
    cmd = [sys.executable, "-m", "trtdist.cli", "serve", *([model] if model else []),
           "--port", str(port), *(args or [])]
    return cmd if launcher else [mpirun_path(), "-n", str(n), "--oversubscribe", *cmd]


def start_server(n: int = 2, args: list[str] | None = None, timeout: float = 120,
                 launcher: bool = False, env: dict[str, str] | None = None,
                 model: str | None = "tiny") -> LiveServer:
    """`serve_command(...)` on a free port, once it says it is serving. Either way the top
    process leads a session of its own, so `os.killpg(proc.pid, SIGINT)` is a terminal's
    Ctrl-C. MODEL is the tiny random model by default; None names no model, so the server
    uses the default one."""
    deadline = time.time() + timeout
    tries = 3
    while True:
        tries -= 1
        port = free_port()
        proc = subprocess.Popen(serve_command(port, n, args, launcher, model), env=mpi_env(env),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, start_new_session=True)
        lines: list[str] = []
        assert proc.stdout is not None
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            lines.append(line)
            if m := re.search(r"serving .* on http://\S+ .*leader pid (\d+)", line):
                server = LiveServer(proc, port, int(m.group(1)), lines)
                _drain(server)
                return server
        log = "".join(lines)
        if proc.poll() is None:
            proc.kill()
            raise AssertionError("server not ready in time:\n" + log)
        # NOTE: the port free_port() found can be taken before the server binds it (another
        # test's connection got it as its ephemeral port): then try another.
        if "cannot listen on" not in log or not tries:
            raise AssertionError("server exited before it was ready:\n" + log)


def _drain(server: LiveServer) -> None:
    """Keep reading the server's output so its pipe never fills."""
    import threading

    def pump() -> None:
        assert server.proc.stdout is not None
        for line in server.proc.stdout:
            server.log.append(line)

    threading.Thread(target=pump, daemon=True).start()
