"""Sampler: each mode against the previous implementation's distribution (chi-square), seeds
that ignore batch composition, greedy exactness, penalties equal to the reference's, logprobs,
and no host sync in a step besides the one copy of the results."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _reference.sampler import ReferenceSampler
from torch.overrides import TorchFunctionMode

from trtdist.runtime.plan import FORWARD, StepPlan
from trtdist.runtime.random_hash import uniform
from trtdist.runtime.sampler import Sampler

CPU = torch.device("cpu")
# chi-square critical values at alpha = 0.001 by degrees of freedom (standard tables)
_CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
             9: 27.88, 10: 29.59, 11: 31.26, 12: 32.91, 13: 34.53, 14: 36.12, 15: 37.70}


def _plan(rows: list[dict], history: list[list[int]] | None = None,
          **extra: np.ndarray) -> StepPlan:
    """One sequence per row; each feeds its `history` (default one token) this step."""
    history = history or [[1]] * len(rows)
    s = len(rows)
    ids = np.concatenate([np.array(h, dtype=np.int64) for h in history])
    start = [r.get("start", 0) for r in rows]
    pos = np.concatenate([np.arange(len(h)) + p for h, p in zip(history, start)]).astype(np.int64)
    q = np.array([len(h) for h in history], dtype=np.int64)
    floats = np.array([[r.get("temperature", 1.0), r.get("top_p", 1.0), r.get("min_p", 0.0),
                        r.get("rep", 1.0), r.get("pres", 0.0), r.get("freq", 0.0)]
                       for r in rows])
    ints = lambda k, d: np.array([r.get(k, d) for r in rows], dtype=np.int64)  # noqa: E731
    sids = ints("sid", -1)
    sids = np.where(sids < 0, np.arange(s), sids)
    return StepPlan(FORWARD, ids, pos, q, q + np.array(start), np.zeros((s, 1), dtype=np.int64),
                    seq_ids=sids, prompt_lens=ints("prompt_len", 1),
                    sample=np.ones(s, dtype=np.int64), top_k=ints("top_k", 0),
                    seeds=ints("seed", -1), logprobs=ints("logprobs", -1), floats=floats,
                    **extra)


def _sample(logits: torch.Tensor, rows: list[dict], history: list[list[int]] | None = None,
            seed: int = 0) -> np.ndarray:
    sampler = Sampler(CPU, seed=seed)
    plan = _plan(rows, history)
    sampler.observe(plan)
    return sampler.sample(logits.clone(), plan, np.arange(len(rows)))


def _reference(logits: torch.Tensor, rows: list[dict], history: list[list[int]] | None = None,
               seed: int = 0) -> np.ndarray:
    sampler = ReferenceSampler(CPU)
    sampler._generator.manual_seed(seed)
    plan = _plan(rows, history)
    sampler.observe(plan)
    return sampler.sample(logits.clone(), plan, np.arange(len(rows)))


def chi_square_same(a: np.ndarray, b: np.ndarray, vocab: int) -> tuple[float, float]:
    """(statistic, critical value at alpha 0.001) of the two-sample chi-square test that the
    token draws `a` and `b` come from one distribution (cells empty in both are dropped)."""
    ca = np.bincount(a, minlength=vocab).astype(float)
    cb = np.bincount(b, minlength=vocab).astype(float)
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    na, nb = ca.sum(), cb.sum()
    pooled = (ca + cb) / (na + nb)
    stat = float((((ca - na * pooled) ** 2) / (na * pooled)).sum()
                 + (((cb - nb * pooled) ** 2) / (nb * pooled)).sum())
    return stat, _CHI2_999[max(int(keep.sum()) - 1, 1)]


_LOGITS = torch.log(torch.tensor([0.30, 0.20, 0.15, 0.12, 0.09, 0.07, 0.05, 0.02]))
_DRAWS = 6000
_MODES = {
    "temperature 1": {},
    "temperature 0.6": {"temperature": 0.6},
    "temperature 1.7": {"temperature": 1.7},
    "top_k 3": {"top_k": 3},
    "top_p 0.6": {"top_p": 0.6},
    "min_p 0.3": {"min_p": 0.3},
    "top_k 5 top_p 0.8 min_p 0.1 t 0.8": {"top_k": 5, "top_p": 0.8, "min_p": 0.1,
                                          "temperature": 0.8},
    "penalties": {"rep": 1.5, "pres": 0.4, "freq": 0.3, "prompt_len": 2},
}


_UNFILTERED = {"temperature 1", "temperature 0.6", "temperature 1.7", "penalties"}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("path", ["topk", "sort", "direct"])
def test_each_mode_matches_the_reference_distribution(mode: str, path: str) -> None:
    """`path`: the batch makes the sampler take topk (every row has a top_k), the full sort
    (an extra, uncounted row filters without top_k) or, for rows that filter nothing, the
    Gumbel-max over the whole vocabulary."""
    if path == "direct" and mode not in _UNFILTERED:
        pytest.skip("rows that filter cannot take the unfiltered path")
    row = dict(_MODES[mode])
    if path == "topk" and not row.get("top_k"):
        row["top_k"] = 8  # a top_k that keeps the whole (small) vocabulary
    rows = [row] * _DRAWS
    history = [[3, 0, 3, 5, 5]] * _DRAWS if mode == "penalties" else None
    logits = _LOGITS.repeat(_DRAWS, 1)
    ref = _reference(logits, rows, history, seed=2)[:, 0].astype(int)
    if path == "sort":
        rows = rows + [{"top_p": 0.5}]
        history = None if history is None else history + [[1]]
        logits = _LOGITS.repeat(_DRAWS + 1, 1)
    new = _sample(logits, rows, history, seed=1)[:_DRAWS, 0].astype(int)
    assert set(new) == set(ref)  # the same support: filters keep the same tokens
    stat, critical = chi_square_same(new, ref, 8)
    assert stat < critical, f"{mode} ({path}): chi-square {stat:.1f} >= {critical}"


def test_the_chi_square_check_sees_a_different_distribution() -> None:
    logits = _LOGITS.repeat(_DRAWS, 1)
    new = _sample(logits, [{"temperature": 0.8}] * _DRAWS, seed=1)[:, 0].astype(int)
    ref = _reference(logits, [{}] * _DRAWS, seed=2)[:, 0].astype(int)
    stat, critical = chi_square_same(new, ref, 8)
    assert stat > critical


def test_counter_based_noise_is_uniform_and_keyed() -> None:
    ids = torch.arange(50_000).repeat(2, 1)
    u = uniform(torch.tensor([7, 7]), torch.tensor([3, 4]), ids)
    assert 0 < float(u.min()) and float(u.max()) < 1
    counts = np.bincount((u[0].numpy() * 10).astype(int), minlength=10)
    stat = float(((counts - 5000) ** 2 / 5000).sum())
    assert stat < _CHI2_999[9]
    assert not torch.equal(u[0], u[1])  # another position, another stream
    again = uniform(torch.tensor([7]), torch.tensor([3]), torch.tensor([[10, 3, 49_999]]))
    assert torch.equal(again[0], u[0, [10, 3, 49_999]])  # a value depends on its key only


def test_greedy_and_filters_that_leave_one_token() -> None:
    logits = torch.randn(6, 50)
    rows = [{"temperature": 0.0}, {"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0},
            {"temperature": 0.01, "top_k": 3}, {"temperature": 0.0, "top_k": 5}]
    for seed in range(5):
        out = _sample(logits, rows, seed=seed)
        assert out[:, 0].astype(int).tolist() == logits.argmax(-1).tolist()


def test_greedy_is_exact_with_penalties_and_bias() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 40)
    history = [[5, 6, 7, 5], [1, 2], [9, 9, 9], [3]]
    rows = [{"temperature": 0.0, "rep": 1.3, "pres": 0.5, "freq": 0.2, "prompt_len": 2},
            {"temperature": 0.0}, {"temperature": 0.0, "freq": 2.0, "prompt_len": 1},
            {"temperature": 0.0, "rep": 0.5, "prompt_len": 1}]
    plan = _plan(rows, history, bias_counts=np.array([0, 1, 0, 2]),
                 bias_ids=np.array([4, 8, 2]), bias_values=np.array([3.0, -1.0, 2.5]))
    new, ref = Sampler(CPU), ReferenceSampler(CPU)
    new.observe(plan)
    ref.observe(plan)
    got = new.sample(logits.clone(), plan, np.arange(4))
    want = ref.sample(logits.clone(), plan, np.arange(4))
    assert np.array_equal(got[:, 0], want[:, 0])
    assert np.isnan(got[:, 1]).all()  # no logprobs asked: none computed


def test_seeded_rows_ignore_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    seeded = {"seed": 42, "sid": 3}
    for row in ({}, {"top_k": 20}, {"top_p": 0.9, "temperature": 0.7}):
        alone = _sample(logits[3:4], [{**seeded, **row}], seed=5)
        # batched with other seeds, unseeded rows, greedy rows and rows without top_k (so
        # the batch takes the full sort while the row alone may take the topk path)
        others = [{"seed": 7}, {}, {"temperature": 0.0}, {"top_p": 0.5}] * 2
        batch = _sample(logits, [{**seeded, **row} if i == 3 else others[i]
                                 for i in range(8)], seed=6)
        assert alone[0, 0] == batch[3, 0], row
    draws = {int(_sample(logits[3:4], [{"seed": s}])[0, 0]) for s in range(30)}
    assert len(draws) > 5  # different seeds do differ
    # unseeded rows draw from the sampler's own per-step seeds
    assert not np.array_equal(_sample(logits, [{}] * 8, seed=1)[:, 0],
                              _sample(logits, [{}] * 8, seed=2)[:, 0])


def _feed(samplers: tuple[Sampler, ReferenceSampler], logits: torch.Tensor, rows: list[dict],
          history: list[list[int]], released: list[int] | None = None) -> None:
    """Observe one step on both samplers and compare their penalised logits exactly."""
    plan = _plan(rows, history, released=np.array(released or [], dtype=np.int64))
    new, ref = samplers
    logits = logits[:len(rows)]
    new.observe(plan)
    ref.observe(plan)
    got = new.adjusted_logits(logits.clone(), plan, np.arange(len(rows)))
    want = logits.clone()
    ref._apply_penalties(want, plan, np.arange(len(rows)))
    assert torch.equal(got, want), (got - want).abs().max()


def test_penalties_equal_the_reference_over_steps_preemption_and_release() -> None:
    torch.manual_seed(3)
    v = 32
    logits = torch.randn(3, v) * 3
    samplers = (Sampler(CPU, vocab_size=v), ReferenceSampler(CPU))
    pen = [{"rep": 1.7, "pres": 0.6, "freq": 0.35, "prompt_len": 6, "sid": 10},
           {"temperature": 0.5, "sid": 11, "prompt_len": 4},  # no penalty
           {"rep": 0.8, "freq": 1.0, "prompt_len": 4, "sid": 12}]
    a, b, c = [4, 4, 9, 1, 0, 3], [7, 7, 8, 2], [5, 31, 5, 6]
    # prefill in chunks: 4 then 2 tokens of seq 10; the others whole
    _feed(samplers, logits, pen, [a[:4], b, c])
    _feed(samplers, logits, [{**pen[0], "start": 4}, {**pen[1], "start": 4},
                             {**pen[2], "start": 4}], [a[4:], [3], [5]])
    out = [[9], [1], [9]]  # decode steps feed sampled tokens back
    for step in range(4):
        _feed(samplers, logits, [{**pen[0], "start": 6 + step}, {**pen[1], "start": 5 + step},
                                 {**pen[2], "start": 5 + step}],
              [[out[0][-1]], [out[1][-1]], [out[2][-1]]])
        for o, t in zip(out, (3 + step, 4, 9 - step)):
            o.append(t % v)
    # seq 10 is preempted and recomputed from position 0 (prompt + outputs fed so far)
    full = a + out[0][:-1]
    _feed(samplers, logits, [pen[0]], [full])
    # seq 12 recomputed from a cached prefix: the chunk starts at position 3
    full_c = c + [5] + out[2][:-1]
    _feed(samplers, logits, [{**pen[2], "start": 3}], [full_c[3:]])
    # seq 12 released, its id reused by a new sequence with other tokens
    _feed(samplers, logits, [{**pen[2], "prompt_len": 3}], [[1, 1, 2]], released=[12])
    assert samplers[0].penalties is not None and samplers[0].penalties.capacity >= 2


def test_penalty_state_grows_past_its_rows() -> None:
    torch.manual_seed(4)
    n = 20  # more sequences than the initial rows
    logits = torch.randn(n, 16)
    rows = [{"rep": 1.2, "pres": 0.1 * i, "freq": 0.3, "prompt_len": 2} for i in range(n)]
    history = [[i % 16, (3 * i) % 16, (5 * i) % 16] for i in range(n)]
    _feed((Sampler(CPU, vocab_size=16), ReferenceSampler(CPU)), logits, rows, history)


def test_logprobs_are_the_models() -> None:
    logits = torch.randn(2, 30)
    out = _sample(logits, [{"temperature": 0.0, "logprobs": 3}, {"temperature": 0.0}])
    lp = torch.log_softmax(logits, -1)
    top = lp[0].topk(3)
    assert np.allclose(out[0, 1], lp[0].max().item(), atol=1e-6)
    assert out[0, 2::2].astype(int).tolist() == top.indices.tolist()
    assert np.allclose(out[0, 3::2], top.values.numpy(), atol=1e-6)
    none = _sample(logits, [{"temperature": 0.0}] * 2)
    assert none.shape == (2, 2) and np.isnan(none[:, 1]).all()  # not asked: not computed


def test_prompt_rows_follow_the_sampled_rows() -> None:
    logits = torch.randn(2, 30)
    plan = _plan([{"temperature": 0.0, "logprobs": 1}] * 2)
    prompt = torch.arange(18, dtype=torch.float64).view(3, 6)
    out = Sampler(CPU).sample(logits, plan, np.arange(2), prompt_rows=prompt)
    assert out.shape == (5, 6)
    assert np.array_equal(out[2:], prompt.numpy())
    assert np.array_equal(out[:2, 4:], np.zeros((2, 2)))  # sampled rows padded with zeros


class _Calls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


_SYNCS = {"item", "tolist", "__bool__", "cpu", "__int__", "__float__", "nonzero"}


def test_a_greedy_step_syncs_once_and_skips_softmax_and_sort() -> None:
    """Structural on the CPU: no call that would sync a device, no softmax / sort / topk,
    and exactly one device-to-host copy of the results."""
    logits = torch.randn(16, 64)
    rows = [{"temperature": 0.0, "top_k": 5 * (i % 2), "rep": 1.0 + 0.1 * (i % 3)}
            for i in range(16)]
    sampler = Sampler(CPU)
    plan = _plan(rows, [[i, i + 1] for i in range(16)], bias_counts=np.ones(16, np.int64),
                 bias_ids=np.arange(16), bias_values=np.ones(16))
    sampler.observe(plan)
    with _Calls() as calls:
        out = sampler.sample(logits, plan, np.arange(16))
    assert not _SYNCS & set(calls.names), _SYNCS & set(calls.names)
    assert not {"softmax", "log_softmax", "sort", "topk"} & set(calls.names)
    assert sampler.host_copies == 1 and out.shape == (16, 2)
    # asking for logprobs adds the log-softmax, still no sort
    plan = _plan([{"temperature": 0.0, "logprobs": 2}] * 4)
    with _Calls() as calls:
        sampler.sample(logits[:4], plan, np.arange(4))
    assert calls.names.count("log_softmax") == 1 and "sort" not in calls.names
    assert not _SYNCS & set(calls.names)
    # sampled rows with top_k: topk, no sort, still no sync
    plan = _plan([{"top_k": 4, "seed": i} for i in range(4)])
    with _Calls() as calls:
        sampler.sample(logits[:4], plan, np.arange(4))
    assert "topk" in calls.names and "sort" not in calls.names
    assert not _SYNCS & set(calls.names)
    # sampled rows that filter nothing: neither softmax, nor sort, nor topk
    plan = _plan([{"temperature": 0.7, "seed": i} for i in range(3)] + [{"temperature": 0.0}])
    with _Calls() as calls:
        sampler.sample(logits[:4], plan, np.arange(4))
    assert not {"softmax", "sort", "topk"} & set(calls.names)
    assert not _SYNCS & set(calls.names)


@pytest.mark.gpu
def test_a_cuda_step_has_no_hidden_sync() -> None:
    dev = torch.device("cuda")
    sampler = Sampler(dev, vocab_size=1000)
    logits = torch.randn(32, 1000, device=dev)
    for rows in ([{"temperature": 0.0}] * 32,
                 [{"top_k": 50, "seed": i, "rep": 1.1, "logprobs": 2} for i in range(32)],
                 [{"top_p": 0.9, "pres": 0.5} for _ in range(32)]):
        plan = _plan(rows, [[i, 2 * i] for i in range(32)])
        sampler.observe(plan)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = sampler.sample(logits, plan, np.arange(32))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # torch warns once that the debug mode is a prototype: not a sync of ours
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)
                 and "prototype" not in str(w.message)]
        assert not syncs, syncs
        cpu = Sampler(CPU, vocab_size=1000)
        cpu.observe(plan)
        if rows[0].get("seed") is not None or rows[0].get("temperature", 1.0) == 0.0:
            want = cpu.sample(logits.cpu(), plan, np.arange(32))
            assert np.array_equal(out[:, 0], want[:, 0])  # same keyed noise on both devices


@pytest.mark.gpu
def test_steps_in_flight_keep_their_own_host_buffers() -> None:
    dev = torch.device("cuda")
    sampler = Sampler(dev, vocab_size=500)
    logits = [torch.randn(n, 500, device=dev) for n in (3, 9, 5)]
    plans = [_plan([{"seed": 10 * n + i, "top_k": 7, "logprobs": 1} for i in range(n)])
             for n in (3, 9, 5)]
    pending = [sampler.sample_async(x, p, np.arange(p.num_seqs)) for x, p in zip(logits, plans)]
    got = [step.wait() for step in pending]  # three results in flight at once
    assert sampler._results_ring is not None and len(sampler._results_ring.entries) == 3
    for x, p, g in zip(logits, plans, got):
        want = sampler.sample(x, p, np.arange(p.num_seqs))  # reuses a free slot
        assert np.array_equal(g, want)
    assert sampler._results_ring is not None and len(sampler._results_ring.entries) == 3


def test_penalty_counts_read_fed_back_tokens_on_the_device() -> None:
    """Overlap: a decode input may be a placeholder (-1 - row) for a token sampled on the
    device; the counts then take the ids the model read, not the plan's."""
    torch.manual_seed(5)
    v = 24
    logits = torch.randn(2, v)
    rows = [{"rep": 1.4, "pres": 0.3, "freq": 0.7, "prompt_len": 3, "sid": 4},
            {"rep": 2.0, "freq": 0.5, "prompt_len": 2, "sid": 9}]
    new, ref = Sampler(CPU, vocab_size=v), ReferenceSampler(CPU)
    first = _plan(rows, [[1, 2, 3], [7, 8]])
    for s in (new, ref):
        s.observe(first)
    # step 2 feeds the tokens sampled in step 1 (17 and 5), known to the host only as -1 - r
    decode = [{**rows[0], "start": 3}, {**rows[1], "start": 2}]
    placeholders = _plan(decode, [[-1], [-2]])
    real = _plan(decode, [[17], [5]])
    new.observe(placeholders, torch.tensor([17, 5], dtype=torch.int32))
    ref.observe(real)
    got = new.adjusted_logits(logits.clone(), real, np.arange(2))
    want = logits.clone()
    ref._apply_penalties(want, real, np.arange(2))
    assert torch.equal(got, want)
    later = [{**rows[0], "start": 4}, {**rows[1], "start": 3}]
    with pytest.raises(ValueError, match="placeholder ids"):
        new.observe(_plan(later, [[-1], [-2]]))  # placeholders without the device ids
