"""Side by side with implicit's ALS, the pick to beat, on the same files: quality and cost.

Both sides read the same pre-split files through the project's own pipeline and are scored by
the project's own evaluators (FULL: every item outside the user's training history, ties
against the model; SAMPLED where the files carry test negatives). ALS (implicit, one thread) is
fitted on train + validation with settings chosen on a validation split beforehand (given as
flags; the defaults are ml-1m-rloo's); ours is `recommender train --config CONFIG` unchanged,
then `recommender evaluate`. Each side runs in its own process, so its peak RSS is its own.
ALS is fitted --rounds times, each with its own random start (random_state seed + round): its
metrics are the mean over the fits (each fit's are kept in --out), its fit seconds the median.
Ours is one train (its own early stopping decides the epochs), reported with the
train-and-evaluate wall time.

`implicit` is a benchmark-only dependency (requirements-bench.txt, installed by `make bench`),
never one of the package's.

    python benchmarks/bench_peers.py --train D/ml-1m.train.rating --test D/ml-1m.test.rating \\
        --test-negatives D/ml-1m.test.negative --config configs/full-ranking.yaml
    python benchmarks/bench_peers.py --train G/train.txt --test G/test.txt \\
        --factors 256 --regularization 10 --alpha 40 --ks 20 --config configs/full-ranking.yaml

`--smoke` runs both sides on tiny synthetic NCF files (ALS only where implicit is installed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recommender.config import load_config
from recommender.data.pipeline import DataBundle, load_data
from recommender.evaluate import evaluate_full, evaluate_sampled
from recommender.models.base import RecModel
from smoke import TINY_TRAIN, add_arguments, folder, tiny_ncf

# Run a CLI command in this child and report its peak resident memory on the last line.
CLI_WITH_PEAK = (
    "import resource, sys\n"
    "from recommender.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    "sys.exit(code)\n"
)


class Factors(RecModel):
    """A fitted factorisation as a model the evaluators score: logit(u, i) = x_u · y_i."""

    def __init__(self, users: np.ndarray, items: np.ndarray) -> None:
        super().__init__()
        self.n_users, self.n_items = len(users), len(items)
        self.users = torch.from_numpy(np.ascontiguousarray(users, dtype=np.float32))
        self.items = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return (self.users[user_idx] * self.items[item_idx]).sum(-1)

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return (self.items,)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return self.users[user_idx] @ cache[0].T


def load(args: argparse.Namespace) -> DataBundle:
    sets = [f"data.train_path={args.train}", f"data.test_path={args.test}", "data.dataset=null"]
    if args.test_negatives:
        sets.append(f"data.test_negatives_path={args.test_negatives}")
    cfg = load_config(None, sets)
    return load_data(cfg.data, cfg.seed)


def quality(model: RecModel, data: DataBundle, ks: list[int]) -> dict[str, float]:
    """FULL metrics (and SAMPLED where the files give negatives) on the test split."""
    history = data.train_full
    out = {f"full/{k}": v for k, v in evaluate_full(model, history, data.test, ks).metrics.items()}
    if data.test_negatives is not None:
        sampled = evaluate_sampled(model, history, data.test, data.test_negatives, ks)
        out |= {f"sampled/{k}": v for k, v in sampled.metrics.items()}
    return out


def peak_rss_mib() -> float:
    """This process's peak resident set (Linux /proc), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def als_side(args: argparse.Namespace) -> dict[str, Any]:
    """In a child process: fit ALS --rounds times on train + validation (one seed each), score
    every fit."""
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, "blas")  # implicit's advice: its threads, not OpenBLAS's, do the work

    torch.set_num_threads(1)
    data = load(args)
    full = data.train_full
    matrix = csr_matrix(
        (np.ones(len(full), dtype=np.float32), (full.user_idx, full.item_idx)),
        shape=(full.n_users, full.n_items),
    )
    seconds, scored = [], []
    for round_ in range(args.rounds):
        als = AlternatingLeastSquares(
            factors=args.factors,
            regularization=args.regularization,
            alpha=args.alpha,
            iterations=args.iterations,
            num_threads=1,
            random_state=args.seed + round_,
        )
        start = time.perf_counter()
        als.fit(matrix, show_progress=False)
        seconds.append(time.perf_counter() - start)
        model = Factors(np.asarray(als.user_factors), np.asarray(als.item_factors))
        scored.append(quality(model, data, args.ks))
    return {
        "method": f"implicit ALS ({args.factors} factors, reg {args.regularization:g}, "
        f"alpha {args.alpha:g}, {args.iterations} sweeps; mean of {args.rounds} seeds)",
        "fit_seconds": statistics.median(seconds),
        "fit_seconds_rounds": seconds,
        "peak_rss_mib": peak_rss_mib(),
        "metrics": {key: statistics.fmean(r[key] for r in scored) for key in scored[0]},
        "metrics_rounds": scored,
    }


def cli(argv: list[str]) -> tuple[float, float]:
    """Run `recommender ARGV` in a child; (wall seconds, peak RSS MiB)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CLI_WITH_PEAK, *argv], capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"recommender {' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    peak = next(ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("PEAK_RSS_KIB"))
    return seconds, int(peak.split()[1]) / 1024


def our_side(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """`recommender train --config CONFIG` on the same files, then `recommender evaluate`."""
    files = ["--train", args.train, "--test", args.test]
    if args.test_negatives:
        files += ["--test-negatives", args.test_negatives]
    sets = [a for s in args.set for a in ("--set", s)]
    train = ["train", "--config", args.config, *files, "--out", str(out), "--overwrite", *sets]
    fit_seconds, fit_peak = cli(train)
    eval_seconds, eval_peak = cli(["evaluate", "--run", str(out)])
    report = json.loads((out / "eval.json").read_text())
    metrics: dict[str, float] = {}
    for protocol in ("full", "sampled"):
        result = report["results"].get(f"{report['model']}/{protocol}")
        if result is not None and (protocol == "full" or args.test_negatives):
            metrics |= {f"{protocol}/{k}": v for k, v in result["metrics"].items()}
    return {
        "method": f"ours: {report['model']} ({args.config})",
        "fit_seconds": fit_seconds,
        "evaluate_seconds": eval_seconds,
        "peak_rss_mib": max(fit_peak, eval_peak),
        "metrics": metrics,
    }


def table(rows: list[dict[str, Any]], ks: list[int], sampled: bool) -> str:
    columns = [f"full/{m}@{k}" for k in ks for m in ("hr", "ndcg", "recall")]
    if sampled:
        columns = [f"sampled/{m}@{k}" for k in ks for m in ("hr", "ndcg")] + columns
    head = ["method", *columns, "fit s", "peak RSS MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"{row['metrics'].get(c, float('nan')):.4f}" for c in columns]
        cost = [f"{row['fit_seconds']:.1f}", f"{row['peak_rss_mib']:.0f}"]
        lines.append("| " + " | ".join([row["method"], *cells, *cost]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", help="training file (NCF .train.rating or LightGCN train.txt)")
    parser.add_argument("--test", help="test file")
    parser.add_argument("--test-negatives", help="NCF .test.negative file (SAMPLED protocol)")
    parser.add_argument("--config", default="configs/full-ranking.yaml", help="our config")
    parser.add_argument("--set", action="append", default=[], help="extra override for ours")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--regularization", type=float, default=10.0)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3, help="ALS fits, one seed each")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ours", action="store_true", help="ALS only")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    with folder(args.smoke_dir) as where:
        if args.smoke:
            tiny_ncf(where, "tiny")
            args.train, args.test, args.test_negatives = (
                str(where / f"tiny.{name}")
                for name in ("train.rating", "test.rating", "test.negative")
            )
            args.factors, args.iterations, args.rounds = 8, 2, 1
            args.config = None
            args.set = [*TINY_TRAIN, "model.name=mf", f"data.root={where / 'data'}"]
        elif not (args.train and args.test):
            parser.error("--train and --test are required (or --smoke)")
        rows = []
        try:
            import implicit  # noqa: F401
        except ImportError:
            print("implicit is not installed (pip install -r requirements-bench.txt): no ALS row")
        else:
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                rows.append(pool.apply(als_side, (args,)))
        if not args.skip_ours:
            if args.config is None:  # smoke: the defaults with tiny settings
                args.config = str(where / "smoke.yaml")
                Path(args.config).write_text("{}\n")
            rows.append(our_side(args, where / "ours"))
    print(f"machine: {os.cpu_count()} cores; ALS on one thread, ours as its config sets `threads`")
    print(table(rows, args.ks, args.test_negatives is not None))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
