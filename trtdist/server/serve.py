"""`trtdist serve`: every rank joins the world; the leader also runs the HTTP server.

Shutdown: SIGTERM or SIGINT on the leader (forwarded by the `trtdist serve` top process when
it launched the world, see launch/launcher.py) stops accepting requests, lets running ones
finish for up to --shutdown-timeout seconds, aborts the rest (their streams end with an error
event), then tells every rank to stop; all ranks exit 0. A second signal aborts at once.
Workers ignore those signals and wait for the leader (a launcher that
signals every rank, as Slurm does, still gets the orderly path). A rank that stops sending
heartbeats for --worker-timeout seconds turns /health to 503 and takes the world down with a
message naming it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

from mpi4py import MPI

log = logging.getLogger("trtdist.server")


def _setup_logging(level: str) -> None:
    rank = MPI.COMM_WORLD.Get_rank()
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format=f"%(asctime)s [trtdist rank {rank}] %(levelname)s %(message)s")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # NOTE: asyncio sets TCP_NODELAY on accepted sockets only when the listening socket's
    # protocol is IPPROTO_TCP; with protocol 0 every keep-alive response waits ~40 ms
    # (Nagle against the client's delayed ACK), and streamed tokens are held back.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _make_server(config, on_signal=None):  # type: ignore[no-untyped-def]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful exit, which would kill the
        leader before it can stop the other ranks; here the signal only starts the exit.

        `on_signal(count)` runs first (count 1, 2, ...): it stops the engine from taking
        requests, and brings the stop forward on a second signal. uvicorn's own second-signal
        force exit would cut the streams, so it is not used: the engine ends them instead."""

        signals = 0

        def handle_exit(self, sig, frame):  # type: ignore[no-untyped-def]
            self.signals += 1
            if on_signal is not None:
                on_signal(self.signals)
            self.should_exit = True

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {s: signal.signal(s, self.handle_exit)
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return Server(config)


def serve(args: Namespace, llm_kwargs: dict[str, object]) -> int:
    import uvicorn

    from trtdist.engine.gguf_source import DEFAULT_MODEL_NAME
    from trtdist.launch.launcher import stop_pid, write_leader_pid
    from trtdist.llm import DistributedLLM
    from trtdist.runtime.kv_cache import kv_cache_dtype_name
    from trtdist.runtime.rank import WorldError
    from trtdist.server.app import ServerState, create_app
    from trtdist.server.async_engine import AsyncEngine
    from trtdist.server.auth import resolve_api_key
    from trtdist.server.chat import ChatTemplate
    from trtdist.server.metrics import ServerMetrics
    from trtdist.server.protocol import APIError

    _setup_logging(args.log_level)
    api_key = resolve_api_key(args.api_key, args.api_key_file)  # fails on every rank alike
    world_rank = MPI.COMM_WORLD.Get_rank()
    if world_rank != 0:  # workers stop when the leader says so, not on their own
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = None
    bind_error = None
    if world_rank == 0:
        try:
            sock = _bind(args.host, args.port)  # fail before loading anything if taken
        except ValueError as e:
            bind_error = f"rank 0: {e}"
    # NOTE: every rank learns whether the leader can listen before any of them loads: a
    # leader that stopped alone left the others waiting for it at their first collective
    # (and itself in MPI_Finalize), forever.
    bind_error = MPI.COMM_WORLD.bcast(bind_error, root=0)
    if bind_error is not None:
        if world_rank == 0:
            raise ValueError(bind_error)
        return 1
    holder: dict[str, AsyncEngine] = {}

    def take_world_down(message: str) -> None:
        """/health turns 503 and open streams end with an error event; then, after health
        checkers and clients had a moment to see that, the world is aborted."""
        if (engine := holder.get("engine")) is not None:
            engine.healthy = False
            engine.accepting = False
            engine.fail_streams(APIError(503, f"the server failed: {message}",
                                         "service_unavailable", code="server_failed"))

        def abort() -> None:
            time.sleep(2.0)
            print(f"[trtdist rank {world_rank}] fatal: {message}", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(3)

        threading.Thread(target=abort, daemon=True).start()

    def on_rank_failure(rank: int, seconds: float) -> None:
        log.error("rank %d has not answered for %.1f s: /health now answers 503; stopping the "
                  "world", rank, seconds)
        take_world_down(f"rank {rank} stopped answering (no heartbeat for {seconds:.1f} s)")

    start = time.time()
    log.info("loading %s", llm_kwargs.get("model") or f"the default model {DEFAULT_MODEL_NAME}")
    try:
        llm = DistributedLLM(**llm_kwargs, worker_timeout=args.worker_timeout,  # type: ignore[arg-type]
                             on_rank_failure=on_rank_failure)
    except WorldError as e:
        if world_rank == 0:
            print(f"trtdist serve: error: {e}", file=sys.stderr)
        return 1
    if not llm.is_leader:
        log.info("worker stopped")
        return 0
    engine = llm.engine
    assert engine is not None and sock is not None
    graphs = engine.runner.graphs
    kv = engine.runner.kv
    log.info("loaded in %.1f s: %d KV blocks of %d tokens per rank (%s, %d bytes each), %s",
             time.time() - start, engine.allocator.num_blocks, engine.allocator.block_size,
             kv_cache_dtype_name(kv.dtype), kv.block_bytes,
             f"{len(graphs.graphs)} CUDA graphs captured in {graphs.capture_seconds:.1f} s"
             if graphs else "eager (no CUDA graphs)")
    tokenizer = engine.tokenizer
    model = llm_kwargs.get("model")
    name = args.served_model_name or (Path(str(model)).name if model else DEFAULT_MODEL_NAME)
    template = None
    if tokenizer is not None and tokenizer.chat_template:
        template = ChatTemplate(tokenizer.chat_template, tokenizer.special_token("bos_token"),
                                tokenizer.special_token("eos_token"))
    metrics = ServerMetrics(name)
    async_engine = AsyncEngine(engine, metrics, args.max_queue, on_fatal=take_world_down)
    holder["engine"] = async_engine
    state = ServerState(async_engine, tokenizer, name, engine.max_model_len,
                        engine.model_cfg.vocab_size, api_key, args.max_body_bytes, template,
                        args.max_tokens_per_request)

    def on_signal(count: int) -> None:
        if count == 1:
            log.info("stopping: no new requests; running ones may finish for up to %.0f s",
                     args.shutdown_timeout)
            async_engine.begin_shutdown(args.shutdown_timeout)
        else:
            log.info("second signal: aborting the running requests now")
            async_engine.begin_shutdown(0.0)

    # NOTE: uvicorn's own grace period outlasts the engine's, so streams still running at
    # --shutdown-timeout end with an error event from the engine instead of being cut.
    server = _make_server(uvicorn.Config(
        create_app(state), log_level="warning",
        timeout_graceful_shutdown=args.shutdown_timeout + 10, lifespan="off",
        access_log=False), on_signal)
    async_engine.start()

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            host = f"[{args.host}]" if ":" in args.host else args.host
            o = llm.options
            print(f"trtdist: serving {name!r} on http://{host}:{args.port} (tp={o.tp_size} "
                  f"pp={o.pp_size}, {llm.world.size} ranks, leader pid {os.getpid()}; stop: "
                  f"kill -TERM {stop_pid()})", flush=True)
            write_leader_pid()  # a launcher may now forward SIGINT/SIGTERM here

    threading.Thread(target=announce, daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        log.info("shutting down: finishing running requests (up to %.0f s)",
                 args.shutdown_timeout)
        async_engine.shutdown(timeout=args.shutdown_timeout)
        llm.shutdown()
        log.info("all ranks stopped")
    return 0

