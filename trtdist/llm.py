"""`DistributedLLM`: the Python API over a world of tensor- and pipeline-parallel ranks."""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import json
import signal
import sys
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from mpi4py import MPI

from trtdist.comm.world import World
from trtdist.engine.source import resolve_model
from trtdist.launch.spawn import SpawnedWorld, spawn_world
from trtdist.outputs import RequestOutput
from trtdist.runtime.engine import EngineConfig, LLMEngine
from trtdist.runtime.health import Heartbeat
from trtdist.runtime.rank import RankOptions, start_rank
from trtdist.sampling_params import SamplingParams
from trtdist.tokenizer import Tokenizer

Prompt = str | Sequence[int]


def _shutdown_hook(ref: weakref.ref[DistributedLLM]) -> Callable[[], None]:
    def hook() -> None:
        llm = ref()
        if llm is not None:
            llm.shutdown()

    return hook


@contextlib.contextmanager
def _sigint_at_step_boundary() -> Iterator[None]:
    """Hold a Ctrl-C (KeyboardInterrupt) until the step ends: a step interrupted between
    its collectives would leave the ranks in different ones, and the shutdown that follows
    (at exit) would hang."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda sig, _frame: pending.append(sig))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            raise KeyboardInterrupt


def default_block_size(kv_cache_dtype: str) -> int:
    """Tokens per KV block when none is given: 16, or 32 for an FP8 cache, whose decode
    kernel reads a block's V (stored token-minor) in runs of `block_size` bytes: 32-byte runs
    took 1000 / 1000 on an H200 from 13.0k to 13.5k output tok/s (2026-11-24)."""
    return 32 if kv_cache_dtype == "fp8" else 16


class DistributedLLM:
    """Generate with a model sharded over `tp_size * pp_size` ranks.

    Two ways to run:
    - inside an existing MPI world (`mpirun -n 4 python exp.py`): every rank constructs the
      object with the same arguments; on non-leader ranks the constructor serves the leader
      and returns once the leader calls `shutdown()` (check `is_leader`);
    - from a plain `python` process: the object spawns `tp_size * pp_size - 1` worker ranks
      and this process becomes the leader, so one script can loop over settings.

    `model` is an engine directory, a Hugging Face directory, a llama `.gguf` file, "tiny" for
    the built-in tiny random model, None for the default SmolLM2-135M-Instruct, or with
    `dummy_weights=True` a preset name such as "llama3-8b".

    On CUDA, decode steps replay CUDA graphs captured at load for the batch sizes
    `cuda_graph_batch_sizes` (default: 1, 2, 4, 8, then steps of 8 up to `max_batch_size`);
    `enforce_eager=True` never captures. `overlap` (default on; pp_size 1) plans and launches
    step N+1 while step N runs, reading not-yet-seen sampled tokens on the device.
    `attention_backend` is auto (Triton on CUDA, the torch reference elsewhere), torch or
    triton.
    `quant` ('auto', 'none', 'fp8') quantizes a Hugging Face checkpoint or dummy weights
    on the fly; an engine keeps the scheme it was built with ('auto' = the model's own: an
    FP8 checkpoint stays FP8).
    `scheduler_policy` is "max_utilization" (admit while blocks are free, preempt when full)
    or "guaranteed_no_evict" (admit only what can run to `max_tokens`). A preempted
    sequence's KV is swapped to `swap_space` GiB of host memory per rank while there is room
    (default None: 16 GiB on a GPU, capped at a quarter of the rank's share of free host
    memory; none on CPU), else it is recomputed when it runs again.
    `kv_cache_dtype` ('auto', 'fp8'): 'fp8' stores the KV cache in E4M3 with one scale per
    token and KV head (about twice the tokens in the same memory; on CUDA it needs compute
    capability >= 8.9); 'auto' keeps the model's dtype.
    `block_size` (tokens per KV block, a power of two): default 16, or 32 with an FP8 cache
    (`default_block_size`).

    A rank that sends no heartbeat for `worker_timeout` seconds is reported to
    `on_rank_failure(rank, seconds)` on the leader; by default the whole world is aborted
    with a message naming it, rather than left waiting forever.
    """

    def __init__(self, model: str | Path | None = None, *, tp_size: int = 1, pp_size: int = 1,
                 dtype: str = "auto", device: str = "auto", max_batch_size: int = 256,
                 max_num_tokens: int = 8192, max_model_len: int | None = None,
                 kv_cache_fraction: float = 0.9, num_kv_blocks: int | None = None,
                 block_size: int | None = None, enable_prefix_caching: bool = True,
                 dummy_weights: bool = False, pp_partition: Sequence[int] | None = None,
                 verify_checksums: bool = True, seed: int = 0, enforce_eager: bool = False,
                 overlap: bool = True,
                 cuda_graph_batch_sizes: Sequence[int] | None = None,
                 attention_backend: str = "auto", quant: str = "auto",
                 scheduler_policy: str = "max_utilization",
                 kv_cache_dtype: str = "auto", swap_space: float | None = None,
                 worker_timeout: float = 10.0,
                 on_rank_failure: Callable[[int, float], None] | None = None) -> None:
        block_size = default_block_size(kv_cache_dtype) if block_size is None else block_size
        self.options = RankOptions(
            tp_size=tp_size, pp_size=pp_size, dtype=dtype, device=device, block_size=block_size,
            kv_cache_fraction=kv_cache_fraction, num_kv_blocks=num_kv_blocks,
            max_model_len=max_model_len, max_batch_size=max_batch_size,
            max_num_tokens=max_num_tokens,
            pp_partition=tuple(pp_partition) if pp_partition else None,
            verify_checksums=verify_checksums, seed=seed, enforce_eager=enforce_eager,
            cuda_graph_batch_sizes=(tuple(cuda_graph_batch_sizes)
                                    if cuda_graph_batch_sizes is not None else None),
            attention_backend=attention_backend, quant=quant, kv_cache_dtype=kv_cache_dtype,
            swap_space=swap_space)
        engine_config = EngineConfig(max_batch_size, max_num_tokens, max_model_len,
                                     enable_prefix_caching, overlap, scheduler_policy)
        source = resolve_model(model, dummy_weights)
        size, existing = tp_size * pp_size, MPI.COMM_WORLD.Get_size()
        self._spawned: SpawnedWorld | None = None
        if existing > 1 and existing != size:
            raise ValueError(f"this MPI world has {existing} ranks but tp_size {tp_size} x "
                             f"pp_size {pp_size} = {size}; start it with mpirun -n {size}")
        if existing == 1 and size > 1:
            self._spawned = spawn_world(size - 1, sys.executable,
                                        ["-m", "trtdist.runtime.spawned_worker"])
            world = World(self._spawned.comm)
            spec = {"model": str(source.path) if source.path else str(model),
                    "dummy_weights": dummy_weights,
                    "options": dataclasses.asdict(self.options),
                    "worker_timeout": worker_timeout}
            world.bcast_bytes(json.dumps(spec).encode())
        else:
            world = World()
        self.world = world
        self._closed = False  # set before anything can fail, for __del__
        try:
            self._runner = start_rank(world, source, self.options)
        except Exception:
            self._disconnect()
            raise
        self.heartbeat = Heartbeat(world.comm, timeout=worker_timeout,
                                   on_failure=on_rank_failure or self._abort_on_failure)
        self.engine: LLMEngine | None = None
        if not world.is_leader:
            self._runner.serve_forever()
            self._release()
            return
        tokenizer = Tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None
        self.engine = LLMEngine(self._runner, source.config, tokenizer, engine_config,
                                self._runner.kv.num_blocks, block_size)
        self._ids = itertools.count()
        # NOTE: a script that ends without shutdown() (end of file, sys.exit, an exception,
        # Ctrl-C) would otherwise hang in MPI_Finalize waiting for the workers: __del__ runs
        # after mpi4py's exit hook. atexit runs hooks last-in first-out, and mpi4py registered
        # its own when MPI was imported, so this one runs first.
        self._exit_hook = _shutdown_hook(weakref.ref(self))
        atexit.register(self._exit_hook)

    @property
    def is_leader(self) -> bool:
        return self.world.is_leader

    def _engine(self) -> LLMEngine:
        if self._closed:
            raise RuntimeError("this DistributedLLM has been shut down")
        if self.engine is None:
            raise RuntimeError(f"rank {self.world.rank} is a worker; call generate on the "
                               "leader (rank 0)")
        return self.engine

    # ---- generation ----------------------------------------------------------------
    def _add(self, prompts: Prompt | Sequence[Prompt],
             params: SamplingParams | Sequence[SamplingParams] | None) -> list[str]:
        engine = self._engine()
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = []
        for prompt, p in zip(prompts, params):
            rid = f"gen-{next(self._ids)}"
            engine.add_request(rid, prompt, p)
            ids.append(rid)
        return ids

    def stream(self, prompts: Prompt | Sequence[Prompt],
               params: SamplingParams | Sequence[SamplingParams] | None = None
               ) -> Iterator[RequestOutput]:
        """Yield a `RequestOutput` each time a request gains tokens or finishes: a snapshot
        (`output_kind` "cumulative", the default), what is new since its previous output
        ("delta"), or only the final one ("final_only"). Closing the iterator early aborts
        the requests still running."""
        engine = self._engine()
        pending = set(self._add(prompts, params))
        try:
            while pending:
                for out in self._step(engine):
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                engine.abort_request(rid)
            if not engine.requests:  # nothing else running: let the batches in flight
                engine.drain()       # (overlap runs a step ahead) return their blocks now

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`, each
        the whole result whatever `output_kind` (a request's only output holds all of it)."""
        final: dict[str, RequestOutput] = {}
        order: list[str] = []
        engine = self._engine()
        order = self._add(prompts, params)
        pending = set(order)
        while pending:
            for out in self._step(engine, finished_only=True):
                if out.finished and out.request_id in pending:
                    final[out.request_id] = out
                    pending.discard(out.request_id)
        return [final[r] for r in order]

    @staticmethod
    def _step(engine: LLMEngine, finished_only: bool = False) -> list[RequestOutput]:
        with _sigint_at_step_boundary():
            return engine.step(finished_only)

    # ---- lifetime ------------------------------------------------------------------
    def shutdown(self) -> None:
        """Leader: stop every rank and release the world (idempotent). Runs by itself at
        interpreter exit if the script did not call it."""
        if self._closed or not self.world.is_leader:
            return
        assert self.engine is not None
        atexit.unregister(self._exit_hook)
        self.engine.abort_all()
        self.engine.drain()
        self._runner.shutdown()
        self._release()

    def _abort_on_failure(self, rank: int, seconds: float) -> None:
        who = "the leader" if rank == 0 else "a worker"
        self.world.abort(f"rank {rank} ({who}) has not answered for {seconds:.1f} s (hung or "
                         "gone); aborting the world")

    def _release(self) -> None:
        self._closed = True
        self.heartbeat.stop()
        self._runner.close()
        self._disconnect()

    def _disconnect(self) -> None:
        if self._spawned is not None:
            self._spawned.close()

    def __enter__(self) -> DistributedLLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter teardown: best effort only
            if not self._closed and self.world.is_leader and self.engine is not None:
                self.shutdown()
