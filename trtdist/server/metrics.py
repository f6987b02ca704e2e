"""Prometheus metrics, named after vLLM's (prefix `trtdist:`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trtdist.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, label, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, label, registry=r).labels(model_name)

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, label, buckets=_LATENCY_BUCKETS,
                             registry=r).labels(model_name)

        self.running = gauge("trtdist:num_requests_running", "Requests in the running batch.")
        self.waiting = gauge("trtdist:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_used = gauge("trtdist:kv_cache_used_blocks", "KV blocks referenced by requests.")
        self.kv_total = gauge("trtdist:kv_cache_total_blocks", "KV blocks in the pool.")
        self.kv_usage = gauge("trtdist:kv_cache_usage_perc", "Fraction of KV blocks in use.")
        self.prefix_queries = counter("trtdist:prefix_cache_queries",
                                      "Prompt blocks looked up in the prefix cache.")
        self.prefix_hits = counter("trtdist:prefix_cache_hits",
                                   "Prompt blocks found in the prefix cache.")
        self.prefix_hit_rate = gauge("trtdist:prefix_cache_hit_rate",
                                     "Prefix cache hits over queries since start.")
        self.prompt_tokens = counter("trtdist:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("trtdist:generation_tokens", "Tokens generated.")
        self.preemptions = counter("trtdist:num_preemptions", "Requests preempted.")
        self.swapped = counter("trtdist:num_swapped_preemptions",
                               "Preemptions whose KV was swapped to host memory (the others "
                               "recompute it).")
        self.swap_used = gauge("trtdist:swap_space_used_blocks",
                               "Host swap slots holding preempted requests' KV blocks.")
        self.swap_total = gauge("trtdist:swap_space_total_blocks", "Host swap slots.")
        self.finished = Counter("trtdist:request_success", "Finished requests.",
                                ["model_name", "finished_reason"], registry=r)
        self.ttft = hist("trtdist:time_to_first_token_seconds", "Time to first token.")
        self.tpot = hist("trtdist:time_per_output_token_seconds", "Time per output token.")
        self.e2e = hist("trtdist:e2e_request_latency_seconds", "End-to-end request latency.")
        self.queue_time = hist("trtdist:request_queue_time_seconds",
                               "Time from arrival to first scheduling.")
        self.model_name = model_name
        self._last: dict[str, int] = {}

    def _delta(self, key: str, value: int) -> int:
        d = value - self._last.get(key, 0)
        self._last[key] = value
        return d

    def update_engine(self, running: int, waiting: int, used: int, total: int, queries: int,
                      hits: int, prompt_tokens: int, generation_tokens: int,
                      preemptions: int, swapped: int = 0, swap_used: int = 0,
                      swap_total: int = 0) -> None:
        """Called by the engine thread after each step with the engine's running totals."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_used.set(used)
        self.kv_total.set(total)
        self.kv_usage.set(used / total if total else 0.0)
        self.prefix_queries.inc(self._delta("q", queries))
        self.prefix_hits.inc(self._delta("h", hits))
        self.prefix_hit_rate.set(hits / queries if queries else 0.0)
        self.prompt_tokens.inc(self._delta("p", prompt_tokens))
        self.generation_tokens.inc(self._delta("g", generation_tokens))
        self.preemptions.inc(self._delta("pre", preemptions))
        self.swapped.inc(self._delta("swap", swapped))
        self.swap_used.set(swap_used)
        self.swap_total.set(swap_total)

    def request_aborted(self) -> None:
        self.finished.labels(self.model_name, "abort").inc()

    def request_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        reason = out.outputs[0].finish_reason or "abort"
        self.finished.labels(self.model_name, reason).inc()
        if m.ttft is not None:
            self.ttft.observe(m.ttft)
        if (tpot := m.time_per_output_token) is not None:
            self.tpot.observe(tpot)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        if m.scheduled_time is not None:
            self.queue_time.observe(m.scheduled_time - m.arrival_time)
