"""Under mpirun: load a model with a KV cache dtype, compute prompt logits (in one prefill and in
two chunks, the second reading the first from the cache) and greedy tokens; the leader saves
them to an .npz.
Usage: run_kv_cache_dtype.py OUT.npz TP PP DTYPE KV_CACHE_DTYPE PROMPT_IDS N MODEL_DIR"""

from __future__ import annotations

import sys

import numpy as np
from trtdist.comm.world import World

from trtdist.engine.source import resolve_model
from trtdist.runtime.plan import RETURN_ALL_LOGITS
from trtdist.runtime.rank import RankOptions, start_rank
from trtdist.runtime.single import _plan, greedy_generate, prompt_logits


def main() -> None:
    out, tp, pp, dtype, kv_dtype, prompt, n, model = sys.argv[1:]
    ids = [int(x) for x in prompt.split(",")]
    world = World()
    runner = start_rank(world, resolve_model(model),
                        RankOptions(int(tp), int(pp), dtype, kv_cache_dtype=kv_dtype))
    if not world.is_leader:
        runner.serve_forever()
        return
    half = len(ids) // 2
    first = runner.step(_plan(runner, ids[:half], 0, RETURN_ALL_LOGITS))
    second = runner.step(_plan(runner, ids[half:], half, RETURN_ALL_LOGITS))
    results = {"logits": prompt_logits(runner, ids),
               "chunked": np.concatenate([first, second]),
               "tokens": np.array(greedy_generate(runner, ids, int(n))),
               "kv_dtype": np.array(str(runner.kv.data.dtype)),
               "block_bytes": np.array(runner.kv.block_bytes)}
    runner.shutdown()
    np.savez(out, **results)


if __name__ == "__main__":
    main()
