"""Under mpirun: load each named model on the world, compute prompt logits and greedy tokens,
and (leader) save them to an .npz.
Usage: run_model.py OUT.npz TP PP DTYPE PROMPT_IDS N [--dummy] MODEL..."""

from __future__ import annotations

import sys

import numpy as np
from trtdist.comm.world import World

from trtdist.engine.source import resolve_model
from trtdist.runtime.rank import RankOptions, start_rank
from trtdist.runtime.single import greedy_generate, prompt_logits


def main() -> None:
    out, tp, pp, dtype, prompt, n, *dirs = sys.argv[1:]
    dummy = dirs[:1] == ["--dummy"]
    dirs = dirs[1:] if dummy else dirs
    ids = [int(x) for x in prompt.split(",")]
    world = World()
    results = {}
    for i, d in enumerate(dirs):
        source = resolve_model(d, dummy_weights=dummy)
        runner = start_rank(world, source, RankOptions(int(tp), int(pp), dtype))
        if world.is_leader:
            results[f"logits{i}"] = prompt_logits(runner, ids)
            results[f"tokens{i}"] = np.array(greedy_generate(runner, ids, int(n)))
            runner.shutdown()
        else:
            runner.serve_forever()
    if world.is_leader:
        np.savez(out, **results)


if __name__ == "__main__":
    main()
