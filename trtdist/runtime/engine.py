"""The leader's engine: requests in, step plans out, tokens back, outputs assembled.

One loop serves every configuration: with pipeline parallelism up to `pp_size` batches are
in flight (each stage works on a different one); without it, one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from trtdist.config import ModelConfig
from trtdist.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from trtdist.runtime.block_allocator import KVBlockAllocator
from trtdist.runtime.model_runner import ModelRunner
from trtdist.runtime.plan import FORWARD, StepPlan
from trtdist.runtime.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from trtdist.runtime.sequence import Sequence
from trtdist.sampling_params import SamplingParams
from trtdist.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Leader-side limits. `max_model_len` None means the model's max_position_embeddings."""

    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, runner: ModelRunner, model_cfg: ModelConfig, tokenizer: Tokenizer | None,
                 config: EngineConfig, num_blocks: int, block_size: int) -> None:
        self.runner, self.tokenizer, self.model_cfg = runner, tokenizer, model_cfg
        self.max_model_len = min(config.max_model_len or model_cfg.max_position_embeddings,
                                 model_cfg.max_position_embeddings)
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(f"the KV pool ({num_blocks} blocks of {block_size} tokens) cannot "
                             f"hold one sequence of max_model_len {self.max_model_len}; lower "
                             "--max-model-len or give the KV cache more memory")
        self.allocator = KVBlockAllocator(num_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_size, config.max_num_tokens,
                                                   self.max_model_len), self.allocator)
        self.eos_ids = frozenset((tokenizer.eos_token_ids if tokenizer else ())
                                 or model_cfg.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.in_flight: deque[tuple[ScheduledBatch, StepPlan]] = deque()
        self.pipeline_depth = runner.mapping.pp_size
        self._released: list[int] = []
        self._seq_ids = itertools.count()
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Seq[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer; pass prompt token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got "
                             f"{min(ids) if min(ids) < 0 else max(ids)}")
        if params.top_k > vocab:
            raise ValueError(f"top_k must be at most the vocabulary size ({vocab}), got "
                             f"{params.top_k}")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; this model's context is "
                             f"{self.max_model_len}, leaving no room for output")
        arrival = time.time() if arrival_time is None else arrival_time
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids), params,
                           RequestMetrics(arrival), parent=seqs[0] if seqs else None)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, text, list(ids), seqs)

    def abort_request(self, request_id: str) -> bool:
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        for seq in req.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
        return True

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_work or bool(self.in_flight)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.metrics.finished_time = time.time()
        self.scheduler.finish(seq, reason, stop_reason)
        self._released.append(seq.seq_id)

    # ---- one step ------------------------------------------------------------------
    def _plan(self, batch: ScheduledBatch) -> StepPlan:
        entries = batch.entries
        s = len(entries)
        ids, pos = [], []
        tables = [self.allocator.table(e.seq.seq_id) for e in entries]
        width = max(len(t) for t in tables)
        block_tables = np.zeros((s, width), dtype=np.int64)
        floats = np.empty((s, 6))
        ints = np.empty((8, s), dtype=np.int64)
        for i, (e, table) in enumerate(zip(entries, tables)):
            seq, nc, n, p = e.seq, e.seq.num_computed, e.num_new, e.seq.params
            ids.append(seq.token_ids[nc:nc + n])
            pos.append(range(nc, nc + n))
            block_tables[i, :len(table)] = table
            ints[:, i] = (n, nc + n, seq.seq_id, seq.prompt_len, e.samples, p.top_k,
                          -1 if seq.seed is None else seq.seed,
                          -1 if p.logprobs is None else p.logprobs)
            if seq.metrics.scheduled_time is None:
                seq.metrics.scheduled_time = time.time()
            floats[i] = (p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                         p.presence_penalty, p.frequency_penalty)
            seq.in_flight = True
        released, self._released = np.array(self._released, dtype=np.int64), []
        return StepPlan(FORWARD, np.fromiter(itertools.chain.from_iterable(ids), np.int64),
                        np.fromiter(itertools.chain.from_iterable(pos), np.int64),
                        ints[0], ints[1], block_tables, 0, ints[2], ints[3], ints[4], ints[5],
                        ints[6], ints[7], floats, released)

    def step(self) -> list[RequestOutput]:
        """Launch batches until the pipeline is full, then finish the oldest one. Returns the
        outputs of every request that produced tokens or finished in this step."""
        while len(self.in_flight) < self.pipeline_depth:
            batch = self.scheduler.schedule()
            if batch is None:
                break
            plan = self._plan(batch)
            self.runner.launch(plan)
            self.in_flight.append((batch, plan))
        if not self.in_flight:
            return []
        batch, plan = self.in_flight.popleft()
        result = self.runner.collect(plan)
        self.stats["steps"] += 1
        return self._process(batch, result)

    def _process(self, batch: ScheduledBatch, result: np.ndarray) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Request] = {}
        row = 0
        for e in batch.entries:
            seq = e.seq
            samples = e.samples
            self.scheduler.release_in_flight(seq)
            if samples:
                r = result[row]
                row += 1
            if seq.is_finished:  # aborted while in flight
                continue
            if seq.num_output == 0 and seq.num_computed < seq.prompt_len:
                self.stats["prompt_tokens"] += min(e.num_new, seq.prompt_len - seq.num_computed)
            seq.num_computed += e.num_new
            self.allocator.register(seq.seq_id, seq.token_ids, seq.num_computed)
            if not samples:
                continue
            token = int(r[0])
            seq.token_ids.append(token)
            self.stats["generation_tokens"] += 1
            if seq.metrics.first_token_time is None:
                seq.metrics.first_token_time = now
            seq.metrics.token_times.append(now)
            if seq.params.logprobs is not None:
                k = seq.params.logprobs
                top = [(int(r[2 + 2 * j]), float(r[3 + 2 * j])) for j in range(k)]
                seq.logprobs.append(TokenLogprob(token, float(r[1]), top))
            self._check_stop(seq, token)
            touched[seq.request_id] = self.requests[seq.request_id]
        return [self._output(req) for req in touched.values()]

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        previous_len = len(seq.text)
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output_ids, p.skip_special_tokens)
        if seq.num_output > p.min_tokens:  # the first min_tokens tokens never stop
            if token in p.stop_token_ids:
                self._finish(seq, "stop", token)
                return
            if not p.ignore_eos and token in self.eos_ids:
                self._finish(seq, "stop", None)
                return
            if p.stop and self._cut_at_stop_string(seq, previous_len):
                return
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _cut_at_stop_string(self, seq: Sequence, previous_len: int) -> bool:
        # NOTE: the text is decoded from all output tokens each time (simple and exact when
        # tokens merge across boundaries); only a match ending in the new text can be new.
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, previous_len - longest + 1)
        hits = [(i, s) for s in seq.params.stop if (i := seq.text.find(s, start)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        seq.text = seq.text[:i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
        self._finish(seq, "stop", s)
        return True

    def _output(self, req: _Request) -> RequestOutput:
        outs = [CompletionOutput(s.index, s.text, list(s.output_ids), s.finish_reason,
                                 list(s.logprobs) if s.params.logprobs is not None else None,
                                 s.stop_reason) for s in req.seqs]
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             req.seqs[0].metrics, req.seqs[0].num_cached_prompt)

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)

    def drain(self) -> None:
        """Collect every batch still in flight (e.g. before shutdown)."""
        while self.in_flight:
            batch, plan = self.in_flight.popleft()
            self._process(batch, self.runner.collect(plan))

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)  # holds only running sequences

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
