"""Swap preemption's parts: the host slot allocator, the KV pool's copies to host memory and
back (bytes exact, scales included, on CPU and on a GPU with pinned memory), the plan's
wire format, and the validation of `--swap-space`. The scheduler's side is in
test_scheduler.py; whole runs against transformers in test_runtime.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trtdist.kernels.kv_quant import KV_FP8_DTYPE

from trtdist.runtime.block_allocator import HostBlockAllocator
from trtdist.runtime.kv_cache import KVCache
from trtdist.runtime.plan import FORWARD, StepPlan
from trtdist.runtime.rank import RankOptions, swap_slots_that_fit


def test_host_slots_lowest_first_all_or_nothing_and_checked() -> None:
    h = HostBlockAllocator(5)
    assert h.take(2) == [0, 1] and h.take(2) == [2, 3]
    assert h.take(2) is None and h.num_free == 1  # all or nothing
    h.release([0, 1])
    assert h.take(3) == [0, 1, 4]  # the lowest free slots: runs for the copies
    assert h.num_used == 5 and h.peak_used == 5
    with pytest.raises(AssertionError, match="released twice"):
        h.release([2, 2])
    with pytest.raises(ValueError, match="num_slots >= 0"):
        HostBlockAllocator(-1)


def _fill(kv: KVCache, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    pool = kv.data.view(torch.uint8)
    # NOTE: E4M3 bit patterns are compared as bytes, so NaN codes do no harm here
    pool.copy_(torch.randint(0, 255, pool.shape, generator=g, dtype=torch.uint8))
    if kv.scales is not None:
        kv.scales.copy_(torch.rand(kv.scales.shape, generator=g).to(kv.device))


def _block(kv: KVCache, b: int) -> list[torch.Tensor]:
    out = [kv.data.view(torch.uint8)[:, :, b].cpu().clone()]
    if kv.scales is not None:
        out.append(kv.scales[:, :, b].cpu().clone())
    return out


def _round_trip(device: torch.device, dtype: torch.dtype) -> None:
    kv = KVCache(3, 9, 4, 2, 16, dtype, device, host_blocks=6)
    kv.pin_host_async()
    _fill(kv, 0)
    # blocks 2, 5, 3 -> slots 4, 5, 1 (two runs), then the pool is overwritten
    want = {b: _block(kv, b) for b in (2, 5, 3)}
    kv.swap_out(np.array([[2, 4], [5, 5], [3, 1]]))
    if device.type == "cuda":  # page-locked (the copy waited), so copies are asynchronous
        assert kv._pinned and all(host.is_pinned() for _, host in kv._swap_pools)
    _fill(kv, 1)
    untouched = {b: _block(kv, b) for b in range(10) if b not in (7, 1, 9)}
    kv.swap_in(np.array([[4, 7], [5, 1], [1, 9]]))  # into other blocks
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for src, dst in ((2, 7), (5, 1), (3, 9)):
        for got, exp in zip(_block(kv, dst), want[src]):
            assert torch.equal(got, exp), (src, dst)
    for b, parts in untouched.items():  # nothing else moved
        for got, exp in zip(_block(kv, b), parts):
            assert torch.equal(got, exp), b
    assert kv.host_nbytes == 6 * kv.block_bytes
    kv.release()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, KV_FP8_DTYPE])
def test_swap_round_trip_is_bytes_exact_on_cpu(dtype: torch.dtype) -> None:
    _round_trip(torch.device("cpu"), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, KV_FP8_DTYPE])
def test_swap_round_trip_is_bytes_exact_on_gpu(dtype: torch.dtype) -> None:
    _round_trip(torch.device("cuda"), dtype)


def test_plan_carries_swaps_and_checks_their_shape() -> None:
    ones = np.ones(2, dtype=np.int64)
    plan = StepPlan(FORWARD, np.arange(2), np.array([4, 8]), ones, np.array([5, 9]),
                    np.zeros((2, 1), np.int64), swap_out=np.array([[3, 0], [4, 1]]),
                    swap_in=np.array([[7, 2]]))
    back = StepPlan.decode(plan.encode())
    np.testing.assert_array_equal(back.swap_out, plan.swap_out)
    np.testing.assert_array_equal(back.swap_in, plan.swap_in)
    empty = StepPlan.decode(StepPlan(FORWARD, np.arange(2), np.array([4, 8]), ones,
                                     np.array([5, 9]), np.zeros((2, 1), np.int64)).encode())
    assert empty.swap_out.shape == empty.swap_in.shape == (0, 2)
    with pytest.raises(ValueError, match=r"swap_in must be \[N, 2\]"):
        StepPlan(FORWARD, np.arange(2), np.array([4, 8]), ones, np.array([5, 9]),
                 np.zeros((2, 1), np.int64), swap_in=np.array([1, 2, 3]))


def test_swap_space_is_validated_and_sized() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="swap_space must be a number of GiB >= 0"):
            RankOptions(swap_space=bad)
    cpu = torch.device("cpu")
    # the default on CPU is none (the pool is host memory already); an explicit size is
    # slots of the block size, capped at the device pool's blocks
    assert swap_slots_that_fit(1 << 20, cpu, RankOptions(), 1000, 1, 0) == 0
    assert swap_slots_that_fit(1 << 20, cpu, RankOptions(swap_space=0.25), 1000, 1, 0) == 256
    assert swap_slots_that_fit(1 << 20, cpu, RankOptions(swap_space=0.25), 100, 1, 0) == 100
    assert swap_slots_that_fit(1 << 20, cpu, RankOptions(swap_space=0), 100, 1, 0) == 0
    with pytest.raises(ValueError, match=r"rank 3: --swap-space 100000 GiB is more than half"):
        swap_slots_that_fit(1 << 20, cpu, RankOptions(swap_space=100000), 100, 1, 3)


def test_cli_rejects_bad_swap_space(capsys: pytest.CaptureFixture[str]) -> None:
    from trtdist.cli import main

    for bad, msg in (("-1", "expected a number of GiB >= 0, got -1.0"),
                     ("inf", "expected a finite number of GiB >= 0, got 'inf'"),
                     ("lots", "expected a number of GiB >= 0, got 'lots'")):
        with pytest.raises(SystemExit):
            main(["generate", "--prompt", "x", "--swap-space", bad])
        assert msg in capsys.readouterr().err


def test_metrics_count_swaps_and_show_the_swap_space() -> None:
    from prometheus_client import generate_latest

    from trtdist.server.metrics import ServerMetrics

    m = ServerMetrics("tiny")
    m.update_engine(1, 0, 5, 10, 0, 0, 0, 0, preemptions=3, swapped=2, swap_used=7,
                    swap_total=40)
    m.update_engine(1, 0, 5, 10, 0, 0, 0, 0, preemptions=4, swapped=3, swap_used=0,
                    swap_total=40)
    text = generate_latest(m.registry).decode()
    for line in ('trtdist:num_preemptions_total{model_name="tiny"} 4.0',
                 'trtdist:num_swapped_preemptions_total{model_name="tiny"} 3.0',
                 'trtdist:swap_space_used_blocks{model_name="tiny"} 0.0',
                 'trtdist:swap_space_total_blocks{model_name="tiny"} 40.0'):
        assert line in text, line
