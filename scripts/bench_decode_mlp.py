"""The one-launch FP8 decode MLP (`kernels/fp8_decode_mlp.py`) against the separate kernels
the engine runs otherwise (CUDA o GEMV from the amax, add + RMSNorm + quantize, gate | up
gemv, SiLU x up with its amax, down from the amax), on llama3-8b's shapes: LAYERS chained
layers of distinct weights (nothing stays in L2) as one CUDA graph, PDL on, us a layer. Then
a TIMING build of the same chain: each CTA's %globaltimer at the kernel's stamps, as the
median and the latest CTA, us from the earliest CTA's start, for one layer in the middle.

    python scripts/bench_decode_mlp.py --configs 8,1,11 4,1,12 --output decode_mlp.json
"""

from __future__ import annotations

import argparse
import json

import torch
from bench_fused_kernels import time_graph  # scripts/ is on sys.path when run as a script
from trtdist.kernels import fp8_decode_mlp as dm
from trtdist.kernels.activation import silu_and_mul
from trtdist.kernels.fp8_fused import rms_norm_quant_triton
from trtdist.parallel.quant_fp8 import (
    fp8_linear_amax_cuda,
    fp8_linear_quantized_cuda,
    quantize_weight_per_channel,
)

from trtdist.device_roofline import measure

H, INTER, LAYERS = 4096, 14336, 8
STAMPS = ("start", "wait", "o", "barrier1", "norm", "gate_up", "barrier2", "act", "down", "end")


def _weights(dev: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=dev).manual_seed(seed)
    out = {}
    for name, (n, k) in (("wo", (H, H)), ("wgu", (2 * INTER, H)), ("wd", (H, INTER))):
        w, s = quantize_weight_per_channel(torch.randn(n, k, generator=g, device=dev) * k ** -0.5)
        out[name], out[name + "_s"] = w, s
    out["norm"] = torch.ones(H, device=dev, dtype=torch.bfloat16)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="*", default=["8,1,11", "8,1,6", "4,1,12"])
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    roof = measure(dev)
    layers = [_weights(dev, i) for i in range(LAYERS)]
    attn = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    amax = attn.float().abs().amax().reshape(1)
    amax2 = torch.zeros(16, device=dev)
    residual = torch.randn(1, H, device=dev, dtype=torch.bfloat16)
    scratch = dm.DecodeMlpScratch(INTER, torch.bfloat16, dev)
    ctas = torch.cuda.get_device_properties(dev).multi_processor_count
    result: dict[str, object] = {"device": torch.cuda.get_device_name(dev), "ctas": ctas,
                                 "copy_gb_s": roof["copy_bandwidth_gb_s"],
                                 "matmul_tflops": roof["bf16_matmul_tflop_s"], "cases": {}}

    def separate() -> None:
        for w in layers:
            o = fp8_linear_amax_cuda(attn, amax, w["wo"], w["wo_s"].view(1, -1), None)
            xq, xs, _ = rms_norm_quant_triton(o, residual, w["norm"], 1e-5, None, clear=amax2)
            h = fp8_linear_quantized_cuda(xq, xs, w["wgu"], w["wgu_s"].view(1, -1), None,
                                          torch.bfloat16)
            act = silu_and_mul(h, row_amax=amax2)
            fp8_linear_amax_cuda(act, amax2, w["wd"], w["wd_s"].view(1, -1), None)

    us = time_graph(separate, 4, 20) * 1e6 / LAYERS
    result["cases"]["separate"] = us
    print(f"separate kernels: {us:.2f} us a layer")
    for text in args.configs:
        cfg = dm.parse_config(text, "--configs")

        def fused(timing: list[torch.Tensor] | None = None) -> None:
            for i, w in enumerate(layers):
                dm.fp8_decode_mlp(attn, amax, w["wo"], w["wo_s"], residual, w["norm"], 1e-5,
                                  w["wgu"], w["wgu_s"], w["wd"], w["wd_s"], scratch, config=cfg,
                                  timing=None if timing is None else timing[i])

        us = time_graph(fused, 4, 20) * 1e6 / LAYERS
        stamps = [torch.zeros(10 * ctas, dtype=torch.int64, device=dev) for _ in range(LAYERS)]
        time_graph(lambda: fused(stamps), 1, 3)
        t = stamps[LAYERS // 2].view(ctas, 10).double() / 1e3  # us
        t = t - t[:, 0].min()
        med, late = t.median(dim=0).values, t.max(dim=0).values
        row = {"us_per_layer": us, "stamps_median_us": med.tolist(),
               "stamps_latest_us": late.tolist()}
        result["cases"][text] = row
        print(f"fused {text}: {us:.2f} us a layer (timing build in one layer: "
              f"{late[-1].item():.2f} us to the last CTA's end)")
        print("  " + "  ".join(f"{name} {m:.2f}/{x:.2f}" for name, m, x in
                               zip(STAMPS, med.tolist(), late.tolist())))
    print(f"copy {roof['copy_bandwidth_gb_s']:.0f} GB/s, matmul {roof['bf16_matmul_tflop_s']:.0f} TFLOP/s")
    if args.output:
        json.dump(result, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
