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


def test_swap_preemption_keeps_the_kv_and_brings_it_back() -> None:
    """With host slots, the victim's computed blocks are listed for a swap-out, it keeps its
    computed tokens, and on readmission the same slots are listed for a swap-in into its new
    blocks, then released; nothing is recomputed."""
    alloc = KVBlockAllocator(4, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(8, 100, 100, host_blocks=3), alloc)
    a, b = _seq(0, 7), _seq(1, 7)
    s.add(a)
    s.add(b)
    _run(s, s.schedule())
    b_blocks = list(alloc.tables[1])
    batch = s.schedule()  # decode: a and b reach 8 tokens, still 2 blocks each
    assert not batch.swap_out
    _run(s, batch)
    batch = s.schedule()  # a needs a third block: b is swapped out
    assert batch.swap_out == list(zip(b_blocks, [0, 1]))
    assert s.num_preemptions == s.num_swapped_out == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed == 8 and b.host_blocks == [0, 1]
    assert s.swap_space.num_free == 1 and [e.seq for e in batch.entries] == [a]
    _run(s, batch)
    s.finish(a, "stop")
    batch = s.schedule()  # b comes back: its 8 tokens copied in, its 9th computed
    assert [(e.seq, e.num_new) for e in batch.entries] == [(b, 1)]
    assert batch.swap_in == list(zip([0, 1], alloc.tables[1]))
    assert b.host_blocks is None and s.swap_space.num_free == 3
    s.finish(b, "stop")
    assert alloc.num_free == 4
    alloc.check_invariants()


def test_swap_space_too_small_falls_back_to_recompute_and_abort_frees_slots() -> None:
    alloc = KVBlockAllocator(4, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(8, 100, 100, host_blocks=1), alloc)  # b needs 2 slots
    a, b = _seq(0, 7), _seq(1, 7)
    for q in (a, b):
        s.add(q)
    for _ in range(3):
        batch = s.schedule()
        _run(s, batch)
    assert s.num_preemptions == 1 and s.num_swapped_out == 0 and not batch.swap_out
    assert b.num_computed == 0 and b.host_blocks is None
    # an aborted swapped-out sequence gives its slots back
    s2 = Scheduler(SchedulerConfig(8, 100, 100, host_blocks=2),
                   KVBlockAllocator(4, 4, enable_prefix_caching=False))
    c, d = _seq(2, 7), _seq(3, 7)
    for q in (c, d):
        s2.add(q)
    for _ in range(3):
        _run(s2, s2.schedule())
    assert d.host_blocks == [0, 1] and s2.swap_space.num_free == 0
    s2.finish(d, "abort")
    assert d.host_blocks is None and s2.swap_space.num_free == 2 and not s2.waiting


def test_a_swap_out_no_plan_carries_becomes_a_recompute() -> None:
    """A lone sequence that must preempt itself leaves an empty step: no plan carries its
    swap-out, so it is recomputed instead and its slots are free again."""
    alloc = KVBlockAllocator(2, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(8, 100, 100, host_blocks=4), alloc)
    a = _seq(0, 8)
    s.add(a)
    _run(s, s.schedule())
    assert s.schedule() is None
    assert a.host_blocks is None and a.num_computed == 0 and s.swap_space.num_free == 4
    assert s.num_preemptions == 1 and s.num_swapped_out == 0
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


def _finish_done(s: Scheduler, max_tokens: int) -> None:
    for q in list(s.running):
        if q.num_output >= max_tokens:
            s.finish(q, "length")


def _drain(s: Scheduler, max_tokens: int) -> int:
    """Run to completion; returns the largest number of sequences that ran at once."""
    most = 0
    while s.has_work:
        batch = s.schedule()
        assert batch is not None
        most = max(most, len(s.running))
        _run(s, batch)
        _finish_done(s, max_tokens)
    return most


def test_guaranteed_no_evict_never_preempts_and_reserves_max_tokens() -> None:
    """Prompts of 8 tokens and max_tokens 8 in a pool of 12 blocks of 4: max_utilization admits
    all four prompts (2 blocks each) and preempts as they grow to 4 blocks; guaranteed_no_evict
    admits three (3 x 4 blocks = 12) and never preempts."""
    counts = {}
    for policy in ("max_utilization", "guaranteed_no_evict"):
        alloc = KVBlockAllocator(12, 4, enable_prefix_caching=False)
        s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_tokens=100, max_model_len=100,
                                      policy=policy), alloc)
        seqs = [Sequence(i, f"r{i}", 0, list(range(10 * i, 10 * i + 8)), 8,
                         SamplingParams(max_tokens=8), RequestMetrics(0.0)) for i in range(4)]
        for q in seqs:
            s.add(q)
        most = _drain(s, 8)
        assert all(q.num_output == 8 for q in seqs)
        assert alloc.num_free == 12 and s.reserved_blocks == 0
        counts[policy] = (s.num_preemptions, most)
    assert counts["max_utilization"][0] > 0
    assert counts["guaranteed_no_evict"] == (0, 3)


def test_guaranteed_no_evict_releases_on_abort_and_admits_oversized_alone() -> None:
    alloc = KVBlockAllocator(4, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_tokens=100, max_model_len=100,
                                  policy="guaranteed_no_evict"), alloc)
    big = Sequence(0, "r0", 0, list(range(6)), 6, SamplingParams(max_tokens=50),
                   RequestMetrics(0.0))
    small = _seq(1, 3)
    s.add(big)
    s.add(small)
    s.schedule()  # the oversized one runs alone (it reserves the whole pool)
    assert [q.seq_id for q in s.running] == [0] and s.reserved_blocks == 4
    s.finish(big, "abort")
    assert s.reserved_blocks == 0
    s.schedule()
    assert [q.seq_id for q in s.running] == [1]


def test_scheduler_policy_is_validated() -> None:
    import pytest

    with pytest.raises(ValueError, match="max_utilization, guaranteed_no_evict"):
        SchedulerConfig(policy="fifo")
