"""What this GPU can do, measured in the same run as a benchmark: copy bandwidth and bf16
matmul rate, and the fraction of the bandwidth roofline a decode step achieves.

NOTE: the roofline of batch-1 decode is reading every weight once per token: TPOT >= weight
bytes per rank / copy bandwidth. Measured, not taken from a data sheet, so the fraction is
honest on any machine (an H200 copies at ~4.2 TB/s of its 4.8 TB/s nominal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _time_cuda(fn: Callable[[], object], device: torch.device, iters: int) -> float:
    """Median seconds per call of `fn` on `device`, after ~0.2 s of warm-up calls.

    NOTE: an idle GPU sits at low clocks (seen: 405 MHz SM on an H200); one warm-up call
    is not enough to bring them up, and the ceilings came out ~30% low."""
    import time

    start = time.perf_counter()
    while time.perf_counter() - start < 0.2:
        fn()
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy of `nbytes`: bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = _time_cuda(lambda: dst.copy_(src), device, iters)
    return 2 * nbytes / seconds


def matmul_flops(device: torch.device, n: int = 8192, iters: int = 10,
                 dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _time_cuda(lambda: torch.mm(a, b, out=out), device, iters)
    return 2 * n ** 3 / seconds


def measure(device: torch.device) -> dict[str, float]:
    """`copy_bandwidth_gb_s` and `bf16_matmul_tflop_s` of a CUDA device."""
    if device.type != "cuda":
        raise ValueError(f"device roofline measurements need a CUDA device, got {device}")
    # NOTE: may run after the KV pool took its share: stay well inside the memory left.
    free = torch.cuda.mem_get_info(device)[0]
    nbytes = max(min(2 << 30, free // 4) >> 20, 1) << 20
    n = 8192 if free >= 4 * 3 * 8192 ** 2 * 2 else 4096
    result = {"copy_bandwidth_gb_s": copy_bandwidth(device, nbytes) / 1e9,
              "bf16_matmul_tflop_s": matmul_flops(device, n) / 1e12}
    torch.cuda.empty_cache()
    return result


def decode_bandwidth_fraction(weight_bytes: int, tpot_s: float, bandwidth_b_s: float) -> float:
    """Achieved fraction of the memory roofline: (weight bytes / TPOT) / copy bandwidth."""
    if tpot_s <= 0 or bandwidth_b_s <= 0:
        raise ValueError(f"need a positive TPOT and bandwidth, got {tpot_s}, {bandwidth_b_s}")
    return weight_bytes / tpot_s / bandwidth_b_s


def bench_fields(roof: dict[str, float], weight_bytes: int, tpots: list[float],
                 num_requests: int) -> dict[str, float]:
    """Fields for `trtdist bench`: the measured `roof` (empty off CUDA), the weight bytes of
    the leader's rank and, for batch-1 decode (one request), `decode_bandwidth_fraction`."""
    fields: dict[str, float] = dict(roof, weight_bytes_per_rank=weight_bytes)
    if roof and num_requests == 1 and tpots:
        fields["decode_bandwidth_fraction"] = decode_bandwidth_fraction(
            weight_bytes, sum(tpots) / len(tpots), roof["copy_bandwidth_gb_s"] * 1e9)
    return fields
