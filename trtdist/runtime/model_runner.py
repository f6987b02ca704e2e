"""Run one step plan on this rank: prepare inputs, forward this stage, pass hidden states
to the next stage, and (last stage) turn logits into tokens for the leader."""

from __future__ import annotations

import numpy as np
import torch

from trtdist.comm.world import World
from trtdist.kernels.paged_attention import AttentionMetadata
from trtdist.models.llama import LlamaStage
from trtdist.parallel.groups import ParallelGroups
from trtdist.runtime.kv_cache import KVCache
from trtdist.runtime.plan import RETURN_ALL_LOGITS, SHUTDOWN, StepPlan

_RESULT_TAG = 31


class ModelRunner:
    """Executes plans for one rank. The leader also collects each step's result."""

    def __init__(self, world: World, groups: ParallelGroups, model: LlamaStage,
                 kv: KVCache) -> None:
        self.world, self.groups, self.model, self.kv = world, groups, model, kv
        self.mapping = groups.mapping
        self.device = model.device
        self._local_result: np.ndarray | None = None

    # ---- control plane -------------------------------------------------------------
    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan:
        """Leader passes the plan; other ranks pass None and receive it."""
        buf = self.world.bcast_array(plan.encode() if plan is not None else None,
                                     np.dtype(np.int64))
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
        if plan.flags & RETURN_ALL_LOGITS:
            logits = self.model.compute_logits(h)
        else:
            logits = self.model.compute_logits(h[meta.query_start_loc[1:].long() - 1])
        if m.tp_rank != 0:
            return
        result = self._result(plan, logits)
        if self.world.rank == 0:
            self._local_result = result
        else:
            self.world.comm.Send(result, dest=0, tag=_RESULT_TAG)

    def _result(self, plan: StepPlan, logits: torch.Tensor) -> np.ndarray:
        if plan.flags & RETURN_ALL_LOGITS:
            return np.ascontiguousarray(logits.cpu().numpy(), dtype=np.float32)
        return logits.argmax(dim=-1).cpu().numpy().astype(np.int64)

    def collect(self, plan: StepPlan) -> np.ndarray:
        """Leader: the step's result from the sampling rank (token ids, or all logits)."""
        if self._local_result is not None:
            out, self._local_result = self._local_result, None
            return out
        if plan.flags & RETURN_ALL_LOGITS:
            out = np.empty((plan.num_tokens, self.model.cfg.vocab_size), dtype=np.float32)
        else:
            out = np.empty(plan.num_seqs, dtype=np.int64)
        self.world.comm.Recv(out, source=self.mapping.last_stage_leader, tag=_RESULT_TAG)
        return out

    def step(self, plan: StepPlan) -> np.ndarray:
        """Leader: broadcast, execute its own part, and wait for the result."""
        self.broadcast_plan(plan)
        self.execute(plan)
        return self.collect(plan)

    def shutdown(self) -> None:
        if self.world.is_leader:
            self.broadcast_plan(StepPlan.shutdown())
