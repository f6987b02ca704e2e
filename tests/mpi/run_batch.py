"""Under mpirun (or alone): drive DistributedLLM inside the world through phases of requests.

Usage: run_batch.py SPEC.json OUT.json. SPEC: {"llm": kwargs, "phases": [{"mode": "batch" |
"alone", "requests": [{"prompt": [ids] or "text", "params": {...}}]}]}. The leader writes per
phase the outputs and allocator/scheduler counters taken after the phase. With
"check_tables": true the leader checks its rebuilt block table against the allocator after
every step of a batch phase, and at the end every rank's whole persistent block table is
compared with the leader's ("tables_agree" in each phase's result)."""

from __future__ import annotations

import hashlib
import json
import sys

from mpi4py import MPI

from trtdist import DistributedLLM, SamplingParams


def _table_digests(llm: DistributedLLM) -> list[str] | None:
    """Collective over the world: each rank's persistent block table digest (leader: all)."""
    digest = hashlib.sha256(llm._runner.inputs.table.tobytes()).hexdigest()
    return MPI.COMM_WORLD.gather(digest, root=0)


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    llm = DistributedLLM(**spec["llm"])
    check = spec.get("check_tables", False)
    if not llm.is_leader:
        if check:
            _table_digests(llm)
        return
    engine = llm.engine
    assert engine is not None
    results = []
    for phase in spec["phases"]:
        prompts = [r["prompt"] for r in phase["requests"]]
        params = [SamplingParams(**r.get("params", {})) for r in phase["requests"]]
        if phase["mode"] == "batch" and check:
            order = llm._add(prompts, params)
            done = {}
            while engine.has_unfinished:
                for out in engine.step(finished_only=True):
                    done[out.request_id] = out
                engine.check_block_tables()
            outs = [done[r] for r in order]
        elif phase["mode"] == "batch":
            outs = llm.generate(prompts, params)
        else:
            outs = [llm.generate([p], [sp])[0] for p, sp in zip(prompts, params)]
        alloc = engine.allocator
        results.append({
            "outputs": [[{"token_ids": c.token_ids, "text": c.text,
                          "finish_reason": c.finish_reason,
                          "logprobs": [[lp.token_id, lp.logprob, lp.top] for lp in c.logprobs]
                          if c.logprobs is not None else None} for c in o.outputs]
                        for o in outs],
            "ttft": [o.metrics.ttft for o in outs],
            "cached_tokens": [o.num_cached_tokens for o in outs],
            "num_free": alloc.num_free, "num_blocks": alloc.num_blocks,
            "prefix_hits": alloc.prefix_hits, "preemptions": engine.scheduler.num_preemptions,
            "swapped": engine.scheduler.num_swapped_out,
            "swap_free": engine.scheduler.swap_space.num_free,
            "swap_slots": engine.scheduler.swap_space.num_slots,
            "steps": engine.stats["steps"],
        })
        alloc.check_invariants()
    llm.shutdown()
    if check:
        digests = _table_digests(llm)
        for r in results:
            r["tables_agree"] = digests is not None and len(set(digests)) == 1
    json.dump(results, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
