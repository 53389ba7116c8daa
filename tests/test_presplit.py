"""Pre-split files: the LightGCN / NGCF adjacency lists, and the validation rule of each split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import planted_frame, write_lightgcn_split, write_ncf_split
from recommender.config import load_config
from recommender.data import presplit, splits
from recommender.data.adjacency import looks_like_adjacency, read_adjacency
from recommender.data.interactions import Interactions
from recommender.data.pipeline import DataBundle, load_data
from recommender.data.readers import detect_format, read_interactions
from recommender.utils import ConfigError, DataError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode())
    return path


def write_lightgcn(folder: Path, train: dict[int, list[int]], test: dict[int, list[int]]):
    """train.txt and test.txt: one line per user, `user item item ...`."""

    def lines(rows: dict[int, list[int]]) -> str:
        return "".join(" ".join(map(str, [u, *items])) + "\n" for u, items in rows.items())

    return write(folder / "train.txt", lines(train)), write(folder / "test.txt", lines(test))


def write_random_loo(frame: pd.DataFrame, folder: Path) -> tuple[Path, Path]:
    """NCF .rating files holding out one random interaction per user (Microsoft Recommenders'
    random split handed over as files, timestamps included)."""
    shuffled = frame.sample(frac=1.0, random_state=0)
    is_test = ~shuffled["user_id"].duplicated()
    paths = (folder / "r.train.rating", folder / "r.test.rating")
    folder.mkdir(parents=True)
    for part, path in zip((shuffled[~is_test], shuffled[is_test]), paths, strict=True):
        part.to_csv(path, sep="\t", header=False, index=False)
    return paths


def load(train: Path, test: Path, *sets: str) -> DataBundle:
    overrides = ["data.dataset=null", f"data.train_path={train}", f"data.test_path={test}"]
    cfg = load_config(None, [*overrides, *sets])
    return load_data(cfg.data, cfg.seed)


def pairs(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.user_idx.tolist(), data.item_idx.tolist(), strict=True))


# -- the adjacency-list reader ---------------------------------------------------------------


def test_adjacency_lines_become_pairs_with_their_lines(tmp_path: Path):
    path = write(tmp_path / "train.txt", "0 5 007 9\n\n12 3\r\n13\n12 4 \n")
    frame, lines = read_adjacency(path)
    assert frame["user_id"].tolist() == ["0", "0", "0", "12", "12"]
    assert frame["item_id"].tolist() == ["5", "007", "9", "3", "4"]  # ids stay the text written
    assert lines.tolist() == [1, 1, 1, 3, 5]  # the blank line and the item-less user count
    assert list(read_interactions(path).columns) == ["user_id", "item_id"]
    assert read_interactions(path).equals(read_interactions(path, format="lightgcn"))


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("0 1 2\n1 2 x3\n", ["line 2", "'x3'"]),
        ("0 1 2\n1 -2\n", ["line 2", "'-2'"]),
        ("0 1 2\n\n1\t2\n", ["line 3", "'1\\t2'"]),
        ("0 1.5\n", ["line 1", "'1.5'"]),
        ("", ["file is empty"]),
        (" \n\n", ["file is empty"]),
        ("0\n1\n", ["no line lists an item"]),
    ],
)
def test_adjacency_errors_name_the_file_and_line(tmp_path: Path, text: str, fragments: list[str]):
    path = write(tmp_path / "train.txt", text)
    with pytest.raises(DataError) as error:
        read_interactions(path, format="lightgcn")
    message = str(error.value)
    assert message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_auto_detection_knows_adjacency_lists_by_their_first_line(tmp_path: Path):
    assert detect_format(write(tmp_path / "train.txt", "\n0 1 2\n1 3\n")).name == "lightgcn"
    assert detect_format(write(tmp_path / "data", "0 1\n")).name == "lightgcn"
    assert not looks_like_adjacency(write(tmp_path / "one.txt", "7\n"))
    assert not looks_like_adjacency(write(tmp_path / "tab.txt", "0\t1\n"))
    with pytest.raises(ConfigError, match="headerless format 'lightgcn'"):
        detect_format(tmp_path / "train.txt", "lightgcn", {"user": "u", "item": "i"})


# -- LightGCN split files --------------------------------------------------------------------


def test_lightgcn_files_keep_their_split_and_catalog(tmp_path: Path):
    train, test = write_lightgcn(tmp_path, {0: [1, 2, 3], 1: [2, 4], 2: [5]}, {0: [6, 7], 1: [1]})
    data = load(train, test)
    assert data.users.to_list() == ["0", "1", "2"]
    assert data.items.to_list() == ["1", "2", "3", "4", "5", "6", "7"]  # items of either file
    test_pairs = {(data.users.ids[u], data.items.ids[i]) for u, i in pairs(data.test)}
    assert test_pairs == {("0", "6"), ("0", "7"), ("1", "1")}
    assert len(data.train_full) == 6 and not pairs(data.train_full) & pairs(data.test)
    assert not data.sampled and data.test_negatives is None
    assert data.source.startswith("LightGCN split files")


def test_a_test_user_without_training_items_is_refused(tmp_path: Path):
    train, test = write_lightgcn(tmp_path, {0: [1, 2], 1: []}, {0: [3], 1: [4]})
    with pytest.raises(DataError) as error:
        load(train, test)
    message = str(error.value)
    assert message.startswith(f"{test} line 2:") and "'1'" in message and str(train) in message


def test_a_test_line_without_items_is_a_user_with_none(tmp_path: Path):
    train, test = write_lightgcn(tmp_path, {0: [1, 2, 3], 1: [2, 4, 5]}, {0: [4], 1: [], 2: []})
    data = load(train, test)
    assert np.unique(data.test.user_idx).tolist() == [0]


def test_pre_split_format_is_checked(tmp_path: Path):
    train, test = write_lightgcn(tmp_path, {0: [1, 2]}, {0: [3]})
    assert load(train, test, "data.format=lightgcn").source.startswith("LightGCN")
    with pytest.raises(ConfigError, match=r"data\.format='csv' does not apply to pre-split"):
        load(train, test, "data.format=csv")
    ncf_train, ncf_test, _ = write_ncf_split(planted_frame(n_users=20), tmp_path / "ncf")
    with pytest.raises(DataError, match=r"x\.train\.rating line 1: expected integer ids"):
        load(ncf_train, ncf_test, "data.format=lightgcn")


# -- the validation rule ---------------------------------------------------------------------


def test_auto_rule_follows_the_test_split(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    frame = planted_frame(n_users=30, per_user=8)
    # the NCF paper's files: each user's latest item to test -> validate on the latest
    latest = load(*write_ncf_split(frame, tmp_path / "latest")[:2])
    assert "validation: latest" in latest.source
    assert pairs(latest.valid) == pairs(splits.leave_last_out(latest.train_full)[1])
    # a random test item per user, timestamps kept -> one random validation item per user
    with caplog.at_level(logging.INFO, logger="recommender"):
        one = load(*write_random_loo(frame, tmp_path / "random"))
    assert "validation: random_one" in one.source
    assert "older than their user's latest training item" in caplog.text
    np.testing.assert_array_equal(one.valid.user_counts(), np.ones(30))
    # LightGCN files: no timestamps, several test items per user -> a random fraction
    many = load(*write_lightgcn_split(planted_frame(), tmp_path / "lightgcn"))
    assert "validation: random_ratio" in many.source
    counts, before = many.valid.user_counts(), many.train_full.user_counts()
    np.testing.assert_array_equal(counts, np.maximum(np.round(before * 0.1), 1))


def test_a_chosen_rule_wins_and_is_seeded(tmp_path: Path):
    files = write_ncf_split(planted_frame(n_users=30, per_user=8), tmp_path / "ncf")[:2]
    ratio = load(*files, "data.valid_rule=random_ratio", "data.valid_ratio=0.3")
    assert "validation: random_ratio, a random 0.3" in ratio.source
    np.testing.assert_array_equal(ratio.valid.user_counts(), np.full(30, 2))  # round(7 * 0.3)
    seeded = [load(*files, "data.valid_rule=random_one", f"seed={s}").valid for s in (1, 1, 2)]
    assert pairs(seeded[0]) == pairs(seeded[1]) != pairs(seeded[2])


def test_latest_needs_timestamps_and_pre_split_files(tmp_path: Path):
    train, test = write_lightgcn(tmp_path, {0: [1, 2, 3]}, {0: [4]})
    with pytest.raises(DataError, match="valid_rule=latest needs timestamps"):
        load(train, test, "data.valid_rule=latest")
    with pytest.raises(ConfigError, match="valid_rule=random_one applies to pre-split files"):
        load_config(None, ["data.valid_rule=random_one"])


def test_equal_timestamps_show_no_order():
    train = Interactions(np.array([0, 0, 1]), np.array([0, 1, 2]), 2, 4, np.zeros(3, np.int64))
    test = Interactions(np.array([0, 1]), np.array([3, 3]), 2, 4, np.zeros(2, np.int64))
    assert presplit.choose_valid_rule("auto", train, test) == (
        "random_one",
        "every timestamp is the same; the test holds one item per user",
    )
    assert presplit.choose_valid_rule("latest", train, test) == (
        "latest",
        "set by data.valid_rule",
    )


def test_read_presplit_reads_ncf_files_as_before(tmp_path: Path):
    train, test, negatives = write_ncf_split(planted_frame(n_users=10), tmp_path / "ncf", 5)
    files = presplit.read_presplit(train, test, negatives)
    assert files.format == "ml-100k" and files.sampled
    assert isinstance(files.train, pd.DataFrame) and "timestamp" in files.train
    assert files.negative_items is not None and files.negative_items.shape == (10, 5)
