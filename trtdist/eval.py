"""Accuracy probes through the runtime itself: the perplexity of a fixed text.

The text runs as one sequence in prefill chunks through `ModelRunner.step` with
`RETURN_ALL_LOGITS`, on blocks taken from the engine's own allocator (so cached prefixes of
running requests are never overwritten), on every rank of the world exactly as serving runs
it. Used to compare FP8 engines with their unquantized originals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from trtdist.llm import DistributedLLM
from trtdist.runtime.plan import FORWARD, RETURN_ALL_LOGITS, StepPlan

_EVAL_SEQ = -1  # an allocator sequence id no request uses (request ids count up from 0)


def token_logprobs(llm: DistributedLLM, ids: Sequence[int], chunk: int = 512) -> np.ndarray:
    """Leader only, with no request running: `[len(ids) - 1]` float64 log-probabilities of
    `ids[i + 1]` after `ids[: i + 1]`."""
    engine = llm._engine()
    if engine.has_unfinished:
        raise RuntimeError("token_logprobs needs an idle engine (requests are running)")
    ids = [int(t) for t in ids]
    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    if len(ids) > engine.max_model_len:
        raise ValueError(f"the text has {len(ids)} tokens; the model's context is "
                         f"{engine.max_model_len}: pass a shorter text")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    alloc = engine.allocator
    if not alloc.ensure(_EVAL_SEQ, len(ids)):
        alloc.free_seq(_EVAL_SEQ)
        raise ValueError(f"{len(ids)} tokens need {alloc.blocks_for(len(ids))} KV blocks; "
                         f"{alloc.num_free} are free")
    try:
        table = np.asarray(alloc.table(_EVAL_SEQ), dtype=np.int64)[None, :]
        out = np.empty(len(ids) - 1, dtype=np.float64)
        for start in range(0, len(ids) - 1, chunk):
            end = min(start + chunk, len(ids) - 1)  # the last token is only a target
            plan = StepPlan(FORWARD, np.asarray(ids[start:end], np.int64),
                            np.arange(start, end, dtype=np.int64),
                            np.array([end - start], np.int64), np.array([end], np.int64),
                            table, RETURN_ALL_LOGITS)
            logits = torch.from_numpy(engine.runner.step(plan)).double()  # [n, vocab]
            targets = torch.tensor(ids[start + 1:end + 1])
            lp = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
            out[start:end] = lp.numpy()
    finally:
        alloc.free_seq(_EVAL_SEQ)
    return out


def perplexity(llm: DistributedLLM, text: str | Sequence[int], chunk: int = 512) -> float:
    """exp(mean negative log-likelihood) of `text` (a string, tokenized with the model's
    tokenizer, or token ids) under the model `llm` serves."""
    if isinstance(text, str):
        tok = llm._engine().tokenizer
        if tok is None:
            raise ValueError("this model has no tokenizer; pass token ids")
        ids: Sequence[int] = tok.encode(text)
    else:
        ids = text
    return math.exp(-float(token_logprobs(llm, ids, chunk).mean()))
