"""Scheduler: token budget, batch size, FCFS, chunked prefill, preemption, abort."""

from __future__ import annotations

from trtdist.outputs import RequestMetrics
from trtdist.runtime.block_allocator import KVBlockAllocator
from trtdist.runtime.scheduler import Scheduler, SchedulerConfig
from trtdist.runtime.sequence import Sequence, SequenceStatus
from trtdist.sampling_params import SamplingParams


def _seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(i, f"r{i}", 0, list(range(100 + i, 100 + i + prompt_len)), prompt_len,
                    SamplingParams(), RequestMetrics(0.0))


def _run(s: Scheduler, batch) -> None:  # type: ignore[no-untyped-def]
    """Pretend the step ran: advance computed tokens, append a token where sampled."""
    for e in batch.entries:
        e.seq.num_computed += e.num_new
        if e.seq.num_computed == e.seq.num_tokens:
            e.seq.token_ids.append(7)


def test_token_budget_chunks_prefill_and_decodes_go_first() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_tokens=10, max_model_len=100),
                  KVBlockAllocator(64, 4, enable_prefix_caching=False))
    a, b = _seq(0, 6), _seq(1, 12)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert [(e.seq.seq_id, e.num_new) for e in batch.entries] == [(0, 6), (1, 4)]
    assert batch.entries[0].samples and not batch.entries[1].samples
    _run(s, batch)
    batch = s.schedule()  # a decodes (1 token) first, then b's next chunk
    assert [(e.seq.seq_id, e.num_new) for e in batch.entries] == [(0, 1), (1, 8)]
    assert batch.entries[1].samples


def test_batch_size_limit_and_fcfs() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=2, max_num_tokens=100, max_model_len=100),
                  KVBlockAllocator(64, 4))
    seqs = [_seq(i, 3) for i in range(4)]
    for q in seqs:
        s.add(q)
    batch = s.schedule()
    assert [e.seq.seq_id for e in batch.entries] == [0, 1]
    assert [q.seq_id for q in s.waiting] == [2, 3]


def test_preempts_newest_when_blocks_run_out_and_recovers() -> None:
    alloc = KVBlockAllocator(4, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_tokens=100, max_model_len=100),
                  alloc)
    a, b = _seq(0, 7), _seq(1, 7)  # 2 blocks each: the pool is full after both prefill
    s.add(a)
    s.add(b)
    _run(s, s.schedule())
    assert alloc.num_free == 0
    for _ in range(2):
        batch = s.schedule()
        _run(s, batch)
    # a needed a third block at token 9: b (the newest) was preempted and requeued
    assert s.num_preemptions == 1 and b.status is SequenceStatus.WAITING and b.num_computed == 0
    assert s.waiting[0] is b
    s.finish(a, "stop")
    batch = s.schedule()  # b is recomputed from its prompt and generated tokens
    assert batch.entries[0].seq is b and batch.entries[0].num_new == b.num_tokens
    s.finish(b, "stop")
    assert alloc.num_free == 4
    alloc.check_invariants()


def test_single_sequence_preempts_itself_rather_than_crash() -> None:
    alloc = KVBlockAllocator(2, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(8, 100, 100), alloc)
    a = _seq(0, 8)
    s.add(a)
    _run(s, s.schedule())
    assert s.schedule() is None  # needs a third block; none exists; it waits, nothing breaks
    assert a.status is SequenceStatus.WAITING
    alloc.check_invariants()


def test_abort_frees_blocks_anywhere() -> None:
    alloc = KVBlockAllocator(16, 4)
    s = Scheduler(SchedulerConfig(8, 100, 100), alloc)
    a, b = _seq(0, 9), _seq(1, 9)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())
    s.finish(a, "abort")
    s.finish(b, "abort")
    assert not s.running and not s.waiting and alloc.num_free == 16
