"""Split-K for the one-token FP8 GEMVs of llama3-8b: does cutting each program's K (shorter
programs, more of them, a shorter last wave) beat the shipped whole-K tiles, and what would a
reduction folded into the next kernel leave (the partials written, no reduction at all)?

Each case is 32 chained launches of distinct weights (nothing stays in L2) in one CUDA graph,
PDL on, as `bench_fp8_gemv_cuda.py` times them. Cases per shape: the engine's call (CUDA GEMV
for o), the shipped Triton tile, then tiles at split 2-14 with the in-GEMM fixup (the last
slice program of an N block sums the partials), with the second-kernel epilogue (quantized
input only), and "partials": the split launch alone (a lower bound for a reduction done by the
next row kernel).

    python scripts/bench_split_gemv.py --output split_gemv.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from bench_fp8_gemv_cuda import SHAPES, shape_inputs, ulps  # scripts/ is on sys.path
from bench_fused_kernels import time_graph
from trtdist.kernels import fp8_gemm as g
from trtdist.kernels import fp8_gemm_configs as cfgs
from trtdist.kernels._triton import pdl_launch
from trtdist.kernels.fp8_gemm import fp8_gemm_small_m, fp8_gemm_small_m_quantizing

from trtdist.device_roofline import measure

C = cfgs.Fp8GemmConfig
# split set: (block_n, block_k, num_warps) tiles tried with splits, per K (K_ACC on)
TILES = {4096: [(2, 2048, 4), (2, 1024, 4), (4, 1024, 4), (1, 2048, 4)],
         14336: [(4, 1024, 4), (2, 1024, 4), (2, 2048, 4), (4, 512, 4), (8, 512, 4)]}
SPLITS = {4096: (2, 4), 14336: (2, 4, 7, 14)}
# occupancy set: tiles reduced every K step (K_ACC off: fewer registers, more programs an
# SM), with and without a 32-register cap (16 programs of 4 warps an SM)
OCC_TILES = {4096: [(2, 2048, 4), (1, 4096, 4), (2, 4096, 4), (2, 4096, 8), (4, 2048, 4),
                    (4, 1024, 4), (1, 2048, 4), (8, 1024, 4), (16, 512, 4)],
             14336: [(4, 1024, 4), (2, 1024, 4), (2, 2048, 4), (4, 512, 4), (8, 512, 4),
                     (4, 2048, 4), (8, 1024, 8)]}
OCC_SPLITS = {4096: (1,), 14336: (1, 2, 4)}
# capped set: every shape split 1-4 under a 32-register cap (all programs resident in one
# wave where they fit: 16 an SM), partials and fixup
CAP_TILES = {4096: [(2, 2048, 4), (4, 1024, 4), (8, 512, 4), (4, 512, 4), (2, 1024, 4),
                    (8, 1024, 8)],
             14336: [(8, 512, 4), (4, 512, 4), (16, 256, 4), (8, 256, 4), (8, 1024, 8)]}
CAP_SPLITS = {4096: (1, 2, 4), 14336: (2, 4, 7)}


def candidates(k: int, mode: int, which: str) -> list[tuple[str, C, int, bool | None]]:
    """(label, config, split, fixup: None = the default; False with partials = no
    reduction) of one shape's cases."""
    out = []
    if which == "split":
        for bn, bk, nw in TILES[k]:
            cfg = C("gemv", 1, bn, bk, 1, nw, 1, True, False, False)
            tag = f"{bn}x{bk}w{nw}"
            out.append((f"{tag} s1", cfg, 1, None))
            for sp in SPLITS[k]:
                if -(-k // bk) < sp:
                    continue
                out.append((f"{tag} s{sp} fixup", cfg, sp, True))
                if mode == 0:
                    out.append((f"{tag} s{sp} epilogue", cfg, sp, False))
                out.append((f"{tag} s{sp} partials", cfg, sp, False))
        return out
    if which == "capped":
        tiles, splits = CAP_TILES[k], CAP_SPLITS[k]
        variants = ((False, 32), (True, 32))
    else:
        tiles, splits = OCC_TILES[k], OCC_SPLITS[k]
        variants = ((False, 0), (False, 32), (True, 32))
    for bn, bk, nw in tiles:
        for k_acc, cap in variants:
            # occupancy: K_ACC only on the two shipped tile shapes
            if which == "occupancy" and k_acc and (bn, bk, nw) not in ((2, 2048, 4),
                                                                       (4, 1024, 4)):
                continue
            cfg = C("gemv", 1, bn, bk, 1, nw, 1, k_acc, False, False, cap)
            tag = f"{bn}x{bk}w{nw}{'acc' if k_acc else ''}{f' r{cap}' if cap else ''}"
            for sp in splits:
                if sp == 1:
                    out.append((f"{tag} s1", cfg, 1, None))
                elif -(-k // bk) >= sp:
                    out.append((f"{tag} s{sp} fixup", cfg, sp, True))
                    out.append((f"{tag} s{sp} partials", cfg, sp, False))
    return out


def partials_only(xq, xs, x_mode, w, ws, out, cfg, split):  # type: ignore[no-untyped-def]
    """The split launch of `fp8_gemm._gemm` without any reduction: float32 partials only."""
    m, k = xq.shape
    n = w.shape[0]
    bk = cfg.block_k
    split, k_per_split = g.split_plan(k, bk, split)
    part = g._workspace(xq.device, n, split, cfg.block_m)
    grid = (triton.cdiv(n, cfg.block_n), split)
    g._fp8_gemm_kernel[grid](
        xq, xs, w, ws, ws, out, part, xs, xs, m, n, k, xq.stride(0), w.stride(0),
        out.stride(0), K_PER_SPLIT=k_per_split, SPLIT_K=split,
        EVEN_K=k_per_split * split == k, FIXUP=False, HAS_BIAS=False, DOT_FP8=False,
        MODE=2, K_ACC=cfg.k_acc, X_2D=cfg.x_2d, PREFETCH=cfg.prefetch, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=bk, X_MODE=x_mode, **cfg.launch_options(),
        **pdl_launch(xq.device))
    return part


def bench_shape(name: str, dev: torch.device, L: int, which: str) -> tuple[dict, dict]:
    bf = torch.bfloat16
    n, k, mode = SHAPES[name]
    ws_, x, xq, xs, amax, out, ref = shape_inputs(name, dev, L)
    w0, s0 = ws_[0]
    xin, xsc = (xq, xs) if mode == 0 else (x, amax)

    def call(cfg, split, fixup):  # type: ignore[no-untyped-def]
        def run(w, s, o):  # type: ignore[no-untyped-def]
            if mode == 0:
                return fp8_gemm_small_m(xq, xs, w, s, None, bf, out=o, config=cfg,
                                        split_k=split, fixup=fixup)
            return fp8_gemm_small_m_quantizing(x, amax, None, w, s, None, out=o, config=cfg,
                                               split_k=split, fixup=fixup)
        return run

    def engine(w, s, o):  # type: ignore[no-untyped-def]
        if mode == 0:
            return fp8_gemm_small_m(xq, xs, w, s, None, bf, out=o)
        return fp8_gemm_small_m_quantizing(x, amax, None, w, s, None, out=o)

    shipped = cfgs.lookup(1, n, k, quantizing=mode != 0)
    cases = {"engine": engine, f"shipped {shipped.block_n}x{shipped.block_k}w"
             f"{shipped.num_warps}": call(shipped, 1, None)}
    for label, cfg, sp, fixup in candidates(k, mode, which):
        if label.endswith("partials"):
            cases[label] = (lambda w, s, o, cfg=cfg, sp=sp:
                            partials_only(xin, xsc, mode, w, s, o, cfg, sp))
        else:
            cases[label] = call(cfg, sp, fixup)
    checks, times = {}, {}
    for key, fn in cases.items():
        try:
            y = fn(w0, s0, torch.empty_like(out))
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"check {name} {key}: FAILED {type(e).__name__}: {str(e)[:200]}")
            continue
        if "partials" not in key:
            checks[key] = ulps(y, ref)

        def chain(fn=fn):  # type: ignore[no-untyped-def]
            for w, s in ws_:
                fn(w, s, out)
        times[key] = time_graph(chain, 1, 20) / L * 1e6
    for key, (d, eq) in checks.items():
        if d > 2:
            print(f"check {name} {key}: max {d:.2f} bf16 ulps ({eq:.3f} bit-equal) WRONG?")
    for key, t in sorted(times.items(), key=lambda kv: kv[1])[:12]:
        print(f"time {name} {key}: {t:.2f} us ({n * k / t / 1e3:.0f} GB/s)")
    return checks, times


def write_best(path: str, times_us: dict[str, dict[str, float]], which: str) -> None:
    """The tables' entries (plain: qkv, gate_up; quantizing: o, down) with each shape's
    fastest reducing case where it beats the shipped tile; the quantizing table keeps its
    shipped entries otherwise (the file replaces it whole)."""
    by_label = {}
    for k in (4096, 14336):
        for mode in (0, 1):
            for label, cfg, sp, _ in candidates(k, mode, which):
                by_label[(k, mode, label)] = (cfg, sp)
    plain, quantizing = [], []
    for name, times in times_us.items():
        n, k, mode = SHAPES[name]
        shipped = next(t for c, t in times.items() if c.startswith("shipped"))
        real = {c: t for c, t in times.items() if c not in ("engine",)
                and not c.startswith("shipped") and not c.endswith("partials")}
        cfg = cfgs.lookup(1, n, k, quantizing=mode != 0)
        if real:
            label = min(real, key=real.get)
            if real[label] < shipped:
                best, sp = by_label[(k, mode, label)]
                cfg = C(**{**best.to_dict(), "split_k": sp})
                print(f"best {name}: {label} {real[label]:.2f} us (shipped {shipped:.2f})")
        row = {"m": 1, "n": n, "k": k, "config": cfg.to_dict()}
        (quantizing if mode != 0 else plain).append(row)
    with open(path, "w") as f:
        json.dump({"configs": plain, "quantizing": quantizing}, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--output", default="split_gemv.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--best", default="",
                    help="write the fastest real (reducing) case per shape, where it beats the "
                         "shipped tile, as a TRTDIST_FP8_GEMM_CONFIGS file")
    ap.add_argument("--set", choices=("split", "occupancy", "capped"), default="split",
                    help="split: K_ACC tiles at split 1-14; occupancy: K_ACC off and a "
                         "32-register cap; capped: every tile under the cap at splits 1-7")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    roof = measure(dev)
    print(f"roofline: {roof}")
    result: dict = {"roofline": roof, "layers": args.layers, "checks": {}, "times_us": {}}
    rows = []
    for name in args.shapes.split(","):
        checks, times = bench_shape(name, dev, args.layers, args.set)
        result["checks"][name], result["times_us"][name] = checks, times
        kinds = ("engine", "shipped", "s1", "fixup", "epilogue", "partials")
        best = {kind: min(((t, c) for c, t in times.items() if kind in c), default=(0, "-"))
                for kind in kinds}
        rows.append((name, best))
        torch.cuda.empty_cache()
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    if args.best:
        write_best(args.best, result["times_us"], args.set)
    print("==== shape | engine | shipped | best s1 | best fixup | best epilogue | best partials"
          " (us)")
    for name, best in rows:
        cells = [f"{t:.2f} {c}" if kind in ("s1", "fixup", "epilogue", "partials") else f"{t:.2f}"
                 for kind, (t, c) in best.items()]
        print(f"{name} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
