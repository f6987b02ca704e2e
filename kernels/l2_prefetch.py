"""Weight prefetch into L2 (Hopper's bulk prefetch): `prefetch_l2(t, nbytes)`.

At batch 1 a decode layer alternates weight-streaming GEMVs with short latency-bound kernels
(norms, quantization, rotary, attention) during which DRAM sits idle. A bulk prefetch
(`cp.async.bulk.prefetch.L2.global`, sm_90+) issued at the start of such a gap, on a side
stream, brings the head of the next GEMV's weight into L2 so the GEMV starts from L2 instead
of DRAM (`models/weight_prefetch.py` decides what and when).

A prefetch is a hint: it changes no memory and has no completion to wait for, so the plain
torch "reference" is doing nothing (`prefetch_l2_reference`); the test checks that the
kernel leaves memory untouched and that its PTX issues the bulk prefetch.
"""

from __future__ import annotations

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import tl, triton

CHUNK = 4096  # bytes per bulk prefetch (16-byte multiple, as the instruction requires)
PER_PROGRAM = 128  # prefetches per program: one per thread of 4 warps


def prefetch_l2_reference(t: torch.Tensor, nbytes: int) -> None:
    """What a prefetch does to memory: nothing."""
    del t, nbytes


def supports_l2_prefetch(device: torch.device) -> bool:
    """A CUDA device with the bulk prefetch (compute capability 9.0+), and Triton."""
    return (triton is not None and device.type == "cuda"
            and torch.cuda.get_device_capability(device) >= (9, 0))


@_jit
def _l2_prefetch_kernel(base_ptr, nbytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
    pid = tl.program_id(0)
    offs = (pid * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
    size = tl.minimum(nbytes - offs, CHUNK).to(tl.int32)
    # NOTE: predicated in the asm (inline asm takes no mask); `size` stays a multiple of 16
    # because `nbytes` is one.
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; "
        "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.b32 $0, 0; }",
        "=r,l,r", [base_ptr + offs, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_l2(t: torch.Tensor, nbytes: int | None = None) -> None:
    """Prefetch the first `nbytes` (default: all) of contiguous `t` into L2, on the current
    stream. Rounds down to 16 bytes; a no-op for nothing to fetch."""
    if not t.is_contiguous():
        raise ValueError("prefetch_l2 needs a contiguous tensor")
    total = t.numel() * t.element_size()
    n = min(total, total if nbytes is None else nbytes) & ~15
    if n <= 0:
        return
    if t.data_ptr() % 16:
        raise ValueError("prefetch_l2 needs a 16-byte aligned tensor")
    grid = (triton.cdiv(n, CHUNK * PER_PROGRAM),)
    _l2_prefetch_kernel[grid](t.view(-1).view(torch.uint8), n, CHUNK=CHUNK,
                              PER_PROGRAM=PER_PROGRAM, num_warps=4)
