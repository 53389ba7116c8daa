"""The canonical interaction data: vocabularies of raw ids and validated index arrays.

`user_id` / `item_id` are the raw external ids (always strings); `user_idx` / `item_idx` are
contiguous indices into embedding tables. A `Vocabulary` maps between them and travels with every
saved model, so serving maps raw ids exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch

from recommender.utils import DataError, RecommenderError

# Ids per slice of work over a vocabulary's ids (their conversion here, their unpacking from
# a checkpoint: the longest either holds the GIL is about 1 ms), and the most ids a lookup
# takes by binary search rather than through the pandas Index.
LOOKUP_SLICE = 10_000


def _as_arrow(ids: np.ndarray) -> pa.ChunkedArray | None:
    """(n,) ids as one Arrow string column, converted slice by slice; None when an id is not
    a str (or is None)."""
    chunks = []
    for start in range(0, len(ids), LOOKUP_SLICE):
        try:
            chunk = pa.array(ids[start : start + LOOKUP_SLICE], type=pa.large_string())
        except (pa.ArrowException, UnicodeError):
            return None
        if chunk.null_count:
            return None
        chunks.append(chunk)
    return pa.chunked_array(chunks, type=pa.large_string())


def _copy(ids: np.ndarray) -> np.ndarray:
    """A copy of an (n,) object array, LOOKUP_SLICE items per call."""
    copy = np.empty(len(ids), dtype=object)
    for start in range(0, len(ids), LOOKUP_SLICE):
        copy[start : start + LOOKUP_SLICE] = ids[start : start + LOOKUP_SLICE]
    return copy


def _sort_ids(ids: np.ndarray) -> np.ndarray:
    """Numeric order when every id is an integer (so "10" follows "9"), else lexicographic."""
    numeric = pd.to_numeric(pd.Series(ids), errors="coerce")
    if len(ids) and numeric.notna().all() and (numeric % 1 == 0).all():
        return ids[np.argsort(numeric.to_numpy(), kind="stable")]
    return np.sort(ids)


class Vocabulary:
    """Bidirectional map between raw ids (strings) and contiguous indices 0..n-1.

    Unknown ids are never silently mapped: `index` raises, `lookup` returns -1 for the caller
    to handle (the popularity fallback for users, an error for items).

    A few ids (what a request asks for) are found by binary search in the ids' sorted order;
    many (a data file's columns) through a pandas Index, built when first needed. The order,
    and the check for duplicates along it, are Arrow's (its compute functions run without
    the GIL) over the ids converted slice by slice, so building a vocabulary leaves the GIL to
    other threads almost throughout. A service loading a new model version beside the
    serving one stalls every request of its process for as long as a load holds it; dicts
    of 1,000,000 ids held it for about 0.4 s of Python in all, while the sorted order is
    built in about 0.11 s, most of it without the GIL (docs/BENCHMARKS.md).
    """

    def __init__(self, ids: Sequence[str] | np.ndarray, name: str = "id") -> None:
        self.name = name
        ids = np.asarray(ids, dtype=object)
        column = _as_arrow(ids)
        if column is None:
            ids = ids.astype(str).astype(object)
            column = _as_arrow(ids)
            if column is None:
                raise DataError(f"{name} vocabulary has an id that is not valid text")
        else:  # a copy of the caller's array, slice by slice (one call holds the GIL 10 ms)
            ids = _copy(ids)
        ids.flags.writeable = False  # shared with callers (`ids`)
        self._ids = ids
        order = pc.sort_indices(column)
        self._order = order.to_numpy().astype(np.int64)
        ordered = column.take(order).combine_chunks()
        same = pc.equal(ordered.slice(1), ordered.slice(0, max(len(ids) - 1, 0)))
        if pc.any(same).as_py():
            dup = ordered[pc.index(same, True).as_py()].as_py()
            raise DataError(f"{name} vocabulary has duplicate id '{dup}'")

    @cached_property
    def _index(self) -> pd.Index:
        """For lookups of many ids at once (object dtype, not pandas' Arrow-backed str: a
        1M-id index builds in half the time, and lookups cost the same)."""
        return pd.Index(self._ids, dtype=object)

    @classmethod
    def from_values(cls, values: np.ndarray | pd.Series, name: str = "id") -> Vocabulary:
        return cls(_sort_ids(pd.unique(np.asarray(values, dtype=object).astype(str))), name)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, raw_id: object) -> bool:
        return bool(self._search(np.array([str(raw_id)], dtype=object))[0] >= 0)

    @property
    def ids(self) -> np.ndarray:
        return self._ids

    def _search(self, keys: np.ndarray) -> np.ndarray:
        """(k,) str keys -> (k,) indices, -1 where unknown: a binary search in sorted order
        (Arrow's order of UTF-8 bytes is Python's order of str)."""
        if not len(self._ids):
            return np.full(len(keys), -1, dtype=np.int64)
        at = np.searchsorted(self._ids, keys, sorter=self._order)
        idx = self._order[np.minimum(at, len(self._ids) - 1)]
        return np.where(self._ids[idx] == keys, idx, -1).astype(np.int64)

    def lookup(self, raw_ids: Sequence[object] | np.ndarray | pd.Series) -> np.ndarray:
        """Vectorized raw -> index; -1 where the id is unknown."""
        arr = np.asarray(raw_ids, dtype=object)
        if len(arr) <= LOOKUP_SLICE:
            keys = np.empty(len(arr), dtype=object)
            keys[:] = [str(x) for x in arr]
            return self._search(keys)
        return self._index.get_indexer(pd.Index(arr.astype(str), dtype=object)).astype(np.int64)

    def index(self, raw_ids: Sequence[object] | np.ndarray | pd.Series) -> np.ndarray:
        """Raw -> index, raising on the first unknown id."""
        idx = self.lookup(raw_ids)
        if (idx < 0).any():
            bad = np.asarray(raw_ids, dtype=object)[np.flatnonzero(idx < 0)[0]]
            raise RecommenderError(f"unknown {self.name} '{bad}'")
        return idx

    def to_ids(self, idx: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return self.ids[np.asarray(idx, dtype=np.int64)]

    def to_list(self) -> list[str]:
        return self._ids.tolist()

    def release(self) -> None:
        """Free the lookups and the ids; the vocabulary is empty afterwards (for a replaced
        model version freed while another serves, lifecycle.release_later)."""
        self.__dict__.pop("_index", None)
        self._order = np.empty(0, dtype=np.int64)
        self._ids = np.empty(0, dtype=object)


@dataclass
class Interactions:
    """Positive (user_idx, item_idx) pairs with optional rating and timestamp, one row each.

    Validated on construction: equal lengths, indices inside the vocabularies, no duplicates.
    """

    user_idx: np.ndarray
    item_idx: np.ndarray
    n_users: int
    n_items: int
    timestamp: np.ndarray | None = None
    rating: np.ndarray | None = None
    _csr: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._check_shapes()
        if len(self.user_idx):
            keys = np.sort(self.keys)
            dup = np.flatnonzero(keys[1:] == keys[:-1])
            if len(dup):
                key = int(keys[dup[0]])
                raise DataError(
                    f"duplicate interaction (user_idx {key // self.n_items}, "
                    f"item_idx {key % self.n_items})"
                )

    @classmethod
    def known_unique(
        cls,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        n_users: int,
        n_items: int,
        timestamp: np.ndarray | None = None,
        rating: np.ndarray | None = None,
        *,
        csr: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> Interactions:
        """Build from arrays whose pairs are already known to be distinct.

        For derived data only: a subset of validated interactions, the two sides of one split,
        pairs de-duplicated by the caller, or a processed cache this package wrote. Lengths and
        index ranges are still checked (O(n)); the duplicate check, a sort costing seconds at
        20M rows, is what is skipped. Raw input always goes through the constructor.
        """
        self = object.__new__(cls)
        self.user_idx, self.item_idx = user_idx, item_idx
        self.n_users, self.n_items = n_users, n_items
        self.timestamp, self.rating, self._csr = timestamp, rating, csr
        self._check_shapes()
        return self

    def _check_shapes(self) -> None:
        self.user_idx = np.ascontiguousarray(self.user_idx, dtype=np.int64)
        self.item_idx = np.ascontiguousarray(self.item_idx, dtype=np.int64)
        n = len(self.user_idx)
        if len(self.item_idx) != n:
            raise DataError("user_idx and item_idx differ in length")
        for name, arr in (("timestamp", self.timestamp), ("rating", self.rating)):
            if arr is not None and len(arr) != n:
                raise DataError(f"{name} length {len(arr)} differs from {n} interactions")
        if n:
            if self.user_idx.min() < 0 or self.user_idx.max() >= self.n_users:
                raise DataError("user_idx outside the user vocabulary")
            if self.item_idx.min() < 0 or self.item_idx.max() >= self.n_items:
                raise DataError("item_idx outside the item vocabulary")

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def keys(self) -> np.ndarray:
        """user_idx * n_items + item_idx: one int64 per pair, for set operations."""
        return self.user_idx * self.n_items + self.item_idx

    def subset(self, mask: np.ndarray | slice) -> Interactions:
        """The rows selected by a boolean mask, an index array or a slice (a view, no copy);
        distinct pairs stay distinct."""
        return Interactions.known_unique(
            self.user_idx[mask],
            self.item_idx[mask],
            self.n_users,
            self.n_items,
            None if self.timestamp is None else self.timestamp[mask],
            None if self.rating is None else self.rating[mask],
        )

    def concat(self, other: Interactions, *, disjoint: bool = False) -> Interactions:
        """Rows of self, then rows of other. `disjoint=True` says no pair is in both (the two
        sides of one split), which skips the duplicate check; otherwise it is checked."""

        def cat(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
            return None if a is None or b is None else np.concatenate([a, b])

        build = Interactions.known_unique if disjoint else Interactions
        return build(
            np.concatenate([self.user_idx, other.user_idx]),
            np.concatenate([self.item_idx, other.item_idx]),
            self.n_users,
            self.n_items,
            cat(self.timestamp, other.timestamp),
            cat(self.rating, other.rating),
        )

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, items): the items of user u are items[indptr[u]:indptr[u+1]], sorted."""
        if self._csr is None:
            # Pairs are distinct, so sorting the one-int64 keys orders by user, then item:
            # one sort instead of lexsort's two passes (about 3x faster at 20M rows).
            counts = np.bincount(self.user_idx, minlength=self.n_users)
            indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            items = self.keys  # a fresh array: sorted and reduced in place, no temporaries
            items.sort()
            items %= self.n_items
            self._csr = (indptr, items)
        return self._csr

    def user_counts(self) -> np.ndarray:
        return np.bincount(self.user_idx, minlength=self.n_users)

    def item_counts(self) -> np.ndarray:
        return np.bincount(self.item_idx, minlength=self.n_items)

    def seen_mask(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) coordinates of the seen items of `users`, row indexing into `users`."""
        return csr_rows(*self.csr(), users)

    def time_order(self) -> np.ndarray:
        """Row order by user, then time; ties in time put the larger item index later.

        The one definition of a user's time order: splits.leave_last_out holds out each
        user's last row in it, and previous_items / latest_items read the context from it.
        Without timestamps this raises the model.context message; a split checks first and
        names itself.
        """
        if self.timestamp is None:
            raise DataError(
                "model.context needs timestamps to order each user's interactions; this data "
                "has none (map data.columns.timestamp, or set model.context=0)"
            )
        return np.lexsort((self.item_idx, self.timestamp, self.user_idx))

    def previous_items(self, k: int) -> np.ndarray:
        """(len(self), k) for each row, the same user's k items just before it, latest first;
        n_items pads where the user has fewer. Training context: what preceded each positive.

        Example:
            >>> inter = Interactions(np.array([0, 0, 0]), np.array([2, 0, 1]), 1, 3,
            ...                      timestamp=np.array([30, 10, 20]))
            >>> inter.previous_items(2).tolist()
            [[1, 0], [3, 3], [0, 3]]
        """
        order = self.time_order()
        users, items = self.user_idx[order], self.item_idx[order]
        out = np.full((len(self), k), self.n_items, dtype=np.int64)
        for lag in range(1, min(k, len(self) - 1) + 1):  # k iterations, each vectorized
            rows = np.flatnonzero(users[lag:] == users[:-lag]) + lag
            out[order[rows], lag - 1] = items[rows - lag]
        return out

    def latest_items(self, k: int) -> np.ndarray:
        """(n_users, k) each user's k latest items, latest first, n_items padding: the
        context a model scores with after training on these interactions."""
        order = self.time_order()
        users, items = self.user_idx[order], self.item_idx[order]
        out = np.full((self.n_users, k), self.n_items, dtype=np.int64)
        ends = np.flatnonzero(np.r_[users[1:] != users[:-1], True]) if len(self) else order
        for lag in range(min(k, len(self))):
            rows = ends - lag
            ok = rows >= 0
            ok[ok] = users[rows[ok]] == users[ends[ok]]
            out[users[ends[ok]], lag] = items[rows[ok]]
        return out


def csr_rows(
    indptr: np.ndarray, items: np.ndarray, users: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Expand CSR rows of `users` into (row, item) pairs, row indexing into `users`; no loop."""
    starts = indptr[users]
    lengths = indptr[users + 1] - starts
    rows = np.repeat(np.arange(len(users)), lengths)
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return rows, items[np.repeat(starts, lengths) + offsets]
