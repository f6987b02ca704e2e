"""kernels/sampling.py: the one-launch greedy pick and fed-back ids against their torch
references (Triton's interpreter on CPU, the GPU where there is one)."""

from __future__ import annotations

import math

import pytest
import torch
from trtdist.kernels.sampling import (
    greedy_sample_torch,
    greedy_sample_triton,
    resolve_fed_back_torch,
    resolve_fed_back_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _both(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = logits.shape[0]
    got = torch.full((n, 2), 7.0, dtype=torch.float64, device=logits.device)
    want = torch.full_like(got, 7.0)
    got_tok = torch.full((n,), -5, dtype=torch.int32, device=logits.device)
    want_tok = torch.full_like(got_tok, -5)
    greedy_sample_triton(logits, got, got_tok)
    greedy_sample_torch(logits, want, want_tok)
    return got, want, got_tok, want_tok


@pytest.mark.parametrize("n,v", [(1, 4096), (3, 5000), (2, 128256), (5, 17)])
def test_greedy_matches_torch_argmax(n: int, v: int) -> None:
    g = torch.Generator().manual_seed(n * v)
    logits = torch.randn(n, v, generator=g).to(DEVICE)
    got, want, got_tok, want_tok = _both(logits)
    assert torch.equal(got[:, 0], want[:, 0])
    assert got[:, 1].isnan().all()
    assert torch.equal(got_tok, want_tok)
    # twice in a row: the per-row counts were left at zero
    again, _, _, _ = _both(logits)
    assert torch.equal(again[:, 0], want[:, 0])


def test_greedy_ties_infinities_and_nan_follow_torch() -> None:
    v = 9000  # three programs a row
    rows = torch.zeros(5, v)
    rows[0, [10, 4100, 8999]] = 3.0  # a tie across programs: the first wins
    rows[1] = float("-inf")  # all -inf: index 0
    rows[2, 6000] = float("inf")
    rows[2, 7000] = float("inf")
    rows[3, 5000] = math.nan  # NaN is torch's maximum
    rows[3, 6000] = float("inf")
    rows[4, [100, 200]] = math.nan  # the first NaN
    logits = rows.to(DEVICE)
    got, want, got_tok, want_tok = _both(logits)
    assert got[:, 0].tolist() == want[:, 0].tolist() == [10.0, 0.0, 6000.0, 5000.0, 100.0]
    assert torch.equal(got_tok, want_tok)


def test_greedy_rejects_bad_outputs() -> None:
    logits = torch.zeros(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        greedy_sample_triton(logits, torch.zeros(2, 2, device=DEVICE))
    with pytest.raises(ValueError, match="tokens_out must be"):
        greedy_sample_triton(logits, torch.zeros(2, 2, dtype=torch.float64, device=DEVICE),
                             torch.zeros(2, device=DEVICE))


def test_fed_back_ids_match_torch() -> None:
    fed = torch.tensor([11, 22, 33, 44], dtype=torch.int32, device=DEVICE)
    ids = torch.tensor([5, -1, -4, 0, -2, 9, -3], dtype=torch.int32, device=DEVICE)
    got, want = ids.clone(), ids.clone()
    resolve_fed_back_triton(got, fed)
    resolve_fed_back_torch(want, fed)
    assert got.tolist() == want.tolist() == [5, 11, 44, 0, 22, 9, 33]
