"""Tune the small-M FP8 GEMM (`kernels/fp8_gemm.py`) on this GPU: sweep launch configs for the
Llama-3-8B linear shapes and M = 1, 2, 4, 8, 16, print the best per (M, N, K) as a Python dict
literal for `kernels/fp8_gemm_configs.py`'s `TUNED`, and write JSON (`--output`) that
`TRTDIST_FP8_GEMM_CONFIGS=FILE` loads at run time.

    python scripts/tune_fp8_gemm.py --output tune.json [--m 1 2 4] [--budget-s 240]

Each candidate runs on pre-quantized activations (the fused path's GEMM: the quantization
lives in the producing norm / SiLU kernel), is checked against the float64 product of the
quantized values (relative error), and is timed as a CUDA graph of many calls rotating over
disjoint weight copies (>= --rotate-mb, default 256 MB: over 4x the H200's 60 MB L2, so the
weights stream from HBM). Reported: time per call, weight bytes per second and that as a
fraction of the copy bandwidth (bytes read + written) measured first by
`trtdist/device_roofline.py`.

Search, per (shape, M), within its share of `--budget-s`: stage 1 times each tile (mode,
BLOCK_M/N/K, warps, stages, gemv variants) at its automatic split-K; stage 2 tries other
K splits for the three best tiles. The first version's config (`default_config`) is always
timed, so the speedup over it is reported too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_fp8_gemm as bench  # noqa: E402  (its loader and CUDA-graph timer)

SHAPES = bench.SHAPES
MAX_REL_ERR = 1e-2  # bf16 output: ~2e-3 from its rounding; a wrong kernel is O(1)
# Most promising first (a pair whose budget runs out keeps the ones timed).
# gemv tiles: (block_n, block_k, num_warps, k_acc, x_2d, prefetch)
GEMV_TILES = [(16, 512, 4, True, True, True), (32, 256, 4, False, True, True),
              (8, 1024, 4, False, True, True), (16, 512, 4, False, True, True),
              (16, 256, 4, True, True, True), (8, 512, 4, True, True, True),
              (16, 1024, 8, False, True, True), (32, 512, 8, False, True, True),
              (64, 256, 8, False, True, True), (8, 512, 2, True, True, True),
              (16, 512, 4, True, True, False),
              (16, 512, 4, True, False, True), (32, 256, 4, False, False, False),
              # the layout of the bf16 GEMV (kernels/gemv.py: 2-4 rows a program, long K
              # steps, whole K in one program), best there on every llama3-8b shape
              (2, 2048, 8, True, False, False), (2, 4096, 8, True, False, False),
              (4, 2048, 8, True, False, False), (2, 2048, 4, True, False, False),
              (4, 1024, 4, True, False, False), (2, 4096, 8, True, False, True)]
# tl.dot tiles: (mode, block_m, block_n, block_k, num_warps, num_stages)
DOT_TILES = [("dot_swap", 16, 64, 256, 4, 4), ("dot_swap", 16, 128, 256, 4, 3),
             ("dot", 16, 64, 512, 4, 3), ("dot", 16, 32, 256, 4, 4),
             ("dot_swap", 16, 64, 512, 4, 3), ("dot", 16, 128, 256, 8, 3),
             ("dot_swap", 16, 128, 128, 8, 4), ("dot", 16, 64, 128, 4, 6),
             ("dot", 32, 64, 256, 4, 4), ("dot_swap", 32, 64, 256, 4, 4)]
# NOTE: batch-1 decode is the goal: M = 1 gets three shares of the budget.
M_WEIGHT = {1: 3.0}
SPLITS = (1, 2, 4, 8, 16, 32)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="token counts")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--budget-s", type=float, default=240.0,
                   help="seconds for the whole sweep (compiles included), shared by the "
                        "(shape, M) pairs")
    p.add_argument("--rotate-mb", type=int, default=256,
                   help="MB of weight copies to rotate over (keep >= 2x the L2)")
    p.add_argument("--reps", type=int, default=10, help="graph replays per timing")
    p.add_argument("--gemv-only", action="store_true",
                   help="only gemv tiles, each over the whole of K (no split-K)")
    return p.parse_args(argv)


def candidates(cfgs, m: int, k: int, gemv_only: bool = False
               ) -> list:  # type: ignore[no-untyped-def]
    """Stage-1 configs for one (M, N, K): the default first, then gemv (M <= 4), then tl.dot
    tiles whose BLOCK_M holds M. `gemv_only`: gemv tiles over the whole of K (split 1)."""
    C = cfgs.Fp8GemmConfig
    if gemv_only:
        bm = cfgs.m_bucket(m)
        return [C("gemv", bm, bn, bk, 1, warps, 1, k_acc, x_2d, prefetch)
                for bn, bk, warps, k_acc, x_2d, prefetch in GEMV_TILES
                if (bm if k_acc else 1) * bn * bk // (32 * warps) <= 64 and bk <= max(256, k)]
    out = [cfgs.default_config(m)]
    bm = cfgs.m_bucket(m)
    if bm <= cfgs.GEMV_MAX_M:
        for bn, bk, warps, k_acc, x_2d, prefetch in GEMV_TILES:
            regs = (bm if k_acc else 1) * bn * bk // (32 * warps)
            if regs <= 64 and bk <= max(256, k):
                out.append(C("gemv", bm, bn, bk, 0, warps, 1, k_acc, x_2d, prefetch))
    for mode, tbm, bn, bk, warps, stages in DOT_TILES:
        if m <= tbm and bk <= max(256, k):
            out.append(C(mode, tbm, bn, bk, 0, warps, stages))
    seen, uniq = set(), []
    for c in out:
        if c not in seen:
            seen.add(c)
            uniq.append(c)
    return uniq


def _split_of(cfgs, c, n: int, k: int, sms: int) -> int:  # type: ignore[no-untyped-def]
    return c.split_k or cfgs.choose_split_k(n, k, sms, c.block_n, c.block_k)


def _time(g, c, xq, xs, w8, s8, out, copies: int,  # type: ignore[no-untyped-def]
          reps: int) -> float:
    def step(i: int) -> None:
        g.fp8_gemm_small_m(xq, xs, w8[i], s8[i], None, out.dtype, out=out, config=c)

    return bench._graph_time_us(step, copies, reps)


def tune_shape(mods, name: str, n: int, k: int, ms: list[int], args, bw: float,
               deadline_of) -> list[dict]:  # type: ignore[no-untyped-def]
    import torch

    g, _, qf = mods
    import trtdist.kernels.fp8_gemm_configs as cfgs

    dev = args.device
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    copies = max(3, -(-(args.rotate_mb << 20) // (n * k)))
    w8, s8 = [], []
    for _ in range(copies):
        wq, ws = qf.quantize_weight_per_channel(
            torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
        w8.append(wq)
        s8.append(ws)
    rows = []
    for m in ms:
        deadline = deadline_of()
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        xq, xs = qf.quantize_activation(x, None)
        ref = ((xq.double() * xs.double()) @ (w8[0].double() * s8[0].double()[:, None]).T)
        out = torch.empty((m, n), device=dev, dtype=torch.bfloat16)
        results: list[tuple[float, object]] = []
        tried = []

        def run(c, xq=xq, xs=xs, out=out, ref=ref, m=m,  # type: ignore[no-untyped-def]
                results=results, tried=tried) -> None:
            rec = {"config": c.to_dict(), "split": _split_of(cfgs, c, n, k, sms)}
            try:
                out.fill_(float("nan"))
                g.fp8_gemm_small_m(xq, xs, w8[0], s8[0], None, torch.bfloat16, out=out,
                                   config=c)
                err = float((out.double() - ref).norm() / ref.norm())
                rec["rel_err"] = err
                if not err < MAX_REL_ERR:
                    raise RuntimeError(f"relative error {err:.3g} >= {MAX_REL_ERR}")
                us = _time(g, c, xq, xs, w8, s8, out, copies, args.reps)
                rec.update(bench._row(us, n * k, bw))
                results.append((us, c))
            except Exception as e:  # noqa: BLE001 - a config that fails is reported, skipped
                rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                print(f"  {name} M={m} {c}: {rec['error']}", flush=True)
            tried.append(rec)

        stage1 = candidates(cfgs, m, k, args.gemv_only)
        stage1_end = time.monotonic() + 0.7 * (deadline - time.monotonic())
        for c in stage1:
            if len(results) >= 2 and time.monotonic() > stage1_end:
                print(f"  {name} M={m}: budget: {len(stage1) - len(tried)} tiles skipped")
                break
            run(c)
        base = next((us for us, c in results if c == stage1[0]), None)
        best3 = [c for _, c in sorted(results, key=lambda r: r[0])[:3]]
        k_steps = {c: -(-k // c.block_k) for c in best3}
        for c in best3 if not args.gemv_only else []:
            auto = _split_of(cfgs, c, n, k, sms)
            for split in SPLITS:
                if time.monotonic() > deadline:
                    break
                blocks = -(-n // c.block_n) * split
                if split == auto or split > k_steps[c] or blocks > 16 * sms:
                    continue
                run(cfgs.Fp8GemmConfig(**{**c.to_dict(), "split_k": split}))
        if not results:
            print(f"{name} M={m}: no config ran", flush=True)
            continue
        us, best = min(results, key=lambda r: r[0])
        if best.split_k == 0:  # pin the split chosen on this GPU (SM count) in the table
            best = cfgs.Fp8GemmConfig(**{**best.to_dict(),
                                         "split_k": _split_of(cfgs, best, n, k, sms)})
        row = {"shape": name, "m": m, "m_bucket": cfgs.m_bucket(m), "n": n, "k": k,
               "config": best.to_dict(),
               **bench._row(us, n * k, bw), "default_us": base,
               "speedup_vs_default": (base / us) if base else None, "tried": tried}
        rows.append(row)
        print(f"{name:>8} {n}x{k} M={m:<3} {us:8.2f} us {row['weight_GBps']:8,.0f} GB/s "
              f"{100 * row['frac_copy_bw']:5.1f}% of copy  default "
              f"{base if base else float('nan'):7.2f} us  ({len(tried)} tried) {best}",
              flush=True)
    w8.clear()
    s8.clear()
    torch.cuda.empty_cache()
    return rows


def as_python(rows: list[dict]) -> str:
    """The `TUNED` dict literal for `kernels/fp8_gemm_configs.py`."""
    lines = ["# (M, N, K): Fp8GemmConfig(mode, block_m, block_n, block_k, split_k, num_warps,",
             "#                           num_stages, k_acc, x_2d, prefetch)  # time, % copy BW",
             "TUNED: dict[tuple[int, int, int], Fp8GemmConfig] = {"]
    for r in sorted(rows, key=lambda r: (r["n"], r["k"], r["m"])):
        args = ", ".join(repr(v) for v in r["config"].values())
        lines.append(f"    ({r['m_bucket']}, {r['n']}, {r['k']}): Fp8GemmConfig({args}),"
                     f"  # {r['time_us']:.1f} us, {100 * r['frac_copy_bw']:.0f}%")
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("tune_fp8_gemm: needs a CUDA device", file=sys.stderr)
        return 2
    if torch.cuda.get_device_capability(args.device) < (8, 9):
        print("tune_fp8_gemm: FP8 needs compute capability >= 8.9", file=sys.stderr)
        return 2
    mods = bench._load()
    import trtdist.device_roofline as roof

    props = torch.cuda.get_device_properties(args.device)
    bw = roof.copy_bandwidth(torch.device(args.device), 2 << 30, 10)
    print(f"{props.name}: copy bandwidth (read+write) {bw / 1e9:,.0f} GB/s; budget "
          f"{args.budget_s:.0f} s", flush=True)
    start = time.monotonic()
    weights = [M_WEIGHT.get(m, 1.0) for _ in args.shapes for m in args.m]  # in sweep order
    done = [0]

    def deadline_of() -> float:
        # NOTE: each (shape, M) pair gets its weighted share of what is left.
        left = args.budget_s - (time.monotonic() - start)
        share = max(left, 0.0) * weights[done[0]] / sum(weights[done[0]:])
        done[0] += 1
        return time.monotonic() + share

    rows = []
    for name in args.shapes:
        n, k = SHAPES[name]
        rows += tune_shape(mods, name, n, k, args.m, args, bw, deadline_of)
    print(f"\n# {props.name}, {time.strftime('%Y-%m-%d', time.gmtime())}, copy "
          f"{bw / 1e9:,.0f} GB/s: paste into kernels/fp8_gemm_configs.py")
    print(as_python(rows))
    if args.output:
        args.output.write_text(json.dumps({
            "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "copy_bandwidth_GBps": bw / 1e9, "seconds": time.monotonic() - start,
            "configs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
