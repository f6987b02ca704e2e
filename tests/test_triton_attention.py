"""The Triton attention backend against a float64 reference.

Without CUDA the kernels run in Triton's interpreter (small shapes, fp32 / fp16); the `gpu`
tests take the full matrix. Every cache slot that no sequence owns (the null block 0, the tail
of each last block, spare blocks) holds NaN, so a kernel that reads past a sequence's keys
fails; so does one that leaves output or workspace unwritten (both are poisoned with NaN).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a CPU-only install: the GPU tests skip
    triton = None  # type: ignore[assignment]
from trtdist.kernels.attention import AttentionInputs
from trtdist.kernels.triton_attention import TritonAttentionBackend, TritonAttentionMetadata

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


class Case:
    """A paged KV cache holding `ctx_lens[i]` tokens of sequence i, whose last `q_lens[i]`
    are this step's new tokens (also given packed as k / v). Rows with ctx 0 are padded
    decode rows: block table of zeros, seq_len 0."""

    def __init__(self, ctx_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int,
                 bs: int, dtype: torch.dtype = torch.float32, seed: int = 0,
                 width: int | None = None, device: str = DEV) -> None:
        g = torch.Generator().manual_seed(seed)
        used = sum(-(-c // bs) for c in ctx_lens)
        num_blocks = used + 3  # block 0 (null) + spares
        perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # never block 0
        self.k_cache = torch.full((num_blocks, bs, hkv, d), math.nan, dtype=torch.float64)
        self.v_cache = torch.full_like(self.k_cache, math.nan)
        tables, slots, start = [], [], 0
        flat_k = self.k_cache.view(-1, hkv, d)
        flat_v = self.v_cache.view(-1, hkv, d)
        for c, n in zip(ctx_lens, q_lens):
            blocks = perm[start:start + -(-c // bs)]
            start += len(blocks)
            tables.append(blocks)
            pos = torch.arange(c)
            seq_slots = torch.tensor(blocks, dtype=torch.long)[pos // bs] * bs + pos % bs
            flat_k[seq_slots] = torch.randn(c, hkv, d, generator=g, dtype=torch.float64)
            flat_v[seq_slots] = torch.randn(c, hkv, d, generator=g, dtype=torch.float64)
            slots += seq_slots[c - n:].tolist() if c else [-1] * n
        w = width or max(1, max(len(t) for t in tables))
        self.tables = torch.tensor([t + [0] * (w - len(t)) for t in tables], dtype=torch.int32)
        self.ctx_lens, self.q_lens, self.bs = list(ctx_lens), list(q_lens), bs
        t = sum(q_lens)
        self.q = torch.randn(t, hq, d, generator=g, dtype=torch.float64)
        slot_t = torch.tensor(slots, dtype=torch.long)
        self.k = torch.where(slot_t[:, None, None] >= 0, flat_k[slot_t.clamp(min=0)], 0.0)
        self.v = torch.where(slot_t[:, None, None] >= 0, flat_v[slot_t.clamp(min=0)], 0.0)
        self.slots = slot_t
        self.dtype, self.device = dtype, device

    def dev(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, self.dtype)

    def inputs(self, max_seq_len: int | None = None) -> AttentionInputs:
        qsl = [0] + list(itertools.accumulate(self.q_lens))
        return AttentionInputs(
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor(self.ctx_lens, dtype=torch.int32, device=self.device),
            block_tables=self.tables.to(self.device), slot_mapping=self.slots.to(self.device),
            block_size=self.bs, max_query_len=max(self.q_lens),
            max_seq_len=max_seq_len or max(self.ctx_lens),
            is_decode=all(n == 1 for n in self.q_lens))

    def reference(self, window: int | None) -> torch.Tensor:
        """float64 softmax attention of the (dtype-rounded) inputs; zeros for empty rows."""
        q, kc, vc = (self.dev(x).double() for x in (self.q, self.k_cache, self.v_cache))
        out, start = torch.zeros_like(q), 0
        for i, (c, n) in enumerate(zip(self.ctx_lens, self.q_lens)):
            if c == 0:
                start += n
                continue
            blocks = self.tables[i, :-(-c // self.bs)].long()
            k = kc[blocks].flatten(0, 1)[:c]
            v = vc[blocks].flatten(0, 1)[:c]
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = torch.einsum("qhd,khd->hqk", q[start:start + n], k) / q.shape[-1] ** 0.5
            qp = torch.arange(c - n, c, device=q.device)[:, None]
            kp = torch.arange(c, device=q.device)[None, :]
            allowed = kp <= qp
            if window:
                allowed &= qp - kp < window
            s = s.masked_fill(~allowed, float("-inf"))
            out[start:start + n] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
            start += n
        return out


def run(backend: TritonAttentionBackend, case: Case, meta: TritonAttentionMetadata,
        window: int | None, tensors: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    q, k, v, kc, vc = tensors or tuple(case.dev(x) for x in (case.q, case.k, case.v,
                                                             case.k_cache, case.v_cache))
    ws = meta.workspace
    if ws.out is not None:
        ws.out.fill_(math.nan)
        ws.lse.fill_(math.nan)  # type: ignore[union-attr]
    if CUDA:  # the caching allocator hands this NaN block to the output's torch.empty
        torch.full(q.shape, math.nan, dtype=q.dtype, device=q.device)
    return backend.forward(q, k, v, kc, vc, meta, q.shape[-1] ** -0.5, window)


def check(case: Case, window: int | None, backend: TritonAttentionBackend | None = None,
          max_seq_len: int | None = None) -> None:
    backend = backend or TritonAttentionBackend()
    got = run(backend, case, backend.prepare(case.inputs(max_seq_len)), window)
    want = case.reference(window)
    assert not got.isnan().any()
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < TOL[case.dtype], f"relative error {err:.2e}"
    for i, c in enumerate(case.ctx_lens):  # padded rows are exactly zero
        if c == 0:
            assert (got[sum(case.q_lens[:i]):sum(case.q_lens[:i + 1])] == 0).all()


# ------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: small shapes


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,window,target", [
    (torch.float32, 8, 2, 16, 4, None, 1000),  # split over up to 3 partitions
    (torch.float32, 4, 4, 16, 16, 7, 1000),  # MHA (dot-free path), window
    (torch.float16, 8, 1, 80, 16, None, 1),  # no split, non-power-of-two head_dim
    (torch.float16, 12, 4, 32, 8, 300, 1000),  # GQA 3, window across partitions
])
@pytest.mark.parametrize("merge_in_partial", [True, False], ids=["merge-partial",
                                                                  "merge-kernel"])
def test_decode(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int,
                window: int | None, target: int, merge_in_partial: bool) -> None:
    case = Case([9, 1, 600, 16, 0, 4], [1] * 6, hq, hkv, d, bs, dtype, seed=hq + d)
    backend = TritonAttentionBackend(target_programs=target, merge_in_partial=merge_in_partial)
    check(case, window, backend)
    counts = backend._eager_ws.counts
    assert counts is None or not counts.any()  # every last arrival reset its counter


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,window,target", [
    (torch.float16, 8, 1, 80, 16, None, 1),  # no split, non-power-of-two head_dim
    (torch.float16, 12, 4, 32, 8, 300, 1000),  # GQA 3, window across partitions
    (torch.float16, 4, 4, 16, 16, 7, 1000),  # MHA (dot-free path), window
])
@pytest.mark.parametrize("row_config", [None, (16, 4, 1)])
def test_decode_first_tile_before_the_wait(dtype: torch.dtype, hq: int, hkv: int, d: int,
                                           bs: int, window: int | None, target: int,
                                           row_config: tuple[int, int, int] | None) -> None:
    """The one-sequence launch (`row_config`, None: the batch launch) with KV_EARLY (each
    slice's first K / V tile loaded before the PDL wait, the newest key reloaded after it)
    computes what the loop does; batches beside it keep their launch."""
    backend = TritonAttentionBackend(target_programs=target)
    backend.kv_early, backend.row_config = True, row_config
    backend.row_min_chunk = 16 if row_config else 256  # one sequence: many slices, or few
    check(Case([9, 1, 600, 16, 0, 4], [1] * 6, hq, hkv, d, bs, dtype, seed=hq + d), window,
          backend)
    check(Case([300], [1], hq, hkv, d, bs, dtype, seed=d), window, backend)
    counts = backend._eager_ws.counts
    assert counts is None or not counts.any()


def test_row_launch_switches_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TRTDIST_ATTN_KV_EARLY", "TRTDIST_ATTN_ROW_CONFIG", "TRTDIST_ATTN_ROW_PROGRAMS",
                 "TRTDIST_ATTN_ROW_MIN_CHUNK"):
        monkeypatch.delenv(name, raising=False)
    b = TritonAttentionBackend()
    assert (b.kv_early, b.row_config, b.row_programs, b.row_min_chunk) == (True, (32, 4, 2),
                                                                            None, 128)
    monkeypatch.setenv("TRTDIST_ATTN_KV_EARLY", "0")
    monkeypatch.setenv("TRTDIST_ATTN_ROW_CONFIG", "none")
    b = TritonAttentionBackend()
    assert (b.kv_early, b.row_config) == (False, None)
    monkeypatch.setenv("TRTDIST_ATTN_KV_EARLY", "1")
    monkeypatch.setenv("TRTDIST_ATTN_ROW_CONFIG", "32:4:3")
    monkeypatch.setenv("TRTDIST_ATTN_ROW_PROGRAMS", "128")
    b = TritonAttentionBackend()
    assert (b.kv_early, b.row_config, b.row_programs) == (True, (32, 4, 3), 128)
    assert b._target_programs(torch.device("cpu"), 1) == 128
    assert b._target_programs(torch.device("cpu"), 2) == 16  # 4 a (stand-in) CPU "SM"
    for name, bad, match in (("TRTDIST_ATTN_KV_EARLY", "yes", "must be 0 or 1"),
                             ("TRTDIST_ATTN_ROW_CONFIG", "24:4:3", "block_n:warps:stages"),
                             ("TRTDIST_ATTN_ROW_CONFIG", "32:4", "block_n:warps:stages"),
                             ("TRTDIST_ATTN_ROW_PROGRAMS", "0", "positive number"),
                             ("TRTDIST_ATTN_ROW_MIN_CHUNK", "8", "number of keys >= 16")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=match):
            TritonAttentionBackend()
        monkeypatch.delenv(name)


def test_merge_mode_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRTDIST_ATTN_MERGE", raising=False)
    assert TritonAttentionBackend().merge_in_partial
    monkeypatch.setenv("TRTDIST_ATTN_MERGE", "kernel")
    assert not TritonAttentionBackend().merge_in_partial
    monkeypatch.setenv("TRTDIST_ATTN_MERGE", "both")
    with pytest.raises(ValueError, match="TRTDIST_ATTN_MERGE must be one of"):
        TritonAttentionBackend()
    monkeypatch.delenv("TRTDIST_ATTN_MERGE")
    assert TritonAttentionBackend().table_early
    monkeypatch.setenv("TRTDIST_ATTN_TABLE_EARLY", "0")
    assert not TritonAttentionBackend().table_early
    monkeypatch.setenv("TRTDIST_ATTN_TABLE_EARLY", "late")
    with pytest.raises(ValueError, match="TRTDIST_ATTN_TABLE_EARLY must be 0 or 1"):
        TritonAttentionBackend()


@pytest.mark.parametrize("dtype,hq,hkv,d,bs,window", [
    (torch.float32, 4, 4, 16, 4, None),
    (torch.float32, 8, 2, 16, 16, 5),
    (torch.float16, 8, 1, 80, 16, None),
    (torch.float16, 6, 2, 32, 8, 40),
])
def test_prefill_with_cached_prefix(dtype: torch.dtype, hq: int, hkv: int, d: int, bs: int,
                                    window: int | None) -> None:
    # whole prompts, chunks after a cached prefix, a decode row inside a mixed batch, and a
    # query longer than one BLOCK_M tile after a prefix
    case = Case([7, 19, 1, 33, 140, 200], [7, 5, 1, 12, 100, 1], hq, hkv, d, bs, dtype,
                seed=hq * d)
    check(case, window)


@pytest.mark.parametrize("target,merge_in_partial", [(1, True), (1000, True), (1000, False)])
def test_capture_metadata_survives_new_lengths(target: int, merge_in_partial: bool) -> None:
    """prepare_for_capture's metadata (grid fixed by max_model_len) stays right when the
    static buffers are refilled with other lengths, padded rows included."""
    max_model_len, bs, hq, hkv, d = 1024, 16, 8, 2, 16
    width = max_model_len // bs
    first = Case([5, 300, 17, 0], [1] * 4, hq, hkv, d, bs, seed=1, width=width)
    backend = TritonAttentionBackend(hq, hkv, d, target_programs=target,
                                     merge_in_partial=merge_in_partial)
    static = first.inputs()
    meta = backend.prepare_for_capture(
        AttentionInputs(**{**_fields(static), "max_seq_len": max_model_len}))
    # the model shape is known: a split decode gets its workspace here, never in forward
    assert (meta.workspace.out is not None) == (target > 1)
    workspace = meta.workspace.out
    for seed, lens in ((1, [5, 300, 17, 0]), (2, [1000, 0, 3, 64])):
        case = Case(lens, [1] * 4, hq, hkv, d, bs, seed=seed, width=width)
        new = case.inputs()
        static.seq_lens.copy_(new.seq_lens)
        static.block_tables.copy_(new.block_tables)
        got = run(backend, case, meta, None)
        want = case.reference(None)
        assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
        assert (got[[i for i, c in enumerate(lens) if c == 0]] == 0).all()
    assert meta.workspace.out is workspace


def test_bad_inputs_are_named() -> None:
    case = Case([4], [4], 4, 2, 16, 4)
    backend = TritonAttentionBackend()
    meta = backend.prepare(case.inputs())
    q, k, v, kc, vc = (case.dev(x) for x in (case.q, case.k, case.v, case.k_cache, case.v_cache))
    with pytest.raises(ValueError, match="multiple of kv heads"):
        backend.forward(q[:, :3], k, v, kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="float16, bfloat16, float32"):
        backend.forward(q.double(), k, v, kc, vc, meta, 1.0)
    with pytest.raises(ValueError, match="sliding_window"):
        backend.forward(q, k, v, kc, vc, meta, 1.0, 0)
    with pytest.raises(ValueError, match="block_size"):
        backend.forward(q, k, v, kc.view(-1, 2, 2, 16), vc.view(-1, 2, 2, 16), meta, 1.0)


def _fields(inputs: AttentionInputs) -> dict[str, object]:
    return {f: getattr(inputs, f) for f in AttentionInputs.__dataclass_fields__}


# ------------------------------------------------------------------------------------------
# GPU: the full matrix

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = [64, 80, 96, 128, 256]
GQA = [(8, 8), (32, 8), (32, 4)]  # ratios 1, 4, 8
BLOCKS = [16, 32, 64, 128]


def _blocks(dtype: torch.dtype, d: int, hq: int, hkv: int) -> list[int]:
    """Two block sizes per (dtype, head_dim, GQA) point, rotating so that every block size
    meets every dtype, head_dim and ratio across the matrix (each size compiles its own
    kernels; the full product would take many minutes of compilation)."""
    i = DTYPES.index(dtype) + HEAD_DIMS.index(d) + GQA.index((hq, hkv))
    return [BLOCKS[i % 4], BLOCKS[(i + 2) % 4]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_gpu_decode_matrix(dtype: torch.dtype, d: int, hq: int, hkv: int) -> None:
    for window, bs in zip((None, 500), _blocks(dtype, d, hq, hkv)):
        case = Case([1, 700, 2048, 0, 33, 4096 + 7], [1] * 6, hq, hkv, d, bs, dtype,
                    seed=d + bs)
        check(case, window)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", GQA)
def test_gpu_prefill_matrix(dtype: torch.dtype, d: int, hq: int, hkv: int) -> None:
    for window, bs in zip((None, 256), _blocks(dtype, d, hq, hkv)):
        check(_mixed_batch(hq, hkv, d, bs, dtype), window)


def _mixed_batch(hq: int, hkv: int, d: int, bs: int, dtype: torch.dtype) -> Case:
    """Query lengths 1..512, most after a cached prefix (chunked prefill / prefix reuse)."""
    q_lens = [1, 17, 512, 128, 300, 1, 64]
    prefixes = [0, 100, 0, 1000, 37, 2000, 511]
    return Case([p + n for p, n in zip(prefixes, q_lens)], q_lens, hq, hkv, d, bs, dtype,
                seed=d * bs)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("window", [None, 100])
def test_gpu_every_block_size(bs: int, window: int | None) -> None:
    """Llama-3-8B shapes (bf16, 32 / 8 heads, 128) at every block size, with and without a
    window: decode, and the mixed prefill batch."""
    dtype = torch.bfloat16
    check(Case([1, 700, 2048, 0, 33, 4103], [1] * 6, 32, 8, 128, bs, dtype, seed=bs), window)
    check(_mixed_batch(32, 8, 128, bs, dtype), window)


if triton is not None:
    @triton.jit
    def _slow_row_write(k_ptr, v_ptr, k_src, v_src, dummy, spin, D: tl.constexpr,
                        PDL: tl.constexpr):
        """Let the next kernel launch at once, work for a while, then write one cached K and
        V row: what a qkv kernel does to the attention that follows it."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()
        x = tl.load(dummy)
        for _ in range(spin):
            x = x * 0.999 + 0.001
        tl.store(dummy, x)
        d = tl.arange(0, D)
        tl.store(k_ptr + d, tl.load(k_src + d))
        tl.store(v_ptr + d, tl.load(v_src + d))


@pytest.mark.gpu
@pytest.mark.parametrize("context", [1, 200, 1000])
def test_gpu_first_tile_before_the_wait_sees_the_newest_key(context: int) -> None:
    """With the one-sequence launch (K / V before the PDL wait), the newest key is written by
    the kernel still running before the attention: a kernel that lets the attention launch
    at its start and writes that row last. The attention must use the written row, not the
    NaN the cache held when its programs loaded the tile."""
    from trtdist.kernels._triton import pdl_enabled

    dev = torch.device("cuda")
    if not pdl_enabled(dev):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    hq, hkv, d, bs = 32, 8, 128, 16
    case = Case([context], [1], hq, hkv, d, bs, torch.bfloat16, seed=context)
    want = case.reference(None)
    q, kc, vc = (case.dev(x) for x in (case.q, case.k_cache, case.v_cache))
    slot = int(case.slots[0])
    rows = [(kc.view(-1, hkv, d)[slot].clone(), vc.view(-1, hkv, d)[slot].clone())]
    backend = TritonAttentionBackend()
    assert backend.kv_early and backend.row_config is not None  # the defaults at one sequence
    meta = backend.prepare(case.inputs(8192))
    backend.forward(q, q[:, :hkv], q[:, :hkv], kc, vc, meta, d ** -0.5)  # compile
    dummy = torch.zeros(1, device=dev)
    for _ in range(3):
        kc.view(-1, hkv, d)[slot] = math.nan  # the stale row
        vc.view(-1, hkv, d)[slot] = math.nan
        (k_row, v_row), = rows
        _slow_row_write[(1,)](kc.view(-1, hkv * d)[slot], vc.view(-1, hkv * d)[slot],
                              k_row.view(-1), v_row.view(-1), dummy, 200_000, D=hkv * d,
                              PDL=True, launch_pdl=True)
        got = backend.forward(q, q[:, :hkv], q[:, :hkv], kc, vc, meta, d ** -0.5)
        torch.cuda.synchronize()
        assert not got.isnan().any(), context
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err < TOL[torch.bfloat16], (context, err)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 4096])
def test_gpu_long_context(window: int | None) -> None:
    """32k contexts: decode, and a 512-token chunk after a 32k prefix."""
    decode = Case([32768, 17, 32000], [1] * 3, 32, 8, 128, 16, torch.bfloat16, seed=5)
    check(decode, window)
    chunk = Case([32768 + 512, 2048], [512, 2048], 32, 8, 128, 64, torch.bfloat16, seed=6)
    check(chunk, window)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_gpu_decode_graph_replay_equals_eager(batch: int) -> None:
    max_model_len, bs, hq, hkv, d, dtype = 8192, 16, 32, 8, 128, torch.bfloat16
    width = max_model_len // bs
    g = torch.Generator().manual_seed(batch)

    def lengths() -> list[int]:
        longest = max_model_len if batch <= 8 else 2048  # keeps the float64 reference small
        lens = torch.randint(1, longest, (batch,), generator=g).tolist()
        if batch > 1:
            lens[-1] = 0  # a padded row
        return lens

    first = Case(lengths(), [1] * batch, hq, hkv, d, bs, dtype, seed=batch, width=width)
    # Static buffers, as the runtime keeps them: caches sized for every case below.
    cases = [first] + [Case(lengths(), [1] * batch, hq, hkv, d, bs, dtype, seed=batch + r,
                            width=width) for r in range(1, 3)]
    nb = max(c.k_cache.shape[0] for c in cases)
    kc = torch.zeros(nb, bs, hkv, d, device="cuda", dtype=dtype)
    vc = torch.zeros_like(kc)
    static = first.inputs()
    q = torch.zeros(batch, hq, d, device="cuda", dtype=dtype)

    def load(case: Case) -> None:
        n = case.k_cache.shape[0]
        kc.fill_(math.nan)
        vc.fill_(math.nan)
        kc[:n].copy_(case.dev(case.k_cache))
        vc[:n].copy_(case.dev(case.v_cache))
        q.copy_(case.dev(case.q))
        new = case.inputs()
        static.seq_lens.copy_(new.seq_lens)
        static.block_tables.copy_(new.block_tables)

    backend = TritonAttentionBackend()
    meta = backend.prepare_for_capture(
        AttentionInputs(**{**_fields(static), "max_seq_len": max_model_len}))
    load(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (compiles, allocates the workspace)
        backend.forward(q, q[:, :hkv], q[:, :hkv], kc, vc, meta, d ** -0.5)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(q, q[:, :hkv], q[:, :hkv], kc, vc, meta, d ** -0.5)
    for case in cases[1:] + [first]:
        load(case)
        out.fill_(math.nan)
        graph.replay()
        eager_meta = backend.prepare(AttentionInputs(
            **{**_fields(static), "max_seq_len": max(case.ctx_lens)}))
        eager = backend.forward(q, q[:, :hkv], q[:, :hkv], kc, vc, eager_meta, d ** -0.5)
        want = case.reference(None)
        assert not out.isnan().any()
        assert ((out.double() - want).norm() / want.norm()).item() < TOL[dtype]
        assert ((out.double() - eager.double()).norm() / want.norm()).item() < 1e-2
        if batch > 1:
            assert (out[-1] == 0).all()


_PIPELINE_SCRIPT = textwrap.dedent("""
    import re, torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from trtdist.kernels import triton_attention as ta

    PTRS = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32",
                qsl_ptr="*i32", out_ptr="*bf16", ws_o_ptr="*fp32", ws_lse_ptr="*fp32",
                amax_ptr="*fp32", count_ptr="*i32")

    def waits(fn, consts, fp8, warps, stages):
        cache = "*fp8e4nv" if fp8 else "*bf16"
        ptrs = dict(PTRS, kc_ptr=cache, vc_ptr=cache, ks_ptr="*fp32" if fp8 else cache,
                    vs_ptr="*fp32" if fp8 else cache)
        sig = {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n == "qk_scale"
                                                            else "i32") for n in fn.arg_names}
        # as the runtime specialises pointers and strides (multiples of 16)
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                 if sig[n] not in ("constexpr", "fp32") and n not in ("window", "num_parts")}
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))
        return [int(n) for n in re.findall(r"async_wait[^\\n]*num = (\\d+)", k.asm["ttgir"])]

    common = dict(HEAD_DIM=128, D_PAD=128, HAS_WINDOW=False, DOT_PREC="tf32")
    for fp8, bs in ((False, 16), (True, 32)):
        bn, warps, stages, ahead = ta._decode_config(128, torch.bfloat16, fp8)
        for early in (False, True) if ahead else (False,):  # the first tile peeled or not
            w = waits(ta._decode_partial, dict(common, GROUP=4, GROUP_PAD=16, BLOCK_SIZE=bs,
                      BLOCK_N=bn, SPLIT=False, USE_DOT=True, MIXED=False, KV_FP8=fp8,
                      KV_F16=fp8, V_T=fp8, PDL=True, AMAX=False, TABLE_AHEAD=ahead,
                      MERGE=False, GROUP_M=4, BLOCK_P=8, TABLE_EARLY=True, KV_EARLY=early),
                      fp8, warps, stages)
            # the bf16 decode loop keeps tiles in flight while it computes; FP8 keeps its loop
            assert (max(w) > 0) == ahead, ("decode", fp8, early, w)
        bm, bn, warps, stages = ta._prefill_config(128, torch.bfloat16)
        w = waits(ta._prefill, dict(common, GROUP=4, BLOCK_SIZE=bs, BLOCK_M=bm, BLOCK_N=bn,
                  SKIP_SINGLE=False, KV_FP8=fp8, KV_F16=fp8, V_T=fp8), fp8, warps, stages)
        # every loop over keys pipelined: bf16 the cached prefix and two over the new
        # tokens, FP8 two over the cache
        assert sum(n > 0 for n in w) == (2 if fp8 else 3), ("prefill", fp8, w)
    print("pipelined")
""")


def test_paged_loops_keep_tiles_in_flight_on_hopper() -> None:
    """Without a GPU: compile the decode and prefill kernels for sm_90 and check that Triton
    multi-buffers their paged K / V loads (an `async_wait` that leaves copies in flight in
    every loop over keys). Loading a tile's block ids in its own iteration silently turned
    each loop into load-then-compute (`_block_ids`)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _PIPELINE_SCRIPT], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "pipelined" in run.stdout, run.stderr[-3000:]
