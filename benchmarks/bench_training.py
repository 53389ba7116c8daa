"""Training throughput against the pure-compute bound, and full-ranking evaluation time.

The bound: forward, backward and optimizer step on ready-made random index batches (no
sampling, no shuffling, no data movement). The pipeline: whole epochs of the real Trainer
(negative sampling, permutation, batching included) on the same data and model shapes.
Both are measured in this one run, at 1 and at 2 threads.

    python benchmarks/bench_training.py [--data-dir ../shared/data/ml-100k-loo]

Without the NCF files it falls back to synthetic data of the same shape (943 x 1682, 99k).
`--smoke` runs every measurement once on tiny synthetic data, in seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from recommender.config import load_config
from recommender.data.pipeline import load_data
from recommender.data.synthetic import write_synthetic
from recommender.evaluate import evaluate_full
from recommender.models import build_model
from recommender.train import Trainer, train_step
from smoke import add_arguments, folder, tiny_interactions

BENCH_MODEL = ["model.embedding_dim=32", "model.mlp_layers=[64,32,16,8]", "model.dropout=0.0"]


def data_overrides(data_dir: Path | None, tmp: Path) -> list[str]:
    if data_dir is not None and (data_dir / "ml-100k.train.rating").is_file():
        return [
            "data.dataset=null",
            f"data.train_path={data_dir / 'ml-100k.train.rating'}",
            f"data.test_path={data_dir / 'ml-100k.test.rating'}",
        ]
    path = write_synthetic(tmp / "synthetic.csv", n_users=943, n_items=1682, n_interactions=100_000)
    return ["data.dataset=null", f"data.path={path}"]


def compute_bound(trainer: Trainer, batch_size: int) -> Callable[[int], float]:
    """A timer: samples/s of n forward + backward + Adam steps on pre-built random batches."""
    cfg = trainer.cfg
    n_users, n_items = len(trainer.data.users), len(trainer.data.items)
    model = build_model(cfg.model, n_users, n_items)
    optimizers = trainer.optimizers(model, trainer.stages[-1])
    gen = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randint(n_users, (batch_size,), generator=gen),
            torch.randint(n_items, (batch_size,), generator=gen),
            torch.randint(2, (batch_size,), generator=gen).float(),
        )
        for _ in range(16)
    ]

    def measure(steps: int) -> float:
        start = time.perf_counter()
        for step in range(steps):
            train_step(model, optimizers, *batches[step % len(batches)])
        return steps * batch_size / (time.perf_counter() - start)

    return measure


def pipeline(trainer: Trainer) -> Callable[[int], float]:
    """A timer: samples/s of one whole Trainer epoch (sampling, shuffling, batching included)."""
    stage = trainer.stages[-1]
    model = build_model(trainer.cfg.model, len(trainer.data.users), len(trainer.data.items))
    optimizers = trainer.optimizers(model, stage)

    def measure(epoch: int) -> float:
        gen = torch.Generator().manual_seed(epoch)
        _, n, secs = trainer.train_epoch(model, optimizers, stage, gen, "bench")
        return n / secs

    return measure


def eval_seconds(trainer: Trainer, model_overrides: list[str], repeats: int = 5) -> float:
    cfg = load_config(None, model_overrides)
    model = build_model(cfg.model, len(trainer.data.users), len(trainer.data.items))
    data = trainer.data
    evaluate_full(model, data.train, data.test, [10])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        evaluate_full(model, data.train_full, data.test, [10], batch_users=1024)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/ml-100k-loo"))
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=400, help="bound steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bound/epoch rounds")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, data_overrides(args.data_dir, Path(tmp)), Path(tmp))
        return
    with folder(args.smoke_dir) as where:
        args.batch_size, args.steps, args.rounds = 1024, 3, 1
        data = tiny_interactions(where)
        run(args, ["data.dataset=null", f"data.path={data}", f"data.root={where}"], where, (1,), 1)


def run(
    args: argparse.Namespace,
    overrides: list[str],
    tmp: Path,
    thread_counts: tuple[int, ...] = (1, 2),
    repeats: int = 5,
) -> None:
    """Measure on the data `overrides` name at each thread count (evaluation at the most),
    timing each evaluation `repeats` times."""
    overrides = [
        *overrides,
        *BENCH_MODEL,
        f"train.batch_size={args.batch_size}",
        "train.progress=false",
        "train.refit=false",
        "train.pretrain.enabled=false",
    ]
    cfg = load_config(None, overrides)
    data = load_data(cfg.data, cfg.seed)
    trainer = Trainer(cfg, data, tmp / "run", torch.device("cpu"))
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads available, torch {torch.__version__}",
        "data": data.source,
        "model": "NeuMF dim 32, MLP [64, 32, 16, 8]",
        "batch_size": args.batch_size,
    }
    for threads in thread_counts:
        # Alternate the two timers so a noisy neighbour slows both alike; report medians.
        torch.set_num_threads(threads)
        bound, pipe = compute_bound(trainer, args.batch_size), pipeline(trainer)
        bound(10), pipe(0)  # warm-up
        bounds, pipes = [], []
        for r in range(args.rounds):
            bounds.append(bound(args.steps))
            pipes.append(pipe(r + 1))
        b, p = statistics.median(bounds), statistics.median(pipes)
        results[f"threads_{threads}"] = {
            "compute_bound_samples_s": round(b),
            "pipeline_samples_s": round(p),
            "ratio": round(p / b, 3),
            "rounds": args.rounds,
        }
    torch.set_num_threads(max(thread_counts))
    results["full_eval_seconds_all_users"] = {
        "bench NeuMF (32, [64,32,16,8])": round(eval_seconds(trainer, BENCH_MODEL, repeats), 4),
        "default NeuMF (64, [128,64,32,16])": round(eval_seconds(trainer, [], repeats), 4),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
