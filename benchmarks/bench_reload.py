"""Reload benchmark: how long a large run takes to load, best.pt alone (`load_best`) and the
whole `Recommender.from_run` the service runs on a reload, on serving_synthetic.py's NeuMF.

A reload runs beside the requests a service is answering, in the same process: besides its
length, this measures the longest pause of a Python thread that ticks every millisecond beside
the load, the wait a request handler would see while the load holds the GIL.

    PYTHONPATH=src python benchmarks/bench_reload.py --items 1000000 --titles [--out reload.json]
    PYTHONPATH=src python benchmarks/bench_reload.py --run RUN   # a run already written
    PYTHONPATH=src python benchmarks/bench_reload.py --smoke     # seconds

Median of --repeats loads, one torch thread, the GIL switch interval the service sets
(engine.GIL_SWITCH_S) and its imports frozen out of garbage collection (engine.settle_heap).
Besides `from_run`, a worker's own part of a reload: `ServedModel.load` beside a served
version, the ANN indexes and item side already built by their own process (indexes.py, timed
once apart), then the replaced version freed as the service frees it
(lifecycle.release_later). Without --run, the synthetic run is written to a temporary folder
first (about 10 s for 1,000,000 items).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from recommender.checkpoint import BEST_FILE, load_best
from recommender.inference import Recommender
from recommender.serving import ServeSettings
from recommender.serving.engine import GIL_SWITCH_S, ServedModel, settle_heap
from recommender.serving.lifecycle import release_later
from serving_synthetic import write_synthetic_run
from smoke import add_arguments, folder


def tick(done: threading.Event, gaps: list[float]) -> None:
    """Sleep 1 ms at a time until `done`, keeping each gap between wake-ups."""
    last = time.perf_counter()
    while not done.is_set():
        time.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


@contextmanager
def ticking(pauses: list[float]) -> Iterator[None]:
    """A thread ticking beside the block; appends each of its gaps above 1 ms to `pauses`."""
    done, gaps = threading.Event(), list[float]()
    ticker = threading.Thread(target=tick, args=(done, gaps))
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        pauses.extend(g - 0.001 for g in gaps if g > 0.001)


def pause_figures(pauses: list[float]) -> dict[str, Any]:
    return {
        "longest_pause_ms": round(1000 * max(pauses, default=0.0), 1),
        "pauses_over_10ms": sum(p > 0.010 for p in pauses),
    }


def timed(load: Callable[[], object], repeats: int) -> dict[str, Any]:
    """Seconds of each of `repeats` loads, their median, and the pauses of a thread ticking
    beside them."""
    seconds: list[float] = []
    pauses: list[float] = []
    for _ in range(repeats):
        with ticking(pauses):
            start = time.perf_counter()
            loaded = load()
            seconds.append(time.perf_counter() - start)
        del loaded  # one loaded run in memory at a time, freed apart from the timing
    return {
        "seconds": [round(s, 3) for s in seconds],
        "median_s": round(statistics.median(seconds), 3),
    } | pause_figures(pauses)


def released(load: Callable[[], ServedModel], repeats: int) -> dict[str, Any]:
    """Pauses while `repeats` loaded versions are freed as the service frees a replaced one."""
    pauses: list[float] = []
    for _ in range(repeats):
        version = load()
        gone = weakref.ref(version)
        with ticking(pauses):
            release_later(version, 0.2)  # time for this frame to let go of it first
            del version
            while gone() is not None:
                time.sleep(0.01)
    return pause_figures(pauses)


def measure(run: Path, repeats: int, settings: ServeSettings, indexes: Path) -> dict[str, Any]:
    """Everything timed in the service's settings (module doc), put back afterwards."""
    threads, switch = torch.get_num_threads(), sys.getswitchinterval()
    frozen = gc.get_freeze_count() > 0  # by someone else: theirs to keep
    torch.set_num_threads(1)  # as the service runs (ServeSettings.threads)
    sys.setswitchinterval(GIL_SWITCH_S)
    settle_heap()  # as a worker does before its first load
    try:
        return _measure(run, repeats, settings, indexes)
    finally:
        torch.set_num_threads(threads)
        sys.setswitchinterval(switch)
        if not frozen:
            gc.unfreeze()


def _measure(run: Path, repeats: int, settings: ServeSettings, indexes: Path) -> dict[str, Any]:
    rec = Recommender.from_run(run)
    results: dict[str, Any] = {
        "run": str(run),
        "best_pt_mib": round((run / BEST_FILE).stat().st_size / 2**20, 1),
        "n_users": len(rec.users),
        "n_items": len(rec.items),
        "titles": rec.titles is not None,
        "load_best": timed(lambda: load_best(run), repeats),
        "from_run": timed(lambda: Recommender.from_run(run), repeats),
    }
    del rec
    start = time.perf_counter()
    served = ServedModel.load(run, settings, indexes, beside=False)  # builds the parts
    results["first_worker_load_s"] = round(time.perf_counter() - start, 2)

    def beside() -> ServedModel:
        return ServedModel.load(run, settings, indexes, beside=True)

    results["worker_load"] = timed(beside, repeats)
    results["release"] = released(beside, repeats)
    del served
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
    settings = ServeSettings(ann_threshold=0) if args.smoke else ServeSettings()
    if args.run is not None:
        with tempfile.TemporaryDirectory(prefix="bench_reload_") as indexes:
            results = measure(args.run, args.repeats, settings, Path(indexes))
    else:
        with folder(args.smoke_dir) as where:
            run = write_synthetic_run(
                where / "run",
                n_items=args.items,
                n_users=args.users,
                n_clusters=min(2_000, max(1, args.items // 25)),
                titles=args.titles,
            )
            results = measure(run, args.repeats, settings, where / "indexes")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
