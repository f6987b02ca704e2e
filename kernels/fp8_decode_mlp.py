"""One token's decoder layer from the attention output to the MLP output in one persistent
CUDA launch (`fp8_decode_mlp.cu`): the FP8 o projection with its residual add, the
post-attention RMSNorm and per-token quantization, gate | up with SiLU x up, and the FP8 down
projection. The batch-1 decode case of an FP8 Llama layer on one tensor-parallel rank.

Why: at batch 1 every weight is a short stream, and each of the five kernel boundaries this
replaces (o, norm, gate | up, SiLU, down) costs ~2 us of DRAM idling while the next kernel
ramps up (PERF_NOTES.md). One CTA a SM: a producer warp copies all three weights with TMA
into a ring of shared-memory stages from the kernel's start to its end, never waiting on the
two grid barriers, so the next weights are in flight while a barrier or the norm resolves.

Numbers: the same formulas and model-dtype roundings as the separate kernels; a result can
differ from them by an output step where a float32 sum's order (the norm's sum of squares,
the GEMVs' per-warp sums) moves a rounding. `fp8_decode_mlp_torch` is the reference.

Constraints (`supports`): a GPU of compute capability >= 9.0 (TMA) with `cuda.bindings`; one
tensor-parallel rank (no all-reduce between the o projection and the norm); no biases; per-
token activation scales; hidden, o-input and intermediate sizes multiples of a stage's K
(128 x warps); one CTA a SM (its shared memory takes the SM). TRTDIST_FP8_DECODE_MLP=0
turns it off (A/B measures).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from trtdist.kernels import cuda_jit
from trtdist.kernels._triton import pdl_enabled
from trtdist.kernels.fp8_fused import rms_norm_quant_torch, silu_and_mul_quant_torch
from trtdist.kernels.fp8_gemm import fp8_gemm_torch
from trtdist.kernels.fp8_quant import quantize_activation_torch

SOURCE = Path(__file__).with_name("fp8_decode_mlp.cu")
ENV = "TRTDIST_FP8_DECODE_MLP"  # "0": keep the separate kernels
CONFIG_ENV = "TRTDIST_FP8_DECODE_MLP_CONFIG"  # "NWARPS,STEPS,STAGES": a launch to measure
_DTYPE_IDS = {torch.bfloat16: 0, torch.float16: 1}
_MAX_SHARED = 227 * 1024  # dynamic shared memory a CTA may take on sm_90


@dataclass(frozen=True, slots=True)
class DecodeMlpConfig:
    """One launch: `nwarps` consumer warps a CTA (plus the producer warp), each taking `steps`
    128-byte steps of every stage (a stage holds 16 rows x 128 x nwarps x steps bytes of K);
    `stages` in the shared-memory ring."""

    nwarps: int = 8
    steps: int = 1
    stages: int = 11

    def __post_init__(self) -> None:
        if self.nwarps not in (4, 8, 16) or not 1 <= self.steps <= 4 or not 2 <= self.stages <= 32:
            raise ValueError(f"DecodeMlpConfig: nwarps must be 4, 8 or 16, steps 1-4 and stages "
                             f"2-32, got {self}")

    @property
    def chunk(self) -> int:
        """Bytes of a row's K a stage holds."""
        return 128 * self.nwarps * self.steps


def _env_config() -> DecodeMlpConfig | None:
    text = os.environ.get(CONFIG_ENV)
    if not text:
        return None
    return parse_config(text, CONFIG_ENV)


def parse_config(text: str, what: str) -> DecodeMlpConfig:
    """'NWARPS,STEPS,STAGES' -> a config (ValueError naming `what` otherwise)."""
    try:
        values = [int(v) for v in text.split(",")]
        if len(values) != 3:
            raise ValueError(f"{len(values)} values")
    except ValueError as e:
        raise ValueError(f"{what}={text!r}: want 'NWARPS,STEPS,STAGES', e.g. '8,1,11' "
                         f"({e})") from e
    return DecodeMlpConfig(*values)


ENV_CONFIG = _env_config()  # NOTE: read once, at import (A/B measures)


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _max_tiles(hidden: int, ctas: int) -> int:
    """The most 16-row o / down tiles one CTA takes (tiles cta, cta + G, ...)."""
    return math.ceil(hidden // 16 / ctas)


def _max_gate_up(inter: int, ctas: int) -> int:
    """The most gate | up tiles one CTA may take from the shared counter: 2 above an even
    split, room for the faster SMs (the total always fits: ctas x this >= tiles)."""
    return math.ceil(inter // 8 / ctas) + 2


def shared_bytes(hidden: int, q: int, inter: int, ctas: int, cfg: DecodeMlpConfig) -> int:
    """The launch's dynamic shared memory (the layout before the kernel in the .cu)."""
    tiles, gu = _max_tiles(hidden, ctas), _max_gate_up(inter, ctas)
    size = cfg.stages * 16 * (cfg.chunk + 64) + max(q, inter) + hidden  # ring, x buffers
    size += max(tiles, gu) * cfg.nwarps * 64  # per-warp tile sums
    size += (3 * tiles * 16 + 16 * gu) * 4 + (gu + cfg.stages) * 4  # rows, ints
    return (size + cfg.nwarps * 4 + 7) // 8 * 8 + 16 * cfg.stages  # reductions, mbarriers


def fits(hidden: int, q: int, inter: int, ctas: int, cfg: DecodeMlpConfig) -> bool:
    """Whether the launch `cfg` takes this shape on `ctas` SMs: every K in whole stages, the
    norm row in whole 16-byte runs per consumer thread, shared memory within an SM's 227 KB."""
    if any(k % cfg.chunk for k in (hidden, q, inter)) or hidden % (256 * cfg.nwarps):
        return False
    return shared_bytes(hidden, q, inter, ctas, cfg) <= _MAX_SHARED


def config_for(hidden: int, q: int, inter: int, ctas: int) -> DecodeMlpConfig | None:
    """The launch for a shape: TRTDIST_FP8_DECODE_MLP_CONFIG if set, else the first of 8
    consumer warps x 2 steps (2 KB stages), 16 x 1, 8 x 1, 4 x 2, 4 x 1 that divides the shape,
    with as many stages as fit (up to 12); None if none fits."""
    if ENV_CONFIG is not None:
        return ENV_CONFIG if fits(hidden, q, inter, ctas, ENV_CONFIG) else None
    for nwarps, steps in ((8, 2), (16, 1), (8, 1), (4, 2), (4, 1)):
        for stages in range(12, 3, -1):
            cfg = DecodeMlpConfig(nwarps, steps, stages)
            if fits(hidden, q, inter, ctas, cfg):
                return cfg
    return None


def supports(hidden: int, q: int, inter: int, dtype: torch.dtype,
             device: torch.device) -> bool:
    """Whether `fp8_decode_mlp` can run this layer shape on `device` (see the module
    docstring); False when turned off by TRTDIST_FP8_DECODE_MLP=0."""
    if os.environ.get(ENV, "1") == "0" or dtype not in _DTYPE_IDS or device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(device) < (9, 0) or not cuda_jit.available(device):
        return False
    return config_for(hidden, q, inter, _sm_count(device)) is not None


class DecodeMlpScratch:
    """The launch's buffers in global memory, kept for the model's life (a CUDA graph replays
    their addresses): the gate | up row `gu [2I]` (where the CTAs' tiles meet), and two
    64-bit counters: the grid barriers' (only grows, never reset: the kernel derives each
    launch's base from it) and the gate | up tiles handed out (reset by the kernel once all
    are taken)."""

    def __init__(self, inter: int, dtype: torch.dtype, device: torch.device) -> None:
        self.gu = torch.zeros(2 * inter, dtype=dtype, device=device)
        self.inter, self.dtype, self.device = inter, dtype, self.gu.device
        self.counter = torch.zeros(2, dtype=torch.int64, device=device)
        self.failed = False  # set by the caller when a launch failed: it stops using it


def fp8_decode_mlp(attn: torch.Tensor, attn_amax: torch.Tensor, wo: torch.Tensor,
                   wo_scale: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                   eps: float, wgu: torch.Tensor, wgu_scale: torch.Tensor, wd: torch.Tensor,
                   wd_scale: torch.Tensor, scratch: DecodeMlpScratch, *,
                   out: torch.Tensor | None = None,
                   config: DecodeMlpConfig | None = None,
                   timing: torch.Tensor | None = None) -> torch.Tensor:
    """`attn [1, Q]` (model dtype) with its row amax `attn_amax [>= 1]` float32 -> the MLP
    output `[1, H]`; `residual [1, H]` becomes `attn . Wo^T + residual` in place (the stream
    that the next layer's norm adds the output to). Weights E4M3 `[out, in]` with float32
    per-row scales: `wo [H, Q]`, `wgu [2I, H]` (gate rows, then up rows), `wd [H, I]`.

    Checks shapes, dtypes and contiguity (ValueError); raises `CudaJitError` when the kernel
    cannot compile or launch. Call `supports` first. `timing` (int64, >= 10 x SMs; a
    measurement build): each CTA's %globaltimer at the kernel's 10 stamps (see the .cu)."""
    hidden, q = wo.shape
    inter = wd.shape[1]
    dtype = residual.dtype  # the model dtype: the stream's
    _check(attn, attn_amax, wo, wo_scale, residual, norm_weight, wgu, wgu_scale, wd, wd_scale,
           scratch, hidden, q, inter, dtype)
    if out is None:
        out = torch.empty((1, hidden), dtype=dtype, device=attn.device)
    elif out.shape != (1, hidden) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"fp8_decode_mlp: out must be contiguous [1, {hidden}] {dtype}, got "
                         f"{tuple(out.shape)} {out.dtype}")
    ctas = _sm_count(attn.device)
    cfg = config or config_for(hidden, q, inter, ctas)
    if cfg is None or not fits(hidden, q, inter, ctas, cfg):
        raise ValueError(f"fp8_decode_mlp: no launch for hidden {hidden}, o input {q}, "
                         f"intermediate {inter} on {ctas} SMs ({cfg})")
    defines = dict(H=hidden, Q=q, I=inter, NWARPS=cfg.nwarps, STEPS=cfg.steps,
                   STAGES=cfg.stages,
                   MAX_TILES=_max_tiles(hidden, ctas), MAX_GU=_max_gate_up(inter, ctas),
                   X_T=_DTYPE_IDS[dtype],
                   OUT_T=_DTYPE_IDS[dtype], TIMING=int(timing is not None))
    if timing is not None and (timing.dtype != torch.int64 or timing.numel() < 10 * ctas):
        raise ValueError(f"fp8_decode_mlp: timing must be int64 with >= {10 * ctas} elements")
    fn = cuda_jit.load(SOURCE, "fp8_decode_mlp", defines, attn.device)
    P, F = cuda_jit.POINTER, cuda_jit.FLOAT
    args = (attn, attn_amax, wo, wo_scale, residual, norm_weight, float(eps), wgu, wgu_scale,
            wd, wd_scale, scratch.gu, scratch.counter, out,
            timing if timing is not None else out)  # unused without TIMING
    fn.launch(ctas, 32 * (cfg.nwarps + 1),
              tuple(a if isinstance(a, float) else a.data_ptr() for a in args),
              tuple(F if isinstance(a, float) else P for a in args),
              pdl=pdl_enabled(attn.device),
              shared=shared_bytes(hidden, q, inter, ctas, cfg))
    return out


def _check(attn: torch.Tensor, attn_amax: torch.Tensor, wo: torch.Tensor,
           wo_scale: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
           wgu: torch.Tensor, wgu_scale: torch.Tensor, wd: torch.Tensor, wd_scale: torch.Tensor,
           scratch: DecodeMlpScratch, hidden: int, q: int, inter: int,
           dtype: torch.dtype) -> None:
    fp8 = torch.float8_e4m3fn
    want = {
        "attn": (attn, (1, q), dtype), "residual": (residual, (1, hidden), dtype),
        "norm_weight": (norm_weight, (hidden,), dtype), "wo": (wo, (hidden, q), fp8),
        "wo_scale": (wo_scale, (hidden,), torch.float32),
        "wgu": (wgu, (2 * inter, hidden), fp8),
        "wgu_scale": (wgu_scale, (2 * inter,), torch.float32),
        "wd": (wd, (hidden, inter), fp8), "wd_scale": (wd_scale, (hidden,), torch.float32),
    }
    for name, (t, shape, dt) in want.items():
        if tuple(t.shape) != shape or t.dtype != dt or not t.is_contiguous():
            raise ValueError(f"fp8_decode_mlp: {name} must be contiguous {list(shape)} {dt}, "
                             f"got {list(t.shape)} {t.dtype}"
                             f"{'' if t.is_contiguous() else ' (not contiguous)'}")
        if t.device != attn.device or t.data_ptr() % 16:
            raise ValueError(f"fp8_decode_mlp: {name} must be on {attn.device}, 16-byte "
                             f"aligned")
    if attn_amax.dtype != torch.float32 or attn_amax.numel() < 1:
        raise ValueError("fp8_decode_mlp: attn_amax must be a float32 slot")
    if scratch.inter != inter or scratch.dtype != dtype or scratch.device != attn.device:
        raise ValueError(f"fp8_decode_mlp: scratch is for I = {scratch.inter} {scratch.dtype} "
                         f"on {scratch.device}, the call needs I = {inter} {dtype} on "
                         f"{attn.device}")


def fp8_decode_mlp_torch(attn: torch.Tensor, wo: torch.Tensor, wo_scale: torch.Tensor,
                         residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         wgu: torch.Tensor, wgu_scale: torch.Tensor, wd: torch.Tensor,
                         wd_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference, with the separate kernels' references: -> `(out, new residual)` (the
    residual is not modified). `attn`'s amax is its own row max (what the attention hands)."""
    dtype = attn.dtype
    xq, xs = quantize_activation_torch(attn, None)
    o = fp8_gemm_torch(xq, xs, wo, wo_scale, None, dtype)
    xq, xs, res = rms_norm_quant_torch(o, residual, norm_weight, eps, None)
    h = fp8_gemm_torch(xq, xs, wgu, wgu_scale, None, dtype)
    xq, xs = silu_and_mul_quant_torch(h, None)
    return fp8_gemm_torch(xq, xs, wd, wd_scale, None, dtype), res
