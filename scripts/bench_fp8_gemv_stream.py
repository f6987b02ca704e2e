"""The streaming one-token FP8 GEMV (`kernels/fp8_gemv_stream.py`) against the engine's shipped
one-token path (Triton gemv tiles, the CUDA GEMV for the o projection), on llama3-8b's four
shapes as the engine calls them, then in a chain of decode layers with the real row kernels:

- per shape: `--layers` chained launches of distinct weights (nothing stays in L2) as one CUDA
  graph, PDL on, for the shipped path and each streaming launch config;
- layers: RMSNorm + quantize -> qkv -> (o from a fixed attention row) -> add + RMSNorm +
  quantize -> gate | up -> SiLU x up + quantize -> down, `--layers` of them, shipped against
  streaming with the row kernels' early trigger on and off.

Times in us (a launch, or a layer), beside the machine's copy bandwidth and matmul rate.

    python scripts/bench_fp8_gemv_stream.py --output stream.json
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from bench_fp8_gemv_cuda import shape_inputs  # scripts/ is on sys.path when run as a script
from bench_fused_kernels import time_graph
from trtdist.kernels.fp8_fused import rms_norm_quant_triton, silu_and_mul_quant_triton
from trtdist.kernels.fp8_gemm import (
    fp8_gemm_small_m,
    fp8_gemm_small_m_quantizing,
)
from trtdist.kernels.fp8_gemv_stream import StreamGemvConfig, fp8_gemv_stream
from trtdist.parallel.quant_fp8 import quantize_weight_per_channel

from trtdist.device_roofline import measure

H, QKV, INTER = 4096, 6144, 14336
SHAPES = {"qkv": (QKV, H, 0), "o": (H, H, 1), "gate_up": (2 * INTER, H, 0),
          "down": (H, INTER, 0)}
S = StreamGemvConfig
CONFIGS = [S(1024, 4, 4), S(2048, 3, 4), S(2048, 4, 4), S(2048, 6, 4), S(4096, 2, 4),
           S(4096, 3, 4), S(2048, 4, 8), S(2048, 6, 4, prefill=False, early_trigger=False)]
# TRTDIST_STREAM_GEMV_CONFIG tables for the layer chain (rings ~100 KB: two CTAs an SM;
# ~200 KB: one, the next kernel's CTA taking an SM as this one's leaves)
TABLES = ["2048:3:4", "2048:6:4", "4096:3:4,14336=2048:6:4"]


def set_stream(on: bool, early: bool | None = None, table: str | None = None) -> None:
    os.environ["TRTDIST_STREAM_GEMV"] = "1" if on else "0"
    if table is None:
        os.environ.pop("TRTDIST_STREAM_GEMV_CONFIG", None)
    else:
        os.environ["TRTDIST_STREAM_GEMV_CONFIG"] = table
    if early is None:
        os.environ.pop("TRTDIST_PDL_EARLY", None)
    else:
        os.environ["TRTDIST_PDL_EARLY"] = "1" if early else "0"


def bench_shape(name: str, dev: torch.device, L: int) -> dict:
    bf = torch.bfloat16
    n, k, mode = SHAPES[name]
    mats, x, xq, xs, amax, out, ref = shape_inputs(name, dev, L)  # the same [N, K] by name
    xin, xsc = (xq, xs.reshape(1)) if mode == 0 else (x, amax)

    def shipped(w, s, o):
        if mode == 0:
            return fp8_gemm_small_m(xq, xs, w, s, None, bf, out=o)
        return fp8_gemm_small_m_quantizing(x, amax, None, w, s, None, out=o)

    def chain(call):
        def fn():
            for w, s in mats:
                call(w, s, out)
        return fn

    set_stream(False)
    times = {"shipped": time_graph(chain(shipped), 1, 20) / L * 1e6}
    errs = {}
    for cfg in CONFIGS:
        if not cfg.fits(k):
            continue
        try:
            y = fp8_gemv_stream(xin, xsc, mode, *mats[0], None, torch.empty_like(out), config=cfg)
        except Exception as e:  # noqa: BLE001 - report and go on with the others
            print(f"{name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        errs[str(cfg)] = ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        times[str(cfg)] = time_graph(chain(
            lambda w, s, o, cfg=cfg: fp8_gemv_stream(xin, xsc, mode, w, s, None, o,
                                                     config=cfg)), 1, 20) / L * 1e6
    for c, t in sorted(times.items(), key=lambda kv: kv[1]):
        print(f"{name:8s} {t:7.2f} us {n * k / t / 1e6:6.0f} GB/s  {c}  "
              f"(max err / max |ref| {errs.get(c, 0):.1e})")
    return {"times_us": times, "errors": errs}


def bench_layers(dev: torch.device, L: int) -> dict:
    bf = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    layers = []
    for _ in range(L):
        layers.append([quantize_weight_per_channel(
            torch.randn(n, k, device=dev, dtype=bf, generator=gen) / k ** 0.5)
            for n, k, _ in SHAPES.values()])
    ln = torch.rand(H, device=dev, dtype=bf, generator=gen) + 0.5
    h0 = torch.randn(1, H, device=dev, dtype=bf)
    attn = torch.randn(1, H, device=dev, dtype=bf)  # stands for the attention output
    amax = torch.zeros(16, device=dev)
    amax[0] = attn.float().abs().amax()
    res = h0.clone()
    cur = [h0.clone()]

    def step() -> None:
        y = cur[0]
        for (wq, sq), (wo, so), (wg, sg), (wd, sd) in layers:
            xq, xs, _ = rms_norm_quant_triton(y, res, ln, 1e-5, None)
            fp8_gemm_small_m(xq, xs, wq, sq, None, bf)
            y = fp8_gemm_small_m_quantizing(attn, amax, None, wo, so, None)
            xq, xs, _ = rms_norm_quant_triton(y, res, ln, 1e-5, None)
            gu = fp8_gemm_small_m(xq, xs, wg, sg, None, bf)
            xq, xs = silu_and_mul_quant_triton(gu, None)
            y = fp8_gemm_small_m(xq, xs, wd, sd, None, bf)

    out = {}
    set_stream(False)
    out["shipped"] = time_graph(step, 1, 20) / L * 1e6
    for table in TABLES:
        for early in (True, False):
            set_stream(True, early, table)
            label = f"stream {table}, {'early' if early else 'late'} row triggers"
            out[label] = time_graph(step, 1, 20) / L * 1e6
    total = sum(n * k for n, k, _ in SHAPES.values())  # weight bytes a layer
    for label, t in out.items():
        print(f"layer    {t:7.2f} us {total / t / 1e3:6.0f} GB/s  {label}")
    set_stream(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--output", default=None)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    roof = measure(dev)
    result: dict = {"copy_bandwidth_gb_s": roof["copy_bandwidth_gb_s"],
                    "bf16_matmul_tflop_s": roof["bf16_matmul_tflop_s"], "shapes": {}}
    for name in args.shapes.split(",") if args.shapes else []:
        result["shapes"][name] = bench_shape(name, dev, args.layers)
        torch.cuda.empty_cache()
    result["layer_us"] = bench_layers(dev, args.layers)
    print(f"copy {roof['copy_bandwidth_gb_s']:.0f} GB/s, matmul "
          f"{roof['bf16_matmul_tflop_s']:.0f} TFLOP/s")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
