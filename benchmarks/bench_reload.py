"""Reload benchmark: how long a large run takes to load, best.pt alone (`load_best`) and the
whole `Recommender.from_run` the service runs on a reload, on serving_synthetic.py's NeuMF.

A reload runs beside the requests a service is answering, in the same process: besides its
length, this measures the longest pause of a Python thread that ticks every millisecond beside
the load, the wait a request handler would see while the load holds the GIL.

    PYTHONPATH=src python benchmarks/bench_reload.py --items 1000000 --titles [--out reload.json]
    PYTHONPATH=src python benchmarks/bench_reload.py --run RUN   # a run already written
    PYTHONPATH=src python benchmarks/bench_reload.py --smoke     # seconds

Median of --repeats loads, one torch thread (as the service runs). Without --run, the
synthetic run is written to a temporary folder first (about 10 s for 1,000,000 items).
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from recommender.checkpoint import BEST_FILE, load_best
from recommender.inference import Recommender
from serving_synthetic import write_synthetic_run
from smoke import add_arguments, folder


def tick(done: threading.Event, longest: list[float]) -> None:
    """Sleep 1 ms at a time until `done`, keeping the longest gap between wake-ups."""
    last = time.perf_counter()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        longest[0] = max(longest[0], now - last)
        last = now


def timed(load: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Seconds of each of `repeats` loads, their median, and the longest pause of a thread
    ticking beside them."""
    seconds, pauses = [], []
    for _ in range(repeats):
        done, longest = threading.Event(), [0.0]
        ticker = threading.Thread(target=tick, args=(done, longest))
        ticker.start()
        start = time.perf_counter()
        load()  # the result is dropped at once: one loaded run in memory at a time
        seconds.append(time.perf_counter() - start)
        done.set()
        ticker.join()
        pauses.append(longest[0])
    return {
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
        "longest_pause_ms": round(1000 * max(pauses), 1),
    }


def measure(run: Path, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)  # as the service runs (ServeSettings.threads)
    rec = Recommender.from_run(run)
    results = {
        "run": str(run),
        "best_pt_mib": round((run / BEST_FILE).stat().st_size / 2**20, 1),
        "n_users": len(rec.users),
        "n_items": len(rec.items),
        "titles": rec.titles is not None,
        "load_best": timed(lambda: load_best(run), repeats),
        "from_run": timed(lambda: Recommender.from_run(run), repeats),
    }
    print(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="time this run instead of a synthetic one")
    parser.add_argument("--items", type=int, default=1_000_000, help="synthetic catalog size")
    parser.add_argument("--users", type=int, default=20_000, help="synthetic users")
    parser.add_argument("--titles", action="store_true", help="give synthetic items titles")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.run, args.items, args.users, args.repeats, args.out = None, 500, 50, 1, None
    if args.run is not None:
        results = measure(args.run, args.repeats)
    else:
        with folder(args.smoke_dir) as where:
            run = write_synthetic_run(
                where / "run",
                n_items=args.items,
                n_users=args.users,
                n_clusters=min(2_000, max(1, args.items // 25)),
                titles=args.titles,
            )
            results = measure(run, args.repeats)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
