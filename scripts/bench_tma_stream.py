"""How fast a TMA-fed shared-memory ring streams a weight matrix, without math
(`scripts/tma_stream.cu`): one CTA a SM, stages of R rows x KC bytes, S stages, tiles split
statically or handed out by a global counter. Against torch's copy bandwidth and a plain
`sum` read of the same matrix in the same run. For the persistent decode layer's design
(PERF_NOTES.md, eleventh session).

    python scripts/bench_tma_stream.py --output tma_stream.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
from pathlib import Path

import torch
from bench_fused_kernels import time_graph  # scripts/ is on sys.path when run as a script
from trtdist.kernels import cuda_jit

from trtdist.device_roofline import measure

SOURCE = Path(__file__).with_name("tma_stream.cu")
# (rows a stage, bytes of K a stage, stages, consumer warps)
SHAPES = [(16, 2048, 6, 8), (16, 1024, 12, 8), (16, 4096, 3, 8), (8, 4096, 6, 8),
          (32, 1024, 6, 8), (8, 2048, 12, 8), (4, 4096, 12, 4), (16, 2048, 6, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    roof = measure(dev)
    n, k = 28672, 4096  # llama3-8b's gate | up, 117 MB; 8 distinct copies (nothing in L2)
    mats = [torch.randint(0, 255, (n, k), dtype=torch.uint8, device=dev) for _ in range(8)]
    sink = torch.zeros(1, dtype=torch.int32, device=dev)
    work = torch.zeros(len(mats), dtype=torch.int64, device=dev)  # one counter a matrix
    ctas = torch.cuda.get_device_properties(dev).multi_processor_count
    P, I32 = cuda_jit.POINTER, ctypes.c_int
    rows = {"copy_bandwidth_gb_s": roof["copy_bandwidth_gb_s"],
            "bf16_matmul_tflop_s": roof["bf16_matmul_tflop_s"], "cases": []}

    def read_sum() -> None:
        for m in mats:
            m.view(torch.int32).sum(dtype=torch.int32)

    t = time_graph(read_sum, 1, 10) / len(mats)
    rows["cases"].append({"case": "torch int32 sum", "us": t * 1e6, "tb_s": n * k / t / 1e12})
    print(f"torch sum read: {t * 1e6:.2f} us, {n * k / t / 1e12:.2f} TB/s")
    for r, kc, stages, nwarps in SHAPES:
        for dyn in (0, 1):
            defines = dict(K=k, R=r, KC=kc, STAGES=stages, NWARPS=nwarps, DYN=dyn)
            fn = cuda_jit.load(SOURCE, "tma_stream", defines, dev)
            shared = stages * r * (kc + 64) + 16 * stages + 4 * stages

            def stream(fn: cuda_jit.CudaFunction = fn, nwarps: int = nwarps,
                       shared: int = shared, r: int = r) -> None:
                work.zero_()
                for i, m in enumerate(mats):
                    fn.launch(ctas, 32 * (nwarps + 1),
                              (m.data_ptr(), n // r, work[i:].data_ptr(), sink.data_ptr()),
                              (P, I32, P, P), pdl=False, shared=shared)

            try:
                t = time_graph(stream, 1, 10) / len(mats)
            except cuda_jit.CudaJitError as e:
                print(f"R {r} KC {kc} S {stages} W {nwarps} dyn {dyn}: {e}")
                continue
            case = {"rows": r, "kc": kc, "stages": stages, "nwarps": nwarps, "dynamic": dyn,
                    "us": t * 1e6, "tb_s": n * k / t / 1e12}
            rows["cases"].append(case)
            print(f"R {r:2d} KC {kc:4d} S {stages:2d} W {nwarps:2d} dyn {dyn}: "
                  f"{t * 1e6:7.2f} us, {n * k / t / 1e12:.2f} TB/s")
    print(f"copy {roof['copy_bandwidth_gb_s']:.0f} GB/s, matmul {roof['bf16_matmul_tflop_s']:.0f} "
          f"TFLOP/s")
    if args.output:
        json.dump(rows, open(args.output, "w"), indent=1)


if __name__ == "__main__":
    main()
