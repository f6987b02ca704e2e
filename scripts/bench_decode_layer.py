"""Batch-1 FP8 decode layers without attention, as CUDA graphs of the real kernels: the
shipped sequence (fused norm + quantize, small-M GEMM, SiLU with the row amax, quantizing
down GEMM) against the persistent decode GEMV of `kernels/fp8_decode_gemv.py` with the norms
and residual adds folded into the GEMVs. llama3-8b shapes, 32 layers of distinct weights
(7 GB: nothing stays in L2), PDL on; time per layer = graph replay / layers.

    python scripts/bench_decode_layer.py --output layer.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from trtdist.kernels.activation import silu_and_mul
from trtdist.kernels.fp8_decode_gemv import (
    IN_AMAX,
    IN_FP8,
    IN_NORM,
    DecodeGemvConfig,
    fp8_decode_gemv,
    fp8_decode_gemv_torch,
)
from trtdist.kernels.fp8_fused import rms_norm_quant_triton
from trtdist.kernels.fp8_gemm import fp8_gemm_small_m, fp8_gemm_small_m_quantizing
from trtdist.parallel.quant_fp8 import quantize_activation, quantize_weight_per_channel

from trtdist.device_roofline import measure

H, QKV, INTER = 4096, 6144, 14336
SHAPES = {"qkv": (QKV, H), "o": (H, H), "gate_up": (2 * INTER, H), "down": (H, INTER)}
EPS = 1e-5


def weights(n: int, k: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w, s = quantize_weight_per_channel(torch.randn(n, k, device=dev, dtype=torch.bfloat16)
                                       * 0.01)
    return w, s


def time_graph(fn, iters: int = 20) -> float:
    """Seconds per call of `fn` replayed as one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--output", default="decode_layer.json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    roof = measure(dev)
    L = args.layers
    W = [{name: weights(n, k, dev) for name, (n, k) in SHAPES.items()} for _ in range(L)]
    nw = [((torch.rand(H, device=dev) + 0.5).to(torch.bfloat16),
           (torch.rand(H, device=dev) + 0.5).to(torch.bfloat16)) for _ in range(L)]
    bf = torch.bfloat16
    res0 = torch.randn(1, H, device=dev, dtype=bf)
    res = res0.clone()
    attn_out = torch.randn(1, H, device=dev, dtype=bf)
    attn_amax = attn_out.float().abs().amax().reshape(1)
    amax = torch.zeros(16, device=dev)
    qkv_out = torch.empty(1, QKV, device=dev, dtype=bf)
    o_out = torch.empty(1, H, device=dev, dtype=bf)
    h = torch.empty(1, 2 * INTER, device=dev, dtype=bf)
    act = torch.empty(1, INTER, device=dev, dtype=bf)
    d_out = torch.empty(1, H, device=dev, dtype=bf)
    xq_h, xs_h = quantize_activation(res0, None)
    xq_i, xs_i = quantize_activation(torch.randn(1, INTER, device=dev, dtype=bf), None)
    out = {"roofline": roof, "layers": L, "cases": {}}
    weight_bytes = {name: n * k for name, (n, k) in SHAPES.items()}

    # ---- correctness of every mode against the reference (one layer's weights)
    checks = {}
    w, s = W[0]["qkv"]
    for cfg in (DecodeGemvConfig(), DecodeGemvConfig(1, 1024, 4, 4, False, False, False)):
        y = fp8_decode_gemv(res0, w, s, in_mode=IN_NORM, norm_weight=nw[0][0], eps=EPS,
                            config=cfg)
        r, _ = fp8_decode_gemv_torch(res0, w, s, in_mode=IN_NORM, norm_weight=nw[0][0], eps=EPS)
        checks[f"norm {cfg}"] = ((y.float() - r.float()).abs().max() / r.float().abs().max()).item()
        y = fp8_decode_gemv(attn_out, w, s, in_mode=IN_AMAX, amax=attn_amax, config=cfg)
        r, _ = fp8_decode_gemv_torch(attn_out, w, s, in_mode=IN_AMAX, amax=attn_amax)
        checks[f"amax {cfg}"] = ((y.float() - r.float()).abs().max() / r.float().abs().max()).item()
        rr = torch.randn(1, QKV, device=dev, dtype=bf)
        r, _ = fp8_decode_gemv_torch(xq_h, w, s, in_mode=IN_FP8, in_scale=xs_h.reshape(1),
                                     residual=rr)
        fp8_decode_gemv(xq_h, w, s, in_mode=IN_FP8, in_scale=xs_h.reshape(1), out=rr,
                        add_residual=True, config=cfg)
        checks[f"fp8+res {cfg}"] = ((rr.float() - r.float()).abs().max() / r.float().abs().max()).item()
        xi = torch.randn(1, INTER, device=dev, dtype=bf)
        ai = xi.float().abs().amax().reshape(1)
        rr = torch.randn(1, H, device=dev, dtype=bf)
        r, _ = fp8_decode_gemv_torch(xi, *W[0]["down"], in_mode=IN_AMAX, amax=ai, residual=rr)
        fp8_decode_gemv(xi, *W[0]["down"], in_mode=IN_AMAX, amax=ai, out=rr, add_residual=True,
                        config=cfg)
        checks[f"down amax+res {cfg}"] = ((rr.float() - r.float()).abs().max()
                                          / r.float().abs().max()).item()
    out["checks"] = checks
    for k_, v in checks.items():
        print(f"check {k_}: max rel err {v:.2e}")

    # ---- one shape, 32 chained launches (distinct weights): base tile vs persistent configs
    def base_only(name: str):
        xq, xs = (xq_i, xs_i) if name == "down" else (xq_h, xs_h)
        outs = {"qkv": qkv_out, "o": o_out, "gate_up": h, "down": d_out}

        def fn():
            for i in range(L):
                w, s = W[i][name]
                fp8_gemm_small_m(xq, xs, w, s, None, bf, out=outs[name])
        return fn

    def pers_only(name: str, cfg: DecodeGemvConfig):
        outs = {"qkv": qkv_out, "o": o_out, "gate_up": h, "down": d_out}
        xq, xs = (xq_i, xs_i) if name == "down" else (xq_h, xs_h)

        def fn():
            for i in range(L):
                w, s = W[i][name]
                fp8_decode_gemv(xq, w, s, in_mode=IN_FP8, in_scale=xs.reshape(1),
                                out=outs[name], config=cfg)
        return fn

    def record(case: str, sec: float, nbytes: int | None = None) -> None:
        us = sec / L * 1e6
        row = {"us_per_layer": us}
        if nbytes:
            row["floor_us"] = nbytes / (roof["copy_bandwidth_gb_s"] * 1e9) * 1e6
        out["cases"][case] = row
        print(f"{case:60s} {us:7.2f} us/layer" + (f"  floor {row['floor_us']:.2f}" if nbytes else ""),
              flush=True)

    for name in ("qkv", "o", "gate_up", "down"):
        record(f"{name} base", time_graph(base_only(name)), weight_bytes[name])
    configs = [DecodeGemvConfig(*c) for c in [
        # block_n, block_k, warps, programs/SM, prefetch, early, k_acc
        (2, 2048, 4, 8, True, True, False), (2, 2048, 4, 8, True, True, True),
        (2, 2048, 4, 8, False, True, True), (2, 2048, 4, 16, False, True, True),
        (2, 1024, 4, 8, True, True, False), (2, 1024, 4, 16, True, True, False),
        (4, 1024, 4, 8, True, True, False), (2, 2048, 8, 4, True, True, False),
        (1, 4096, 4, 8, True, True, False), (4, 512, 4, 16, True, True, False),
        (2, 2048, 4, 8, True, False, False), (1, 2048, 4, 16, True, True, False)]]
    best: dict[str, tuple[float, DecodeGemvConfig]] = {}
    for name, cfg in itertools.product(("qkv", "o", "gate_up", "down"), configs):
        try:
            sec = time_graph(pers_only(name, cfg))
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported
            print(f"{name} {cfg}: failed {type(e).__name__}: {str(e)[:200]}")
            continue
        record(f"{name} persistent {cfg.block_n}x{cfg.block_k}/{cfg.num_warps}w/"
               f"{cfg.programs_per_sm}pps/pf{int(cfg.prefetch)}/early{int(cfg.early)}/"
               f"kacc{int(cfg.k_acc)}", sec, weight_bytes[name])
        if name not in best or sec < best[name][0]:
            best[name] = (sec, cfg)
    out["best"] = {k_: str(v[1]) for k_, v in best.items()}

    # ---- whole layers without attention
    def base_layers():
        for i in range(L):
            xq, xs, _ = rms_norm_quant_triton(d_out, res, nw[i][0], EPS, None, clear=amax)
            fp8_gemm_small_m(xq, xs, *W[i]["qkv"], None, bf, out=qkv_out)
            fp8_gemm_small_m_quantizing(attn_out, attn_amax, None, *W[i]["o"], None, out=o_out)
            xq, xs, _ = rms_norm_quant_triton(o_out, res, nw[i][1], EPS, None, clear=amax)
            fp8_gemm_small_m(xq, xs, *W[i]["gate_up"], None, bf, out=h)
            silu_and_mul(h, out=act, row_amax=amax)
            fp8_gemm_small_m_quantizing(act, amax, None, *W[i]["down"], None, out=d_out)

    def fused_layers(cq: DecodeGemvConfig, co: DecodeGemvConfig, cg: DecodeGemvConfig,
                     cd: DecodeGemvConfig | None):
        def fn():
            for i in range(L):
                fp8_decode_gemv(res, *W[i]["qkv"], in_mode=IN_NORM, norm_weight=nw[i][0],
                                eps=EPS, clear=amax, out=qkv_out, config=cq)
                fp8_decode_gemv(attn_out, *W[i]["o"], in_mode=IN_AMAX, amax=attn_amax, out=res,
                                add_residual=True, config=co)
                fp8_decode_gemv(res, *W[i]["gate_up"], in_mode=IN_NORM, norm_weight=nw[i][1],
                                eps=EPS, clear=amax, out=h, config=cg)
                silu_and_mul(h, out=act, row_amax=amax)
                if cd is None:
                    fp8_gemm_small_m_quantizing(act, amax, None, *W[i]["down"], None, out=res,
                                                add_residual=True)
                else:
                    fp8_decode_gemv(act, *W[i]["down"], in_mode=IN_AMAX, amax=amax, out=res,
                                    add_residual=True, config=cd)
        return fn

    layer_bytes = sum(weight_bytes.values())
    res.copy_(res0)
    record("layer base (no attention)", time_graph(base_layers), layer_bytes)
    if len(best) == 4:
        cq, co, cg, cd = (best[k_][1] for k_ in ("qkv", "o", "gate_up", "down"))
        res.copy_(res0)
        record("layer fused, best tiles, down base (no attention)",
               time_graph(fused_layers(cq, co, cg, None)), layer_bytes)
        res.copy_(res0)
        record("layer fused, best tiles (no attention)",
               time_graph(fused_layers(cq, co, cg, cd)), layer_bytes)
        d = DecodeGemvConfig()
        res.copy_(res0)
        record("layer fused, default tiles (no attention)", time_graph(fused_layers(d, d, d, d)),
               layer_bytes)
    out["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"TABLE copy {roof['copy_bandwidth_gb_s']:,.0f} GB/s, bf16 matmul "
          f"{roof['bf16_matmul_tflop_s']:,.0f} TFLOP/s")
    for k_ in ("qkv base", "o base", "gate_up base", "down base", "layer base (no attention)",
               "layer fused, best tiles, down base (no attention)",
               "layer fused, best tiles (no attention)",
               "layer fused, default tiles (no attention)"):
        if k_ in out["cases"]:
            print(f"TABLE {k_:50s} {out['cases'][k_]['us_per_layer']:7.2f} us")
    for k_, v in best.items():
        print(f"TABLE best {k_:10s} {v[0] / L * 1e6:7.2f} us {v[1]}")


if __name__ == "__main__":
    main()
