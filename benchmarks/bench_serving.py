"""Serving benchmark: latency at a fixed rate, throughput at p99 <= 50 ms, bad-input load with
reloads, and two-stage recall; the real service against a naive one, in the same run.

Two catalogs: a trained ml-100k run (`--run`) and a synthetic 1,000,000-item NeuMF with
constructed weights (benchmarks/serving_synthetic.py). Every server is the real process
(`recommender serve`, one uvicorn worker) on 127.0.0.1, driven by an open-loop asyncio client
(benchmarks/serving_load.py) on the same machine, so client and server share the cores.

    PYTHONPATH=src python benchmarks/bench_serving.py --run runs/demo --out serving.json

Request counts are bounded, so the whole benchmark ends by itself (about 5 minutes on 2 cores).
`--sessions` adds rounds of session lists (`session_item_ids`, a known user's too where the run
reads recent items) at the same rate:

    PYTHONPATH=src python benchmarks/bench_serving.py --run runs/sasrec --sessions --skip-big
`--smoke` trains a tiny run and goes through every step with a few requests each, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

import recommender
from recommender.checkpoint import load_best
from recommender.serving import ServeSettings
from recommender.serving.engine import ServedModel
from serving_load import Shot, run_fixed_rate, serving_versions
from serving_synthetic import second_version, write_synthetic_run
from smoke import add_arguments, folder, tiny_run

HERE = Path(__file__).resolve().parent
TOKEN = "bench-token"
P99_BUDGET_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    cmd: list[str], port: int, timeout_s: float = 180.0, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start a service; its output goes to `log` (appended), else nowhere."""
    src = str(Path(recommender.__file__).resolve().parents[1])
    env = {**os.environ, "RECOMMENDER_ADMIN_TOKEN": TOKEN, "PYTHONPATH": src}
    with open(log or os.devnull, "ab") as out:  # the service keeps its own copy
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # `stop` reaches its workers through the group
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise RuntimeError(f"{cmd} not ready after {timeout_s} s")


def stop(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM, as an orchestrator would; how long the drain and exit took."""
    t = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    return {"exit_code": code, "exit_seconds": round(time.perf_counter() - t, 2)}


def user_shots(users: np.ndarray, n: int, rng: np.random.Generator) -> list[Shot]:
    return [Shot("GET", f"/v1/users/{u}/recommendations?k=10") for u in rng.choice(users, size=n)]


def session_shots(
    users: np.ndarray, items: np.ndarray, n: int, rng: np.random.Generator, known: bool
) -> list[Shot]:
    """Top-10 lists after 3 recent items: anonymous sessions, or (`known`) a known user's."""
    shots = []
    for _ in range(n):
        body: dict[str, Any] = {"session_item_ids": [str(i) for i in rng.choice(items, 3)], "k": 10}
        if known:
            body["user_ids"] = [str(rng.choice(users))]
        shots.append(Shot("POST", "/v1/recommendations", json=body, kind="session"))
    return shots


def session_rounds(
    base: str, users: np.ndarray, items: np.ndarray, args: argparse.Namespace,
    rng: np.random.Generator,
) -> dict[str, Any]:  # fmt: skip
    """--rounds rounds of --requests session lists at --rate, after a warm-up: anonymous
    sessions, then a known user's recent items where the run reads them (model.context or
    sasrec; any other run answers such a request 409)."""
    probe = session_shots(users, items, 1, rng, known=True)[0].json
    reads_recent = httpx.post(f"{base}/v1/recommendations", json=probe).status_code == 200
    out: dict[str, Any] = {}
    for kind in ("session", "user_after") if reads_recent else ("session",):
        known = kind == "user_after"
        fixed(base, session_shots(users, items, min(200, args.requests), rng, known), args.rate)
        rounds = [
            fixed(base, session_shots(users, items, args.requests, rng, known), args.rate)
            for _ in range(args.rounds)
        ]
        out[f"{kind}_rounds"] = rounds
        for stat in ("p50_ms", "p99_ms"):
            out[f"{kind}_{stat[:3]}_median_ms"] = float(np.median([r[stat] for r in rounds]))
    return out


def mixed_shots(
    users: np.ndarray, items: np.ndarray, n: int, rng: np.random.Generator, explain: bool = True
) -> list[Shot]:
    """The traffic of the reliability test: mostly good requests of every kind, 10% bad.

    10% batches of 9 users (one unknown), 5% anonymous sessions, 5% scores, 5% similar items,
    15% lists with explanations (plain lists without `explain`), the rest plain lists.
    """
    bad = [
        Shot("GET", f"/v1/users/{users[0]}/recommendations?k=0", bad=True),
        Shot("GET", f"/v1/users/{users[0]}/recommendations?k=abc", bad=True),
        Shot("POST", "/v1/recommendations", content=b'{"user_ids": ["1"', bad=True),
        Shot("POST", "/v1/recommendations", json={"user_ids": [1, 2]}, bad=True),
        Shot("POST", "/v1/recommendations", json={"session_item_ids": ["no-such"]}, bad=True),
        Shot("POST", "/v1/recommendations", json={"user_ids": ["x"] * 10_000}, bad=True),
        Shot("POST", "/v1/score", json={"pairs": [{"user_id": "1"}]}, bad=True),
        Shot("GET", "/v1/items/no-such-item/similar", bad=True),
    ]
    bad = [Shot(b.method, b.url, b.json, b.content, True, "bad") for b in bad]
    shots = []
    for kind in rng.random(n):
        if kind < 0.10:
            shots.append(bad[rng.integers(len(bad))])
        elif kind < 0.20:
            batch = [str(u) for u in rng.choice(users, 8)] + ["unknown-user"]
            shots.append(
                Shot("POST", "/v1/recommendations", json={"user_ids": batch}, kind="batch")
            )
        elif kind < 0.25:
            session = {"session_item_ids": [str(i) for i in rng.choice(items, 3)]}
            shots.append(Shot("POST", "/v1/recommendations", json=session, kind="session"))
        elif kind < 0.30:
            pairs = [{"user_id": str(u), "item_id": str(i)} for u, i in zip(
                rng.choice(users, 5), rng.choice(items, 5), strict=True)]  # fmt: skip
            shots.append(Shot("POST", "/v1/score", json={"pairs": pairs}, kind="score"))
        elif kind < 0.35:
            shots.append(Shot("GET", f"/v1/items/{rng.choice(items)}/similar?k=10", kind="similar"))
        elif kind < 0.50 and explain:
            url = f"/v1/users/{rng.choice(users)}/recommendations?k=10&explain=true"
            shots.append(Shot("GET", url, kind="explain"))
        else:
            shots.append(Shot("GET", f"/v1/users/{rng.choice(users)}/recommendations?k=10"))
    return shots


def reloads(
    run_dirs: list[Path], at_s: list[float]
) -> Callable[[httpx.AsyncClient], Coroutine[Any, Any, dict[str, Any]]]:
    """Admin reloads at these seconds into the load, one after the other, of `run_dirs` in
    turn; their statuses (0: no answer in 600 s) and when each began and ended, in seconds into
    the load (a 1M-item version takes half a minute or more to build on a busy machine)."""

    async def during(client: httpx.AsyncClient) -> dict[str, Any]:
        codes, spans = [], []
        start = time.monotonic()
        for when, run_dir in zip(at_s, itertools.cycle(run_dirs), strict=False):
            await asyncio.sleep(max(0.0, when - (time.monotonic() - start)))
            began = time.monotonic() - start
            try:
                response = await client.post(
                    "/admin/reload",
                    headers={"Authorization": f"Bearer {TOKEN}"},
                    json={"run_dir": str(run_dir)},
                    timeout=600,
                )
                codes.append(response.status_code)
            except httpx.HTTPError:
                codes.append(0)
            spans.append([round(began, 1), round(time.monotonic() - start, 1)])
        return {"reload_statuses": codes, "reload_spans_s": spans}

    return during


def fixed(base: str, shots: list[Shot], rate: float, **kw: Any) -> dict[str, Any]:
    return asyncio.run(run_fixed_rate(base, shots, rate, **kw)).summary()


def ramp(
    base: str, users: np.ndarray, rates: list[float], seconds: float, rng: np.random.Generator
) -> dict[str, Any]:
    """Raise the rate until p99 exceeds the budget or anything fails; the last rate that held
    is the throughput at p99 <= 50 ms."""
    steps, best = [], None
    for rate in rates:
        step = fixed(base, user_shots(users, int(rate * seconds), rng), rate)
        steps.append(step)
        if step["p99_ms"] > P99_BUDGET_MS or step["ok"] < step["requests"]:
            break
        best = step["throughput"]
    return {"throughput_at_p99_50ms": best, "steps": steps}


def recall(run_dir: Path, users: np.ndarray, settings: ServeSettings) -> dict[str, Any]:
    """The two-stage answer's share of the exact top-10 (history excluded in both).

    Re-ranking is exact, so this is also the candidate stage's recall of the exact top-10.
    """
    with tempfile.TemporaryDirectory() as indexes:
        served = ServedModel.load(run_dir, settings, Path(indexes), beside=False)
    users_list = [str(u) for u in users]
    t = time.perf_counter()
    exact, _ = served.rec.recommend(users_list, k=10)
    exact_ms = (time.perf_counter() - t) / len(users) * 1e3
    t = time.perf_counter()
    approx = [served.recommend([u], 10, True)[0].item_ids for u in users_list]
    approx_ms = (time.perf_counter() - t) / len(users) * 1e3
    hits = [len(set(e) & set(a)) / 10 for e, a in zip(exact, approx, strict=True)]
    out = {
        "recall_at_10": round(float(np.mean(hits)), 4),
        "users": len(users),
        "candidates": settings.ann_candidates,
        "nprobe": settings.ann_nprobe,
        "exact_ms_per_user_in_process": round(exact_ms, 2),
        "two_stage_ms_per_user_in_process": round(approx_ms, 2),
        "load_seconds": served.load_seconds,
    }
    if served.neighbours is None:
        return out
    # Similar items the same way: the item index's re-ranked candidates against the exact
    # top-10 by cosine over the whole catalog.
    items = [str(i) for i in served.rec.items.ids[: len(users)]]
    exact_items = [served.rec.similar_items(i, 10)[0] for i in items]
    t = time.perf_counter()
    approx = [served.similar(i, 10).item_ids for i in items]
    similar_ms = (time.perf_counter() - t) / len(items) * 1e3
    hits = [len(set(e) & set(a)) / 10 for e, a in zip(exact_items, approx, strict=True)]
    return out | {
        "similar_recall_at_10": round(float(np.mean(hits)), 4),
        "similar_nprobe": settings.ann_item_nprobe,
        "similar_two_stage_ms_in_process": round(similar_ms, 2),
    }


def explain_in_process(run_dir: Path, users: np.ndarray) -> dict[str, Any]:
    """Top-10 with explanations per user in the library, as the service computes it: the
    first list of each user (fold-in and path), then the next ten items (the kept fold's
    solves), then the first list again (the explained items looked up)."""
    with tempfile.TemporaryDirectory() as indexes:  # ml-100k: no index is built
        served = ServedModel.load(run_dir, ServeSettings(), Path(indexes), beside=False)
    lists = {str(u): served.recommend([str(u)], 20, True)[0].item_ids for u in users}

    def timed(part: slice) -> list[float]:
        ms = []
        for user, items in lists.items():
            t = time.perf_counter()
            served.explain_many(user, items[part])
            ms.append((time.perf_counter() - t) * 1e3)
        return ms

    first, kept, again = timed(slice(10)), timed(slice(10, 20)), timed(slice(10))
    return {
        "users": len(lists),
        "first_p50_ms": round(float(np.percentile(first, 50)), 2),
        "first_p99_ms": round(float(np.percentile(first, 99)), 2),
        "kept_fold_p50_ms": round(float(np.percentile(kept, 50)), 2),
        "kept_fold_p99_ms": round(float(np.percentile(kept, 99)), 2),
        "explained_before_p50_ms": round(float(np.percentile(again, 50)), 3),
        "explained_before_p99_ms": round(float(np.percentile(again, 99)), 3),
    }


def server_buckets(base: str) -> dict[str, float]:
    """Requests the service timed above each bucket bound (seconds) so far, every route and
    worker together, from its /metrics histogram: what the server saw, without the client's
    own delays or the listen queue."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    below: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("recommender_http_request_duration_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            below[le] = below.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    total = below.get("+Inf", 0.0)
    return {le: total - n for le, n in below.items() if le != "+Inf"}


def all_workers_ready(base: str, workers: int, timeout_s: float = 900) -> float:
    """Seconds until `workers` workers serve a model (the first one answers /readyz before
    the others have loaded a large catalog)."""
    start = time.monotonic()
    while len(serving_versions(httpx.get(f"{base}/metrics").text)) < workers:
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"{workers} workers not serving in {timeout_s} s")
        time.sleep(0.5)
    return round(time.monotonic() - start, 1)


def explained_ahead(base: str, timeout_s: float = 900) -> float:
    """Seconds until the service has explained its most active users' lists ahead of their
    requests (ServedModel.warm_explanations), from when it answers: the measurements start
    after, as a deployment would send traffic once its workers are warm."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        ahead = httpx.get(f"{base}/v1/model").json()["explained_ahead"]
        if ahead["users"] >= ahead["of"]:
            return round(time.monotonic() - start, 1)
        time.sleep(0.5)
    raise TimeoutError(f"explanations ahead of requests not done in {timeout_s} s")


def scenario(
    label: str,
    run_dir: Path,
    args: argparse.Namespace,
    rng: np.random.Generator,
    *,
    naive_requests: int,
    ramp_rates: list[float],
    naive_ramp_rates: list[float],
    load_rate: float,
    explain: bool,
) -> dict[str, Any]:
    """Plain top-10 lists at --rate for --rounds rounds, the ramp, the mixed load at
    `load_rate` with two reloads during it (with explained lists where `explain`), and the
    naive service for scale (--skip-ramp and --skip-naive leave those out)."""
    ckpt = load_best(run_dir)
    users = ckpt.user_ids[:20_000]
    items = ckpt.item_ids[rng.integers(ckpt.n_items, size=1000)]
    del ckpt
    out: dict[str, Any] = {"label": label, "run_dir": str(run_dir)}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "recommender", "serve", "--run", str(run_dir)]
    cmd += ["--workers", str(args.workers)]
    proc = start([*cmd, "--port", str(port)], port, log=args.server_log)
    tmp = tempfile.mkdtemp(prefix="bench_serving_")
    try:
        out["model"] = httpx.get(f"{base}/v1/model").json()
        out["all_workers_s"] = all_workers_ready(base, args.workers)
        out["explained_ahead_s"] = explained_ahead(base)
        fixed(base, user_shots(users, min(200, args.requests), rng), args.rate)  # warm-up
        rounds = [
            fixed(base, user_shots(users, args.requests, rng), args.rate)
            for _ in range(args.rounds)
        ]
        out["service_rounds"] = rounds
        out["service_p50_median_ms"] = float(np.median([r["p50_ms"] for r in rounds]))
        out["service_p99_median_ms"] = float(np.median([r["p99_ms"] for r in rounds]))
        if args.sessions:
            out |= session_rounds(base, users, items, args, rng)
        if not args.skip_ramp:
            out["service_ramp"] = ramp(base, users, ramp_rates, args.step_seconds, rng)
        shots = mixed_shots(users, items, args.load_requests, rng, explain)
        span = len(shots) / load_rate
        targets = [run_dir]
        if args.new_versions:  # another version first, then back: each reload loads anew
            targets = [second_version(run_dir, Path(tmp) / "b"), run_dir]
        before = server_buckets(base)
        out["load_test"] = fixed(
            base, shots, load_rate, during=reloads(targets, [span / 3, 2 * span / 3])
        )
        after = server_buckets(base)
        out["load_test"]["server_side_over_s"] = {le: after[le] - before.get(le, 0) for le in after}
    finally:
        out["service_stop"] = stop(proc)
        shutil.rmtree(tmp)
    if args.skip_naive:
        return out
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    naive = [sys.executable, str(HERE / "serving_naive.py"), "--run", str(run_dir)]
    proc = start([*naive, "--port", str(port)], port)
    try:
        fixed(base, user_shots(users, min(50, naive_requests), rng), args.rate, timeout_s=120)
        out["naive_fixed"] = fixed(
            base, user_shots(users, naive_requests, rng), args.rate, timeout_s=120
        )
        if naive_ramp_rates:
            out["naive_ramp"] = ramp(base, users, naive_ramp_rates, args.step_seconds, rng)
    finally:
        out["naive_stop"] = stop(proc)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="a trained ml-100k run directory (required)")
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--requests", type=int, default=3000, help="at the fixed rate")
    parser.add_argument("--rounds", type=int, default=3, help="of --requests at --rate")
    parser.add_argument("--step-seconds", type=float, default=3.0, help="per ramp step")
    parser.add_argument("--load-requests", type=int, default=3000)
    parser.add_argument("--load-rate", type=float, default=100.0, help="ml-100k mixed load")
    parser.add_argument("--big-load-rate", type=float, default=200.0, help="1M mixed load")
    parser.add_argument("--big-items", type=int, default=1_000_000)
    parser.add_argument("--big-run", help="reuse or create the synthetic run here")
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--skip-small", action="store_true", help="only the 1M catalog")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers of the service")
    parser.add_argument(
        "--new-versions",
        action="store_true",
        help="the mixed load's reloads swap in another version (the same weights, a later "
        "training time) and back, instead of reloading the same best.pt",
    )
    parser.add_argument("--skip-ramp", action="store_true")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--sessions",
        action="store_true",
        help="also --rounds of session lists at --rate: anonymous, and a known user's recent "
        "items for a run that reads them (model.context, sasrec)",
    )
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--server-log", type=Path, help="append the service's output here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.smoke:
        if args.run is None:
            parser.error("--run is required (or --smoke)")
        measure(args)
        return
    with folder(args.smoke_dir) as where:
        args.run, args.big_run, args.out = tiny_run(where), where / "big", where / "serving.json"
        args.rate, args.requests, args.step_seconds, args.rounds = 100.0, 30, 0.1, 2
        args.sessions = True
        args.load_requests, args.load_rate, args.big_items = 60, 60.0, 3_000
        args.big_load_rate = 60.0
        logging.getLogger("httpx").setLevel(logging.WARNING)  # training turned INFO logs on
        measure(args)


def measure(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    torch.set_num_threads(ServeSettings().threads)  # in-process timings as the service runs
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}

    small = Path(args.run)
    if not args.skip_small:
        results["ml100k"] = scenario(
            "ml-100k", small, args, rng, naive_requests=args.requests,
            ramp_rates=[200, 400, 600, 800, 1000, 1200], naive_ramp_rates=[200, 400, 600, 800],
            load_rate=args.load_rate, explain=True,
        )  # fmt: skip
        users = load_best(small).user_ids
        results["ml100k_explain"] = explain_in_process(small, rng.choice(users, 100, False))
        forced = ServeSettings(ann_threshold=0, ann_candidates=200, ann_nprobe=16)
        results["ml100k_two_stage_recall"] = recall(small, rng.choice(users, 300), forced)

    if not args.skip_big:
        with tempfile.TemporaryDirectory(prefix="bench_serving_") as tmp:
            big = Path(args.big_run) if args.big_run else Path(tmp) / "big"
            if not (big / "best.pt").is_file():
                t = time.perf_counter()
                write_synthetic_run(big, n_items=args.big_items)
                results["big_build_seconds"] = round(time.perf_counter() - t, 1)
            results["big"] = scenario(
                f"synthetic {args.big_items:,} items", big, args, rng, naive_requests=20,
                ramp_rates=[200, 400, 600], naive_ramp_rates=[],
                load_rate=args.big_load_rate, explain=False,
            )  # fmt: skip
            big_users = np.array([f"u{u}" for u in rng.integers(20_000, size=100)])
            results["big_two_stage_recall"] = recall(big, big_users, ServeSettings())
    results["load_avg_end"] = os.getloadavg()
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
