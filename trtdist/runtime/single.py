"""Leader-side helpers that run one sequence at a time (prompt logits, greedy decoding).

The sequence occupies blocks 1..n of the pool (0 is the null block); the batching runtime
replaces this for serving, these remain the simplest correctness probes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from trtdist.runtime.model_runner import ModelRunner
from trtdist.runtime.plan import FORWARD, RETURN_ALL_LOGITS, StepPlan


def _plan(runner: ModelRunner, ids: Sequence[int], start: int, flags: int = 0) -> StepPlan:
    bs, total = runner.kv.block_size, start + len(ids)
    blocks = -(-total // bs)
    if blocks > runner.kv.num_blocks:
        raise ValueError(f"sequence of {total} tokens needs {blocks} KV blocks of {bs}; the pool "
                         f"has {runner.kv.num_blocks}")
    return StepPlan(FORWARD, np.asarray(ids, dtype=np.int64),
                    np.arange(start, total, dtype=np.int64), np.array([len(ids)], np.int64),
                    np.array([total], np.int64), np.arange(1, blocks + 1, dtype=np.int64)[None, :],
                    flags)


def prompt_logits(runner: ModelRunner, ids: Sequence[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of a prompt."""
    return runner.step(_plan(runner, ids, 0, RETURN_ALL_LOGITS))


def greedy_generate(runner: ModelRunner, ids: Sequence[int], max_tokens: int,
                    eos_ids: Sequence[int] = ()) -> list[int]:
    """Greedy continuation of `ids`, stopping at max_tokens or an EOS id."""
    out: list[int] = []
    pending, start = list(ids), 0
    while len(out) < max_tokens:
        token = int(runner.step(_plan(runner, pending, start))[0, 0])
        out.append(token)
        if token in eos_ids:
            break
        start += len(pending)
        pending = [token]
    return out
