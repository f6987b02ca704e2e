"""Run one step plan on this rank: prepare inputs, forward this stage, pass hidden states
to the next stage, and (last stage) turn logits into tokens for the leader."""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from trtdist.comm.world import World
from trtdist.models.llama import LlamaStage
from trtdist.parallel.groups import ParallelGroups
from trtdist.runtime.graph_runner import CUDAGraphRunner, run_stage
from trtdist.runtime.inputs import StepInputs
from trtdist.runtime.kv_cache import KVCache
from trtdist.runtime.plan import RETURN_ALL_LOGITS, SHUTDOWN, StepPlan
from trtdist.runtime.prompt_logprobs import prompt_logprobs_of, prompt_targets, result_shape
from trtdist.runtime.sampler import Sampler

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
        self._local_results: deque[np.ndarray] = deque()
        self.samples = self.mapping.is_last_stage and self.mapping.tp_rank == 0
        self.sampler = Sampler(self.device, model.cfg.vocab_size) if self.samples else None
        self._hidden: list[torch.Tensor] = []  # last stage: final hidden states, when needed

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
    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        self._hidden.clear()
        scores_prompt = self.mapping.is_last_stage and prompt_targets(plan).num_rows > 0
        return self._run(plan, scores_prompt)

    def _run(self, plan: StepPlan, scores_prompt: bool) -> torch.Tensor | None:
        """Run this stage for `plan` (graph replay when a decode bucket fits, else eager).
        Returns the last stage's logits (`[N, vocab]` float32, one row per sampled sequence,
        or every token's with RETURN_ALL_LOGITS); None on other stages."""
        m, t = self.mapping, plan.num_tokens
        # NOTE: steps that score prompt tokens need the hidden states: they run eagerly.
        bucket = (self.graphs.bucket_for(plan) if self.graphs is not None and not scores_prompt
                  else None)
        views = self.inputs.fill(plan, pad_to=bucket)
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

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> None:
        logits = self._forward(plan)
        if logits is None:
            return
        rows = np.nonzero(plan.sample)[0]
        prompt_rows = None
        if self._hidden:  # the logits' gather is collective over the TP group
            prompt_rows = prompt_logprobs_of(self.model, self._hidden.pop(), plan)
        if not self.samples:
            return
        assert self.sampler is not None
        self.sampler.observe(plan)
        if plan.flags & RETURN_ALL_LOGITS:
            result = np.ascontiguousarray(logits.cpu().numpy(), dtype=np.float32)
        else:
            result = self.sampler.sample(logits, plan, rows, prompt_rows=prompt_rows)
        if self.world.rank == 0:
            self._local_results.append(result)
        else:
            self.world.comm.Send(result, dest=0, tag=_RESULT_TAG)

    def collect(self, plan: StepPlan) -> np.ndarray:
        """Leader: the oldest outstanding step's result from the sampling rank: all logits
        `[T, vocab]` float32, or one row per sampled sequence then one per scored prompt token
        (see `runtime/prompt_logprobs.py`)."""
        if self._local_results:
            return self._local_results.popleft()
        if plan.flags & RETURN_ALL_LOGITS:
            out = np.empty((plan.num_tokens, self.model.cfg.vocab_size), dtype=np.float32)
        else:
            out = np.empty(result_shape(plan), dtype=np.float64)
        self.world.comm.Recv(out, source=self.mapping.last_stage_leader, tag=_RESULT_TAG)
        return out

    def launch(self, plan: StepPlan) -> None:
        """Leader: broadcast a plan and run its own part; the result is collected later, so
        with pipeline parallelism several plans can be in flight."""
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
        self.groups.destroy()
        del self.kv.data, self.kv.layers
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
