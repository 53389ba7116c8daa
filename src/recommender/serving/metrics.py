"""Prometheus text exposition, written by hand: a few counters and one histogram family.

A dependency-free registry is enough for what the service exports, and keeping it in-process
makes every number testable. Each uvicorn worker keeps its own counts (scrape per worker).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Seconds; dense below 25 ms, where the latency targets are.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UNMATCHED = "(unmatched)"  # 404s on unknown paths share one label, so labels stay bounded


def _labels(**labels: str) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in labels.items()) + "}"


class Metrics:
    """Request counts by route and status, latency histograms by route, reload outcomes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], int] = defaultdict(int)
        self.buckets: dict[tuple[str, str], list[int]] = {}
        self.sums: dict[tuple[str, str], float] = defaultdict(float)
        self.reloads: dict[str, int] = defaultdict(int)
        self.fallbacks = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(method, route, str(status))] += 1
            counts = self.buckets.setdefault((method, route), [0] * (len(BUCKETS) + 1))
            counts[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.sums[(method, route)] += seconds

    def reload(self, result: str) -> None:
        with self._lock:
            self.reloads[result] += 1

    def fallback(self, n: int) -> None:
        with self._lock:
            self.fallbacks += n

    def render(self, model: dict[str, Any] | None) -> str:
        """The exposition text; `model` is ServedModel.info() or None before loading."""
        with self._lock:
            lines = list(self._render_requests())
            lines += [
                "# HELP recommender_reloads_total Admin reloads by outcome.",
                "# TYPE recommender_reloads_total counter",
                *(
                    f"recommender_reloads_total{_labels(result=r)} {n}"
                    for r, n in sorted(self.reloads.items())
                ),
                "# HELP recommender_fallback_total Users answered by the popularity fallback.",
                "# TYPE recommender_fallback_total counter",
                f"recommender_fallback_total {self.fallbacks}",
            ]
        lines += [
            "# HELP recommender_model_info The model version being served (value 1).",
            "# TYPE recommender_model_info gauge",
        ]
        if model is not None:
            labels = _labels(
                version=model["version"],
                model=model["model"],
                retrieval=model["retrieval"],
                config_digest=str(model["config_digest"]),
            )
            lines += [
                f"recommender_model_info{labels} 1",
                "# HELP recommender_model_items Items in the served catalog.",
                "# TYPE recommender_model_items gauge",
                f"recommender_model_items {model['n_items']}",
            ]
        return "\n".join(lines) + "\n"

    def _render_requests(self) -> Iterable[str]:
        yield "# HELP recommender_http_requests_total HTTP requests by route and status."
        yield "# TYPE recommender_http_requests_total counter"
        for (method, route, status), n in sorted(self.requests.items()):
            yield (
                "recommender_http_requests_total"
                f"{_labels(method=method, route=route, status=status)} {n}"
            )
        name = "recommender_http_request_duration_seconds"
        yield f"# HELP {name} Time from request start to response end, by route."
        yield f"# TYPE {name} histogram"
        for (method, route), counts in sorted(self.buckets.items()):
            cumulative = 0
            for le, count in zip([*map(str, BUCKETS), "+Inf"], counts, strict=True):
                cumulative += count
                yield f"{name}_bucket{_labels(method=method, route=route, le=le)} {cumulative}"
            yield f"{name}_sum{_labels(method=method, route=route)} {self.sums[(method, route)]}"
            yield f"{name}_count{_labels(method=method, route=route)} {cumulative}"


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

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", UNMATCHED)
            self.metrics.observe(scope["method"], path, status, time.perf_counter() - start)
