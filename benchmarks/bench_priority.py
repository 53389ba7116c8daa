"""Priority benchmark: what a lower CPU priority for one thread of a worker costs its others.

A thread of a serving worker that runs Python holds the GIL between hand-overs. Given a lower
priority (a higher nice value, per thread on Linux) while other processes keep every core
busy, it is kept off the cores with the GIL in hand, and the worker's request handlers wait
for it. This measures that wait directly: one thread at each nice value runs a Python loop
while the main thread, at the process's priority, sleeps 1 ms at a time and records how late
each wake-up came; busy processes at nice 0, one per core (or --busy), fill the cores.

    PYTHONPATH=src python benchmarks/bench_priority.py [--nice 0 5 19] [--out priority.json]
    PYTHONPATH=src python benchmarks/bench_priority.py --smoke   # seconds

The GIL switch interval is the service's (engine.GIL_SWITCH_S). Per nice value, the median
over --rounds rounds of each round's p50, p99 and longest lateness, and the ratio of that
p99 to nice 0's in the same run; the nice values alternate within each round.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from smoke import add_arguments


def _busy(stop: Any) -> None:
    """A core's worth of work at nice 0, until told to stop."""
    x = 0
    while not stop.is_set():
        for i in range(100_000):
            x += i


def lateness(nice: int, seconds: float) -> np.ndarray:
    """(n,) seconds by which 1 ms sleeps of this thread overslept while a thread at `nice`
    ran Python beside it."""
    done = threading.Event()

    def spin() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        x = 0
        while not done.is_set():
            for i in range(1_000):
                x += i

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    late = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        time.sleep(0.001)
        late.append(time.perf_counter() - start - 0.001)
    done.set()
    thread.join()
    return np.array(late)


def measure(nices: list[int], rounds: int, seconds: float, busy: int) -> dict[str, Any]:
    if not sys.platform.startswith("linux"):
        raise SystemExit("per-thread nice values are Linux's")
    # Here, not at the top: each busy process imports this module, and torch with it would
    # cost it seconds.
    from recommender.serving.engine import GIL_SWITCH_S

    switch = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_S)
    stop = mp.get_context("spawn").Event()
    hogs = [mp.get_context("spawn").Process(target=_busy, args=(stop,)) for _ in range(busy)]
    for hog in hogs:
        hog.start()
    per: dict[int, list[dict[str, float]]] = {nice: [] for nice in nices}
    try:
        time.sleep(0.5)  # the busy processes are running
        for _ in range(rounds):
            for nice in nices:
                late = lateness(nice, seconds) * 1e3
                per[nice].append(
                    {
                        "p50_ms": float(np.percentile(late, 50)),
                        "p99_ms": float(np.percentile(late, 99)),
                        "max_ms": float(late.max()),
                        "over_20ms": int((late > 20).sum()),
                    }
                )
    finally:
        stop.set()
        for hog in hogs:
            hog.join()
        sys.setswitchinterval(switch)
    results: dict[str, Any] = {"busy_processes": busy, "seconds_per_round": seconds, "nice": {}}
    for nice, rows in per.items():
        results["nice"][str(nice)] = {
            key: statistics.median(row[key] for row in rows) for key in rows[0]
        } | {"rounds": rows}
    if "0" in results["nice"]:
        base = results["nice"]["0"]["p99_ms"]
        for row in results["nice"].values():
            row["p99_over_nice_0"] = round(row["p99_ms"] / base, 2) if base else None
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nice", type=int, nargs="+", default=[0, 5, 19])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per nice value and round")
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 1, help="busy processes")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.seconds, args.busy, args.out = 1, 0.2, 1, None
    results = measure(args.nice, args.rounds, args.seconds, args.busy)
    for nice, row in results["nice"].items():
        print(
            f"nice {nice:>2}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.1f} ms, "
            f"longest {row['max_ms']:.1f} ms, over 20 ms {row['over_20ms']:.0f} "
            f"(p99 / nice 0's: {row.get('p99_over_nice_0')})"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
