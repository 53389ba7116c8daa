"""An open-loop load generator on loopback: requests leave on a fixed schedule, whatever the
server's pace, and latency is measured from the scheduled send time.

Measuring from the schedule (not from when the client got round to sending) keeps queueing
in the numbers: a server that falls behind shows it in p99 instead of silently slowing the
client down (coordinated omission).

The client's own pauses would count too, so its cyclic garbage collector is off while it sends
(`_no_collector`): a full collection of the benchmark process (numpy, httpx, the requests'
tasks) took about 100 ms, and the 20 requests scheduled meanwhile showed it as server latency
(ml-100k lists at 200/s: p99 54-109 ms in the rounds where it fell, 5-7 ms in the others,
while a probe thread in the server saw no pause).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np


@dataclass(frozen=True)
class Shot:
    """One request; `bad` marks a deliberately malformed one, which must get a 4xx; `kind`
    names the endpoint (or use) it stands for in the per-kind figures."""

    method: str
    url: str
    json: Any = None
    content: bytes | None = None
    bad: bool = False
    kind: str = "list"


def _latency(ms: np.ndarray) -> dict[str, float]:
    ms = ms if len(ms) else np.array([np.nan])
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p90_ms": round(float(np.percentile(ms, 90)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "max_ms": round(float(ms.max()), 2),
    }


TIMELINE_S = 2.0  # seconds of sending per window of `p99_ms_by_window`


@dataclass
class Outcome:
    rate: float
    latencies_ms: np.ndarray
    statuses: list[int]  # 0 = dropped: connection error or timeout, no HTTP answer
    bad: list[bool]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    kinds: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Latency of the well-formed requests answered 200 (all of them, and per kind when
        the load mixes kinds; a malformed request's latency is its kind "bad"), and counts."""
        statuses = np.array(self.statuses)
        bad = np.array(self.bad)
        ok = statuses == 200
        kinds = np.array(self.kinds)
        per_kind = {
            str(kind): {
                "requests": int((kinds == kind).sum()),
                **_latency(self.latencies_ms[(kinds == kind) & (ok | bad) & (statuses > 0)]),
                "5xx": int(((kinds == kind) & (statuses >= 500)).sum()),
                "dropped": int(((kinds == kind) & (statuses == 0)).sum()),
            }
            for kind in sorted(set(self.kinds))
        }
        return {
            "rate": self.rate,
            "requests": len(statuses),
            "throughput": round(len(statuses) / self.seconds, 1),
            **_latency(self.latencies_ms[ok & ~bad]),
            **({"by_kind": per_kind} if len(per_kind) > 1 else {}),
            "ok": int(ok.sum()),
            "4xx": int(((statuses >= 400) & (statuses < 500)).sum()),
            "5xx": int((statuses >= 500).sum()),
            "dropped": int((statuses == 0).sum()),
            "bad_sent": int(bad.sum()),
            "bad_not_4xx": int((bad & ~((statuses >= 400) & (statuses < 500))).sum()),
            "good_not_200": int((~bad & ~ok).sum()),
            **self._between_reloads(ok, bad & (statuses > 0), kinds),
            **self.extra,
        }

    def _between_reloads(
        self, ok: np.ndarray, bad: np.ndarray, kinds: np.ndarray
    ) -> dict[str, Any]:
        """With `reload_spans_s` in `extra` ([start, end] seconds into the load): p99 per kind
        of the requests sent outside every reload, which tells a reload's cost from the rest.
        `ok`: answered 200; `bad`: malformed and answered."""
        spans = self.extra.get("reload_spans_s")
        if not spans:
            return {}
        sent = np.arange(len(ok)) / self.rate  # each shot's scheduled send time
        outside = np.ones(len(ok), dtype=bool)
        for begin, end in spans:
            outside &= (sent < begin) | (sent > end)
        answered = outside & (ok | bad)
        window = (sent // TIMELINE_S).astype(int)
        return {
            "outside_reloads": {
                "requests": int(outside.sum()),
                **_latency(self.latencies_ms[answered & ~bad]),
                "p99_by_kind_ms": {
                    str(kind): _latency(self.latencies_ms[answered & (kinds == kind)])["p99_ms"]
                    for kind in sorted(set(self.kinds))
                },
            },
            # When the tail happened: p99 of every request sent in each TIMELINE_S window.
            "p99_ms_by_window": [
                _latency(self.latencies_ms[(window == w) & (ok | bad)])["p99_ms"]
                for w in range(int(window.max()) + 1)
            ],
        }


async def _fire(client: httpx.AsyncClient, shot: Shot, scheduled: float) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    try:
        response = await client.request(
            shot.method, shot.url, json=shot.json, content=shot.content,
            headers={"content-type": "application/json"} if shot.content is not None else None,
        )  # fmt: skip
        status = response.status_code
    except httpx.HTTPError:
        status = 0
    return (loop.time() - scheduled) * 1e3, status


@contextlib.contextmanager
def _no_collector() -> Iterator[None]:
    """The cyclic garbage collector off, what exists frozen out of its reach, for a load's
    span; a collection and the previous state afterwards. Reference counting still frees."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
        gc.collect()


async def run_fixed_rate(
    base_url: str,
    shots: list[Shot],
    rate: float,
    timeout_s: float = 10.0,
    during: Callable[[httpx.AsyncClient], Coroutine[Any, Any, dict[str, Any]]] | None = None,
) -> Outcome:
    """Send `shots` at `rate` per second; `during` runs alongside (e.g. an admin reload)."""
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    client = httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s)
    with _no_collector():
        async with client:
            loop = asyncio.get_running_loop()
            side = asyncio.create_task(during(client)) if during else None
            start, cpu = loop.time(), time.process_time()
            tasks = []
            for i, shot in enumerate(shots):
                scheduled = start + i / rate
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(_fire(client, shot, scheduled)))
            results = await asyncio.gather(*tasks)
            seconds = loop.time() - start
            extra = await side if side else {}
            # The client's own CPU: on a machine it shares with the service, a client near a
            # whole core is part of the latency it measures.
            extra["client_cpu_s"] = round(time.process_time() - cpu, 1)
    return Outcome(
        rate,
        np.array([r[0] for r in results]),
        [r[1] for r in results],
        [s.bad for s in shots],
        seconds,
        extra,
        [s.kind for s in shots],
    )


def serving_versions(metrics: str) -> dict[str, str]:
    """pid -> version each live worker serves, from the service's aggregated /metrics text."""
    out = {}
    for line in metrics.splitlines():
        if line.startswith("recommender_model_info{") and line.endswith("} 1.0"):
            labels = dict(p.split("=", 1) for p in line[line.index("{") + 1 : -5].split(","))
            # one worker: no multiprocess mode, so no pid label
            out[labels.get("pid", "").strip('"')] = labels["version"].strip('"')
    return out
