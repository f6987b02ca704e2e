"""The decode step's two small device ops around the model, one launch each on a GPU:

- `greedy_sample_triton`: the argmax of each logits row (torch's: the first largest value, a
  NaN counting as the largest), written as a result row `[token, NaN]` float64 (the sampler's
  layout: token id, then "no logprob") and, when asked, as an integer token id for the next
  step's inputs. torch's argmax of one 128,256-wide row is a single reduction kernel of ~28 us
  on an H200, and the result row took four more launches (zeros, a cast, a copy, a fill).
- `resolve_fed_back_triton`: input ids `-1 - r` become the token sampled in row `r` of the
  previous step (overlap: the token never visits the host); six torch launches before.

Each sits beside its torch reference; tests compare them.
"""

from __future__ import annotations

import torch
from trtdist.kernels._triton import jit as _jit
from trtdist.kernels._triton import tl, triton

_BLOCK = 4096  # logits a program takes (128,256 -> 32 programs a row)
_counts: dict[torch.device, torch.Tensor] = {}
_partials: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


# ---- references --------------------------------------------------------------------------
def greedy_sample_torch(logits: torch.Tensor, out: torch.Tensor,
                        tokens_out: torch.Tensor | None = None) -> None:
    """`logits [N, V]` -> `out[:, 0]` = argmax (float64), `out[:, 1]` = NaN; `tokens_out [N]`
    (any integer dtype) gets the ids too."""
    tokens = logits.argmax(dim=-1)
    out[:, 0] = tokens.double()
    out[:, 1] = float("nan")
    if tokens_out is not None:
        tokens_out.copy_(tokens)


def resolve_fed_back_torch(ids: torch.Tensor, fed_back: torch.Tensor) -> None:
    """In place: `ids[i] < 0` becomes `fed_back[-1 - ids[i]]`."""
    rows = (-1 - ids).clamp_(min=0).long()
    torch.where(ids < 0, fed_back.index_select(0, rows).to(ids.dtype), ids, out=ids)


# ---- kernels -----------------------------------------------------------------------------
@_jit
def _greedy_kernel(logits_ptr, stride_l, V, part_v_ptr, part_i_ptr, cnt_ptr, out_ptr, stride_o,
                   tok_ptr, C: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                   HAS_TOK: tl.constexpr):
    """Grid (N, C): each program takes the first largest value of its BLOCK logits (a NaN
    first); the last of a row's C programs to finish picks among the C in order (a count in
    global memory, reset by that program) and writes the row's result."""
    row = tl.program_id(0)
    c = tl.program_id(1)
    offs = c * BLOCK + tl.arange(0, BLOCK)
    mask = offs < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + offs, mask=mask,
                other=float("-inf")).to(tl.float32)
    nan = (x != x) & mask
    first_nan = tl.min(tl.where(nan, offs, V), axis=0)
    best = tl.max(tl.where(nan, float("-inf"), x), axis=0)
    first_best = tl.min(tl.where((x == best) & mask, offs, V), axis=0)
    has_nan = first_nan < V
    tl.store(part_v_ptr + row * C + c, tl.where(has_nan, float("nan"), best))
    tl.store(part_i_ptr + row * C + c, tl.where(has_nan, first_nan, first_best))
    # NOTE: the barrier orders the stores before the release of the count; the acquire makes
    # every part visible to the last program, which reads them past L1 (.cg).
    tl.debug_barrier()
    count = tl.atomic_add(cnt_ptr + row, 1, sem="acq_rel")
    if count == C - 1:
        cc = tl.arange(0, BLOCK_C)
        mc = cc < C
        pv = tl.load(part_v_ptr + row * C + cc, mask=mc, other=float("-inf"),
                     cache_modifier=".cg")
        pi = tl.load(part_i_ptr + row * C + cc, mask=mc, other=V, cache_modifier=".cg")
        pnan = (pv != pv) & mc
        nan_tok = tl.min(tl.where(pnan, pi, V), axis=0)  # parts hold increasing indices
        top = tl.max(tl.where(pnan, float("-inf"), pv), axis=0)
        top_tok = tl.min(tl.where((pv == top) & mc, pi, V), axis=0)
        tok = tl.where(nan_tok < V, nan_tok, top_tok)
        tl.atomic_xchg(cnt_ptr + row, 0)
        o = out_ptr + row.to(tl.int64) * stride_o
        tl.store(o, tok.to(tl.float64))
        tl.store(o + 1, float("nan"))
        if HAS_TOK:
            tl.store(tok_ptr + row, tok.to(tok_ptr.dtype.element_ty))


@_jit
def _fed_back_kernel(ids_ptr, fed_ptr, T, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    fed = tl.load(fed_ptr + tl.maximum(-1 - ids, 0), mask=mask & (ids < 0), other=0)
    tl.store(ids_ptr + offs, tl.where(ids < 0, fed.to(ids.dtype), ids), mask=mask)


# ---- launchers ---------------------------------------------------------------------------
def _workspace(device: torch.device, rows: int, parts: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row counts (zero between launches) and the parts' values / indices, grown as
    needed (the sampler runs outside CUDA graphs)."""
    cnt = _counts.get(device)
    if cnt is None or cnt.numel() < rows:
        cnt = torch.zeros(max(rows, 64), dtype=torch.int32, device=device)
        _counts[device] = cnt
    part = _partials.get(device)
    if part is None or part[0].numel() < rows * parts:
        n = max(rows, 64) * parts
        part = (torch.empty(n, dtype=torch.float32, device=device),
                torch.empty(n, dtype=torch.int32, device=device))
        _partials[device] = part
    return cnt, part[0], part[1]


def greedy_sample_triton(logits: torch.Tensor, out: torch.Tensor,
                         tokens_out: torch.Tensor | None = None) -> None:
    """`greedy_sample_torch` in one launch. `logits [N, V]` float (unit last stride), `out
    [N, >= 2]` float64 (unit last stride), `tokens_out [N]` integer or None."""
    fn = "greedy_sample_triton"
    if triton is None:
        raise RuntimeError(f"{fn} needs triton, which is not installed")
    if logits.dim() != 2 or logits.stride(-1) != 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"{fn}: logits must be [N, V] floats with a unit last stride, got "
                         f"{tuple(logits.shape)} {logits.dtype} {tuple(logits.stride())}")
    n, v = logits.shape
    if v == 0 or v >= 2**31:
        raise ValueError(f"{fn}: the vocabulary must hold 1 to 2**31 - 1 entries, got {v}")
    if (out.dim() != 2 or out.shape[0] != n or out.shape[1] < 2 or out.dtype != torch.float64
            or out.stride(-1) != 1):
        raise ValueError(f"{fn}: out must be [{n}, >= 2] float64 with a unit last stride, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if tokens_out is not None and (tokens_out.shape != (n,) or tokens_out.dtype.is_floating_point
                                   or tokens_out.dtype == torch.bool):
        raise ValueError(f"{fn}: tokens_out must be [{n}] integers, got "
                         f"{tuple(tokens_out.shape)} {tokens_out.dtype}")
    if n == 0:
        return
    parts = triton.cdiv(v, _BLOCK)
    cnt, part_v, part_i = _workspace(logits.device, n, parts)
    _greedy_kernel[(n, parts)](
        logits, logits.stride(0), v, part_v, part_i, cnt, out, out.stride(0),
        tokens_out if tokens_out is not None else part_i, C=parts, BLOCK=_BLOCK,
        BLOCK_C=triton.next_power_of_2(parts), HAS_TOK=tokens_out is not None, num_warps=8)


def resolve_fed_back_triton(ids: torch.Tensor, fed_back: torch.Tensor) -> None:
    """`resolve_fed_back_torch` in one launch (`ids` contiguous [T] integers)."""
    if triton is None:
        raise RuntimeError("resolve_fed_back_triton needs triton, which is not installed")
    if ids.dim() != 1 or not ids.is_contiguous() or fed_back.dim() != 1:
        raise ValueError(f"resolve_fed_back_triton: ids and fed_back must be 1-D (ids "
                         f"contiguous), got {tuple(ids.shape)} and {tuple(fed_back.shape)}")
    t = ids.shape[0]
    if t:
        _fed_back_kernel[(triton.cdiv(t, 1024),)](ids, fed_back, t, BLOCK=1024, num_warps=4)
