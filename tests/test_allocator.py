"""KVBlockAllocator: prefix reuse, LRU eviction, and property tests over random operations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trtdist.runtime.block_allocator import KVBlockAllocator


def test_prefix_reuse_and_last_token_left_to_compute() -> None:
    a = KVBlockAllocator(16, 4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert a.allocate_prefix(1, prompt) == 0
    assert a.ensure(1, 10)
    a.register(1, prompt, 10)
    assert a.allocate_prefix(2, prompt) == 8  # both full blocks reused
    assert a.table(2) == a.table(1)[:2]
    assert a.prefix_hits == 2
    exact = list(range(8))  # all blocks full: the last block is recomputed, not reused
    assert a.allocate_prefix(3, exact) == 4
    for s in (1, 2, 3):
        a.free_seq(s)
    a.check_invariants()
    assert a.num_free == 16


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    a = KVBlockAllocator(4, 2)
    a.allocate_prefix(1, [1, 2, 3, 4, 5])
    a.ensure(1, 5)
    a.register(1, [1, 2, 3, 4, 5], 5)
    a.free_seq(1)
    assert a.num_free == 4
    assert a.allocate_prefix(2, [1, 2, 3, 4, 9]) == 4  # still cached after free
    a.free_seq(2)
    a.allocate_prefix(3, [7, 7, 7, 7, 7, 7, 7])
    assert a.ensure(3, 7)  # takes every block: the cached ones are evicted
    a.free_seq(3)
    assert a.allocate_prefix(4, [1, 2, 3, 4, 5]) == 0
    a.free_seq(4)
    a.check_invariants()


def test_ensure_is_all_or_nothing() -> None:
    a = KVBlockAllocator(3, 4)
    a.allocate_prefix(1, [1])
    assert a.ensure(1, 8)
    assert not a.ensure(1, 16)
    assert len(a.table(1)) == 2 and a.num_free == 1


def test_fork_shares_full_blocks() -> None:
    a = KVBlockAllocator(8, 4, enable_prefix_caching=True)
    toks = list(range(10))
    a.allocate_prefix(1, toks)
    a.ensure(1, 10)
    a.register(1, toks, 10)
    assert a.fork(1, 2, max_tokens=9) == 8
    assert a.ref_counts[a.table(1)[0]] == 2
    a.free_seq(1)
    a.free_seq(2)
    a.check_invariants()
    assert a.num_free == 8


ops = st.lists(st.tuples(st.sampled_from(["add", "grow", "fork", "abort", "finish"]),
                         st.integers(0, 7), st.integers(1, 40), st.integers(0, 3)),
               max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, caching=st.booleans())
def test_no_double_ownership_no_leaks(ops: list[tuple[str, int, int, int]],
                                      caching: bool) -> None:
    a = KVBlockAllocator(12, 4, enable_prefix_caching=caching)
    seqs: dict[int, list[int]] = {}  # seq -> tokens
    computed: dict[int, int] = {}
    for op, sid, n, vocab in ops:
        if op == "add" and sid not in seqs:
            toks = [(i * (vocab + 1)) % 5 for i in range(n)]  # repetitive: prefix hits
            computed[sid] = a.allocate_prefix(sid, toks)
            seqs[sid] = toks
            assert computed[sid] < len(toks)
        elif op == "grow" and sid in seqs:
            toks = seqs[sid]
            target = min(len(toks), computed[sid] + n)
            if a.ensure(sid, target):
                computed[sid] = target
                a.register(sid, toks, target)
                toks.append(vocab)
        elif op == "fork" and sid in seqs:
            child = sid + 100
            if child not in seqs:
                shared = a.fork(sid, child, len(seqs[sid]) - 1)
                seqs[child], computed[child] = list(seqs[sid]), shared
        elif op in ("abort", "finish") and sid in seqs:
            a.free_seq(sid)
            del seqs[sid], computed[sid]
        a.check_invariants()
        # a block referenced by two sequences must hold the same (full, computed) prefix
        owners: dict[int, list[int]] = {}
        for s, table in a.tables.items():
            for i, b in enumerate(table):
                owners.setdefault(b, []).append((s, i))
        for b, refs in owners.items():
            if len(refs) > 1:
                prefixes = {tuple(seqs[s][:(i + 1) * 4]) for s, i in refs}
                assert len(prefixes) == 1, f"block {b} shared by different prefixes"
                assert all(computed[s] >= (i + 1) * 4 for s, i in refs)
    for s in list(seqs):
        a.free_seq(s)
    a.check_invariants()
    assert a.num_free == a.num_blocks and all(c == 0 for c in a.ref_counts)


def test_null_block_is_never_handed_out() -> None:
    a = KVBlockAllocator(3, 4, enable_prefix_caching=False)
    a.allocate_prefix(1, [1])
    assert a.ensure(1, 12)  # every usable block
    assert sorted(a.table(1)) == [1, 2, 3] and a.num_free == 0
    assert not a.ensure(1, 13)
    a.free_seq(1)
    a.check_invariants()
    assert a.num_free == a.num_blocks == 3
