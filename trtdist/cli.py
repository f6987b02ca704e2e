"""`trtdist` command line: build, generate, serve, bench, perplexity, info."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from trtdist import __version__
from trtdist.runtime.scheduler import POLICIES


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


def _power_of_two(value: str) -> int:
    n = _positive(value)
    if n & (n - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two such as 16 or 32, got {n}")
    return int(n)


def _partition(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer counts such as 3,5, got {value!r}") from None


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive batch sizes such as 1,2,4,8, got {value!r}")
    return sizes


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
    p.add_argument("--quant", choices=["auto", "none", "fp8"], default="auto",
                   help="linear layers of a Hugging Face checkpoint or of --dummy-weights: "
                        "fp8 quantizes them on the fly (E4M3, per-channel weight scales, "
                        "per-token activations); auto keeps the model's own (an engine's is "
                        "fixed at build)")


def _fraction(value: str) -> float:
    f = _bounded(float, 0.0, 1.0, "a number in (0, 1]")(value)
    if f == 0:
        raise argparse.ArgumentTypeError("expected a number in (0, 1], got 0.0")
    return f


def _gib(value: str) -> float:
    f = _bounded(float, 0.0, None, "a number of GiB >= 0")(value)
    if not math.isfinite(f):
        raise argparse.ArgumentTypeError(f"expected a finite number of GiB >= 0, got {value!r}")
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
    p.add_argument("--block-size", type=_power_of_two, default=None,
                   help="tokens per KV block, a power of two (default 16; 32 with "
                        "--kv-cache-dtype fp8)")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="do not plan step N+1 while step N runs (overlap is on by default "
                        "with one pipeline stage)")
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false", help="do not reuse KV blocks of shared prefixes")
    p.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs; every step runs eagerly")
    p.add_argument("--cuda-graph-batch-sizes", type=_batch_sizes, default=None,
                   help="decode batch sizes to capture, e.g. 1,2,4,8,16 (default: 1, 2, 4, "
                        "8, then steps of 8 up to --max-batch-size)")
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"], default="auto",
                   help="attention kernels: auto = triton on CUDA, torch elsewhere")
    p.add_argument("--scheduler-policy", choices=list(POLICIES), default="max_utilization",
                   help="KV admission: max_utilization admits while blocks are free and "
                        "preempts the newest sequence when full (swapped to host memory, or "
                        "recomputed); "
                        "guaranteed_no_evict admits only sequences that fit at prompt + "
                        "max_tokens, so nothing is preempted")
    p.add_argument("--swap-space", type=_gib, default=None, metavar="GIB",
                   help="host memory per rank (GiB) that preempted sequences' KV is swapped "
                        "to, instead of being recomputed (default: 16 on a GPU, at most a "
                        "quarter of the rank's share of free host memory; none on CPU; 0: "
                        "always recompute)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="KV cache element type: auto = the model dtype; fp8 = E4M3 with one "
                        "scale per token and KV head, ~1.9x the KV blocks (CUDA: compute "
                        "capability >= 8.9)")


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
                verify_checksums=not args.skip_checksums, enforce_eager=args.enforce_eager,
                overlap=args.overlap,
                cuda_graph_batch_sizes=args.cuda_graph_batch_sizes,
                attention_backend=args.attention_backend, quant=args.quant,
                scheduler_policy=args.scheduler_policy, kv_cache_dtype=args.kv_cache_dtype,
                swap_space=args.swap_space)


_MODEL_HELP = ("engine directory, Hugging Face directory, .gguf file, or 'tiny' (random test "
               "model); default: SmolLM2-135M-Instruct (9 heads, 3 KV heads: TP 1 or 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trtdist", description=__doc__)
    parser.add_argument("--version", action="version", version=f"trtdist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="shard a Hugging Face checkpoint into a per-rank engine")
    b.add_argument("model", help="Hugging Face checkpoint directory or llama .gguf file")
    b.add_argument("-o", "--output", required=True, help="engine directory to write")
    b.add_argument("--tp-size", type=_positive, default=1)
    b.add_argument("--pp-size", type=_positive, default=1)
    b.add_argument("--pp-partition", type=_partition, default=None)
    b.add_argument("--dtype", choices=_DTYPES, default="auto")
    b.add_argument("--quant", choices=["auto", "none", "fp8"], default="auto",
                   help="fp8: E4M3 weights with per-output-channel scales, activations "
                        "quantized per token at run time (or per tensor with --calib-data); "
                        "none: the model dtype (dequantizes an FP8 checkpoint); auto (default): "
                        "fp8 if the checkpoint is FP8, else none")
    b.add_argument("--calib-data", default=None, metavar="FILE",
                   help="prompts (text, one a line, or JSONL with \"text\") run through the "
                        "model here to calibrate static per-tensor FP8 activation scales")

    g = sub.add_parser("generate", help="complete prompts (under mpirun -n TP*PP, or alone: "
                                        "then it starts its own world)")
    g.add_argument("model", nargs="?", default=None,
                   help=_MODEL_HELP)
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
                   help=_MODEL_HELP)
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

    bn = sub.add_parser(
        "bench", help="benchmarks: offline (default) or online `bench serve --url URL`",
        description="Offline benchmark: a batch of synthetic requests all at once through "
                    "DistributedLLM (under mpirun -n TP*PP, or alone: then it spawns its own "
                    "world); prints a JSON result. The online serving benchmark against a "
                    "running server is `trtdist bench serve --url URL` (see "
                    "`trtdist bench serve --help`).",
        usage="trtdist bench [MODEL] [options]\n       trtdist bench serve --url URL [options]"
              "\n       trtdist bench --compare A.json B.json")
    bn.add_argument("model", nargs="?", default=None,
                    help=_MODEL_HELP)
    bn.add_argument("--num-requests", type=_positive, default=64)
    bn.add_argument("--input-len", type=_positive, default=128)
    bn.add_argument("--output-len", type=_positive, default=128)
    bn.add_argument("--output", default=None, help="also write the JSON result here")
    bn.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...",
                    help="one run per value, each in its own spawned world (run from a plain "
                         "process): max-batch-size=1,8,64, max-num-tokens=..., or "
                         "tp-pp=1x1,2x1,1x2; draws PREFIX_sweep.png")
    bn.add_argument("--plot-prefix", default=None,
                    help="path prefix of the sweep plot (default: --output without .json)")
    bn.add_argument("--compare", nargs=2, default=None, metavar=("A.json", "B.json"),
                    help="print two result files side by side and exit (runs nothing)")
    _add_parallel(bn)
    _add_runtime(bn)

    pp = sub.add_parser("perplexity", help="perplexity of a text file through the runtime "
                                           "(JSON output), e.g. to compare an FP8 engine "
                                           "with its original")
    pp.add_argument("model", nargs="?", default=None)
    pp.add_argument("--text-file", required=True, help="the text to score")
    pp.add_argument("--chunk", type=_positive, default=512, help="tokens per prefill step")
    _add_parallel(pp)
    _add_runtime(pp)

    i = sub.add_parser("info", help="describe an engine or checkpoint directory")
    i.add_argument("model", nargs="?", default=None, help=_MODEL_HELP)
    return parser


def _mapping_sizes(args: argparse.Namespace, source, world_size: int) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    if source.kind == "engine":
        em = source.engine_meta["mapping"]
        tp = args.tp_size or em["tp_size"]
        pp = args.pp_size or em["pp_size"]
    elif args.tp_size is None and args.pp_size is None and world_size > 1 \
            and not _splits(source.config, world_size, 1) and _splits(source.config, 1, world_size):
        # NOTE: `mpirun -n 2 trtdist serve` on a model whose heads the world cannot split
        # (the default SmolLM2 has 9) runs the ranks as pipeline stages instead of failing.
        print(f"trtdist: {world_size} ranks cannot split this model's attention heads for tensor "
              f"parallelism; running them as {world_size} pipeline stages (--pp-size "
              f"{world_size}). Pass --tp-size/--pp-size to choose.", file=sys.stderr)
        tp, pp = 1, world_size
    else:
        pp = args.pp_size or 1
        tp = args.tp_size or max(world_size // pp, 1)
    return tp, pp


def _splits(cfg, tp: int, pp: int) -> bool:  # type: ignore[no-untyped-def]
    from trtdist.engine.build import validate_parallelism

    try:
        validate_parallelism(cfg, tp, pp)
    except ValueError:
        return False
    return True


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
    if args.compare:
        from trtdist.benchmarks.compare import compare_files

        print(compare_files(*args.compare))
        return 0
    from trtdist.bench import bench_main

    return bench_main(_llm_kwargs(args), args.num_requests, args.input_len, args.output_len,
                      args.output, args.sweep, args.plot_prefix)


def build_bench_serve_parser() -> argparse.ArgumentParser:
    """`trtdist bench serve`: parsed apart from the main parser, since `trtdist bench MODEL`
    takes a positional model that an argparse sub-command would shadow."""
    p = argparse.ArgumentParser(
        prog="trtdist bench serve",
        description="Online serving benchmark: streams /v1/completions (ignore_eos, so every "
                    "output has the asked length) to a running OpenAI-compatible server at a "
                    "Poisson request rate and/or a fixed concurrency; reports throughput, "
                    "TTFT / TPOT / ITL / E2E latency (mean, p50, p90, p99), goodput under "
                    "--slo, and failed requests. A comma list in --request-rate or "
                    "--max-concurrency runs a sweep and plots it. Without --url it starts "
                    "`mpirun -n TP*PP trtdist serve MODEL ...` itself with the model flags "
                    "below and stops it at the end. Exit status 3 when any request failed "
                    "(the result is still written).")
    p.add_argument("--url", default=None,
                   help="base URL of a running server, e.g. http://127.0.0.1:8000 (default: "
                        "start one, see the server options)")
    p.add_argument("--served-model-name", dest="model_name", default=None, metavar="NAME",
                   help="model name to send in requests (default: none; the server's own "
                        "name is recorded)")
    p.add_argument("--dataset", default=None, metavar="PROMPTS.jsonl",
                   help='JSONL prompts: {"prompt": "text" or [token ids], "output_len": N}; '
                        "default: synthetic random token ids")
    p.add_argument("--num-prompts", type=_positive, default=100,
                   help="measured requests per load point (default 100)")
    p.add_argument("--input-len", type=_positive, default=1024,
                   help="synthetic prompt length in tokens (default 1024)")
    p.add_argument("--output-len", type=_positive, default=128,
                   help="tokens to generate per request (default 128; JSONL lines may say)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="draw lengths uniformly in [len*(1-r), len*(1+r)], r in [0, 1)")
    p.add_argument("--vocab-size", type=_positive, default=256,
                   help="synthetic token ids are drawn from [0, N) (default 256)")
    p.add_argument("--request-rate", default="inf", metavar="R[,R...]",
                   help="Poisson arrival rate in req/s, inf = all at once (default); a list "
                        "such as 1,2,4,inf sweeps")
    p.add_argument("--max-concurrency", default=None, metavar="C[,C...]",
                   help="most requests in flight (default: no limit); a list such as "
                        "1,8,32 sweeps")
    p.add_argument("--warmup", type=_bounded(int, 0, None, "a non-negative integer"),
                   default=2, help="requests sent first and left out of the results")
    p.add_argument("--slo", default=None, metavar="ttft=200ms,tpot=50ms",
                   help="goodput counts requests meeting every limit (ttft, tpot, e2el; "
                        "units us, ms, s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the JSON result here")
    p.add_argument("--plot-prefix", default=None,
                   help="draw PREFIX_latency.png and PREFIX_distributions.png (default for a "
                        "sweep with --output: the output path without .json)")
    p.add_argument("--save-detailed", action="store_true",
                   help="keep every request's TTFT, ITLs, E2EL and error in the JSON")
    p.add_argument("--disable-tqdm", action="store_true", help="no progress bar")
    srv = p.add_argument_group(
        "server started by the benchmark (without --url)",
        "the same flags as `trtdist serve`; the world has tp*pp ranks")
    srv.add_argument("model", nargs="?", default=None,
                     help="engine or Hugging Face directory (default: built-in tiny model)")
    srv.add_argument("--mpirun", default=None, metavar="CMD",
                     help="launcher command, e.g. 'mpirun --oversubscribe' (default: the "
                          "mpirun beside this Python, else on PATH)")
    srv.add_argument("--server-timeout", type=_nonnegative, default=1800.0,
                     help="seconds the server may take to load (default 1800)")
    _add_parallel(srv)  # type: ignore[arg-type]
    _add_runtime(srv)  # type: ignore[arg-type]
    return p


def _model_flags(args: argparse.Namespace) -> list[str]:
    """The model and serve flags of `bench serve` that differ from their defaults, as argv."""
    ref = argparse.ArgumentParser(add_help=False)
    _add_parallel(ref)
    _add_runtime(ref)
    flags = [] if args.model is None else [args.model]
    for action in ref._actions:
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        opt = action.option_strings[0]
        if action.nargs == 0:  # store_true / store_false
            flags.append(opt)
        elif isinstance(value, tuple):
            flags += [opt, ",".join(map(str, value))]
        else:
            flags += [opt, str(value)]
    return flags


def _launch_flags(args: argparse.Namespace) -> tuple[int, list[str]]:
    """World size and `trtdist serve` argv of the server `bench serve` starts itself."""
    from trtdist.engine.source import resolve_model

    tp, pp = _mapping_sizes(args, resolve_model(args.model, args.dummy_weights), 1)
    flags = _model_flags(args)
    for opt in ("--tp-size", "--pp-size"):  # given explicitly below
        if opt in flags:
            i = flags.index(opt)
            del flags[i:i + 2]
    return tp * pp, [*flags, "--tp-size", str(tp), "--pp-size", str(pp)]


def cmd_bench_serve(argv: Sequence[str]) -> int:
    from trtdist.benchmarks.serve_bench import bench_serve_main

    parser = build_bench_serve_parser()
    args = parser.parse_args(argv)
    if args.url and (given := _model_flags(args) + (["--mpirun"] if args.mpirun else [])):
        parser.error(f"{' '.join(given)}: model and server flags only apply when bench serve "
                     "starts its own server (without --url)")
    try:
        return bench_serve_main(args, None if args.url else _launch_flags(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"trtdist bench serve: error: {e}", file=sys.stderr)
        return 1


def cmd_perplexity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trtdist.eval import perplexity
    from trtdist.llm import DistributedLLM

    text = Path(args.text_file).read_text()
    llm = DistributedLLM(**_llm_kwargs(args))  # type: ignore[arg-type]
    if not llm.is_leader:
        return 0
    with llm:
        tok = llm.engine.tokenizer if llm.engine is not None else None
        if tok is None:
            raise ValueError(f"model {args.model} has no tokenizer to read --text-file with")
        ids = tok.encode(text)
        print(json.dumps({"perplexity": perplexity(llm, ids, args.chunk), "tokens": len(ids)}))
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from trtdist.engine.build import build_engine

    out = build_engine(args.model, args.output, args.tp_size, args.pp_size, args.dtype,
                       args.pp_partition, quant=args.quant, calib_data=args.calib_data)
    quant = json.loads((out / "config.json").read_text())["build"]["quant"]
    scheme = f", {quant['method']} ({quant['activation']} activations)" if quant else ""
    print(f"engine written to {out} ({args.tp_size * args.pp_size} rank files{scheme})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from trtdist.engine.source import resolve_model

    src = resolve_model(args.model)
    info = {"kind": src.kind, "path": str(src.path), "model": src.config.to_dict()}
    if src.engine_meta:
        info |= {k: src.engine_meta[k] for k in ("mapping", "build", "files")}
        info["quant"] = src.engine_meta["build"].get("quant") or "none"
    elif src.path is not None:
        from trtdist.engine.checkpoint import checkpoint_quant

        cq = checkpoint_quant(json.loads((src.path / "config.json").read_text()))
        info["quant"] = {"method": "fp8", "checkpoint": cq.to_dict()} if cq else "none"
    print(json.dumps(info, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:
        return cmd_bench_serve(argv[2:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    handlers = {"build": cmd_build, "generate": cmd_generate, "info": cmd_info,
                "serve": cmd_serve, "bench": cmd_bench, "perplexity": cmd_perplexity}
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"trtdist {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
