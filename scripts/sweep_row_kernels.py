"""Launch configurations of the per-token row kernels against the number of tokens, on the GPU.

The FP8 engine's row kernels (add + RMSNorm -> E4M3, SiLU x up -> E4M3, the o-projection's
E4M3 quantization, rotary + KV-cache write) at llama3-8b's widths, for several token counts
(decode batches and prefill chunks). Each launch configuration is patched into the module's
config function, checked bit-equal to the shipped configuration's output, and timed with
`triton.testing.do_bench` (L2 flushed between runs); printed as a fraction of copy bandwidth.

    python scripts/sweep_row_kernels.py --tokens 1,64,1024,8192 --output rows.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import triton.testing
from trtdist.kernels import fp8_fused, fp8_quant, rotary

from trtdist import device_roofline as roof
from trtdist.runtime.kv_cache import KVCache

HIDDEN, INTER, HQ, HKV, D = 4096, 14336, 32, 8, 128
SILU = [(16384, True, 16), (16384, True, 32), (16384, True, 8), (8192, False, 8),
        (8192, False, 16), (4096, False, 4), (4096, False, 8), (2048, False, 4),
        (2048, False, 2), (1024, False, 2)]
NORM = [(4096, True, 8), (4096, True, 4), (4096, True, 16), (4096, True, 2), (2048, False, 4),
        (2048, False, 2), (1024, False, 2), (1024, False, 1)]
QUANT = [(4096, 8), (4096, 4), (4096, 16), (4096, 2), (2048, 4), (2048, 2), (1024, 2),
         (1024, 1)]
ROTARY = [(8, 2), (8, 1), (8, 4), (8, 8), (4, 1), (4, 2), (16, 4), (16, 8), (2, 1), (1, 1)]


def _outputs(out: Any) -> list[torch.Tensor]:
    return [t.clone() for t in (out if isinstance(out, tuple) else (out,))
            if isinstance(t, torch.Tensor)]


def _sweep(name: str, module: Any, attr: str, configs: list[tuple], nbytes: int,
           run: Callable[[], Any], state: Callable[[], list[torch.Tensor]],
           bw: float) -> list[dict]:
    """Time `run` under each config patched into `module.attr`; `state()` is what it wrote."""
    shipped = getattr(module, attr)
    rows = []
    try:
        ref = None
        for cfg in [None, *configs]:
            if cfg is not None:
                setattr(module, attr, lambda *a, c=cfg: c)
            out = _outputs(run()) + state()
            if ref is None:
                ref = out
            same = all(torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a, b.view(
                torch.uint8) if b.element_size() == 1 else b) for a, b in zip(out, ref))
            ms = triton.testing.do_bench(run, warmup=10, rep=50, return_mode="median")
            rows.append({"kernel": name, "config": "shipped" if cfg is None else list(cfg),
                         "us": ms * 1e3, "frac": nbytes / (ms * 1e-3) / bw, "equal": same})
            print(f"{name:<28} {str(rows[-1]['config']):<22} {ms * 1e3:8.1f} us "
                  f"{rows[-1]['frac']:6.1%}  equal={same}", flush=True)
    finally:
        setattr(module, attr, shipped)
    return rows


def _row_cases(t: int, dev: torch.device, g: torch.Generator, bw: float) -> list[dict]:
    bf = torch.bfloat16
    x = torch.randn(t, HIDDEN, device=dev, dtype=bf, generator=g)
    res = torch.randn(t, HIDDEN, device=dev, dtype=bf, generator=g)
    w = torch.rand(HIDDEN, device=dev, dtype=bf, generator=g) + 0.5
    res0 = res.clone()

    def norm() -> Any:
        res.copy_(res0)  # in place: every run starts from the same residual
        return fp8_fused.rms_norm_quant_triton(x, res, w, 1e-5, None)

    rows = _sweep(f"norm_quant T={t}", fp8_fused, "norm_row_config", NORM,
                  t * HIDDEN * 9 + 2 * HIDDEN, norm, lambda: [res], bw)
    h = torch.randn(t, 2 * INTER, device=dev, dtype=bf, generator=g)
    if t > fp8_quant.MAX_SPLIT_ROWS:  # smaller batches take the split-row kernel
        rows += _sweep(f"silu_quant T={t}", fp8_fused, "silu_row_config", SILU, t * INTER * 5,
                       lambda: fp8_fused.silu_and_mul_quant_triton(h, None), list, bw)
    rows += _sweep(f"quant T={t}", fp8_quant, "quant_row_config", QUANT, t * HIDDEN * 3,
                   lambda: fp8_quant.quantize_activation_triton(x, None), list, bw)
    return rows


def _rotary_case(t: int, kv_dtype: torch.dtype, dev: torch.device, g: torch.Generator,
                 bw: float) -> list[dict]:
    bs = 32 if kv_dtype == torch.float8_e4m3fn else 16
    cache = KVCache(1, t // bs + 2, bs, HKV, D, kv_dtype, dev)
    kv = cache.layers[0]
    qkv0 = torch.randn(t, (HQ + 2 * HKV) * D, device=dev, dtype=torch.bfloat16, generator=g)
    qkv = qkv0.clone()
    positions = torch.randint(0, 4096, (t,), device=dev, generator=g)
    slots = torch.randperm((t // bs + 2) * bs, device=dev, generator=g)[:t] + bs
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=dev) / D))
    cos_sin = rotary.cos_sin_table(inv, 8192)

    def rot() -> Any:
        qkv.copy_(qkv0)  # in place
        return rotary.rotary_and_cache_triton(qkv, positions, cos_sin, HQ, HKV, D, kv.k, kv.v,
                                              slots, k_scale=kv.k_scale, v_scale=kv.v_scale)

    def written() -> list[torch.Tensor]:
        return [qkv, cache.data] + ([cache.scales] if cache.scales is not None else [])

    e = kv_dtype.itemsize
    nbytes = t * ((HQ + 2 * HKV) * D * 2 + (HQ + HKV) * D * 2 + 2 * HKV * D * e + 32)
    return _sweep(f"rotary kv={str(kv_dtype)[6:]} T={t}", rotary, "rotary_config", ROTARY,
                  nbytes, rot, written, bw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1,64,1024,8192")
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = roof.copy_bandwidth(dev, 2 << 30, 10)
    print(f"copy bandwidth {bw / 1e9:,.0f} GB/s")
    g = torch.Generator(device=dev).manual_seed(0)
    results = []
    for t in (int(v) for v in args.tokens.split(",")):
        results += _row_cases(t, dev, g, bw)
        for kv_dtype in (torch.float8_e4m3fn, torch.bfloat16):
            results += _rotary_case(t, kv_dtype, dev, g, bw)
    if args.output:
        args.output.write_text(json.dumps({"copy_gb_s": bw / 1e9, "rows": results}, indent=1))
    print("\nbest per kernel:")
    for name in dict.fromkeys(r["kernel"] for r in results):
        rows = [r for r in results if r["kernel"] == name and r["equal"]]
        best = min(rows, key=lambda r: r["us"])
        ship = next(r for r in rows if r["config"] == "shipped")
        print(f"{name:<28} shipped {ship['us']:7.1f} us ({ship['frac']:5.1%})  best "
              f"{best['config']} {best['us']:7.1f} us ({best['frac']:5.1%})")


if __name__ == "__main__":
    main()
