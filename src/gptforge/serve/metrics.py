"""Prometheus metrics of the server (`GET /metrics`), in a registry of the app's own.

Counters: HTTP requests by endpoint and status, prompt tokens, generated tokens. Gauges: sequences running
(one per completion choice, holding a KV-cache row) and waiting. Histograms: time to first token and time per
output token (seconds; vLLM's names without its prefix). Requires `prometheus_client` (the [serve] extra).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gptforge.generate.scheduler import Engine, Output
from gptforge.serve.streams import Timing

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
             "/detokenize", "/tokenizer_info", "/")
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)


class ServerMetrics:
    """The server's metrics; `observe` is the per-choice timing callback (runs in the engine's thread)."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gptforge_http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gptforge_prompt_tokens", "Prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("gptforge_generation_tokens", "Tokens generated", registry=r)
        running = Gauge("gptforge_requests_running", "Sequences decoding (one per choice)", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting = Gauge("gptforge_requests_waiting", "Sequences queued for a free row", registry=r)
        waiting.set_function(lambda: engine.num_waiting)
        self.ttft = Histogram("gptforge_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("gptforge_time_per_output_token_seconds", "Mean gap between a choice's tokens",
                              buckets=_TPOT_BUCKETS, registry=r)

    def count_request(self, path: str, status: int) -> None:
        self.requests.labels(path if path in ENDPOINTS else "other", str(status)).inc()

    def observe(self, timing: Timing, out: Output) -> None:
        """Record a choice's token (and, at its end, its mean time per output token)."""
        if out.token is not None:
            now = timing.last_token = time.monotonic()
            timing.n_tokens += 1
            self.generation_tokens.inc()
            if timing.first_token is None:
                timing.first_token = now
                self.ttft.observe(now - timing.arrival)
        if out.finish_reason is not None and timing.n_tokens > 1:
            self.tpot.observe((timing.last_token - timing.first_token) / (timing.n_tokens - 1))
