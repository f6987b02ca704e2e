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


def _timeline(prof: profile, steps: int, layers: int, path: str) -> None:
    """Kernels in end order; each one's share of the step is `end - previous end` (with PDL
    a kernel starts early and waits, so its own duration overstates what it costs). Prints the
    share by kernel name and the kernel sequence of one step (position, name, share, duration)."""
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.load(open(f.name))
    ks = sorted((e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"),
                key=lambda e: e["ts"] + e["dur"])
    if not ks:
        print("timeline: no kernel events")
        return
    rows, by_name = [], {}
    prev_end = ks[0]["ts"]
    for e in ks:
        end = e["ts"] + e["dur"]
        share = end - prev_end
        prev_end = end
        name = e["name"][:60]
        rows.append((name, share, e["dur"]))
        agg = by_name.setdefault(name, [0, 0.0, 0.0])
        agg[0] += 1
        agg[1] += share
        agg[2] += e["dur"]
    per_step = len(ks) // steps
    print(f"timeline: {len(ks)} kernels, {per_step} a step")
    # the decoder's four linear layers, by their order in a step (the LM head comes after)
    roles, seen = {}, 0
    for i, (name, share, _dur) in enumerate(rows):
        if i % per_step == 0:
            seen = 0
        if "gemm" in name or "gemv" in name:
            role = ("qkv", "o", "gate_up", "down")[seen % 4] if seen < 4 * layers else "lm_head"
            seen += 1
            agg = roles.setdefault(role, [0, 0.0])
            agg[0] += 1
            agg[1] += share
    print("linear layers (mean share us): " + "  ".join(
        f"{r} {v[1] / v[0]:.2f}" for r, v in roles.items()))
    print(f"{'kernel (by critical-path share)':60s} {'n/step':>6s} {'share us':>9s} "
          f"{'dur us':>8s} {'ms/step':>8s}")
    for name, (n, sh, du) in sorted(by_name.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:60s} {n / steps:6.1f} {sh / n:9.2f} {du / n:8.2f} {sh / steps / 1e3:8.3f}")
    mid = rows[per_step * (steps // 2): per_step * (steps // 2 + 1)]
    print("one step, positions 0-3 and 100-124 (share / duration, us):")
    for i in list(range(4)) + list(range(100, min(125, len(mid)))):
        print(f"  {i:4d} {mid[i][0]:60s} {mid[i][1]:7.2f} {mid[i][2]:7.2f}")
    print("one step, last 12:")
    for i in range(max(0, len(mid) - 12), len(mid)):
        print(f"  {i:4d} {mid[i][0]:60s} {mid[i][1]:7.2f} {mid[i][2]:7.2f}")
    json.dump({"kernels_per_step": per_step,
               "by_name": {k: {"per_step": v[0] / steps, "share_us": v[1] / v[0],
                               "dur_us": v[2] / v[0]} for k, v in by_name.items()},
               "one_step": [{"name": n, "share_us": sh, "dur_us": du} for n, sh, du in mid]},
              open(path, "w"), indent=1)


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
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="the engine's max_model_len (default: just what the run needs). "
                         "Decode graphs size the attention split by it: the model's full "
                         "length (8192 for llama3-8b) is what `trtdist bench` runs")
    ap.add_argument("--timeline", default=None,
                    help="write each kernel's critical-path share (JSON) here: the time from "
                         "the previous kernel's end to its own, by kernel and by position")
    args = ap.parse_args()
    dummy = args.model in ("llama3-8b", "llama3-70b")
    llm = DistributedLLM(args.model, dummy_weights=dummy, dtype="bfloat16" if dummy else "auto",
                         max_batch_size=max(args.batch, 1), enforce_eager=args.enforce_eager,
                         max_model_len=args.max_model_len or (
                             args.context + 4 * args.steps + 64
                             + args.batch * args.context // 4096), quant=args.quant,
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
    if args.timeline:
        _timeline(prof, args.steps, engine.model_cfg.num_layers, args.timeline)
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
