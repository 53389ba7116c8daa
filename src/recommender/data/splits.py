"""Train / test splits, all vectorized and deterministic for a given seed.

- leave_last_out: each user's latest interaction is held out (the NCF protocol); ties in
  timestamp are broken by item index, which follows raw-id order, so the split is reproducible.
- temporal: the globally latest fraction of interactions is held out (no future leaks into train).
- random: per user, a random fraction is held out (the Microsoft Recommenders protocol).

The same functions carve the validation split from train, so the test split never informs
training or model selection.
"""

from __future__ import annotations

import numpy as np

from recommender.data.interactions import Interactions
from recommender.utils import DataError


def _require_timestamps(data: Interactions, split: str) -> np.ndarray:
    if data.timestamp is None:
        raise DataError(f"the '{split}' split needs timestamps; use data.split=random instead")
    return data.timestamp


def _hold_out_last(data: Interactions, order: np.ndarray) -> tuple[Interactions, Interactions]:
    """Hold out each user's last row in `order` (rows grouped by user, each user's rows in
    the order that decides); users with a single interaction keep it."""
    users = data.user_idx[order]
    is_last = np.ones(len(order), dtype=bool)
    is_last[:-1] = users[1:] != users[:-1]
    held = order[is_last & (data.user_counts()[users] >= 2)]
    test_mask = np.zeros(len(data), dtype=bool)
    test_mask[held] = True
    return data.subset(~test_mask), data.subset(test_mask)


def leave_last_out(data: Interactions) -> tuple[Interactions, Interactions]:
    """Hold out each user's latest interaction in Interactions.time_order (ties: the larger
    item index is later)."""
    _require_timestamps(data, "leave_last_out")
    return _hold_out_last(data, data.time_order())


def random_leave_one_out(
    data: Interactions, rng: np.random.Generator
) -> tuple[Interactions, Interactions]:
    """Hold out one random interaction of each user with two or more (NCF's random LOO)."""
    # the last by -u is the first by u
    return _hold_out_last(data, np.lexsort((-rng.random(len(data)), data.user_idx)))


def temporal(data: Interactions, ratio: float) -> tuple[Interactions, Interactions]:
    """Hold out the globally latest `ratio` of interactions."""
    ts = _require_timestamps(data, "temporal")
    order = np.lexsort((data.item_idx, data.user_idx, ts))
    n_test = round(len(data) * ratio)
    test_mask = np.zeros(len(data), dtype=bool)
    test_mask[order[len(data) - n_test :]] = True
    return data.subset(~test_mask), data.subset(test_mask)


def random_per_user(
    data: Interactions, ratio: float, rng: np.random.Generator, minimum: int = 0
) -> tuple[Interactions, Interactions]:
    """Hold out round(ratio * n_u) random interactions of each user, but at least `minimum`
    (validation on every user with two or more), and keep at least one."""
    order = np.lexsort((rng.random(len(data)), data.user_idx))
    users = data.user_idx[order]
    counts = data.user_counts()
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(order)) - starts[users]
    n_test = np.minimum(np.maximum(np.round(counts * ratio), minimum), np.maximum(counts - 1, 0))
    test_mask = np.zeros(len(data), dtype=bool)
    test_mask[order[rank < n_test[users]]] = True
    return data.subset(~test_mask), data.subset(test_mask)


def split(
    data: Interactions, strategy: str, ratio: float, rng: np.random.Generator
) -> tuple[Interactions, Interactions]:
    if strategy == "leave_last_out":
        return leave_last_out(data)
    if strategy == "temporal":
        return temporal(data, ratio)
    if strategy == "random":
        return random_per_user(data, ratio, rng)
    raise DataError(f"unknown split '{strategy}' (leave_last_out, temporal, random)")
