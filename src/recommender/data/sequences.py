"""Users' interactions as item sequences, for next-item models (SASRec), and that literature's
data format and split.

A sequence is a user's items in time order (ties: the larger item index is later, the order
Interactions and leave_last_out share), LEFT-padded with the index n_items so the latest item is
always the last column. Every function is vectorised: loops run over at most max_len positions,
never over users or interactions.

- training_sequences: (inputs, targets) for training at every position of every user's
  sequence, in windows of max_len, targets shifted by one.
- latest_sequences: each user's latest items, the input that predicts what comes next.
- read_sasrec: the SASRec data format, one `user item` pair per line in chronological order.
- last_two_out: test = each user's last item, validation = the one before, users with fewer
  than 3 interactions in training only (Kang & McAuley 2018 and the papers that follow it).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from recommender.data.interactions import Interactions
from recommender.utils import DataError


def _ordered(data: Interactions) -> Interactions:
    """`data`, refused unless its timestamps order each user's interactions."""
    if data.timestamp is None:
        raise DataError(
            "sequences (a sequential model, the last_two_out split) need timestamps to order "
            "each user's interactions; this data has none (map data.columns.timestamp, or use "
            "data.format=sasrec, whose line order is the time order)"
        )
    return data


def latest_sequences(data: Interactions, max_len: int) -> np.ndarray:
    """(n_users, max_len) each user's latest max_len items in time order, latest last,
    left-padded with n_items: what a next-item model reads to score the next item.

    Example:
        >>> inter = Interactions(np.array([0, 0, 0]), np.array([2, 0, 1]), 2, 3,
        ...                      timestamp=np.array([30, 10, 20]))
        >>> latest_sequences(inter, 2).tolist()
        [[1, 2], [3, 3]]
    """
    return np.ascontiguousarray(_ordered(data).latest_items(max_len)[:, ::-1])


def training_sequences(data: Interactions, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), each (R, max_len), that predict every item of every user's sequence
    but the first: targets are the inputs shifted by one (the item that followed), n_items
    where the input is padding. Row u is user u's latest max_len + 1 items; a user with more
    gets a further row for each earlier window of max_len targets, appended after the n_users
    first rows, whose first input is the item before the window (the model reads at most
    max_len items in any case). A user with fewer than 2 items has no target; drop rows where
    targets are all n_items before batching.

    Example:
        >>> inter = Interactions(np.array([0, 0, 0, 0]), np.array([2, 0, 1, 3]), 1, 4,
        ...                      timestamp=np.array([30, 10, 20, 40]))
        >>> inputs, targets = training_sequences(inter, 2)
        >>> inputs.tolist(), targets.tolist()
        ([[1, 2], [4, 0]], [[2, 3], [4, 1]])
    """
    order = _ordered(data).time_order()
    items = data.item_idx[order]  # grouped by user, oldest first
    counts = data.user_counts()
    ends = np.cumsum(counts)  # one past each user's latest item in `items`
    windows = np.maximum(-(-(counts - 1) // max_len), 1)  # ceil((count - 1) / max_len)
    first = np.arange(len(counts))
    extra = windows > 1
    users = np.concatenate([first, np.repeat(first[extra], windows[extra] - 1)])
    # Windows counted back from the latest: 0 for the first n_users rows, 1, 2, ... after.
    starts = np.cumsum(windows[extra] - 1) - (windows[extra] - 1)
    later = np.arange(len(users) - len(first)) - np.repeat(starts, windows[extra] - 1) + 1
    back = np.concatenate([np.zeros(len(first), dtype=np.int64), later])
    end = ends[users] - back * max_len
    position = end[:, None] - (max_len + 1) + np.arange(max_len + 1)  # (R, max_len + 1)
    inside = position >= (ends - counts)[users][:, None]
    seq = np.where(inside, items[np.clip(position, 0, None)], data.n_items)
    inputs = np.ascontiguousarray(seq[:, :-1])
    targets = np.where(inputs == data.n_items, data.n_items, seq[:, 1:])
    return inputs, targets


def last_two_out(data: Interactions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) boolean masks over the rows of `data`: each user's latest row is
    test and the one before it validation when the user has at least 3 rows; everything else,
    all rows of users with fewer, is training. At test time the model reads train + valid.

    Example:
        >>> inter = Interactions(np.array([0, 0, 0, 1]), np.array([2, 0, 1, 0]), 2, 3,
        ...                      timestamp=np.array([30, 10, 20, 5]))
        >>> [m.tolist() for m in last_two_out(inter)]
        [[False, True, False, True], [False, False, True, False], [True, False, False, False]]
    """
    order = _ordered(data).time_order()
    users = data.user_idx[order]
    counts = data.user_counts()
    ends = np.cumsum(counts)[users] - 1  # the sorted position of each row's user's latest row
    from_end = ends - np.arange(len(order))  # 0: latest, 1: the one before
    held = counts[users] >= 3
    test = np.zeros(len(data), dtype=bool)
    valid = np.zeros(len(data), dtype=bool)
    test[order[held & (from_end == 0)]] = True
    valid[order[held & (from_end == 1)]] = True
    return ~(test | valid), valid, test


def _check_first_line(path: Path) -> None:
    """The parser silently drops extra fields on the first line, so that line is counted here."""
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                if len(fields) != 2:
                    raise DataError(f"{path} line {number}: expected 2 fields, found {len(fields)}")
                return


def read_sasrec(path: str | Path) -> pd.DataFrame:
    """Read the SASRec data format: one `user item` pair of integer ids per line (space or tab
    separated), each user's lines in chronological order, no header.

    Returns the canonical interactions frame: user_id, item_id (str) and timestamp (int64, the
    1-based line number, so line order is time order). Blank lines are skipped.

    Raises:
        DataError: naming the file and line, for a missing or empty file, a line without
            exactly two fields, or an id that is not a non-negative integer.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'file not found'}")
    _check_first_line(path)
    # A third column catches a line with three fields; the parser reports more than three.
    try:
        frame = pd.read_csv(
            path,
            sep=r"\s+",  # whitespace runs: the C parser's fast path, not a regex
            header=None,
            names=["user_id", "item_id", "extra"],
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            index_col=False,
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty (no data rows)") from None
    except pd.errors.ParserError as exc:
        match = re.search(r"in line (\d+), saw (\d+)", str(exc))
        if match is None:
            raise DataError(f"{path}: cannot parse: {exc}") from None
        line_no, found = match.groups()
        raise DataError(f"{path} line {line_no}: expected 2 fields, found {found}") from None
    line = np.arange(1, len(frame) + 1)
    blank = frame.isna().all(axis=1).to_numpy()
    frame, line = frame[~blank], line[~blank]
    if frame.empty:
        raise DataError(f"{path}: file is empty (no data rows)")
    fields = frame.notna().sum(axis=1).to_numpy()
    if (fields != 2).any():
        bad = int(np.flatnonzero(fields != 2)[0])
        raise DataError(f"{path} line {line[bad]}: expected 2 fields, found {fields[bad]}")
    for column, name in (("user_id", "user"), ("item_id", "item")):
        ok = frame[column].str.fullmatch(r"\d+").to_numpy(dtype=bool)
        if not ok.all():
            bad = int(np.flatnonzero(~ok)[0])
            value = frame[column].iloc[bad]
            raise DataError(f"{path} line {line[bad]}: {name} {value!r} is not an integer id")
    # Integer spelling, so "007" and "7" are one id.
    ids = {c: frame[c].str.lstrip("0").replace("", "0").to_numpy() for c in ("user_id", "item_id")}
    return pd.DataFrame({**ids, "timestamp": line.astype(np.int64)})
