"""`trtdist bench serve`: the online serving benchmark against a running OpenAI server.

Runs one load point, or a sweep over request rates or concurrency caps, prints a summary per
point, writes the JSON result (`--output`) and, for a sweep, PNG plots beside it.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import math
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trtdist.benchmarks.datasets import BenchRequest, jsonl_requests, synthetic_requests
from trtdist.benchmarks.metrics import RequestResult, error_summary, parse_slo, summarize
from trtdist.benchmarks.serve_client import LoadPoint, run_load

#: exit status when the benchmark ran but some requests failed (results are still written)
EXIT_REQUESTS_FAILED = 3


@dataclass(frozen=True, slots=True)
class ServeBenchConfig:
    url: str
    model: str | None
    requests: list[list[BenchRequest]]  # one list per point
    warmup_requests: list[BenchRequest]
    points: list[LoadPoint]
    sweep_param: str | None  # "request_rate", "max_concurrency" or None (one point)
    slo: dict[str, float]
    seed: int
    progress: bool


def parse_rates(text: str) -> list[float]:
    """'1,2,4,inf' -> [1.0, 2.0, 4.0, inf]."""
    out = []
    for item in text.split(","):
        try:
            v = float(item)
        except ValueError:
            raise ValueError(f"--request-rate wants numbers or inf separated by commas, "
                             f"got {item!r}") from None
        if not v > 0:
            raise ValueError(f"--request-rate values must be > 0 (or inf), got {item!r}")
        out.append(v)
    return out


def parse_concurrency(text: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]."""
    try:
        out = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--max-concurrency wants positive integers separated by commas, "
                         f"got {text!r}") from None
    if any(c < 1 for c in out):
        raise ValueError(f"--max-concurrency values must be >= 1, got {text!r}")
    return out


def load_points(rates: list[float], concurrency: list[int] | None,
                ) -> tuple[list[LoadPoint], str | None]:
    """The sweep: at most one of the two lists may hold several values."""
    conc: list[int | None] = list(concurrency) if concurrency else [None]
    if len(rates) > 1 and len(conc) > 1:
        raise ValueError("sweep one parameter at a time: --request-rate and --max-concurrency "
                         "both list several values")
    if len(rates) > 1:
        return [LoadPoint(r, conc[0]) for r in rates], "request_rate"
    if len(conc) > 1:
        return [LoadPoint(rates[0], c) for c in conc], "max_concurrency"
    return [LoadPoint(rates[0], conc[0])], None


def _json_rate(rate: float) -> float | str:
    return rate if math.isfinite(rate) else "inf"


def point_label(point: LoadPoint, param: str | None) -> str:
    if param == "max_concurrency":
        return f"conc {point.max_concurrency}"
    return f"{_json_rate(point.request_rate)} req/s"


def _served_model(url: str) -> str | None:
    """The name from /v1/models; also the reachability check before any load is sent."""
    try:
        resp = httpx.get(f"{url}/v1/models", timeout=30.0)
    except httpx.HTTPError as e:
        raise ValueError(f"cannot reach the server at {url} ({type(e).__name__}: {e}); start "
                         f"it with `mpirun -n N trtdist serve ...` and pass its --url") from None
    if resp.status_code != 200:
        raise ValueError(f"{url}/v1/models answered HTTP {resp.status_code}: {resp.text[:200]}")
    data = resp.json().get("data") or [{}]
    return data[0].get("id")


async def _run(cfg: ServeBenchConfig) -> tuple[dict[str, Any], list[list[RequestResult]]]:
    warm_results: list[RequestResult] = []
    if cfg.warmup_requests:
        warm_results, _ = await run_load(cfg.url, cfg.model, cfg.warmup_requests,
                                         LoadPoint(math.inf, cfg.points[0].max_concurrency),
                                         progress=cfg.progress, desc="warm-up")
    points, raw = [], []
    for i, (point, requests) in enumerate(zip(cfg.points, cfg.requests)):
        results, duration = await run_load(
            cfg.url, cfg.model, requests, point, seed=cfg.seed + i, progress=cfg.progress,
            desc=point_label(point, cfg.sweep_param))
        raw.append(results)
        points.append({"request_rate": _json_rate(point.request_rate),
                       "max_concurrency": point.max_concurrency,
                       **summarize(results, duration, cfg.slo)})
    warm_errors = error_summary(warm_results)
    out = {"warmup": {"requests": len(warm_results),
                      "completed": len(warm_results) - warm_errors["failed"], **warm_errors},
           "points": points}
    return out, raw


def print_point(p: dict[str, Any], label: str, file: Any = sys.stdout) -> None:
    """A vLLM-like summary of one point."""
    w = 40
    lines = [f"{' ' + label + ' ':=^{w + 14}}",
             f"{'Successful requests:':<{w}}{p['completed']:>14}",
             f"{'Failed requests:':<{w}}{p['failed']:>14}",
             f"{'Benchmark duration (s):':<{w}}{p['duration_s']:>14.2f}",
             f"{'Request throughput (req/s):':<{w}}{p['request_throughput']:>14.2f}",
             f"{'Request goodput (req/s):':<{w}}{p['goodput']['request_goodput']:>14.2f}",
             f"{'Output token throughput (tok/s):':<{w}}{p['output_throughput']:>14.2f}",
             f"{'Total token throughput (tok/s):':<{w}}{p['total_token_throughput']:>14.2f}"]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL")):
        s = p[f"{key}_ms"]
        lines.append(f"{name + ' (ms) mean/p50/p90/p99:':<{w}}{s['mean']:>8.1f}{s['p50']:>8.1f}"
                     f"{s['p90']:>8.1f}{s['p99']:>8.1f}")
    for e in p["errors"]["first"]:
        lines.append(f"  error x{e['count']}: {e['message']}")
    print("\n".join(lines), file=file, flush=True)


def run_serve_bench(cfg: ServeBenchConfig, config_echo: dict[str, Any],
                    output: str | None, plot_prefix: str | None,
                    save_detailed: bool = False) -> tuple[dict[str, Any], int]:
    """Run every point; returns the full result and the exit status (0, or
    EXIT_REQUESTS_FAILED when any measured or warm-up request failed)."""
    if plot_prefix is None and output and len(cfg.points) > 1:
        plot_prefix = str(Path(output).with_suffix(""))
    if plot_prefix:
        from trtdist.benchmarks.plots import require_matplotlib

        require_matplotlib()
        Path(plot_prefix).parent.mkdir(parents=True, exist_ok=True)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
    served = _served_model(cfg.url)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    body, raw = asyncio.run(_run(cfg))
    labels = [point_label(p, cfg.sweep_param) for p in cfg.points]
    result: dict[str, Any] = {
        "benchmark": "serve",
        "date": date, "command": shlex.join(["trtdist", *sys.argv[1:]]),
        "url": cfg.url, "model": cfg.model or served, "config": config_echo,
        "sweep": {"parameter": cfg.sweep_param,
                  "values": [p["request_rate" if cfg.sweep_param != "max_concurrency"
                               else "max_concurrency"] for p in body["points"]]},
        **body, "plots": [],
    }
    for point, label in zip(result["points"], labels):
        print_point(point, label)
    if save_detailed:
        for point, results in zip(result["points"], raw):
            point["requests"] = [{"ok": r.ok, "prompt_len": r.prompt_len,
                                  "output_len": r.output_len, "ttft_ms": r.ttft * 1e3,
                                  "e2el_ms": r.latency * 1e3,
                                  "itl_ms": [g * 1e3 for g in r.itl], "error": r.error}
                                 for r in results]
    if plot_prefix:
        result["plots"] = [str(p) for p in draw_plots(result, raw, labels, plot_prefix)]
    if output:
        Path(output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"results written to {output}" + "".join(f", {p}" for p in result["plots"]))
    failed = sum(p["failed"] for p in result["points"]) + result["warmup"]["failed"]
    if failed:
        print(f"trtdist bench serve: {failed} request(s) failed; see 'errors' in the result",
              file=sys.stderr)
    return result, EXIT_REQUESTS_FAILED if failed else 0


def draw_plots(result: dict[str, Any], raw: Sequence[Sequence[RequestResult]],
               labels: Sequence[str], prefix: str) -> list[Path]:
    from trtdist.benchmarks.plots import plot_distributions, plot_throughput_latency

    title = f"trtdist bench serve: {result['model']} ({result['date']})"
    samples = [{"ttft": [r.ttft * 1e3 for r in rs if r.ok],
                "itl": [g * 1e3 for r in rs if r.ok for g in r.itl]} for rs in raw]
    return [plot_throughput_latency(result["points"], labels, f"{prefix}_latency.png",
                                    title=title),
            plot_distributions(samples, labels, f"{prefix}_distributions.png", title=title)]


def bench_serve_main(args: Any, launch: tuple[int, list[str]] | None = None) -> int:
    """Entry point of `trtdist bench serve` (args from the CLI parser). Without `args.url`,
    `launch` = (ranks, `trtdist serve` flags) of the server to start and stop around the run."""
    slo = parse_slo(args.slo) if args.slo else {}
    points, param = load_points(parse_rates(args.request_rate),
                                parse_concurrency(args.max_concurrency)
                                if args.max_concurrency else None)
    if args.dataset:
        # NOTE: the same prompts at every point: the server's prefix cache may serve repeats
        # (start it with --no-enable-prefix-caching for cold numbers)
        rows = jsonl_requests(args.dataset, args.num_prompts + args.warmup, args.output_len)
        warm, requests = rows[: args.warmup], [rows[args.warmup:]] * len(points)
    else:
        # NOTE: fresh random prompts for the warm-up and for each point, so no point is
        # flattered by prefix-cache hits on prompts an earlier one sent
        def synth(num: int, seed: int) -> list[BenchRequest]:
            return synthetic_requests(num, args.input_len, args.output_len, seed=seed,
                                      range_ratio=args.random_range_ratio,
                                      vocab_size=args.vocab_size)

        warm = synth(args.warmup, args.seed)
        requests = [synth(args.num_prompts, args.seed + 1 + i) for i in range(len(points))]
    echo = {"dataset": args.dataset or "random", "num_prompts": args.num_prompts,
            "input_len": None if args.dataset else args.input_len,
            "output_len": args.output_len, "random_range_ratio": args.random_range_ratio,
            "vocab_size": args.vocab_size, "warmup": args.warmup, "seed": args.seed,
            "slo_ms": {k: v * 1e3 for k, v in slo.items()},
            "server": None if launch is None else {"ranks": launch[0], "serve_args": launch[1]}}

    def run(url: str) -> int:
        cfg = ServeBenchConfig(url=url.rstrip("/"), model=args.model_name, requests=requests,
                               warmup_requests=warm, points=points, sweep_param=param,
                               slo=slo, seed=args.seed, progress=not args.disable_tqdm)
        return run_serve_bench(cfg, echo, args.output, args.plot_prefix, args.save_detailed)[1]

    if launch is None:
        return run(args.url)
    from trtdist.benchmarks.launch_server import LaunchedServer

    with LaunchedServer(launch[0], launch[1], args.mpirun, args.server_timeout) as url:
        return run(url)
