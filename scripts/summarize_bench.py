"""One line from a `trtdist bench` JSON result: the figures BENCHMARKS.md records."""

from __future__ import annotations

import json
import sys


def main(path: str) -> None:
    r = json.load(open(path))
    parts = [f"{r.get('num_requests')}x{r.get('input_len')}/{r.get('output_len')}",
             f"out {r.get('output_tokens_per_s', 0):,.0f} tok/s"]
    for key in ("tpot_s", "ttft_s"):
        if isinstance(r.get(key), dict) and "p50" in r[key]:
            parts.append(f"{key[:4]} p50 {r[key]['p50'] * 1e3:.2f} ms")
    for key, fmt in (("copy_bandwidth_gb_s", "copy {:,.0f} GB/s"),
                     ("bf16_matmul_tflop_s", "mm {:,.0f} TFLOP/s"),
                     ("decode_bandwidth_fraction", "bw frac {:.1%}"),
                     ("startup_s", "startup {:.1f} s"),
                     ("leader_host_ms_per_step", "host {:.2f} ms/step"),
                     ("gpu_idle_fraction", "gpu idle {:.1%}")):
        if r.get(key) is not None:
            parts.append(fmt.format(r[key]))
    if r.get("cuda_graphs") is not None:
        parts.append(f"graphs {r['cuda_graphs']}")
    if r.get("kv_blocks") is not None:
        parts.append(f"kv {r['kv_blocks']} blocks {r.get('kv_cache_dtype', '')} "
                     f"preempt {r.get('preemptions', 0)} (swap {r.get('swapped', 0)})")
    print(" | ".join(parts))


if __name__ == "__main__":
    main(sys.argv[1])
