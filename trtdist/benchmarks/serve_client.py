"""The load generator of `trtdist bench serve`: streamed `/v1/completions` over httpx.

Requests arrive as a Poisson process at `request_rate` per second (inf: all at once), and at
most `max_concurrency` are in flight (None: no limit). Every request asks for `ignore_eos` and
`max_tokens = output_len` so it produces exactly that many tokens, and for
`stream_options.include_usage` so the token counts come from the server's usage chunk (a
server without it: one output token per text chunk, token-id prompts counted here).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
from tqdm.asyncio import tqdm

from trtdist.benchmarks.datasets import BenchRequest
from trtdist.benchmarks.metrics import RequestResult


@dataclass(frozen=True, slots=True)
class LoadPoint:
    """One point of a sweep: arrival rate (req/s, inf = all at once) and concurrency cap."""

    request_rate: float = math.inf
    max_concurrency: int | None = None

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")


def _error_message(body: bytes, status: int) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = body.decode(errors="replace")[:200]
    return f"HTTP {status}: {msg}"


async def send_request(client: httpx.AsyncClient, url: str, model: str | None,
                       req: BenchRequest) -> RequestResult:
    """Send one streamed completion; never raises: failures come back with `ok=False`."""
    body = {"prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if model is not None:
        body["model"] = model
    result = RequestResult(ok=False, start=time.perf_counter())
    last = result.start
    chunks, done, finished = 0, False, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                result.error = _error_message(await resp.aread(), resp.status_code)
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {obj['error'].get('message', obj['error'])}"
                    return result
                now = time.perf_counter()
                if obj.get("choices"):
                    choice = obj["choices"][0]
                    finished = finished or choice.get("finish_reason") is not None
                    if chunks == 0:
                        result.ttft = now - result.start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                if usage := obj.get("usage"):
                    result.prompt_len = int(usage["prompt_tokens"])
                    result.output_len = int(usage["completion_tokens"])
    except (httpx.HTTPError, httpx.StreamError, OSError, ValueError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return result
    result.latency = time.perf_counter() - result.start
    if not done or not finished:
        result.error = "the stream ended before its finish_reason and [DONE]"
    elif chunks == 0:
        result.error = "the stream carried no output"
    else:
        if result.output_len == 0:
            # NOTE: a server that ignores stream_options.include_usage: one token a chunk
            result.output_len = chunks
            result.prompt_len = len(req.prompt) if isinstance(req.prompt, list) else 0
        result.ok = True
    return result


async def run_load(url: str, model: str | None, requests: Sequence[BenchRequest],
                   point: LoadPoint, *, seed: int = 0, progress: bool = True,
                   desc: str = "") -> tuple[list[RequestResult], float]:
    """Send `requests` at `point`'s load; returns their results (in order) and the wall time
    from the first send to the last response."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(point.max_concurrency) if point.max_concurrency else None
    limits = httpx.Limits(max_connections=point.max_concurrency or len(requests) or 1,
                          max_keepalive_connections=point.max_concurrency or 64)
    timeout = httpx.Timeout(None, connect=30.0)
    bar = tqdm(total=len(requests), desc=desc or None, disable=not progress, unit="req")

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def one(req: BenchRequest) -> RequestResult:
            if sem is None:
                r = await send_request(client, url, model, req)
            else:
                async with sem:
                    r = await send_request(client, url, model, req)
            bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for i, req in enumerate(requests):
            if i and math.isfinite(point.request_rate):
                # NOTE: Poisson arrivals: exponential gaps with mean 1 / rate.
                await asyncio.sleep(rng.expovariate(point.request_rate))
            tasks.append(asyncio.create_task(one(req)))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
    bar.close()
    return results, duration
