"""Entry point of a rank spawned by `DistributedLLM` from a plain python process.

The parent sends the model and rank options as JSON over MPI (typed bytes, never pickle)."""

from __future__ import annotations

import json
import signal
import sys

from trtdist.comm.world import World
from trtdist.engine.source import resolve_model
from trtdist.launch.spawn import join_parent_world
from trtdist.runtime.health import Heartbeat
from trtdist.runtime.rank import RankOptions, WorldError, check_world, start_rank


def main() -> int:
    # A terminal's Ctrl-C reaches the whole foreground process group; the leader (the user's
    # script) stops the world in order, so the workers wait for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spawned = join_parent_world()
    world = World(spawned.comm)
    spec = json.loads(world.bcast_bytes(None))
    opts = spec["options"]
    for name in ("pp_partition", "cuda_graph_batch_sizes"):  # JSON lists back to tuples
        if opts.get(name) is not None:
            opts[name] = tuple(opts[name])
    try:
        try:
            source = resolve_model(spec["model"], spec["dummy_weights"])
        except (ValueError, FileNotFoundError) as e:
            check_world(world, f"rank {world.rank}: {e}")  # raises, on every rank
        runner = start_rank(world, source, RankOptions(**opts))
    except WorldError:
        spawned.close()
        return 1
    # Same order as the leader's DistributedLLM: heartbeat after start, stopped before close.
    heartbeat = Heartbeat(world.comm, timeout=spec.get("worker_timeout", 10.0),
                          on_failure=lambda rank, s: world.abort(
                              f"rank {rank} (the leader) has not answered for {s:.1f} s"))
    runner.serve_forever()
    heartbeat.stop()
    runner.close()
    spawned.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
