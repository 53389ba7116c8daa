"""Vocabulary (raw id <-> index) and the validated Interactions object."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recommender.data.interactions import LOOKUP_SLICE, Interactions, Vocabulary
from recommender.data.splits import leave_last_out
from recommender.utils import DataError, RecommenderError


def test_integer_ids_with_gaps_sort_numerically():
    vocab = Vocabulary.from_values(np.array([10, 2, 33, 2, 9]), "item")
    assert vocab.to_list() == ["2", "9", "10", "33"]
    assert len(vocab) == 4


def test_integer_ids_given_as_strings_sort_numerically():
    vocab = Vocabulary.from_values(pd.Series(["10", "9", "100", "1"]))
    assert vocab.to_list() == ["1", "9", "10", "100"]


def test_string_ids_sort_lexicographically_and_stay_strings():
    vocab = Vocabulary.from_values(np.array(["b", "a", "10", "9", "a"], dtype=object))
    assert vocab.to_list() == ["10", "9", "a", "b"]


def test_leading_zeros_are_distinct_ids():
    vocab = Vocabulary.from_values(np.array(["007", "7", "07"], dtype=object))
    assert len(vocab) == 3
    assert set(vocab.to_list()) == {"007", "7", "07"}
    assert vocab.lookup(["7"])[0] != vocab.lookup(["007"])[0]


def test_lookup_index_and_back():
    vocab = Vocabulary.from_values(np.array([10, 2, 33]), "item")
    np.testing.assert_array_equal(vocab.lookup([33, "2", "zz", 10]), [2, 0, -1, 1])
    assert vocab.lookup([33]).dtype == np.int64
    np.testing.assert_array_equal(vocab.index(np.array(["10", "33"], dtype=object)), [1, 2])
    np.testing.assert_array_equal(vocab.to_ids(np.array([2, 0])), ["33", "2"])
    np.testing.assert_array_equal(vocab.to_ids(torch.tensor([1])), ["10"])
    assert 33 in vocab and "33" in vocab and 34 not in vocab


def test_index_raises_naming_the_unknown_id():
    vocab = Vocabulary.from_values(np.array(["a", "b"]), "user")
    with pytest.raises(RecommenderError, match="unknown user 'zz'"):
        vocab.index(["a", "zz", "yy"])


def test_duplicate_ids_are_rejected():
    with pytest.raises(DataError, match="duplicate id 'a'"):
        Vocabulary(["a", "b", "a"], "user")


def test_a_large_vocabulary_finds_every_id_in_both_ways():
    """Above LOOKUP_SLICE ids the vocabulary is converted in slices, and a lookup goes by
    binary search up to LOOKUP_SLICE ids, through the pandas Index above: every id is found at
    its own index both ways (ids out of order, of several lengths, non-ASCII among them),
    unknown ids are -1, and a duplicate anywhere is still refused."""
    n = 3 * LOOKUP_SLICE + 5
    rng = np.random.default_rng(0)
    ids = np.array([f"{'é' if k % 7 == 0 else 'i'}{k}" for k in rng.permutation(n)], dtype=object)
    vocab = Vocabulary(ids, "item")
    few = rng.choice(n, size=LOOKUP_SLICE, replace=False)
    np.testing.assert_array_equal(vocab.lookup(ids[few]), few)  # binary search
    np.testing.assert_array_equal(vocab.lookup(ids), np.arange(n))  # through the Index
    unknown = ["", "i", "é", "zz", f"i{n}", "\uffff"]
    np.testing.assert_array_equal(vocab.lookup([ids[0], *unknown, ids[-1]]), [0, *[-1] * 6, n - 1])
    assert ids[-1] in vocab and f"i{n}" not in vocab
    with pytest.raises(DataError, match=f"duplicate id '{ids[n // 2]}'"):
        Vocabulary(np.append(ids, ids[n // 2]), "item")


def test_ids_that_are_not_strings_become_strings():
    vocab = Vocabulary(np.array([3, 1, None, 2.5], dtype=object), "item")
    assert vocab.to_list() == ["3", "1", "None", "2.5"]
    assert all(type(x) is str for x in vocab.ids)
    np.testing.assert_array_equal(vocab.lookup([1, "2.5", 3]), [1, 3, 0])


def test_vocabulary_rebuilt_from_its_list_is_identical():
    vocab = Vocabulary.from_values(np.array([5, 15, 105]), "item")
    again = Vocabulary(vocab.to_list(), "item")
    np.testing.assert_array_equal(again.ids, vocab.ids)
    np.testing.assert_array_equal(again.lookup(["105"]), vocab.lookup(["105"]))


def test_empty_vocabulary():
    vocab = Vocabulary.from_values(np.array([], dtype=object))
    assert len(vocab) == 0
    np.testing.assert_array_equal(vocab.lookup(["x"]), [-1])


def make(users, items, n_users=3, n_items=4, **kw) -> Interactions:
    return Interactions(np.array(users), np.array(items), n_users, n_items, **kw)


def test_interactions_cast_and_keys():
    data = make([0, 2, 1], [3, 0, 1], timestamp=np.array([5, 6, 7]))
    assert data.user_idx.dtype == np.int64 and data.item_idx.dtype == np.int64
    assert len(data) == 3
    np.testing.assert_array_equal(data.keys, [3, 8, 5])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"users": [0, 1], "items": [0]}, "differ in length"),
        ({"users": [0, 3], "items": [0, 0]}, "user_idx outside"),
        ({"users": [-1, 0], "items": [0, 0]}, "user_idx outside"),
        ({"users": [0, 1], "items": [4, 0]}, "item_idx outside"),
        ({"users": [0, 1], "items": [-1, 0]}, "item_idx outside"),
        ({"users": [0, 1], "items": [0, 1], "timestamp": np.array([1])}, "timestamp length"),
        ({"users": [0, 1], "items": [0, 1], "rating": np.array([1.0])}, "rating length"),
    ],
)
def test_interactions_validate_on_construction(kwargs, fragment):
    with pytest.raises(DataError, match=fragment):
        make(**kwargs)


def test_interactions_reject_duplicate_pairs():
    # The docstring promises "no duplicates", and the sampler's "user has every item" check
    # counts rows, so a duplicated pair must be caught here.
    with pytest.raises(DataError, match="duplicate"):
        make([0, 1, 0], [2, 2, 2])


def test_empty_interactions_are_valid():
    data = make([], [])
    assert len(data) == 0
    indptr, items = data.csr()
    np.testing.assert_array_equal(indptr, [0, 0, 0, 0])
    assert len(items) == 0


def test_csr_matches_a_python_grouping(rng: np.random.Generator):
    n_users, n_items = 7, 11
    keys = rng.choice(n_users * n_items, size=30, replace=False)
    data = Interactions(keys // n_items, keys % n_items, n_users, n_items)
    indptr, items = data.csr()
    assert indptr.dtype == np.int64 and len(indptr) == n_users + 1
    for u in range(n_users):
        expected = sorted(int(k % n_items) for k in keys if k // n_items == u)
        assert items[indptr[u] : indptr[u + 1]].tolist() == expected
    np.testing.assert_array_equal(np.diff(indptr), data.user_counts())
    assert data.item_counts().sum() == 30 and len(data.item_counts()) == n_items


def test_seen_mask_rows_index_into_the_given_users():
    data = make([0, 0, 2, 1], [1, 3, 0, 2])
    rows, items = data.seen_mask(np.array([2, 0, 0]))
    pairs = sorted(zip(rows.tolist(), items.tolist(), strict=True))
    assert pairs == [(0, 0), (1, 1), (1, 3), (2, 1), (2, 3)]


def test_subset_and_concat_keep_every_column():
    data = make(
        [0, 1, 2], [0, 1, 2], timestamp=np.array([10, 20, 30]), rating=np.array([1.0, 2.0, 3.0])
    )
    mask = np.array([True, False, True])
    a, b = data.subset(mask), data.subset(~mask)
    assert a.timestamp.tolist() == [10, 30] and b.rating.tolist() == [2.0]
    both = a.concat(b)
    assert sorted(both.keys.tolist()) == sorted(data.keys.tolist())
    assert sorted(both.timestamp.tolist()) == [10, 20, 30]
    assert both.n_users == 3 and both.n_items == 4
    no_ts = make([0], [3])
    assert a.concat(no_ts).timestamp is None


def test_previous_and_latest_items_match_a_python_reading(rng: np.random.Generator):
    keys = rng.choice(12 * 9, size=60, replace=False)
    data = make(keys // 9, keys % 9, 12, 9, timestamp=rng.integers(0, 6, size=60))  # ties
    k, pad = 3, data.n_items
    previous, latest = data.previous_items(k), data.latest_items(k)
    for u in range(data.n_users):
        rows = np.flatnonzero(data.user_idx == u)
        # by time, ties by item index: the order leave_last_out holds out by
        ordered = rows[np.lexsort((data.item_idx[rows], data.timestamp[rows]))]
        for pos, row in enumerate(ordered):
            before = data.item_idx[ordered[:pos]][::-1][:k]
            assert previous[row].tolist() == [*before, *[pad] * (k - len(before))]
        last = data.item_idx[ordered][::-1][:k]
        assert latest[u].tolist() == [*last, *[pad] * (k - len(last))]
    _, held_out = leave_last_out(data)
    assert np.array_equal(latest[held_out.user_idx, 0], held_out.item_idx)


def test_item_order_needs_timestamps():
    with pytest.raises(DataError, match=r"model\.context needs timestamps"):
        make([0, 0], [1, 2]).previous_items(2)
