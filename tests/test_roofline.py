"""trtdist/device_roofline.py: the roofline arithmetic (CPU) and the measurements (GPU)."""

from __future__ import annotations

import pytest
import torch

from trtdist import device_roofline


def test_bandwidth_fraction_and_bench_fields() -> None:
    # 16 GB of weights at 5 ms per token is 3.2 TB/s: 80% of a 4 TB/s copy bandwidth.
    assert device_roofline.decode_bandwidth_fraction(16 * 10**9, 5e-3, 4e12) == pytest.approx(0.8)
    roof = {"copy_bandwidth_gb_s": 4000.0, "bf16_matmul_tflop_s": 800.0}
    fields = device_roofline.bench_fields(roof, 16 * 10**9, [4e-3, 6e-3], num_requests=1)
    assert fields["decode_bandwidth_fraction"] == pytest.approx(0.8)
    assert fields["bf16_matmul_tflop_s"] == 800.0
    assert "decode_bandwidth_fraction" not in device_roofline.bench_fields(roof, 1, [1e-3], 8)
    assert device_roofline.bench_fields({}, 7, [1e-3], 1) == {"weight_bytes_per_rank": 7}
    with pytest.raises(ValueError, match="positive TPOT"):
        device_roofline.decode_bandwidth_fraction(1, 0.0, 1.0)
    with pytest.raises(ValueError, match="CUDA device"):
        device_roofline.measure(torch.device("cpu"))


@pytest.mark.gpu
def test_measurements_are_plausible() -> None:
    got = device_roofline.measure(torch.device("cuda"))
    assert 50 < got["copy_bandwidth_gb_s"] < 20_000
    assert 1 < got["bf16_matmul_tflop_s"] < 5_000
