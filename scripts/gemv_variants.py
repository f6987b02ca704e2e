"""Write FP8 GEMM config tables (the JSON `TRTDIST_FP8_GEMM_CONFIGS` reads) that try other M = 1
gemv tiles in the engine itself: variant i gives each llama3-8b shape its i-th candidate, so one
batch-1 timeline per variant (`profile_decode.py --timeline`) times every candidate in place.

    python scripts/gemv_variants.py OUTDIR   # -> OUTDIR/v0.json ... (v0 = the shipped tiles)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (block_n, block_k, num_warps): whole K per program, as the shipped M = 1 entries
K4096 = [(2, 2048, 4), (2, 4096, 8), (2, 2048, 8), (4, 2048, 8), (1, 4096, 4)]
K14336 = [(4, 1024, 4), (4, 2048, 8), (2, 2048, 4), (8, 1024, 8), (2, 2048, 8)]
SHAPES = {(6144, 4096): K4096, (4096, 4096): K4096, (28672, 4096): K4096,
          (4096, 14336): K14336}


def main() -> None:
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    for i in range(len(K4096)):
        rows = []
        for (n, k), cands in SHAPES.items():
            bn, bk, warps = cands[i]
            rows.append({"m": 1, "n": n, "k": k, "config": {
                "mode": "gemv", "block_m": 1, "block_n": bn, "block_k": bk, "split_k": 1,
                "num_warps": warps, "num_stages": 1, "k_acc": True, "x_2d": False,
                "prefetch": False}})
        (out / f"v{i}.json").write_text(json.dumps({"configs": rows}))
        print(f"v{i}: " + "  ".join(f"{n}x{k} {c[i]}" for (n, k), c in SHAPES.items()))


if __name__ == "__main__":
    main()
