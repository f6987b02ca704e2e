"""Block tables as persistent rows plus per-step changes (`runtime/block_table.py`): the
wire format, the fill against the whole-table path, and an engine run with preemption,
prefix reuse and chunked prefill in which the rebuilt table always equals the allocator's
view while a decode step's plan stays O(changes)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trtdist import DistributedLLM, SamplingParams
from trtdist.outputs import RequestMetrics
from trtdist.runtime.block_table import TableRows
from trtdist.runtime.inputs import StepInputs
from trtdist.runtime.plan import FORWARD, TABLE_ROWS, StepPlan
from trtdist.runtime.sequence import Sequence

_NO_TABLES = np.zeros((0,), dtype=np.int64)


def _rows_plan(ctx: np.ndarray, rows: np.ndarray, cleared: np.ndarray,
               updates: np.ndarray) -> StepPlan:
    s = ctx.size
    ones = np.ones(s, dtype=np.int64)
    return StepPlan(FORWARD, np.arange(s), ctx - 1, ones, ctx, _NO_TABLES.reshape(s, 0),
                    TABLE_ROWS, rows=rows, cleared_rows=cleared, table_updates=updates)


def test_plan_with_rows_round_trips_and_rejects_mixed_forms() -> None:
    plan = _rows_plan(np.array([5, 9]), np.array([3, 0]), np.array([0]),
                      np.array([[0, 0, 7], [0, 1, 8], [3, 1, 2]]))
    back = StepPlan.decode(plan.encode())
    for name in ("rows", "cleared_rows", "table_updates", "context_lens", "positions"):
        np.testing.assert_array_equal(getattr(back, name), getattr(plan, name))
    assert back.flags == TABLE_ROWS and back.block_tables.shape == (2, 0)
    with pytest.raises(ValueError, match="TABLE_ROWS"):
        StepPlan(FORWARD, np.arange(1), np.arange(1), np.ones(1, np.int64),
                 np.ones(1, np.int64), np.ones((1, 1), np.int64), rows=np.array([0]))
    with pytest.raises(ValueError, match="rows for 2 sequences"):
        _rows_plan(np.array([5, 9]), np.array([3]), _NO_TABLES, np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match=r"\[U, 3\]"):
        _rows_plan(np.array([5]), np.array([0]), _NO_TABLES, np.zeros((2, 2), np.int64))


def test_fill_from_rows_equals_fill_from_whole_tables() -> None:
    """Random tables grown over many steps, rows reused after release: every step's device
    inputs match those of the same step sent as whole tables."""
    rng = np.random.default_rng(0)
    bs, width, rows_n = 4, 8, 6
    by_rows = StepInputs(64, 4, bs * width, bs, torch.device("cpu"), table_rows=rows_n)
    whole = StepInputs(64, 4, bs * width, bs, torch.device("cpu"), table_rows=rows_n)
    tables: dict[int, list[int]] = {}  # row -> blocks (the leader's view)
    sent = np.zeros(rows_n, dtype=np.int64)
    for _ in range(60):
        for r in list(tables):  # release some rows
            if rng.random() < 0.15:
                del tables[r]
        cleared = []
        while len(tables) < 4:  # assign free rows (cleared first)
            r = int(rng.choice([x for x in range(rows_n) if x not in tables]))
            tables[r], sent[r] = [], 0
            cleared.append(r)
        rows = np.array(sorted(tables, key=lambda _: rng.random()), dtype=np.int64)
        updates = []
        for r in rows.tolist():  # grow each table by 0-2 blocks
            for _ in range(int(rng.integers(0, 3))):
                if len(tables[r]) < width:
                    tables[r].append(int(rng.integers(1, 50)))
            if not tables[r]:
                tables[r].append(int(rng.integers(1, 50)))
            updates += [(r, c, tables[r][c]) for c in range(int(sent[r]), len(tables[r]))]
            sent[r] = len(tables[r])
        ctx = np.array([bs * len(tables[r]) - int(rng.integers(0, bs)) for r in rows])
        plan = StepPlan.decode(_rows_plan(ctx, rows, np.array(cleared, dtype=np.int64),
                                          np.array(updates, dtype=np.int64).reshape(-1, 3)
                                          ).encode())
        full = np.zeros((rows.size, max(len(tables[r]) for r in rows)), dtype=np.int64)
        for i, r in enumerate(rows.tolist()):
            full[i, :len(tables[r])] = tables[r]
        ones = np.ones(rows.size, dtype=np.int64)
        a = by_rows.fill(plan).attention
        b = whole.fill(StepPlan(FORWARD, plan.input_ids, plan.positions, ones, ctx,
                                full)).attention
        np.testing.assert_array_equal(a.block_tables.numpy(), b.block_tables.numpy())
        np.testing.assert_array_equal(a.slot_mapping.numpy(), b.slot_mapping.numpy())
        for r in rows.tolist():  # the persistent row: the blocks, then the null block
            assert by_rows.table[r, :len(tables[r])].tolist() == tables[r]
            assert not by_rows.table[r, len(tables[r]):].any()
    bad = _rows_plan(np.array([4]), np.array([rows_n]), _NO_TABLES, np.zeros((0, 3), np.int64))
    with pytest.raises(ValueError, match="outside the persistent table"):
        by_rows.fill(bad)


def test_table_rows_send_only_growth_and_reuse_released_rows() -> None:
    rows = TableRows(2)
    a, b, c = (Sequence(i, f"r{i}", 0, [1, 2, 3], 3, SamplingParams(top_k=5 + i, seed=i),
                        RequestMetrics(0.0)) for i in range(3))
    assert (rows.assign(a), rows.assign(b)) == (0, 1) and rows.num_free == 0
    with pytest.raises(RuntimeError, match="no block-table row"):
        rows.assign(c)
    assert rows.ints[2].tolist() == [5, 6]  # top_k, written once at admission
    cleared, upd = rows.changes(np.array([0, 1]), [[4, 5], [6]])
    assert cleared.tolist() == [0, 1]
    assert upd.tolist() == [[0, 0, 4], [0, 1, 5], [1, 0, 6]]
    cleared, upd = rows.changes(np.array([1, 0]), [[6, 9], [4, 5]])
    assert cleared.size == 0 and upd.tolist() == [[1, 1, 9]]  # only the new block
    rows.release(a)
    assert a.row == -1 and rows.assign(c) == 0
    cleared, upd = rows.changes(np.array([0]), [[7]])
    assert cleared.tolist() == [0] and upd.tolist() == [[0, 0, 7]]


def _prompts(rng: random.Random, count: int, prefix: list[int]) -> list[list[int]]:
    return [prefix + [rng.randrange(4, 380) for _ in range(rng.randint(1, 30))]
            if i % 2 else [rng.randrange(4, 380) for _ in range(rng.randint(2, 60))]
            for i in range(count)]


@pytest.mark.parametrize("overlap", [True, False])
def test_rebuilt_tables_equal_the_allocator_through_preemption_and_prefix_reuse(
        overlap: bool) -> None:
    """A long run with a pool too small for the batch (preemption), a shared prefix
    (prefix reuse), n = 2 completions and a small token budget (chunked prefill): between
    every two steps each running sequence's row of the rank's table equals its allocator
    table, and the outputs equal those of a run that sends whole tables."""
    rng = random.Random(3)
    prefix = [rng.randrange(4, 380) for _ in range(24)]
    prompts = _prompts(rng, 24, prefix)
    params = [SamplingParams(max_tokens=rng.randint(5, 40), temperature=0.0, ignore_eos=True,
                             n=2 if i % 5 == 0 else 1) for i in range(len(prompts))]
    kwargs = dict(device="cpu", block_size=4, num_kv_blocks=60, max_num_tokens=32,
                  max_batch_size=8, max_model_len=128, overlap=overlap)
    with DistributedLLM("tiny", **kwargs) as llm:
        engine = llm.engine
        assert engine is not None
        ids = llm._add(prompts, params)
        outputs = {}
        while engine.has_unfinished:
            for out in engine.step(finished_only=True):
                outputs[out.request_id] = out
            engine.check_block_tables()
            engine.allocator.check_invariants()
        got = [[c.token_ids for c in outputs[r].outputs] for r in ids]
        assert engine.scheduler.num_preemptions > 0, "the pool was meant to be too small"
        assert engine.allocator.prefix_hits > 0
        assert engine.scheduler.rows.num_free == engine.runner.inputs.table.shape[0]
    # the reference: one request at a time (no preemption, no row reuse under load)
    with DistributedLLM("tiny", **kwargs) as llm:
        alone = [[c.token_ids for c in llm.generate([p], [sp])[0].outputs]
                 for p, sp in zip(prompts, params)]
    assert got == alone


def test_decode_plan_bytes_grow_with_changes_not_with_context() -> None:
    """A decode step's plan carries only the blocks that sequences crossing a block
    boundary gained: its size does not depend on how long the contexts are."""
    def decode_step_bytes(prompt_len: int) -> tuple[list[int], list[int]]:
        with DistributedLLM("tiny", device="cpu", block_size=4, max_batch_size=8,
                            max_model_len=256, overlap=False) as llm:
            runner, engine = llm._runner, llm.engine
            assert engine is not None
            seen: list[tuple[int, int]] = []  # (plan bytes, table updates) per decode step
            broadcast = runner.broadcast_plan

            def record(plan: StepPlan | None) -> StepPlan:  # calls through: a spy
                before = runner.plan_bytes
                out = broadcast(plan)
                assert plan is not None
                if 0 < plan.num_seqs == plan.num_tokens:  # decode steps (not the shutdown)
                    seen.append((runner.plan_bytes - before, plan.table_updates.shape[0]))
                return out

            runner.broadcast_plan = record  # type: ignore[method-assign]
            rng = random.Random(prompt_len)
            llm.generate([[rng.randrange(4, 380) for _ in range(prompt_len)]
                          for _ in range(8)],
                         SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        return [b for b, _ in seen], [u for _, u in seen]

    short, short_updates = decode_step_bytes(5)
    long, long_updates = decode_step_bytes(201)  # 51 blocks a sequence (same phase as 5)
    assert len(short) == len(long) >= 10
    # the 8 sequences cross a block boundary together, every 4 steps
    assert max(long_updates) == 8 and long_updates.count(0) >= len(long) // 2
    assert long == short  # the 51-block tables never travel
    # an update is 3 int64 entries; steps without a boundary carry no table bytes at all
    quiet = [b for b, u in zip(long, long_updates) if u == 0]
    busy = [b for b, u in zip(long, long_updates) if u == 8]
    assert max(busy) - min(quiet) == 8 * 3 * 8
