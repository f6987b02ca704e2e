"""Kernel benchmarks for the Triton attention backend, beside the machine's own limits.

Runs standalone on a CUDA machine with only torch and triton installed (the trtdist kernels
are loaded from this checkout, not from an installed package):

    python scripts/bench_kernels.py --output out.json

First measures the device-to-device copy bandwidth (bytes read + written) and the bf16
8192^3 matmul rate, then decode attention (Llama-3-8B shapes: 32 q heads, 8 kv heads,
head_dim 128, bf16, block 16) as time and KV bytes read per second as a fraction of the copy
bandwidth, and causal prefill attention as TFLOP/s (2 * 2 * T^2 * H * D / 2 for causal).
Decode is timed as a CUDA graph of many calls rotating over disjoint copies of the KV cache,
so neither launch overhead nor L2 residency flatters it. On compute capability >= 8.9 the
decode and prefill cases are repeated over an FP8 (E4M3 + per token-head scales) cache
(`--kv-cache-dtype fp8`); their KV bytes count the scales.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
L2_FLUSH_BYTES = 512 << 20  # rotate over at least this much KV (H200 L2: 60 MB)


def _load_kernels() -> types.ModuleType:
    """`trtdist.kernels.triton_attention` from this checkout, without importing the rest of
    trtdist (its package `__init__` pulls nothing heavy, but MPI etc. may be absent)."""
    if "trtdist" not in sys.modules:
        pkg = types.ModuleType("trtdist")
        pkg.__path__ = [str(ROOT / "trtdist")]
        sys.modules["trtdist"] = pkg
        kernels = types.ModuleType("trtdist.kernels")
        kernels.__path__ = [str(ROOT / "kernels")]
        sys.modules["trtdist.kernels"] = kernels
    import trtdist.kernels.triton_attention as ta

    return ta


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, help="write the results as JSON here")
    p.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    p.add_argument("--only", default="", help="run only the cases whose name contains this")
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


def _caches(num_blocks: int, bs: int, hkv: int, d: int, fp8: bool, device: str
            ) -> tuple[object, ...]:
    """Random K/V caches `[blocks, bs, Hkv, D]` in bf16, or E4M3 with float32 scales
    `[blocks, bs, Hkv]` (None without), laid out as the runtime's pool lays them out (an FP8
    V token-minor, scales head-major: runtime/kv_cache.py)."""
    import torch

    k = torch.randn(num_blocks, bs, hkv, d, dtype=torch.bfloat16, device=device)
    v = torch.randn_like(k)
    if not fp8:
        return k, v, None, None
    scales = [torch.rand(num_blocks, hkv, bs, device=device).transpose(1, 2) / 100
              for _ in range(2)]
    k8, v8 = ((x * 100).clamp_(-448, 448).to(torch.float8_e4m3fn) for x in (k, v))
    v8 = v8.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    return k8, v8, *scales


def bench_decode(ta: types.ModuleType, device: str, batch: int, context: int, reps: int,
                 hq: int = 32, hkv: int = 8, d: int = 128, bs: int = 16,
                 fp8: bool = False) -> dict[str, float]:
    """Decode attention: one query per sequence over `context` cached tokens each."""
    import torch
    from trtdist.kernels.attention import AttentionInputs

    dtype = torch.bfloat16
    blocks_per_seq = -(-context // bs)
    per_head = d + 4 if fp8 else d * dtype.itemsize
    kv_bytes = batch * context * hkv * per_head * 2  # K and V (and their scales)
    copies = max(1, min(64, math.ceil(L2_FLUSH_BYTES / kv_bytes)))
    num_blocks = 1 + copies * batch * blocks_per_seq
    k_cache, v_cache, k_scale, v_scale = _caches(num_blocks, bs, hkv, d, fp8, device)
    q = torch.randn(batch, hq, d, dtype=dtype, device=device)
    backend = ta.TritonAttentionBackend()
    perm = torch.randperm(num_blocks - 1, device=device).to(torch.int32) + 1  # scattered pages
    metas = []
    for c in range(copies):
        tables = perm[c * batch * blocks_per_seq:(c + 1) * batch * blocks_per_seq]
        metas.append(backend.prepare(AttentionInputs(
            query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=device),
            seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
            block_tables=tables.view(batch, blocks_per_seq).contiguous(),
            slot_mapping=torch.zeros(batch, dtype=torch.int64, device=device),
            block_size=bs, max_query_len=1, max_seq_len=context, is_decode=True)))
    scale = d ** -0.5

    def step(meta: object) -> torch.Tensor:
        return backend.forward(q, q, q, k_cache, v_cache, meta, scale, k_scale=k_scale,
                               v_scale=v_scale)

    for meta in metas:  # compile, allocate the workspace
        step(meta)
    torch.cuda.synchronize()
    calls = max(copies, 32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(metas[i % copies])
    graph.replay()
    ms = _median_ms(graph.replay, reps) / calls
    return {"time_us": ms * 1e3, "kv_bytes": kv_bytes, "kv_bytes_per_s": kv_bytes / (ms * 1e-3),
            "partitions": ta._num_partitions(batch, hkv, context,
                                             backend._target_programs(torch.device(device)))}


def bench_prefill(ta: types.ModuleType, device: str, tokens: int, reps: int, hq: int = 32,
                  hkv: int = 8, d: int = 128, bs: int = 16, fp8: bool = False,
                  prefix: int = 0, scattered: bool = False) -> dict[str, float]:
    """Causal prefill of one `tokens`-long chunk after `prefix` cached tokens; without a
    prefix and in bf16 also torch's SDPA on the same shapes. `scattered`: the sequence's
    pages in random order (else consecutive)."""
    import torch
    import torch.nn.functional as F
    from trtdist.kernels.attention import AttentionInputs

    dtype = torch.bfloat16
    total = prefix + tokens
    q = torch.randn(tokens, hq, d, dtype=dtype, device=device)
    k = torch.randn(tokens, hkv, d, dtype=dtype, device=device)
    v = torch.randn(tokens, hkv, d, dtype=dtype, device=device)
    nb = -(-total // bs)
    # NOTE: with FP8 the new tokens are read back from the cache (random here)
    k_cache, v_cache, k_scale, v_scale = _caches(nb + 1, bs, hkv, d, fp8, device)
    pages = (torch.randperm(nb, device=device) + 1 if scattered
             else torch.arange(1, nb + 1, device=device))
    backend = ta.TritonAttentionBackend()
    meta = backend.prepare(AttentionInputs(
        query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([total], dtype=torch.int32, device=device),
        block_tables=pages.to(torch.int32)[None],
        slot_mapping=torch.arange(bs + prefix, bs + total, device=device),
        block_size=bs, max_query_len=tokens, max_seq_len=total, is_decode=False))
    scale = d ** -0.5
    fn = lambda: backend.forward(q, k, v, k_cache, v_cache, meta, scale,  # noqa: E731
                                 k_scale=k_scale, v_scale=v_scale)
    fn()
    ms = _median_ms(fn, reps)
    flops = 2 * 2 * hq * d * (tokens * prefix + tokens * tokens / 2)
    result = {"time_us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12}
    if fp8 or prefix:
        return result
    # For scale only: torch's own causal SDPA on the same shapes (its flash kernel).
    qt, kt, vt = (x.transpose(0, 1)[None] for x in (q, k, v))
    sdpa = lambda: F.scaled_dot_product_attention(  # noqa: E731
        qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    try:
        sdpa()
        sdpa_ms = _median_ms(sdpa, reps)
        result.update(torch_sdpa_time_us=sdpa_ms * 1e3,
                      torch_sdpa_tflops=flops / (sdpa_ms * 1e-3) / 1e12)
    except (RuntimeError, TypeError) as e:  # an older torch without enable_gqa
        print(f"torch SDPA skipped: {e}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device", file=sys.stderr)
        return 2
    ta = _load_kernels()
    dev = args.device
    reps = 5 if args.quick else 30
    props = torch.cuda.get_device_properties(dev)
    t0 = time.time()
    import trtdist.device_roofline as roof  # the same ceilings `trtdist bench` measures

    bw = roof.copy_bandwidth(torch.device(dev), 2 << 30, reps)
    mm = roof.matmul_flops(torch.device(dev), 8192, reps)
    results: dict[str, object] = {
        "device": props.name, "torch": torch.__version__, "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_tflops": mm / 1e12, "cases": {}}
    rows = [("copy bandwidth (read+write)", f"{bw / 1e9:,.0f} GB/s", ""),
            ("bf16 matmul 8192^3", f"{mm / 1e12:,.0f} TFLOP/s", "")]
    cases: dict[str, dict[str, float]] = {}
    fp8 = torch.cuda.get_device_capability(dev) >= (8, 9)
    decode = [(64, 4096, False), (1, 8192, False), (256, 256, False)]
    decode += [(64, 4096, True), (256, 256, True)] if fp8 else []
    for batch, context, kv8 in decode:
        name = f"decode b{batch} ctx{context}" + (" fp8 KV" if kv8 else "")
        if args.only not in name:
            continue
        r = bench_decode(ta, dev, batch, context, reps, fp8=kv8)
        r["fraction_of_copy_bw"] = r["kv_bytes_per_s"] / bw
        cases[name] = r
        goal = " (goal >= 75%)" if (batch, context, kv8) == (64, 4096, False) else ""
        rows.append((name, f"{r['time_us']:,.1f} us",
                     f"{r['kv_bytes_per_s'] / 1e9:,.0f} GB/s = "
                     f"{100 * r['fraction_of_copy_bw']:.0f}% of copy{goal}"))
    if args.only in "prefill causal 8192":
        r = bench_prefill(ta, dev, 8192, reps)
        cases["prefill causal 8192"] = r
        sdpa = (f"; torch SDPA {r['torch_sdpa_tflops']:,.0f} TFLOP/s"
                if "torch_sdpa_tflops" in r else "")
        rows.append(("prefill causal 8192", f"{r['time_us']:,.1f} us",
                     f"{r['tflops']:,.0f} TFLOP/s (goal >= 300){sdpa}"))
    if fp8 and args.only in "prefill causal 8192 fp8 KV":
        r = bench_prefill(ta, dev, 8192, reps, fp8=True)
        cases["prefill causal 8192 fp8 KV"] = r
        rows.append(("prefill causal 8192 fp8 KV", f"{r['time_us']:,.1f} us",
                     f"{r['tflops']:,.0f} TFLOP/s"))
    results["cases"] = cases
    results["seconds"] = time.time() - t0
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}")
    w = max(len(r[0]) for r in rows)
    for name, t, extra in rows:
        print(f"{name:<{w}}  {t:>16}  {extra}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
