"""Launch configurations of the small-M FP8 GEMM (`kernels/fp8_gemm.py`), keyed by
(M bucket, N, K).

`CONFIGS` holds tuned entries: paste the dict printed by `scripts/tune_fp8_gemm.py` (run on
the target GPU) into `TUNED` below, or point `TRTDIST_FP8_GEMM_CONFIGS` at the JSON it wrote
(`--output`), which is read once at import and overrides `TUNED`. Shapes not in the table get
`default_config`: the tl.dot kernel of the first version (BLOCK 16 x 64 x 256, split-K chosen
for about two programs per SM), measured at 36-46% of copy bandwidth at M = 1 on an H200.

Modes:
- `dot`: `tl.dot(x [BM, BK], w^T [BK, BN])`, M padded to BLOCK_M (>= 16, masked loads).
- `dot_swap`: `tl.dot(w [BN, BK], x^T [BK, BM])`: the weight is the MMA's M side (on Hopper
  a BLOCK_N >= 64 tile can then use wgmma), the tokens its N side.
- `gemv`: no MMA: the weight tile is loaded as wide vectors, dequantized to float32 in
  registers and multiplied into one accumulator per token row (M <= 4), reduced along K at
  the end (`k_acc`) or every step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODES = ("dot", "dot_swap", "gemv")
GEMV_MAX_M = 4  # the gemv kernel keeps one accumulator per row, written out for up to 4
M_BUCKETS = (1, 2, 4, 8, 16, 32)
ENV_VAR = "TRTDIST_FP8_GEMM_CONFIGS"
_log = logging.getLogger("trtdist")


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True, slots=True)
class Fp8GemmConfig:
    """One launch of `_fp8_gemm_kernel`. `split_k` 0 = chosen from the grid size
    (`choose_split_k`); a larger value is clipped to the number of BLOCK_K steps."""

    mode: str = "dot"
    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    split_k: int = 0
    num_warps: int = 4
    num_stages: int = 4
    k_acc: bool = True  # gemv: keep [BN, BK] partial sums per row until the end of K
    x_2d: bool = False  # gemv: load token rows as [BN, BK] broadcasts (no layout conversion)
    prefetch: bool = False  # gemv: load the next weight tile before this one's math
    # NOTE: a register cap (0: the compiler's choice). At M = 1 the gemv streams as fast as
    # its resident programs keep weight bytes in flight, and programs an SM are set by
    # registers (4 warps: <= 32 registers for 16, 40 for 12, 64 for 8).
    maxnreg: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Fp8GemmConfig: mode {self.mode!r} unknown; allowed: {MODES}")
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ValueError(f"Fp8GemmConfig: {name} = {getattr(self, name)} must be a "
                                 "power of two")
        if self.mode == "gemv" and self.block_m > GEMV_MAX_M:
            raise ValueError(f"Fp8GemmConfig: gemv takes block_m <= {GEMV_MAX_M}, got "
                             f"{self.block_m}")
        if self.mode != "gemv" and (self.block_m < 16 or self.block_n < 16
                                    or self.block_k < 32):
            raise ValueError(f"Fp8GemmConfig: tl.dot needs block_m, block_n >= 16 and "
                             f"block_k >= 32, got {self.block_m} x {self.block_n} x "
                             f"{self.block_k}")
        if self.maxnreg and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"Fp8GemmConfig: maxnreg must be 0 (no cap) or 24..255, got "
                             f"{self.maxnreg}")
        if self.split_k < 0 or self.num_stages < 1:
            raise ValueError(f"Fp8GemmConfig: split_k >= 0 and num_stages >= 1 needed, got "
                             f"{self.split_k}, {self.num_stages}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def launch_options(self) -> dict[str, int]:
        """The Triton launch options of this tile (warps, stages, the register cap if set)."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts


DEFAULT_DOT = Fp8GemmConfig()
# NOTE: (M bucket, N, K) -> config. Filled from `scripts/tune_fp8_gemm.py` on an H200; an
# entry serves every M of its bucket (M rounded up to a power of two).
# Measured 2026-11-23 on an H200 (copy 4,203 GB/s): scripts/tune_fp8_gemm.py --budget-s 170.
# NOTE: the tuner's split-K 'dot_swap' picks (down at M = 1: 18.0 us; o at M = 2-16: 7.9 us)
# are left out: on the H200 the GPU tests found them wrong (down, M = 1: 4% relative error
# after graph replay, 1e-3 in float32 out against 1e-5 for every other path). Those shapes
# take the default tile until that is understood.
TUNED: dict[tuple[int, int, int], Fp8GemmConfig] = {
    # M = 1, `tune_fp8_gemm.py --m 1 --gemv-only` (H200, copy 4,225 GB/s): the bf16 GEMV's
    # layout, whole K per program
    (1, 6144, 4096): Fp8GemmConfig('gemv', 1, 2, 2048, 1, 4, 1, True, False, False),  # 8.3 us, 72%
    (1, 4096, 4096): Fp8GemmConfig('gemv', 1, 2, 2048, 1, 4, 1, True, False, False),  # 6.6 us, 61%
    # 27.9 us, 100%
    (1, 28672, 4096): Fp8GemmConfig('gemv', 1, 2, 2048, 1, 4, 1, True, False, False),
    # 16.6 us, 84%
    (1, 4096, 14336): Fp8GemmConfig('gemv', 1, 4, 1024, 1, 4, 1, True, False, False),
    # 18.5 us, 75%
    (2, 4096, 14336): Fp8GemmConfig('dot', 16, 32, 256, 4, 4, 4, True, False, False),
    # 18.7 us, 74%
    (4, 4096, 14336): Fp8GemmConfig('dot', 16, 32, 256, 4, 4, 4, True, False, False),
    # 18.9 us, 73%
    (8, 4096, 14336): Fp8GemmConfig('dot', 16, 32, 256, 4, 4, 4, True, False, False),
    # 19.3 us, 72%
    (16, 4096, 14336): Fp8GemmConfig('dot', 16, 32, 256, 4, 4, 4, True, False, False),
    (2, 6144, 4096): Fp8GemmConfig('dot', 16, 32, 256, 2, 4, 4, True, False, False),  # 10.4 us, 57%
    (4, 6144, 4096): Fp8GemmConfig('dot', 16, 64, 128, 4, 4, 6, True, False, False),  # 10.2 us, 58%
    (8, 6144, 4096): Fp8GemmConfig('dot', 16, 64, 128, 4, 4, 6, True, False, False),  # 10.3 us, 58%
    # 10.5 us, 56%
    (16, 6144, 4096): Fp8GemmConfig('dot', 16, 32, 256, 2, 4, 4, True, False, False),
    # 30.4 us, 91%
    (2, 28672, 4096): Fp8GemmConfig('dot_swap', 16, 64, 256, 1, 4, 4, True, False, False),
    # 30.6 us, 90%
    (4, 28672, 4096): Fp8GemmConfig('dot_swap', 16, 64, 256, 1, 4, 4, True, False, False),
    # 30.9 us, 90%
    (8, 28672, 4096): Fp8GemmConfig('dot_swap', 16, 64, 256, 1, 4, 4, True, False, False),
    # 31.3 us, 88%
    (16, 28672, 4096): Fp8GemmConfig('dot_swap', 16, 64, 256, 1, 4, 4, True, False, False),
}
CONFIGS: dict[tuple[int, int, int], Fp8GemmConfig] = dict(TUNED)
# NOTE: the GEMM that quantizes its model-dtype input itself (X_MODE 1, the row-amax handoff of
# `models/llama.py`): each program quantizes the whole K of its rows, so the handoff only pays
# where few programs share a row (a wide BLOCK_N, or the tl.dot tiles). A shape is handed its
# input that way only where it has an entry here (measured to beat the quantize launch plus
# the plain GEMM in the engine); elsewhere the layer keeps the quantize launch.
# Measured 2026-11-24 on an H200 in the engine (`scripts/amax_variants.py`, llama3-8b FP8
# batch-1 timelines, PERF_NOTES.md eighth session): down at its plain tile, 17.6 us + SiLU
# 1.0 against 16.5 + SiLU-quantize 2.4; o at BLOCK_N 16 (a quarter of the plain tile's
# programs quantizing the row), 7.0 us against 6.4 + quantize 1.3. At BLOCK_N 2-8 the o row's
# redundant quantization cost more than the launch it saves (8.1-9.7 us).
TUNED_QUANTIZING: dict[tuple[int, int, int], Fp8GemmConfig] = {
    (1, 4096, 14336): Fp8GemmConfig('gemv', 1, 4, 1024, 1, 4, 1, True, False, False),
    (1, 4096, 4096): Fp8GemmConfig('gemv', 1, 16, 1024, 1, 8, 1, True, False, False),
}
QUANTIZING: dict[tuple[int, int, int], Fp8GemmConfig] = dict(TUNED_QUANTIZING)


def m_bucket(m: int) -> int:
    """The smallest bucket >= m (M rounded up to a power of two)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    raise ValueError(f"fp8 gemm: M = {m} is past the largest bucket {M_BUCKETS[-1]}")


def fits(cfg: Fp8GemmConfig, m: int) -> bool:
    """Whether `cfg` can compute M rows."""
    return m <= cfg.block_m


def choose_split_k(n: int, k: int, sm_count: int, block_n: int = 64, block_k: int = 256,
                   waves: int = 2) -> int:
    """Split K until the grid holds about `waves` programs per SM, keeping >= 4 BLOCK_K steps
    per split (each slice must stream enough weight to pipeline its loads)."""
    blocks_n = -(-n // block_n)
    k_steps = -(-k // block_k)
    split = 1
    while blocks_n * split < waves * sm_count and k_steps // (split * 2) >= 4:
        split *= 2
    return split


def default_config(m: int) -> Fp8GemmConfig:
    """Shapes without a tuned entry: the first version's tl.dot tile (M padded to 16, or 32)."""
    return DEFAULT_DOT if m <= 16 else Fp8GemmConfig(block_m=32)


def lookup(m: int, n: int, k: int, quantizing: bool = False) -> Fp8GemmConfig:
    """The config for `[m, k] x [n, k]^T`: tuned, else the default. `quantizing`: for the
    GEMM that quantizes its input (its own table first, then the plain one)."""
    if quantizing:
        cfg = quantizing_config(m, n, k)
        if cfg is not None:
            return cfg
    cfg = CONFIGS.get((m_bucket(m), n, k))
    return cfg if cfg is not None and fits(cfg, m) else default_config(m)


def quantizing_config(m: int, n: int, k: int) -> Fp8GemmConfig | None:
    """The measured tile of the input-quantizing GEMM for this shape, or None (the shape keeps
    the separate quantize launch)."""
    if m > M_BUCKETS[-1]:
        return None
    cfg = QUANTIZING.get((m_bucket(m), n, k))
    return cfg if cfg is not None and fits(cfg, m) else None


def from_json(data: Any, key: str = "configs") -> dict[tuple[int, int, int], Fp8GemmConfig]:
    """`{"configs": [{"m": 1, "n": 6144, "k": 4096, "config": {...}}, ...]}` (the tune
    script's JSON) -> a table; `key` "quantizing" reads the input-quantizing GEMM's entries
    (optional in the file)."""
    rows = data.get(key, [] if key != "configs" else None) if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"fp8 gemm configs: want a JSON object with a '{key}' list")
    table = {}
    for row in rows:
        try:
            key_ = (m_bucket(int(row["m"])), int(row["n"]), int(row["k"]))
            table[key_] = Fp8GemmConfig(**row["config"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"fp8 gemm configs: bad entry {row!r}: {e}") from e
    return table


def load_file(path: str | Path) -> None:
    """Replace `CONFIGS` with `TUNED` updated by the tune script's JSON at `path`, and
    `QUANTIZING` with `TUNED_QUANTIZING` updated by its "quantizing" list (when it has one;
    `"quantizing": []` leaves no shape on the handoff)."""
    data = json.loads(Path(path).read_text())
    table = from_json(data)
    CONFIGS.clear()
    CONFIGS.update(TUNED)
    CONFIGS.update(table)
    if isinstance(data, dict) and "quantizing" in data:
        QUANTIZING.clear()
        QUANTIZING.update(from_json(data, "quantizing"))
    _log.info("fp8 gemm: %d tuned configs from %s", len(table), path)


if os.environ.get(ENV_VAR):
    load_file(os.environ[ENV_VAR])
