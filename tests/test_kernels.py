"""Attention kernels against a dense causal reference, and against each other."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from trtdist.kernels.paged_attention import (
    AttentionMetadata,
    paged_attention_torch,
    paged_decode_torch,
    write_kv_cache,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _setup(ctx_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, bs: int,
           device: str, dtype: torch.dtype = torch.float32, seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // bs) for c in ctx_lens) + 3
    k_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(device, dtype)
    v_cache = torch.randn(num_blocks, bs, hkv, d, generator=g).to(device, dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered blocks
    tables, slots, start = [], [], 0
    for c, n in zip(ctx_lens, q_lens):
        nb = -(-c // bs)
        blocks = perm[start:start + nb]
        start += nb
        tables.append(blocks)
        slots += [blocks[p // bs] * bs + p % bs for p in range(c - n, c)]
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor([0] + list(torch.tensor(q_lens).cumsum(0)),
                                     dtype=torch.int32, device=device),
        context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=bt.to(device), slot_mapping=torch.tensor(slots, device=device),
        query_lens_host=tuple(q_lens), context_lens_host=tuple(ctx_lens), block_size=bs,
        is_decode=all(n == 1 for n in q_lens))
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(device, dtype)
    k_new = torch.randn(sum(q_lens), hkv, d, generator=g).to(device, dtype)
    v_new = torch.randn(sum(q_lens), hkv, d, generator=g).to(device, dtype)
    write_kv_cache(k_new, v_new, k_cache, v_cache, meta.slot_mapping)
    return q, k_cache, v_cache, meta


def _dense(q, k_cache, v_cache, meta, window):  # type: ignore[no-untyped-def]
    """Independent reference: float64, explicit softmax over each sequence's keys."""
    out, start = [], 0
    for i, (n, c) in enumerate(zip(meta.query_lens_host, meta.context_lens_host)):
        blocks = meta.block_tables[i, :-(-c // meta.block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:c].double()
        v = v_cache[blocks].flatten(0, 1)[:c].double()
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        qi = q[start:start + n].double()
        scores = torch.einsum("qhd,khd->hqk", qi, k) / q.shape[-1] ** 0.5
        qp = torch.arange(c - n, c)[:, None].to(q.device)
        kp = torch.arange(c)[None, :].to(q.device)
        allowed = kp <= qp
        if window:
            allowed &= qp - kp < window
        scores = scores.masked_fill(~allowed, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), v))
        start += n
    return torch.cat(out).to(q.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_prefill_and_chunks(device: str, window: int | None, hq: int, hkv: int) -> None:
    q, kc, vc, meta = _setup([7, 19, 1, 33], [7, 5, 1, 12], hq, hkv, 16, 4, device)
    got = paged_attention_torch(q, kc, vc, meta, 16 ** -0.5, window)
    want = _dense(q, kc, vc, meta, window)
    assert (got - want).norm() / want.norm() < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_batched_decode_matches_reference(device: str, window: int | None, hq: int,
                                          hkv: int) -> None:
    q, kc, vc, meta = _setup([9, 1, 30, 16, 4], [1] * 5, hq, hkv, 16, 4, device, seed=3)
    got = paged_decode_torch(q, kc, vc, meta, 16 ** -0.5, window)
    want = _dense(q, kc, vc, meta, window)
    assert (got - want).norm() / want.norm() < 1e-5
    loop = paged_attention_torch(q, kc, vc, meta, 16 ** -0.5, window)
    assert torch.allclose(got, loop, atol=1e-5)
