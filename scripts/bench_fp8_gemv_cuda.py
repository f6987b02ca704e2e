"""The one-token CUDA FP8 GEMV (`kernels/fp8_gemv_cuda.py`) against the shipped Triton gemv
tiles, on llama3-8b's four shapes as the engine calls them (qkv / gate_up from E4M3 rows,
o / down quantizing bf16 rows from their amax): correctness against the torch reference,
then 32 chained launches of distinct weights (nothing stays in L2) as one CUDA graph, PDL on,
for the Triton tile and each CUDA launch config. Writes the fastest config per shape as a
`TRTDIST_FP8_GEMV_CUDA_CONFIGS` file.

    python scripts/bench_fp8_gemv_cuda.py --output gemv.json --best best.json
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_fused_kernels import time_graph  # scripts/ is on sys.path when run as a script
from trtdist.kernels import fp8_gemm_configs as cfgs
from trtdist.kernels.fp8_gemm import fp8_gemm_small_m, fp8_gemm_small_m_quantizing, fp8_gemm_torch
from trtdist.kernels.fp8_gemv_cuda import CudaGemvConfig, config_dict, fp8_gemv_cuda
from trtdist.parallel.quant_fp8 import quantize_activation, quantize_weight_per_channel

from trtdist.device_roofline import measure

H, QKV, INTER = 4096, 6144, 14336
# name: (N, K, X_MODE as the engine calls it at batch 1)
SHAPES = {"qkv": (QKV, H, 0), "o": (H, H, 1), "gate_up": (2 * INTER, H, 0),
          "down": (H, INTER, 1)}
C = CudaGemvConfig
VARIANTS = {
    4096: [C(8, 4, False), C(8, 2, True), C(8, 2, False), C(8, 1, True), C(4, 4, True),
           C(4, 2, True), C(16, 2, False), C(16, 1, True), C(32, 1, False),
           C(8, 2, True, min_blocks=3), C(16, 1, True, min_blocks=2),
           C(8, 2, True, xdirect=True), C(4, 4, True, xdirect=True),
           C(8, 2, True, min_blocks=3, xdirect=True), C(16, 1, True, min_blocks=2, xdirect=True)],
    14336: [C(8, 2, True), C(14, 4, False), C(14, 2, True), C(14, 4, True), C(16, 7, False),
            C(16, 1, True), C(28, 4, False), C(28, 2, True), C(7, 4, True), C(8, 2, False),
            C(14, 2, True, min_blocks=2)],
}


def ulps(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(largest |y - ref| in units of ref's bf16 spacing, fraction bit-equal)."""
    r = ref.float()
    spacing = torch.where(r == 0, torch.full_like(r, 2.0 ** -133),
                          2.0 ** (torch.floor(torch.log2(r.abs().clamp_min(1e-38))) - 7))
    d = ((y.float() - r).abs() / spacing).max().item()
    return d, (y == ref).float().mean().item()


def shape_inputs(name: str, dev: torch.device, L: int) -> tuple:
    """One shape's bench inputs: `L` distinct quantized weights `[(w, ws)]`, a bf16 row x, its
    E4M3 codes and scale (xq, xs), its amax slot, a bf16 output, and the torch reference of
    the first weight."""
    bf = torch.bfloat16
    n, k, _ = SHAPES[name]
    ws_ = [quantize_weight_per_channel(torch.randn(n, k, device=dev, dtype=bf) * 0.02)
           for _ in range(L)]
    x = torch.randn(1, k, device=dev, dtype=bf)
    xq, xs = quantize_activation(x, None)
    amax = torch.zeros(16, device=dev)
    amax[0] = x.float().abs().amax()
    out = torch.empty(1, n, device=dev, dtype=bf)
    ref = fp8_gemm_torch(xq, xs, *ws_[0], None, bf)
    return ws_, x, xq, xs, amax, out, ref


def bench_shape(name: str, dev: torch.device, L: int) -> tuple[dict, dict, dict]:
    """(checks, times in us a launch, the best CUDA config's table entry) of one shape."""
    bf = torch.bfloat16
    n, k, mode = SHAPES[name]
    ws_, x, xq, xs, amax, out, ref = shape_inputs(name, dev, L)
    w0, s0 = ws_[0]
    xin, xsc = (xq, xs.reshape(1)) if mode == 0 else (x, amax)
    tri_cfg = cfgs.lookup(1, n, k, quantizing=mode != 0)

    def triton_call(w, s, o):
        if mode == 0:
            return fp8_gemm_small_m(xq, xs, w, s, None, bf, out=o, config=tri_cfg)
        return fp8_gemm_small_m_quantizing(x, amax, None, w, s, None, out=o, config=tri_cfg)

    checks = {"triton": ulps(triton_call(w0, s0, torch.empty_like(out)), ref)}
    variants = list(VARIANTS[k])
    bias = torch.randn(n, device=dev, dtype=bf)
    ref_b = fp8_gemm_torch(xq, xs, w0, s0, bias, bf)
    for cfg in list(variants):
        try:
            y = fp8_gemv_cuda(xin, xsc, mode, w0, s0, None, torch.empty_like(out), config=cfg)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(f"check {name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
            variants.remove(cfg)
            continue
        checks[str(cfg)] = ulps(y, ref)
    yb = fp8_gemv_cuda(xin, xsc, mode, w0, s0, bias, torch.empty_like(out))
    checks["default+bias"] = ulps(yb, ref_b)
    # fp16 model: x, out and bias float16
    xh = x.half()
    xqh, xsh = quantize_activation(xh, None)
    amh = torch.zeros(16, device=dev)
    amh[0] = xh.float().abs().amax()
    refh = fp8_gemm_torch(xqh, xsh, w0, s0, bias.half(), torch.float16)
    yh = fp8_gemv_cuda(xqh if mode == 0 else xh, xsh.reshape(1) if mode == 0 else amh,
                       mode, w0, s0, bias.half(), torch.empty(1, n, device=dev,
                                                             dtype=torch.float16))
    checks["fp16+bias"] = ulps(yh, refh)
    # the static-scale mode (2)
    sc = (x.float().abs().amax() / 448.0).reshape(1) * 1.5
    xq2, xs2 = quantize_activation(x, sc)
    ref2 = fp8_gemm_torch(xq2, xs2, w0, s0, None, bf)
    y2 = fp8_gemv_cuda(x, sc, 2, w0, s0, None, torch.empty_like(out))
    checks["static"] = ulps(y2, ref2)
    # accumulation precision: max |y - exact| / sum |products| (float64 reference)
    exact = (xq.double() * xs.double()) @ (w0.double() * s0.double()[:, None]).T
    abs_sum = (xq.double() * xs.double()).abs() @ (w0.double() * s0.double()[:, None]).abs().T
    yc = fp8_gemv_cuda(xin, xsc, mode, w0, s0, None, torch.empty(1, n, device=dev,
                                                                  dtype=torch.float16))
    yt = triton_call(w0, s0, torch.empty_like(out))
    for key, y in (("cuda fp16 out", yc), ("triton bf16 out", yt)):
        rel = ((y.double() - exact).abs() / abs_sum).max().item()
        print(f"precision {name} {key}: max |err| / sum|products| = {rel:.2e}")
    for key, (d, eq) in checks.items():
        print(f"check {name} {key}: max {d:.2f} bf16 ulps, {eq:.3f} bit-equal")

    times = {}

    def chain(call):
        def fn():
            for w, s in ws_:
                call(w, s, out)
        return fn

    times["triton"] = time_graph(chain(triton_call), 1, 20) / L * 1e6
    for cfg in variants:
        times[str(cfg)] = time_graph(chain(
            lambda w, s, o, cfg=cfg: fp8_gemv_cuda(xin, xsc, mode, w, s, None, o,
                                                   config=cfg)), 1, 20) / L * 1e6
    top = sorted((t, c) for c, t in times.items() if c != "triton")[:3]
    for _, c in top:  # the three fastest again, first batch loaded before the wait
        cfg = next(v for v in variants if str(v) == c)
        e = C(cfg.nwarps, cfg.batch, cfg.double, True, cfg.min_blocks, cfg.xdirect)
        times[str(e)] = time_graph(chain(
            lambda w, s, o, e=e: fp8_gemv_cuda(xin, xsc, mode, w, s, None, o,
                                               config=e)), 1, 20) / L * 1e6
        variants.append(e)
    gbps = {c: n * k / (t * 1e-6) / 1e9 for c, t in times.items()}
    for c, t in sorted(times.items(), key=lambda kv: kv[1]):
        print(f"time {name} {c}: {t:.2f} us ({gbps[c]:.0f} GB/s)")
    bt, bc = min((t, c) for c, t in times.items() if c != "triton")
    cfg = next(v for v in variants if str(v) == bc)
    return checks, times, {"n": n, "k": k, "config": config_dict(cfg), "us": bt,
                           "triton_us": times["triton"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--output", default="gemv_cuda.json")
    ap.add_argument("--best", default="gemv_cuda_best.json")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    roof = measure(dev)
    print(f"roofline: {roof}")
    L = args.layers
    result: dict = {"roofline": roof, "layers": L, "checks": {}, "times_us": {}}
    best = []
    for name in args.shapes.split(","):
        checks, times, entry = bench_shape(name, dev, L)
        result["checks"][name], result["times_us"][name] = checks, times
        best.append(entry)
        torch.cuda.empty_cache()
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    with open(args.best, "w") as f:
        json.dump({"configs": best}, f, indent=1)
    print("==== shape | triton us | best CUDA us | config")
    for b in best:
        print(f"{b['n']}x{b['k']} | {b['triton_us']:.2f} | {b['us']:.2f} | {b['config']}")


if __name__ == "__main__":
    main()
