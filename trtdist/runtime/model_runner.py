"""Run one step plan on this rank: prepare inputs, forward this stage, pass hidden states
to the next stage, and (last stage) turn logits into tokens for the leader."""

from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from trtdist.comm.world import World
from trtdist.kernels.sampling import resolve_fed_back_torch, resolve_fed_back_triton
from trtdist.models.llama import LlamaStage
from trtdist.parallel.groups import ParallelGroups
from trtdist.runtime.graph_runner import CUDAGraphRunner, run_stage
from trtdist.runtime.host_transfer import SampledStep
from trtdist.runtime.inputs import StepInputs
from trtdist.runtime.kv_cache import KVCache
from trtdist.runtime.plan import FEEDBACK, RETURN_ALL_LOGITS, SHUTDOWN, StepPlan
from trtdist.runtime.prompt_logprobs import prompt_logprobs_of, prompt_targets, result_shape
from trtdist.runtime.sampler import Sampler
from trtdist.runtime.step_timing import StepTimer

_RESULT_TAG = 31


class ModelRunner:
    """Executes plans for one rank. The leader also collects each step's result."""

    def __init__(self, world: World, groups: ParallelGroups, model: LlamaStage,
                 kv: KVCache, inputs: StepInputs, hidden_in: torch.Tensor | None = None,
                 graphs: CUDAGraphRunner | None = None) -> None:
        """`inputs`: the static step inputs; `hidden_in`: the static buffer `[max_tokens,
        hidden]` later stages receive into; `graphs`: captured decode graphs, if any."""
        self.world, self.groups, self.model, self.kv = world, groups, model, kv
        self.inputs, self.hidden_in, self.graphs = inputs, hidden_in, graphs
        self.mapping = groups.mapping
        self.device = model.device
        self._local_results: deque[np.ndarray | SampledStep] = deque()
        # NOTE: the leader posts the receive of each plan's result when it launches the plan,
        # and the last stage sends with Isend. A result over MPI's eager limit (~4 KiB on
        # shared memory) otherwise blocks the last stage in Send while the leader blocks in
        # the next plan's broadcast: a deadlock as soon as two batches are in flight.
        self._pending_results: deque[tuple[MPI.Request, np.ndarray]] = deque()
        self._pending_sends: list[tuple[MPI.Request, np.ndarray]] = []
        self.samples = self.mapping.is_last_stage and self.mapping.tp_rank == 0
        self.sampler = Sampler(self.device, model.cfg.vocab_size) if self.samples else None
        self._hidden: list[torch.Tensor] = []  # last stage: final hidden states, when needed
        self.timer = StepTimer()  # off unless a benchmark turns it on
        self._compute_start: float | None = None  # CPU: when this step's compute began
        self.plan_bytes = 0  # bytes of every plan broadcast (or received) so far
        # the last step's sampled tokens, on every rank of a one-stage world (see FEEDBACK)
        self.fed_back = torch.zeros(inputs.max_seqs, dtype=torch.int32, device=self.device)

    # ---- control plane -------------------------------------------------------------
    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan:
        """Leader passes the plan; other ranks pass None and receive it."""
        buf = self.world.bcast_array(plan.encode() if plan is not None else None,
                                     np.dtype(np.int64), idle_wait=True)
        self.plan_bytes += buf.nbytes
        return plan if plan is not None else StepPlan.decode(buf)

    def serve_forever(self) -> None:
        """Non-leader loop: execute every plan the leader sends until shutdown."""
        while (plan := self.broadcast_plan(None)).kind != SHUTDOWN:
            self.execute(plan)

    # ---- data plane ----------------------------------------------------------------
    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        """Run this stage for `plan` (graph replay when a decode bucket fits, else eager).
        Returns the last stage's logits (`[N, vocab]` float32, one row per sampled sequence,
        or every token's with RETURN_ALL_LOGITS); None on other stages."""
        m, t = self.mapping, plan.num_tokens
        self._hidden.clear()
        scores_prompt = m.is_last_stage and prompt_targets(plan).num_rows > 0
        # NOTE: steps that score prompt tokens need the hidden states: they run eagerly.
        bucket = (self.graphs.bucket_for(plan) if self.graphs is not None and not scores_prompt
                  else None)
        views = self.inputs.fill(plan, pad_to=bucket)
        if self.device.type == "cpu" and self.timer.enabled:
            self._compute_start = time.perf_counter()  # see StepTimer.cpu_compute
        if plan.flags & FEEDBACK and m.is_first_stage:
            self._resolve_fed_back(views.input_ids[:t])
        if not m.is_first_stage:
            assert self.hidden_in is not None
            self.groups.pp.recv(self.hidden_in[:t], m.pp_rank - 1)
        if bucket is not None:
            assert self.graphs is not None
            out = self.graphs.replay(bucket)  # [bucket, hidden] or [bucket, vocab]
            if not m.is_last_stage:
                self.groups.pp.send(out[:t], m.pp_rank + 1)
                return None
            rows = views.logits_rows
            assert rows is not None
            return out[:t] if rows.numel() == t else out.index_select(0, rows)
        x = views.input_ids if m.is_first_stage else self.hidden_in[:t]  # type: ignore[index]
        meta = self.model.attention_backend.prepare(views.attention)
        out = run_stage(self.model, self.kv.layers, x, views, meta,
                        bool(plan.flags & RETURN_ALL_LOGITS),
                        self._hidden if scores_prompt else None)
        if not m.is_last_stage:
            self.groups.pp.send(out, m.pp_rank + 1)
            return None
        return out

    def _resolve_fed_back(self, ids: torch.Tensor) -> None:
        """Input ids -1 - r become the token sampled in the previous step's row r (read on
        the device, in stream order after that step's sampler: no host round trip)."""
        if ids.device.type == "cuda":
            resolve_fed_back_triton(ids, self.fed_back)
        else:
            resolve_fed_back_torch(ids, self.fed_back)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> None:
        self.timer.gpu_begin(self.device)
        self._compute_start = None
        try:
            self._execute(plan)
        finally:
            self.timer.gpu_end(self.device)
            if self._compute_start is not None:
                self.timer.cpu_compute(time.perf_counter() - self._compute_start)

    def _execute(self, plan: StepPlan) -> None:
        # swap preemption: queued before the forward, which may write the swapped-out blocks
        self.kv.swap_out(plan.swap_out)
        self.kv.swap_in(plan.swap_in)
        logits = self._forward(plan)
        if logits is None:
            return
        rows = np.nonzero(plan.sample)[0]
        prompt_rows = None
        if self._hidden:  # the logits' gather is collective over the TP group
            prompt_rows = prompt_logprobs_of(self.model, self._hidden.pop(), plan)
        if not self.samples:
            self._share_sampled(rows.size)
            return
        assert self.sampler is not None
        # NOTE: the ids the model read: FEEDBACK placeholders resolved on the (first) stage
        ids = self.inputs.dev["input_ids"][:plan.num_tokens] if self.mapping.is_first_stage \
            else None
        self.sampler.observe(plan, ids)
        result: np.ndarray | SampledStep
        if plan.flags & RETURN_ALL_LOGITS:
            result = np.ascontiguousarray(logits.cpu().numpy(), dtype=np.float32)
            self._share_sampled(rows.size)
        else:
            # [N + P, width] float64: sampled rows, then prompt-logprob rows; the token ids
            # also land in `fed_back` (the next step's inputs) with one pipeline stage
            fed = self.fed_back[:rows.size] if self.mapping.pp_size == 1 else None
            out = self.sampler.sample_device(logits, plan, rows, prompt_rows, tokens_out=fed)
            self._share_sampled(rows.size)
            result = self.sampler.to_host(out)  # the step's one device-to-host copy
        if self.world.rank == 0:
            self._local_results.append(result)
        else:
            if isinstance(result, SampledStep):
                result = result.wait()
            self._send_result(np.ascontiguousarray(result))

    def _send_result(self, result: np.ndarray) -> None:
        # Completed sends release their buffers; the rest stay referenced until complete.
        self._pending_sends = [(r, b) for r, b in self._pending_sends if not r.Test()]
        self._pending_sends.append((self.world.comm.Isend(result, dest=0, tag=_RESULT_TAG),
                                    result))

    def _result_buffer(self, plan: StepPlan) -> np.ndarray:
        """An empty array shaped like `plan`'s result (see `collect`)."""
        if plan.flags & RETURN_ALL_LOGITS:
            return np.empty((plan.num_tokens, self.model.cfg.vocab_size), dtype=np.float32)
        return np.empty(result_shape(plan), dtype=np.float64)

    def _share_sampled(self, n: int) -> None:
        """Overlap (`FEEDBACK` plans) reads this step's tokens on the device: with one
        pipeline stage the sampler wrote them into `fed_back`, and since every rank runs the
        embedding, the sampling rank broadcasts them over the TP group (a few bytes, on the
        stream)."""
        if self.mapping.pp_size == 1 and n and self.mapping.tp_size > 1:
            self.groups.tp.broadcast(self.fed_back[:n], 0)

    def collect(self, plan: StepPlan) -> np.ndarray:
        """Leader: the oldest outstanding step's result from the sampling rank: all logits
        `[T, vocab]` float32, or one row per sampled sequence then one per scored prompt token
        (see `runtime/prompt_logprobs.py`)."""
        if self._local_results:
            result = self._local_results.popleft()
            return result.wait() if isinstance(result, SampledStep) else result
        request, out = self._pending_results.popleft()
        request.Wait()
        return out

    def launch(self, plan: StepPlan) -> None:
        """Leader: broadcast a plan and run its own part; the result is collected later, so
        with pipeline parallelism several plans can be in flight. The receive of the result
        is posted first (results arrive in launch order: one source, one tag)."""
        if not self.samples:
            out = self._result_buffer(plan)
            self._pending_results.append(
                (self.world.comm.Irecv(out, source=self.mapping.last_stage_leader,
                                       tag=_RESULT_TAG), out))
        self.broadcast_plan(plan)
        self.execute(plan)

    def step(self, plan: StepPlan) -> np.ndarray:
        """Leader: broadcast, execute its own part, and wait for the result."""
        self.launch(plan)
        return self.collect(plan)

    def shutdown(self) -> None:
        """Leader: tell every rank to leave `serve_forever`."""
        if self.world.is_leader:
            self.broadcast_plan(StepPlan.shutdown())

    def close(self) -> None:
        """Collective (after shutdown): release communicators and the KV pool."""
        self.graphs = None  # the graphs hold the KV pool and the communicators
        MPI.Request.Waitall([r for r, _ in self._pending_sends])
        self._pending_sends.clear()
        self.groups.destroy()
        self.kv.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
