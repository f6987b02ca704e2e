"""`trtdist bench`: offline throughput and latency of a batch of synthetic requests (JSON)."""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

import torch

from trtdist import device_roofline
from trtdist.llm import DistributedLLM
from trtdist.sampling_params import SamplingParams


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)

    def q(p: float) -> float:
        return values[min(len(values) - 1, int(p * len(values)))]

    return {"mean": statistics.fmean(values), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


def run_bench(llm: DistributedLLM, num_requests: int, input_len: int, output_len: int,
              seed: int = 0) -> dict[str, Any]:
    """Leader only: all requests arrive at once; greedy decoding of exactly output_len."""
    engine = llm.engine
    assert engine is not None
    rng = random.Random(seed)
    vocab = engine.model_cfg.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(input_len)] for _ in range(num_requests)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    dev = llm._runner.device
    roof = device_roofline.measure(dev) if dev.type == "cuda" else {}
    llm.generate(prompts[: min(4, num_requests)], params)  # warm-up: kernels, allocator
    engine.allocator.reset_prefix_cache()  # random prompts; keep the measured run cold
    steps0 = engine.stats["steps"]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              and llm.options.device != "cpu" else "cpu")
    return {
        "model": engine.model_cfg.model_type, "device": device,
        "tp_size": llm.options.tp_size, "pp_size": llm.options.pp_size,
        "num_requests": num_requests, "input_len": input_len, "output_len": output_len,
        "elapsed_s": elapsed, "steps": engine.stats["steps"] - steps0,
        "output_tokens_per_s": generated / elapsed,
        "total_tokens_per_s": (generated + num_requests * input_len) / elapsed,
        "requests_per_s": num_requests / elapsed,
        "ttft_s": _percentiles([o.metrics.ttft or 0.0 for o in outs]),
        "tpot_s": _percentiles([t for o in outs
                                if (t := o.metrics.time_per_output_token) is not None]),
        "kv_blocks": engine.allocator.num_blocks, "preemptions": engine.scheduler.num_preemptions,
    } | device_roofline.bench_fields(
        roof, sum(p.numel() * p.element_size() for p in llm._runner.model.parameters()),
        [t for o in outs if (t := o.metrics.time_per_output_token) is not None], num_requests)


def bench_main(llm_kwargs: dict[str, Any], num_requests: int, input_len: int, output_len: int,
               output: str | None) -> int:
    llm = DistributedLLM(**llm_kwargs)
    if not llm.is_leader:
        return 0
    with llm:
        result = run_bench(llm, num_requests, input_len, output_len)
    text = json.dumps(result, indent=2)
    print(text)
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
    return 0
