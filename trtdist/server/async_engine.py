"""Bridge between asyncio request handlers and the engine thread.

NOTE: one dedicated thread owns the `LLMEngine` and therefore every MPI call of the leader's
control plane; handlers talk to it only through a command queue, and it hands outputs back
with `call_soon_threadsafe`. The event loop never blocks on a step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from trtdist.outputs import RequestOutput
from trtdist.runtime.engine import LLMEngine
from trtdist.sampling_params import SamplingParams
from trtdist.server.metrics import ServerMetrics
from trtdist.server.protocol import APIError

log = logging.getLogger("trtdist.server")


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | Exception]
    # output tokens delivered (the server asks for deltas or the final output only, so each
    # token is in one output)
    tokens: int = 0


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics,
                 max_queue: int | None = None,
                 on_fatal: Callable[[str], None] | None = None) -> None:
        """`on_fatal(message)` is called (on the engine thread) when a step fails: the
        world's state is unknown then, so the caller takes the world down."""
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet scheduled (approximate, for --max-queue)
        self.accepting = True
        self.healthy = True
        self._stop_at: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtdist-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # ---- handler side --------------------------------------------------------------
    def submit(self, request_id: str, prompt_ids: Sequence[int],
               params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Queue a request; iterate the returned stream for its outputs."""
        if not self.accepting:
            raise APIError(503, "the server is shutting down", "service_unavailable",
                           code="shutting_down")
        if not self.healthy:
            raise APIError(503, "the server is unhealthy: a rank stopped answering",
                           "service_unavailable", code="unhealthy")
        with self._lock:
            waiting = self._queued + self.engine.num_waiting
            if self.max_queue is not None and waiting >= self.max_queue:
                raise APIError(503, f"too many requests waiting ({waiting}, --max-queue "
                                    f"{self.max_queue}); retry later", "service_unavailable",
                               code="queue_full", headers={"Retry-After": "1"})
            self._queued += 1
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        self._commands.put(("add", request_id, list(prompt_ids), params, time.time()))
        return self._iterate(request_id, stream)

    async def _iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:  # the client went away, or the handler failed: free the blocks
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._commands.put(("abort", request_id))

    # ---- engine thread -------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | Exception) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, rid, ids, params, arrival = command
            with self._lock:
                self._queued -= 1
            try:
                self.engine.add_request(rid, ids, params, arrival)
            except Exception as e:  # noqa: BLE001 - leader-local: fails this request only
                if not isinstance(e, ValueError):
                    log.exception("request %s refused", rid)
                self._deliver(rid, APIError(400, str(e), param=getattr(e, "param", None),
                                            code=getattr(e, "code", None))
                              if isinstance(e, ValueError) else
                              APIError(500, f"the request failed: {type(e).__name__}",
                                       "internal_error"))
                self._streams.pop(rid, None)
        elif kind == "abort":
            if self.engine.abort_request(command[1]):
                self.metrics.request_aborted()
                log.info("request %s aborted (client gone)", command[1])

    def _next_command(self, timeout: float | None) -> tuple | None:
        try:
            return (self._commands.get(timeout=timeout) if timeout
                    else self._commands.get_nowait())
        except queue.Empty:
            return None

    def _run(self) -> None:
        engine = self.engine
        failed = False
        try:
            while True:
                # Block briefly only when idle; otherwise take what is queued and step.
                command = self._next_command(0.05 if not engine.has_unfinished else None)
                while command is not None:
                    self._handle(command)
                    command = self._next_command(None)
                if self._stop_at is not None and (not engine.has_unfinished
                                                  or time.monotonic() > self._stop_at):
                    break
                if engine.has_unfinished:
                    for out in engine.step():
                        self._publish(out)
                self._update_metrics()
        except Exception as e:  # noqa: BLE001 - reported, then the world is taken down
            log.exception("engine loop failed")
            failed = True
            self.healthy = False
            self.accepting = False
            self.fail_streams(APIError(500, f"engine failure: {type(e).__name__}: {e}",
                                       "internal_error"))
            if self.on_fatal is not None:
                self.on_fatal(f"the engine loop failed ({type(e).__name__}: {e})")
        finally:
            # NOTE: after a failed step the ranks may sit in different collectives; draining
            # would hang, so only the orderly path drains.
            self._finish_shutdown(drain=not failed)

    def fail_streams(self, error: APIError) -> None:
        """End every open stream with `error` (safe from any thread)."""
        for rid in list(self._streams):
            self._deliver(rid, error)
            self._streams.pop(rid, None)

    def _publish(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            stream.tokens += sum(len(o.token_ids) for o in out.outputs)
        self._deliver(out.request_id, out)
        if out.finished:
            self._streams.pop(out.request_id, None)
            self.metrics.request_finished(out)
            c = out.outputs[0]
            log.info("request %s finished (%s): %d prompt + %d output tokens, TTFT %.1f ms, "
                     "total %.1f ms", out.request_id, c.finish_reason, len(out.prompt_token_ids),
                     stream.tokens if stream is not None else 0, (out.metrics.ttft or 0) * 1e3,
                     ((out.metrics.finished_time or time.time()) - out.metrics.arrival_time)
                     * 1e3)

    def _update_metrics(self) -> None:
        e, a = self.engine, self.engine.allocator
        s = e.scheduler
        self.metrics.update_engine(e.num_running, e.num_waiting, a.num_used, a.num_blocks,
                                   a.prefix_queries, a.prefix_hits, e.stats["prompt_tokens"],
                                   e.stats["generation_tokens"], s.num_preemptions,
                                   s.num_swapped_out, s.swap_space.num_used,
                                   s.swap_space.num_slots)

    def _finish_shutdown(self, drain: bool = True) -> None:
        e = self.engine
        self.fail_streams(APIError(503, "the server shut down before the request finished",
                                   "service_unavailable", code="shutting_down"))
        if drain:
            e.abort_all()
            e.drain()
            self._update_metrics()
        self._done.set()

    # ---- lifetime ------------------------------------------------------------------
    def begin_shutdown(self, timeout: float) -> None:
        """Stop accepting; running requests may finish for up to `timeout` seconds more, then
        the rest are aborted (their streams end with an error event). Calling it again with
        a shorter timeout brings the stop forward."""
        self.accepting = False
        stop_at = time.monotonic() + timeout
        if self._stop_at is None or stop_at < self._stop_at:
            self._stop_at = stop_at
        self._commands.put(("wake",))

    def shutdown(self, timeout: float) -> None:
        """`begin_shutdown(timeout)`, then wait until the engine thread has stopped."""
        self.begin_shutdown(timeout)
        self._done.wait()
        self._thread.join(timeout=5)
