"""`trtdist serve`: every rank joins the world; the leader also runs the HTTP server.

Shutdown: SIGTERM or SIGINT on the leader stops accepting connections, lets running requests
finish for up to --shutdown-timeout seconds, aborts the rest, then tells every rank to stop;
all ranks exit 0. Workers ignore those signals and wait for the leader (a launcher that
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
    # NOTE: the protocol must be named: asyncio sets TCP_NODELAY only on sockets whose proto
    # is IPPROTO_TCP, and without it each streamed token waits ~40 ms for the client's ACK.
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


def _make_server(config):  # type: ignore[no-untyped-def]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM/SIGINT after its graceful exit, which would kill the
        leader before it can stop the other ranks; here the signal only starts the exit."""

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
    from trtdist.llm import DistributedLLM
    from trtdist.runtime.rank import WorldError
    from trtdist.server.app import ServerState, create_app
    from trtdist.server.async_engine import AsyncEngine
    from trtdist.server.chat import ChatTemplate
    from trtdist.server.metrics import ServerMetrics

    _setup_logging(args.log_level)
    world_rank = MPI.COMM_WORLD.Get_rank()
    if world_rank != 0:  # workers stop when the leader says so, not on their own
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sock = None
    if world_rank == 0:
        sock = _bind(args.host, args.port)  # fail before loading anything if taken
    holder: dict[str, AsyncEngine] = {}

    def on_rank_failure(rank: int, seconds: float) -> None:
        log.error("rank %d has not answered for %.1f s: /health now answers 503; stopping the "
                  "world", rank, seconds)
        if (engine := holder.get("engine")) is not None:
            engine.healthy = False

        def abort() -> None:
            time.sleep(2.0)  # let health checkers see the 503 first
            print(f"[trtdist rank 0] fatal: rank {rank} stopped answering (no heartbeat for "
                  f"{seconds:.1f} s)", file=sys.stderr, flush=True)
            MPI.COMM_WORLD.Abort(3)

        threading.Thread(target=abort, daemon=True).start()

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
    log.info("loaded in %.1f s: %d KV blocks of %d tokens per rank, %s", time.time() - start,
             engine.allocator.num_blocks, engine.allocator.block_size,
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
    async_engine = AsyncEngine(engine, metrics, args.max_queue)
    holder["engine"] = async_engine
    state = ServerState(async_engine, tokenizer, name, engine.max_model_len,
                        engine.model_cfg.vocab_size, args.api_key, args.max_body_bytes, template)
    server = _make_server(uvicorn.Config(
        create_app(state), log_level="warning", timeout_graceful_shutdown=args.shutdown_timeout,
        lifespan="off", access_log=False))
    async_engine.start()

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            host = f"[{args.host}]" if ":" in args.host else args.host
            o = llm.options
            print(f"trtdist: serving {name!r} on http://{host}:{args.port} (tp={o.tp_size} "
                  f"pp={o.pp_size}, {llm.world.size} ranks, leader pid {os.getpid()})",
                  flush=True)

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

