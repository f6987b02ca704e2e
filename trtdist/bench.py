"""`trtdist bench`: offline throughput and latency of a batch of synthetic requests (JSON).

All requests arrive at once; the engine decodes exactly `output_len` tokens each. With
`--sweep` each point (a batch size, or a (tp, pp) setting) gets its own world, spawned from
this plain process, and the sweep is plotted. The online benchmark is `trtdist bench serve`.
"""

from __future__ import annotations

import datetime
import json
import random
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from trtdist import device_roofline
from trtdist.benchmarks.metrics import stats
from trtdist.llm import DistributedLLM
from trtdist.runtime.kv_cache import kv_cache_dtype_name
from trtdist.sampling_params import SamplingParams

#: `--sweep NAME=...` names and the DistributedLLM keyword(s) each sets
SWEEP_PARAMS = {"max-batch-size": "max_batch_size", "max-num-tokens": "max_num_tokens",
                "tp-pp": "tp_size,pp_size"}


def run_bench(llm: DistributedLLM, num_requests: int, input_len: int, output_len: int,
              seed: int = 0, roof: dict[str, float] | None = None) -> dict[str, Any]:
    """Leader only: all requests arrive at once; greedy decoding of exactly output_len.

    Latencies are in seconds: `<metric>_s` = {count, mean, std, p50, p90, p99} for TTFT
    (arrival -> first token), TPOT (per request, first -> last token / (tokens - 1)), ITL
    (every gap between consecutive tokens) and E2EL (arrival -> finished).
    """
    engine = llm.engine
    assert engine is not None
    rng = random.Random(seed)
    vocab = engine.model_cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    dev = llm._runner.device
    if roof is None:
        roof = device_roofline.measure(dev) if dev.type == "cuda" else {}
    llm.generate(prompts[: min(4, num_requests)], params)  # warm-up: kernels, allocator
    engine.allocator.reset_prefix_cache()  # random prompts; keep the measured run cold
    steps0 = engine.stats["steps"]
    timer = llm._runner.timer
    timer.enabled = True
    timer.reset()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    timing = timer.summary()
    timer.enabled = False
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    kv = llm._runner.kv
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              and llm.options.device != "cpu" else "cpu")
    m = [o.metrics for o in outs]
    return {
        "benchmark": "offline",
        "model": engine.model_cfg.model_type, "device": device,
        "tp_size": llm.options.tp_size, "pp_size": llm.options.pp_size,
        "max_batch_size": engine.scheduler.config.max_batch_size,
        "num_requests": num_requests, "input_len": input_len, "output_len": output_len,
        "elapsed_s": elapsed, "steps": engine.stats["steps"] - steps0,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + num_requests * input_len) / elapsed,
        "requests_per_s": num_requests / elapsed,
        "ttft_s": stats([x.ttft or 0.0 for x in m]),
        "tpot_s": stats([t for x in m if (t := x.time_per_output_token) is not None]),
        "itl_s": stats([b - a for x in m for a, b in zip(x.token_times, x.token_times[1:])]),
        "e2el_s": stats([x.finished_time - x.arrival_time for x in m
                         if x.finished_time is not None]),
        "kv_blocks": engine.allocator.num_blocks, "preemptions": engine.scheduler.num_preemptions,
        # of which swapped to host memory (the rest recomputed), and the swap slots there were
        "swapped": engine.scheduler.num_swapped_out, "swap_slots": kv.host_blocks,
        "swap_slots_peak": engine.scheduler.swap_space.peak_used,
        "swap_slot_bytes": kv.block_bytes,
        "scheduler_policy": engine.scheduler.config.policy,
        "kv_cache_dtype": kv_cache_dtype_name(kv.dtype), "kv_bytes_per_block": kv.block_bytes,
        # decode batch sizes with a captured CUDA graph on the leader (0: decode ran eagerly)
        "cuda_graphs": len(llm._runner.graphs.graphs) if llm._runner.graphs else 0,
    } | timing | device_roofline.bench_fields(
        roof, sum(p.numel() * p.element_size() for p in llm._runner.model.parameters()),
        [t for o in outs if (t := o.metrics.time_per_output_token) is not None], num_requests)


@dataclass(frozen=True, slots=True)
class Sweep:
    """`--sweep max-batch-size=1,8,64` or `--sweep tp-pp=1x1,2x1,1x2`."""

    name: str
    values: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> Sweep:
        name, sep, rest = text.partition("=")
        values = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not sep or name not in SWEEP_PARAMS or not values:
            raise ValueError(f"--sweep wants NAME=V1,V2,... with NAME one of "
                             f"{', '.join(SWEEP_PARAMS)} (tp-pp values as TPxPP, e.g. 2x1); "
                             f"got {text!r}")
        sweep = Sweep(name, values)
        for v in values:
            sweep.overrides(v)  # validate all before any world starts
        return sweep

    def overrides(self, value: str) -> dict[str, int]:
        """The DistributedLLM keywords of one sweep value."""
        try:
            if self.name == "tp-pp":
                tp, pp = (int(x) for x in value.lower().split("x"))
                nums = {"tp_size": tp, "pp_size": pp}
            else:
                nums = {SWEEP_PARAMS[self.name]: int(value)}
        except ValueError:
            form = "TPxPP such as 2x1" if self.name == "tp-pp" else "a positive integer"
            raise ValueError(f"--sweep {self.name}: expected {form}, got {value!r}") from None
        if any(n < 1 for n in nums.values()):
            raise ValueError(f"--sweep {self.name}: values must be positive, got {value!r}")
        return nums


def _write(result: dict[str, Any], output: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text + "\n")


def run_sweep(llm_kwargs: dict[str, Any], sweep: Sweep, num_requests: int, input_len: int,
              output_len: int) -> dict[str, Any]:
    """One world per sweep value, spawned from this (plain, single-rank) process."""
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    points = []
    for value in sweep.values:
        kwargs = llm_kwargs | sweep.overrides(value)
        with DistributedLLM(**kwargs) as llm:
            points.append(run_bench(llm, num_requests, input_len, output_len))
    return {"benchmark": "offline-sweep",
            "date": date, "command": shlex.join(["trtdist", *sys.argv[1:]]),
            "sweep": {"parameter": sweep.name, "values": list(sweep.values)},
            "points": points, "plots": []}


def bench_main(llm_kwargs: dict[str, Any], num_requests: int, input_len: int, output_len: int,
               output: str | None, sweep: str | None = None,
               plot_prefix: str | None = None) -> int:
    if sweep is not None:
        from mpi4py import MPI

        from trtdist.benchmarks.plots import plot_sweep, require_matplotlib

        parsed = Sweep.parse(sweep)
        require_matplotlib()
        if MPI.COMM_WORLD.Get_size() > 1:
            raise ValueError("run `trtdist bench --sweep` from a plain process, not under "
                             "mpirun: each sweep point spawns its own world of tp*pp ranks")
        result = run_sweep(llm_kwargs, parsed, num_requests, input_len, output_len)
        prefix = plot_prefix or (str(Path(output).with_suffix("")) if output else "bench_sweep")
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        path = plot_sweep(result["points"], list(parsed.values), parsed.name,
                          f"{prefix}_sweep.png",
                          title=f"trtdist bench --sweep {sweep} ({result['date']})")
        result["plots"] = [str(path)]
        _write(result, output)
        return 0
    roof = _leader_roofline(llm_kwargs)
    start = time.perf_counter()
    llm = DistributedLLM(**llm_kwargs)
    startup = time.perf_counter() - start
    if not llm.is_leader:
        return 0
    with llm:
        result = run_bench(llm, num_requests, input_len, output_len, roof=roof)
    result["startup_s"] = startup  # load, warm-up and graph capture, to ready
    _write(result, output)
    return 0


def _leader_roofline(llm_kwargs: dict[str, Any]) -> dict[str, float] | None:
    """The leader's GPU ceilings, measured before anything is loaded (the whole memory is
    free, so the copy is large enough to be honest). None: measure later, or not on CUDA."""
    from mpi4py import MPI

    from trtdist.launch.env import discover_rank

    if llm_kwargs.get("device") == "cpu" or not torch.cuda.is_available():
        return None
    world = MPI.COMM_WORLD
    if world.Get_rank() != 0:
        return None
    info = discover_rank(mpi_rank=0, mpi_size=world.Get_size())
    device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return device_roofline.measure(device)
