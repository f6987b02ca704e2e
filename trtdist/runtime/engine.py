"""The leader's engine: requests in, step plans out, tokens back, outputs assembled.

One loop serves every configuration: with pipeline parallelism up to `pp_size` batches are
in flight (each stage works on a different one); without it, one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np

from trtdist.config import ModelConfig
from trtdist.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from trtdist.runtime.block_allocator import KVBlockAllocator
from trtdist.runtime.detokenize import IncrementalDetokenizer
from trtdist.runtime.model_runner import ModelRunner
from trtdist.runtime.plan import FEEDBACK, FORWARD, StepPlan
from trtdist.runtime.prompt_logprobs import prompt_targets
from trtdist.runtime.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from trtdist.runtime.sequence import Sequence
from trtdist.runtime.validation import RequestError, check_request
from trtdist.sampling_params import DELTA, FINAL_ONLY, SamplingParams
from trtdist.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Leader-side limits. `max_model_len` None means the model's max_position_embeddings."""

    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    # Schedule and launch step N+1 while step N runs (pp_size 1): decode inputs that are
    # still being sampled are read on the device; stops are seen one step late.
    overlap: bool = True
    # KV admission: "max_utilization" (preempt when full) or "guaranteed_no_evict"
    # (runtime/scheduler.py)
    scheduler_policy: str = "max_utilization"

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
    kind: str  # SamplingParams.output_kind
    # DELTA bookkeeping, one entry per sequence: output tokens already emitted, and whether
    # its final output went out; whether the prompt's logprobs went out (once, when complete)
    sent: list[int]
    closed: list[bool]
    prompt_sent: bool = False

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
        # NOTE: overlap needs the sampled tokens on the first stage's device: with one
        # pipeline stage the sampling rank is on it (pp_size > 1 keeps its own pipelining).
        self.overlap = config.overlap and runner.mapping.pp_size == 1
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_size, config.max_num_tokens,
                                                   self.max_model_len, self.overlap,
                                                   config.scheduler_policy),
                                   self.allocator)
        self.eos_ids = frozenset((tokenizer.eos_token_ids if tokenizer else ())
                                 or model_cfg.eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.in_flight: deque[tuple[ScheduledBatch, StepPlan]] = deque()
        # batches in flight: one per pipeline stage, plus one with overlap
        self.pipeline_depth = runner.mapping.pp_size + int(self.overlap)
        self._released: list[int] = []
        self._seq_ids = itertools.count()
        # copied_output_items: token ids and logprob entries put into outputs (a DELTA
        # request's stay constant per step however long it gets; a CUMULATIVE one's grow)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0,
                      "detokenized_tokens": 0, "overlapped_steps": 0,
                      "copied_output_items": 0}

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | Seq[int],
                    params: SamplingParams, arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer; pass prompt token ids",
                                   "prompt")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        check_request(ids, params, self.model_cfg.vocab_size, self.max_model_len)
        arrival = time.time() if arrival_time is None else arrival_time
        seqs: list[Sequence] = []
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids), params,
                           RequestMetrics(arrival), parent=seqs[0] if seqs else None)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = _Request(request_id, text, list(ids), seqs,
                                             params.output_kind, [0] * params.n,
                                             [False] * params.n)

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
        if seq.detok is not None:  # a trailing incomplete character becomes text now
            seq.detok.flush()
        self.scheduler.finish(seq, reason, stop_reason)
        self._released.append(seq.seq_id)

    # ---- one step ------------------------------------------------------------------
    def _plan(self, batch: ScheduledBatch) -> StepPlan:
        entries = batch.entries
        s = len(entries)
        ids, pos = [], []
        tables = [self.allocator.table(e.seq.seq_id) for e in entries]
        # NOTE: block tables in one scatter from the flattened lists, not a row at a time
        lens = np.fromiter(map(len, tables), np.int64, s)
        block_tables = np.zeros((s, int(lens.max())), dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(tables), np.int64, int(lens.sum()))
        row_of = np.repeat(np.arange(s), lens)
        block_tables[row_of, np.arange(flat.size) - np.repeat(np.cumsum(lens) - lens, lens)] = flat
        int_rows: list[tuple[int, ...]] = []
        float_rows: list[tuple[float, ...]] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        sampled_rows = 0
        feedback = False
        for e in entries:
            seq, nc, n, p = e.seq, e.seq.num_computed, e.num_new, e.seq.params
            known = seq.token_ids[nc:nc + n]
            if len(known) < n:  # the pending token: read on the device (overlap)
                known = [*known, -1 - seq.sample_row]
                feedback = True
            ids.append(known)
            pos.append(range(nc, nc + n))
            scores = seq.wants_prompt_logprobs and nc < seq.prompt_len
            int_rows.append((n, nc + n, seq.seq_id, seq.prompt_len, e.samples, p.top_k,
                             -1 if seq.seed is None else seq.seed,
                             -1 if p.logprobs is None else p.logprobs,
                             p.prompt_logprobs if scores else -1,
                             seq.token_ids[nc + n] if nc + n < seq.prompt_len else -1,
                             len(p.logit_bias) if e.samples else 0))
            if e.samples and p.logit_bias:
                bias_ids += [t for t, _ in p.logit_bias]
                bias_values += [b for _, b in p.logit_bias]
            if seq.metrics.scheduled_time is None:
                seq.metrics.scheduled_time = time.time()
            float_rows.append((p.temperature, p.top_p, p.min_p, p.repetition_penalty,
                               p.presence_penalty, p.frequency_penalty))
            if seq.num_output == 0 and nc < seq.prompt_len:
                self.stats["prompt_tokens"] += min(n, seq.prompt_len - nc)
            # NOTE: counters move when the batch is launched, not when it returns, so that
            # the next batch can be planned while this one runs.
            seq.in_flight += 1
            seq.num_computed = nc + n
            if e.samples:
                seq.num_pending += 1
                seq.sample_row = sampled_rows
                sampled_rows += 1
        # NOTE: one conversion per column set, not one small numpy assignment per sequence
        ints = np.array(int_rows, dtype=np.int64).T.copy()
        floats = np.array(float_rows, dtype=np.float64)
        released, self._released = np.array(self._released, dtype=np.int64), []
        return StepPlan(FORWARD, np.fromiter(itertools.chain.from_iterable(ids), np.int64),
                        np.fromiter(itertools.chain.from_iterable(pos), np.int64),
                        ints[0], ints[1], block_tables, FEEDBACK if feedback else 0, ints[2],
                        ints[3], ints[4], ints[5], ints[6], ints[7], floats, released,
                        prompt_logprobs=ints[8],
                        next_prompt_token=ints[9], bias_counts=ints[10],
                        bias_ids=np.array(bias_ids, dtype=np.int64),
                        bias_values=np.array(bias_values, dtype=np.float64))

    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """Launch batches until the pipeline is full, then finish the oldest one. Returns the
        outputs of the requests that produced tokens or finished in this step, as each one's
        `output_kind` asks (only of those that finished with `finished_only`)."""
        start = time.perf_counter()
        while len(self.in_flight) < self.pipeline_depth:
            batch = self.scheduler.schedule()
            if batch is None:
                break
            plan = self._plan(batch)
            self.stats["overlapped_steps"] += bool(plan.flags & FEEDBACK)
            self.runner.launch(plan)
            self.in_flight.append((batch, plan))
        if not self.in_flight:
            return []
        batch, plan = self.in_flight.popleft()
        waited = time.perf_counter()
        result = self.runner.collect(plan)
        waited = time.perf_counter() - waited
        self.stats["steps"] += 1
        outputs = self._process(batch, plan, result, finished_only)
        self.runner.timer.host(time.perf_counter() - start - waited)
        return outputs

    def _process(self, batch: ScheduledBatch, plan: StepPlan, result: np.ndarray,
                 finished_only: bool = False) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Request] = {}
        row = 0
        # rows after the sampled ones score prompt tokens (runtime/prompt_logprobs.py)
        prompt_row = int(np.count_nonzero(plan.sample))
        prompt_counts = prompt_targets(plan).counts
        starts = plan.context_lens - plan.query_lens  # num_computed when planned
        for i, e in enumerate(batch.entries):
            seq = e.seq
            samples = e.samples
            self.scheduler.release_in_flight(seq)
            if samples:
                r = result[row]
                row += 1
                seq.num_pending -= 1
            if prompt_counts[i]:
                rows = result[prompt_row:prompt_row + prompt_counts[i]]
                prompt_row += int(prompt_counts[i])
                if not seq.is_finished:
                    self._add_prompt_logprobs(seq, int(starts[i]) + 1, rows)
            if seq.is_finished:  # aborted (or stopped a step late) while in flight
                continue
            self.allocator.register(seq.seq_id, seq.token_ids,
                                    min(seq.num_computed, seq.num_tokens))
            if not samples:
                continue
            touched[seq.request_id] = self.requests[seq.request_id]
            if seq.params.max_tokens == 0:  # only the prompt was wanted (scored)
                self._finish(seq, "length")
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
        return self._outputs(touched.values(), finished_only)

    @staticmethod
    def _add_prompt_logprobs(seq: Sequence, first_position: int, rows: np.ndarray) -> None:
        """Rows for prompt positions first_position...; positions already scored (before a
        preemption made the prompt run again) are skipped."""
        k = seq.params.prompt_logprobs or 0
        for j, r in enumerate(rows):
            if first_position + j != len(seq.prompt_logprobs):
                continue
            top = [(int(r[2 + 2 * m]), float(r[3 + 2 * m])) for m in range(k)]
            seq.prompt_logprobs.append(TokenLogprob(int(r[0]), float(r[1]), top))

    def _check_stop(self, seq: Sequence, token: int) -> None:
        p = seq.params
        can_stop = seq.num_output > p.min_tokens  # the first min_tokens tokens never stop
        stop_string = None
        if self.tokenizer is not None:
            # NOTE: incremental: constant work per token (runtime/detokenize.py), where
            # decoding the whole output again each time made a long output quadratic.
            if seq.detok is None:
                seq.detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens,
                                                   p.stop, p.include_stop_str_in_output)
            before = seq.detok.decoded_tokens
            stop_string = seq.detok.append([token], check_stop=can_stop)
            self.stats["detokenized_tokens"] += seq.detok.decoded_tokens - before
        if can_stop:
            if token in p.stop_token_ids:
                self._finish(seq, "stop", token)
                return
            if not p.ignore_eos and token in self.eos_ids:
                self._finish(seq, "stop", None)
                return
            if stop_string is not None:
                self._finish(seq, "stop", stop_string)
                return
        if seq.num_output >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _outputs(self, touched: Iterable[_Request], finished_only: bool) -> list[RequestOutput]:
        """The outputs of the requests that sampled in a step (`finished_only`: only of those
        that finished; a DELTA request then gets everything in its one output)."""
        outs = []
        for req in touched:
            if finished_only and not req.finished:
                continue
            out = self._output(req)
            if out is not None:
                outs.append(out)
        return outs

    def _output(self, req: _Request) -> RequestOutput | None:
        """The request's output of this step, as its `output_kind` asks; None when there is
        nothing to emit (FINAL_ONLY before the end, DELTA with nothing showable)."""
        finished = req.finished
        if finished:
            del self.requests[req.request_id]
        if req.kind == DELTA:
            return self._delta_output(req, finished)
        if req.kind == FINAL_ONLY and not finished:
            return None
        outs = []
        for s in req.seqs:
            lps = list(s.logprobs) if s.params.logprobs is not None else None
            ids = s.output_ids
            self.stats["copied_output_items"] += len(ids) + len(lps or ())
            outs.append(CompletionOutput(s.index, self._text(s), ids, s.finish_reason, lps,
                                         s.stop_reason))
        first = req.seqs[0]
        prompt_lps = (list(first.prompt_logprobs) if first.params.prompt_logprobs is not None
                      else None)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             first.metrics, first.num_cached_prompt, prompt_lps)

    def _delta_output(self, req: _Request, finished: bool) -> RequestOutput | None:
        """What is new since the request's previous output: per sequence the new token ids,
        logprobs and text (the detokenizer holds back what a stop string or an incomplete
        character may still change). A sequence with nothing showable is left out; its
        tokens go out with its next output, and a finished one always gets a last output.

        NOTE: slices from the last emitted position: constant work per step however long
        the output, where a snapshot copies every list (O(n) per token)."""
        outs = []
        for i, s in enumerate(req.seqs):
            if req.closed[i]:
                continue
            done = s.is_finished
            start = req.sent[i]
            text = s.detok.take_delta(finished=done) if s.detok is not None else ""
            new = s.num_output > start
            # NOTE: tokens without text still go out when their logprobs are wanted, or when
            # there is no tokenizer (no text at all): clients see the tokens arrive as they do
            wants_tokens = s.params.logprobs is not None or self.tokenizer is None
            if not (text or done or (new and wants_tokens)):
                continue  # e.g. the text is held back: these tokens go out next time
            ids = s.token_ids[s.prompt_len + start:]
            lps = s.logprobs[start:] if s.params.logprobs is not None else None
            self.stats["copied_output_items"] += len(ids) + len(lps or ())
            req.sent[i] = s.num_output
            req.closed[i] = done
            outs.append(CompletionOutput(s.index, text, ids, s.finish_reason, lps,
                                         s.stop_reason))
        if not outs and not finished:
            return None
        first = req.seqs[0]
        prompt_lps = None
        if (first.params.prompt_logprobs is not None and not req.prompt_sent
                and not first.wants_prompt_logprobs):
            prompt_lps, req.prompt_sent = list(first.prompt_logprobs), True
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, finished,
                             first.metrics, first.num_cached_prompt, prompt_lps)

    @staticmethod
    def _text(seq: Sequence) -> str:
        return seq.detok.text if seq.detok is not None else ""

    def abort_all(self) -> None:
        for rid in list(self.requests):
            self.abort_request(rid)

    def drain(self) -> None:
        """Collect every batch still in flight (e.g. before shutdown)."""
        while self.in_flight:
            batch, plan = self.in_flight.popleft()
            self._process(batch, plan, self.runner.collect(plan))

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)  # holds only running sequences

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)
