#!/usr/bin/env python3
"""Benchmark the fused Triton kernels (RMSNorm, residual-add RMSNorm, SiLU x up, rotary + paged
KV write) at decode and prefill token counts for Llama-3-8B shapes, beside the copy bandwidth
of the same GPU.

Each kernel is timed inside a CUDA graph (`--reps` launches captured once, the graph replayed
`--iters` times), which is how decode runs it: the time is GPU time without Python launch
overhead. Bandwidth is the kernel's compulsory DRAM traffic over that time, and its fraction
of the device-to-device copy bandwidth measured first. The torch references are timed eagerly
(the KV write of the reference syncs with the host and cannot be captured).

    python scripts/bench_fused_kernels.py [--dtype bfloat16] [--tokens 1,64,256,8192]
                                          [--output out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--tokens", default="1,64,256,8192",
                   help="comma-separated token counts (decode batch sizes / prefill length)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--reps", type=int, default=20, help="launches captured in one graph")
    p.add_argument("--iters", type=int, default=20, help="graph replays timed")
    p.add_argument("--no-torch", action="store_true", help="skip timing the torch references")
    p.add_argument("--output", help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    try:
        args.tokens = [int(t) for t in args.tokens.split(",") if t]
    except ValueError:
        p.error(f"--tokens must be comma-separated integers, got {args.tokens!r}")
    if not args.tokens or min(args.tokens) < 1:
        p.error("--tokens needs at least one positive count")
    for name in ("hidden", "intermediate", "q_heads", "kv_heads", "head_dim", "block_size",
                 "reps", "iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.q_heads % args.kv_heads:
        p.error(f"--q-heads ({args.q_heads}) must be a multiple of --kv-heads "
                f"({args.kv_heads})")
    return args


def time_graph(fn: Callable[[], Any], reps: int, iters: int) -> float:
    """Seconds per call of `fn`, replayed from a CUDA graph of `reps` calls (median replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile / autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return sorted(times)[len(times) // 2]


def time_eager(fn: Callable[[], Any], iters: int) -> float:
    """Seconds per call of `fn` launched from Python (median)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def cases(args: argparse.Namespace, t: int, dtype: torch.dtype, dev: str = "cuda"
          ) -> list[tuple[str, int, Callable[[], Any], Callable[[], Any]]]:
    """(name, compulsory bytes, Triton call, torch reference call) for `t` tokens."""
    from trtdist.kernels.activation import silu_and_mul_torch, silu_and_mul_triton
    from trtdist.kernels.norm import (
        add_rms_norm_torch,
        add_rms_norm_triton,
        rms_norm_torch,
        rms_norm_triton,
    )
    from trtdist.kernels.rotary import (
        cos_sin_table,
        rotary_and_cache_torch,
        rotary_and_cache_triton,
    )

    e = torch.finfo(dtype).bits // 8
    h, inter = args.hidden, args.intermediate
    hq, hkv, d, bs = args.q_heads, args.kv_heads, args.head_dim, args.block_size
    x = torch.randn(t, h, dtype=dtype, device=dev)
    res = torch.randn(t, h, dtype=dtype, device=dev)
    w = torch.randn(h, dtype=dtype, device=dev)
    normed = torch.empty_like(x)
    gate_up = torch.randn(t, 2 * inter, dtype=dtype, device=dev)
    act = torch.empty(t, inter, dtype=dtype, device=dev)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, dtype=dtype, device=dev)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float32,
                                                 device=dev) / d))
    max_pos = max(8192, t)
    cos_sin = cos_sin_table(inv_freq, max_pos)
    positions = torch.randint(0, max_pos, (t,), device=dev)
    blocks = -(-t // bs) + 1
    # NOTE: the caches are views of one [layers, 2, blocks, bs, Hkv, D] tensor, as at run time
    cache = torch.zeros(1, 2, blocks, bs, hkv, d, dtype=dtype, device=dev)
    k_cache, v_cache = cache[0, 0], cache[0, 1]
    slots = torch.randperm(blocks * bs, device=dev)[:t]
    rot_bytes = (2 * t * (hq + hkv) * d * e + t * hkv * d * e  # rotate q, k; read v
                 + 2 * t * hkv * d * e + t * d * 4 + 16 * t)  # cache writes, cos/sin, indices
    return [
        ("rms_norm", 2 * t * h * e + h * e,
         lambda: rms_norm_triton(x, w, 1e-5, out=normed),
         lambda: rms_norm_torch(x, w, 1e-5)),
        ("add_rms_norm", 4 * t * h * e + h * e,
         lambda: add_rms_norm_triton(x, res, w, 1e-5, out=normed),
         lambda: add_rms_norm_torch(x, res, w, 1e-5)),
        ("silu_and_mul", 3 * t * inter * e,
         lambda: silu_and_mul_triton(gate_up, out=act),
         lambda: silu_and_mul_torch(gate_up)),
        ("rotary_and_cache", rot_bytes,
         lambda: rotary_and_cache_triton(qkv, positions, cos_sin, hq, hkv, d, k_cache,
                                         v_cache, slots),
         lambda: rotary_and_cache_torch(qkv, positions, cos_sin, hq, hkv, d, k_cache,
                                        v_cache, slots)),
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_fused_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    from trtdist.device_roofline import copy_bandwidth  # what `trtdist bench` measures

    copy_bw = copy_bandwidth(torch.device("cuda"), 1 << 30, 20)
    device = torch.cuda.get_device_name()
    print(f"{device}, {args.dtype}; copy bandwidth {copy_bw / 1e9:,.0f} GB/s "
          f"(device-to-device, read + write)")
    header = (f"{'kernel':<18}{'tokens':>7}{'MB':>9}{'triton us':>11}{'GB/s':>8}"
              f"{'of copy':>9}{'torch us':>10}")
    print(header)
    print("-" * len(header))
    rows = []
    for t in args.tokens:
        for name, nbytes, triton_fn, torch_fn in cases(args, t, dtype):
            sec = time_graph(triton_fn, args.reps, args.iters)
            ref = None if args.no_torch else time_eager(torch_fn, args.iters)
            row = {"kernel": name, "tokens": t, "bytes": nbytes, "triton_s": sec,
                   "bandwidth_Bps": nbytes / sec, "bandwidth_fraction": nbytes / sec / copy_bw,
                   "torch_eager_s": ref}
            rows.append(row)
            ref_txt = "-" if ref is None else f"{ref * 1e6:.1f}"
            print(f"{name:<18}{t:>7}{nbytes / 1e6:>9.2f}{sec * 1e6:>11.2f}"
                  f"{nbytes / sec / 1e9:>8.0f}{row['bandwidth_fraction']:>9.1%}{ref_txt:>10}")
        torch.cuda.empty_cache()
    if args.output:
        shape = {k: getattr(args, k) for k in ("hidden", "intermediate", "q_heads", "kv_heads",
                                                "head_dim", "block_size")}
        with open(args.output, "w") as f:
            json.dump({"device": device, "dtype": args.dtype, "shape": shape,
                       "copy_bandwidth_Bps": copy_bw, "timing": "cuda graph of "
                       f"{args.reps} launches, median of {args.iters} replays",
                       "results": rows}, f, indent=2)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
