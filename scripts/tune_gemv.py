"""Tune the decode GEMV (kernels/gemv.py) against cuBLAS (`F.linear`) on llama3-8b's shapes.

    python scripts/tune_gemv.py --output gemv.json

Measures the copy bandwidth first (bytes read + written), then for each shape (N x K: qkv
6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336, lm_head 128256x4096) and
M = 1, 2, 4 times every candidate (BLOCK_N, BLOCK_K, num_warps) and `F.linear`, each as a
CUDA graph of many calls rotating over disjoint weight copies (>= 512 MB, so L2 cannot hold
them). Each candidate is checked against the float64 reference first. Prints weight GB/s and
the fraction of copy bandwidth, and last the best config per (M, N, K) as a dict literal for
`kernels.gemv.CONFIGS`.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_fp8_gemm import _graph_time_us  # noqa: E402

ROTATE_BYTES = 512 << 20
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336), "lm_head": (128256, 4096)}


def _load() -> types.ModuleType:
    if "trtdist" not in sys.modules:
        for name, path in (("trtdist", ROOT / "trtdist"), ("trtdist.kernels", ROOT / "kernels")):
            pkg = types.ModuleType(name)
            pkg.__path__ = [str(path)]
            sys.modules[name] = pkg
    import trtdist.kernels.gemv as gemv

    return gemv


def candidates(m: int) -> list[tuple[int, int, int]]:
    out = []
    for bn in (2, 4, 8, 16):
        for bk in (256, 512, 1024, 2048):
            for warps in (4, 8):
                # float32 accumulators per thread: bucket rows x BN x BK / threads
                regs = {1: 1, 2: 2, 3: 4, 4: 4}[m] * bn * bk / (32 * warps)
                if 8 <= regs <= 128 and bk >= 32 * warps:
                    out.append((bn, bk, warps))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path)
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    gemv = _load()
    sys.path.insert(0, str(ROOT))
    from trtdist.device_roofline import copy_bandwidth

    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev) / 1e9
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw:.0f} GB/s")
    results: dict = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": copy_bw,
                     "shapes": {}}
    best: dict[tuple[int, int, int], tuple[int, int, int]] = {}
    for name, (n, k) in SHAPES.items():
        copies = max(1, -(-ROTATE_BYTES // (2 * n * k)))
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            out = torch.empty(m, n, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x.double(), ws[0].double())
            rows = {}
            us = _graph_time_us(lambda i, x=x, ws=ws, out=out: torch.mm(x, ws[i].t(), out=out),
                                 copies, args.reps)
            rows["cublas"] = us
            for cfg in candidates(m):
                gemv.gemv_triton(x, ws[0], out=out, config=cfg)
                err = ((out.double() - ref).norm() / ref.norm()).item()
                if not err < 1e-2:
                    print(f"  {name} M={m} {cfg}: WRONG rel err {err:.2e}")
                    continue
                rows[str(cfg)] = _graph_time_us(
                    lambda i, cfg=cfg, x=x, ws=ws, out=out: gemv.gemv_triton(x, ws[i], out=out,
                                                                         config=cfg),
                    copies, args.reps)
            gbs = {key: 2 * n * k / (t * 1e-6) / 1e9 for key, t in rows.items()}
            top = sorted((t, key) for key, t in rows.items() if key != "cublas")[:3]
            best[(m, n, k)] = tuple(json.loads(top[0][1].replace("(", "[").replace(")", "]")))
            results["shapes"][f"{name} M={m}"] = {"us": rows, "gb_s": gbs}
            print(f"{name:8} M={m}: cublas {rows['cublas']:7.1f} us {gbs['cublas']:6.0f} GB/s "
                  f"({gbs['cublas'] / copy_bw:4.0%}) | best " + "  ".join(
                      f"{key} {t:6.1f} us {gbs[key]:5.0f} GB/s ({gbs[key] / copy_bw:4.0%})"
                      for t, key in top), flush=True)
        ws.clear()
        torch.cuda.empty_cache()
    print("CONFIGS = {")
    for key, cfg in best.items():
        print(f"    {key}: {cfg},")
    print("}")
    if args.output:
        results["best"] = {str(k): v for k, v in best.items()}
        args.output.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
