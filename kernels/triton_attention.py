"""Triton paged attention: flash-decoding for decode steps, a varlen flash-attention kernel for
prefill / mixed chunks. The CUDA default backend (see `attention.py` for the contract).

Decode (one query token per sequence), one kernel:
`_decode_partial`: grid `(S, Hkv, P)`. A program takes one sequence, one KV head and the whole
GQA group of query heads that share it (so each K/V tile is read once for the group), over
the p-th of P equal slices of the sequence's keys, walking its pages through the block table.
Online softmax in fp32, exp2 with the scale folded in. With P == 1 it writes the final output.
Split (P > 1): the slices holding keys write their normalised output and log-sum-exp (base 2)
to a workspace and count themselves in on an arrival counter of their (sequence, KV head);
the last to arrive merges them by their log-sum-exp and writes the output (a sequence whose
keys fit one slice is written by that slice alone). This replaced a second kernel,
`_decode_reduce` (grid `(S, Hq)`, kept behind TRTDIST_ATTN_MERGE=kernel, where every program
writes a partial): at batch 1 on llama3-8b (H200) the attention went from 4.6 + 2.8 to 6.5 us
a layer.
NOTE: the slice length is computed on the device from each sequence's own length
(`ceil(len / P)`), so a fixed grid (CUDA graphs: P from max_model_len) keeps every program busy
whatever the lengths; programs past a sequence's end hold no keys (merging in the partial,
they return before the PDL wait; with the merge kernel they write an empty partial, lse =
-inf).
Padded rows (seq_len 0) produce zeros.
One sequence (batch 1) over a model-dtype cache gets its own launch (`row_config_from_env`):
32-key tiles in 2 stages (21 KB of shared memory), so its programs land beside the streaming
qkv GEMV's CTAs (~208 KB each) while it runs, and each slice's first K / V tile is loaded
before the wait (`KV_EARLY`): every key in it but this step's newest, which the previous
kernel writes and which is reloaded after the wait, comes from earlier steps. At least 128
keys a slice. llama3-8b FP8 at batch 1 on an H200: 2.30 -> 2.25 ms a token.

Prefill / mixed (`_prefill`): grid `(cdiv(max_query_len, BLOCK_M), S, Hq)`. A program takes a
block of one sequence's new queries for one head; it first attends to the cached prefix
(`seq_len - query_len` tokens, chunked prefill and prefix reuse) read from the paged cache,
then to the new tokens themselves read from the packed `k` / `v` (contiguous, causal mask only
on the diagonal tiles). Sliding window: query at position i sees keys j with i - j < window.
In a batch of several sequences the one-token queries (decode rows mixed with prefill chunks)
are left to the split decode kernel, which finds them through `query_start_loc`.

FP8 cache (`k_scale` / `v_scale`, format in `kv_quant.py`): the per-token scales are applied
outside the dots, so a tile is only converted, never multiplied element by element: the
scores `q . k` of a tile are column-scaled by the K scales, and the probabilities by the V
scales before `P @ V`. With bf16 / fp16 queries the tiles are converted E4M3 -> fp16 (one
`cvt.rn.f16x2.e4m3x2` per two values on sm_89+; E4M3 -> bf16 costs three times the
instructions and bound the decode kernel at ~47% of copy bandwidth) and the dots run in fp16:
the query is cast to fp16 (exact for bf16 values in fp16's range), and since `p * v_scale`
could underflow fp16, the V scales of a tile are divided by their maximum first and that
maximum multiplies the tile's `P @ V` in fp32. fp32 queries (the exactness path) convert to
fp32. Either way the result is exact to the dequantized values up to the rounding the
model-dtype path already has. The new tokens of a prefill are read back from the cache too, so
every query sees the same (quantized) keys the reference and later decodes see: an FP8
prefill makes one pass over the cache, in tiles aligned to absolute positions.

FP8 V layout: the runtime's pool stores V token-minor within a block (`[Hkv, D, block_size]`,
a strided `[blocks, block_size, Hkv, D]` view; `v_token_minor`). `P @ V` reduces over tokens,
and 8-bit operands have no transposing shared-memory load, so a head-dim-contiguous V tile
must be converted in registers and sent through shared memory again (decode measured 54% of
copy bandwidth; token-minor 67%, H200). Token-minor tiles are read by whole pages in
block-size runs along the tokens (`_load_tile` TOKEN_MINOR): the slots past a sequence's end in
its last page are read too and weigh nothing (p = 0, scale masked to 0), which needs them
finite: the writer never stores a NaN code (`kv_quant.quantize_kv`), the pool starts zeroed.
A V cache with a contiguous head dim is still accepted (converted in registers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait
from trtdist.kernels.attention import AttentionInputs
from trtdist.kernels.fp8_quant import check_row_amax, max_rows_into

_LOG2E = 1.4426950408889634
# A finite "minus infinity": a fully masked tile then gives p = 0, never NaN.
_NEG = tl.constexpr(-1.0e30)
_MIN_CHUNK = 256  # fewest keys a decode partition is worth (below that, merging costs more)
# the one-sequence launch's (32-key tiles, one in flight): at 256 a ~8k context walked 8 tiles a
# slice, 4% slower a token than the batch launch; 128 matches it (PERF_NOTES.md, s19e / s19f)
_ROW_MIN_CHUNK = 128
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)
_KV_FP8 = torch.float8_e4m3fn
# NOTE: the interpreter (CPU tests) cannot run inline PTX: it converts FP8 V tiles with `.to`.
_CVT_ASM = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


def _interpreter_compat() -> None:
    """NOTE: Triton 3.6's interpreter (TRITON_INTERPRET=1, the CPU test path) turns a scalar
    into a Python int with `int(ndarray of shape (1,))`, which NumPy >= 2.4 refuses, so loops
    with run-time bounds (`range(lo, hi, BLOCK)`) fail on CPU. Patch that one conversion, in
    the interpreter only; compiled kernels are untouched."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_trtdist_compat", False):
        return

    def patched(tensor, scope):  # type: ignore[no-untyped-def]
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._trtdist_compat = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_compat()


# --------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _online_update(acc, l_i, m_i, qk, v, DOT_PREC: tl.constexpr):
    """One flash-attention step: qk `[M, N]` (log2 units, masked = -inf), v `[N, D]`."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # accumulate in place in the MMA (acc as the dot's accumulator operand)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _online_update_scaled(acc, l_i, m_i, qk, v, v_sc, DOT_PREC: tl.constexpr,
                          KV_F16: tl.constexpr):
    """`_online_update` whose `P @ V` weighs the keys by `v_sc` `[N]` (FP8 V scales). KV_F16
    (fp16 operands): the scales are divided by the tile's largest first, so `p * scale`
    stays in fp16's normal range, and that largest scale multiplies the product."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_F16:
        smax = tl.max(v_sc, 0)
        smax = tl.where(smax > 0.0, smax, 1.0)
        pv = (p * (v_sc / smax)[None, :]).to(v.dtype)
        acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision=DOT_PREC) * smax
    else:
        acc = tl.dot((p * v_sc[None, :]).to(v.dtype), v, acc * alpha[:, None],
                     input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _decode_tile(q, k, v, k_sc, v_sc, mask_n, acc, l_i, m_i, qk_scale, USE_DOT: tl.constexpr,
                 DOT_PREC: tl.constexpr, KV_FP8: tl.constexpr, KV_F16: tl.constexpr):
    """One tile of a decode query group's keys: scores, online softmax, `P @ V` (see
    `_decode_partial`)."""
    if USE_DOT:
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)  # [G, N]
    else:
        qk = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], 2)  # [G, N]
    if KV_FP8:
        qk = qk * k_sc[None, :]
    qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
    if USE_DOT:
        if KV_FP8:
            acc, l_i, m_i = _online_update_scaled(acc, l_i, m_i, qk, v, v_sc, DOT_PREC, KV_F16)
        else:
            acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, DOT_PREC)
    else:  # one query head per program: float32 products instead of a one-row MMA
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_FP8:
            p = p * v_sc[None, :]
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], 1)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _e4m3_to_f16_in_registers(x):
    """E4M3 -> fp16 (exact) with the native `cvt.rn.f16x2.e4m3x2`, as inline PTX.

    NOTE: for the `P @ V` operand, whose reduction runs along tokens (strided in the cache).
    A plain `.to(tl.float16)` lets Triton move the layout change before the conversion, and
    8-bit operands have no transposing `ldmatrix`: every value then comes out of shared memory
    as one byte load (128 a thread per 128-token tile, measured 47% of copy bandwidth). An
    opaque conversion keeps it in registers, and the fp16 tile takes `ldmatrix.trans`."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; "
        "cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _load_tile(c_ptr, s_ptr, blk, slot, head, offs_d, mask_n, mask_d, like,
               stride_b, stride_s, stride_h, stride_sb, stride_ss, stride_sh,
               KV_FP8: tl.constexpr, CVT_REGS: tl.constexpr = False,
               TOKEN_MINOR: tl.constexpr = False, BLOCK_SIZE: tl.constexpr = 16,
               BLOCK_N: tl.constexpr = 16):
    """K or V of N cached tokens `[N, D]` through their pages (`blk`, `slot`: `[N]`) and,
    KV_FP8, the tokens' scales `[N]`. An FP8 tile comes back converted to `like`'s dtype
    (exact), its scales left to the caller; CVT_REGS (fp16 `like`, the V operand of a
    head-dim-contiguous cache): converted in registers, see `_e4m3_to_f16_in_registers`.
    Without KV_FP8 the tile is loaded as stored and the second result is a placeholder.

    TOKEN_MINOR: the cache is stored `[blocks, Hkv, D, BLOCK_SIZE]` (FP8 V, see the module
    docstring): slot stride 1, head-dim stride BLOCK_SIZE. The caller's N tokens must then be
    whole pages from a page-aligned start, `blk` the same over each page (tokens past the end
    in pages that exist or in the null block): the tile is read as `[D, N]` with
    BLOCK_SIZE-byte runs along the tokens, no mask along them."""
    if TOKEN_MINOR:
        RUN: tl.constexpr = BLOCK_SIZE if BLOCK_SIZE < BLOCK_N else BLOCK_N
        blk_r = tl.max_constancy(blk, RUN)
        slot_r = tl.max_contiguous(tl.multiple_of(slot, RUN), RUN)
        xt = tl.load(c_ptr + blk_r[None, :] * stride_b + slot_r[None, :] + head * stride_h
                     + offs_d[:, None] * BLOCK_SIZE, mask=mask_d[:, None], other=0.0)
        x = tl.trans(xt)  # [N, D]
    else:
        x = tl.load(c_ptr + blk[:, None] * stride_b + slot[:, None] * stride_s
                    + head * stride_h + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    sc = mask_n
    if KV_FP8:
        sc = tl.load(s_ptr + blk * stride_sb + slot * stride_ss + head * stride_sh,
                     mask=mask_n, other=0.0)
        if CVT_REGS and _CVT_ASM and not TOKEN_MINOR:
            x = _e4m3_to_f16_in_registers(x)
        else:
            x = x.to(like.dtype)
    return x, sc


@triton.jit
def _load_kv(kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk, slot, head, offs_d, mask_n, mask_d, like,
             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
             stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
             KV_FP8: tl.constexpr, KV_F16: tl.constexpr, V_T: tl.constexpr = False,
             BLOCK_SIZE: tl.constexpr = 16, BLOCK_N: tl.constexpr = 16):
    """The cached K and V tiles `[N, D]` of the same N tokens and (KV_FP8) their scales `[N]`;
    the V tile of an fp16-dot FP8 cache is converted in registers (see `_load_tile`). V_T: V
    is stored token-minor (`_load_tile`'s TOKEN_MINOR, whose page contract applies)."""
    k, k_sc = _load_tile(kc_ptr, ks_ptr, blk, slot, head, offs_d, mask_n, mask_d, like,
                         stride_kb, stride_ks, stride_kh, stride_ksb, stride_kss, stride_ksh,
                         KV_FP8)
    v, v_sc = _load_tile(vc_ptr, vs_ptr, blk, slot, head, offs_d, mask_n, mask_d, like,
                         stride_vb, stride_vs, stride_vh, stride_vsb, stride_vss, stride_vsh,
                         KV_FP8, KV_F16, V_T, BLOCK_SIZE, BLOCK_N)
    return k, v, k_sc, v_sc


@triton.jit
def _new_tokens_kv(k_ptr, v_ptr, kv_base, j, mask_n, kvh, offs_d, mask_d,
                   stride_kt, stride_kh, stride_vt, stride_vh, MASK_N: tl.constexpr):
    """K, V `[N, D]` of a prefill's own new tokens j (indices within the chunk), from the
    packed k / v (a model-dtype cache; an FP8 one reads them back from the cache, see
    `_prefill`). MASK_N: some of the N are past the chunk's end."""
    kd_mask = mask_d[None, :]
    if MASK_N:
        kd_mask = mask_n[:, None] & kd_mask
    rows = kv_base + j
    k = tl.load(k_ptr + rows[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=kd_mask, other=0.0)
    v = tl.load(v_ptr + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=kd_mask, other=0.0)
    return k, v


@triton.jit
def _block_ids(table, start, offs_n, hi, BLOCK_SIZE: tl.constexpr):
    """The block ids `[N]` of the tokens `start + offs_n`, masked by whole pages below `hi`
    (the null block past it).

    NOTE: the paged loops load these one tile ahead (a loop-carried value). Triton's pipeliner
    does not multi-buffer a load whose address comes from another load of the same iteration:
    with the block ids loaded in the tile's own iteration, the K / V copies of tile i + 1 were
    issued after tile i's math and waited for at once (`cp.async.wait_group 0`, one buffer)."""
    page = (start + offs_n) // BLOCK_SIZE
    return tl.load(table + page, mask=page * BLOCK_SIZE < hi, other=0).to(tl.int64)


@triton.jit(do_not_specialize=["num_parts"])
def _decode_partial(
    q_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, out_ptr, ws_o_ptr,
    ws_lse_ptr, amax_ptr, count_ptr, qk_scale, window, num_parts,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ksb, stride_kss, stride_ksh,
    stride_vsb, stride_vss, stride_vsh,
    stride_bt, stride_ot, stride_oh,
    stride_ws_s, stride_ws_h, stride_ws_p, stride_lse_s,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr, USE_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr, MIXED: tl.constexpr, KV_FP8: tl.constexpr, KV_F16: tl.constexpr,
    V_T: tl.constexpr, PDL: tl.constexpr, AMAX: tl.constexpr = False,
    TABLE_AHEAD: tl.constexpr = True, MERGE: tl.constexpr = False,
    GROUP_M: tl.constexpr = 1, BLOCK_P: tl.constexpr = 8, TABLE_EARLY: tl.constexpr = True,
    KV_EARLY: tl.constexpr = False,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    # NOTE: the lengths and query offsets are the step's inputs (written before its first
    # kernel), not the previous kernel's output: loaded before the wait, off the critical path
    seq_len = tl.load(seq_lens_ptr + seq)
    row = seq  # the query's row in q / out
    valid = seq >= 0
    if MIXED:  # a prefill batch: only the sequences with one new token are ours
        row = tl.load(qsl_ptr + seq)
        valid = tl.load(qsl_ptr + seq + 1) - row == 1
        seq_len = tl.where(valid, seq_len, 0)
    kv_start = 0
    if HAS_WINDOW:
        kv_start = tl.maximum(seq_len - window, 0)
    # Equal slices of this sequence's keys, rounded to whole tiles, from the start of the
    # first key's page (tiles then cover whole pages: see `_load_tile`'s TOKEN_MINOR).
    kv_first = kv_start // BLOCK_SIZE * BLOCK_SIZE
    chunk = tl.cdiv(tl.cdiv(seq_len - kv_first, num_parts), BLOCK_N) * BLOCK_N
    lo = kv_first + part * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    # Only the partitions holding keys take part in the merge (the same count in every
    # program); with one, it is the whole answer.
    active = (seq_len - kv_first + chunk - 1) // tl.maximum(chunk, 1)
    if MERGE and part > 0 and part >= active:
        # NOTE: a partition past the keys has nothing to do (a graph captured at
        # max_model_len launches many): it leaves before the wait, freeing its slot and
        # counting as triggered for the next kernel. Partition 0 stays, to write a padded
        # row's zeros.
        return

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g  # [G]
    table = bt_ptr + seq.to(tl.int64) * stride_bt
    if TABLE_AHEAD and TABLE_EARLY:
        # NOTE: the block table is a step input too: the first tile's block ids load before
        # the wait, so the K / V loads issue with q's, one dependent round trip fewer
        blk_next = _block_ids(table, lo, offs_n, hi, BLOCK_SIZE)
    loop_lo = lo
    if KV_EARLY:  # (with TABLE_AHEAD and TABLE_EARLY; a model-dtype, head-dim-minor cache)
        # NOTE: the slice's first tile loads before the wait too: every key in it but this
        # step's newest (written by the previous kernel, reloaded below) is from earlier
        # steps, so its DRAM latency leaves the critical path.
        pos0 = lo + offs_n
        mask0 = pos0 < hi
        if HAS_WINDOW:
            mask0 = mask0 & (pos0 >= kv_start)
        k0, v0, _, _ = _load_kv(
            kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk_next, pos0 % BLOCK_SIZE, kvh, offs_d, mask0,
            mask_d, offs_d, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
            False, False)
        last = seq_len - 1
        new_blk = tl.load(table + tl.maximum(last, 0) // BLOCK_SIZE).to(tl.int64)
        loop_lo = lo + BLOCK_N
        blk_next = _block_ids(table, loop_lo, offs_n, hi, BLOCK_SIZE)
    pdl_wait(PDL)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)  # [G, D]
    if not USE_DOT:
        q = q.to(tl.float32)
    if KV_F16:  # FP8 tiles convert natively to fp16: the dots run in fp16
        q = q.to(tl.float16)

    acc = tl.zeros([GROUP_PAD, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    m_i = tl.full([GROUP_PAD], _NEG, dtype=tl.float32)
    if KV_EARLY:
        new_here = (last >= lo) & (last < loop_lo) & (last < hi)
        off = new_blk * stride_kb + (last % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        new_k = tl.load(kc_ptr + off + offs_d, mask=mask_d & new_here, other=0.0)
        off = new_blk * stride_vb + (last % BLOCK_SIZE) * stride_vs + kvh * stride_vh
        new_v = tl.load(vc_ptr + off + offs_d, mask=mask_d & new_here, other=0.0)
        is_new = ((pos0 == last) & new_here)[:, None]
        k0 = tl.where(is_new, new_k[None, :], k0)
        v0 = tl.where(is_new, new_v[None, :], v0)
        acc, l_i, m_i = _decode_tile(q, k0, v0, mask0, mask0, mask0, acc, l_i, m_i, qk_scale,
                                     USE_DOT, DOT_PREC, False, False)
    if TABLE_AHEAD and not TABLE_EARLY:
        blk_next = _block_ids(table, lo, offs_n, hi, BLOCK_SIZE)
    for start in range(loop_lo, hi, BLOCK_N):
        pos = start + offs_n  # [N] token positions
        mask_n = pos < hi
        if HAS_WINDOW:
            mask_n = mask_n & (pos >= kv_start)
        if TABLE_AHEAD:
            blk = blk_next
            blk_next = _block_ids(table, start + BLOCK_N, offs_n, hi, BLOCK_SIZE)
        else:
            blk = _block_ids(table, start, offs_n, hi, BLOCK_SIZE)
        slot = pos % BLOCK_SIZE
        k, v, k_sc, v_sc = _load_kv(  # [N, D] x 2, [N] x 2
            kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk, slot, kvh, offs_d, mask_n, mask_d, q,
            stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
            stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
            KV_FP8, KV_F16, V_T, BLOCK_SIZE, BLOCK_N)
        acc, l_i, m_i = _decode_tile(q, k, v, k_sc, v_sc, mask_n, acc, l_i, m_i, qk_scale,
                                     USE_DOT, DOT_PREC, KV_FP8, KV_F16)

    pdl_trigger(PDL)
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]  # rows with no keys stay 0
    gd_mask = mask_g[:, None] & mask_d[None, :]
    if not SPLIT:
        _store_rows(out_ptr, amax_ptr, row, heads, offs_d, out, gd_mask, valid, stride_ot,
                    stride_oh, AMAX)
    elif not MERGE:
        ws = seq.to(tl.int64) * stride_ws_s + heads * stride_ws_h + part * stride_ws_p  # [G]
        tl.store(ws_o_ptr + ws[:, None] + offs_d[None, :], out, mask=gd_mask)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(ws_lse_ptr + seq * stride_lse_s + heads * num_parts + part, lse, mask=mask_g)
    else:
        if active <= 1:
            if part == 0:
                _store_rows(out_ptr, amax_ptr, row, heads, offs_d, out, gd_mask, valid,
                            stride_ot, stride_oh, AMAX)
        elif part < active:
            ws = seq.to(tl.int64) * stride_ws_s + heads * stride_ws_h + part * stride_ws_p
            tl.store(ws_o_ptr + ws[:, None] + offs_d[None, :], out, mask=gd_mask)
            lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
            tl.store(ws_lse_ptr + seq * stride_lse_s + heads * num_parts + part, lse,
                     mask=mask_g)
            # NOTE: the barrier orders every thread's partial stores before the one thread's
            # release of the arrival (cumulativity), as a cooperative grid sync does; the
            # last arrival's acquire then makes every partition's partials visible to it.
            tl.debug_barrier()
            counter = count_ptr + seq * tl.num_programs(1) + kvh
            if tl.atomic_add(counter, 1, sem="acq_rel") == active - 1:
                _merge_partitions(out_ptr, ws_o_ptr, ws_lse_ptr, amax_ptr, seq, row, kvh,
                                  active, num_parts, valid, offs_d, mask_d, stride_ot,
                                  stride_oh, stride_ws_s, stride_ws_h, stride_ws_p,
                                  stride_lse_s, GROUP, GROUP_M, D_PAD, BLOCK_P, AMAX)
                tl.store(counter, 0)  # ready for the next launch (it waits for this one)


@triton.jit
def _store_rows(out_ptr, amax_ptr, row, heads, offs_d, out, mask, valid, stride_ot, stride_oh,
                AMAX: tl.constexpr):
    """Store a program's final `[G, D]` output rows (and max their |value| into the row's
    amax slot with AMAX)."""
    o = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + offs_d[None, :], o,
             mask=mask & valid)
    if AMAX:
        a = tl.where(mask, tl.abs(o.to(tl.float32)), 0.0)
        _max_into_row(amax_ptr, row, tl.max(tl.max(a, axis=1), axis=0), valid)


@triton.jit
def _merge_partitions(out_ptr, ws_o_ptr, ws_lse_ptr, amax_ptr, seq, row, kvh, active,
                      num_parts, valid, offs_d, mask_d, stride_ot, stride_oh, stride_ws_s,
                      stride_ws_h, stride_ws_p, stride_lse_s, GROUP: tl.constexpr,
                      GROUP_M: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
                      AMAX: tl.constexpr):
    """Merge the first `active` partitions of one (sequence, KV head)'s query heads by their
    base-2 log-sum-exp (as `_decode_reduce`), BLOCK_P partitions a round trip, reading the
    partials from L2 (`.cg`: other SMs wrote them)."""
    offs_g = tl.arange(0, GROUP_M)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    offs_p = tl.arange(0, BLOCK_P)
    o_base = ws_o_ptr + seq.to(tl.int64) * stride_ws_s + heads * stride_ws_h  # [GM]
    lse_base = ws_lse_ptr + seq * stride_lse_s + heads * num_parts  # [GM]
    acc = tl.zeros([GROUP_M, D_PAD], dtype=tl.float32)
    total = tl.zeros([GROUP_M], dtype=tl.float32)
    m = tl.full([GROUP_M], _NEG, dtype=tl.float32)
    for p0 in range(0, active, BLOCK_P):
        pp = p0 + offs_p
        mask_gp = mask_g[:, None] & (pp < active)[None, :]  # [GM, BP]
        lse = tl.load(lse_base[:, None] + pp[None, :], mask=mask_gp, other=float("-inf"),
                      cache_modifier=".cg")
        o = tl.load(o_base[:, None, None] + pp[None, :, None] * stride_ws_p
                    + offs_d[None, None, :], mask=mask_gp[:, :, None] & mask_d[None, None, :],
                    other=0.0, cache_modifier=".cg")  # [GM, BP, D]
        m_new = tl.maximum(m, tl.max(lse, 1))
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new[:, None])
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 1)
        total = total * alpha + tl.sum(w, 1)
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)[:, None]
    _store_rows(out_ptr, amax_ptr, row, heads, offs_d, out, mask_g[:, None] & mask_d[None, :],
                valid, stride_ot, stride_oh, AMAX)


@triton.jit
def _max_into_row(amax_ptr, row, m, valid):
    """Max `m`, a program's max |output|, into `amax[row]` (the FP8 o projection's per-token
    amax, `kernels/fp8_gemm.py`): one relaxed atomic a program; the reader waits for the
    launch to complete."""
    tl.atomic_max(amax_ptr + row, m, mask=valid, sem="relaxed")


@triton.jit(do_not_specialize=["num_parts"])
def _decode_reduce(
    out_ptr, ws_o_ptr, ws_lse_ptr, qsl_ptr, amax_ptr, num_parts,
    stride_ot, stride_oh, stride_ws_s, stride_ws_h, stride_ws_p, stride_lse_s,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_P: tl.constexpr, MIXED: tl.constexpr,
    PDL: tl.constexpr, AMAX: tl.constexpr = False,
):
    """Merge the partitions of one (sequence, head), BLOCK_P at a time, by their base-2
    log-sum-exp; empty partitions have lse = -inf and weigh nothing. With AMAX, the head's
    max |output| is maxed into `amax[row]`."""
    pdl_wait(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = seq
    valid = seq >= 0
    if MIXED:
        row = tl.load(qsl_ptr + seq)
        valid = tl.load(qsl_ptr + seq + 1) - row == 1
    offs_d = tl.arange(0, D_PAD)
    offs_p = tl.arange(0, BLOCK_P)
    lse_base = ws_lse_ptr + seq.to(tl.int64) * stride_lse_s + head * num_parts
    base = ws_o_ptr + seq.to(tl.int64) * stride_ws_s + head * stride_ws_h
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    m = tl.full([1], _NEG, dtype=tl.float32)
    for p0 in range(0, num_parts, BLOCK_P):
        pp = p0 + offs_p
        mask_p = pp < num_parts
        lse = tl.load(lse_base + pp, mask=mask_p, other=float("-inf"))  # [BP]
        m_new = tl.maximum(m, tl.max(lse, 0))  # [1]
        alpha = tl.exp2(m - m_new)
        w = tl.exp2(lse - m_new)  # [BP]
        o = tl.load(base + pp[:, None] * stride_ws_p + offs_d[None, :],
                    mask=mask_p[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    out = acc / tl.where(total > 0.0, total, 1.0)  # an empty sequence: zeros
    pdl_trigger(PDL)
    o = out.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + offs_d, o,
             mask=(offs_d < HEAD_DIM) & valid)
    if AMAX:
        a = tl.where(offs_d < HEAD_DIM, tl.abs(o.to(tl.float32)), 0.0)
        _max_into_row(amax_ptr, row, tl.max(a, axis=0), valid)


@triton.jit
def _prefill_cache_tile(acc, l_i, m_i, start, q, q_pos, kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk,
                        kvh, kv_hi, qk_scale, window, offs_n, offs_d, mask_d,
                        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                        stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                        BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                        HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                        KV_F16: tl.constexpr, V_T: tl.constexpr, CAUSAL: tl.constexpr):
    """One prefill tile over an FP8 cache: the keys at absolute positions [start, start +
    BLOCK_N) below kv_hi, for queries at `q_pos` `[M]`; CAUSAL: some keys lie after some
    queries; `blk` `[N]`: the tile's block ids (`_block_ids`, loaded a tile ahead). Returns
    the updated online softmax state."""
    pos = start + offs_n
    mask_n = pos < kv_hi
    slot = pos % BLOCK_SIZE
    k, v, k_sc, v_sc = _load_kv(
        kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk, slot, kvh, offs_d, mask_n, mask_d, q,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
        True, KV_F16, V_T, BLOCK_SIZE, BLOCK_N)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    qk = qk * k_sc[None, :]
    allowed = mask_n[None, :]
    if CAUSAL:
        allowed = allowed & (pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        allowed = allowed & (q_pos[:, None] - pos[None, :] < window)
    qk = tl.where(allowed, qk, float("-inf"))
    return _online_update_scaled(acc, l_i, m_i, qk, v, v_sc, DOT_PREC, KV_F16)


@triton.jit
def _prefill(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    qk_scale, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
    stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
    stride_bt, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, SKIP_SINGLE: tl.constexpr,
    KV_FP8: tl.constexpr, KV_F16: tl.constexpr, V_T: tl.constexpr,
):
    # NOTE: the last query blocks of a causal prompt have the most keys: start them first so
    # the short ones fill the tail of the launch.
    mblk = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    kvh = head // GROUP
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    m0 = mblk * BLOCK_M
    done = m0 >= q_len
    if SKIP_SINGLE:  # one-token queries went to the decode kernel
        done = done | (q_len == 1)
    if done:
        return
    ctx_len = tl.load(seq_lens_ptr + seq) - q_len  # cached prefix before the new tokens

    offs_m = m0 + tl.arange(0, BLOCK_M)  # query index within the sequence's new tokens
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # [M, D]
    if KV_F16:  # FP8 tiles convert natively to fp16: the dots run in fp16
        q = q.to(tl.float16)

    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], _NEG, dtype=tl.float32)
    q_pos = ctx_len + offs_m  # absolute positions of the block's queries

    table = bt_ptr + seq.to(tl.int64) * stride_bt
    if KV_FP8:
        # Every key from the cache (the new tokens too: what the reference and later decodes
        # read), in tiles aligned to absolute positions, so they are whole pages (`_load_tile`
        # TOKEN_MINOR): first the tiles wholly before the block's first query (no causal mask),
        # then the diagonal ones up to its last query.
        kv_lo = 0
        if HAS_WINDOW:  # from the start of the tile (so the first loop ends at `diag`); the
            # window mask does the rest
            kv_lo = tl.maximum(ctx_len + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
        kv_hi = ctx_len + tl.minimum(m0 + BLOCK_M, q_len)
        diag = tl.maximum((ctx_len + m0) // BLOCK_N * BLOCK_N, kv_lo)
        blk_next = _block_ids(table, kv_lo, offs_n, kv_hi, BLOCK_SIZE)
        for start in range(kv_lo, diag, BLOCK_N):
            blk = blk_next
            blk_next = _block_ids(table, start + BLOCK_N, offs_n, kv_hi, BLOCK_SIZE)
            acc, l_i, m_i = _prefill_cache_tile(
                acc, l_i, m_i, start, q, q_pos, kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk, kvh,
                kv_hi, qk_scale, window, offs_n, offs_d, mask_d, stride_kb, stride_ks,
                stride_kch, stride_vb, stride_vs, stride_vch, stride_ksb, stride_kss,
                stride_ksh, stride_vsb, stride_vss, stride_vsh, BLOCK_SIZE, BLOCK_N,
                HAS_WINDOW, DOT_PREC, KV_F16, V_T, False)
        # NOTE: kv_lo and diag are whole tiles apart, so blk_next is diag's tile here
        for start in range(diag, kv_hi, BLOCK_N):
            blk = blk_next
            blk_next = _block_ids(table, start + BLOCK_N, offs_n, kv_hi, BLOCK_SIZE)
            acc, l_i, m_i = _prefill_cache_tile(
                acc, l_i, m_i, start, q, q_pos, kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk, kvh,
                kv_hi, qk_scale, window, offs_n, offs_d, mask_d, stride_kb, stride_ks,
                stride_kch, stride_vb, stride_vs, stride_vch, stride_ksb, stride_kss,
                stride_ksh, stride_vsb, stride_vss, stride_vsh, BLOCK_SIZE, BLOCK_N,
                HAS_WINDOW, DOT_PREC, KV_F16, V_T, True)
    else:
        # 1. The cached prefix [lo, ctx_len), through the block table. Causal by construction.
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(ctx_len + m0 - window + 1, 0)
        blk_next = _block_ids(table, lo, offs_n, ctx_len, BLOCK_SIZE)
        for start in range(lo, ctx_len, BLOCK_N):
            pos = start + offs_n
            mask_n = pos < ctx_len
            blk = blk_next
            blk_next = _block_ids(table, start + BLOCK_N, offs_n, ctx_len, BLOCK_SIZE)
            slot = pos % BLOCK_SIZE
            k, v, _, _ = _load_kv(
                kc_ptr, vc_ptr, ks_ptr, vs_ptr, blk, slot, kvh, offs_d, mask_n, mask_d, q,
                stride_kb, stride_ks, stride_kch, stride_vb, stride_vs, stride_vch,
                stride_ksb, stride_kss, stride_ksh, stride_vsb, stride_vss, stride_vsh,
                False, False)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            allowed = mask_n[None, :]
            if HAS_WINDOW:
                allowed = allowed & (q_pos[:, None] - pos[None, :] < window)
            qk = tl.where(allowed, qk, float("-inf"))
            acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, DOT_PREC)

        # 2. The new tokens, from the packed k / v. Tiles wholly below the diagonal need no
        # causal mask; BLOCK_M is a multiple of BLOCK_N so the diagonal starts on a tile.
        j_lo = 0
        if HAS_WINDOW:
            j_lo = (tl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        kv_base = q_start.to(tl.int64)
        for start in range(j_lo, m0, BLOCK_N):
            j = start + offs_n
            k, v = _new_tokens_kv(k_ptr, v_ptr, kv_base, j, j < m0, kvh, offs_d, mask_d,
                                  stride_kt, stride_kh, stride_vt, stride_vh, False)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if HAS_WINDOW:
                qk = tl.where(offs_m[:, None] - j[None, :] < window, qk, float("-inf"))
            acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, DOT_PREC)
        hi = tl.minimum(m0 + BLOCK_M, q_len)
        for start in range(m0, hi, BLOCK_N):
            j = start + offs_n
            mask_n = j < hi
            k, v = _new_tokens_kv(k_ptr, v_ptr, kv_base, j, mask_n, kvh, offs_d, mask_d,
                                  stride_kt, stride_kh, stride_vt, stride_vh, True)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            allowed = mask_n[None, :] & (j[None, :] <= offs_m[:, None])
            if HAS_WINDOW:
                allowed = allowed & (offs_m[:, None] - j[None, :] < window)
            qk = tl.where(allowed, qk, float("-inf"))
            acc, l_i, m_i = _online_update(acc, l_i, m_i, qk, v, DOT_PREC)

    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# --------------------------------------------------------------------------------------------
# launch configuration


def _dot_prec(dtype: torch.dtype) -> str:
    # NOTE: tf32 would cost fp32 models ~1e-3 relative error; fp32 is the exactness path.
    return "ieee" if dtype == torch.float32 else "tf32"


def _d_pad(d: int) -> int:
    # a power of two for tl.arange, and >= 16 for tl.dot
    return max(16, triton.next_power_of_2(d))


def _prefill_config(d_pad: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages): known-good Hopper flash-attention configs,
    checked free of register spills with ptxas for sm_90a. fp32 (the exactness path, whose
    ieee dots run on FMA units) needs small tiles to stay out of local memory.

    NOTE: over an FP8 cache the 128 x 64 launch spills 52 bytes (sm_90a); the spill-free
    128 x 32 x 8 x 3 and 64 x 32 x 4 x 3 measured 10% slower, 64 x 64 x 4 x 3 and 4 stages
    within 1% (H200, `scripts/sweep_decode_pipeline.py --prefill-configs`, 2026-11-24)."""
    if dtype == torch.float32:
        return 16, 16, 4, 1
    if d_pad <= 128:
        return 128, 64, 8, 3
    return 64, 32, 8, 2


def _decode_config(d_pad: int, dtype: torch.dtype, kv_fp8: bool = False
                   ) -> tuple[int, int, int, bool]:
    """(BLOCK_N, num_warps, num_stages, TABLE_AHEAD) for the decode partial kernel (spill-free
    on sm_90a; K/V tiles are prefetched with cp.async).

    NOTE: an FP8 cache moves half the bytes a tile: 128 tokens a step measured 1,975 GB/s
    against 1,560 with 64 (b64 x 4k, H200, 2026-11-23; bf16 caches reach 4,249 at 64). With
    fp16 dots and V converted in registers (2026-11-24, H200, b64 x 4k): 128 tokens and 2
    stages 2,218 GB/s (54% of copy); 1 stage 2,132; 3 stages 2,207; 64 tokens 1,705-1,952.
    With V stored token-minor (no layout round trip, 42 KB of shared memory): 3 stages need
    128 registers (ptxas, sm_90a), so four programs fit an SM, as for bf16.
    TABLE_AHEAD (block ids a tile ahead, see `_block_ids`) makes the loop truly pipelined:
    bf16 caches at 3 stages (100 registers, 71.7 KB) went 96.9 -> 103.5% of copy at
    b256 x 1.5k, 97.0 -> 98.1% at b64 x 4k, 45 -> 50% at b1 x 8k; FP8 caches gained nothing
    (168 registers, three programs an SM: 84.8 -> 79.9% at b64 x 4k, 87.0 -> 87.8% at
    b256 x 1.5k; H200, `scripts/sweep_decode_pipeline.py`, 2026-11-24)."""
    if dtype == torch.float32:
        return 16, 4, 2 if d_pad <= 128 else 1, False
    if d_pad > 128:
        return 32, 4, 2, False
    return (128, 4, 3, False) if kv_fp8 else (64, 4, 3, True)


def _num_partitions(num_seqs: int, kv_heads: int, max_seq_len: int, target: int,
                    min_chunk: int = _MIN_CHUNK) -> int:
    """Split the keys only as far as it takes to give the GPU about `target` programs, and
    never below `min_chunk` keys per partition of the longest sequence."""
    by_len = max(1, -(-max_seq_len // min_chunk))
    by_occupancy = max(1, -(-target // max(1, num_seqs * kv_heads)))
    return min(by_len, by_occupancy)


# --------------------------------------------------------------------------------------------
# backend

MERGE_ENV = "TRTDIST_ATTN_MERGE"
TABLE_EARLY_ENV = "TRTDIST_ATTN_TABLE_EARLY"
KV_EARLY_ENV = "TRTDIST_ATTN_KV_EARLY"
ROW_CONFIG_ENV = "TRTDIST_ATTN_ROW_CONFIG"
ROW_PROGRAMS_ENV = "TRTDIST_ATTN_ROW_PROGRAMS"
ROW_MIN_CHUNK_ENV = "TRTDIST_ATTN_ROW_MIN_CHUNK"
_MERGE_MODES = {"partial": True, "kernel": False}


def _switch(name: str, default: str) -> bool:
    v = os.environ.get(name, default)
    if v not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1 (default {default}), got {v!r}")
    return v == "1"


ROW_CONFIG = "32:4:2"


def row_config_from_env() -> tuple[int, int, int] | None:
    """TRTDIST_ATTN_ROW_CONFIG `block_n:warps:stages` (default 32:4:2; "none": the batch
    launch of `_decode_config`): the one-sequence decode's launch over a model-dtype cache
    with head_dim <= 128. 32-key tiles in 2 stages take 21 KB of shared memory (sm_90), so
    its programs fit beside a streaming GEMV's CTA (~208 KB of a 228 KB SM): they land while
    the qkv GEMV streams and load their first tile then (`KV_EARLY`). Measured: llama3-8b FP8
    batch 1 on an H200 2.30 -> 2.25 ms a token with KV_EARLY (PERF_NOTES.md, nineteenth
    session)."""
    v = os.environ.get(ROW_CONFIG_ENV, ROW_CONFIG)
    if v == "none":
        return None
    try:
        bn, warps, stages = (int(x) for x in v.split(":"))
    except ValueError:
        bn = warps = stages = 0
    if bn < 16 or bn & (bn - 1) or warps not in (1, 2, 4, 8) or not 1 <= stages <= 4:
        raise ValueError(f"{ROW_CONFIG_ENV}: want block_n:warps:stages (block_n a power of two "
                         f">= 16, warps 1, 2, 4 or 8, 1-4 stages) or none, got {v!r}")
    return bn, warps, stages


def row_programs_from_env() -> int | None:
    """TRTDIST_ATTN_ROW_PROGRAMS: the programs a one-sequence decode split aims for (unset:
    the backend's target, 4 an SM)."""
    v = os.environ.get(ROW_PROGRAMS_ENV, "")
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{ROW_PROGRAMS_ENV} must be a positive number of programs, got {v!r}")
    return int(v)


def row_min_chunk_from_env() -> int:
    """TRTDIST_ATTN_ROW_MIN_CHUNK: the fewest keys a partition of the one-sequence launch
    takes (default 128)."""
    v = os.environ.get(ROW_MIN_CHUNK_ENV, str(_ROW_MIN_CHUNK))
    if not v.isdigit() or int(v) < 16:
        raise ValueError(f"{ROW_MIN_CHUNK_ENV} must be a number of keys >= 16, got {v!r}")
    return int(v)


def merge_from_env() -> bool:
    """TRTDIST_ATTN_MERGE: "partial" (default) merges a split decode in its last partition
    program, "kernel" in a second kernel (`_decode_reduce`)."""
    v = os.environ.get(MERGE_ENV, "partial")
    if v not in _MERGE_MODES:
        raise ValueError(f"{MERGE_ENV} must be one of {sorted(_MERGE_MODES)}, got {v!r}")
    return _MERGE_MODES[v]


class _Workspace:
    """Decode partials `[S, Hq, P, D_PAD]` fp32, their log-sum-exp `[S, Hq, P]`, and the
    merge's arrival counters `[S * Hq]` int32 (zero between launches: the last arrival resets
    its counter).

    NOTE: the eager workspace (`for_graph=False`) grows when a step needs more: reallocating
    is safe there, no graph holds its address. A graph's workspace is allocated once (in
    `prepare_for_capture`, or at the first `forward`: the warm-up run or the capture itself)
    and never reallocated, because a captured graph replays into the addresses it saw."""

    def __init__(self, for_graph: bool) -> None:
        self.for_graph = for_graph
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def views(self, s: int, h: int, p: int, d_pad: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need = s * h * p * d_pad
        if self.out is None or self.out.numel() < need or self.out.device != device:
            if self.for_graph and self.out is not None:
                raise RuntimeError(
                    f"this graph's decode workspace holds {self.out.numel()} floats but "
                    f"S={s}, Hq={h}, P={p}, D_PAD={d_pad} needs {need}: one capture metadata "
                    f"serves one model shape")
            self.out = torch.empty(need, dtype=torch.float32, device=device)
            self.lse = torch.empty(s * h * p, dtype=torch.float32, device=device)
        if self.counts is None or self.counts.numel() < s * h or self.counts.device != device:
            if self.for_graph and self.counts is not None:
                raise RuntimeError(f"this graph's decode counters hold {self.counts.numel()} "
                                   f"entries but S={s}, Hq={h} needs {s * h}")
            self.counts = torch.zeros(s * h, dtype=torch.int32, device=device)
        assert self.lse is not None
        return (self.out[:need].view(s, h, p, d_pad), self.lse[:s * h * p].view(s, h, p),
                self.counts)


@dataclass(frozen=True, slots=True)
class TritonAttentionMetadata:
    """What `prepare` hands every layer: the step's device tensors and host-side bounds."""

    query_start_loc: torch.Tensor  # [S+1] int32
    seq_lens: torch.Tensor  # [S] int32
    block_tables: torch.Tensor  # [S, W] int32
    block_size: int
    max_query_len: int
    max_seq_len: int
    is_decode: bool
    workspace: _Workspace = field(repr=False)

    @property
    def num_seqs(self) -> int:
        return self.block_tables.shape[0]


class TritonAttentionBackend:
    """Paged attention in Triton (the CUDA default). See the module docstring.

    `num_q_heads`, `num_kv_heads` and `head_dim` (this rank's shard) are optional: given,
    `prepare_for_capture` allocates the decode workspace there rather than at the first
    `forward` (which may be the warm-up run before capture, or inside the capture itself;
    both are safe, the workspace is then kept for every replay)."""

    name = "triton"

    def __init__(self, num_q_heads: int | None = None, num_kv_heads: int | None = None,
                 head_dim: int | None = None, target_programs: int | None = None,
                 merge_in_partial: bool | None = None) -> None:
        self.shape = (num_q_heads, num_kv_heads, head_dim)
        # The split decode's merge: by the last partition program of each (sequence, KV
        # head) to finish (default), or by the `_decode_reduce` kernel (TRTDIST_ATTN_MERGE).
        self.merge_in_partial = (merge_from_env() if merge_in_partial is None
                                 else merge_in_partial)
        # the decode's first block ids loaded before its PDL wait (TRTDIST_ATTN_TABLE_EARLY=0:
        # after, as before the eighteenth session; for A/B runs)
        self.table_early = _switch(TABLE_EARLY_ENV, "1")
        # one-sequence decodes load each slice's first K / V tile before the wait too (a
        # model-dtype cache; the newest key reloaded after it): TRTDIST_ATTN_KV_EARLY=0 off
        self.kv_early = _switch(KV_EARLY_ENV, "1")
        self.row_config = row_config_from_env()
        self.row_programs = row_programs_from_env()
        self.row_min_chunk = row_min_chunk_from_env()
        self._eager_ws = _Workspace(for_graph=False)
        # Programs the decode split aims for; None = 4 per SM of the device (tests set it to
        # force or forbid the split).
        self.target_programs = target_programs
        self._targets: dict[torch.device, int] = {}

    def _target_programs(self, device: torch.device, num_seqs: int = 0) -> int:
        if self.target_programs is not None:
            return self.target_programs
        if num_seqs == 1 and self.row_programs is not None:
            return self.row_programs
        if device not in self._targets:
            sms = (torch.cuda.get_device_properties(device).multi_processor_count
                   if device.type == "cuda" else 4)
            self._targets[device] = 4 * sms  # a few resident programs per SM
        return self._targets[device]

    def prepare(self, inputs: AttentionInputs) -> TritonAttentionMetadata:
        return self._meta(inputs, self._eager_ws)

    def prepare_for_capture(self, inputs: AttentionInputs) -> TritonAttentionMetadata:
        if not inputs.is_decode:
            raise ValueError("prepare_for_capture is for decode buckets (is_decode=True)")
        meta = self._meta(inputs, _Workspace(for_graph=True))
        hq, hkv, d = self.shape
        if hq is not None and hkv is not None and d is not None:
            device = inputs.seq_lens.device
            # the most partitions a decode of this bucket may use (a one-sequence launch over
            # a model-dtype cache may split finer)
            min_chunk = (min(_MIN_CHUNK, self.row_min_chunk) if meta.num_seqs == 1
                         else _MIN_CHUNK)
            p = _num_partitions(meta.num_seqs, hkv, meta.max_seq_len,
                                self._target_programs(device, meta.num_seqs), min_chunk)
            if p > 1:
                meta.workspace.views(meta.num_seqs, hq, p, _d_pad(d), device)
        return meta

    @staticmethod
    def _meta(inputs: AttentionInputs, ws: _Workspace) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(
            query_start_loc=inputs.query_start_loc, seq_lens=inputs.seq_lens,
            block_tables=inputs.block_tables, block_size=inputs.block_size,
            max_query_len=inputs.max_query_len, max_seq_len=inputs.max_seq_len,
            is_decode=inputs.is_decode, workspace=ws)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, meta: object, scale: float,
                sliding_window: int | None = None, *, k_scale: torch.Tensor | None = None,
                v_scale: torch.Tensor | None = None,
                row_amax: torch.Tensor | None = None) -> torch.Tensor:
        """q `[T, Hq, D]`, k/v `[T, Hkv, D]` (already in the cache), caches
        `[num_blocks, block_size, Hkv, D]` -> `[T, Hq, D]`. An FP8 cache (float8_e4m3fn)
        comes with its scales `k_scale` / `v_scale` `[num_blocks, block_size, Hkv]`.
        `row_amax` (see `AttentionBackend.forward`): decode maxes it in its kernels."""
        if not isinstance(meta, TritonAttentionMetadata):
            raise TypeError(f"expected TritonAttentionMetadata, got {type(meta).__name__}")
        _check(q, k, v, k_cache, v_cache, meta, sliding_window, k_scale, v_scale)
        check_row_amax(row_amax, q.shape[0], q.device, "attention")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if q.shape[0] == 0:
            return out
        kv = _CacheArgs.of(k_cache, v_cache, k_scale, v_scale, q.dtype)
        if meta.is_decode:
            self._decode(q, kv, meta, scale, sliding_window, out, mixed=False,
                         row_amax=row_amax)
            return out
        # NOTE: in a mixed batch the one-token queries (decode rows beside prefill chunks)
        # go to the split decode kernel: in the prefill kernel each would take a whole
        # BLOCK_M tile per query head and walk its context alone. Which rows those are is
        # known only on the device, so both kernels look at query_start_loc.
        mixed = meta.num_seqs > 1
        if mixed:
            self._decode(q, kv, meta, scale, sliding_window, out, mixed=True)
        _launch_prefill(q, k, v, kv, meta, scale, sliding_window, out, mixed)
        if row_amax is not None:  # prefill steps: not the hot path
            max_rows_into(row_amax, out)
        return out

    def _decode(self, q: torch.Tensor, kv: _CacheArgs, meta: TritonAttentionMetadata,
                scale: float, window: int | None, out: torch.Tensor, mixed: bool,
                row_amax: torch.Tensor | None = None) -> None:
        s, (_, hq, d) = meta.num_seqs, q.shape
        hkv = kv.k_cache.shape[2]
        group = hq // hkv
        d_pad = _d_pad(d)
        block_n, warps, stages, ahead = _decode_config(d_pad, q.dtype, kv.fp8)
        # NOTE: one sequence (batch 1) over a model-dtype cache: a launch small enough to sit
        # beside the streaming GEMV before it, its first tile loaded before the wait; the
        # measured case only (large batches keep their launch: nothing there waits on one
        # GEMV's CTAs to leave, and the extra tile in registers is unmeasured)
        row = s == 1 and not kv.fp8 and q.dtype != torch.float32 and d_pad <= 128
        if row and self.row_config is not None:
            block_n, warps, stages = self.row_config
        kv_early = row and self.kv_early and ahead and self.table_early and not kv.v_t
        parts = _num_partitions(s, hkv, meta.max_seq_len, self._target_programs(q.device, s),
                                self.row_min_chunk if row else _MIN_CHUNK)
        use_dot = group >= 2
        group_m = triton.next_power_of_2(group)  # the merge's rows: the group, unpadded
        group_pad = max(16, group_m) if use_dot else 1
        if parts > 1:
            ws_o, ws_lse, counts = meta.workspace.views(s, hq, parts, d_pad, q.device)
        else:
            ws_o, ws_lse, counts = out, out, out  # unused by the kernel when P == 1
        merge = parts > 1 and self.merge_in_partial
        ws_strides = (ws_o.stride(0), ws_o.stride(1), ws_o.stride(2)) if parts > 1 else (0,) * 3
        lse_stride = ws_lse.stride(0) if parts > 1 else 0
        amax = row_amax if row_amax is not None else ws_lse  # unused without AMAX
        _decode_partial[(s, hkv, parts)](
            q, kv.k_cache, kv.v_cache, kv.k_scale, kv.v_scale, meta.block_tables, meta.seq_lens,
            meta.query_start_loc, out, ws_o, ws_lse, amax, counts, scale * _LOG2E, window or 0,
            parts,
            q.stride(0), q.stride(1), *kv.strides,
            meta.block_tables.stride(0), out.stride(0), out.stride(1), *ws_strides, lse_stride,
            GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, D_PAD=d_pad,
            BLOCK_SIZE=meta.block_size, BLOCK_N=block_n, SPLIT=parts > 1,
            HAS_WINDOW=window is not None, USE_DOT=use_dot, DOT_PREC=_dot_prec(q.dtype),
            MIXED=mixed, KV_FP8=kv.fp8, KV_F16=kv.f16 and use_dot, V_T=kv.v_t,
            AMAX=row_amax is not None and (parts == 1 or merge), TABLE_AHEAD=ahead,
            MERGE=merge, GROUP_M=group_m, BLOCK_P=max(2, 32 // group_m),
            TABLE_EARLY=self.table_early, KV_EARLY=kv_early,
            num_warps=warps, num_stages=stages, **pdl_launch(q.device, row=s == 1))
        if parts > 1 and not merge:
            _decode_reduce[(s, hq)](
                out, ws_o, ws_lse, meta.query_start_loc, amax, parts, out.stride(0),
                out.stride(1), *ws_strides, lse_stride, HEAD_DIM=d, D_PAD=d_pad, BLOCK_P=16,
                MIXED=mixed, AMAX=row_amax is not None, num_warps=4,
                **pdl_launch(q.device, row=s == 1))


class _CacheArgs:
    """One layer's cache as the kernels take it: values, FP8 scales (or placeholders), and
    their strides in kernel argument order (K values, V values, K scales, V scales)."""

    __slots__ = ("k_cache", "v_cache", "k_scale", "v_scale", "strides", "fp8", "f16", "v_t")

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                 fp8: bool, f16: bool) -> None:
        self.k_cache, self.v_cache, self.fp8, self.f16 = k_cache, v_cache, fp8, f16
        self.v_t = v_token_minor(v_cache)
        # NOTE: without scales the kernels never read these (KV_FP8 is off): the values
        # tensors stand in, with zero strides.
        self.k_scale = k_scale if k_scale is not None else k_cache
        self.v_scale = v_scale if v_scale is not None else v_cache
        scale_strides = ((*k_scale.stride(), *v_scale.stride())
                         if k_scale is not None and v_scale is not None else (0,) * 6)
        self.strides = (*k_cache.stride()[:3], *v_cache.stride()[:3], *scale_strides)

    @staticmethod
    def of(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
           v_scale: torch.Tensor | None, q_dtype: torch.dtype) -> _CacheArgs:
        # NOTE: FP8 tiles are converted to fp16 for bf16 / fp16 queries (the native
        # conversion), to fp32 for fp32 queries (the exactness path).
        fp8 = k_scale is not None
        return _CacheArgs(k_cache, v_cache, k_scale, v_scale, fp8,
                          fp8 and q_dtype != torch.float32)


def _launch_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: _CacheArgs,
                    meta: TritonAttentionMetadata, scale: float,
                    window: int | None, out: torch.Tensor, skip_single: bool) -> None:
    _, hq, d = q.shape
    hkv = kv.k_cache.shape[2]
    d_pad = _d_pad(d)
    block_m, block_n, warps, stages = _prefill_config(d_pad, q.dtype)
    grid = (triton.cdiv(meta.max_query_len, block_m), meta.num_seqs, hq)
    _prefill[grid](
        q, k, v, kv.k_cache, kv.v_cache, kv.k_scale, kv.v_scale, meta.block_tables,
        meta.query_start_loc, meta.seq_lens, out, scale * _LOG2E, window or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *kv.strides, meta.block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=d, D_PAD=d_pad, BLOCK_SIZE=meta.block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_WINDOW=window is not None,
        DOT_PREC=_dot_prec(q.dtype), SKIP_SINGLE=skip_single, KV_FP8=kv.fp8,
        KV_F16=kv.f16, V_T=kv.v_t, num_warps=warps, num_stages=stages)


def v_token_minor(v_cache: torch.Tensor) -> bool:
    """Whether a `[blocks, block_size, Hkv, D]` V cache view is stored token-minor, i.e. as
    `[blocks, Hkv, D, block_size]` (the layout of FP8 pools, `runtime/kv_cache.py`)."""
    _, bs, _, d = v_cache.shape
    return (bs > 1 and v_cache.stride(1) == 1 and v_cache.stride(3) == bs
            and v_cache.stride(2) == d * bs)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
           v_cache: torch.Tensor, meta: TritonAttentionMetadata,
           window: int | None, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> None:
    """Host-side shape checks only (no device sync); clear errors for bad input."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"expected q [T, Hq, D] and caches [blocks, block_size, Hkv, D], got "
                         f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, "
                         f"v_cache {tuple(v_cache.shape)}")
    _, hq, d = q.shape
    _, bs, hkv, dc = k_cache.shape
    if dc != d or hq % hkv:
        raise ValueError(f"head_dim {d} vs cache {dc}, q heads {hq} vs kv heads {hkv}: head "
                         f"dims must match and q heads be a multiple of kv heads")
    if d > 256:
        raise ValueError(f"head_dim {d} is not supported (at most 256)")
    if bs != meta.block_size:
        raise ValueError(f"cache block size {bs} != metadata block_size {meta.block_size}")
    fp8 = k_scale is not None or v_scale is not None
    cache_dtype = _KV_FP8 if fp8 else q.dtype
    if q.dtype not in _SUPPORTED or k_cache.dtype != cache_dtype or v_cache.dtype != cache_dtype:
        raise ValueError(f"q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}: "
                         f"q must be one of float16, bfloat16, float32 and the caches of its "
                         f"dtype, or float8_e4m3fn with k_scale and v_scale")
    if fp8:
        want = (*k_cache.shape[:3],)
        for name, x in (("k_scale", k_scale), ("v_scale", v_scale)):
            if x is None or x.shape != want or x.dtype != torch.float32:
                got = None if x is None else (tuple(x.shape), x.dtype)
                raise ValueError(f"an FP8 cache needs {name} [blocks, block_size, Hkv] = "
                                 f"{list(want)} float32, got {got}")
    if q.stride(2) != 1 or k_cache.stride(3) != 1:
        raise ValueError("the last (head_dim) dimension of q and k_cache must be contiguous")
    if v_cache.stride(3) != 1 and not (fp8 and v_token_minor(v_cache)):
        raise ValueError(f"v_cache must have a contiguous last (head_dim) dimension, or (FP8) "
                         f"be stored token-minor [blocks, Hkv, D, block_size] (strides "
                         f"(*, 1, D * {bs}, {bs})); got strides {tuple(v_cache.stride())}")
    if window is not None and window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {window}")
    if meta.is_decode and q.shape[0] != meta.num_seqs:
        raise ValueError(f"decode step: {q.shape[0]} query tokens for {meta.num_seqs} sequences")
    if not meta.is_decode:
        if k.shape != (q.shape[0], hkv, d) or v.shape != k.shape:
            raise ValueError(f"k/v must be [T={q.shape[0]}, Hkv={hkv}, D={d}], got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if k.stride(2) != 1 or v.stride(2) != 1:
            raise ValueError("the last (head_dim) dimension of k and v must be contiguous")
