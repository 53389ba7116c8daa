"""SASRec and its data: causality, padding and truncation invariance, the SASRec data format,
the last-two-out split, the losses on hand cases, and a planted cycle the model must learn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recommender.data.interactions import Interactions
from recommender.data.sequences import (
    last_two_out,
    latest_sequences,
    read_sasrec,
    training_sequences,
)
from recommender.utils import DataError

N_ITEMS = 30


def interactions(users: list[int], items: list[int], times: list[int]) -> Interactions:
    return Interactions(
        np.array(users), np.array(items), max(users) + 1, N_ITEMS, timestamp=np.array(times)
    )


def test_sequences_are_time_ordered_truncated_and_left_padded() -> None:
    # user 0: items 5, 4, 3, 2, 1 at times 1..5 (given out of order); user 1: one item;
    # user 2: a tie at time 7, broken by item index (8 before 9).
    data = interactions(
        [0, 0, 0, 0, 0, 1, 2, 2], [3, 5, 1, 4, 2, 6, 9, 8], [3, 1, 5, 2, 4, 9, 7, 7]
    )
    pad = N_ITEMS
    assert latest_sequences(data, 3).tolist() == [[3, 2, 1], [pad, pad, 6], [pad, 8, 9]]
    inputs, targets = training_sequences(data, 3)
    assert inputs.tolist() == [[4, 3, 2], [pad, pad, pad], [pad, pad, 8]]
    assert targets.tolist() == [[3, 2, 1], [pad, pad, pad], [pad, pad, 9]]


def test_sequences_need_timestamps() -> None:
    data = Interactions(np.array([0, 0]), np.array([1, 2]), 1, N_ITEMS)
    with pytest.raises(DataError, match="timestamps"):
        training_sequences(data, 3)


def test_last_two_out_holds_out_only_users_with_three_or_more() -> None:
    # user 0: 4 rows (times 4, 1, 3, 2), user 1: 2 rows, user 2: 3 rows with a tie at the end.
    data = interactions(
        [0, 0, 0, 0, 1, 1, 2, 2, 2], [1, 2, 3, 4, 1, 2, 7, 6, 5], [4, 1, 3, 2, 1, 2, 1, 5, 5]
    )
    train, valid, test = last_two_out(data)
    assert np.flatnonzero(test).tolist() == [0, 7]  # user 2's tie: item 6 is later than 5
    assert np.flatnonzero(valid).tolist() == [2, 8]
    assert np.flatnonzero(train).tolist() == [1, 3, 4, 5, 6]


def test_read_sasrec_gives_line_order_as_time(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("1 10\n1 007\n\n2 10\r\n")
    frame = read_sasrec(path)
    assert frame["user_id"].tolist() == ["1", "1", "2"]
    assert frame["item_id"].tolist() == ["10", "7", "10"]
    assert frame["timestamp"].tolist() == [1, 2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2\n1 x\n", "line 2: item 'x' is not an integer"),
        ("1 2\n-1 3\n", "line 2: user '-1' is not an integer"),
        ("1 2 3\n1 3\n", "line 1: expected 2 fields, found 3"),
        ("1 2\n\n1 3 4\n", "line 3: expected 2 fields, found 3"),
        ("1 2\n1 3 4 5\n", "line 2: expected 2 fields, found 4"),
        ("1 2\n3\n", "line 2: expected 2 fields, found 1"),
        ("", "file is empty"),
        ("\n\n", "file is empty"),
    ],
)
def test_read_sasrec_names_file_and_line_of_bad_input(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=f"bad.txt {message}|bad.txt: {message}"):
        read_sasrec(path)
