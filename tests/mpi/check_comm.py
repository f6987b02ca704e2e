"""Under mpirun: exercise every collective of the communicator for DEVICE (cpu or cuda),
including (cuda) an all-reduce and a gather captured in CUDA graphs. Exits non-zero on any
mismatch."""

from __future__ import annotations

import sys

import torch
from trtdist.comm import World, make_communicator
from trtdist.launch.device import bind_device


def check(cond: bool, what: str, rank: int) -> None:
    if not cond:
        raise AssertionError(f"rank {rank}: {what}")


def main() -> None:
    world = World()
    device = bind_device(world.info, sys.argv[1])
    comm = make_communicator(world.comm, device)
    r, n = comm.rank, comm.size
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        x = torch.full((5, 3), r + 1, dtype=dtype, device=device)
        comm.all_reduce(x)
        check(bool((x == n * (n + 1) // 2).all()), f"all_reduce {dtype}: {x.flatten()[:3]}", r)
        g = comm.all_gather(torch.full((2,), r, dtype=dtype, device=device))
        want = torch.arange(n, device=device).repeat_interleave(2).to(dtype)
        check(torch.equal(g, want), f"all_gather {dtype}: {g}", r)
        for dst in range(n):
            part = torch.full((2, 3), r, dtype=dtype, device=device)
            got = comm.gather(part, dst)
            if r == dst:
                want = torch.arange(n, device=device).repeat_interleave(6).view(2 * n, 3)
                check(torch.equal(got, want.to(dtype)), f"gather to {dst} {dtype}: {got}", r)
            else:
                check(got is part, f"gather to {dst}: non-root got a new tensor", r)
        b = torch.full((4,), r, dtype=dtype, device=device)
        comm.broadcast(b, src=n - 1)
        check(bool((b == n - 1).all()), f"broadcast {dtype}: {b}", r)
    # ring send/recv
    out = torch.arange(6, dtype=torch.float32, device=device) + 100 * r
    inp = torch.empty(6, dtype=torch.float32, device=device)
    if r % 2 == 0:
        comm.send(out, (r + 1) % n)
        comm.recv(inp, (r - 1) % n)
    else:
        comm.recv(inp, (r - 1) % n)
        comm.send(out, (r + 1) % n)
    want = torch.arange(6, dtype=torch.float32, device=device) + 100 * ((r - 1) % n)
    check(torch.equal(inp, want), f"send/recv: {inp}", r)
    comm.barrier()
    if device.type == "cuda":
        # An all-reduce enqueued during capture must run on every replay.
        buf = torch.zeros(1024, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                buf.mul_(2)
                comm.all_reduce(buf)
        torch.cuda.current_stream().wait_stream(stream)
        for step in range(3):
            buf.fill_(r + step)
            graph.replay()
            torch.cuda.synchronize()
            want_val = sum(2 * (k + step) for k in range(n))
            check(bool((buf == want_val).all()), f"graph replay {step}: {buf[0]} != {want_val}", r)
    if device.type == "cuda":
        # A gather captured in a graph: on replay the root sees every rank's fresh values.
        part = torch.zeros(8, 5, device=device)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            comm.gather(part, 0)  # warm-up outside capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                gathered = comm.gather(part * 3, 0)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        for step in range(3):
            part.fill_(r + 10 * step)
            graph.replay()
            torch.cuda.synchronize()
            if r == 0:
                want = 3 * (torch.arange(n, device=device) + 10 * step).float()
                want = want.repeat_interleave(8 * 5).view(8 * n, 5)
                check(torch.equal(gathered, want), f"gather graph replay {step}", r)
    if world.is_leader:
        print(f"comm ok: {n} ranks on {device.type}")


if __name__ == "__main__":
    main()
