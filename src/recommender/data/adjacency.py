"""Adjacency-list interaction files, the format of the graph-recommendation literature.

NGCF (Wang et al. 2019) and LightGCN (He et al. 2020) publish their splits of Gowalla, Yelp2018
and Amazon-Book as `train.txt` / `test.txt`: one line per user, `user item item ...`, integer
ids separated by spaces. A line may hold the user alone (no items in that file), as some test
files do. `readers.detect_format` names this format `lightgcn`.

The whole file is parsed as one byte buffer with numpy: a per-item Python loop over Gowalla's
810k training pairs would take seconds; this takes a fraction of one. Ids stay the text written
(strings, like every reader's), so "007" keeps its zeros.

Example:
    >>> frame, lines = read_adjacency(Path("gowalla/train.txt"))  # doctest: +SKIP
    >>> frame.iloc[0].tolist(), int(lines[0])                     # doctest: +SKIP
    (['0', '0'], 1)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from recommender.utils import DataError

# Two or more integers separated by spaces: a user and at least one item.
_USER_LINE = re.compile(rb"\d+( +\d+)+ *\r?\n?")
_SNIFF_BYTES = 1 << 20


def looks_like_adjacency(path: Path) -> bool:
    """True when the file's first non-blank line is `user item ...` in integers and spaces:
    how `data.format: auto` tells these files from the others."""
    with open(path, "rb") as f:
        for line in iter(lambda: f.readline(_SNIFF_BYTES), b""):
            if line.strip():
                return _USER_LINE.fullmatch(line.lstrip(b" ")) is not None
    return False


def read_adjacency(path: Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read an adjacency-list file into (user_id, item_id) pairs, in file order.

    Returns:
        The canonical frame (user_id, item_id: str; no rating, no timestamp) and the 1-based
        line of each row, for messages about a pair found wrong later (a test user without
        training items).

    Raises:
        DataError: a missing or empty file, no item on any line, or a field that is not a
            non-negative integer; the message names the file and the line.
    """
    if not path.is_file():
        raise DataError(f"{path}: {'is a directory' if path.is_dir() else 'file not found'}")
    data = path.read_bytes()
    buf = np.frombuffer(data, dtype=np.uint8)
    digit = (buf >= ord("0")) & (buf <= ord("9"))
    bad = ~(digit | (buf == ord(" ")) | (buf == ord("\n")) | (buf == ord("\r")))
    if bad.any():
        _raise_bad_field(path, data, int(np.argmax(bad)))
    # Tokens are runs of digits; each one's line is the number of newlines before it.
    starts = np.flatnonzero(digit & ~np.concatenate([[False], digit[:-1]]))
    if not len(starts):
        raise DataError(f"{path}: file is empty (no data rows)")
    line = np.searchsorted(np.flatnonzero(buf == ord("\n")), starts)
    first = np.concatenate([[True], line[1:] != line[:-1]])  # the user id opening each line
    is_item = ~first
    if not is_item.any():
        raise DataError(f"{path}: no line lists an item (expected 'user item item ...')")
    ids = np.array(data.split()).astype(str)  # the same tokens, as text
    owner = np.maximum.accumulate(np.where(first, np.arange(len(first)), 0))
    frame = pd.DataFrame({"user_id": ids[owner[is_item]], "item_id": ids[is_item]}).astype(str)
    return frame, line[is_item] + 1


def _raise_bad_field(path: Path, data: bytes, position: int) -> None:
    """Name the line and the whole field holding the first byte that is not a digit or space."""
    begin = data.rfind(b"\n", 0, position) + 1
    end = data.find(b"\n", position)
    text = data[begin : len(data) if end < 0 else end].decode("utf-8", errors="replace")
    offset = len(data[begin:position].decode("utf-8", errors="replace"))
    field = text[:offset].rsplit(" ", 1)[-1] + text[offset:].split(" ", 1)[0]
    number = data.count(b"\n", 0, position) + 1
    raise DataError(
        f"{path} line {number}: expected integer ids separated by spaces, found {field!r}"
    )
