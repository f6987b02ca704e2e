"""Launch configurations of the FP8-cache decode kernel against page size, on the GPU.

For each page size (default 16, 32) and each (BLOCK_N, num_warps, num_stages) the decode
attention of `scripts/bench_kernels.py` runs at two shapes: b64 x 4k and b256 x 1.5k (about
the average context of 1024 x 1000 / 1000), and prints the fraction of copy bandwidth.

    python scripts/sweep_fp8_decode.py --output sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from bench_kernels import bench_decode  # noqa: E402
from trtdist.kernels import triton_attention as ta  # noqa: E402

from trtdist import device_roofline as roof  # noqa: E402

CONFIGS = [(128, 4, 3), (128, 4, 2), (128, 4, 4), (128, 8, 3), (256, 8, 2), (256, 8, 3),
           (256, 4, 2), (64, 4, 3), (64, 4, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--output", type=Path)
    ap.add_argument("--block-sizes", default="16,32", help="page sizes, comma-separated")
    ap.add_argument("--configs", default=None,
                    help="BLOCK_N:warps:stages items, comma-separated (default: a built-in set)")
    args = ap.parse_args()
    configs = ([tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
               if args.configs else CONFIGS)
    dev = "cuda"
    bw = roof.copy_bandwidth(torch.device(dev), 2 << 30, 10)
    shipped = ta._decode_config
    rows = []
    for bs in (int(b) for b in args.block_sizes.split(",")):
        for cfg in configs:
            ta._decode_config = (lambda c: lambda d_pad, dtype, kv_fp8=False: (
                (*c, False) if kv_fp8 else shipped(d_pad, dtype, kv_fp8)))(cfg)
            for batch, context in ((64, 4096), (256, 1536)):
                try:
                    r = bench_decode(ta, dev, batch, context, 20, bs=bs, fp8=True)
                    frac = r["kv_bytes_per_s"] / bw
                except Exception as e:  # noqa: BLE001 - a config that does not compile / fit
                    r, frac = {"error": repr(e)[:200]}, float("nan")
                rows.append({"block_size": bs, "config": cfg, "batch": batch,
                             "context": context, "fraction_of_copy": frac, **r})
                print(f"bs{bs:3d} {cfg} b{batch} ctx{context}: {100 * frac:5.1f}% of copy",
                      flush=True)
    ta._decode_config = shipped
    if args.output:
        args.output.write_text(json.dumps({"copy_GBps": bw / 1e9, "rows": rows}, indent=1))
    print(f"copy {bw / 1e9:,.0f} GB/s; shipped config {shipped(128, torch.bfloat16, True)}")


if __name__ == "__main__":
    main()
