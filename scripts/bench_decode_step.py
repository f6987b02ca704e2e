"""Time the one-launch batch-1 decode step (`kernels/fp8_decode_step.py`) against the layer
loop on a llama3-8b-shaped FP8 stage with random weights, each as one CUDA graph of the
stage's forward (embedding, layers, final norm; no LM head), and print where one layer's
time goes inside the launch (per-CTA %globaltimer stamps, median / latest over CTAs).

    python scripts/bench_decode_step.py --context 384 --configs 1024:2:0:128 2048:1:0:128
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import torch
from trtdist.kernels.attention import AttentionInputs, LayerKV
from trtdist.kernels.fp8_decode_step import DecodeStep, DecodeStepConfig
from trtdist.kernels.triton_attention import TritonAttentionBackend
from trtdist.parallel.linear_methods import Fp8LinearMethod
from trtdist.parallel.mapping import Mapping

from trtdist.config import PRESETS, ModelConfig
from trtdist.models.llama import LlamaStage

STAMPS = ["start", "qkv", "bar A", "attn", "bar B", "merge", "o", "bar C", "norm2", "gate_up",
          "bar D", "act", "down", "bar E"]


class _OneRank:
    rank, size = 0, 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def _parse(text: str) -> DecodeStepConfig:
    kc, ds, stages, part_min = (int(x) for x in text.split(":"))
    return DecodeStepConfig(kc=kc, ds=ds, stages=stages or None, part_min=part_min)


def _time_graph(fn, iters: int) -> float:
    """us per call of `fn` captured in a CUDA graph `iters` times over."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(iters):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / iters)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=384)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--configs", nargs="*", default=["1024:2:0:128"],
                    help="KC:DS:STAGES:PART_MIN (STAGES 0: as many as fit)")
    ap.add_argument("--output")
    args = ap.parse_args()
    dev = torch.device("cuda")
    hf = dict(PRESETS["llama3-8b"], num_hidden_layers=args.layers)
    cfg = ModelConfig.from_hf(hf)
    stage = LlamaStage(cfg, Mapping(), range(args.layers), _OneRank(), torch.bfloat16, dev,
                       Fp8LinearMethod("dynamic"))
    stage.attention_backend = TritonAttentionBackend(cfg.num_heads, cfg.num_kv_heads,
                                                     cfg.head_dim)
    gen = torch.Generator(device=dev).manual_seed(0)
    for name, p in stage.named_parameters():
        if p.dtype == torch.bfloat16:
            p.data.normal_(1.0 if "norm" in name else 0.0, 0.02, generator=gen)
    for module in stage.modules():
        if isinstance(getattr(module, "method", None), Fp8LinearMethod):
            module.method.dummy_fill(module, gen)
    bs = args.block_size
    width = -(-8192 // bs)
    kv = [LayerKV(*(torch.randn(width + 1, bs, cfg.num_kv_heads, cfg.head_dim, device=dev,
                                dtype=torch.bfloat16) for _ in range(2)))
          for _ in range(args.layers)]
    table = (torch.randperm(width, device=dev) + 1).to(torch.int32)[None, :]
    last = args.context - 1
    slot = (table[0, last // bs].long() * bs + last % bs).view(1)
    inputs = AttentionInputs(
        query_start_loc=torch.arange(2, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor([args.context], dtype=torch.int32, device=dev),
        block_tables=table, slot_mapping=slot, block_size=bs, max_query_len=1,
        max_seq_len=bs * width, is_decode=True)
    meta = stage.attention_backend.prepare_for_capture(inputs)
    ctx = stage.context(torch.tensor([last], device=dev), slot, meta)
    ids = torch.tensor([7], device=dev)

    def step() -> None:
        stage(ids, kv, ctx)

    results: dict[str, dict] = {}
    stage._decode_step = False
    loop_us = _time_graph(step, args.iters)
    results["loop"] = {"us_per_step": loop_us}
    print(f"layer loop: {loop_us:8.1f} us a step ({loop_us / args.layers:6.2f} us a layer)")
    for text in args.configs:
        c = _parse(text)
        timed = dataclasses.replace(c, timing_layer=args.layers // 2)
        stage._decode_step = DecodeStep(stage, c)
        us = _time_graph(step, args.iters)
        stage._decode_step = DecodeStep(stage, timed)
        step()
        torch.cuda.synchronize()
        t = stage._decode_step.timing.cpu().double()
        t0 = float(t[:, 0].min())
        rel = (t - t0) / 1e3  # us since the first CTA began the layer
        med = [statistics.median(rel[:, k].tolist()) for k in range(14)]
        late = [float(rel[:, k].max()) for k in range(14)]
        prod = [statistics.median(rel[:, k].tolist()) for k in (14, 15)]
        results[text] = {"us_per_step": us, "stamps_median_us": med, "stamps_latest_us": late,
                         "producer_median_us": prod, "smem": stage._decode_step._smem,
                         "defines": stage._decode_step.defines}
        print(f"step {text}: {us:8.1f} us a step ({us / args.layers:6.2f} us a layer), "
              f"stages {stage._decode_step.defines['STAGES']}")
        print("   " + " ".join(f"{n}:{m:.1f}/{x:.1f}" for n, m, x in zip(STAMPS, med, late)))
        print(f"   producer layer start {prod[0]:.1f}, last copy issued {prod[1]:.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"context": args.context, "layers": args.layers, "cases": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
