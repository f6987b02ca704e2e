"""FP8 linear-layer benchmark: the small-M Triton GEMM vs cuBLASLt `_scaled_mm` vs bf16.

Runs standalone on a CUDA machine (compute capability >= 8.9) with only torch and triton
installed (the trtdist kernels are loaded from this checkout, not from an installed package):

    python scripts/bench_fp8_gemm.py --output out.json

First measures the device-to-device copy bandwidth (bytes read + written), then for the
Llama-3-8B linear shapes (N x K: qkv 6144x4096, o 4096x4096, gate/up 28672x4096, down
4096x14336) and M = 1, 8, 64, 256 tokens times, per call including the activation
quantization:
- `small_m`: `kernels.fp8_gemm.fp8_linear_small_m` (fused quantization + Triton GEMM; M <= 16)
- `small_m_2kernel`: the same with the split-K reduction in a second kernel (split shapes)
- `small_m_gemm`: the small-M GEMM alone on activations already quantized (the decoder's fused
  path: the quantization lives in the norm / SiLU kernel), config from the tuned table
- `scaled_mm_fused`: fused Triton quantization + `_scaled_mm(use_fast_accum=True)` (M > 16)
- `scaled_mm_torch`: the previous path, torch `quantize_activation` + `_scaled_mm`
- `bf16`: `F.linear` with a bf16 weight
Each is timed as a CUDA graph of many calls rotating over disjoint copies of the weight
(>= 512 MB in all), so neither launch overhead nor L2 residency flatters it. Reported: time
per call, weight bytes read per second, and that as a fraction of the copy bandwidth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROTATE_BYTES = 512 << 20  # rotate over at least this much weight (H200 L2: 60 MB)
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}


def _load() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """`kernels.fp8_gemm`, `kernels.fp8_quant` and `parallel.quant_fp8` from this checkout
    without importing the rest of trtdist (MPI etc. may be absent)."""
    if "trtdist" not in sys.modules:
        for name, path in (("trtdist", ROOT / "trtdist"), ("trtdist.kernels", ROOT / "kernels"),
                           ("trtdist.parallel", ROOT / "parallel")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    import trtdist.kernels.fp8_gemm as g
    import trtdist.kernels.fp8_quant as q
    import trtdist.parallel.quant_fp8 as qf

    return g, q, qf


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 64, 256], help="token counts")
    return p.parse_args(argv)


def _median_ms(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    import torch

    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        start[i].record()
        fn()
        end[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    return times[len(times) // 2]


def _graph_time_us(step, copies: int, reps: int) -> float:  # type: ignore[no-untyped-def]
    """Per-call time of `step(i)` for i over the weight copies, captured in one CUDA graph."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):  # compile, allocate workspaces
            step(i)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    calls = max(copies, 32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i % copies)
    graph.replay()
    return _median_ms(graph.replay, reps) / calls * 1e3


def bench_shape(mods: tuple, device: str, n: int, k: int, ms: list[int], reps: int,
                copy_bw: float) -> dict[str, dict[str, dict[str, float]]]:
    import torch
    import torch.nn.functional as F

    g, q, qf = mods
    copies = max(2, -(-ROTATE_BYTES // (n * k)))
    w8, s8 = [], []
    for _ in range(copies):
        wq, ws = qf.quantize_weight_per_channel(
            torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02)
        w8.append(wq)
        s8.append(ws)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        impls = {"scaled_mm_torch": _mm_call(qf.quantize_activation, x, w8, s8, fast=False),
                 "scaled_mm_fused": _mm_call(q.quantize_activation_triton, x, w8, s8,
                                             fast=True)}
        if m <= g.SMALL_M_MAX:
            impls["small_m"] = lambda i, x=x: g.fp8_linear_small_m(x, w8[i], s8[i], None, None)
            xq, xs = q.quantize_activation_triton(x, None)
            impls["small_m_gemm"] = lambda i, xq=xq, xs=xs: g.fp8_gemm_small_m(
                xq, xs, w8[i], s8[i], None, torch.bfloat16)
            if g.choose_split_k(n, k, props_sms(device)) > 1:  # reduction in a second kernel
                impls["small_m_2kernel"] = lambda i, x=x: g.fp8_linear_small_m(
                    x, w8[i], s8[i], None, None, fixup=False)
        res: dict[str, dict[str, float]] = {}
        for name, fn in impls.items():
            us = _graph_time_us(fn, copies, reps)
            res[name] = _row(us, n * k, copy_bw)
        out[f"M={m}"] = res
    w8.clear()  # free the FP8 copies before the bf16 ones
    s8.clear()
    torch.cuda.empty_cache()
    # bf16 weights (twice the bytes): fewer copies fit the same rotation.
    copies = max(2, -(-ROTATE_BYTES // (2 * n * k)))
    w16 = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    for m in ms:
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        us = _graph_time_us(lambda i: F.linear(x, w16[i]), copies, reps)  # noqa: B023
        out[f"M={m}"]["bf16"] = _row(us, 2 * n * k, copy_bw)
    w16.clear()
    torch.cuda.empty_cache()
    return out


def props_sms(device: str) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def _mm_call(quant, x, w8, s8, *, fast: bool):  # type: ignore[no-untyped-def]
    import torch

    def call(i: int) -> torch.Tensor:
        xq, xs = quant(x, None)
        return torch._scaled_mm(xq, w8[i].t(), scale_a=xs, scale_b=s8[i].view(1, -1),
                                out_dtype=torch.bfloat16, use_fast_accum=fast)

    return call


def _row(us: float, weight_bytes: int, copy_bw: float) -> dict[str, float]:
    bps = weight_bytes / (us * 1e-6)
    return {"time_us": us, "weight_GBps": bps / 1e9, "frac_copy_bw": bps / copy_bw}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench_fp8_gemm: needs a CUDA device", file=sys.stderr)
        return 2
    if torch.cuda.get_device_capability(args.device) < (8, 9):
        print("bench_fp8_gemm: FP8 needs compute capability >= 8.9", file=sys.stderr)
        return 2
    mods = _load()
    dev = args.device
    reps = 5 if args.quick else 30
    props = torch.cuda.get_device_properties(dev)
    import trtdist.device_roofline as roof  # the same ceiling `trtdist bench` measures

    bw = roof.copy_bandwidth(torch.device(dev), 2 << 30, reps)
    results: dict[str, object] = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "copy_bandwidth_GBps": bw / 1e9, "small_m_max": mods[0].SMALL_M_MAX, "shapes": {}}
    print(f"{props.name}: copy bandwidth (read+write) {bw / 1e9:,.0f} GB/s")
    print(f"{'shape':>16} {'M':>4} {'impl':>16} {'time us':>9} {'weight GB/s':>12} {'of copy':>8}")
    for name, (n, k) in SHAPES.items():
        res = bench_shape(mods, dev, n, k, args.m, reps, bw)
        results["shapes"][f"{name} {n}x{k}"] = res  # type: ignore[index]
        for mkey, impls in res.items():
            for impl, r in impls.items():
                print(f"{f'{name} {n}x{k}':>16} {mkey[2:]:>4} {impl:>16} {r['time_us']:9.1f} "
                      f"{r['weight_GBps']:12,.0f} {r['frac_copy_bw']:8.2f}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
