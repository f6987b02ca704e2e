"""Where a decode step's time goes, on one GPU: wall time per step, GPU kernel time per step
(torch profiler), the top kernels, and the leader's Python time by function (cProfile).

    python scripts/profile_decode.py --batch 1 --context 128 --steps 64
    python scripts/profile_decode.py --batch 256 --context 256 --steps 32
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from trtdist import DistributedLLM, SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--output", default=None)
    ap.add_argument("--quant", choices=["auto", "none", "fp8"], default="auto")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    args = ap.parse_args()
    dummy = args.model in ("llama3-8b", "llama3-70b")
    llm = DistributedLLM(args.model, dummy_weights=dummy, dtype="bfloat16" if dummy else "auto",
                         max_batch_size=max(args.batch, 1), enforce_eager=args.enforce_eager,
                         max_model_len=args.context + 4 * args.steps + 64
                         + args.batch * args.context // 4096, quant=args.quant,
                         kv_cache_dtype=args.kv_cache_dtype)
    engine = llm.engine
    assert engine is not None
    prompts = [[(7 * i + j) % 300 + 10 for j in range(args.context)] for i in range(args.batch)]
    # NOTE: the first prompts decode while the last are prefilled (about batch * context /
    # 8192 steps): budget for that too, or the early sequences finish before the profile
    max_tokens = 4 * args.steps + 8 + args.batch * args.context // 4096
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params)
    while any(s.num_output == 0 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill, then every sequence decodes
    for _ in range(8):
        engine.step()  # warm decode
    _sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    _sync()
    wall = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            engine.step()
        _sync()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu_total = sum(e.self_device_time_total for e in events) / 1e3 / args.steps  # ms
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:15]
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(args.steps):
        engine.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue()[-6000:])
    print(f"{'kernel':70s} {'ms/step':>8s}")
    for e in top:
        print(f"{e.key[:70]:70s} {e.self_device_time_total / 1e3 / args.steps:8.3f}")
    result = {"batch": args.batch, "context": args.context, "wall_ms_per_step": wall * 1e3,
              "gpu_kernel_ms_per_step": gpu_total, "gpu_busy_fraction": gpu_total / (wall * 1e3)}
    print(json.dumps(result))
    if args.output:
        json.dump(result, open(args.output, "w"))
    engine.abort_all()
    llm.shutdown()


if __name__ == "__main__":
    main()
