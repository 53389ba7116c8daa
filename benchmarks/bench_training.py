"""Training throughput against the pure-compute bound, and full-ranking evaluation time.

The bound: forward, backward and optimizer step on ready-made batches (no sampling, no
shuffling, no data movement). The pipeline: whole epochs of the real Trainer (negative
sampling, permutation, batching included) on the same data and model shapes. Both are
measured in this one run, at 1 and at 2 threads.

    python benchmarks/bench_training.py [--data-dir ../shared/data/ml-100k-loo]
    python benchmarks/bench_training.py --model sasrec [--rank-data ml-latest-small/ratings.csv]

NeuMF: the bound's batches are random (user, item, label) indices. SASRec (the
configs/sequential.yaml preset): the bound steps through 16 batches of the real training
sequences, cut and with negatives drawn as the pipeline's are, so both count the same
positions per step; `--rank-data` also times the full ranking of every user of another data
set (an interactions file, e.g. ml-latest-small's ratings.csv) by a model of the preset's shape.
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
from recommender.data.sequences import latest_sequences
from recommender.data.synthetic import write_synthetic
from recommender.evaluate import evaluate_full
from recommender.models import SASRec, build_model
from recommender.sequential import drawn_negatives, sequence_batches, sequence_step
from recommender.train import Trainer, train_step
from recommender.utils import retain_freed_memory
from smoke import add_arguments, folder, tiny_interactions

BENCH_MODEL = ["model.embedding_dim=32", "model.mlp_layers=[64,32,16,8]", "model.dropout=0.0"]
SEQUENTIAL = Path(__file__).resolve().parent.parent / "configs" / "sequential.yaml"


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


def sequence_bound(trainer: Trainer) -> Callable[[int], float]:
    """A timer: positions/s of n SASRec steps over 16 batches of the real sequences, built
    (permuted, cut, negatives drawn) before the clock starts."""
    cfg, stage = trainer.cfg, trainer.stages[-1]
    model = build_model(cfg.model, len(trainer.data.users), len(trainer.data.items))
    assert isinstance(model, SASRec)
    optimizers = trainer.optimizers(model, stage)
    source = trainer._sequence_source(stage.data, model.max_len)
    negatives = drawn_negatives(cfg.train, source.n_items)
    gen = torch.Generator().manual_seed(0)
    batches = list(
        sequence_batches(
            source, batch_size=cfg.train.batch_size, num_negatives=negatives, generator=gen
        )
    )[:16]
    positions = [int((targets != source.n_items).sum()) for _, targets, _ in batches]
    model.train()

    def measure(steps: int) -> float:
        start = time.perf_counter()
        for step in range(steps):
            inputs, targets, negs = batches[step % len(batches)]
            sequence_step(
                model, optimizers, inputs, targets, negs, n_items=source.n_items,
                loss=cfg.train.loss, gbce_t=cfg.train.gbce_t, logq=cfg.train.logq,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        return sum(positions[step % len(batches)] for step in range(steps)) / seconds

    return measure


def pipeline(trainer: Trainer) -> Callable[[int], float]:
    """A timer: samples/s (SASRec: positions/s) of one whole Trainer epoch (sampling,
    shuffling, batching included)."""
    stage = trainer.stages[-1]
    model = build_model(trainer.cfg.model, len(trainer.data.users), len(trainer.data.items))
    optimizers = trainer.optimizers(model, stage)

    def measure(epoch: int) -> float:
        gen = torch.Generator().manual_seed(epoch)
        _, n, secs = trainer.train_epoch(model, optimizers, stage, gen, "bench")
        return n / secs

    return measure


def eval_seconds(
    trainer: Trainer, model_overrides: list[str], repeats: int = 5, config: Path | None = None
) -> float:
    """Best of `repeats` full rankings of every test user of the trainer's data (with
    `config`, `model_overrides` apply on top of it)."""
    cfg = load_config(config, model_overrides)
    data = trainer.data
    model = build_model(cfg.model, len(data.users), len(data.items))
    if isinstance(model, SASRec):  # what a trained run holds: each user's latest items
        model.set_latest(latest_sequences(data.train_full, model.max_len))
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
    parser.add_argument("--model", choices=["neumf", "sasrec"], default="neumf")
    parser.add_argument("--rank-data", type=Path, help="sasrec: time full ranking on this file")
    parser.add_argument("--batch-size", type=int, help="default: 4096 (neumf), the preset's")
    parser.add_argument("--steps", type=int, help="bound steps per round (400; sasrec: 30)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating bound/epoch rounds")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 30 if args.model == "sasrec" else 400
    if not args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            run(args, data_overrides(args.data_dir, Path(tmp)), Path(tmp))
        return
    with folder(args.smoke_dir) as where:
        args.steps, args.rounds = 3, 1
        data = tiny_interactions(where)
        tiny = ["data.dataset=null", f"data.path={data}", f"data.root={where}"]
        for model in ("neumf", "sasrec"):
            args.model, args.rank_data = model, data if model == "sasrec" else None
            args.batch_size = 1024 if model == "neumf" else None
            run(args, tiny, where, (1,), 1)


def run(
    args: argparse.Namespace,
    overrides: list[str],
    tmp: Path,
    thread_counts: tuple[int, ...] = (1, 2),
    repeats: int = 5,
) -> None:
    """Measure on the data `overrides` name at each thread count (evaluation at the most),
    timing each evaluation `repeats` times."""
    sasrec = args.model == "sasrec"
    config = SEQUENTIAL if sasrec else None
    shape = [] if sasrec else [*BENCH_MODEL, "train.pretrain.enabled=false"]
    batch = [] if args.batch_size is None else [f"train.batch_size={args.batch_size}"]
    if not sasrec and not batch:
        batch = ["train.batch_size=4096"]
    overrides = [
        *overrides, *shape, *batch, "train.progress=false", "train.refit=false",
    ]  # fmt: skip
    cfg = load_config(config, overrides)
    retained = retain_freed_memory()  # as `recommender train` does, for both timers
    data = load_data(cfg.data, cfg.seed)
    trainer = Trainer(cfg, data, tmp / "run", torch.device("cpu"))
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads available, torch {torch.__version__}",
        "data": data.source,
        "model": "SASRec (configs/sequential.yaml)" if sasrec else "NeuMF 32, MLP [64, 32, 16, 8]",
        "batch_size": cfg.train.batch_size,
        "unit": "positions/s" if sasrec else "samples/s",
        "freed_memory_retained": retained,
    }
    for threads in thread_counts:
        # Alternate the two timers so a noisy neighbour slows both alike; report medians.
        torch.set_num_threads(threads)
        batch_size = cfg.train.batch_size
        bound = sequence_bound(trainer) if sasrec else compute_bound(trainer, batch_size)
        pipe = pipeline(trainer)
        bound(min(args.steps, 10)), pipe(0)  # warm-up
        bounds, pipes = [], []
        for r in range(args.rounds):
            bounds.append(bound(args.steps))
            pipes.append(pipe(r + 1))
        b, p = statistics.median(bounds), statistics.median(pipes)
        results[f"threads_{threads}"] = {
            "compute_bound": round(b),
            "pipeline": round(p),
            "ratio": round(p / b, 3),
            "rounds": args.rounds,
        }
    torch.set_num_threads(max(thread_counts))
    if sasrec:
        every = round(eval_seconds(trainer, overrides, repeats, config), 4)
        timings = {"SASRec preset, every test user": every}
        if args.rank_data is not None:
            other = [o for o in overrides if not o.startswith("data.")]
            other += ["data.dataset=null", f"data.path={args.rank_data}", f"data.root={tmp}"]
            rank_cfg = load_config(config, other)
            rank_data = load_data(rank_cfg.data, cfg.seed)
            ranked = Trainer(rank_cfg, rank_data, tmp / "rank", torch.device("cpu"))
            timings[f"SASRec preset, every user of {args.rank_data.name}"] = round(
                eval_seconds(ranked, other, repeats, config), 4
            )
        results["full_eval_seconds_all_users"] = timings
    else:
        results["full_eval_seconds_all_users"] = {
            "bench NeuMF (32, [64,32,16,8])": round(eval_seconds(trainer, BENCH_MODEL, repeats), 4),
            "default NeuMF (64, [128,64,32,16])": round(eval_seconds(trainer, [], repeats), 4),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
