"""The decode kernel with its block-table load one tile ahead (TRTDIST_DECODE_TABLE_AHEAD),
against the shipped loop, over launch configurations, on the GPU.

Triton's pipeliner multi-buffers a loop's loads only when their addresses do not come from
another load of the same iteration; the decode loop's K / V addresses come from the block
table, so the K / V copies of tile i + 1 were issued after tile i's math and waited for at
once (`cp.async.wait_group 0`, one shared buffer). Loading the next tile's block ids one
iteration ahead (a loop-carried value) lets it keep `num_stages - 1` tiles in flight.

    python scripts/sweep_decode_pipeline.py --kv fp8 --block-size 32 \\
        --configs 128:4:3:0:0,128:4:3:0:1,64:4:3:128:1 --output sweep.json

A config is BLOCK_N:warps:stages:maxnreg:ahead (maxnreg 0 = no cap). Prints the fraction of
copy bandwidth at each shape (KV bytes, scales included, over the kernel time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from bench_kernels import bench_decode  # noqa: E402
from trtdist.kernels import triton_attention as ta  # noqa: E402

from trtdist import device_roofline as roof  # noqa: E402

SHAPES = ((64, 4096), (256, 1536), (1024, 1536), (1, 8192), (256, 256))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kv", choices=["fp8", "bf16"], default="fp8")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--configs", required=True)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    bw = roof.copy_bandwidth(torch.device("cuda"), 2 << 30, 10)
    shipped = ta._decode_config
    fp8 = args.kv == "fp8"
    rows = []
    for item in args.configs.split(","):
        bn, warps, stages, maxnreg, ahead = (int(v) for v in item.split(":"))
        ta._decode_config = lambda d_pad, dtype, kv_fp8=False, c=(bn, warps, stages): c
        os.environ["TRTDIST_DECODE_MAXNREG"] = str(maxnreg)
        os.environ["TRTDIST_DECODE_TABLE_AHEAD"] = str(ahead)
        for batch, context in SHAPES:
            try:
                r = bench_decode(ta, "cuda", batch, context, 20, bs=args.block_size, fp8=fp8)
                frac = r["kv_bytes_per_s"] / bw
            except Exception as e:  # noqa: BLE001 - a config that does not compile / fit
                r, frac = {"error": repr(e)[:200]}, float("nan")
            rows.append({"kv": args.kv, "block_size": args.block_size, "config": item,
                         "batch": batch, "context": context, "fraction_of_copy": frac, **r})
            print(f"{args.kv} bs{args.block_size} {item:>14s} b{batch} ctx{context}: "
                  f"{100 * frac:5.1f}% of copy {r.get('time_us', float('nan')):9.1f} us",
                  flush=True)
    ta._decode_config = shipped
    if args.output:
        args.output.write_text(json.dumps({"copy_GBps": bw / 1e9, "rows": rows}, indent=1))
    print(f"copy {bw / 1e9:,.0f} GB/s")


if __name__ == "__main__":
    main()
