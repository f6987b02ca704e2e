"""The paged attention kernels with their block-table loads one tile ahead (`TABLE_AHEAD`,
`_block_ids`), against the loop before, over launch configurations, on the GPU.

Triton's pipeliner multi-buffers a loop's loads only when their addresses do not come from
another load of the same iteration; the decode loop's K / V addresses come from the block
table, so the K / V copies of tile i + 1 were issued after tile i's math and waited for at
once (`cp.async.wait_group 0`, one shared buffer). Loading the next tile's block ids one
iteration ahead (a loop-carried value) lets it keep `num_stages - 1` tiles in flight.

    python scripts/sweep_decode_pipeline.py --kv fp8 --block-size 32 \\
        --configs 128:4:3:0,128:4:3:1,64:4:3:1 --output sweep.json

A config is BLOCK_N:warps:stages:ahead. Prints the fraction of
copy bandwidth at each shape (KV bytes, scales included, over the kernel time).
`--prefill-configs BLOCK_M:BLOCK_N:warps:stages,...` times the prefill kernel instead (a
whole 8k prompt, and a 2k chunk after a 6k cached prefix), in TFLOP/s. `--kernels-file`
loads the kernels from another copy of `triton_attention.py` (the code before a change).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from bench_kernels import bench_decode, bench_prefill  # noqa: E402
from trtdist.kernels import triton_attention as ta  # noqa: E402

from trtdist import device_roofline as roof  # noqa: E402

SHAPES = ((64, 4096), (256, 1536), (1024, 1536), (1, 8192), (256, 256))
PREFILLS = ((8192, 0), (2048, 6144))  # (new tokens, cached prefix)


def _load(path: Path):  # noqa: ANN202 - a module
    spec = importlib.util.spec_from_file_location("trtdist_kernels_under_test", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", choices=["fp8", "bf16"], default="fp8")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--configs", default="")
    ap.add_argument("--prefill-configs", default="")
    ap.add_argument("--kernels-file", type=Path, default=None)
    ap.add_argument("--tag", default="")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    bw = roof.copy_bandwidth(torch.device("cuda"), 2 << 30, 10)
    mod = _load(args.kernels_file) if args.kernels_file else ta
    shipped, shipped_prefill = mod._decode_config, mod._prefill_config
    fp8 = args.kv == "fp8"
    rows = []
    for item in filter(None, args.prefill_configs.split(",")):
        cfg = tuple(int(v) for v in item.split(":"))
        mod._prefill_config = lambda d_pad, dtype, *a, c=cfg: c
        for new, prefix in PREFILLS:
            try:
                r = bench_prefill(mod, "cuda", new, 20, bs=args.block_size, fp8=fp8,
                                  prefix=prefix, scattered=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile / fit
                r = {"error": repr(e)[:200], "tflops": math.nan, "time_us": math.nan}
            rows.append({"kv": args.kv, "prefill": item, "new": new, "prefix": prefix, **r})
            print(f"{args.tag}prefill {args.kv} bs{args.block_size} {item:>12s} new {new} "
                  f"prefix {prefix}: {r['tflops']:6.1f} TFLOP/s {r['time_us']:9.1f} us",
                  flush=True)
    mod._prefill_config = shipped_prefill
    for item in filter(None, args.configs.split(",")):
        bn, warps, stages, ahead = (int(v) for v in item.split(":"))
        cfg = (bn, warps, stages, bool(ahead))
        if len(shipped(128, torch.bfloat16, False)) == 3:  # code from before TABLE_AHEAD
            cfg = cfg[:3]
        mod._decode_config = lambda d_pad, dtype, kv_fp8=False, c=cfg: c
        for batch, context in SHAPES:
            try:
                r = bench_decode(mod, "cuda", batch, context, 20, bs=args.block_size, fp8=fp8)
                frac = r["kv_bytes_per_s"] / bw
            except Exception as e:  # noqa: BLE001 - a config that does not compile / fit
                r, frac = {"error": repr(e)[:200]}, float("nan")
            rows.append({"kv": args.kv, "block_size": args.block_size, "config": item,
                         "batch": batch, "context": context, "fraction_of_copy": frac, **r})
            print(f"{args.tag}{args.kv} bs{args.block_size} {item:>14s} b{batch} ctx{context}: "
                  f"{100 * frac:5.1f}% of copy {r.get('time_us', float('nan')):9.1f} us",
                  flush=True)
    mod._decode_config = shipped
    if args.output:
        args.output.write_text(json.dumps({"copy_GBps": bw / 1e9, "rows": rows}, indent=1))
    print(f"copy {bw / 1e9:,.0f} GB/s")


if __name__ == "__main__":
    main()
