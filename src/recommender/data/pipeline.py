"""From a data config to ready training data: read, label, de-duplicate, filter, index, split.

file / built-in dataset / pre-split files (NCF, LightGCN: data/presplit.py)
  -> canonical frame (user_id, item_id, rating, timestamp; raw ids as strings)
  -> implicit positives (rating >= threshold), duplicate pairs collapsed, k-core filter
  -> Vocabulary for users and items, Interactions of indices
  -> test split, then a validation split carved from train (never from test); pre-split files
     keep their test split and carve validation by data.valid_rule; last_two_out
     (the sequential literature's) holds out each user's last two items at once

Large csv / tsv / parquet files take the columnar path (data/columnar.py: same result, a
fraction of the time and memory), and the processed result is cached (data/cache.py) so the
next run with the same data settings memory-maps it instead of ingesting again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recommender.config import DataConfig
from recommender.data import cache, presplit, splits
from recommender.data.columnar import read_indexed
from recommender.data.datasets import load_builtin
from recommender.data.interactions import Interactions, Vocabulary
from recommender.data.readers import read_interactions, requested_columns
from recommender.data.sequences import last_two_out
from recommender.utils import DataError

log = logging.getLogger("recommender")


@dataclass
class DataBundle:
    """Everything training and evaluation need, indexed by one pair of vocabularies.

    `train` fits the model, `valid` (carved from the training data) drives early stopping and
    tuning, `test` is touched only by the final evaluation. `train_full` = train + valid, the
    history that is masked when ranking for test users.
    """

    users: Vocabulary
    items: Vocabulary
    train: Interactions
    valid: Interactions
    test: Interactions
    test_negatives: np.ndarray | None  # (len(test), m) item indices, aligned with test rows
    item_info: pd.DataFrame | None  # item_id, title, genres
    source: str
    # False where the SAMPLED protocol does not apply (LightGCN files without negatives).
    sampled: bool = True
    # train + valid, when the builder already has it (load_data: the two sides of one split).
    _full: Interactions | None = field(default=None, repr=False, compare=False)

    @property
    def train_full(self) -> Interactions:
        """train + valid, built once (a duplicate check over 20M rows takes seconds)."""
        if self._full is None:
            self._full = self.train.concat(self.valid)
        return self._full


def collapse_duplicates(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (user, item): the latest interaction, so leave-last-out sees its real time."""
    if "timestamp" in frame:
        frame = frame.sort_values("timestamp", kind="stable")
    return frame.drop_duplicates(["user_id", "item_id"], keep="last")


def k_core(frame: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Drop users / items below the minimum counts, repeating until both hold."""
    while min_user or min_item:
        users = frame["user_id"].map(frame["user_id"].value_counts())
        items = frame["item_id"].map(frame["item_id"].value_counts())
        keep = (users >= min_user) & (items >= min_item)
        if keep.all():
            break
        frame = frame[keep]
    if frame.empty:
        raise DataError(f"k-core filter ({min_user}, {min_item}) removed every interaction")
    return frame


def to_interactions(frame: pd.DataFrame, users: Vocabulary, items: Vocabulary) -> Interactions:
    return Interactions(
        users.index(frame["user_id"].to_numpy()),
        items.index(frame["item_id"].to_numpy()),
        len(users),
        len(items),
        frame["timestamp"].to_numpy(np.int64) if "timestamp" in frame else None,
        frame["rating"].to_numpy(np.float32) if "rating" in frame else None,
    )


def _implicit(frame: pd.DataFrame, threshold: float | None, source: str) -> pd.DataFrame:
    if threshold is None:
        return frame
    if "rating" not in frame:
        raise DataError(f"{source}: data.rating_threshold is set but there is no rating column")
    kept = frame[frame["rating"] >= threshold]
    if kept.empty:
        raise DataError(f"{source}: no interaction has rating >= {threshold}")
    return kept


def _read_raw(cfg: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    if cfg.path is not None:
        columns = requested_columns(cfg.columns.model_dump())
        frame = read_interactions(cfg.path, format=cfg.format, columns=columns, sep=cfg.sep)
        return frame, None, f"file {cfg.path}"
    if cfg.dataset is None:
        raise DataError("no data: set data.dataset, data.path, or data.train_path/test_path")
    return load_builtin(cfg.dataset, cfg.root)


def load_data(cfg: DataConfig, seed: int) -> DataBundle:
    """Build the DataBundle described by `cfg`; the seed drives random splits only.

    With the cache on (see data.cache), a previous run's processed data is reloaded instead.
    """
    folder = cache.cache_dir(cfg, seed)
    cached = cache.load(folder) if folder is not None else None
    if cached is not None:
        log.info("data: processed cache %s", folder)
    else:
        bundle = _load_presplit(cfg, seed) if cfg.train_path is not None else _load_file(cfg, seed)
        if folder is None:
            _log_sizes(bundle)
            return bundle
        cache.save(
            folder,
            cache.Processed(
                bundle.users,
                bundle.items,
                bundle.train,
                bundle.valid,
                bundle.test,
                bundle.train_full,
                bundle.test_negatives,
                bundle.item_info,
                bundle.source,
                bundle.sampled,
            ),
        )
        log.info("data: processed data cached in %s", folder)
        # Continue from the mapped copy: one buffer for train, valid and train_full, pages the
        # kernel can evict, so the first run needs no more memory than the later ones.
        del bundle
        cached = cache.load(folder)
        if cached is None:
            raise DataError(f"{folder}: the processed cache just written cannot be read back")
    bundle = DataBundle(
        cached.users,
        cached.items,
        cached.train,
        cached.valid,
        cached.test,
        cached.test_negatives,
        cached.item_info,
        cached.source,
        cached.sampled,
        cached.train_full,
    )
    _log_sizes(bundle)
    return bundle


def _load_file(cfg: DataConfig, seed: int) -> DataBundle:
    rng = np.random.default_rng(seed)
    indexed = read_indexed(cfg) if cfg.path is not None else None
    if indexed is not None:
        users, items, data = indexed
        item_info, source = None, f"file {cfg.path}"
    else:
        frame, item_info, source = _read_raw(cfg)
        frame = _implicit(frame, cfg.rating_threshold, source)
        frame = collapse_duplicates(frame)
        frame = k_core(frame, cfg.min_user_interactions, cfg.min_item_interactions)
        users = Vocabulary.from_values(frame["user_id"], "user")
        items = Vocabulary.from_values(frame["item_id"], "item")
        data = to_interactions(frame, users, items)
        del frame
    if cfg.split == "last_two_out":  # one three-way split: test and validation together
        train, valid, test = (data.subset(mask) for mask in last_two_out(data))
    else:
        first, test = splits.split(data, cfg.split, cfg.test_ratio, rng)
        del data  # at 20M rows each copy of the interactions is 0.5 GB
        train, valid = splits.split(first, cfg.split, cfg.valid_ratio, rng)
        del first
    _check_nonempty(source, cfg.split, valid, test)
    full = train.concat(valid, disjoint=True)
    # train and valid become views of full: one copy of the rows in memory, not two.
    n_train = len(train)
    train, valid = full.subset(slice(0, n_train)), full.subset(slice(n_train, None))
    return DataBundle(users, items, train, valid, test, None, item_info, source, _full=full)


def _load_presplit(cfg: DataConfig, seed: int) -> DataBundle:
    """Pre-split files used exactly as given; the catalog is every item in any of them.

    Validation is carved from the training file by data.valid_rule, chosen (auto) to match how
    the test split was made; the rule and the reason are logged and kept in the source.
    """
    assert cfg.train_path is not None and cfg.test_path is not None
    files = presplit.read_presplit(
        cfg.train_path, cfg.test_path, cfg.test_negatives_path, cfg.format
    )
    all_items = [files.train["item_id"], files.test["item_id"]]
    if files.negative_items is not None:
        all_items.append(pd.Series(files.negative_items.ravel()))
    user_ids = pd.concat([files.train["user_id"], files.test["user_id"]])
    users = Vocabulary.from_values(user_ids, "user")
    items = Vocabulary.from_values(pd.concat(all_items), "item")
    train_all = to_interactions(collapse_duplicates(files.train), users, items)
    test = to_interactions(collapse_duplicates(files.test), users, items)
    negatives = None
    if files.negatives is not None and files.negative_items is not None:
        assert cfg.test_negatives_path is not None
        negatives = presplit.align_negatives(
            files.negatives,
            files.negative_items,
            test,
            users,
            items,
            cfg.test_negatives_path,
            cfg.test_path,
        )
    kind = "LightGCN" if files.format == "lightgcn" else "NCF"
    names = f"{kind} split files {cfg.train_path}, {cfg.test_path}"
    rule, why = presplit.choose_valid_rule(cfg.valid_rule, train_all, test)
    held = presplit.describe_rule(rule, cfg.valid_ratio)
    log.info("data: validation rule %s, %s: %s", rule, held, why)
    rng = np.random.default_rng(seed)
    train, valid = presplit.carve_validation(train_all, rule, cfg.valid_ratio, rng, names)
    source = f"{names} (validation: {rule}, {held})"
    _check_nonempty(source, "leave_last_out" if rule == "latest" else "random", valid, test)
    full = train.concat(valid, disjoint=True)
    return DataBundle(
        users, items, train, valid, test, negatives, None, source, files.sampled, full
    )


def _check_nonempty(source: str, split: str, valid: Interactions, test: Interactions) -> None:
    """Early stopping needs validation data and evaluation needs test data: say so up front."""
    hint = (
        f"users need at least 3 interactions under {split}"
        if split in ("leave_last_out", "last_two_out")
        else "raise data.test_ratio / data.valid_ratio or use more data"
    )
    for name, part in (("test", test), ("validation", valid)):
        if not len(part):
            raise DataError(f"{source}: the {split} split leaves no {name} interactions; {hint}")


def _log_sizes(data: DataBundle) -> None:
    log.info(
        "data: %s | %d users, %d items | train %d, valid %d, test %d",
        data.source,
        len(data.users),
        len(data.items),
        len(data.train),
        len(data.valid),
        len(data.test),
    )
