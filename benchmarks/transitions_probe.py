"""How much does the order of a user's interactions say about the held-out item? A probe.

Scores every item by how often it followed the user's latest training items in other users'
histories (item-to-item transition counts from the training file; the j-th latest item weighted
0.5 ** j), with popularity only to break ties, and evaluates that score with the project's own
protocols on the test split. No learning, no tuning: if it comes near the models, order is a
signal the order-blind models leave unused (docs/BENCHMARKS.md, "What the user did last").

    PYTHONPATH=src python benchmarks/transitions_probe.py --data-dir ../shared/data/ml-100k-loo

`--smoke` probes tiny synthetic data in the NCF files' layout instead.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from recommender.config import load_config
from recommender.data.pipeline import load_data
from recommender.evaluate import evaluate_full, evaluate_sampled
from recommender.models import RecModel
from smoke import add_arguments, folder, tiny_ncf


class TransitionScores(RecModel):
    """logit(u, i) = sum_j 0.5 ** j * T[l_uj, i] + 1e-6 * count_i, T the transition counts."""

    def __init__(self, scores: torch.Tensor) -> None:
        super().__init__()
        self.scores = scores  # (n_users, n_items)
        self.n_users, self.n_items = scores.shape

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return self.scores[user_idx, item_idx]

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return ()

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return self.scores[user_idx]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/ml-100k-loo"))
    parser.add_argument("--prefix", default="ml-100k")
    parser.add_argument("--latest", type=int, default=5, help="latest items that vote")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.smoke:
        probe(args.data_dir / args.prefix, args.latest)
        return
    with folder(args.smoke_dir) as where:
        probe(tiny_ncf(where, args.prefix) / args.prefix, args.latest)


def probe(files: Path, n_latest: int) -> None:
    """Score and evaluate on FILES.train.rating, FILES.test.rating, FILES.test.negative."""
    cfg = load_config(
        None,
        [f"data.train_path={files}.train.rating", f"data.test_path={files}.test.rating",
         f"data.test_negatives_path={files}.test.negative"],
    )  # fmt: skip
    data = load_data(cfg.data, cfg.seed)
    train = data.train_full  # everything before each user's test item
    n_items = train.n_items
    previous = train.previous_items(1)[:, 0]  # the item just before each row, n_items: none
    follows = previous < n_items
    transitions = np.zeros((n_items + 1, n_items))  # row n_items: "no item", stays zero
    np.add.at(transitions, (previous[follows], train.item_idx[follows]), 1.0)
    latest = train.latest_items(n_latest)  # (n_users, L), n_items pads
    scores = 1e-6 * train.item_counts()[None, :]
    for j in range(n_latest):  # one (n_users, n_items) gather per position
        scores = scores + 0.5**j * transitions[latest[:, j]]
    model = TransitionScores(torch.from_numpy(scores).float())
    full = evaluate_full(model, train, data.test, [10]).metrics
    print(f"FULL    HR@10 {full['hr@10']:.4f}  NDCG@10 {full['ndcg@10']:.4f}")
    if data.test_negatives is not None:
        sampled = evaluate_sampled(model, train, data.test, data.test_negatives, [10]).metrics
        print(f"SAMPLED HR@10 {sampled['hr@10']:.4f}  NDCG@10 {sampled['ndcg@10']:.4f}")


if __name__ == "__main__":
    main()
