"""A batch-1 decode step of a whole FP8 Llama stage in one persistent launch
(`fp8_decode_step.cu`, compiled by NVRTC through `kernels/cuda_jit.py`).

At batch 1 a step of llama3-8b is 128 short weight streams with latency-bound row kernels
between them; with one kernel each, DRAM idles at every boundary (PERF_NOTES.md, sessions
7-15). This kernel streams every layer's weights through a shared-memory ring in each SM
without stopping, and does the row work, attention and grid barriers beside the stream.

`DecodeStep.build(stage)` returns an instance when the stage fits the kernel (see
`unsupported_reason`), else None; the stage then runs its layers one kernel at a time. The
instance's `__call__` replaces the layer loop for one decode token: it returns the last MLP
output and the residual stream before it, as the loop does, so the stage's final norm and
LM head follow unchanged. CUDA-graph capturable (no allocation, no host sync once built for
a KV pool).

Opt-in (TRTDIST_DECODE_STEP=1): measured slower than the layer loop so far (PERF_NOTES.md,
sixteenth session: on an H200 3.24 against 2.52 ms a step). Under the weight stream every
L2 round trip of the consumers' chain (grid barriers, the attention merge) costs 1.5-2 us,
and the chain between the qkv and o phases outlasts what the ring holds.
"""

from __future__ import annotations

import ctypes
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from trtdist.kernels import cuda_jit

if TYPE_CHECKING:
    from trtdist.kernels.attention import LayerKV

    from trtdist.models.llama import LlamaStage

SOURCE = Path(__file__).with_name("fp8_decode_step.cu")
ENV = "TRTDIST_DECODE_STEP"
MAX_SMEM = 227 * 1024  # an H100 / H200 CTA's shared memory at most


@dataclass(frozen=True, slots=True)
class DecodeStepConfig:
    """Launch shape: `nwarps` consumer warps; stages of 16 rows x `kc` bytes, `stages` of them
    in the ring (None: as many as fit); the down projection's K split `ds` ways; attention
    partitions of at least `part_min` keys, at most `p_max` (None: grid / KV heads, <= 16).
    `timing_layer` (benchmarks): each CTA stamps %globaltimer at the phase boundaries of that
    layer into `DecodeStep.timing` `[grid, 16]` (see the .cu file's TIMING)."""

    nwarps: int = 8
    kc: int = 2048
    stages: int | None = None
    ds: int = 1
    part_min: int = 32
    p_max: int | None = None
    timing_layer: int | None = None


@dataclass(frozen=True, slots=True)
class _Shape:
    hidden: int
    inter: int
    q_heads: int
    kv_heads: int
    head_dim: int


def smem_bytes(shape: _Shape, cfg: DecodeStepConfig, stages: int, p_max: int) -> int:
    """The kernel's dynamic shared memory (`SMEM_BYTES` of the .cu file, checked by a test)."""
    h, i, d = shape.hidden, shape.inter, shape.head_dim
    gqa = shape.q_heads // shape.kv_heads
    stage = 16 * (cfg.kc + 64)
    att = cfg.nwarps * gqa * (d + 2) * 4
    xs = -(-max(i, h, shape.q_heads * d, att) // 128) * 128
    off = stages * (stage + 64) + xs + h * 2 + 2 * cfg.nwarps * 16 * 4 + cfg.nwarps * 4
    off = -(-(off + stages * 4) // 8) * 8
    return off + 2 * stages * 8


def unsupported_reason(stage: LlamaStage) -> str | None:
    """Why `stage` cannot run its decode step in this kernel, or None when it can."""
    cfg, m = stage.cfg, stage.mapping
    layers = list(stage.layers.values())
    if stage.device.type != "cuda" or not cuda_jit.available(stage.device):
        return "needs CUDA with cuda.bindings"
    if torch.cuda.get_device_capability(stage.device) < (9, 0):
        return "needs compute capability 9.0 (TMA bulk copies)"
    if m.tp_size != 1 or m.pp_size != 1:
        return "one rank only (tp = pp = 1)"
    if stage.dtype != torch.bfloat16:
        return "bfloat16 models only"
    if not layers:
        return "no layers"
    quant = getattr(layers[0].attn.qkv.method, "quant", None)
    if quant is None or quant.method != "fp8" or quant.static:
        return "FP8 weights with dynamic per-token activations only"
    if cfg.head_dim != 128:
        return "head_dim 128 only"
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        return "no biases"
    if any(w is not None for w in cfg.sliding_windows):
        return "no sliding windows"
    for n, what in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size"),
                    (cfg.num_heads * cfg.head_dim, "q heads x head_dim")):
        if n % 2048:
            return f"{what} {n} is not a multiple of 2048"
    if cfg.num_heads % cfg.num_kv_heads:
        return "q heads must be a multiple of KV heads"
    return None


def _kv_pointers(kv_layers: Sequence[LayerKV]) -> tuple[int, ...]:
    return tuple(p for kv in kv_layers for p in (kv.k.data_ptr(), kv.v.data_ptr()))


class DecodeStep:
    """The persistent batch-1 decode kernel bound to one stage's weights (see the module
    docstring). Scratch buffers and the per-layer pointer table live here; the table is
    rebuilt when the KV pool changes (the engine measures memory with a temporary pool)."""

    def __init__(self, stage: LlamaStage, config: DecodeStepConfig | None = None) -> None:
        cfg = stage.cfg
        self.stage, self.config = stage, config or DecodeStepConfig()
        self.device = stage.device
        props = torch.cuda.get_device_properties(self.device)
        self.grid = props.multi_processor_count
        self.layers = list(stage.layers.values())
        self.shape = _Shape(cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                            cfg.num_kv_heads, cfg.head_dim)
        c = self.config
        self._check(c, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim)
        self.p_max = c.p_max or min(16, self.grid // cfg.num_kv_heads)
        if cfg.num_kv_heads * self.p_max > self.grid:
            raise ValueError(f"p_max {self.p_max} x {cfg.num_kv_heads} KV heads exceeds the "
                             f"grid of {self.grid} CTAs")
        h, i, dev = cfg.hidden_size, cfg.intermediate_size, self.device
        n_qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv = torch.empty(n_qkv, dtype=torch.bfloat16, device=dev)
        self.part = torch.empty(self.p_max * cfg.num_heads * cfg.head_dim, dtype=torch.float32,
                                device=dev)
        self.part_ml = torch.empty(self.p_max * cfg.num_heads * 2, dtype=torch.float32,
                                   device=dev)
        self.o = torch.empty(h, dtype=torch.bfloat16, device=dev)
        self.act = torch.empty(i, dtype=torch.bfloat16, device=dev)
        self.down = torch.empty(c.ds * h, dtype=torch.float32, device=dev)
        self.sync = torch.zeros(2 + 4 * len(self.layers), dtype=torch.int32, device=dev)
        self.out = torch.empty(1, h, dtype=torch.bfloat16, device=dev)
        self.residual = torch.empty(1, h, dtype=torch.bfloat16, device=dev)
        self.qk_scale = cfg.head_dim ** -0.5 * math.log2(math.e)
        self.timing = (torch.zeros(self.grid, 16, dtype=torch.int64, device=dev)
                       if c.timing_layer is not None else None)
        self._table: torch.Tensor | None = None
        self._table_key: tuple[int, ...] = ()
        self._fn: cuda_jit.CudaFunction | None = None
        self._smem = 0
        self._strides = (0, 0)

    @staticmethod
    def _check(c: DecodeStepConfig, hidden: int, inter: int, q_dim: int) -> None:
        if c.nwarps < 1 or c.kc % (128 * c.nwarps) or c.ds < 1 or c.part_min < 1:
            raise ValueError(f"{c}: want kc a multiple of 128 x nwarps, ds >= 1, part_min >= 1")
        for k, what in ((hidden, "hidden_size"), (q_dim, "q heads x head_dim"),
                        (inter // c.ds if inter % c.ds == 0 else 1, "intermediate_size / ds")):
            if k % c.kc:
                raise ValueError(f"{c}: {what} ({k}) is not a multiple of kc {c.kc}")

    @classmethod
    def build(cls, stage: LlamaStage, config: DecodeStepConfig | None = None
              ) -> DecodeStep | None:
        """An instance for `stage`, or None unless TRTDIST_DECODE_STEP=1 and it fits."""
        if os.environ.get(ENV, "0") != "1" or unsupported_reason(stage) is not None:
            return None
        return cls(stage, config)

    def _bind(self, kv_layers: Sequence[LayerKV]) -> None:
        """Compile for the pool's block size and build the per-layer pointer table."""
        kv0 = kv_layers[0]
        if kv0.k_scale is not None or kv0.k.dtype != torch.bfloat16:
            raise ValueError("the decode step kernel reads a bfloat16 KV cache")
        d = self.shape.head_dim
        for kv in kv_layers:
            for t in (kv.k, kv.v):
                if t.stride(3) != 1 or t.stride(2) != d:
                    raise ValueError("the decode step kernel wants [blocks, bs, heads, D] "
                                     "caches with heads and dims contiguous")
                if t.stride()[:2] != kv0.k.stride()[:2]:
                    raise ValueError("the decode step kernel wants K and V caches of one "
                                     "layout")
        self._strides = (kv0.k.stride(0), kv0.k.stride(1))
        c, shape = self.config, self.shape
        stages = c.stages
        if stages is None:
            stages = 2
            while smem_bytes(shape, c, stages + 1, self.p_max) <= MAX_SMEM:
                stages += 1
        self._smem = smem_bytes(shape, c, stages, self.p_max)
        if self._smem > MAX_SMEM:
            raise ValueError(f"decode step: {self._smem} bytes of shared memory exceed "
                             f"{MAX_SMEM}")
        defines = dict(H=shape.hidden, I=shape.inter, HQ=shape.q_heads, HKV=shape.kv_heads,
                       D=d, BS=kv0.k.shape[1], NWARPS=c.nwarps, KC=c.kc, STAGES=stages,
                       DS=c.ds, P_MAX=self.p_max, PART_MIN=c.part_min)
        if c.timing_layer is not None:
            defines.update(TIMING=1, TIMING_LAYER=c.timing_layer)
        self.defines = defines
        self._fn = cuda_jit.load(SOURCE, "fp8_decode_step", defines, self.device)
        rows = []
        for layer, kv in zip(self.layers, kv_layers):
            a, mlp = layer.attn, layer.mlp
            rows.append([a.qkv.weight.data_ptr(), a.qkv.weight_scale.data_ptr(),
                         a.o.weight.data_ptr(), a.o.weight_scale.data_ptr(),
                         mlp.gate_up.weight.data_ptr(), mlp.gate_up.weight_scale.data_ptr(),
                         mlp.down.weight.data_ptr(), mlp.down.weight_scale.data_ptr(),
                         layer.input_norm.weight.data_ptr(), layer.post_norm.weight.data_ptr(),
                         kv.k.data_ptr(), kv.v.data_ptr()])
        self._table = torch.tensor(rows, dtype=torch.int64).to(self.device)
        self._table_key = _kv_pointers(kv_layers)

    def __call__(self, hidden: torch.Tensor, kv_layers: Sequence[LayerKV],
                 seq_lens: torch.Tensor, block_table: torch.Tensor,
                 slot_mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token through every layer: `hidden` `[1, H]` (the embedding row), the
        sequence's length after this token `seq_lens[0]` (int32), its block-table row
        (int32), the new token's cache slot `slot_mapping[0]` (int64, -1 = padding) ->
        `(mlp_out, residual)` `[1, H]` each (static buffers of this instance)."""
        if self._table is None or _kv_pointers(kv_layers) != self._table_key:
            self._bind(kv_layers)
        assert self._fn is not None and self._table is not None
        if seq_lens.dtype != torch.int32 or block_table.dtype != torch.int32:
            raise ValueError("seq_lens and block tables must be int32")
        if slot_mapping.dtype != torch.int64:
            raise ValueError("slot_mapping must be int64")
        hidden = hidden.contiguous()
        P, I32, F32 = cuda_jit.POINTER, ctypes.c_int, ctypes.c_float
        ks0, ks1 = self._strides
        args = (self._table.data_ptr(), len(self.layers), hidden.data_ptr(),
                self.out.data_ptr(), self.residual.data_ptr(), seq_lens.data_ptr(),
                block_table.data_ptr(), slot_mapping.data_ptr(),
                self.stage.cos_sin.data_ptr(), ks0, ks1,
                float(self.stage.cfg.rms_norm_eps), float(self.qk_scale),
                self.qkv.data_ptr(), self.part.data_ptr(), self.part_ml.data_ptr(),
                self.o.data_ptr(), self.act.data_ptr(), self.down.data_ptr(),
                self.sync.data_ptr(), 0 if self.timing is None else self.timing.data_ptr())
        types = (P, I32, P, P, P, P, P, P, P, I32, I32, F32, F32, P, P, P, P, P, P, P, P)
        self._fn.launch(self.grid, self.config.nwarps * 32 + 32, args, types, pdl=False,
                        shared=self._smem, cooperative=True)
        return self.out, self.residual
