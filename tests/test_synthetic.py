"""The synthetic generator: its guarantees, a planted structure models can find, streamed files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from recommender.data import synthetic
from recommender.data.readers import read_interactions
from recommender.data.synthetic import synthetic_interactions, write_synthetic
from recommender.utils import ConfigError


def assert_synthetic_guarantees(frame: pd.DataFrame, n_users: int, cap: int) -> None:
    """The documented guarantees: 5..cap distinct items per user, time increasing per user."""
    assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert frame["timestamp"].dtype == np.int64 and frame["rating"].dtype == np.float64
    assert not frame.duplicated(["user_id", "item_id"]).any()
    per_user = frame.groupby("user_id").size()
    assert len(per_user) == n_users and per_user.min() >= 5 and per_user.max() <= cap
    assert frame["rating"].between(1, 5).all()
    users = frame["user_id"].astype(int).to_numpy()
    assert (np.diff(users) >= 0).all()  # sorted by user
    same_user = np.diff(users) == 0
    assert (np.diff(frame["timestamp"].to_numpy())[same_user] > 0).all()


def test_synthetic_shape_invariants_and_determinism():
    frame = synthetic_interactions(300, 200, 9_000, seed=3)
    assert len(frame) == 9_000
    assert_synthetic_guarantees(frame, 300, 100)
    per_user = frame.groupby("user_id").size()
    assert per_user.max() > 3 * per_user.median()  # long-tailed activity
    assert frame["rating"].nunique() == 5
    pd.testing.assert_frame_equal(frame, synthetic_interactions(300, 200, 9_000, seed=3))
    assert not frame.equals(synthetic_interactions(300, 200, 9_000, seed=4))


def test_synthetic_heavy_users_reach_the_cap():
    frame = synthetic_interactions(20, 40, 400, seed=0)  # every user needs all 20 allowed items
    assert (frame.groupby("user_id").size() == 20).all()
    assert not frame.duplicated(["user_id", "item_id"]).any()


def hit_rate(scores: np.ndarray, train: np.ndarray, held_out: np.ndarray, k: int = 10) -> float:
    scores = np.where(train > 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == held_out[:, None]).any(axis=1).mean())


def test_synthetic_structure_rewards_collaborative_models():
    frame = synthetic_interactions(600, 300, 24_000, seed=0)
    users = frame["user_id"].astype(int).to_numpy() - 1
    items = frame["item_id"].astype(int).to_numpy() - 1
    last = frame.groupby("user_id", sort=False)["timestamp"].transform("max").to_numpy()
    test = frame["timestamp"].to_numpy() == last
    train = np.zeros((600, 300))
    train[users[~test], items[~test]] = 1.0
    held_out = np.empty(600, dtype=np.int64)
    held_out[users[test]] = items[test]

    popularity = np.broadcast_to(train.sum(axis=0), train.shape)
    norms = np.sqrt(train.sum(axis=0)) + 1e-9
    cosine = (train.T @ train) / norms[:, None] / norms[None, :]
    np.fill_diagonal(cosine, 0.0)
    knn = train @ cosine
    random_hr = float(np.mean(10 / (300 - train.sum(axis=1))))

    hr_pop, hr_knn = hit_rate(popularity, train, held_out), hit_rate(knn, train, held_out)
    assert hr_pop > 1.5 * random_hr
    assert hr_knn > 1.2 * hr_pop


def test_synthetic_argument_checks(tmp_path: Path):
    with pytest.raises(ConfigError, match="n_interactions"):
        synthetic_interactions(100, 50, 100)
    with pytest.raises(ConfigError, match="n_items >= 10"):
        synthetic_interactions(10, 5, 50)
    with pytest.raises(ConfigError, match="seed must be a non-negative integer, got -1"):
        synthetic_interactions(seed=-1)
    with pytest.raises(ConfigError, match="n_interactions"):
        write_synthetic(tmp_path / "s.parquet", n_users=100, n_items=50, n_interactions=100)
    assert list(tmp_path.iterdir()) == []


def test_write_synthetic(tmp_path: Path):
    kwargs = {"n_users": 20, "n_items": 30, "n_interactions": 200, "seed": 1}
    expected = synthetic_interactions(**kwargs)
    for name in ("s.parquet", "s.csv"):
        path = write_synthetic(tmp_path / name, **kwargs)
        pd.testing.assert_frame_equal(read_interactions(path), expected, check_dtype=False)
    with pytest.raises(ConfigError, match=r"parquet or \.csv"):
        write_synthetic(tmp_path / "s.json", **kwargs)


def test_synthetic_blocks_are_streamed_and_independent_of_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    kwargs = {"n_users": 60, "n_items": 60, "n_interactions": 1_500, "seed": 2}
    default_blocks = synthetic_interactions(**kwargs)  # one block at this size
    monkeypatch.setattr(synthetic, "_BLOCK_ROWS", 100)
    frame = synthetic_interactions(**kwargs)
    assert len(frame) == 1_500
    assert_synthetic_guarantees(frame, 60, 30)
    # Activity is drawn globally, the items per block: same counts, different rows.
    pd.testing.assert_series_equal(
        frame.groupby("user_id").size(), default_blocks.groupby("user_id").size()
    )
    assert not frame.equals(default_blocks)

    # The files hold exactly the frame's rows, written block by block without building it.
    monkeypatch.setattr(synthetic, "synthetic_interactions", None)
    parquet = pq.ParquetFile(write_synthetic(tmp_path / "s.parquet", **kwargs))
    groups = [parquet.read_row_group(g).to_pandas() for g in range(parquet.num_row_groups)]
    assert 10 <= len(groups) <= 15  # 1,500 rows cut near every 100th row
    assert all(len(g) < 100 + 30 for g in groups)
    owners = [set(g["user_id"]) for g in groups]
    assert sum(map(len, owners)) == 60  # every user's rows lie in one block
    pd.testing.assert_frame_equal(pd.concat(groups, ignore_index=True), frame)
    csv = read_interactions(write_synthetic(tmp_path / "s.csv", **kwargs))
    pd.testing.assert_frame_equal(csv, frame, check_dtype=False)


def test_data_synthetic_command_writes_the_generator_s_rows(tmp_path: Path, capsys):
    from recommender.cli import main

    out = tmp_path / "s.parquet"
    args = ["--users", "30", "--items", "20", "--interactions", "200", "--seed", "3"]
    assert main(["data", "synthetic", *args, "--out", str(out)]) == 0
    assert "200 interactions, 30 users, 20 items" in capsys.readouterr().out
    expected = synthetic_interactions(30, 20, 200, seed=3)
    pd.testing.assert_frame_equal(read_interactions(out), expected, check_dtype=False)
