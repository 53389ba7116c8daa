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

For the same reason the requests go out over `CONNECTIONS` keep-alive HTTP/1.1 connections of
this module's own, fed from one queue, not through httpx: httpx's connection pool scans every
waiting request on each assignment, so a few hundred requests queued behind a one-second stall
made the client's own CPU climb (12 to 65 s over a 60 s load) and the queue grow for the rest of
the run while the service timed its requests in milliseconds (encode/httpcore#1035,
pydantic/httpx2#1075 describe the pool's cost). A request waiting for a free connection waits
in the queue, from its scheduled time, like any other queueing.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

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


# Keep-alive connections the load goes out on. A stalled worker holds the requests sent on its
# connections; the others keep taking new ones from the queue.
CONNECTIONS = 64


def _request_bytes(shot: Shot, host: str) -> bytes:
    """`shot` as one HTTP/1.1 request, ready to write."""
    body = shot.content if shot.content is not None else b""
    if shot.json is not None:
        body = json.dumps(shot.json).encode()
    head = (
        f"{shot.method} {quote(shot.url, safe='/?=&:%')} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Length: {len(body)}\r\n"
        + ("Content-Type: application/json\r\n" if body else "")
        + "\r\n"
    )
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """One response off the connection: (status, whether the server keeps it open)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    status = int(head[0].split(" ", 2)[1])
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in head[1:] if line)
    }
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")
    else:
        await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers.get("connection", "").lower() != "close"


async def _connection(
    host: str,
    port: int,
    queue: asyncio.Queue[tuple[int, float] | None],
    requests: list[bytes],
    results: list[tuple[float, int]],
    timeout_s: float,
) -> None:
    """Send queued requests one after another on one keep-alive connection, reconnecting
    after a close, an error or a time-out (the request then counts as dropped: status 0)."""
    loop = asyncio.get_running_loop()
    writer: asyncio.StreamWriter | None = None
    while (item := await queue.get()) is not None:
        index, scheduled = item
        status, keep = 0, False
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(requests[index])
            status, keep = await asyncio.wait_for(_read_response(reader), timeout_s)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            pass
        results[index] = ((loop.time() - scheduled) * 1e3, status)
        if not keep and writer is not None:
            writer.close()
            writer = None
    if writer is not None:
        writer.close()


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
    """Send `shots` at `rate` per second over CONNECTIONS connections; `during` runs alongside
    with an httpx client of its own (e.g. admin reloads)."""
    url = urlsplit(base_url)
    host, port = url.hostname or "127.0.0.1", url.port or 80
    requests = [_request_bytes(shot, url.netloc) for shot in shots]
    results: list[tuple[float, int]] = [(np.nan, 0)] * len(shots)
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    with _no_collector():
        async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s) as admin:
            loop = asyncio.get_running_loop()
            senders = [
                asyncio.create_task(_connection(host, port, queue, requests, results, timeout_s))
                for _ in range(CONNECTIONS)
            ]
            side = asyncio.create_task(during(admin)) if during else None
            start, cpu = loop.time(), time.process_time()
            for i in range(len(shots)):
                scheduled = start + i / rate
                delay = scheduled - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                queue.put_nowait((i, scheduled))
            for _ in senders:
                queue.put_nowait(None)
            await asyncio.gather(*senders)
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
