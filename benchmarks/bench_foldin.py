"""Fold-in benchmark: how long a top-10 takes for a user the model has never seen, sent with
the --history items they interacted with, in the library and through the real service.

The histories are real: --history items drawn from one trained user's own history each, so
they hang together as a live user's would. The library figure times `Recommender.recommend`
with `histories=` (fold-in, catalog scoring, top-k), one user per call, against the same call
for a trained user; the service figure is `POST /v1/recommendations` with `histories` at a
fixed rate through `recommender serve` (one worker, one torch thread) on 127.0.0.1, client on
the same machine.

    PYTHONPATH=src python benchmarks/bench_foldin.py --run runs/demo --out foldin.json
    PYTHONPATH=src python benchmarks/bench_foldin.py --smoke  # seconds

--smoke trains a tiny run and sends a handful of requests, so a test keeps this script working.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench_serving import fixed, free_port, start, stop
from recommender.inference import Recommender
from serving_load import Shot
from smoke import add_arguments, folder, tiny_run


def draw_histories(
    rec: Recommender, n: int, length: int, rng: np.random.Generator
) -> list[list[str]]:
    """n histories of `length` items, each drawn from one trained user's own history."""
    sizes = np.diff(rec.indptr)
    users = np.flatnonzero(sizes >= length)
    if not len(users):
        raise SystemExit(f"no trained user has {length} items; lower --history")
    out = []
    for user in rng.choice(users, size=n):
        items = rng.choice(rec.history_of(int(user)), size=length, replace=False)
        out.append([str(i) for i in rec.items.to_ids(items)])
    return out


def percentiles(ms: list[float]) -> dict[str, float]:
    values = np.array(ms)
    return {
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


def library(rec: Recommender, histories: list[list[str]], k: int) -> dict[str, Any]:
    """Wall and CPU time per call of a new user's list, and of a trained user's for scale."""
    rec.recommend("warm-up", k=k, histories={"warm-up": histories[0]})  # builds the FoldIn
    wall, cpu = [], []
    for history in histories:
        t, c = time.perf_counter(), time.process_time()
        rec.recommend("new", k=k, histories={"new": history})
        wall.append((time.perf_counter() - t) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    trained = []
    for user in rec.users.to_ids(np.arange(len(histories)) % len(rec.users)):
        t = time.perf_counter()
        rec.recommend(str(user), k=k)
        trained.append((time.perf_counter() - t) * 1e3)
    return {
        "folded_in": {**percentiles(wall), "cpu_p50_ms": percentiles(cpu)["p50_ms"]},
        "trained": percentiles(trained),
    }


def service(run_dir: Path, histories: list[list[str]], k: int, rate: float) -> dict[str, Any]:
    """The same lists through the HTTP API at a fixed rate (latency from the scheduled send)."""
    shots = [
        Shot("POST", "/v1/recommendations", json={"histories": {f"new-{i}": h}, "k": k})
        for i, h in enumerate(histories)
    ]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "recommender", "serve", "--run", str(run_dir)]
    proc = start([*cmd, "--port", str(port)], port)
    try:
        fixed(base, shots[: max(10, len(shots) // 10)], rate)  # warm-up, not reported
        out = fixed(base, shots, rate)
    finally:
        stop(proc)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="a trained run directory (ml-100k); required unless --smoke")
    parser.add_argument("--history", type=int, default=20, help="items per new user")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="service requests per second")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", help="write the results as JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        with folder(args.smoke_dir) as where:
            args.run, args.requests, args.out = str(tiny_run(where)), 10, None
            return measure(args)
    if args.run is None:
        parser.error("--run is required")
    return measure(args)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Time `args.requests` new users' top-k in the library and through the service."""
    requests = args.requests
    torch.set_num_threads(1)  # as the service runs (ServeSettings.threads)
    rec = Recommender.from_run(args.run)
    rng = np.random.default_rng(0)
    histories = draw_histories(rec, requests, args.history, rng)
    results = {
        "run": args.run,
        "model": rec.model_name,
        "n_items": len(rec.items),
        "history": args.history,
        "requests": requests,
        "library": library(rec, histories, args.k),
        "service": service(Path(args.run), histories, args.k, args.rate),
    }
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
