"""Run one step plan on this rank: prepare inputs, forward this stage, pass hidden states
to the next stage, and (last stage) turn logits into tokens for the leader."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from mpi4py import MPI

from trtdist.comm.world import World
from trtdist.kernels.paged_attention import AttentionMetadata
from trtdist.models.llama import LlamaStage
from trtdist.parallel.groups import ParallelGroups
from trtdist.runtime.kv_cache import KVCache
from trtdist.runtime.plan import RETURN_ALL_LOGITS, SHUTDOWN, StepPlan
from trtdist.runtime.sampler import Sampler, result_width

_RESULT_TAG = 31


class ModelRunner:
    """Executes plans for one rank. The leader also collects each step's result."""

    def __init__(self, world: World, groups: ParallelGroups, model: LlamaStage,
                 kv: KVCache) -> None:
        self.world, self.groups, self.model, self.kv = world, groups, model, kv
        self.mapping = groups.mapping
        self.device = model.device
        self._local_results: deque[np.ndarray] = deque()
        # NOTE: the leader posts the receive of each plan's result when it launches the plan,
        # and the last stage sends with Isend. A result over MPI's eager limit (~4 KiB on
        # shared memory) otherwise blocks the last stage in Send while the leader blocks in
        # the next plan's broadcast: a deadlock as soon as two batches are in flight.
        self._pending_results: deque[tuple[MPI.Request, np.ndarray]] = deque()
        self._pending_sends: list[tuple[MPI.Request, np.ndarray]] = []
        self.samples = self.mapping.is_last_stage and self.mapping.tp_rank == 0
        self.sampler = Sampler(self.device) if self.samples else None

    # ---- control plane -------------------------------------------------------------
    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan:
        """Leader passes the plan; other ranks pass None and receive it."""
        buf = self.world.bcast_array(plan.encode() if plan is not None else None,
                                     np.dtype(np.int64), idle_wait=True)
        return plan if plan is not None else StepPlan.decode(buf)

    def serve_forever(self) -> None:
        """Non-leader loop: execute every plan the leader sends until shutdown."""
        while (plan := self.broadcast_plan(None)).kind != SHUTDOWN:
            self.execute(plan)

    # ---- data plane ----------------------------------------------------------------
    def _metadata(self, plan: StepPlan) -> AttentionMetadata:
        bs = self.kv.block_size
        seq_of_token = np.repeat(np.arange(plan.num_seqs), plan.query_lens)
        pos = plan.positions
        slots = plan.block_tables[seq_of_token, pos // bs] * bs + pos % bs
        qsl = np.concatenate([[0], np.cumsum(plan.query_lens)])
        dev = self.device
        return AttentionMetadata(
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            context_lens=torch.from_numpy(plan.context_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(plan.block_tables.astype(np.int32)).to(dev),
            slot_mapping=torch.from_numpy(slots.astype(np.int64)).to(dev),
            query_lens_host=tuple(int(x) for x in plan.query_lens),
            context_lens_host=tuple(int(x) for x in plan.context_lens),
            block_size=bs,
            is_decode=plan.num_tokens == plan.num_seqs,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> None:
        m, dev = self.mapping, self.device
        meta = self._metadata(plan)
        positions = torch.from_numpy(plan.positions).to(dev)
        if m.is_first_stage:
            x = torch.from_numpy(plan.input_ids).to(dev)
        else:
            x = torch.empty(plan.num_tokens, self.model.cfg.hidden_size, dtype=self.model.dtype,
                            device=dev)
            self.groups.pp.recv(x, m.pp_rank - 1)
        h = self.model(x, positions, self.kv.layers, meta)
        if not m.is_last_stage:
            self.groups.pp.send(h, m.pp_rank + 1)
            return
        rows = np.nonzero(plan.sample)[0]
        if plan.flags & RETURN_ALL_LOGITS:
            logits = self.model.compute_logits(h)
        elif rows.size:  # the last token of each sampled sequence
            last = meta.query_start_loc[1:][torch.from_numpy(rows).to(dev)].long() - 1
            logits = self.model.compute_logits(h[last])
        else:  # only partial prefill chunks: nothing to sample (same on every rank)
            logits = torch.empty(0, self.model.cfg.vocab_size, device=dev)
        if not self.samples:
            return
        assert self.sampler is not None
        self.sampler.observe(plan)
        if plan.flags & RETURN_ALL_LOGITS:
            result = np.ascontiguousarray(logits.cpu().numpy(), dtype=np.float32)
        else:
            result = self.sampler.sample(logits, plan, rows)
        if self.world.rank == 0:
            self._local_results.append(result)
        else:
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
        rows = np.nonzero(plan.sample)[0]
        k = max(int(plan.logprobs[rows].max(initial=-1)), 0)
        return np.empty((rows.size, result_width(k)), dtype=np.float64)

    def collect(self, plan: StepPlan) -> np.ndarray:
        """Leader: the oldest outstanding step's result from the sampling rank: all logits
        `[T, vocab]` float32, or one row per sampled sequence (see `Sampler.sample`)."""
        if self._local_results:
            return self._local_results.popleft()
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
        MPI.Request.Waitall([r for r, _ in self._pending_sends])
        self._pending_sends.clear()
        self.groups.destroy()
        del self.kv.data, self.kv.layers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
