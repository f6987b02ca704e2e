"""Small-M (decode) FP8 GEMM: `y [M, N] = (xq * xs) @ (W * ws)^T (+ bias)` reading the E4M3
weight `W [N, K]` once from HBM (1 byte per weight, half of bf16's traffic).

At M <= SMALL_M_MAX (16) a linear layer is bound by weight bandwidth; cuBLASLt's FP8 GEMM is
tuned for large M and reads the weight inefficiently there. Here:
- `fp8_linear_small_m(x, ...)`: two launches: the fused per-token quantization of
  `kernels/fp8_quant.py`, then `_fp8_gemm_kernel` over the quantized rows. NOTE: taking the
  amax of the whole row inside the GEMM would cost every program M * K reads (~2x the weight
  traffic at M = 16, K = 14336), so one small launch first is cheaper.
- `fp8_gemm_small_m_quantizing(x, row_amax | input_scale, ...)`: one launch that quantizes
  the model-dtype rows tile by tile (X_MODE 1 / 2), given the row amax that the producing
  kernel wrote (the row-amax handoff of `models/llama.py`) or a static scale. Every program
  converts all K of its rows, so it pays only where few programs share a row: its tiles come
  from `fp8_gemm_configs.QUANTIZING` (measured), and shapes without one keep two launches.
- one-token calls (M = 1) of the shapes listed in `kernels/fp8_gemv_cuda.py`'s table go to
  its CUDA tensor-core GEMV instead (measured faster there); a failure falls back to here.
- `_fp8_gemm_kernel`: grid (cdiv(N, BLOCK_N), SPLIT_K); each program owns BLOCK_N output
  channels and one K slice. Its launch (mode, tile, split, warps, stages) comes from the
  table of `kernels/fp8_gemm_configs.py` keyed by (M bucket, N, K), tuned per GPU by
  `scripts/tune_fp8_gemm.py`. Modes: `dot` pads M to BLOCK_M (masked loads) so the product
  is a `tl.dot` (FP8 x FP8 -> float32 on compute capability >= 8.9, products exact; float16
  operands in the interpreter: E4M3 values are exact in float16); `dot_swap` puts the weight
  on the MMA's M side; `gemv` (M <= 4) uses no MMA: wide weight loads dequantized in
  registers, float32 FMAs, a reduction along K. Per-token and per-channel scales (and the
  bias) are applied in the epilogue in float32, then one rounding to the output dtype.
- split-K: when N / BLOCK_N programs would not cover ~2 waves of SMs (or as the config
  says), K is split and each slice writes float32 partials to a cached workspace
  `[SPLIT_K, BLOCK_M, N]`. With SPLITK_FIXUP (default) the last slice program of each N
  block to finish (an atomic counter per block, reset by that program) sums the partials in
  a fixed order and applies the epilogue; otherwise `_splitk_epilogue`, a second launch,
  does. Both are deterministic and need no memset. Workspaces (per device, N, SPLIT_K,
  BLOCK_M) and counters (per device, N, BLOCK_N) are allocated once and kept: no allocation
  beyond the output per call, so the path is CUDA-graph capturable (no host syncs either).
"""

from __future__ import annotations

import logging

import torch
from trtdist.kernels import fp8_gemm_configs as _cfg
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton
from trtdist.kernels.fp8_gemm_configs import Fp8GemmConfig
from trtdist.kernels.fp8_gemv_cuda import fp8_gemv_cuda
from trtdist.kernels.fp8_gemv_cuda import supports as gemv_cuda_supports
from trtdist.kernels.fp8_gemv_stream import fp8_gemv_stream
from trtdist.kernels.fp8_gemv_stream import supports as gemv_stream_supports
from trtdist.kernels.fp8_quant import (
    FP8_DTYPE,
    _quantize,
    dynamic_scale,
    inverse_scale,
    quantize_activation_triton,
)

# NOTE: up to 16 rows one tl.dot tile covers M, so the weight is read exactly once; above,
# the GEMM starts to be compute-shaped and cuBLASLt (`torch._scaled_mm`) is the better choice.
SMALL_M_MAX = 16
KERNEL_M_MAX = 32  # what the kernel takes (with a block_m 32 config: tuning)
_MODE_IDS = {"dot": 0, "dot_swap": 1, "gemv": 2}
_log = logging.getLogger("trtdist")
_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# NOTE: split-K reduction: True = in the GEMM (the last program of each N block, counted by an
# atomic: one launch less); False = a second kernel (`_splitk_epilogue`). Both are tested.
SPLITK_FIXUP = True
_workspaces: dict[tuple[torch.device, int, int, int], torch.Tensor] = {}
_counters: dict[tuple[torch.device, int, int], torch.Tensor] = {}
_sm_counts: dict[torch.device, int] = {}
_cuda_gemv_off: set[torch.device] = set()  # devices where the CUDA GEMV failed once
_stream_gemv_off: set[torch.device] = set()  # likewise the streaming GEMV
# NOTE: per device, whether the FP8 x FP8 tl.dot compiled; set False after a compile failure
# (the float16-operand dot is then used: same numbers, more conversion work).
_dot_fp8_ok: dict[torch.device, bool] = {}


def fp8_gemm_torch(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                   bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Reference: `[M, K] E4M3 x [M, 1] scale, [N, K] E4M3 x [N] scale -> [M, N]` computed in
    float32 (the numbers of `parallel.quant_fp8.fp8_linear_reference`)."""
    y = torch.nn.functional.linear(xq.float() * xs.float(), w.float() * ws.float()[:, None])
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


@_jit
def _load_w(w_ptrs, mask_n, cols, K, EVEN_K: tl.constexpr, valid):
    """gemv: one E4M3 weight tile `[BN, BK]` (columns `cols`), zeros where masked or not
    `valid`; streamed once, so it should not push the activations out of L2."""
    mask = mask_n[:, None] & valid
    if not EVEN_K:
        mask = mask & (cols < K)[None, :]
    return tl.load(w_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")


@_jit
def _x_scale(amax_ptr, xs_ptr, rows, mask, X_MODE: tl.constexpr):
    """The dequantizing scale of token rows `rows` (a scalar or a [BM] vector): given
    (X_MODE 0, `xs`), from the producer's row amax (1: per token) or the static input scale
    (2, one element)."""
    if X_MODE == 1:
        # NOTE: .cg: the amax was maxed into by atomics at L2; this SM's L1 may hold the
        # slot's value from an earlier layer.
        return dynamic_scale(tl.load(amax_ptr + rows, mask=mask, other=0.0,
                                     cache_modifier=".cg"))
    elif X_MODE == 2:
        return tl.load(xs_ptr + rows * 0)
    else:
        return tl.load(xs_ptr + rows, mask=mask, other=0.0)


@_jit
def _as_e4m3(x, inv, X_MODE: tl.constexpr):
    """A loaded activation tile as the E4M3 values the product uses: quantized here (X_MODE
    1 or 2: model-dtype input, `inv` = 1 / its scale) or already E4M3 (0)."""
    if X_MODE != 0:
        return _quantize(x.to(tl.float32), inv).to(tl.float8e4nv)
    else:
        return x


@_jit
def _gemv_step(acc, w, x_ptrs, mask, inv, K_ACC: tl.constexpr, X_2D: tl.constexpr,
               X_MODE: tl.constexpr):
    """gemv: one token row's products with the dequantized weight tile `w [BN, BK]`."""
    x = _as_e4m3(tl.load(x_ptrs, mask=mask, other=0.0), inv, X_MODE).to(tl.float32)
    if X_2D:
        prod = w * x  # [BN, BK]
    else:
        prod = w * x[None, :]
    if K_ACC:
        return acc + prod
    else:
        return acc + tl.sum(prod, axis=1)


@_jit
def _row_sum(acc, K_ACC: tl.constexpr):
    """gemv: one row's accumulator -> its [BLOCK_N] sums."""
    if K_ACC:
        return tl.sum(acc, axis=1)
    else:
        return acc


@_jit
def _fp8_gemm_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, b_ptr, out_ptr, part_ptr, cnt_ptr,
                     amax_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                     K_PER_SPLIT: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                     FIXUP: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_FP8: tl.constexpr,
                     MODE: tl.constexpr, K_ACC: tl.constexpr, X_2D: tl.constexpr,
                     PREFETCH: tl.constexpr, PDL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     X_MODE: tl.constexpr = 0):
    """Grid (cdiv(N, BLOCK_N), SPLIT_K). MODE 0: tl.dot(x, w^T); 1: tl.dot(w, x^T) (swapped);
    2: gemv (no MMA; BLOCK_M <= 4 accumulators of [BLOCK_N, BLOCK_K] or [BLOCK_N]).
    X_MODE 0: `xq` is E4M3 with per-row scales `xs`; 1: `xq` is in the model dtype and each
    program quantizes the tiles it loads, per token from the producer's row amax
    (`amax_ptr`); 2: likewise with the static scale `xs[0]`. The products are the same E4M3
    values in every mode (see `kernels/fp8_quant.py`'s formula).
    With PDL every program waits for the previous kernel before its first load. NOTE:
    loading the first weight tile before the wait (the weight is constant) made the FP8
    batch-1 step slower on an H200 (2.71 -> 2.93 ms; 3.8 ms with every step's tile
    prefetched), where the bf16 GEMV was indifferent to it (4.01 / 4.00 ms)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M
    mask_n = rn < N
    k_start = pid_k * K_PER_SPLIT
    w_ptrs = w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (k_start + rk)[None, :]  # [BN, BK]
    if MODE == 2:
        # NOTE: one accumulator per token row, all in the weight tile's layout (no layout
        # conversion in the loop); rows past M load zeros. K_ACC keeps the elementwise
        # products' sums [BN, BK] and reduces along K once at the end (no shuffles in the
        # loop, more registers); otherwise each step reduces to [BN].
        if X_2D:
            # NOTE: x rows loaded as [BN, BK] broadcasts (stride 0 along N, L1 hits) land in
            # the weight tile's layout; a [BK] load would be converted through shared memory
            # (a barrier) every step.
            x_ptrs = xq_ptr + (k_start + rk)[None, :] + tl.zeros([BLOCK_N, 1], dtype=tl.int32)
        else:
            x_ptrs = xq_ptr + k_start + rk  # [BK] of row 0
        if K_ACC:
            acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        if BLOCK_M > 1:
            acc1 = tl.zeros_like(acc0)
        if BLOCK_M > 2:
            acc2 = tl.zeros_like(acc0)
            acc3 = tl.zeros_like(acc0)
        pdl_wait(PDL)
        one = tl.full([], 1.0, dtype=tl.float32)
        inv0 = one
        inv1 = one
        inv2 = one
        inv3 = one
        if X_MODE != 0:
            inv0 = inverse_scale(_x_scale(amax_ptr, xs_ptr, 0, M > 0, X_MODE))
            if BLOCK_M > 1:
                inv1 = inverse_scale(_x_scale(amax_ptr, xs_ptr, 1, M > 1, X_MODE))
            if BLOCK_M > 2:
                inv2 = inverse_scale(_x_scale(amax_ptr, xs_ptr, 2, M > 2, X_MODE))
                inv3 = inverse_scale(_x_scale(amax_ptr, xs_ptr, 3, M > 3, X_MODE))
        if PREFETCH:
            w_next = _load_w(w_ptrs, mask_n, k_start + rk, K, EVEN_K, True)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            if EVEN_K:
                mask_k = rk < BLOCK_K
            else:
                mask_k = k_start + k0 + rk < K
            if PREFETCH:
                # NOTE: Triton does not pipeline loads that feed no tl.dot: the next tile's
                # load is issued here, before this tile's math, so two tiles are in flight
                # per program (16 more registers for a [16, 512] E4M3 tile at 4 warps).
                w_raw = w_next
                w_next = _load_w(w_ptrs + BLOCK_K, mask_n, k_start + k0 + BLOCK_K + rk, K,
                                 EVEN_K, k0 + BLOCK_K < K_PER_SPLIT)
            else:
                w_raw = _load_w(w_ptrs, mask_n, k_start + k0 + rk, K, EVEN_K, True)
            w = w_raw.to(tl.float32)
            if X_2D:
                mask_x = mask_k[None, :]
            else:
                mask_x = mask_k
            acc0 = _gemv_step(acc0, w, x_ptrs, mask_x, inv0, K_ACC, X_2D, X_MODE)
            if BLOCK_M > 1:
                acc1 = _gemv_step(acc1, w, x_ptrs + stride_xm, mask_x & (M > 1), inv1, K_ACC,
                                  X_2D, X_MODE)
            if BLOCK_M > 2:
                acc2 = _gemv_step(acc2, w, x_ptrs + 2 * stride_xm, mask_x & (M > 2), inv2,
                                  K_ACC, X_2D, X_MODE)
                acc3 = _gemv_step(acc3, w, x_ptrs + 3 * stride_xm, mask_x & (M > 3), inv3,
                                  K_ACC, X_2D, X_MODE)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc = tl.where(rm[:, None] == 0, _row_sum(acc0, K_ACC)[None, :], 0.0)  # [BM, BN]
        if BLOCK_M > 1:
            acc = tl.where(rm[:, None] == 1, _row_sum(acc1, K_ACC)[None, :], acc)
        if BLOCK_M > 2:
            acc = tl.where(rm[:, None] == 2, _row_sum(acc2, K_ACC)[None, :], acc)
            acc = tl.where(rm[:, None] == 3, _row_sum(acc3, K_ACC)[None, :], acc)
    else:
        pdl_wait(PDL)
        inv_m = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
        if X_MODE != 0:
            inv_m = inverse_scale(_x_scale(amax_ptr, xs_ptr, rm, mask_m, X_MODE))
        x_ptrs = xq_ptr + rm[:, None] * stride_xm + (k_start + rk)[None, :]  # [BM, BK]
        if MODE == 1:
            acc_t = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
            else:
                mask_k = k_start + k0 + rk < K
                x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            x = _as_e4m3(x, inv_m[:, None], X_MODE)
            if not DOT_FP8:
                x = x.to(tl.float16)
                w = w.to(tl.float16)
            if MODE == 1:
                acc_t = tl.dot(w, tl.trans(x), acc_t)
            else:
                acc = tl.dot(x, tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if MODE == 1:
            acc = tl.trans(acc_t)
    pdl_trigger(PDL)
    mask = mask_m[:, None] & mask_n[None, :]
    last = True
    if SPLIT_K > 1:
        p_ptrs = part_ptr + (pid_k * BLOCK_M + rm)[:, None] * N + rn[None, :]
        tl.store(p_ptrs, acc, mask=mask)
        last = False
        if FIXUP:
            # NOTE: the last of the SPLIT_K programs of this N block to arrive sums the partials
            # (a fixed order: deterministic) and writes the output. The barrier orders every
            # thread's partial stores before the release of the count; the acquire makes all
            # partials visible to the last program, which loads them past L1 (.cg: L1 is not
            # coherent). It then resets the counter for the next call or graph replay.
            tl.debug_barrier()
            count = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
            last = count == SPLIT_K - 1
            if last:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in range(SPLIT_K):
                    acc += tl.load(part_ptr + (s * BLOCK_M + rm)[:, None] * N + rn[None, :],
                                   mask=mask, other=0.0, cache_modifier=".cg")
                tl.atomic_xchg(cnt_ptr + pid_n, 0)
    if last:
        xs = _x_scale(amax_ptr, xs_ptr, rm, mask_m, X_MODE)
        ws = tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
        y = acc * xs[:, None] * ws[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        o_ptrs = out_ptr + rm[:, None] * stride_om + rn[None, :]
        tl.store(o_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _splitk_epilogue(part_ptr, xs_ptr, ws_ptr, b_ptr, out_ptr, N, stride_om,
                     SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Grid (M, cdiv(N, BLOCK)): sum the SPLIT_K float32 partials of one row in a fixed order,
    then scales, bias, one rounding."""
    pdl_wait(PDL)
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rn < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * BLOCK_M + m) * N + rn, mask=mask, other=0.0)
    pdl_trigger(PDL)
    y = acc * tl.load(xs_ptr + m) * tl.load(ws_ptr + rn, mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, y.to(out_ptr.dtype.element_ty), mask=mask)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # interpreter: keep the grid small
    if device not in _sm_counts:
        props = torch.cuda.get_device_properties(device)
        _sm_counts[device] = props.multi_processor_count
        _dot_fp8_ok.setdefault(device, (props.major, props.minor) >= (8, 9))
    return _sm_counts[device]


def choose_split_k(n: int, k: int, sm_count: int) -> int:
    """The default tile's split (kept for callers of the first version): see
    `fp8_gemm_configs.choose_split_k`."""
    return _cfg.choose_split_k(n, k, sm_count)


def _workspace(device: torch.device, n: int, split: int, block_m: int) -> torch.Tensor:
    key = (device, n, split, block_m)
    ws = _workspaces.get(key)
    if ws is None:
        # NOTE: kept for the life of the process: a CUDA graph captured with it keeps its address.
        # Layers of one shape share it, which is safe while one stream runs a forward at a time
        # (trtdist's executor); the partials are consumed by the next launch on that stream.
        ws = torch.empty((split * block_m, n), dtype=torch.float32, device=device)
        _workspaces[key] = ws
    return ws


def _counter(device: torch.device, n: int, block_n: int) -> torch.Tensor:
    """Per N block, how many split-K programs have finished; zero between calls (the last
    program resets it), so layers of one N share it."""
    key = (device, n, block_n)
    cnt = _counters.get(key)
    if cnt is None:
        cnt = torch.zeros(-(-n // block_n), dtype=torch.int32, device=device)
        _counters[key] = cnt
    return cnt


def _check(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype, x_mode: int = 0) -> None:
    if xq.dim() != 2 or w.dim() != 2:
        raise ValueError(f"fp8_gemm_small_m: want 2-D x [M, K] and w [N, K], got "
                         f"{tuple(xq.shape)} and {tuple(w.shape)}")
    m, k = xq.shape
    n = w.shape[0]
    if m > KERNEL_M_MAX:
        raise ValueError(f"fp8_gemm_small_m: M = {m} rows, at most {KERNEL_M_MAX} allowed")
    x_ok = xq.dtype == FP8_DTYPE if x_mode == 0 else xq.dtype in _OUT_DTYPES
    if not x_ok or w.dtype != FP8_DTYPE or w.shape[1] != k:
        want = "float8_e4m3fn" if x_mode == 0 else "float16/bfloat16/float32"
        raise ValueError(f"fp8_gemm_small_m: want x [M, K] {want} and w [N, K] float8_e4m3fn, "
                         f"got {tuple(xq.shape)} {xq.dtype} and {tuple(w.shape)} {w.dtype}")
    if xq.stride(-1) != 1 or w.stride(-1) != 1:
        raise ValueError("fp8_gemm_small_m: x and w need a unit last stride")
    want_xs = 1 if x_mode == 2 else m
    if xs.numel() < want_xs or xs.dtype != torch.float32 or not xs.is_contiguous():
        what = {0: f"xs must be [{m}, 1]", 1: f"row_amax must hold >= {m} values",
                2: "input_scale must hold one value"}[x_mode]
        raise ValueError(f"fp8_gemm_small_m: {what} float32 contiguous, got "
                         f"{tuple(xs.shape)} {xs.dtype}")
    if x_mode == 0 and xs.numel() != m:
        raise ValueError(f"fp8_gemm_small_m: xs must be [{m}, 1], got {tuple(xs.shape)}")
    if ws.numel() != n or ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError(f"fp8_gemm_small_m: ws must be [{n}] float32 contiguous, got "
                         f"{tuple(ws.shape)} {ws.dtype}")
    if bias is not None and (bias.numel() != n or not bias.is_contiguous()):
        raise ValueError(f"fp8_gemm_small_m: bias must be [{n}] contiguous, got "
                         f"{tuple(bias.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"fp8_gemm_small_m: out_dtype must be float16, bfloat16 or float32, "
                         f"got {out_dtype}")


def fp8_gemm_small_m(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype, *,
                     out: torch.Tensor | None = None, config: Fp8GemmConfig | None = None,
                     split_k: int | None = None, dot_fp8: bool | None = None,
                     fixup: bool | None = None) -> torch.Tensor:
    """`xq [M, K]` E4M3 with `xs [M, 1]` float32, `w [N, K]` E4M3 with `ws [N]` float32,
    `bias [N]` or None -> `[M, N]` in `out_dtype` (a new tensor, or `out`), for
    M <= KERNEL_M_MAX. `config` (default: the table of `fp8_gemm_configs` for (M, N, K)),
    `split_k`, `dot_fp8` and `fixup` (split-K reduction in the GEMM, else in a second kernel;
    default SPLITK_FIXUP) override the automatic choices (tests, tuning)."""
    return _gemm(xq, xs, 0, w, ws, bias, out_dtype, out=out, config=config, split_k=split_k,
                 dot_fp8=dot_fp8, fixup=fixup)


def fp8_gemm_small_m_quantizing(x: torch.Tensor, row_amax: torch.Tensor | None,
                                input_scale: torch.Tensor | None, w: torch.Tensor,
                                ws: torch.Tensor, bias: torch.Tensor | None, *,
                                out: torch.Tensor | None = None,
                                config: Fp8GemmConfig | None = None,
                                split_k: int | None = None, dot_fp8: bool | None = None,
                                fixup: bool | None = None) -> torch.Tensor:
    """`fp8_gemm_small_m` of the model-dtype `x [M, K]`, quantized inside the GEMM (one
    launch): per token from `row_amax` (>= M float32 values, each row's max |x|, as written by
    the kernel that produced x) or with the static `input_scale` (one float32 value); exactly
    one of the two. The same numbers as quantizing x first (`quantize_activation_triton`)."""
    if (row_amax is None) == (input_scale is None):
        raise ValueError("fp8_gemm_small_m_quantizing: give exactly one of row_amax (per "
                         "token) and input_scale (static)")
    mode, xs = (1, row_amax) if row_amax is not None else (2, input_scale)
    assert xs is not None
    return _gemm(x, xs, mode, w, ws, bias, x.dtype, out=out, config=config, split_k=split_k,
                 dot_fp8=dot_fp8, fixup=fixup)


def _one_token_operands(xq: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                        out: torch.Tensor) -> bool:
    """What the CUDA GEMVs need of the operands: one token row on a GPU, contiguous,
    16-byte-aligned x and weight."""
    if xq.shape[0] != 1 or xq.device.type != "cuda":
        return False
    if not (xq.is_contiguous() and w.is_contiguous() and out.is_contiguous()
            and (bias is None or bias.is_contiguous())):
        return False
    return not any(t.data_ptr() % 16 for t in (xq, w))


def _cuda_gemv_takes(xq: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                     out: torch.Tensor) -> bool:
    """Whether the one-token CUDA GEMV (`kernels/fp8_gemv_cuda.py`) runs this call: M = 1,
    contiguous 16-byte-aligned operands, a shape and dtypes it takes, CUDA kernels available
    and not turned off after a failure."""
    if xq.device in _cuda_gemv_off or not _one_token_operands(xq, w, bias, out):
        return False
    return gemv_cuda_supports(1, w.shape[0], w.shape[1], xq.dtype, out.dtype, xq.device,
                              None if bias is None else bias.dtype)


def _stream_gemv_takes(xq: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                       out: torch.Tensor) -> bool:
    """Whether the streaming one-token GEMV (`kernels/fp8_gemv_stream.py`, Hopper) runs this
    call: as `_cuda_gemv_takes`, with that kernel's own shapes."""
    if xq.device in _stream_gemv_off or not _one_token_operands(xq, w, bias, out):
        return False
    return gemv_stream_supports(1, w.shape[0], w.shape[1], xq.dtype, out.dtype, xq.device,
                                None if bias is None else bias.dtype)


def split_plan(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(slices, K per slice) of a split-K launch asking for `split_k` slices: whole BLOCK_K
    steps per slice, no more slices than steps, and no empty slice."""
    k_steps = -(-k // block_k)
    split = max(1, min(split_k, k_steps))
    k_per_split = -(-k_steps // split) * block_k
    return -(-k // k_per_split), k_per_split


def _gemm(xq: torch.Tensor, xs: torch.Tensor, x_mode: int, w: torch.Tensor, ws: torch.Tensor,
          bias: torch.Tensor | None, out_dtype: torch.dtype, *, out: torch.Tensor | None,
          config: Fp8GemmConfig | None, split_k: int | None, dot_fp8: bool | None,
          fixup: bool | None) -> torch.Tensor:
    if triton is None:
        raise RuntimeError("fp8_gemm_small_m needs triton, which is not installed")
    _check(xq, xs, w, ws, bias, out_dtype, x_mode)
    m, k = xq.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    elif out.shape != (m, n) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"fp8_gemm_small_m: out must be [{m}, {n}] {out_dtype} with a unit "
                         f"last stride, got {tuple(out.shape)} {out.dtype} {tuple(out.stride())}")
    if m == 0 or n == 0:
        return out
    if config is None and split_k is None and dot_fp8 is None and fixup is None:
        # the one-token CUDA GEMVs, in order of preference; one that fails is turned off
        # for the device (with a warning) and the next takes the call
        for name, takes, off in (("streaming", _stream_gemv_takes, _stream_gemv_off),
                                 ("CUDA", _cuda_gemv_takes, _cuda_gemv_off)):
            if takes(xq, w, bias, out):
                # looked up at call time (tests wrap these module attributes)
                launch = fp8_gemv_stream if name == "streaming" else fp8_gemv_cuda
                try:
                    return launch(xq, xs, x_mode, w, ws, bias, out)
                except Exception as e:  # noqa: BLE001 - CudaJitError, a bindings mismatch
                    _log.warning("fp8_gemm: the %s GEMV failed (%s: %s); using another "
                                 "kernel", name, type(e).__name__, e)
                    off.add(xq.device)
    cfg = config if config is not None else _cfg.lookup(m, n, k, quantizing=x_mode != 0)
    if m > cfg.block_m:
        raise ValueError(f"fp8_gemm_small_m: config block_m = {cfg.block_m} cannot hold "
                         f"M = {m} rows")
    bk = cfg.block_k
    if split_k is None:
        split_k = cfg.split_k or _cfg.choose_split_k(n, k, _sm_count(xq.device), cfg.block_n,
                                                     bk)
    split, k_per_split = split_plan(k, bk, split_k)
    mode = _MODE_IDS[cfg.mode]
    auto_dot = dot_fp8 is None
    if auto_dot:
        _sm_count(xq.device)
        dot_fp8 = _dot_fp8_ok.get(xq.device, False)
    fixup = SPLITK_FIXUP if fixup is None else fixup
    part = _workspace(xq.device, n, split, cfg.block_m) if split > 1 else out
    cnt = _counter(xq.device, n, cfg.block_n) if split > 1 and fixup else xs  # FIXUP only
    b = bias if bias is not None else ws  # unused when HAS_BIAS is False
    grid = (triton.cdiv(n, cfg.block_n), split)
    # X_MODE 1 reads the amax where the launch's `xs_ptr` would be: pass it in both
    args = (xq, xs, w, ws, b, out, part, cnt, xs, m, n, k, xq.stride(0), w.stride(0),
            out.stride(0))
    consts = dict(K_PER_SPLIT=k_per_split, SPLIT_K=split, EVEN_K=k_per_split * split == k,
                  FIXUP=fixup, HAS_BIAS=bias is not None, MODE=mode, K_ACC=cfg.k_acc,
                  X_2D=cfg.x_2d, PREFETCH=cfg.prefetch,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=bk, X_MODE=x_mode,
                  **cfg.launch_options(), **pdl_launch(xq.device))
    try:
        _fp8_gemm_kernel[grid](*args, DOT_FP8=dot_fp8, **consts)
    except Exception as e:  # noqa: BLE001 - e.g. a Triton build without FP8 MMA for this GPU
        if not (auto_dot and dot_fp8 and cfg.mode != "gemv"):
            raise
        _log.warning("fp8_gemm: the FP8 tl.dot failed to compile (%s); using float16 "
                     "operands", e)
        _dot_fp8_ok[xq.device] = False
        _fp8_gemm_kernel[grid](*args, DOT_FP8=False, **consts)
    if split > 1 and not fixup:
        if x_mode != 0:
            raise ValueError("fp8_gemm_small_m: the split-K epilogue kernel takes quantized "
                             "input only (use fixup)")
        block = min(triton.next_power_of_2(n), 1024)
        _splitk_epilogue[(m, triton.cdiv(n, block))](
            part, xs, ws, b, out, n, out.stride(0), SPLIT_K=split, HAS_BIAS=bias is not None,
            BLOCK_M=cfg.block_m, BLOCK=block, num_warps=4, **pdl_launch(xq.device))
    return out


def fp8_linear_small_m(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                       input_scale: torch.Tensor | None, bias: torch.Tensor | None,
                       **kw: object) -> torch.Tensor:
    """`x [M, K]` (M <= SMALL_M_MAX, float16/bfloat16/float32) -> `[M, N]` in x's dtype. Static
    scales, on a shape with an input-quantizing tile (`fp8_gemm_configs.QUANTIZING`): one
    launch, the GEMM quantizes its tiles; otherwise the activation quantization (per token:
    the row's amax is needed before any product), then the small-M GEMM. Same numbers as
    `parallel.quant_fp8.fp8_linear_reference` up to float32 summation order."""
    if input_scale is not None and (kw.get("config") is not None or _cfg.quantizing_config(
            x.shape[0], w.shape[0], w.shape[1]) is not None):
        return fp8_gemm_small_m_quantizing(x, None, input_scale, w, ws, bias,
                                           **kw)  # type: ignore[arg-type]
    xq, xs = quantize_activation_triton(x, input_scale)
    return fp8_gemm_small_m(xq, xs, w, ws, bias, x.dtype, **kw)  # type: ignore[arg-type]
