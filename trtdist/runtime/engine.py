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
from trtdist.runtime.plan import FEEDBACK, FORWARD, TABLE_ROWS, StepPlan
from trtdist.runtime.prompt_logprobs import prompt_targets
from trtdist.runtime.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from trtdist.runtime.sequence import Sequence, SequenceStatus
from trtdist.runtime.validation import RequestError, check_request
from trtdist.sampling_params import DELTA, FINAL_ONLY, SamplingParams
from trtdist.tokenizer import Tokenizer

_NO_TABLES = np.zeros(0, dtype=np.int64)
_NO_PAIRS = np.zeros((0, 2), dtype=np.int64)
FINISHED = SequenceStatus.FINISHED


def _pairs(pairs: list[tuple[int, int]]) -> np.ndarray:
    """A schedule's (block, block) copy pairs as the plan's `[N, 2]` array."""
    return np.array(pairs, dtype=np.int64).reshape(-1, 2) if pairs else _NO_PAIRS


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
        for s in self.seqs:
            if s.status is not FINISHED:
                return False
        return True


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
        # NOTE: as many block-table rows as every rank's persistent table holds
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_size, config.max_num_tokens,
                                                   self.max_model_len, self.overlap,
                                                   runner.inputs.table.shape[0],
                                                   policy=config.scheduler_policy,
                                                   host_blocks=runner.kv.host_blocks),
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
        """The step plan of `batch`, and the sequences' counters moved on (at launch, not
        when the batch returns, so the next batch can be planned while this one runs).

        NOTE: per-sequence columns are numpy gathers by block-table row (sampling settings
        written once at admission, `runtime/block_table.py`); the one loop over the batch
        collects token ids and moves counters; prompt chunks and logit bias, rare in a decode
        step, are handled for just the sequences that have them."""
        entries = batch.entries
        s = len(entries)
        seqs = [e.seq for e in entries]
        table_rows = self.scheduler.rows
        rows = np.fromiter([q.row for q in seqs], np.int64, s)
        start = np.fromiter([q.num_computed for q in seqs], np.int64, s)  # computed before
        n = np.fromiter([e.num_new for e in entries], np.int64, s)
        samples = np.fromiter([e.samples for e in entries], np.bool_, s)
        end = start + n
        ids: list[int] = []
        feedback = False
        sampled_rows = 0
        for e in entries:
            seq, k = e.seq, e.num_new
            nc, toks = seq.num_computed, seq.token_ids
            if k == 1 and nc < len(toks):
                ids.append(toks[nc])
            else:
                known = toks[nc:nc + k]
                if len(known) < k:  # the pending token: read on the device (overlap)
                    known.append(-1 - seq.sample_row)
                    feedback = True
                ids.extend(known)
            seq.in_flight += 1
            seq.num_computed = nc + k
            if e.samples:
                seq.num_pending += 1
                seq.sample_row = sampled_rows
                sampled_rows += 1
        t = len(ids)
        first = np.cumsum(n) - n  # [S] each sequence's first token in the packed batch
        positions = np.arange(t, dtype=np.int64) + np.repeat(start - first, n)
        seq_ids, prompt_lens, top_k, seeds, logprobs, bias_len = table_rows.ints[:, rows]
        prompt_lp = table_rows.prompt_logprobs[rows]
        next_prompt = np.full(s, -1, dtype=np.int64)
        for i in np.flatnonzero(start < prompt_lens).tolist():  # prompt chunks only
            seq, nc, k = seqs[i], int(start[i]), int(n[i])
            if nc + k < seq.prompt_len:
                next_prompt[i] = seq.token_ids[nc + k]
            if seq.metrics.scheduled_time is None:
                seq.metrics.scheduled_time = time.time()
            if seq.num_output == 0:
                self.stats["prompt_tokens"] += min(k, seq.prompt_len - nc)
        for i in np.flatnonzero(prompt_lp >= 0).tolist():  # rare: prompt logprobs asked
            seq = seqs[i]
            if not (seq.wants_prompt_logprobs and start[i] < seq.prompt_len):
                prompt_lp[i] = -1
        bias_counts = np.where(samples, bias_len, 0)
        bias_ids: list[int] = []
        bias_values: list[float] = []
        for i in np.flatnonzero(bias_counts).tolist():
            bias = seqs[i].params.logit_bias
            bias_ids += [tok for tok, _ in bias]
            bias_values += [v for _, v in bias]
        tables = self.allocator.tables
        cleared, updates = table_rows.changes(
            rows[batch.grown], [tables[seqs[i].seq_id] for i in batch.grown])
        released, self._released = np.array(self._released, dtype=np.int64), []
        return StepPlan(FORWARD, np.array(ids, dtype=np.int64), positions, n, end,
                        _NO_TABLES.reshape(s, 0), TABLE_ROWS | (FEEDBACK if feedback else 0),
                        seq_ids, prompt_lens, samples.astype(np.int64), top_k, seeds, logprobs,
                        table_rows.floats[rows], released, prompt_logprobs=prompt_lp,
                        next_prompt_token=next_prompt, bias_counts=bias_counts,
                        bias_ids=np.array(bias_ids, dtype=np.int64),
                        bias_values=np.array(bias_values, dtype=np.float64), rows=rows,
                        cleared_rows=cleared, table_updates=updates,
                        swap_out=_pairs(batch.swap_out), swap_in=_pairs(batch.swap_in))

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
        requests, alloc = self.requests, self.allocator
        bs, chains = alloc.block_size, alloc.chains
        register = alloc.enable_prefix_caching
        row = 0
        # rows after the sampled ones score prompt tokens (runtime/prompt_logprobs.py)
        n_sampled = prompt_row = int(np.count_nonzero(plan.sample))
        tokens = result[:n_sampled, 0].astype(np.int64).tolist()  # one conversion per step
        prompt_counts = prompt_targets(plan).counts
        scored = bool(prompt_counts.any())
        starts = plan.context_lens - plan.query_lens  # num_computed when planned
        generated = 0
        for i, e in enumerate(batch.entries):
            seq = e.seq
            samples = e.samples
            # Scheduler.release_in_flight, inlined (once per sequence per step)
            seq.in_flight -= 1
            finished = seq.status is FINISHED
            if finished and not seq.in_flight:
                alloc.free_seq(seq.seq_id)
            if samples:
                j = row
                row += 1
                seq.num_pending -= 1
            if scored and prompt_counts[i]:
                rows = result[prompt_row:prompt_row + prompt_counts[i]]
                prompt_row += int(prompt_counts[i])
                if not finished:
                    self._add_prompt_logprobs(seq, int(starts[i]) + 1, rows)
            if finished:  # aborted (or stopped a step late) while in flight
                continue
            toks = seq.token_ids
            # NOTE: hash newly full blocks only when one became full (register's own test)
            if register and min(seq.num_computed, len(toks)) // bs > len(chains[seq.seq_id]):
                alloc.register(seq.seq_id, toks, min(seq.num_computed, len(toks)))
            if not samples:
                continue
            p = seq.params
            if p.max_tokens == 0:  # only the prompt was wanted (scored)
                touched[seq.request_id] = requests[seq.request_id]
                self._finish(seq, "length")
                continue
            token = tokens[j]
            toks.append(token)
            generated += 1
            m = seq.metrics
            if m.first_token_time is None:
                m.first_token_time = now
            m.token_times.append(now)
            if p.logprobs is not None:
                r = result[j]
                top = [(int(r[2 + 2 * x]), float(r[3 + 2 * x])) for x in range(p.logprobs)]
                seq.logprobs.append(TokenLogprob(token, float(r[1]), top))
            self._check_stop(seq, token)
            if not finished_only or seq.status is FINISHED:
                touched[seq.request_id] = requests[seq.request_id]
        self.stats["generation_tokens"] += generated
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
        num_output = len(seq.token_ids) - seq.prompt_len
        can_stop = num_output > p.min_tokens  # the first min_tokens tokens never stop
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
        if num_output >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
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

    def check_block_tables(self) -> None:
        """Raise unless this rank's persistent block table (`runner.inputs.table`, rebuilt
        from the plans' changes) holds every running sequence's allocator table in its row,
        zeros after it (used by tests; meaningful between steps)."""
        table = self.runner.inputs.table
        for seq in self.scheduler.running:
            want = self.allocator.tables[seq.seq_id]
            row = table[seq.row]
            if row[:len(want)].tolist() != want or row[len(want):].any():
                raise AssertionError(f"sequence {seq.seq_id}: row {seq.row} holds "
                                     f"{row[:len(want) + 2].tolist()}..., the allocator "
                                     f"{want}")
        rows = [seq.row for seq in self.scheduler.running]
        if len(set(rows)) != len(rows) or self.scheduler.rows.num_free + len(rows) != \
                table.shape[0]:
            raise AssertionError(f"block-table rows {sorted(rows)} are shared or lost "
                                 f"({self.scheduler.rows.num_free} free of {table.shape[0]})")

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
