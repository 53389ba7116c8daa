"""Splits: the right interactions held out, nothing shared between train, validation and test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import planted_frame, write_csv, write_ncf_split
from recommender.config import load_config
from recommender.data import splits
from recommender.data.interactions import Interactions
from recommender.data.pipeline import load_data
from recommender.utils import DataError


def interactions(rows: list[tuple[int, int, int]], n_users: int = 4, n_items: int = 6):
    u, i, t = (np.array(c) for c in zip(*rows, strict=True))
    return Interactions(u, i, n_users, n_items, timestamp=t)


def pairs(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.user_idx.tolist(), data.item_idx.tolist(), strict=True))


def random_interactions(rng: np.random.Generator, n_users=20, n_items=30, n=200) -> Interactions:
    keys = rng.choice(n_users * n_items, size=n, replace=False)
    ts = rng.integers(0, 50, size=n)  # many ties on purpose
    return Interactions(keys // n_items, keys % n_items, n_users, n_items, timestamp=ts)


def assert_partition(data: Interactions, train: Interactions, test: Interactions) -> None:
    assert not pairs(train) & pairs(test)
    assert pairs(train) | pairs(test) == pairs(data)
    assert len(train) + len(test) == len(data)


def test_leave_last_out_holds_out_the_latest_per_user():
    data = interactions(
        [
            (0, 0, 1), (0, 1, 3), (0, 2, 2),  # latest: item 1
            (1, 3, 5), (1, 1, 5), (1, 0, 4),  # tie at t=5: broken by item index -> item 3
            (2, 4, 9),  # a single interaction stays in train
            (3, 5, 1), (3, 0, 2),  # latest: item 0
        ]
    )  # fmt: skip
    train, test = splits.leave_last_out(data)
    assert pairs(test) == {(0, 1), (1, 3), (3, 0)}
    assert (2, 4) in pairs(train)
    assert_partition(data, train, test)
    assert sorted(test.timestamp.tolist()) == [2, 3, 5]


def test_leave_last_out_ties_are_deterministic_whatever_the_row_order(rng: np.random.Generator):
    data = random_interactions(rng)
    _, test = splits.leave_last_out(data)
    perm = rng.permutation(len(data))
    shuffled = Interactions(
        data.user_idx[perm], data.item_idx[perm], data.n_users, data.n_items,
        timestamp=data.timestamp[perm],
    )  # fmt: skip
    _, test2 = splits.leave_last_out(shuffled)
    assert pairs(test) == pairs(test2)


def test_leave_last_out_property(rng: np.random.Generator):
    data = random_interactions(rng)
    train, test = splits.leave_last_out(data)
    assert_partition(data, train, test)
    counts = data.user_counts()
    assert np.all(test.user_counts() == (counts >= 2))
    for u, t in zip(test.user_idx, test.timestamp, strict=True):
        assert t >= train.timestamp[train.user_idx == u].max()


def test_temporal_holds_out_the_globally_latest():
    data = interactions([(u, i, 10 * u + i) for u in range(4) for i in range(2)])
    train, test = splits.temporal(data, 0.25)
    assert len(test) == 2
    assert test.timestamp.min() >= train.timestamp.max()
    assert pairs(test) == {(3, 0), (3, 1)}
    assert_partition(data, train, test)


def test_temporal_property(rng: np.random.Generator):
    data = random_interactions(rng)
    train, test = splits.temporal(data, 0.3)
    assert len(test) == round(0.3 * len(data))
    assert test.timestamp.min() >= train.timestamp.max()
    assert_partition(data, train, test)


def test_random_per_user_ratio_and_determinism(rng: np.random.Generator):
    data = random_interactions(rng)
    train, test = splits.random_per_user(data, 0.25, np.random.default_rng(0))
    assert_partition(data, train, test)
    counts = data.user_counts()
    expected = np.minimum(np.round(counts * 0.25), np.maximum(counts - 1, 0))
    np.testing.assert_array_equal(test.user_counts(), expected)
    assert np.all(train.user_counts() >= np.minimum(counts, 1))  # every user keeps one
    _, again = splits.random_per_user(data, 0.25, np.random.default_rng(0))
    _, other = splits.random_per_user(data, 0.25, np.random.default_rng(1))
    assert pairs(again) == pairs(test)
    assert pairs(other) != pairs(test)


def test_random_per_user_keeps_single_interactions_in_train():
    data = interactions([(0, 0, 0), (1, 1, 0), (1, 2, 0)])
    train, test = splits.random_per_user(data, 0.9, np.random.default_rng(0))
    assert (0, 0) in pairs(train)
    assert len(test) == 1 and test.user_idx[0] == 1


def test_random_leave_one_out_holds_out_one_random_item_per_user(rng: np.random.Generator):
    data = random_interactions(rng)
    train, held = splits.random_leave_one_out(data, np.random.default_rng(0))
    assert_partition(data, train, held)
    np.testing.assert_array_equal(held.user_counts(), (data.user_counts() >= 2).astype(int))
    draws = [
        pairs(splits.random_leave_one_out(data, np.random.default_rng(s))[1]) for s in (0, 0, 1)
    ]
    assert draws[0] == draws[1] == pairs(held) and draws[2] != draws[0]


def test_ncf_files_without_timestamp_order_get_a_random_validation(tmp_path: Path):
    """Timestamps all 0 (a random-LOO copy): "latest" would be the largest item id each time."""
    frame = planted_frame(n_users=30, per_user=8, seed=3)
    frame["timestamp"] = 0
    train, test, _ = write_ncf_split(frame, tmp_path / "ncf", 5)
    overrides = [f"data.train_path={train}", f"data.test_path={test}", "data.dataset=null"]
    valid = [load_data(load_config(None, overrides).data, seed).valid for seed in (1, 1, 2)]
    assert pairs(valid[0]) == pairs(valid[1]) != pairs(valid[2])
    last = splits.leave_last_out(load_data(load_config(None, overrides).data, 1).train_full)[1]
    assert pairs(valid[0]) != pairs(last)
    assert "random leave-one-out" in load_data(load_config(None, overrides).data, 1).source


def test_timestamp_splits_need_timestamps():
    data = Interactions(np.array([0, 0]), np.array([0, 1]), 1, 2)
    for strategy in ("leave_last_out", "temporal"):
        with pytest.raises(DataError, match="needs timestamps"):
            splits.split(data, strategy, 0.2, np.random.default_rng(0))
    train, test = splits.split(data, "random", 0.5, np.random.default_rng(0))
    assert len(train) == len(test) == 1


def test_unknown_strategy():
    data = Interactions(np.array([0]), np.array([0]), 1, 1)
    with pytest.raises(DataError, match="unknown split"):
        splits.split(data, "kfold", 0.2, np.random.default_rng(0))


@pytest.mark.parametrize("strategy", ["leave_last_out", "temporal", "random"])
def test_pipeline_train_valid_test_are_disjoint(tmp_path: Path, strategy: str):
    frame = planted_frame(n_users=40, n_items=30, per_user=12)
    path = write_csv(frame, tmp_path / "data.csv")
    cfg = load_config(None, ["data.dataset=null", f"data.path={path}", f"data.split={strategy}"])
    data = load_data(cfg.data, cfg.seed)
    train, valid, test = pairs(data.train), pairs(data.valid), pairs(data.test)
    assert valid and test
    assert not train & valid and not train & test and not valid & test
    assert len(train | valid | test) == len(frame)
    assert pairs(data.train_full) == train | valid
    # Same seed, same split: evaluation can rebuild the split a model was trained on.
    again = load_data(cfg.data, cfg.seed)
    assert pairs(again.test) == test and pairs(again.valid) == valid
    if strategy == "leave_last_out":
        # Validation is each user's second latest: it never looks past the test item.
        for u, t in zip(data.valid.user_idx, data.valid.timestamp, strict=True):
            assert t <= data.test.timestamp[data.test.user_idx == u].max()
    if strategy == "temporal":
        assert data.valid.timestamp.max() <= data.test.timestamp.min()
        assert data.train.timestamp.max() <= data.valid.timestamp.min()


def test_pipeline_collapses_duplicates_keeping_the_latest(tmp_path: Path):
    path = tmp_path / "d.csv"
    path.write_text(
        "user_id,item_id,rating,timestamp\n"
        "a,1,5,100\na,2,5,50\na,1,3,10\na,3,5,60\na,4,5,70\n"  # (a,1) twice: latest t=100
        "b,1,5,1\nb,2,5,2\nb,3,5,3\n"
    )
    cfg = load_config(None, ["data.dataset=null", f"data.path={path}"])
    data = load_data(cfg.data, cfg.seed)
    assert len(data.train) + len(data.valid) + len(data.test) == 7
    a = data.users.index(["a"])[0]
    held = data.items.to_ids(data.test.item_idx[data.test.user_idx == a])
    assert held.tolist() == ["1"]


def test_pipeline_rating_threshold_and_k_core(tmp_path: Path):
    path = tmp_path / "d.csv"
    rows = [f"u{u},{i},{5 if (u + i) % 3 else 1},{u * 10 + i}" for u in range(6) for i in range(8)]
    rows.append("lonely,99,5,1")
    path.write_text("user_id,item_id,rating,timestamp\n" + "\n".join(rows) + "\n")
    cfg = load_config(
        None,
        [
            "data.dataset=null",
            f"data.path={path}",
            "data.rating_threshold=4",
            "data.min_user_interactions=3",
            "data.min_item_interactions=2",
        ],
    )
    data = load_data(cfg.data, cfg.seed)
    assert "lonely" not in data.users and "99" not in data.items
    full = data.train_full.concat(data.test)
    assert len(full) == sum(1 for u in range(6) for i in range(8) if (u + i) % 3)
    assert full.user_counts().min() >= 3 and full.item_counts().min() >= 2


def test_pipeline_rejects_a_split_with_no_validation_data(tmp_path: Path):
    # Every user has two interactions: one goes to test, one stays in train, and validation
    # (needed for early stopping) would be empty. That must be a clear DataError up front,
    # not a KeyError in the middle of training.
    path = tmp_path / "d.csv"
    path.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{u},{u},1\n{u},{u + 1},2\n" for u in range(5))
    )
    cfg = load_config(None, ["data.dataset=null", f"data.path={path}"])
    with pytest.raises(DataError, match="validation"):
        load_data(cfg.data, cfg.seed)
