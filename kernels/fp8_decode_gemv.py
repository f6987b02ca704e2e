"""The one-token FP8 decode GEMV with its neighbours folded in: persistent programs that
prepare the activation once and keep it in registers while they stream the weight.

At batch 1 a llama3-8b layer is four weight-bound GEMVs separated by latency-bound row
kernels (RMSNorm + quantize twice, SiLU x up, rotary, attention): every boundary costs the
next GEMV its DRAM ramp. `_fp8_gemm_kernel` (`kernels/fp8_gemm.py`) gives each program 2 output
rows, so work that needs the whole input row (a norm, the row's quantization) would be
repeated by thousands of programs. Here a grid of about `programs_per_sm` x SMs programs
each walks N tiles `pid, pid + P, ...` (grid-stride), so the row is prepared once per
program:
- IN_MODE 0: `x` is E4M3 with its dequantizing scale (`in_scale`, one value).
- IN_MODE 1: `x` is in the model dtype; quantized per token from the row amax its producer
  wrote (`amax`, one value; the row-amax handoff of `models/llama.py`) or with the static
  `in_scale`.
- IN_MODE 2: `x` is the residual stream; `RMSNorm(x) * norm_weight` (the roundings of
  `kernels/norm.py`) is quantized per token (its amax taken here) or with `in_scale`: the norm
  kernel before the GEMM is gone.
- ADD_RESIDUAL: the epilogue adds the (model-dtype rounded) output into `out` IN PLACE, the
  residual add that `kernels/norm.py`'s fused norm did before (tensor-parallel size 1 only:
  with TP the all-reduce comes first).
- CLEAR: program 0 zeroes `clear[0]` (the layer's row-amax slot, see `models/llama.py`).

The whole K of the row sits in registers (`K` a power of two, one [BLOCK_N, K] tile a step),
as the products' E4M3 values in the weight tile's layout: x is loaded as [BLOCK_N, K]
zero-stride broadcasts, so no layout conversion happens in the loop. With PDL the first
weight tile is loaded before the wait (EARLY): the weight does not depend on the previous
kernel; the predecessors of these GEMVs are other GEMVs, not the latency-bound row kernels
whose loads early weight traffic delayed (PERF_NOTES.md, fifth session).

Numbers: the same E4M3 products as quantizing first (`fp8_quant.py`'s formula) and the
GEMM's per-channel epilogue; the norm's sum of squares is reduced in a different order from
`kernels/norm.py`'s kernel (float32, tolerance of the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import pdl_launch, pdl_trigger, pdl_wait, tl, triton
from trtdist.kernels.fp8_quant import (
    FP8_DTYPE,
    _quantize,
    check_row_amax,
    dynamic_scale,
    inverse_scale,
)

_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_K = 65536
IN_FP8, IN_AMAX, IN_NORM = 0, 1, 2
_sm_counts: dict[torch.device, int] = {}
_scratches: dict[tuple[torch.device, int], torch.Tensor] = {}


@dataclass(frozen=True, slots=True)
class DecodeGemvConfig:
    """One launch of `_decode_gemv_kernel`: a [block_n, block_k] weight tile a step, warps,
    programs an SM (the grid is programs_per_sm x SMs, capped by the tile count), whether the
    next step's tile is loaded before this one's math (two in flight a program), whether the
    first is loaded before the PDL wait, and whether products are kept [block_n, block_k]
    until a tile's K is done (k_acc) or reduced every step."""

    block_n: int = 2
    block_k: int = 2048
    num_warps: int = 4
    programs_per_sm: int = 8
    prefetch: bool = True
    early: bool = True
    k_acc: bool = True

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v <= 0 or v & (v - 1):
                raise ValueError(f"DecodeGemvConfig: {name} = {v} must be a power of two")
        if self.programs_per_sm < 1:
            raise ValueError(f"DecodeGemvConfig: programs_per_sm must be >= 1, got "
                             f"{self.programs_per_sm}")


DEFAULT = DecodeGemvConfig()


def supports(n: int, k: int, config: DecodeGemvConfig | None = None) -> bool:
    """Whether the kernel takes a [n, k] weight: K a multiple of the tile's block_k (and of
    16), at most MAX_K."""
    bk = min((config or DEFAULT).block_k, k)
    return n > 0 and 16 <= k <= MAX_K and k % 16 == 0 and k % bk == 0


def _prologue_block(k: int) -> int:
    """The prologue's chunk: the largest power of two <= 4096 dividing K."""
    b = 4096
    while k % b:
        b //= 2
    return b


@_jit
def _row_values(x_ptr, nw_ptr, c, rstd, IN_MODE: tl.constexpr, Y_DTYPE: tl.constexpr):
    """One chunk of the row to quantize, float32: x (IN_MODE 1) or `kernels/norm.py`'s
    `weight * (x * rstd).to(x dtype)` rounded to the output dtype (IN_MODE 2)."""
    xv = tl.load(x_ptr + c).to(tl.float32)
    if IN_MODE == 2:
        normed = (xv * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        return (normed * tl.load(nw_ptr + c).to(tl.float32)).to(Y_DTYPE).to(tl.float32)
    return xv


@_jit
def _prepare_row(x_ptr, amax_ptr, nw_ptr, in_scale_ptr, scratch_ptr, eps, K: tl.constexpr,
                 IN_MODE: tl.constexpr, STATIC: tl.constexpr, Y_DTYPE: tl.constexpr,
                 PRO: tl.constexpr):
    """IN_MODE 1 / 2: the row's E4M3 values into `scratch` (every program writes the same
    bytes; this program's threads see their own after the barrier) -> the dequantizing
    scale. IN_MODE 0: x's scale."""
    if IN_MODE == 0:
        return tl.load(in_scale_ptr)
    c0 = tl.arange(0, PRO)
    rstd = 1.0
    if IN_MODE == 2:
        ss = tl.zeros([PRO], dtype=tl.float32)
        for s in range(0, K, PRO):
            hf = tl.load(x_ptr + s + c0).to(tl.float32)
            ss += hf * hf
        rstd = tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if STATIC:
        scale = tl.load(in_scale_ptr)
    elif IN_MODE == 1:
        # NOTE: .cg: maxed into by atomics at L2 (this SM's L1 may hold an older layer's value)
        scale = dynamic_scale(tl.load(amax_ptr, cache_modifier=".cg"))
    else:
        am = tl.zeros([PRO], dtype=tl.float32)
        for s in range(0, K, PRO):
            am = tl.maximum(am, tl.abs(_row_values(x_ptr, nw_ptr, s + c0, rstd, IN_MODE,
                                                   Y_DTYPE)))
        scale = dynamic_scale(tl.max(am, axis=0))
    inv = inverse_scale(scale)
    for s in range(0, K, PRO):
        y = _row_values(x_ptr, nw_ptr, s + c0, rstd, IN_MODE, Y_DTYPE)
        tl.store(scratch_ptr + s + c0, _quantize(y, inv).to(scratch_ptr.dtype.element_ty))
    tl.debug_barrier()
    return scale


@_jit
def _load_step(w_ptr, ws_ptr, res_ptr, j, pid, nprog, n_tiles, rn0, rk, N, stride_wn,
               KSTEPS: tl.constexpr, TOTAL: tl.constexpr, BLOCK_K: tl.constexpr,
               ADD_RESIDUAL: tl.constexpr):
    """Step j's weight tile, with its tile's channel scales (and residual values): loaded a
    step ahead so that the epilogue's loads are not exposed."""
    t = pid + (j // KSTEPS) * nprog
    rn = t * rn0.shape[0] + rn0
    mask_n = (rn < N) & (t < n_tiles) & (j < TOTAL)
    kk = (j % KSTEPS) * BLOCK_K
    w = tl.load(w_ptr + rn.to(tl.int64)[:, None] * stride_wn + (kk + rk)[None, :],
                mask=mask_n[:, None], other=0.0, eviction_policy="evict_first")
    ws = tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
    r = ws
    if ADD_RESIDUAL:
        r = tl.load(res_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
    return w, ws, r


@_jit
def _decode_gemv_kernel(x_ptr, amax_ptr, nw_ptr, in_scale_ptr, w_ptr, ws_ptr, b_ptr, out_ptr,
                        clear_ptr, xs_out_ptr, scratch_ptr, N, n_tiles, nprog, stride_wn, eps,
                        K: tl.constexpr, STEPS: tl.constexpr, IN_MODE: tl.constexpr,
                        STATIC: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                        HAS_BIAS: tl.constexpr, CLEAR: tl.constexpr, SCALE_OUT: tl.constexpr,
                        Y_DTYPE: tl.constexpr, PRO: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, K_ACC: tl.constexpr, PREFETCH: tl.constexpr,
                        EARLY: tl.constexpr, PDL: tl.constexpr):
    """Grid (nprog,): program p computes the N tiles p, p + nprog, ... (STEPS of them, those
    past n_tiles masked) of `y = x @ (W * ws)^T (+ b)` for one token row, K in BLOCK_K
    steps. See the module docstring for the modes."""
    pid = tl.program_id(0)
    KSTEPS: tl.constexpr = K // BLOCK_K
    TOTAL: tl.constexpr = STEPS * KSTEPS
    rn0 = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if EARLY:
        # NOTE: the weight and its scales are constants: loaded while the previous kernel
        # drains (the residual, not: it is the previous kernel's output).
        w_n, ws_n, r_n = _load_step(w_ptr, ws_ptr, out_ptr, 0, pid, nprog, n_tiles, rn0, rk,
                                    N, stride_wn, KSTEPS, TOTAL, BLOCK_K, False)
    pdl_wait(PDL)
    if not EARLY or ADD_RESIDUAL:
        w_n, ws_n, r_n = _load_step(w_ptr, ws_ptr, out_ptr, 0, pid, nprog, n_tiles, rn0, rk,
                                    N, stride_wn, KSTEPS, TOTAL, BLOCK_K, ADD_RESIDUAL)
    scale = _prepare_row(x_ptr, amax_ptr, nw_ptr, in_scale_ptr, scratch_ptr, eps, K, IN_MODE,
                         STATIC, Y_DTYPE, PRO)
    if CLEAR:
        if pid == 0:
            tl.store(clear_ptr, 0.0)
    x_src = x_ptr if IN_MODE == 0 else scratch_ptr
    # NOTE: x as [BN, BK] zero-stride broadcasts (L1 hits): already in the weight tile's
    # layout, no conversion through shared memory in the loop.
    x_ptrs = x_src + rk[None, :] + tl.zeros([BLOCK_N, 1], dtype=tl.int32)
    if K_ACC:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(TOTAL):
        w_raw, ws_c, r_c = w_n, ws_n, r_n
        if PREFETCH:
            # NOTE: Triton does not pipeline loads that feed no tl.dot: the next step's tile
            # is issued before this one's math.
            w_n, ws_n, r_n = _load_step(w_ptr, ws_ptr, out_ptr, j + 1, pid, nprog, n_tiles,
                                        rn0, rk, N, stride_wn, KSTEPS, TOTAL, BLOCK_K,
                                        ADD_RESIDUAL)
        kk = (j % KSTEPS) * BLOCK_K
        prod = w_raw.to(tl.float32) * tl.load(x_ptrs + kk).to(tl.float32)
        if K_ACC:
            acc += prod
        else:
            acc += tl.sum(prod, axis=1)
        if not PREFETCH:
            w_n, ws_n, r_n = _load_step(w_ptr, ws_ptr, out_ptr, j + 1, pid, nprog, n_tiles,
                                        rn0, rk, N, stride_wn, KSTEPS, TOTAL, BLOCK_K,
                                        ADD_RESIDUAL)
        if j % KSTEPS == KSTEPS - 1:
            if K_ACC:
                y = tl.sum(acc, axis=1)
                acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
            else:
                y = acc
                acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            t = pid + (j // KSTEPS) * nprog
            rn = t * BLOCK_N + rn0
            mask = (rn < N) & (t < n_tiles)
            y = y * scale * ws_c
            if HAS_BIAS:
                y += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
            y = y.to(out_ptr.dtype.element_ty)
            if ADD_RESIDUAL:
                # NOTE: `x + residual` rounded to the residual's dtype, as kernels/norm.py's
                # add_residual; this program alone owns these elements.
                y = (y.to(tl.float32) + r_c).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + rn, y, mask=mask)
    pdl_trigger(PDL)
    if SCALE_OUT:
        if pid == 0:
            tl.store(xs_out_ptr, scale)


# ---- reference and launcher ---------------------------------------------------------------
def fp8_decode_gemv_torch(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                          bias: torch.Tensor | None = None, *, in_mode: int,
                          in_scale: torch.Tensor | None = None,
                          amax: torch.Tensor | None = None,
                          norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                          residual: torch.Tensor | None = None,
                          out_dtype: torch.dtype | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of `fp8_decode_gemv` (not in place): -> `(y [1, N], scale [1, 1])`, with
    `residual` given `y` is `(x @ W^T) + residual` rounded as the kernel does."""
    from trtdist.kernels.fp8_gemm import fp8_gemm_torch
    from trtdist.kernels.norm import rms_norm_torch
    from trtdist.parallel.quant_fp8 import quantize_rows_to_fp8, scale_from_amax

    x = x.reshape(1, -1)
    if in_mode == IN_FP8:
        assert in_scale is not None
        xq, xs = x, in_scale.reshape(1, 1).float()
        dtype = out_dtype or torch.bfloat16
    else:
        dtype = x.dtype
        y = x if in_mode == IN_AMAX else rms_norm_torch(x, norm_weight, eps)
        if in_scale is not None:
            xs = in_scale.reshape(1, 1).float()
        elif in_mode == IN_AMAX:
            assert amax is not None
            xs = scale_from_amax(amax.reshape(-1)[:1].reshape(1, 1).float())
        else:
            xs = scale_from_amax(y.float().abs().amax(dim=1, keepdim=True))
        xq = quantize_rows_to_fp8(y.float(), xs)
        dtype = y.dtype
    out = fp8_gemm_torch(xq, xs, w, ws, bias, dtype)
    if residual is not None:
        out = (out + residual.reshape(1, -1)).to(residual.dtype)
    return out, xs


def _scratch(device: torch.device, k: int) -> torch.Tensor:
    """The quantized row's home `[K]` E4M3 per (device, K), kept for the life of the process
    (CUDA graphs replay into its address). Launches on one stream share it: each writes it
    after its PDL wait, when the launch before has completed."""
    key = (device, k)
    buf = _scratches.get(key)
    if buf is None:
        buf = torch.zeros(k, dtype=FP8_DTYPE, device=device)
        _scratches[key] = buf
    return buf


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # the interpreter: a small grid still walks several tiles a program
    if device not in _sm_counts:
        _sm_counts[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _sm_counts[device]


def fp8_decode_gemv(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                    bias: torch.Tensor | None = None, *, in_mode: int,
                    in_scale: torch.Tensor | None = None, amax: torch.Tensor | None = None,
                    norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                    out: torch.Tensor | None = None, add_residual: bool = False,
                    clear: torch.Tensor | None = None, scale_out: torch.Tensor | None = None,
                    out_dtype: torch.dtype | None = None,
                    config: DecodeGemvConfig | None = None) -> torch.Tensor:
    """One token row `x [1, K]` times the E4M3 weight `w [N, K]` (per-channel `ws [N]`
    float32, `bias [N]`) -> `[1, N]` in the model dtype (a new tensor or `out`).

    `in_mode`: IN_FP8 (x E4M3, `in_scale` its scale), IN_AMAX (x in the model dtype with its
    max |value| in `amax[0]`, or the static `in_scale`), IN_NORM (x is the residual stream:
    `RMSNorm(x) * norm_weight` with `eps`, quantized per token or with `in_scale`).
    `add_residual`: `out` (required, [1, N] model dtype) is the residual stream, updated IN
    PLACE to `out + x @ W^T`. `clear`: its element 0 is zeroed (IN_FP8 / IN_NORM only: the
    amax an IN_AMAX launch reads must not be cleared under it). `scale_out` ([1] float32)
    receives the activation's dequantizing scale. No host syncs: CUDA-graph capturable."""
    fn = "fp8_decode_gemv"
    if triton is None:
        raise RuntimeError(f"{fn} needs triton, which is not installed")
    if in_mode not in (IN_FP8, IN_AMAX, IN_NORM):
        raise ValueError(f"{fn}: in_mode must be {IN_FP8} (E4M3 x), {IN_AMAX} (x with its "
                         f"amax) or {IN_NORM} (residual stream, normalised), got {in_mode}")
    if w.dim() != 2 or w.dtype != FP8_DTYPE or w.stride(-1) != 1:
        raise ValueError(f"{fn}: w must be a 2-D float8_e4m3fn [N, K] with a unit last "
                         f"stride, got {tuple(w.shape)} {w.dtype}")
    n, k = w.shape
    cfg = config or DEFAULT
    if not supports(n, k, cfg):
        raise ValueError(f"{fn}: K = {k} must be a multiple of 16 and of block_k "
                         f"{cfg.block_k}, at most {MAX_K}")
    if x.numel() != k or not x.is_contiguous():
        raise ValueError(f"{fn}: x must be one contiguous row of K = {k} values, got "
                         f"{tuple(x.shape)}")
    want_x = (x.dtype == FP8_DTYPE) if in_mode == IN_FP8 else x.dtype in _OUT_DTYPES
    if not want_x:
        raise ValueError(f"{fn}: in_mode {in_mode} takes x "
                         f"{'float8_e4m3fn' if in_mode == IN_FP8 else 'in a float dtype'}, "
                         f"got {x.dtype}")
    static = in_scale is not None
    if static and (in_scale.numel() != 1 or in_scale.dtype != torch.float32):
        raise ValueError(f"{fn}: in_scale must hold one float32 value, got "
                         f"{tuple(in_scale.shape)} {in_scale.dtype}")
    if in_mode == IN_FP8 and not static:
        raise ValueError(f"{fn}: in_mode IN_FP8 needs in_scale (x's dequantizing scale)")
    if in_mode == IN_AMAX and not static:
        check_row_amax(amax, 1, x.device, fn, "amax")
        if amax is None:
            raise ValueError(f"{fn}: in_mode IN_AMAX needs amax or in_scale")
    if in_mode == IN_NORM and (norm_weight is None or norm_weight.shape != (k,)
                               or not norm_weight.is_contiguous()):
        raise ValueError(f"{fn}: in_mode IN_NORM needs norm_weight [{k}] contiguous, got "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)}")
    if ws.numel() != n or ws.dtype != torch.float32 or not ws.is_contiguous():
        raise ValueError(f"{fn}: ws must be [{n}] float32 contiguous, got {tuple(ws.shape)} "
                         f"{ws.dtype}")
    if bias is not None and (bias.numel() != n or not bias.is_contiguous()):
        raise ValueError(f"{fn}: bias must be [{n}] contiguous, got {tuple(bias.shape)}")
    if clear is not None and in_mode == IN_AMAX:
        raise ValueError(f"{fn}: clear cannot be used with in_mode IN_AMAX (the amax it reads)")
    check_row_amax(clear, 1, x.device, fn, "clear")
    check_row_amax(scale_out, 1, x.device, fn, "scale_out")
    dtype = out_dtype or (x.dtype if in_mode != IN_FP8 else torch.bfloat16)
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"{fn}: out_dtype must be float16, bfloat16 or float32, got {dtype}")
    if out is None:
        if add_residual:
            raise ValueError(f"{fn}: add_residual needs out (the residual stream, updated in "
                             "place)")
        out = torch.empty((1, n), dtype=dtype, device=x.device)
    elif out.numel() != n or not out.is_contiguous() or (out.dtype != dtype
                                                         and not add_residual):
        raise ValueError(f"{fn}: out must be [1, {n}] {dtype} contiguous, got "
                         f"{tuple(out.shape)} {out.dtype}")
    n_tiles = -(-n // cfg.block_n)
    bk = min(cfg.block_k, k)
    nprog = max(1, min(n_tiles, cfg.programs_per_sm * _sm_count(x.device)))
    y_dtype = (torch.promote_types(x.dtype, norm_weight.dtype) if in_mode == IN_NORM
               else x.dtype)
    tl_dtypes = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                 torch.float32: tl.float32, FP8_DTYPE: tl.float32}
    dummy = ws
    _decode_gemv_kernel[(nprog,)](
        x, amax if amax is not None else dummy,
        norm_weight if norm_weight is not None else dummy,
        in_scale if static else dummy, w, ws, bias if bias is not None else dummy, out,
        clear if clear is not None else dummy, scale_out if scale_out is not None else dummy,
        _scratch(x.device, k) if in_mode != IN_FP8 else dummy,
        n, n_tiles, nprog, w.stride(0), eps, K=k, STEPS=-(-n_tiles // nprog), IN_MODE=in_mode,
        STATIC=static and in_mode != IN_FP8, ADD_RESIDUAL=add_residual,
        HAS_BIAS=bias is not None, CLEAR=clear is not None, SCALE_OUT=scale_out is not None,
        Y_DTYPE=tl_dtypes[y_dtype], PRO=_prologue_block(k), BLOCK_N=cfg.block_n, BLOCK_K=bk,
        K_ACC=cfg.k_acc, PREFETCH=cfg.prefetch, EARLY=cfg.early, num_warps=cfg.num_warps,
        **pdl_launch(x.device))
    return out
