"""One-token FP8 GEMV that streams its weights across kernel boundaries (`fp8_gemv_stream.cu`,
compiled by NVRTC through `kernels/cuda_jit.py`): `y [1, N] = (x . W^T) * x_scale * w_scale
(+ bias)` for E4M3 `W [N, K]`, the batch-1 decode case of `kernels/fp8_gemm.py`'s small-M
GEMM, with the input modes of `fp8_gemv_cuda.py` (0 E4M3 x and its scale, 1 model-dtype x
quantized from its row amax, 2 with a static scale).

Design: one persistent CTA an SM; a producer warp copies the CTA's rows with TMA bulk copies
into a shared-memory ring (~200 KB), starting before the programmatic-dependent-launch wait
(the weights depend on nothing the previous kernels compute), and the kernel lets the next
one launch at its start. With the one-token row kernels between two GEMVs also letting the
next launch at their start (`kernels/_triton.py`, early trigger), the next GEMV's CTAs take
the SMs as the current one's leave and fill their rings during its tail and the row kernels.

The fused-input launches (`fp8_gemv_stream_norm` / `_silu` / `_dynamic`) compute their input
row in every CTA (add + RMSNorm, SiLU x up, per-token quantization), replacing a row kernel.

The gated launch (`fp8_gemv_stream_gated`) returns SiLU(gate) * up of a gate | up GEMM and
its row amax, replacing the SiLU x up kernel.

The rotary launch (`fp8_gemv_stream_rotary`) of a q | k | v GEMM rotates q and k at the
token's position and writes k and v into a model-dtype paged cache, replacing the rotary +
cache-write kernel (`kernels/rotary.py`) and its launch boundary.

On by default (llama3-8b on an H200, batch 1: 2.59 -> 2.30 ms a token, with the rest of the
eighteenth session's changes 1.71x bf16; BENCHMARKS.md): the engine sends here every
one-token FP8 GEMM whose shape streams well (`worth_streaming`), and its first launch on a
device turns the one-token row kernels' early trigger on there (`_triton.mark_streaming`).
`TRTDIST_STREAM_GEMV=0` turns it off; `TRTDIST_STREAM_GEMV_CONFIG` picks the launch
(`parse_table`; set, it also takes every shape that fits), `TRTDIST_STREAM_GEMV_PREFILL` its
prefill, `TRTDIST_STREAM_GEMV_GATED=0` keeps the SiLU x up kernel,
`TRTDIST_STREAM_GEMV_ROTARY=0` the rotary kernel, `TRTDIST_STREAM_GEMV_FUSED` the fused inputs
(off: slower).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from trtdist.kernels import cuda_jit
from trtdist.kernels._triton import mark_streaming, pdl_enabled
from trtdist.kernels.rotary import RotaryCacheWrite

SOURCE = Path(__file__).with_name("fp8_gemv_stream.cu")
ENV = "TRTDIST_STREAM_GEMV"
# which inputs a launch may compute itself (A/B): "1" all (norm, SiLU x up, plain rows),
# "norm" norms and plain rows (SiLU x up by its own kernel), "0" none
FUSED_ENV = "TRTDIST_STREAM_GEMV_FUSED"
PROLOGUE_KINDS = {"1": ("norm", "gated", "plain"), "norm": ("norm", "plain"), "0": ()}
CONFIG_ENV = "TRTDIST_STREAM_GEMV_CONFIG"
PREFILL_ENV = "TRTDIST_STREAM_GEMV_PREFILL"  # stages copied before the producer waits too
GATED_ENV = "TRTDIST_STREAM_GEMV_GATED"  # "0": gate | up GEMMs leave SiLU x up to its kernel
ROTARY_ENV = "TRTDIST_STREAM_GEMV_ROTARY"  # "0": qkv GEMMs leave rotary + cache to its kernel
ROWS_PER_UNIT = 16
SMEM_LIMIT = 227 * 1024  # an sm_90 CTA's dynamic shared memory at most
_DTYPE_IDS = {torch.bfloat16: 0, torch.float16: 1}
_sms: dict[torch.device, int] = {}
_capabilities: dict[torch.device, tuple[int, int]] = {}


@dataclass(frozen=True, slots=True)
class StreamGemvConfig:
    """One launch of `fp8_gemv_stream`: stages of 16 rows x `kc` bytes, `stages` of them in
    the ring, `nwarps` consumer warps (plus the producer warp); `min_blocks` caps registers
    so that many CTAs fit an SM; `prefill`: the producer streams before the wait (at most
    `prefill_stages` stages, 0: the whole ring); `early_trigger`: the next kernel may launch
    at this one's start."""

    kc: int = 2048
    stages: int = 6
    nwarps: int = 4
    min_blocks: int = 2
    prefill: bool = True
    early_trigger: bool = True
    prefill_stages: int = 3

    def __post_init__(self) -> None:
        if (self.kc <= 0 or self.kc % (128 * self.nwarps) or not 2 <= self.stages <= 32
                or not 1 <= self.nwarps <= 16 or not 1 <= self.min_blocks <= 8
                or self.prefill_stages < 0):
            raise ValueError(f"StreamGemvConfig: want kc a positive multiple of 128 x nwarps, "
                             f"2 <= stages <= 32, 1 <= nwarps <= 16, 1 <= min_blocks <= 8, "
                             f"prefill_stages >= 0; got {self}")

    def fits(self, k: int) -> bool:
        """Whether K splits into this config's stages."""
        return k % self.kc == 0

    @classmethod
    def parse(cls, text: str) -> StreamGemvConfig:
        """`"kc:stages:nwarps[:prefill_stages]"` (one entry of the TRTDIST_STREAM_GEMV_CONFIG
        form; without the prefill, the default's; 0: the whole ring)."""
        try:
            values = [int(v) for v in text.split(":")]
            if len(values) not in (3, 4):
                raise ValueError
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}: want 'kc:stages:nwarps[:prefill_stages]' (e.g. "
                             f"2048:6:4:3), got {text!r}") from None
        extra = {"prefill_stages": values[3]} if len(values) == 4 else {}
        return cls(*values[:3], **extra)


TableKey = tuple[int, int] | int | None  # (N, K), K, or every shape


@functools.lru_cache(maxsize=8)  # read on every eligible GEMM call: parse each text once
def parse_table(text: str) -> dict[TableKey, StreamGemvConfig]:
    """TRTDIST_STREAM_GEMV_CONFIG: comma-separated entries `kc:stages:nwarps[:prefill]`, each
    for every shape, or as `K=...` for that K, or as `NxK=...` for that shape (e.g.
    `2048:6:4:3,4096x4096=2048:6:4`)."""
    table: dict[TableKey, StreamGemvConfig] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, cfg = item.rpartition("=")
        try:
            n, x, k = key.partition("x")
            shape: TableKey = ((int(n), int(k)) if x else int(key)) if key else None
        except ValueError:
            raise ValueError(f"{CONFIG_ENV}: bad shape {key!r} in {item!r} (want K or "
                             f"NxK)") from None
        table[shape] = StreamGemvConfig.parse(cfg)
    return table


def enabled() -> bool:
    """Whether the engine sends one-token FP8 GEMMs here (on unless TRTDIST_STREAM_GEMV=0)."""
    v = os.environ.get(ENV, "1")
    if v not in ("0", "1"):
        raise ValueError(f"{ENV} must be 0 or 1 (default 1), got {v!r}")
    return v == "1"


def default_config(k: int, n: int | None = None) -> StreamGemvConfig | None:
    """TRTDIST_STREAM_GEMV_CONFIG's entry for [N, K] (or K, or every shape) if set, else 6
    stages of 2 KB copies (~200 KB: one CTA an SM, the next kernel's CTA taking the SM as this
    one leaves) of which 3 are copied before the producer waits too: measured fastest
    (PERF_NOTES.md, seventeenth session). TRTDIST_STREAM_GEMV_PREFILL overrides the prefill
    (0: the whole ring); None if K does not split."""
    table = parse_table(os.environ.get(CONFIG_ENV, ""))
    cfg = table.get((n, k)) or table.get(k) or table.get(None) or StreamGemvConfig()
    prefill = os.environ.get(PREFILL_ENV)
    if prefill:
        try:
            cfg = dataclasses.replace(cfg, prefill_stages=int(prefill))
        except ValueError:
            raise ValueError(f"{PREFILL_ENV}: want a number of stages >= 0, got "
                             f"{prefill!r}") from None
    if not cfg.fits(k):
        # 512-byte copies (slower, PERF_NOTES.md), in about as many ring bytes
        cfg = (StreamGemvConfig(kc=512, stages=min(32, cfg.stages * 3), nwarps=4,
                                prefill_stages=cfg.prefill_stages * 4)
               if k % 512 == 0 else None)
    return cfg


def _sm_count(device: torch.device) -> int:
    n = _sms.get(device)
    if n is None:
        n = _sms[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def smem_bytes(cfg: StreamGemvConfig, k: int, max_units: int, rotary: bool = False) -> int:
    """Dynamic shared memory of one CTA (the layout of fp8_gemv_stream.cu)."""
    ring = cfg.stages * ROWS_PER_UNIT * (cfg.kc + 64)
    return (ring + k + (3 if rotary else 2) * max_units * 16 * 4 + 2 * cfg.nwarps * 16 * 4
            + 8 * ((cfg.nwarps + 1) // 2) + 16 * cfg.stages)


def plan(n: int, k: int, device: torch.device, cfg: StreamGemvConfig,
         rotary: bool = False) -> tuple[int, int, int]:
    """(CTAs, units a CTA at most, shared memory bytes) of a launch for `[N, K]`."""
    units = n // ROWS_PER_UNIT
    grid = min(_sm_count(device), units)
    max_units = -(-units // grid)
    return grid, max_units, smem_bytes(cfg, k, max_units, rotary)


def _device_ok(device: torch.device) -> bool:
    if not enabled() or device.type != "cuda":
        return False
    cap = _capabilities.get(device)
    if cap is None:
        cap = _capabilities[device] = torch.cuda.get_device_capability(device)
    return cap >= (9, 0) and cuda_jit.available(device)


MAX_IMBALANCE = 1.05  # the busiest CTA's units over the mean, at most (default dispatch)


def worth_streaming(n: int, k: int, device: torch.device, cfg: StreamGemvConfig) -> bool:
    """Whether the default dispatch streams `[N, K]` with `cfg`: only where it was measured
    fast, i.e. 2 KB copies (smaller ones stream slower: 1 KB rings 20% slower on gate | up,
    512 B twice as slow, PERF_NOTES.md, seventeenth session) and a static split of the N / 16
    units over the SMs within 5% of even (e.g. tensor-parallel qkv shards of 192 units over
    132 SMs would run at the pace of 2 units a CTA, 37% over the mean). Other shapes keep
    the CUDA GEMV; a TRTDIST_STREAM_GEMV_CONFIG table overrides this."""
    units = n // ROWS_PER_UNIT
    grid, max_units, _ = plan(n, k, device, cfg)
    return cfg.kc == 2048 and max_units * grid <= MAX_IMBALANCE * units


def _shape_ok(n: int, k: int, device: torch.device) -> bool:
    cfg = default_config(k, n)
    if n % ROWS_PER_UNIT or cfg is None or plan(n, k, device, cfg)[2] > SMEM_LIMIT:
        return False
    return bool(os.environ.get(CONFIG_ENV)) or worth_streaming(n, k, device, cfg)


def supports(m: int, n: int, k: int, x_dtype: torch.dtype, out_dtype: torch.dtype,
             device: torch.device, has_bias_dtype: torch.dtype | None = None) -> bool:
    """Whether the engine sends this call to `fp8_gemv_stream`: on (TRTDIST_STREAM_GEMV), one
    token row, a shape that streams well (`worth_streaming`; any that fits with a launch
    table), 16-bit output (model-dtype input of the same type, or E4M3), on a GPU with TMA
    bulk copies (sm_90+) where the CUDA kernels are available."""
    if m != 1 or out_dtype not in _DTYPE_IDS:
        return False
    if x_dtype != torch.float8_e4m3fn and x_dtype != out_dtype:
        return False
    if has_bias_dtype is not None and has_bias_dtype != out_dtype:
        return False
    return _device_ok(device) and _shape_ok(n, k, device)


def supports_prologue(n: int, k: int, dtype: torch.dtype, device: torch.device,
                      kind: str = "norm") -> bool:
    """Whether the fused-input launch of `kind` ("norm": `fp8_gemv_stream_norm`, "gated":
    `_silu`, "plain": `_dynamic`) takes a one-token GEMM of `[N, K]` in model dtype `dtype`:
    as `supports`, with K in 16-byte runs of the consumer threads."""
    allowed = PROLOGUE_KINDS.get(os.environ.get(FUSED_ENV, "0"))
    if allowed is None:
        raise ValueError(f"{FUSED_ENV} must be one of {sorted(PROLOGUE_KINDS)}, got "
                         f"{os.environ.get(FUSED_ENV)!r}")
    if kind not in allowed:
        return False
    cfg = default_config(k, n)
    return (dtype in _DTYPE_IDS and cfg is not None and k % (8 * 32 * cfg.nwarps) == 0
            and _device_ok(device) and _shape_ok(n, k, device))


def _launch(x: torch.Tensor, x_scale: torch.Tensor | None, x_mode: int, w: torch.Tensor,
            ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
            config: StreamGemvConfig | None, res: torch.Tensor | None = None,
            res_out: torch.Tensor | None = None, norm_w: torch.Tensor | None = None,
            eps: float = 0.0, amax_out: torch.Tensor | None = None,
            rope: RotaryCacheWrite | None = None) -> torch.Tensor:
    n, k = w.shape
    gated = amax_out is not None
    cfg = config or default_config(k, n)
    if cfg is None or not cfg.fits(k) or n % ROWS_PER_UNIT:
        raise ValueError(f"fp8_gemv_stream: no launch for [N, K] = [{n}, {k}] ({cfg})")
    grid, max_units, shared = plan(n, k, w.device, cfg, rope is not None)
    if shared > SMEM_LIMIT:
        raise ValueError(f"fp8_gemv_stream: {shared} bytes of shared memory for K = {k} with "
                         f"{cfg}; at most {SMEM_LIMIT}")
    prefill = (cfg.prefill_stages or 1 << 30) if cfg.prefill else 0
    defines = dict(K=k, NWARPS=cfg.nwarps, KC=cfg.kc, STAGES=cfg.stages, MAXU=max_units,
                   MIN_BLOCKS=cfg.min_blocks, PREFILL_STAGES=prefill, GATED=int(gated),
                   EARLY_TRIGGER=int(cfg.early_trigger), X_MODE=x_mode,
                   X_T=_DTYPE_IDS.get(x.dtype, 0), OUT_T=_DTYPE_IDS[out.dtype],
                   HAS_BIAS=int(bias is not None), HAS_RES=int(res is not None),
                   ROTARY=int(rope is not None))
    if rope is not None:
        kc, vc = rope.k_cache, rope.v_cache
        defines.update(HD=rope.head_dim, HQ=rope.q_heads, HKV=rope.kv_heads,
                       BLOCK_SIZE=kc.shape[1], POS64=int(rope.positions.dtype == torch.int64),
                       SLOT64=int(rope.slot_mapping.dtype == torch.int64),
                       **{f"KS{i}": st for i, st in enumerate(kc.stride())},
                       **{f"VS{i}": st for i, st in enumerate(vc.stride())})
    fn = cuda_jit.load(SOURCE, "fp8_gemv_stream", defines, w.device)
    P = cuda_jit.POINTER
    if cfg.early_trigger:
        mark_streaming(w.device)

    def ptr(t: torch.Tensor | None) -> int:
        return (t if t is not None else out).data_ptr()  # `out`: a placeholder, never read

    r = rope
    fn.launch(grid, cfg.nwarps * 32 + 32,
              (w.data_ptr(), ws.data_ptr(), x.data_ptr(), ptr(x_scale), ptr(bias),
               out.data_ptr(), n // ROWS_PER_UNIT, ptr(res), ptr(res_out), ptr(norm_w),
               float(eps), ptr(amax_out), ptr(r and r.positions), ptr(r and r.slot_mapping),
               ptr(r and r.cos_sin), r.cos_sin.stride(0) if r else 0, ptr(r and r.k_cache),
               ptr(r and r.v_cache)),
              (P, P, P, P, P, P, ctypes.c_int, P, P, P, ctypes.c_float, P, P, P, P,
               ctypes.c_int, P, P),
              pdl=pdl_enabled(w.device), shared=shared)
    return out


def fp8_gemv_stream(x: torch.Tensor, x_scale: torch.Tensor, x_mode: int, w: torch.Tensor,
                    ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, *,
                    config: StreamGemvConfig | None = None) -> torch.Tensor:
    """`out [1, N] = x [1, K] . w [N, K]^T` scaled (see the module docstring). `x_scale`:
    X_MODE 0 the token's float32 scale, 1 its row amax (float32 slot), 2 the static scale.
    The caller checks shapes, dtypes, contiguity and 16-byte alignment (`supports`); raises
    `CudaJitError` when the kernel cannot compile or launch."""
    if x_mode not in (0, 1, 2):
        raise ValueError(f"fp8_gemv_stream: x_mode must be 0, 1 or 2, got {x_mode}")
    return _launch(x, x_scale, x_mode, w, ws, bias, out, config)


def gated_enabled() -> bool:
    """Whether gate | up GEMMs return SiLU x up (on unless TRTDIST_STREAM_GEMV_GATED=0)."""
    return os.environ.get(GATED_ENV, "1") != "0"


def fp8_gemv_stream_gated(x: torch.Tensor, x_scale: torch.Tensor, x_mode: int, w: torch.Tensor,
                          ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                          amax_out: torch.Tensor, *,
                          config: StreamGemvConfig | None = None) -> torch.Tensor:
    """`out [1, I] = SiLU(gate) * up` of the gate | up GEMM `x . w [2I, K]^T` (input modes as
    `fp8_gemv_stream`), each rounded to the model dtype as the separate kernels round them;
    the row's max |value| is maxed into `amax_out[0]` (float32, zero or a lower bound
    before), for the next GEMM to quantize from."""
    n = w.shape[0]
    if n % 32 or out.numel() != n // 2 or amax_out.dtype != torch.float32:
        raise ValueError(f"fp8_gemv_stream_gated: want 2I rows (I a multiple of 16), out of I "
                         f"values and a float32 amax slot; got N = {n}, out {tuple(out.shape)}, "
                         f"amax {amax_out.dtype}")
    if x_mode not in (0, 1, 2):
        raise ValueError(f"fp8_gemv_stream_gated: x_mode must be 0, 1 or 2, got {x_mode}")
    return _launch(x, x_scale, x_mode, w, ws, bias, out, config, amax_out=amax_out)


def rotary_enabled() -> bool:
    """Whether one-token q | k | v GEMMs also do rotary and the cache write (on unless
    TRTDIST_STREAM_GEMV_ROTARY=0)."""
    v = os.environ.get(ROTARY_ENV, "1")
    if v not in ("0", "1"):
        raise ValueError(f"{ROTARY_ENV} must be 0 or 1 (default 1), got {v!r}")
    return v == "1"


def supports_rotary(n: int, k: int, dtype: torch.dtype, head_dim: int,
                    device: torch.device) -> bool:
    """Whether `fp8_gemv_stream_rotary` takes a one-token q | k | v GEMM of `[N, K]` with
    model dtype `dtype` (E4M3 input): as `supports`, heads in 16-row units (two 8-row halves)
    and the rotary launch's shared memory within the limit."""
    if not rotary_enabled() or head_dim <= 0 or head_dim % 16 or n % head_dim:
        return False
    cfg = default_config(k, n)
    return (supports(1, n, k, torch.float8_e4m3fn, dtype, device) and cfg is not None
            and plan(n, k, device, cfg, rotary=True)[2] <= SMEM_LIMIT)


def fp8_gemv_stream_rotary(x: torch.Tensor, x_scale: torch.Tensor, x_mode: int,
                           w: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
                           out: torch.Tensor, rope: RotaryCacheWrite, *,
                           config: StreamGemvConfig | None = None) -> torch.Tensor:
    """`out [1, (Hq + 2 Hkv) D]`: the q | k | v GEMM (input modes as `fp8_gemv_stream`) with
    q and k rotated at `rope.positions[0]` and k, v written into the model-dtype cache at
    `rope.slot_mapping[0]` (-1: not written): `rotary_and_cache` of the GEMM's output, up to
    float32 contraction order (the rotation may differ by one model-dtype step, rarely)."""
    n = w.shape[0]
    rope.check(n, out.dtype, w.device)
    if out.numel() != n or not out.is_contiguous():
        raise ValueError(f"fp8_gemv_stream_rotary: out must be a contiguous row of {n} values, "
                         f"got {tuple(out.shape)}")
    if x_mode not in (0, 1, 2):
        raise ValueError(f"fp8_gemv_stream_rotary: x_mode must be 0, 1 or 2, got {x_mode}")
    return _launch(x, x_scale, x_mode, w, ws, bias, out, config, rope=rope)


def _check_row(name: str, t: torch.Tensor, k: int, dtype: torch.dtype) -> None:
    if t.numel() != k or t.dtype != dtype or not t.is_contiguous() or t.data_ptr() % 16:
        raise ValueError(f"fp8_gemv_stream: {name} must be a contiguous 16-byte-aligned row of "
                         f"{k} {dtype} values, got {tuple(t.shape)} {t.dtype}")


def fp8_gemv_stream_norm(x: torch.Tensor, residual: torch.Tensor | None,
                         residual_out: torch.Tensor | None, norm_weight: torch.Tensor,
                         eps: float, w: torch.Tensor, ws: torch.Tensor,
                         bias: torch.Tensor | None, out: torch.Tensor, *,
                         config: StreamGemvConfig | None = None) -> torch.Tensor:
    """`out = quant(RMSNorm(x + residual) * norm_weight) . w^T` scaled, per token, in one
    launch (`kernels/fp8_fused.py`'s `rms_norm_quant_torch` then the GEMM, up to summation
    order); `residual_out` receives `x + residual` (rounded to the model dtype). Without a
    residual the norm is of x and nothing is written. All rows `[1, K]` in the model dtype,
    `residual_out` not aliasing `x` or `residual` (every CTA reads them whole)."""
    k = w.shape[1]
    for name, t in (("x", x), ("norm_weight", norm_weight), ("residual", residual),
                    ("residual_out", residual_out)):
        if t is not None:
            _check_row(name, t, k, out.dtype)
    if (residual is None) != (residual_out is None):
        raise ValueError("fp8_gemv_stream_norm: give residual and residual_out together")
    if residual_out is not None and residual_out.data_ptr() in (x.data_ptr(),
                                                                residual.data_ptr()):
        raise ValueError("fp8_gemv_stream_norm: residual_out must not alias x or residual")
    return _launch(x, None, 3, w, ws, bias, out, config, residual, residual_out, norm_weight,
                   eps)


def fp8_gemv_stream_silu(gate_up: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                         bias: torch.Tensor | None, out: torch.Tensor, *,
                         config: StreamGemvConfig | None = None) -> torch.Tensor:
    """`out = quant(SiLU(gate) * up) . w^T` scaled, per token, in one launch, for the row
    `gate_up [1, 2K]` (gate | up) in the model dtype (`silu_and_mul_quant_torch`, then the
    GEMM)."""
    k = w.shape[1]
    _check_row("gate_up", gate_up, 2 * k, out.dtype)
    return _launch(gate_up, None, 4, w, ws, bias, out, config)


def fp8_gemv_stream_dynamic(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
                            bias: torch.Tensor | None, out: torch.Tensor, *,
                            config: StreamGemvConfig | None = None) -> torch.Tensor:
    """`out = quant(x) . w^T` scaled, x `[1, K]` in the model dtype quantized per token here
    (its amax computed in the launch: no amax slot, no quantize kernel)."""
    _check_row("x", x, w.shape[1], out.dtype)
    return _launch(x, None, 5, w, ws, bias, out, config)
