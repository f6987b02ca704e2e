"""`trtdist bench serve` against a live 2-rank server, the offline sweep and --compare."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from helpers import ROOT, mpi_env
from PIL import Image
from server_helpers import LiveServer, start_server

from trtdist.benchmarks.compare import compare_table, flatten
from trtdist.benchmarks.datasets import jsonl_requests, synthetic_requests
from trtdist.benchmarks.metrics import RequestResult, parse_slo, stats, summarize
from trtdist.benchmarks.serve_bench import EXIT_REQUESTS_FAILED, load_points, parse_rates

LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
POINT_KEYS = {"request_rate", "max_concurrency", "num_requests", "completed", "failed",
              "errors", "duration_s", "total_input_tokens", "total_output_tokens",
              "request_throughput", "output_throughput", "total_token_throughput",
              *LATENCIES, "goodput"}
STAT_KEYS = {"count", "mean", "std", "p50", "p90", "p99"}


def bench_serve(args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "trtdist.cli", "bench", "serve",
                           "--disable-tqdm", *args], capture_output=True, text=True, cwd=ROOT,
                          env=mpi_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"bench serve failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def server_counter(server: LiveServer, name: str) -> float:
    """Sum of a Prometheus counter over all its label sets."""
    text = httpx.get(f"{server.url}/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{"))


def check_point(p: dict, num: int, input_len: int, output_len: int) -> None:
    assert POINT_KEYS <= set(p), POINT_KEYS - set(p)
    assert (p["num_requests"], p["completed"], p["failed"]) == (num, num, 0), p["errors"]
    assert p["errors"] == {"failed": 0, "distinct": 0, "first": []}
    assert p["total_input_tokens"] == num * input_len
    assert p["total_output_tokens"] == num * output_len  # ignore_eos: the asked length
    assert p["request_throughput"] > 0 and p["output_throughput"] > 0
    assert p["total_token_throughput"] > p["output_throughput"]
    for key in LATENCIES:
        s = p[key]
        assert set(s) == STAT_KEYS
        assert 0 < s["p50"] <= s["p90"] <= s["p99"], (key, s)
    assert p["ttft_ms"]["count"] == p["e2el_ms"]["count"] == p["tpot_ms"]["count"] == num
    # a chunk may carry several tokens (UTF-8 hold-back), never fewer than one
    assert 0 < p["itl_ms"]["count"] <= num * (output_len - 1)
    assert p["ttft_ms"]["p99"] <= p["e2el_ms"]["p99"]
    good = p["goodput"]
    assert good["slo_ms"] == {"ttft": 60000.0, "e2el": 120000.0}
    assert good["good_requests"] == num  # limits no CPU run misses


def check_pngs(result: dict, prefix: Path) -> None:
    expected = [f"{prefix}_latency.png", f"{prefix}_distributions.png"]
    assert result["plots"] == expected
    for path in expected:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


@pytest.mark.mpi
def test_bench_serve_rate_and_concurrency_sweeps(tmp_path: Path) -> None:
    num, input_len, output_len, warmup = 4, 8, 4, 1
    common = ["--num-prompts", str(num), "--input-len", str(input_len), "--output-len",
              str(output_len), "--warmup", str(warmup), "--slo", "ttft=60s,e2el=120000ms"]
    dataset = tmp_path / "prompts.jsonl"  # token-id prompts of exactly input_len tokens
    dataset.write_text("".join(json.dumps({"prompt": [(7 * i + j) % 250 for j in range(8)]})
                               + "\n" for i in range(num + warmup)))
    server = start_server(2)
    try:
        done0 = server_counter(server, "trtdist:request_success_total")
        rate = bench_serve(["--url", server.url, *common, "--request-rate", "8,inf",
                            "--output", str(tmp_path / "rate.json")])
        conc = bench_serve(["--url", server.url, *common, "--max-concurrency", "1,3",
                            "--request-rate", "16", "--dataset", str(dataset),
                            "--output", str(tmp_path / "conc.json")])
        served = server_counter(server, "trtdist:request_success_total") - done0
    finally:
        server.stop()
    # every request sent reached the server and finished there: 2 runs x (warm-up + 2 points)
    assert served == 2 * (warmup + 2 * num)
    for proc, name, param, values in ((rate, "rate", "request_rate", [8.0, "inf"]),
                                      (conc, "conc", "max_concurrency", [1, 3])):
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert result["benchmark"] == "serve" and result["model"] == "tiny"
        assert result["command"].startswith("trtdist bench serve --disable-tqdm --url")
        assert result["sweep"] == {"parameter": param, "values": values}
        assert result["config"]["num_prompts"] == num
        assert result["warmup"] == {"requests": warmup, "completed": warmup, "failed": 0,
                                    "distinct": 0, "first": []}
        assert [p[param] for p in result["points"]] == values
        for p in result["points"]:
            check_point(p, num, input_len, output_len)
        check_pngs(result, tmp_path / name)
        assert proc.stdout.count("Successful requests:") == 2
    assert [p["request_rate"] for p in json.loads((tmp_path / "conc.json").read_text())
            ["points"]] == [16.0, 16.0]


@pytest.mark.mpi
def test_bench_serve_counts_errors_when_the_server_stops(tmp_path: Path) -> None:
    num = 24
    server = start_server(2, ["--shutdown-timeout", "0"])
    out = tmp_path / "r.json"
    bench = subprocess.Popen([sys.executable, "-m", "trtdist.cli", "bench", "serve",
                              "--disable-tqdm", "--url", server.url, "--num-prompts", str(num),
                              "--input-len", "8", "--output-len", "6", "--request-rate", "3",
                              "--warmup", "0", "--output", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=ROOT, env=mpi_env())
    try:
        while server_counter(server, "trtdist:request_success_total") < 2:
            assert bench.poll() is None, bench.communicate()
            time.sleep(0.2)
    finally:
        server.stop()  # midway: most of the 24 requests (8 s of arrivals) are still to come
    stdout, stderr = bench.communicate()
    assert bench.returncode == EXIT_REQUESTS_FAILED, stdout + stderr
    assert "request(s) failed" in stderr
    p = json.loads(out.read_text())["points"][0]
    assert p["num_requests"] == num == p["completed"] + p["failed"]
    assert p["completed"] >= 2 and p["failed"] >= 1
    errors = p["errors"]
    assert errors["failed"] == p["failed"] and errors["first"]
    if errors["distinct"] == len(errors["first"]):  # all kinds of failure listed
        assert sum(e["count"] for e in errors["first"]) == p["failed"]
    assert all(e["message"] and e["count"] >= 1 for e in errors["first"])
    assert "error x" in stdout


def test_bench_serve_unreachable_server_is_a_clear_error() -> None:
    proc = bench_serve(["--url", "http://127.0.0.1:9", "--num-prompts", "1"], check=False)
    assert proc.returncode == 1
    assert "cannot reach the server at http://127.0.0.1:9" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (["--slo", "ttft=fast"], "--slo ttft: expected a number"),
    (["--slo", "latency=1s"], "METRIC one of ttft, tpot, e2el"),
    (["--request-rate", "1,0"], "--request-rate values must be > 0"),
    (["--request-rate", "1,2", "--max-concurrency", "1,2"], "sweep one parameter at a time"),
    (["--max-concurrency", "0"], "--max-concurrency values must be >= 1"),
    (["--random-range-ratio", "1.5"], "--random-range-ratio must be in [0, 1)"),
    (["--dataset", "/nonexistent.jsonl"], "--dataset /nonexistent.jsonl: no such file"),
])
def test_bench_serve_bad_flags(args: list[str], message: str) -> None:
    proc = bench_serve(["--url", "http://127.0.0.1:9", *args], check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_stats_and_summary() -> None:
    s = stats([3.0, 1.0, 2.0, 10.0], 1e3)
    assert s["count"] == 4 and s["mean"] == pytest.approx(4000.0)
    assert s["p50"] == pytest.approx(2500.0) and s["p50"] <= s["p90"] <= s["p99"] <= 10000.0
    assert stats([]) == {"count": 0, "mean": 0.0, "std": 0.0, "p50": 0.0, "p90": 0.0,
                         "p99": 0.0}
    ok = RequestResult(True, prompt_len=5, output_len=3, ttft=0.1, latency=0.5,
                       itl=[0.2, 0.2])
    slow = RequestResult(True, prompt_len=5, output_len=3, ttft=0.3, latency=0.7,
                         itl=[0.2, 0.2])
    bad = [RequestResult(False, error="HTTP 503: busy") for _ in range(2)]
    r = summarize([ok, slow, *bad, RequestResult(False, error="boom")], 2.0,
                  parse_slo("ttft=200ms, tpot=0.25s"))
    assert (r["num_requests"], r["completed"], r["failed"]) == (5, 2, 3)
    assert r["errors"]["first"] == [{"message": "HTTP 503: busy", "count": 2},
                                    {"message": "boom", "count": 1}]
    assert r["total_output_tokens"] == 6 and r["output_throughput"] == 3.0
    assert r["tpot_ms"]["mean"] == pytest.approx(200.0)
    assert r["goodput"]["good_requests"] == 1 and r["goodput"]["request_goodput"] == 0.5
    assert parse_slo("e2el=2s,ttft=500us") == {"e2el": 2.0, "ttft": 0.0005}


def test_datasets(tmp_path: Path) -> None:
    fixed = synthetic_requests(5, 10, 4, vocab_size=50, seed=1)
    assert [len(r.prompt) for r in fixed] == [10] * 5 and {r.output_len for r in fixed} == {4}
    assert all(0 <= t < 50 for r in fixed for t in r.prompt)
    assert fixed == synthetic_requests(5, 10, 4, vocab_size=50, seed=1)
    ranged = synthetic_requests(200, 100, 20, range_ratio=0.5, seed=2)
    lens = [len(r.prompt) for r in ranged]
    assert 50 <= min(lens) < 60 and 140 < max(lens) <= 150
    assert all(10 <= r.output_len <= 30 for r in ranged)
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello"}\n\n{"prompt": [1, 2], "output_len": 7}\n')
    rows = jsonl_requests(f, 3, 5)
    assert [(r.prompt, r.output_len) for r in rows] == [("hello", 5), ([1, 2], 7),
                                                        ("hello", 5)]
    f.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"p.jsonl:2: expected an object with \"prompt\""):
        jsonl_requests(f, None, 5)


def test_load_points() -> None:
    points, param = load_points(parse_rates("1,inf"), [4])
    assert param == "request_rate"
    assert [(p.request_rate, p.max_concurrency) for p in points] == [(1.0, 4), (math.inf, 4)]
    points, param = load_points([math.inf], [1, 8])
    assert param == "max_concurrency" and [p.max_concurrency for p in points] == [1, 8]
    assert load_points([2.0], None)[1] is None


def test_compare_table() -> None:
    a = {"model": "llama", "output_tokens_per_s": 100.0, "ttft_s": {"p50": 0.5},
         "points": [{"x": 1}], "samples": [1, 2]}
    b = {"model": "llama", "output_tokens_per_s": 150.0, "ttft_s": {"p50": 0.25}, "new": 3}
    assert flatten(a) == {"model": "llama", "output_tokens_per_s": 100.0, "ttft_s.p50": 0.5,
                          "points[0].x": 1}
    lines = compare_table(a, b).splitlines()
    rows = {ln.split("|")[0].strip(): [c.strip() for c in ln.split("|")[1:]] for ln in lines}
    assert rows["output_tokens_per_s"] == ["100", "150", "1.500"]
    assert rows["ttft_s.p50"] == ["0.5", "0.25", "0.500"]
    assert rows["new"] == ["-", "3", ""] and rows["points[0].x"] == ["1", "-", ""]
    assert rows["model"] == ["llama", "llama", ""]


@pytest.mark.mpi
def test_offline_sweep_over_tp_pp_and_compare(tmp_path: Path) -> None:
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, "-m", "trtdist.cli", "bench", "tiny", "--sweep",
                           "tp-pp=1x1,2x1", "--num-requests", "3", "--input-len", "8",
                           "--output-len", "4", "--output", str(out)],
                          capture_output=True, text=True, cwd=ROOT, env=mpi_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sweep"] == {"parameter": "tp-pp", "values": ["1x1", "2x1"]}
    assert [(p["tp_size"], p["pp_size"]) for p in result["points"]] == [(1, 1), (2, 1)]
    for p in result["points"]:
        for key in ("ttft_s", "tpot_s", "itl_s", "e2el_s"):
            assert p[key]["count"] > 0 and 0 < p[key]["p50"] <= p[key]["p90"] <= p[key]["p99"]
        assert p["itl_s"]["count"] == 3 * 3 and p["e2el_s"]["count"] == 3
    assert result["plots"] == [str(tmp_path / "sweep_sweep.png")]
    with Image.open(result["plots"][0]) as im:
        assert im.format == "PNG"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result["points"][0]))
    b.write_text(json.dumps(result["points"][1]))
    cmp = subprocess.run([sys.executable, "-m", "trtdist.cli", "bench", "--compare", str(a),
                          str(b)], capture_output=True, text=True, cwd=ROOT)
    assert cmp.returncode == 0, cmp.stderr
    header, _, *rows = cmp.stdout.splitlines()
    assert header.split("|")[1].strip() == "a.json" and header.split("|")[2].strip() == "b.json"
    tp = next(r for r in rows if r.startswith("tp_size "))
    assert [c.strip() for c in tp.split("|")[1:3]] == ["1", "2"]
    assert any(r.startswith("itl_s.p99 ") for r in rows)


def test_offline_sweep_bad_spec() -> None:
    proc = subprocess.run([sys.executable, "-m", "trtdist.cli", "bench", "--sweep",
                           "batch=1,2"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 1
    assert "--sweep wants NAME=V1,V2,... with NAME one of max-batch-size" in proc.stderr


@pytest.mark.mpi
def test_bench_serve_starts_and_stops_its_own_server(tmp_path: Path) -> None:
    out = tmp_path / "own.json"
    proc = bench_serve(["tiny", "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                        "--warmup", "0", "--max-concurrency", "2", "--pp-size", "2",
                        "--max-batch-size", "8", "--slo", "ttft=60s,e2el=120000ms",
                        "--output", str(out)])
    assert "trtdist bench serve: starting" in proc.stderr
    result = json.loads(out.read_text())
    assert result["config"]["server"] == {
        "ranks": 2,
        "serve_args": ["tiny", "--max-batch-size", "8", "--tp-size", "1", "--pp-size", "2"]}
    assert result["model"] == "tiny" and result["plots"] == []
    check_point(result["points"][0], 3, 8, 4)
    port = int(result["url"].rsplit(":", 1)[1])
    with pytest.raises(httpx.ConnectError):  # stopped at the end
        httpx.get(f"http://127.0.0.1:{port}/health")


@pytest.mark.mpi
def test_bench_serve_reports_a_server_that_fails_to_start() -> None:
    proc = bench_serve(["--num-prompts", "1", "--num-kv-blocks", "1"], check=False)
    assert proc.returncode == 1
    assert "the server did not become ready (exit status" in proc.stderr
    assert "cannot hold one sequence" in proc.stderr  # the server's own message, passed on


def test_bench_serve_model_flags_need_no_url() -> None:
    proc = bench_serve(["--url", "http://127.0.0.1:9", "--tp-size", "2"], check=False)
    assert proc.returncode == 2
    assert "--tp-size 2: model and server flags only apply when bench serve starts" in proc.stderr
