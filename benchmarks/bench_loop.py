"""Whole training epochs of the seed's network: the real CLI against a naive tutorial pipeline.

The network is the seed's NCF (model.name=mlp: 32-dim user and item embeddings, hidden layers
64 -> 64 -> 32, dropout 0.2). Both sides are timed over whole epochs, validation and checkpoint
included, in alternating rounds of one run (a noisy neighbour slows both alike); each figure is
the median over the rounds.

- naive: what a tutorial does. A per-sample torch `Dataset` of (user, item, label) rows whose
  negatives a Python loop draws at each epoch start (rejecting the user's training items), a
  shuffling `DataLoader` (batch 256), BCE, Adam, then HR@10 over the validation users one user
  at a time, and `torch.save` of the weights.
- ours: `recommender train` in this process (cli.main, through Trainer) for --epochs epochs of
  each loss the MLP trains with (bce, bpr, sampled_softmax), early stopping unable to stop. An
  epoch is the time between two of its "epoch N: loss" log lines: sampling, steps, validation,
  best.pt when improved and last.pt; the first epoch (sampler and pool set-up) is left out.

Samples are scored (user, item) pairs, each one pass of the tower, for every side: bce and
naive, positives + negatives (each a row with its label); bpr, each positive and its own
num_negatives negatives, positives * (1 + num_negatives), as many as bce (the loss then
compares num_negatives (positive, negative) pairs a positive); sampled_softmax, each positive
and the batch's pool, positives * (1 + pool_size), the pool 64 items by default (--pool-size).
Positives/s are given for every loss.

    python benchmarks/bench_loop.py [--data-dir ../shared/data/ml-100k-loo] [--rounds 3]

Without the NCF files it falls back to synthetic data of their shape (943 x 1682, 100k).
`--smoke` runs one round of one epoch per side on tiny synthetic NCF files, in seconds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import random
import re
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from recommender.cli import main as cli_main
from recommender.config import load_config
from recommender.data.interactions import Interactions
from recommender.data.pipeline import load_data
from recommender.utils import retain_freed_memory
from smoke import add_arguments, folder, tiny_ncf

SEED_NETWORK = ["model.name=mlp", "model.mlp_layers=[64,64,32]", "model.dropout=0.2"]
LOSSES = ("bce", "bpr", "sampled_softmax")
EPOCH_LINE = re.compile(r" epoch (\d+): loss ")


def ncf_files(data_dir: Path, tmp: Path) -> tuple[Path, Path]:
    """The ml-100k-loo train and test files, or synthetic NCF files of their shape."""
    train = data_dir / "ml-100k.train.rating"
    if train.is_file():
        return train, data_dir / "ml-100k.test.rating"
    from recommender.data.synthetic import synthetic_interactions

    frame = synthetic_interactions(n_users=943, n_items=1682, n_interactions=100_000, seed=0)
    last = np.append(frame["user_id"].to_numpy()[1:] != frame["user_id"].to_numpy()[:-1], True)
    tmp.mkdir(parents=True, exist_ok=True)
    frame[~last].to_csv(tmp / "syn.train.rating", sep="\t", header=False, index=False)
    frame[last].to_csv(tmp / "syn.test.rating", sep="\t", header=False, index=False)
    return tmp / "syn.train.rating", tmp / "syn.test.rating"


# -- the naive tutorial pipeline ---------------------------------------------------------------


class TutorialNCF(torch.nn.Module):
    """The seed's network as a tutorial writes it: two embeddings, concatenated, through
    Linear -> ReLU -> Dropout per hidden layer, to one logit (the project's MLP computes the
    same function)."""

    def __init__(self, n_users: int, n_items: int, layers: list[int], dropout: float):
        super().__init__()
        self.user_emb = torch.nn.Embedding(n_users, layers[0] // 2)
        self.item_emb = torch.nn.Embedding(n_items, layers[0] // 2)
        hidden: list[torch.nn.Module] = []
        for a, b in itertools.pairwise(layers):
            hidden += [torch.nn.Linear(a, b), torch.nn.ReLU(), torch.nn.Dropout(dropout)]
        self.hidden = torch.nn.Sequential(*hidden)
        self.out = torch.nn.Linear(layers[-1], 1)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.user_emb(users), self.item_emb(items)], dim=-1)
        return self.out(self.hidden(x)).squeeze(-1)


class TutorialDataset(Dataset[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """One (user, item, label) row per sample, read one index at a time; the negatives are
    redrawn by a Python loop at each epoch start."""

    def __init__(self, users: np.ndarray, items: np.ndarray, n_items: int, negatives: int):
        self.positives = list(zip(users.tolist(), items.tolist(), strict=True))
        self.seen: dict[int, set[int]] = {}
        for u, i in self.positives:
            self.seen.setdefault(u, set()).add(i)
        self.n_items, self.negatives = n_items, negatives
        self.users = self.items = self.labels = torch.zeros(0)

    def new_epoch(self) -> None:
        users, items, labels = [], [], []
        for u, i in self.positives:
            users.append(u)
            items.append(i)
            labels.append(1.0)
            for _ in range(self.negatives):
                j = random.randrange(self.n_items)
                while j in self.seen[u]:
                    j = random.randrange(self.n_items)
                users.append(u)
                items.append(j)
                labels.append(0.0)
        self.users, self.items = torch.tensor(users), torch.tensor(items)
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.users)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.users[index], self.items[index], self.labels[index]


def naive_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: TutorialDataset,
    valid: Interactions,
    out: Path,
) -> tuple[int, float, float, float]:
    """One tutorial epoch: draw, train, validate user by user, save. Returns (samples,
    seconds, mean loss, validation HR@10)."""
    start = time.perf_counter()
    dataset.new_epoch()
    loader = DataLoader(dataset, batch_size=256, shuffle=True)
    criterion = torch.nn.BCEWithLogitsLoss()
    model.train()
    total = 0.0  # the running loss a tutorial prints
    for u, i, y in loader:
        optimizer.zero_grad()
        loss = criterion(model(u, i), y)
        loss.backward()
        optimizer.step()
        total += loss.item()
    model.eval()
    hits = 0
    all_items = torch.arange(dataset.n_items)
    with torch.no_grad():
        for u, target in zip(valid.user_idx.tolist(), valid.item_idx.tolist(), strict=True):
            scores = model(torch.full_like(all_items, u), all_items)
            scores[list(dataset.seen[u])] = -float("inf")
            hits += int(target in torch.topk(scores, 10).indices.tolist())
    torch.save(model.state_dict(), out / "model.pt")
    seconds = time.perf_counter() - start
    return len(dataset), seconds, total / len(loader), hits / len(valid)


# -- ours: the CLI --------------------------------------------------------------------------------


class EpochClock(logging.Handler):
    """Notes the time of each "epoch N: loss" line the Trainer logs once an epoch is saved."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stamps: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if EPOCH_LINE.search(record.getMessage()):
            self.stamps.append(time.perf_counter())


def cli_epochs(args: list[str], sets: list[str], epochs: int) -> list[float]:
    """Run `recommender train` for `epochs` epochs; the seconds of each epoch after the first:
    the time from one epoch's log line to the next."""
    overrides = [*sets, f"train.epochs={epochs}", f"train.patience={epochs + 1}"]
    clock = EpochClock()
    logger = logging.getLogger("recommender")
    logger.addHandler(clock)
    try:
        code = cli_main([*args, *(a for s in overrides for a in ("--set", s))])
    finally:
        logger.removeHandler(clock)
    if code or len(clock.stamps) != epochs:
        raise SystemExit(f"recommender train: exit {code}, {len(clock.stamps)}/{epochs} epochs")
    return list(np.diff(clock.stamps))


def samples_per_positive(loss: str, negatives: int, pool: int) -> tuple[int, str]:
    """Scored (user, item) pairs per positive, and what they are."""
    if loss == "bce":
        return 1 + negatives, "scored pairs: positives + negatives"
    if loss == "bpr":
        return 1 + negatives, "scored pairs: each positive and its negatives"
    return 1 + pool, "scored pairs: each positive and its batch's pool"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/ml-100k-loo"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="CLI epochs per run (>= 2)")
    parser.add_argument("--negatives", type=int, default=4, help="negatives per positive")
    parser.add_argument(
        "--pool-size",
        type=int,
        default=64,
        help="sampled_softmax's pool (the config's 1024 makes the MLP score 1025 pairs per "
        "positive: about 3 minutes an epoch here)",
    )
    parser.add_argument("--threads", type=int, default=1)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        with folder(args.smoke_dir) as where:
            args.rounds, args.epochs = 1, 2
            data = tiny_ncf(where / "ncf", "tiny")
            files = data / "tiny.train.rating", data / "tiny.test.rating"
            args.pool_size = 16
            run(args, files, where, ["model.mlp_layers=[16,8]"])
        return
    with tempfile.TemporaryDirectory() as tmp:
        run(args, ncf_files(args.data_dir, Path(tmp) / "data"), Path(tmp))


def run(
    args: argparse.Namespace, files: tuple[Path, Path], tmp: Path, extra: Sequence[str] = ()
) -> None:
    torch.set_num_threads(args.threads)
    # What `recommender train` does at its start; process-wide, so the naive side runs with it
    # too and the ratio credits none of its gain to our pipeline.
    retained = retain_freed_memory()
    train, test = files
    data_sets = ["data.dataset=null", f"data.train_path={train}", f"data.test_path={test}"]
    common = [
        *data_sets,
        f"data.root={tmp / 'cache'}",
        *SEED_NETWORK,
        "train.refit=false",
        "train.progress=false",
        f"train.num_negatives={args.negatives}",
        f"train.pool_size={args.pool_size}",
        f"threads={args.threads}",
        *extra,
    ]
    cfg = load_config(None, common)
    bundle = load_data(cfg.data, cfg.seed)
    n_pos = len(bundle.train)

    random.seed(0)
    torch.manual_seed(0)
    net = TutorialNCF(len(bundle.users), len(bundle.items), cfg.model.mlp_layers, cfg.model.dropout)
    dataset = TutorialDataset(
        bundle.train.user_idx, bundle.train.item_idx, len(bundle.items), args.negatives
    )
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    naive_out = tmp / "naive"
    naive_out.mkdir(parents=True, exist_ok=True)

    cli = ["train", "--train", str(train), "--test", str(test), "--overwrite"]
    naive: list[float] = []
    ours: dict[str, list[float]] = {loss: [] for loss in LOSSES}
    logger = logging.getLogger("recommender")
    level = logger.level
    logger.setLevel(logging.INFO)  # the epoch lines are the clock; put back afterwards
    for _ in range(args.rounds):
        n, seconds, loss_value, hr = naive_epoch(net, optimizer, dataset, bundle.valid, naive_out)
        naive.append(n / seconds)
        for loss in LOSSES:
            sets = [*common, f"train.loss={loss}"]
            epochs = cli_epochs([*cli, "--out", str(tmp / loss)], sets, args.epochs)
            ours[loss].append(statistics.median(epochs))  # seconds per epoch
    logger.setLevel(level)
    naive_rate = statistics.median(naive)
    results: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"torch {torch.__version__}",
        "data": bundle.source,
        "train_positives": n_pos,
        "negatives_per_positive": args.negatives,
        "pool_size": args.pool_size,
        "epochs_per_cli_run": args.epochs,
        "rounds": args.rounds,
        "naive_samples_s": round(naive_rate),
        "naive_positives_s": round(naive_rate / (1 + args.negatives)),
        "naive_last_epoch": {"loss": round(loss_value, 4), "valid_hr@10": round(hr, 4)},
        "freed_memory_retained": retained,
    }
    for loss in LOSSES:
        seconds = statistics.median(ours[loss])
        per, what = samples_per_positive(loss, args.negatives, cfg.train.pool_size)
        rate = n_pos * per / seconds
        results[loss] = {
            "epoch_seconds": round(seconds, 3),
            "samples_s": round(rate),
            "samples_are": what,
            "positives_s": round(n_pos / seconds),
            "ratio_samples": round(rate / naive_rate, 2),
            "ratio_positives": round(n_pos / seconds / (naive_rate / (1 + args.negatives)), 2),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
