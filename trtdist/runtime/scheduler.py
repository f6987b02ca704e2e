"""In-flight batching on the leader.

Each step forms one packed batch: running sequences first (a decode step, or the next chunk
of a prompt), then waiting prompts in arrival order, within `max_num_tokens` tokens and
`max_batch_size` sequences. Admission is by KV capacity, under one of two policies (the
capacity-scheduler policies of TensorRT-LLM):
- `max_utilization` (default): admit while the allocator has blocks for the next chunk; when
  a running sequence cannot grow, the newest running sequence is preempted: its blocks are
  freed. With a host swap space (`host_blocks`) and room in it, its KV is first copied to
  host memory (swap-out) and copied back into fresh blocks when it is admitted again
  (swap-in); otherwise it is recomputed later from its prompt and the tokens it already
  produced. A swap costs two PCIe copies of the sequence's KV, where recomputing it costs a
  prefill of every token so far.
- `guaranteed_no_evict`: admit only while every running sequence, grown to its prompt plus
  `max_tokens` (capped by `max_model_len`), still fits in the pool, so nothing is ever
  preempted and no work is recomputed. Fewer sequences run at once when `max_tokens` is
  large; when outputs are long and their length is known it saves the recomputation.

A running sequence holds a row of the persistent block table (`runtime/block_table.py`)
from admission to finish or preemption; admission waits for a free row.

NOTE: `schedule` is the leader's one Python loop over the running sequences per step, so it
reads each sequence's counters once and calls the allocator only when a sequence needs a
new block (one step in `block_size` for a decode).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from trtdist.runtime.block_allocator import HostBlockAllocator, KVBlockAllocator
from trtdist.runtime.block_table import TableRows, table_rows
from trtdist.runtime.sequence import Sequence, SequenceStatus

POLICIES = ("max_utilization", "guaranteed_no_evict")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_batch_size: int = 256
    max_num_tokens: int = 8192
    max_model_len: int = 2048
    # Overlap scheduling: a decode sequence whose last token is still being sampled may be
    # scheduled again, its input read on the device (one engine loop, pp_size == 1).
    overlap: bool = False
    # Rows of the persistent block table (running sequences at once); 0: the default of
    # `table_rows(max_batch_size, 1)`.
    table_rows: int = 0
    policy: str = "max_utilization"
    # Slots (one KV block each) of the host swap space; 0: preemption always recomputes.
    host_blocks: int = 0

    def __post_init__(self) -> None:
        if self.table_rows == 0:
            object.__setattr__(self, "table_rows", table_rows(self.max_batch_size, 1))
        for name in ("max_batch_size", "max_num_tokens", "max_model_len", "table_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.host_blocks < 0:
            raise ValueError(f"host_blocks must be >= 0, got {self.host_blocks}")
        if self.policy not in POLICIES:
            raise ValueError(f"scheduler policy must be one of {', '.join(POLICIES)}, got "
                             f"{self.policy!r}")


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new: int  # tokens computed this step, from seq.num_computed on
    # Whether this chunk reaches the end of the sequence, so its last logits are sampled.
    # Fixed when scheduled: the sequence's counters move on while the batch is in flight.
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, num_new: int) -> ScheduledSeq:
        return cls(seq, num_new,
                   seq.num_computed + num_new == seq.num_tokens + seq.num_pending)


@dataclass(slots=True)
class ScheduledBatch:
    entries: list[ScheduledSeq]
    # Entries whose block table may have grown in this schedule (admitted, or given a new
    # block): the only ones whose table changes the plan must carry.
    grown: list[int] = field(default_factory=list)
    # KV copies every rank makes before this step's forward, swap-outs first:
    # (device block, host slot) and (host slot, device block) pairs.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new for e in self.entries)


RUNNING = SequenceStatus.RUNNING


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: KVBlockAllocator) -> None:
        self.config = config
        self.allocator = allocator
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order; the newest is last
        self.rows = TableRows(config.table_rows)
        self.num_preemptions = 0
        self.swap_space = HostBlockAllocator(config.host_blocks)
        self.num_swapped_out = 0  # preemptions that swapped (the others recomputed)
        # guaranteed_no_evict: blocks each running sequence may grow to, and their sum
        self._reserved: dict[int, int] = {}
        self.reserved_blocks = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        cfg, alloc = self.config, self.allocator
        budget, entries = cfg.max_num_tokens, []
        grown: list[int] = []
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        scheduled: set[int] = set()
        running = RUNNING
        tables, bs = alloc.tables, alloc.block_size
        overlap, max_len = cfg.overlap, cfg.max_model_len
        for seq in list(self.running):
            if len(entries) == cfg.max_batch_size or budget == 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            nc, nt, pending = seq.num_computed, len(seq.token_ids), seq.num_pending
            # NOTE: an in-flight sequence may join the next batch only under overlap, as a
            # plain decode of its pending token, when it cannot already be known to end there
            # (a length limit). Penalties need no host-side history: the sampler counts the
            # tokens the model read on the device (`runtime/penalties.py`).
            if seq.in_flight and not (
                    overlap and seq.in_flight == 1 and pending == 1 and nc == nt
                    and nt - seq.prompt_len + 1 < seq.params.max_tokens and nt + 1 < max_len):
                continue
            n = nt + pending - nc
            if n > budget:
                n = budget
            table = tables.get(seq.seq_id)
            if table is None or nc + n > len(table) * bs:  # needs a new block
                if seq.in_flight and not alloc.ensure(seq.seq_id, nc + n):
                    continue  # running ahead is optional: never preempt for it
                while not alloc.ensure(seq.seq_id, nc + n):
                    victim = self._newest_preemptible(exclude=scheduled)
                    self._preempt(victim, swap_out)
                    if victim is seq:
                        break
                if seq.status is not running:
                    continue
                grown.append(len(entries))
            entries.append(ScheduledSeq(seq, n, nc + n == nt + pending))
            scheduled.add(seq.seq_id)
            budget -= n
        while (self.waiting and len(entries) < cfg.max_batch_size and budget > 0
               and self.rows.num_free):
            seq = self.waiting[0]
            host = seq.host_blocks
            if host is None and seq.parent is not None and not self._parent_ready(seq):
                break  # its prompt blocks are about to be shared; keep arrival order
            reserve = self._reservation(seq)
            if reserve and self.reserved_blocks + reserve > alloc.num_blocks and self.running:
                break  # would not be guaranteed to finish: wait, keeping arrival order
            fresh = seq.seq_id not in alloc.tables
            if fresh and host is None:
                seq.num_computed = self._admit_blocks(seq)
                seq.num_cached_prompt = seq.num_computed
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not alloc.ensure(seq.seq_id, seq.num_computed + n):
                if fresh:
                    alloc.free_seq(seq.seq_id)
                    if host is None:
                        seq.num_computed = 0
                break
            if host is not None:  # swapped out: its KV comes back into fresh blocks
                swap_in.extend(zip(host, alloc.tables[seq.seq_id]))
                # NOTE: a slot freed here is not taken again in this step (preemption, the
                # only taker, happens above), so the swap-outs never overwrite a slot that
                # a swap-in of the same step still reads
                self.swap_space.release(host)
                seq.host_blocks = None
            self.rows.assign(seq)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if reserve:
                self._reserved[seq.seq_id] = reserve
                self.reserved_blocks += reserve
            grown.append(len(entries))
            entries.append(ScheduledSeq.of(seq, n))
            budget -= n
        if not entries:
            # NOTE: no plan carries this step's swap-outs (a sequence that preempted itself
            # and nothing else to run): their blocks are already free, so they recompute
            if swap_out:
                self._unswap(swap_out)
            return None
        return ScheduledBatch(entries, grown, swap_out, swap_in)

    def _unswap(self, swap_out: list[tuple[int, int]]) -> None:
        slots = {h for _, h in swap_out}
        for seq in self.waiting:
            if seq.host_blocks is not None and seq.host_blocks[0] in slots:
                self.swap_space.release(seq.host_blocks)
                seq.host_blocks = None
                seq.num_computed = 0
                self.num_swapped_out -= 1

    def _reservation(self, seq: Sequence) -> int:
        """guaranteed_no_evict: the blocks `seq` holds at its longest (0 under
        max_utilization). A sequence longer than the whole pool reserves the pool."""
        if self.config.policy != "guaranteed_no_evict":
            return 0
        longest = min(seq.prompt_len + seq.params.max_tokens, self.config.max_model_len)
        return min(-(-longest // self.allocator.block_size), self.allocator.num_blocks)

    def _unreserve(self, seq: Sequence) -> None:
        self.reserved_blocks -= self._reserved.pop(seq.seq_id, 0)

    def _parent_ready(self, seq: Sequence) -> bool:
        p = seq.parent
        assert p is not None
        # NOTE: its prompt's blocks are registered for reuse once the step that computed
        # them came back (num_computed moves at launch), i.e. when it has its first token.
        return p.is_finished or p.num_output > 0 or p.seq_id not in self.allocator.tables

    def _admit_blocks(self, seq: Sequence) -> int:
        alloc = self.allocator
        p = seq.parent
        if (p is not None and not alloc.enable_prefix_caching and p.seq_id in alloc.tables
                and p.num_computed >= p.prompt_len):
            return alloc.fork(p.seq_id, seq.seq_id, seq.num_tokens - 1)
        # NOTE: a prompt whose logprobs are wanted is computed in full: cached blocks would
        # skip the positions that score it.
        return alloc.allocate_prefix(seq.seq_id, seq.token_ids,
                                     reuse=not seq.wants_prompt_logprobs)

    def _newest_preemptible(self, exclude: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if not seq.in_flight and seq.seq_id not in exclude:
                return seq
        raise AssertionError("no sequence can be preempted")  # the caller itself always can

    def _preempt(self, seq: Sequence, swap_out: list[tuple[int, int]]) -> None:
        """Free `seq`'s blocks and requeue it first: swapped out to host slots when they
        are free (its blocks' copies appended to `swap_out`), else to be recomputed."""
        self._unreserve(seq)
        alloc = self.allocator
        k = alloc.blocks_for(seq.num_computed)
        host = self.swap_space.take(k) if k else None
        if host is not None:
            # NOTE: the blocks are handed out again in this step; every rank copies them
            # out before the step's forward writes them (plan order, one stream)
            swap_out.extend(zip(alloc.tables[seq.seq_id], host))
            seq.host_blocks = host
            self.num_swapped_out += 1
        else:
            seq.num_computed = 0
        alloc.free_seq(seq.seq_id)
        self.running.remove(seq)
        self.rows.release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished and return its blocks (also used for aborts)."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self._unreserve(seq)
        if seq.host_blocks is not None:  # aborted while swapped out
            self.swap_space.release(seq.host_blocks)
            seq.host_blocks = None
        if seq.row >= 0:  # running (only running sequences hold rows)
            self.running.remove(seq)
            self.rows.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if not seq.in_flight:
            self.allocator.free_seq(seq.seq_id)

    def release_in_flight(self, seq: Sequence) -> None:
        """A finished (aborted) sequence's batch came back: now its blocks can go."""
        seq.in_flight -= 1
        if seq.is_finished and not seq.in_flight:
            self.allocator.free_seq(seq.seq_id)
