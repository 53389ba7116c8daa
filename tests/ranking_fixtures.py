"""A tiny planted split and a plain training loop for ranking losses, shared by the loss and
graph-model tests: each loss must learn the planted clusters with no Trainer in the way."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from conftest import FixedScores, planted_frame
from recommender.data.interactions import Interactions
from recommender.data.sampling import NegativeSampler, PoolSampler
from recommender.evaluate import evaluate_full
from recommender.losses import bpr, ccl, sampled_softmax
from recommender.models import Popularity, RecModel

# (B,) users, (B, K) items -> (B, K) scores: logits, or cosines for ccl.
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def planted_split(seed: int = 0) -> tuple[Interactions, Interactions]:
    """conftest's planted interactions as indices: (history, each user's latest item held out)."""
    frame = planted_frame(seed=seed).sort_values("timestamp", kind="stable")
    _, users = np.unique(frame["user_id"].to_numpy(), return_inverse=True)
    _, items = np.unique(frame["item_id"].to_numpy(), return_inverse=True)
    n_users, n_items = int(users.max()) + 1, int(items.max()) + 1
    last = np.zeros(len(users), dtype=bool)
    last[np.unique(users[::-1], return_index=True)[1]] = True
    last = last[::-1]  # each user's latest row (rows are in time order)
    return (
        Interactions(users[~last], items[~last], n_users, n_items),
        Interactions(users[last], items[last], n_users, n_items),
    )


def train_ranking(
    params: Iterable[torch.nn.Parameter],
    score: Scorer,
    history: Interactions,
    loss: str,
    *,
    steps: int = 300,
    batch: int = 256,
    lr: float = 0.02,
    negatives: int = 8,
) -> None:
    """Adam on `loss`: bpr, ccl, sampled_softmax/uniform, .../popularity or .../in_batch."""
    g = torch.Generator().manual_seed(0)
    users, items = torch.from_numpy(history.user_idx), torch.from_numpy(history.item_idx)
    sampler = NegativeSampler(history)
    counts = torch.from_numpy(history.item_counts()).float()
    pool = {
        "sampled_softmax/uniform": PoolSampler(counts, 64),
        "sampled_softmax/popularity": PoolSampler(counts, 64, alpha=1.0),
        "sampled_softmax/in_batch": PoolSampler(counts, 0, in_batch=True),
    }.get(loss)
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        rows = torch.randint(len(users), (batch,), generator=g)
        u, i = users[rows], items[rows]
        if pool is None:
            neg = sampler.sample(u, negatives, g)  # (B, N)
            s = score(u, torch.cat([i[:, None], neg], 1))
            value = bpr(s[:, 0], s[:, 1:]) if loss == "bpr" else ccl(s[:, 0], s[:, 1:], 0.5, 2.0)
        else:
            drawn, log_q = pool.sample(i, g)
            s = score(u, torch.cat([i[:, None], drawn.expand(batch, -1)], 1))
            value = sampled_softmax(
                s[:, 0], s[:, 1:], log_q_pos=pool.log_q(i, batch), log_q_neg=log_q,
                pos_items=i, neg_items=drawn,
            )  # fmt: skip
        opt.zero_grad()
        value.backward()
        opt.step()


def hit_rate(model: RecModel | torch.Tensor, history: Interactions, held: Interactions) -> float:
    """Full-ranking HR@10 of a model, or of an (n_users, n_items) score matrix."""
    scorer = FixedScores(model) if isinstance(model, torch.Tensor) else model
    return evaluate_full(scorer, history, held, [10]).metrics["hr@10"]


def popularity_hit_rate(history: Interactions, held: Interactions) -> float:
    popularity = Popularity(history.n_users, history.n_items).fit(history.item_counts())
    return hit_rate(popularity, history, held)
