"""Prometheus metrics: request counts and latency by route, reloads, the model each worker serves.

They are prometheus_client metrics in a registry of the app's own, so every app (and every
test) starts from zero. With `--workers N`, `serve` sets PROMETHEUS_MULTIPROC_DIR before the
workers start: each worker then writes its values to its own file in that folder, and a
scrape of `/metrics`, whichever worker answers it, adds up the files of all of them
(prometheus_client's multiprocess mode). The model gauges keep one series per worker there
(a `pid` label), so a scrape shows whether the workers agree on the model.
"""

from __future__ import annotations

import glob
import os
import re
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as mp
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds; dense below 25 ms, where the latency targets are.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UNMATCHED = "(unmatched)"  # 404s on unknown paths share one label, so labels stay bounded
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MODEL_LABELS = ("version", "model", "retrieval", "config_digest")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _model_labels(info: dict[str, Any]) -> list[str]:
    return [str(info[name]) for name in MODEL_LABELS]


class Metrics:
    """Request counts by route and status, latency histograms by route, reload outcomes, and
    the served model; `in_flight` counts requests started and not yet answered (the drain
    after SIGTERM waits for it to reach zero)."""

    def __init__(self) -> None:
        # Set at import time by prometheus_client: values go to files only if it was set then.
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV)
        disable_created_metrics()  # no `_created` series: one per label set, read by no one
        self.registry = CollectorRegistry(auto_describe=True)
        self.in_flight = 0
        self.requests = Counter(
            "recommender_http_requests",
            "HTTP requests by route and status.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recommender_http_request_duration_seconds",
            "Time from request start to response end, by route.",
            ["method", "route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.reloads = Counter(
            "recommender_reloads",
            "Model reloads by outcome (admin, another worker's, or a new best.pt).",
            ["result"],
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "recommender_fallback",
            "Users answered by the popularity fallback.",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "recommender_model_info",
            "The model version being served (1; 0 for one served before).",
            MODEL_LABELS,
            multiprocess_mode="liveall",
            registry=self.registry,
        )
        self.model_items = Gauge(
            "recommender_model_items",
            "Items in the served catalog.",
            multiprocess_mode="liveall",
            registry=self.registry,
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def fallback(self, n: int) -> None:
        if n:
            self.fallbacks.inc(n)

    def serving(self, new: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        """Record a swap from `old` to `new` (ServedModel.info() each)."""
        if old is not None and _model_labels(old) != _model_labels(new):
            if self.multiproc_dir:  # a series in a worker's file cannot be removed, only zeroed
                self.model_info.labels(*_model_labels(old)).set(0)
            else:
                self.model_info.remove(*_model_labels(old))
        self.model_info.labels(*_model_labels(new)).set(1)
        self.model_items.set(new["n_items"])

    def render(self) -> bytes:
        """The exposition text: this app's metrics, or every worker's in multiprocess mode."""
        if not self.multiproc_dir:
            return generate_latest(self.registry)
        _forget_dead_workers(self.multiproc_dir)
        registry = CollectorRegistry()
        mp.MultiProcessCollector(registry, path=self.multiproc_dir)
        return generate_latest(registry)

    def worker_stopped(self) -> None:
        """Drop this worker's live gauges (its counts stay in the totals)."""
        if self.multiproc_dir:
            mp.mark_process_dead(os.getpid(), self.multiproc_dir)


def _forget_dead_workers(path: str) -> None:
    """Live gauges of workers that died without stopping (killed by the supervisor or the
    kernel): their files would otherwise report a model nobody serves."""
    for name in glob.glob(os.path.join(path, "gauge_live*_*.db")):
        found = re.search(r"_(\d+)\.db$", name)
        if found is None:
            continue
        pid = int(found.group(1))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            mp.mark_process_dead(pid, path)
        except PermissionError:  # alive, someone else's: not one of ours, leave it
            continue


class MetricsMiddleware:
    """Pure ASGI middleware (no per-request task, unlike BaseHTTPMiddleware) timing requests.

    The route label is the matched path template (`/v1/items/{item_id}/similar`), read from
    the scope after routing, so raw ids never become label values.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight -= 1
            route = scope.get("route")
            path = getattr(route, "path", UNMATCHED)
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - start)
