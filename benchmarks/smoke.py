"""What every benchmark's `--smoke` mode shares: a folder to write in and tiny synthetic data.

A smoke run takes seconds, reads nothing from shared data folders and writes only under
`--smoke-dir` (or a temporary folder it deletes), so tests/test_benchmarks.py can run every
benchmark and a change that breaks one fails a test instead of the next real measurement.
Its figures mean nothing. Heavy imports are made where used: a benchmark that measures peak
memory imports this module too.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# Large enough for every split and protocol (each user has >= 5 items), small enough for seconds.
TINY = {"n_users": 200, "n_items": 100, "n_interactions": 4_000, "seed": 0}
# One short epoch per stage of a small model: a smoke run checks code paths, not quality.
TINY_TRAIN = [
    "train.max_epochs=1",
    "train.num_negatives=2",
    "train.progress=false",
    "model.embedding_dim=8",
    "model.mlp_layers=[16,8]",
    "threads=1",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long run on tiny synthetic data, to check the script works (tests run it)",
    )
    parser.add_argument(
        "--smoke-dir", type=Path, help="where --smoke writes (default: a temporary folder)"
    )


@contextmanager
def folder(given: Path | None) -> Iterator[Path]:
    """`given` (created if needed), or a temporary folder removed afterwards."""
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        yield Path(tmp)


def tiny_interactions(where: Path, name: str = "tiny.parquet") -> Path:
    """The tiny data set as one interactions file (.parquet or .csv by `name`)."""
    from recommender.data.synthetic import write_synthetic

    return write_synthetic(where / name, **TINY)


def tiny_ncf(where: Path, prefix: str, n_negatives: int = 20) -> Path:
    """The tiny data set as the NCF paper's files in `where`: each user's latest interaction
    to PREFIX.test.rating, the rest to PREFIX.train.rating, and PREFIX.test.negative with
    `n_negatives` items the user never had. Returns `where`."""
    import pandas as pd

    from recommender.data.synthetic import synthetic_interactions

    frame = synthetic_interactions(**TINY)  # sorted by user, then time
    users = frame["user_id"].astype(int).to_numpy() - 1
    items = frame["item_id"].astype(int).to_numpy() - 1
    is_test = np.append(users[1:] != users[:-1], True)  # each user's last row
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    seen = np.zeros((n_users, n_items), dtype=bool)
    seen[users, items] = True
    # Random keys, seen items last: the first n_negatives of each row are unseen items.
    keys = np.random.default_rng(0).random((n_users, n_items)) + seen
    negatives = np.argsort(keys, axis=1)[:, :n_negatives] + 1  # back to the 1-based ids
    test = frame[is_test]
    where.mkdir(parents=True, exist_ok=True)
    frame[~is_test].to_csv(where / f"{prefix}.train.rating", sep="\t", header=False, index=False)
    test.to_csv(where / f"{prefix}.test.rating", sep="\t", header=False, index=False)
    heads = "(" + test["user_id"] + "," + test["item_id"] + ")"
    columns = pd.DataFrame(negatives[test["user_id"].astype(int).to_numpy() - 1]).astype(str)
    lines = heads.str.cat(columns.agg("\t".join, axis=1).to_numpy(), sep="\t")
    (where / f"{prefix}.test.negative").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return where


def tiny_run(where: Path, *sets: str) -> Path:
    """A small NeuMF trained on the tiny data, one epoch per stage, by the real CLI."""
    from recommender.cli import main

    run = where / "run"
    overrides = [*TINY_TRAIN, f"data.root={where / 'data'}", *sets]
    args = ["train", "--data", str(tiny_interactions(where)), "--out", str(run), "--overwrite"]
    code = main([*args, *(a for s in overrides for a in ("--set", s))])
    if code:
        raise SystemExit(f"training the smoke run failed with exit code {code}")
    return run
