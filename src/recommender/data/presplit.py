"""Data that comes already split: a train file and a test file used exactly as given.

Two layouts are known:
- NCF (He et al. 2017): NAME.train.rating / NAME.test.rating, `user<TAB>item<TAB>rating<TAB>
  timestamp` (the `ml-100k` layout), optionally NAME.test.negative with the published negatives
  of each test pair, so sampled metrics match the paper's.
- LightGCN / NGCF: train.txt / test.txt, one line per user, `user item item ...` (`lightgcn`,
  data/adjacency.py); a user may have many test items, and every test user must have training
  items. The literature ranks the full catalog, so without a negatives file there is no SAMPLED
  protocol.

Validation is carved from the training file only, by a rule that should match how the test split
was made (a validation split unlike the test split picks the wrong epoch): `data.valid_rule`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recommender.data import splits
from recommender.data.adjacency import looks_like_adjacency, read_adjacency
from recommender.data.interactions import Interactions, Vocabulary
from recommender.data.readers import read_interactions, read_negatives
from recommender.utils import ConfigError, DataError

log = logging.getLogger("recommender")

PRESPLIT_FORMATS = ("ml-100k", "lightgcn")  # NCF's .rating layout, the adjacency lists
# What each validation rule holds out, as logged and shown in a run's data source.
VALID_RULES = {
    "latest": "each user's latest training item (leave-last-out)",
    "random_one": "one random training item per user (random leave-one-out)",
    "random_ratio": "a random {ratio:g} of each user's training items, at least one",
}


@dataclass(frozen=True)
class PreSplit:
    """A train/test split read as given.

    Attributes:
        format: "ml-100k" (NCF) or "lightgcn".
        train, test: canonical frames (user_id, item_id and, for NCF, rating and timestamp).
        negatives: the (user_id, item_id) test pair each negatives row belongs to, or None.
        negative_items: (n_rows, n_neg) str ids; row r holds the given negatives of
            `negatives.iloc[r]`, or None.
    """

    format: str
    train: pd.DataFrame
    test: pd.DataFrame
    negatives: pd.DataFrame | None = None
    negative_items: np.ndarray | None = None

    @property
    def sampled(self) -> bool:
        """Whether the SAMPLED protocol applies: not to LightGCN files without negatives."""
        return self.format != "lightgcn" or self.negatives is not None


def presplit_format(train: str | Path, format: str = "auto") -> str:
    """The layout of a pre-split train file: `lightgcn` when `format` says so or (auto) the
    file looks like one, else NCF's `ml-100k`."""
    if format == "auto":
        path = Path(train)
        return "lightgcn" if path.is_file() and looks_like_adjacency(path) else "ml-100k"
    if format not in PRESPLIT_FORMATS:
        raise ConfigError(
            f"data.format={format!r} does not apply to pre-split files; use auto, ml-100k "
            "(NCF .rating files) or lightgcn (train.txt / test.txt of NGCF and LightGCN)"
        )
    return format


def read_presplit(
    train: str | Path,
    test: str | Path,
    negatives: str | Path | None = None,
    format: str = "auto",
) -> PreSplit:
    """Read a train file, a test file and optionally an NCF .test.negative file as given.

    Raises:
        DataError: a bad line in any file, or (lightgcn) a test user without training items,
            naming the file and line.
    """
    fmt = presplit_format(train, format)
    if fmt == "lightgcn":
        train_frame = read_adjacency(Path(train))[0]
        test_frame, test_lines = read_adjacency(Path(test))
        known = pd.Index(train_frame["user_id"].unique())
        orphan = known.get_indexer(test_frame["user_id"]) < 0
        if orphan.any():
            row = int(np.argmax(orphan))
            raise DataError(
                f"{test} line {test_lines[row]}: user {test_frame['user_id'].iloc[row]!r} has "
                f"test items but no training items in {train}"
            )
    else:
        train_frame = read_interactions(train, format=fmt)
        test_frame = read_interactions(test, format=fmt)
    if negatives is None:
        return PreSplit(fmt, train_frame, test_frame)
    return PreSplit(fmt, train_frame, test_frame, *read_negatives(negatives))


def align_negatives(
    pairs: pd.DataFrame,
    negative_items: np.ndarray,
    test: Interactions,
    users: Vocabulary,
    items: Vocabulary,
    negatives_path: str | Path,
    test_path: str | Path,
) -> np.ndarray:
    """(len(test), n_neg) item indices: the given negatives of each test row, in its order;
    `pairs` and `negative_items` as PreSplit holds them."""
    n_items = len(items)
    user_idx = users.lookup(pairs["user_id"].to_numpy())
    item_idx = items.lookup(pairs["item_id"].to_numpy())
    neg_keys = user_idx * n_items + item_idx
    test_keys = test.keys
    stray = (user_idx < 0) | (item_idx < 0) | ~np.isin(neg_keys, test_keys)
    if stray.any():
        row = int(np.flatnonzero(stray)[0])
        raise DataError(
            f"{negatives_path}: negatives line for ({pairs['user_id'].iloc[row]},"
            f"{pairs['item_id'].iloc[row]}), which is not a pair of {test_path}"
        )
    order = np.argsort(neg_keys, kind="stable")
    pos = np.searchsorted(neg_keys[order], test_keys).clip(max=len(order) - 1)
    found = neg_keys[order][pos] == test_keys
    if not found.all():
        row = int(np.flatnonzero(~found)[0])
        raise DataError(
            f"{negatives_path}: no negatives line for test pair "
            f"({users.ids[test.user_idx[row]]},{items.ids[test.item_idx[row]]})"
        )
    flat = items.index(negative_items.ravel()).reshape(negative_items.shape)
    return flat[order[pos]]


def choose_valid_rule(rule: str, train: Interactions, test: Interactions) -> tuple[str, str]:
    """The validation rule to use and why: `rule` itself unless it is `auto`.

    auto: `latest` when the test split can be seen to be each user's latest (timestamps that are
    not all equal, every test item at or after its user's latest training item); otherwise a
    random hold-out shaped like the test split: `random_one` when no user has more than one test
    item, `random_ratio` when some have several.
    """
    if rule != "auto":
        return rule, "set by data.valid_rule"
    ts, test_ts = train.timestamp, test.timestamp
    if ts is None or test_ts is None or not len(ts):
        why = "the files have no timestamps"
    elif min(ts.min(), test_ts.min()) == max(ts.max(), test_ts.max()):
        why = "every timestamp is the same"
    else:
        latest = np.full(train.n_users, np.iinfo(np.int64).min)
        np.maximum.at(latest, train.user_idx, ts)
        if (test_ts >= latest[test.user_idx]).all():
            return "latest", "every test item is at or after its user's latest training item"
        why = "some test items are older than their user's latest training item"
    if test.user_counts().max(initial=0) <= 1:
        return "random_one", f"{why}; the test holds one item per user"
    return "random_ratio", f"{why}; the test holds several items per user"


def describe_rule(rule: str, ratio: float) -> str:
    """What `rule` holds out, in words."""
    return VALID_RULES[rule].format(ratio=ratio)


def carve_validation(
    data: Interactions, rule: str, ratio: float, rng: np.random.Generator, source: str
) -> tuple[Interactions, Interactions]:
    """(train, valid) from the training file's interactions under a chosen rule."""
    if rule == "latest":
        if data.timestamp is None:
            raise DataError(
                f"{source}: data.valid_rule=latest needs timestamps and these files have none; "
                "use random_one or random_ratio"
            )
        return splits.leave_last_out(data)
    if rule == "random_one":
        return splits.random_leave_one_out(data, rng)
    if rule == "random_ratio":
        return splits.random_per_user(data, ratio, rng, minimum=1)
    raise ConfigError(f"unknown data.valid_rule {rule!r} (auto, {', '.join(VALID_RULES)})")
