"""Write FP8 GEMM config tables (the JSON `TRTDIST_FP8_GEMM_CONFIGS` reads) that try the
row-amax handoff (`models/llama.py`) on llama3-8b's o and down projections at M = 1 with
several input-quantizing tiles: one batch-1 timeline per variant (`profile_decode.py
--timeline`) times each in place, `pick` names the fastest step.

    python scripts/amax_variants.py write OUTDIR [SET]  # -> OUTDIR/v0.json ... (set 1: v0 none)
    python scripts/amax_variants.py pick OUTDIR         # the variant whose step was fastest

Set 1 (the first sweep) found the shipped tiles; set 2 starts from them (v0) and tries more
bytes in flight for down (longer K steps, the next tile prefetched) and wider o tiles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

O_PROJ, DOWN = (4096, 4096), (4096, 14336)
# per variant: {shape: (block_n, block_k, num_warps)}; whole K per program, gemv mode
VARIANTS: list[dict[tuple[int, int], tuple[int, int, int]]] = [
    {},
    {DOWN: (4, 1024, 4)},
    {DOWN: (8, 1024, 8)},
    {DOWN: (4, 1024, 4), O_PROJ: (8, 2048, 8)},
    {DOWN: (4, 1024, 4), O_PROJ: (16, 1024, 8)},
    {DOWN: (8, 2048, 8), O_PROJ: (4, 2048, 4)},
]


SHIPPED = {DOWN: (4, 1024, 4), O_PROJ: (16, 1024, 8)}
# (block_n, block_k, num_warps[, k_acc, prefetch])
VARIANTS_2: list[dict[tuple[int, int], tuple]] = [
    SHIPPED,
    {DOWN: (4, 2048, 8), O_PROJ: (16, 1024, 8)},
    {DOWN: (4, 1024, 4, True, True), O_PROJ: (16, 1024, 8)},
    {DOWN: (8, 1024, 8, False, True), O_PROJ: (16, 1024, 8)},
    {DOWN: (4, 1024, 4), O_PROJ: (32, 512, 8)},
    {DOWN: (4, 1024, 4), O_PROJ: (16, 2048, 8, False, True)},
]


def _row(n: int, k: int, tile: tuple) -> dict[str, object]:
    bn, bk, warps, k_acc, prefetch = (*tile, True, False)[:5]
    return {"m": 1, "n": n, "k": k, "config": {
        "mode": "gemv", "block_m": 1, "block_n": bn, "block_k": bk, "split_k": 1,
        "num_warps": warps, "num_stages": 1, "k_acc": k_acc, "x_2d": False,
        "prefetch": prefetch}}


def write(out: Path, which: str = "1") -> None:
    out.mkdir(parents=True, exist_ok=True)
    for i, v in enumerate(VARIANTS if which == "1" else VARIANTS_2):
        rows = [_row(n, k, t) for (n, k), t in v.items()]
        (out / f"v{i}.json").write_text(json.dumps({"configs": [], "quantizing": rows}))
        print(f"v{i}: " + ("  ".join(f"{n}x{k} {t}" for (n, k), t in v.items()) or "none"))


def pick(out: Path, *_: str) -> None:
    best = None
    for i in range(max(len(VARIANTS), len(VARIANTS_2))):
        log = out / f"timeline_v{i}.log"
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            if line.startswith("{") and "wall_ms_per_step" in line:
                ms = json.loads(line)["wall_ms_per_step"]
                if best is None or ms < best[1]:
                    best = (i, ms)
    print(f"v{best[0]}" if best else "v0")


if __name__ == "__main__":
    {"write": write, "pick": pick}[sys.argv[1]](Path(sys.argv[2]), *sys.argv[3:])
