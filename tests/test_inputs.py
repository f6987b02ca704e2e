"""Static step inputs (runtime/inputs.py) and the CUDA-graph bucket ladder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trtdist.runtime.graph_runner import graph_batch_sizes, padded_decode_plan, pick_bucket
from trtdist.runtime.inputs import StepInputs
from trtdist.runtime.plan import FORWARD, RETURN_ALL_LOGITS, StepPlan


def _random_plan(rng: np.random.Generator, bs: int, width: int, decode: bool) -> StepPlan:
    s = int(rng.integers(1, 7))
    q = np.ones(s, np.int64) if decode else rng.integers(1, 9, s)
    ctx = q + rng.integers(0, width * bs - 9, s)
    mb = int((-(-ctx // bs)).max())
    tables = np.zeros((s, mb), np.int64)
    for i in range(s):
        n = -(-int(ctx[i]) // bs)
        tables[i, :n] = rng.choice(np.arange(1, 200), n, replace=False)
    pos = np.concatenate([np.arange(c - n, c) for n, c in zip(q, ctx)])
    sample = rng.integers(0, 2, s)
    return StepPlan(FORWARD, rng.integers(0, 300, int(q.sum())), pos, q, ctx, tables,
                    sample=sample)


def _old_metadata(plan: StepPlan, bs: int) -> dict[str, np.ndarray]:
    """What ModelRunner._metadata computed before the static inputs (the oracle)."""
    seq_of_token = np.repeat(np.arange(plan.num_seqs), plan.query_lens)
    pos = plan.positions
    slots = plan.block_tables[seq_of_token, pos // bs] * bs + pos % bs
    qsl = np.concatenate([[0], np.cumsum(plan.query_lens)])
    rows = np.nonzero(plan.sample)[0]
    return {"slots": slots, "qsl": qsl, "last": qsl[1:][rows] - 1}


@pytest.mark.parametrize("decode", [False, True])
def test_packing_equals_the_old_metadata(decode: bool) -> None:
    rng = np.random.default_rng(3)
    bs, max_len = 4, 64
    inputs = StepInputs(64, 8, max_len, bs, torch.device("cpu"))
    for _ in range(20):  # reuse the same buffers: stale values must never leak through
        plan = _random_plan(rng, bs, max_len // bs, decode)
        views = inputs.fill(plan)
        old = _old_metadata(plan, bs)
        a, s, t = views.attention, plan.num_seqs, plan.num_tokens
        np.testing.assert_array_equal(views.input_ids.numpy(), plan.input_ids)
        np.testing.assert_array_equal(views.positions.numpy(), plan.positions)
        np.testing.assert_array_equal(a.slot_mapping.numpy(), old["slots"])
        assert a.slot_mapping.dtype == torch.int64 and a.slot_mapping.shape == (t,)
        np.testing.assert_array_equal(a.query_start_loc.numpy(), old["qsl"])
        np.testing.assert_array_equal(a.seq_lens.numpy(), plan.context_lens)
        assert a.block_tables.shape == (s, max_len // bs)
        mb = plan.block_tables.shape[1]
        np.testing.assert_array_equal(a.block_tables[:, :mb].numpy(), plan.block_tables)
        assert not a.block_tables[:, mb:].any()
        assert a.query_lens_host == tuple(plan.query_lens.tolist())
        assert a.seq_lens_host == tuple(plan.context_lens.tolist())
        assert a.is_decode == (t == s) and a.max_seq_len == plan.context_lens.max()
        if views.logits_rows is None:  # decode with every sequence sampled: all rows
            assert t == s and plan.sample.all()
        else:
            np.testing.assert_array_equal(views.logits_rows.numpy(), old["last"])


def test_padding_rows_point_at_the_null_block() -> None:
    bs = 4
    inputs = StepInputs(32, 8, 32, bs, torch.device("cpu"))
    inputs.fill(_random_plan(np.random.default_rng(0), bs, 8, decode=False))  # dirty buffers
    plan = StepPlan(FORWARD, np.array([5, 6, 7]), np.array([3, 9, 0]), np.ones(3, np.int64),
                    np.array([4, 10, 1]), np.array([[2, 0, 0], [3, 4, 5], [6, 0, 0]]))
    views = inputs.fill(plan, pad_to=8)
    a = views.attention
    assert views.input_ids.tolist() == [5, 6, 7, 0, 0, 0, 0, 0]
    assert views.positions.tolist() == [3, 9, 0, 0, 0, 0, 0, 0]
    assert a.slot_mapping.tolist() == [11, 21, 24, -1, -1, -1, -1, -1]
    assert a.seq_lens.tolist() == [4, 10, 1, 0, 0, 0, 0, 0]
    assert a.query_start_loc.tolist() == list(range(9))
    assert a.block_tables.shape == (8, 8) and not a.block_tables[3:].any()
    assert a.block_tables[1, :3].tolist() == [3, 4, 5]
    assert views.logits_rows is not None and views.logits_rows.tolist() == [0, 1, 2]


def test_padding_needs_a_decode_step_that_fits() -> None:
    inputs = StepInputs(32, 8, 32, 4, torch.device("cpu"))
    prefill = StepPlan(FORWARD, np.arange(3), np.arange(3), np.array([3]), np.array([3]),
                       np.array([[1]]))
    with pytest.raises(ValueError, match="decode step"):
        inputs.fill(prefill, pad_to=4)
    with pytest.raises(ValueError, match="decode step"):
        inputs.fill(padded_decode_plan(5), pad_to=4)


def test_oversized_steps_are_refused_with_the_limits_named() -> None:
    inputs = StepInputs(8, 2, 16, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="max_num_tokens"):
        inputs.fill(padded_decode_plan(3))
    wide = StepPlan(FORWARD, np.arange(1), np.arange(1), np.array([1]), np.array([1]),
                    np.ones((1, 5), np.int64))
    with pytest.raises(ValueError, match="fixed width 4"):
        inputs.fill(wide)


def test_all_logits_flag_asks_for_every_row() -> None:
    inputs = StepInputs(16, 4, 16, 4, torch.device("cpu"))
    plan = StepPlan(FORWARD, np.arange(5), np.arange(5), np.array([5]), np.array([5]),
                    np.array([[1, 2]]), RETURN_ALL_LOGITS)
    assert inputs.fill(plan).logits_rows is None


def test_bucket_ladder() -> None:
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(6) == (1, 2, 4, 6)
    assert graph_batch_sizes(20) == (1, 2, 4, 8, 16, 20)
    ladder = graph_batch_sizes(256)
    assert ladder[:6] == (1, 2, 4, 8, 16, 24) and ladder[-1] == 256
    assert all(b - a == 8 for a, b in zip(ladder[4:], ladder[5:]))
    big = graph_batch_sizes(300)
    assert big[-3:] == (272, 288, 300)
    assert graph_batch_sizes(64, [16, 1, 4, 4]) == (1, 4, 16)
    with pytest.raises(ValueError, match="max_batch_size 8"):
        graph_batch_sizes(8, [1, 16])
    with pytest.raises(ValueError, match="CUDA-graph batch sizes"):
        graph_batch_sizes(8, [])


def test_decode_steps_pick_the_smallest_bucket_that_holds_them() -> None:
    sizes = graph_batch_sizes(20)  # 1, 2, 4, 8, 16, 20
    assert [pick_bucket(sizes, padded_decode_plan(s)) for s in (1, 2, 3, 5, 8, 9, 17, 20)] == [
        1, 2, 4, 8, 8, 16, 20, 20]
    assert pick_bucket(sizes, padded_decode_plan(21)) is None  # larger than every bucket
    assert pick_bucket(sizes, padded_decode_plan(0)) is None
    prefill = StepPlan(FORWARD, np.arange(3), np.arange(3), np.array([3]), np.array([3]),
                       np.array([[1]]))
    assert pick_bucket(sizes, prefill) is None
    all_logits = StepPlan(FORWARD, np.arange(1), np.arange(1), np.array([1]), np.array([1]),
                          np.array([[1]]), RETURN_ALL_LOGITS)
    assert pick_bucket(sizes, all_logits) is None
