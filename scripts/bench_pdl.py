"""What programmatic dependent launch (PDL) saves in a CUDA graph of decode-shaped kernels.

A llama3-8b batch-1 layer as stand-in kernels (an FP8 GEMV per linear layer, reading its
weight whole-K; one-program "norm" and "quantize" kernels; a small "rotary" kernel), 32
layers captured in one CUDA graph, replayed with and without PDL. With PDL each kernel may
start while the previous one drains: a GEMV loads its weight tile before `griddepcontrol.wait`
(weights do not depend on the previous kernel), everything else waits first.

    python scripts/bench_pdl.py --output pdl.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def _gemv(x_ptr, w_ptr, y_ptr, N, K: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * K + rk[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    w0 = tl.load(w_ptrs)  # issued before the wait: the weight is not the previous kernel's
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    for i in tl.static_range(K // BLOCK_K):
        if i == 0 and PREFETCH:
            w = w0.to(tl.float32)
        else:
            w = tl.load(w_ptrs + i * BLOCK_K).to(tl.float32)
        x = tl.load(x_ptr + i * BLOCK_K + rk).to(tl.float32)
        acc += w * x[None, :]
    tl.store(y_ptr + rn, tl.sum(acc, axis=1).to(tl.bfloat16))


@triton.jit
def _rowop(x_ptr, y_ptr, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program over one row: a sum of squares and a scaled store (norm / quantize-like)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    off = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, N, BLOCK):
        acc += tl.load(x_ptr + k0 + off).to(tl.float32)
    s = tl.sum(acc * acc) * 1e-9 + 1.0
    for k0 in range(0, N, BLOCK):
        v = tl.load(x_ptr + k0 + off).to(tl.float32)
        tl.store(y_ptr + k0 + off, (v / s).to(tl.bfloat16))


@triton.jit
def _ew(x_ptr, y_ptr, N, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Many programs, elementwise (rotary / cache write-like)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    off = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = off < N
    tl.store(y_ptr + off, tl.load(x_ptr + off, mask=m) * 2, mask=m)


SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    weights = [{k: (torch.randn(n, kk, device=dev) * 0.02).to(torch.float8_e4m3fn)
                for k, (n, kk) in SHAPES.items()} for _ in range(args.layers)]
    act = {n: torch.randn(n, device=dev, dtype=torch.bfloat16) for n in (4096, 6144, 28672, 14336)}
    outs = {n: torch.empty(n, device=dev, dtype=torch.bfloat16) for n in (4096, 6144, 28672,
                                                                            14336)}

    def gemv(name: str, w: torch.Tensor, pdl: bool, prefetch: bool) -> None:
        n, k = w.shape
        bn, bk = (2, 2048) if k == 4096 else (4, 2048)
        _gemv[(n // bn,)](act[k], w, outs[n], n, K=k, BLOCK_N=bn, BLOCK_K=bk, PDL=pdl,
                          PREFETCH=prefetch, num_warps=8 if k == 4096 else 4, launch_pdl=pdl)

    def rowop(n: int, pdl: bool) -> None:
        _rowop[(1,)](act[n], outs[n], N=n, BLOCK=1024, PDL=pdl, num_warps=4, launch_pdl=pdl)

    def ew(n: int, pdl: bool) -> None:
        _ew[(triton.cdiv(n, 512),)](act[n], outs[n], n, BLOCK=512, PDL=pdl, num_warps=4,
                                    launch_pdl=pdl)

    def step(pdl: bool, prefetch: bool, small: bool = True, gemvs: bool = True) -> None:
        for lw in weights:
            if small:
                rowop(4096, pdl)  # norm + quantize
            if gemvs:
                gemv("qkv", lw["qkv"], pdl, prefetch)
            if small:
                ew(6144, pdl)  # rotary + cache write
                ew(4096, pdl)  # attention stand-in
                ew(4096, pdl)  # attention combine stand-in
                rowop(4096, pdl)  # o quantize
            if gemvs:
                gemv("o", lw["o"], pdl, prefetch)
            if small:
                rowop(4096, pdl)  # add + norm + quantize
            if gemvs:
                gemv("gate_up", lw["gate_up"], pdl, prefetch)
            if small:
                rowop(14336, pdl)  # silu-mul-quantize
            if gemvs:
                gemv("down", lw["down"], pdl, prefetch)

    # copy bandwidth beside it (METHOD.md)
    a = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(10):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    copy_gbs = 2 * a.numel() * 10 / (e0.elapsed_time(e1) * 1e-3) / 1e9
    del a, b

    wbytes = sum(w.numel() for lw in weights for w in lw.values())
    rows = []
    for label, kw in [("gemvs only, plain", dict(pdl=False, prefetch=False, small=False)),
                      ("gemvs only, PDL", dict(pdl=True, prefetch=False, small=False)),
                      ("gemvs only, PDL + prefetch", dict(pdl=True, prefetch=True, small=False)),
                      ("small only, plain", dict(pdl=False, prefetch=False, gemvs=False)),
                      ("small only, PDL", dict(pdl=True, prefetch=False, gemvs=False)),
                      ("layer, plain", dict(pdl=False, prefetch=False)),
                      ("layer, PDL", dict(pdl=True, prefetch=False)),
                      ("layer, PDL + prefetch", dict(pdl=True, prefetch=True))]:
        step(**kw)  # compile
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step(**kw)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        reps = 20
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        ms = e0.elapsed_time(e1) / reps
        gem = kw.get("gemvs", True)
        rows.append({"case": label, "ms": round(ms, 4),
                     "weight_GBs": round(wbytes / (ms * 1e-3) / 1e9, 1) if gem else None})
    floor_ms = wbytes / (copy_gbs * 1e9) * 1e3
    print(f"copy {copy_gbs:.0f} GB/s; weight floor {floor_ms:.3f} ms ({wbytes / 1e9:.2f} GB)")
    for r in rows:
        print(f"{r['case']:32s} {r['ms']:8.3f} ms  {r['weight_GBs'] or '':>8}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"copy_GBs": copy_gbs, "floor_ms": floor_ms, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
