"""`trtdist` command line: build, generate, serve, bench, info."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from trtdist import __version__


def _bounded(cast: type, low: float, high: float | None, what: str):  # type: ignore[no-untyped-def]
    """An argparse type: `cast(value)` within [low, high] (high None: no upper bound)."""

    def parse(value: str) -> int | float:
        try:
            n = cast(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low or (high is not None and n > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


_positive = _bounded(int, 1, None, "a positive integer")
_port = _bounded(int, 0, 65535, "a port number in [0, 65535]")
_nonnegative = _bounded(float, 0.0, None, "a non-negative number of seconds")


def _partition(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts such as 3,5, got {value!r}") from None


_DTYPES = ["auto", "float32", "fp32", "float16", "fp16", "bfloat16", "bf16"]


def _add_parallel(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp-size", type=_positive, default=None,
                   help="tensor-parallel ranks (default: the engine's, else the world size)")
    p.add_argument("--pp-size", type=_positive, default=None,
                   help="pipeline stages (default: the engine's, else 1)")
    p.add_argument("--pp-partition", type=_partition, default=None,
                   help="layers per stage, e.g. 3,5 (default: even split)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--dummy-weights", action="store_true",
                   help="random weights; MODEL may be a preset (llama3-8b, llama3-70b) or a "
                        "config.json")
    p.add_argument("--skip-checksums", action="store_true",
                   help="do not verify engine file checksums at load")


def _fraction(value: str) -> float:
    f = _bounded(float, 0.0, 1.0, "a number in (0, 1]")(value)
    if f == 0:
        raise argparse.ArgumentTypeError("expected a number in (0, 1], got 0.0")
    return f


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-batch-size", type=_positive, default=256,
                   help="most sequences in one step (default 256)")
    p.add_argument("--max-num-tokens", type=_positive, default=8192,
                   help="token budget of one step; longer prompts are prefilled in chunks")
    p.add_argument("--max-model-len", type=_positive, default=None,
                   help="longest prompt + output (default: the model's context)")
    p.add_argument("--kv-cache-fraction", type=_fraction, default=0.9,
                   help="share of the memory left after the weights used for KV blocks")
    p.add_argument("--num-kv-blocks", type=_positive, default=None,
                   help="exact number of KV blocks (overrides --kv-cache-fraction)")
    p.add_argument("--block-size", type=_positive, default=16, help="tokens per KV block")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="do not reuse KV blocks of shared prefixes")


def _llm_kwargs(args: argparse.Namespace) -> dict[str, object]:
    from mpi4py import MPI

    from trtdist.engine.source import resolve_model

    source = resolve_model(args.model, args.dummy_weights)
    tp, pp = _mapping_sizes(args, source, MPI.COMM_WORLD.Get_size())
    return dict(model=args.model, tp_size=tp, pp_size=pp, dtype=args.dtype,
                device=args.device, max_batch_size=args.max_batch_size,
                max_num_tokens=args.max_num_tokens, max_model_len=args.max_model_len,
                kv_cache_fraction=args.kv_cache_fraction, num_kv_blocks=args.num_kv_blocks,
                block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
                dummy_weights=args.dummy_weights, pp_partition=args.pp_partition,
                verify_checksums=not args.skip_checksums)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtdist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trtdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="shard a Hugging Face checkpoint into a per-rank engine")
    b.add_argument("model", help="Hugging Face checkpoint directory")
    b.add_argument("-o", "--output", required=True, help="engine directory to write")
    b.add_argument("--tp-size", type=_positive, default=1)
    b.add_argument("--pp-size", type=_positive, default=1)
    b.add_argument("--pp-partition", type=_partition, default=None)
    b.add_argument("--dtype", choices=_DTYPES, default="auto")
    b.add_argument("--quant", choices=["none"], default="none",
                   help="weight quantization (only 'none' so far)")

    g = sub.add_parser("generate", help="complete prompts (under mpirun -n TP*PP, or alone: "
                                        "then it starts its own world)")
    g.add_argument("model", nargs="?", default=None,
                   help="engine or Hugging Face directory (default: built-in tiny model)")
    g.add_argument("--prompt", required=True, action="append",
                   help="a prompt; repeat for several (batched together)")
    g.add_argument("--max-tokens", type=_positive, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    _add_parallel(g)
    _add_runtime(g)

    s = sub.add_parser("serve", help="OpenAI-compatible server; starts its own world of TP*PP "
                                     "ranks (or run it under mpirun -n TP*PP / srun)")
    s.add_argument("model", nargs="?", default=None,
                   help="engine or Hugging Face directory (default: built-in tiny model)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--served-model-name", default=None)
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $TRTDIST_API_KEY; a "
                        "key on the command line is visible in ps)")
    s.add_argument("--api-key-file", default=None,
                   help="read the API key from this file (its first line)")
    s.add_argument("--max-tokens-per-request", type=_positive, default=32768,
                   help="most output tokens one request may ask for, n x max_tokens (default "
                        "32768; more gets 400). A chat request without max_tokens gets the "
                        "room left in the context, at most this over n; a completion gets 16")
    s.add_argument("--max-queue", type=_positive, default=None,
                   help="most waiting requests; more get 503 with Retry-After")
    s.add_argument("--shutdown-timeout", type=_nonnegative, default=30.0,
                   help="seconds running requests may finish after SIGTERM/SIGINT")
    s.add_argument("--worker-timeout", type=_nonnegative, default=10.0,
                   help="seconds without a heartbeat before a rank is declared hung")
    s.add_argument("--max-body-bytes", type=_positive, default=1 << 20)
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                   default="info")
    _add_parallel(s)
    _add_runtime(s)

    bn = sub.add_parser("bench", help="offline throughput/latency benchmark (JSON output)")
    bn.add_argument("model", nargs="?", default=None)
    bn.add_argument("--num-requests", type=_positive, default=64)
    bn.add_argument("--input-len", type=_positive, default=128)
    bn.add_argument("--output-len", type=_positive, default=128)
    bn.add_argument("--output", default=None, help="also write the JSON result here")
    _add_parallel(bn)
    _add_runtime(bn)

    i = sub.add_parser("info", help="describe an engine or checkpoint directory")
    i.add_argument("model", nargs="?", default=None)
    return parser


def _mapping_sizes(args: argparse.Namespace, source, world_size: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    if source.kind == "engine":
        em = source.engine_meta["mapping"]
        tp = args.tp_size or em["tp_size"]
        pp = args.pp_size or em["pp_size"]
    else:
        pp = args.pp_size or 1
        tp = args.tp_size or max(world_size // pp, 1)
    return tp, pp


def cmd_generate(args: argparse.Namespace) -> int:
    from trtdist.llm import DistributedLLM
    from trtdist.runtime.rank import WorldError
    from trtdist.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    try:
        llm = DistributedLLM(**_llm_kwargs(args))  # type: ignore[arg-type]
    except WorldError as e:
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() == 0:
            print(f"trtdist generate: error: {e}", file=sys.stderr)
        return 1
    if not llm.is_leader:
        return 0
    with llm:
        for out in llm.generate(args.prompt, params):
            print(out.outputs[0].text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from trtdist.launch.launcher import inside_mpi_job, run_under_mpirun

    if not inside_mpi_job():
        # NOTE: started alone, the ranks run under an mpirun child that this process stops
        # in order on SIGINT/SIGTERM (see launch/launcher.py); MPI is never initialised here.
        from trtdist.engine.source import resolve_model

        tp, pp = _mapping_sizes(args, resolve_model(args.model, args.dummy_weights), 1)
        if tp * pp > 1:
            return run_under_mpirun(tp * pp, args.argv)
    from trtdist.server.serve import serve

    return serve(args, _llm_kwargs(args))


def cmd_bench(args: argparse.Namespace) -> int:
    from trtdist.bench import bench_main

    return bench_main(_llm_kwargs(args), args.num_requests, args.input_len, args.output_len,
                      args.output)


def cmd_build(args: argparse.Namespace) -> int:
    from trtdist.engine.build import build_engine

    out = build_engine(args.model, args.output, args.tp_size, args.pp_size, args.dtype,
                       args.pp_partition)
    print(f"engine written to {out} ({args.tp_size * args.pp_size} rank files)")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from trtdist.engine.source import resolve_model

    src = resolve_model(args.model)
    info = {"kind": src.kind, "path": str(src.path), "model": src.config.to_dict()}
    if src.engine_meta:
        info |= {k: src.engine_meta[k] for k in ("mapping", "build", "files")}
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"build": cmd_build, "generate": cmd_generate, "info": cmd_info,
                "serve": cmd_serve, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"trtdist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
