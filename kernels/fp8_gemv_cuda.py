"""One-token FP8 GEMV on tensor cores, in CUDA (`fp8_gemv_cuda.cu`, compiled by NVRTC through
`kernels/cuda_jit.py`): `y [1, N] = (x . W^T) * x_scale * w_scale (+ bias)` for E4M3
`W [N, K]`, the batch-1 decode case of `kernels/fp8_gemm.py`'s small-M GEMM (numbers below).

Design: a CTA owns 16 output rows and keeps its whole share of the weight in flight (a
warp's K segment loaded before any math); the E4M3 bytes go to MMAs as they are, with no
per-byte conversion; x is staged (and, from the model dtype, quantized) once per CTA. Input
modes as the Triton kernel's X_MODE: 0 E4M3 x with its scale, 1 model-dtype x quantized
per token from the producer's row amax, 2 model-dtype x with a static scale. Measured on an
H200 (PERF_NOTES.md, tenth session) it wins where the input is quantized from the amax
(llama3-8b's o projection: 5.9 against 7.0 us), and streams slower than the Triton gemv
tiles on the large shapes, so it runs only where its table says.

The small-M GEMM (`fp8_gemm.py`) hands a one-token call to this kernel only for the (N, K)
in `CONFIGS` (measured to win in the engine; `scripts/bench_fp8_gemv_cuda.py` times the
candidates, and the env var TRTDIST_FP8_GEMV_CUDA_CONFIGS names a JSON file of its output
that replaces the table). A direct call without a table entry takes `default_config(K)`.

Numbers: the E4M3 products are exact; each MMA sums its 32 products at the tensor core's
reduced precision (~14 bits, truncating, on Hopper) before they join a float32 running sum,
so a result differs from the float32 reference by at most one output step plus ~1e-4 of
the row's sum of |products| (measured; the Triton gemv sums in float32 throughout). Both
are far below the E4M3 rounding of the inputs (2^-4).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from trtdist.kernels import cuda_jit
from trtdist.kernels._triton import pdl_enabled

SOURCE = Path(__file__).with_name("fp8_gemv_cuda.cu")
ROWS_PER_CTA = 16
MAX_K = 32768  # x is staged in static shared memory (48 KB a CTA at most)
_DTYPE_IDS = {torch.bfloat16: 0, torch.float16: 1}
CONFIGS_ENV = "TRTDIST_FP8_GEMV_CUDA_CONFIGS"
_capabilities: dict[torch.device, tuple[int, int]] = {}


@dataclass(frozen=True, slots=True)
class CudaGemvConfig:
    """One launch of `fp8_gemv`: `nwarps` warps a CTA split K, each loading `batch` 128-byte
    steps of its two rows at a time; `double`: the next batch is loaded before this one's
    MMAs; `early`: the first batch before the programmatic-dependent-launch wait;
    `min_blocks`: `__launch_bounds__`' resident-CTA hint (caps registers); `xdirect`: E4M3
    x read at L2 beside the MMAs instead of staged in shared memory (X_MODE 0 only)."""

    nwarps: int = 8
    batch: int = 2
    double: bool = True
    early: bool = False
    min_blocks: int = 1
    xdirect: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.nwarps <= 32 or self.batch < 1 or self.min_blocks < 1:
            raise ValueError(f"CudaGemvConfig: want 1 <= nwarps <= 32, batch >= 1 and "
                             f"min_blocks >= 1, got {self}")

    def fits(self, k: int) -> bool:
        """Whether K splits into this config's steps (128 bytes x nwarps x batch)."""
        return k % (128 * self.nwarps) == 0 and (k // (128 * self.nwarps)) % self.batch == 0


def default_config(k: int) -> CudaGemvConfig | None:
    """For shapes not measured: 8 warps (or the nearest count that divides K's 128-byte
    steps), batches of 2 steps where they divide; None if K is not a multiple of 128."""
    if k % 128:
        return None
    steps = k // 128
    for nwarps in (8, 16, 4, 14, 7, 12, 6, 10, 5, 3, 2, 1):
        if steps % nwarps == 0:
            per_warp = steps // nwarps
            batch = 2 if per_warp % 2 == 0 else 1
            return CudaGemvConfig(nwarps, batch, True)
    return None  # unreachable: 1 divides everything


# NOTE: (N, K) -> config: the shapes where this kernel was measured to beat the Triton gemv
# in the engine (batch-1 timelines, PERF_NOTES.md tenth session). llama3-8b on an H200: the
# o projection (quantizing its bf16 input from the row amax) 7.03 -> 5.89 us a layer; qkv,
# gate_up and down streamed slower than the Triton tiles (8.49 / 29.8 / 17.9 against 8.40 /
# 28.3 / 17.6 us) and stay there, as does every shape not listed.
TUNED: dict[tuple[int, int], CudaGemvConfig | None] = {
    (4096, 4096): CudaGemvConfig(nwarps=16, batch=1, double=True, early=True, min_blocks=2),
}
CONFIGS: dict[tuple[int, int], CudaGemvConfig | None] = dict(TUNED)


def load_file(path: str | Path) -> None:
    """Replace `CONFIGS` by the `{"configs": [{"n", "k", "config": {...} | null}]}` of
    `path` (null: that shape keeps the Triton kernel)."""
    data = json.loads(Path(path).read_text())
    rows = data.get("configs") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: want a JSON object with a 'configs' list")
    table: dict[tuple[int, int], CudaGemvConfig | None] = {}
    for row in rows:
        try:
            cfg = row["config"]
            table[(int(row["n"]), int(row["k"]))] = (None if cfg is None
                                                     else CudaGemvConfig(**cfg))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: bad entry {row!r}: {e}") from e
    CONFIGS.clear()
    CONFIGS.update(table)


if os.environ.get(CONFIGS_ENV):
    load_file(os.environ[CONFIGS_ENV])


def config_for(n: int, k: int) -> CudaGemvConfig | None:
    """The measured launch for (N, K), or None: the shape is not in `CONFIGS` (or listed
    there as null) and stays on the Triton gemv."""
    cfg = CONFIGS.get((n, k))
    return cfg if cfg is not None and cfg.fits(k) else None


def _capability(device: torch.device) -> tuple[int, int]:
    cap = _capabilities.get(device)
    if cap is None:
        cap = _capabilities[device] = torch.cuda.get_device_capability(device)
    return cap


def supports(m: int, n: int, k: int, x_dtype: torch.dtype, out_dtype: torch.dtype,
             device: torch.device, has_bias_dtype: torch.dtype | None = None) -> bool:
    """Whether `fp8_gemv_cuda` takes this call: one token row, N a multiple of 16, K of 128,
    a 16-bit output (and model-dtype input of the same type, or E4M3), on a GPU where the
    CUDA kernels are available."""
    if m != 1 or n % ROWS_PER_CTA or k % 128 or out_dtype not in _DTYPE_IDS:
        return False
    if x_dtype != torch.float8_e4m3fn and x_dtype != out_dtype:
        return False
    if has_bias_dtype is not None and has_bias_dtype != out_dtype:
        return False
    if device.type != "cuda" or k > MAX_K or _capability(device) < (8, 9):
        return False
    return config_for(n, k) is not None and cuda_jit.available(device)


def fp8_gemv_cuda(x: torch.Tensor, x_scale: torch.Tensor, x_mode: int, w: torch.Tensor,
                  ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, *,
                  config: CudaGemvConfig | None = None) -> torch.Tensor:
    """`out [1, N] = x [1, K] . w [N, K]^T` scaled (see the module docstring). `x_scale`:
    X_MODE 0 the token's float32 scale, 1 its row amax (float32 slot), 2 the static scale.
    The caller checks `supports` (shapes, dtypes) and contiguity; raises `CudaJitError`
    when the kernel cannot compile or launch."""
    n, k = w.shape
    cfg = config or config_for(n, k) or default_config(k)
    if cfg is None or not cfg.fits(k):
        raise ValueError(f"fp8_gemv_cuda: no launch for K = {k} ({cfg})")
    out_t = _DTYPE_IDS[out.dtype]
    x_t = _DTYPE_IDS.get(x.dtype, 0)
    defines = dict(K=k, NWARPS=cfg.nwarps, BATCH=cfg.batch, DOUBLE=int(cfg.double),
                   EARLY=int(cfg.early), MIN_BLOCKS=cfg.min_blocks,
                   XDIRECT=int(cfg.xdirect and x_mode == 0), X_MODE=x_mode, X_T=x_t,
                   OUT_T=out_t, HAS_BIAS=int(bias is not None))
    fn = cuda_jit.load(SOURCE, "fp8_gemv", defines, w.device)
    b = bias if bias is not None else out  # unused when HAS_BIAS is 0
    P = cuda_jit.POINTER
    fn.launch(n // ROWS_PER_CTA, cfg.nwarps * 32,
              (w.data_ptr(), ws.data_ptr(), x.data_ptr(), x_scale.data_ptr(), b.data_ptr(),
               out.data_ptr()), (P, P, P, P, P, P), pdl=pdl_enabled(w.device))
    return out


def config_dict(cfg: CudaGemvConfig) -> dict[str, object]:
    """The JSON form of a config (the table file's "config" entries)."""
    return asdict(cfg)
