"""Synthetic interactions with a planted structure, for tests, benchmarks and experiments.

`synthetic_interactions` builds a frame; `write_synthetic` streams the same rows to Parquet or
CSV in blocks of whole users, so a data set of MovieLens-20M size (or larger) is written with the
memory of one block. The same arguments give the same rows wherever they go.

Example:
    >>> frame = synthetic_interactions(n_users=1000, n_items=500, n_interactions=50_000, seed=1)
    >>> write_synthetic("ml20m.parquet", n_users=138_493, n_items=26_744, n_interactions=20_000_263)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recommender.utils import ConfigError, atomic_path

log = logging.getLogger("recommender")

# Rows per generated block of users. Each block draws from its own stream, keyed by (seed, block
# index), so the data depends on this constant but not on where it goes (a frame, Parquet, CSV);
# changing it changes every synthetic data set.
_BLOCK_ROWS = 1 << 20

_SYNTHETIC_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("rating", pa.float64()),
        ("timestamp", pa.int64()),
    ]
)


@dataclass(frozen=True)
class _Catalog:
    """The global, item-side part of a synthetic data set: O(n_factors * n_items)."""

    taste_items: np.ndarray  # (K, I) each taste's distribution over items
    item_cdf: np.ndarray  # (K, I) its running sum, for inverse-cdf draws
    fit: np.ndarray  # (I, K) how well item i fits taste k, in standard deviations over items
    labels: pa.Array  # item ids "1".."I"


def synthetic_interactions(
    n_users: int = 500,
    n_items: int = 300,
    n_interactions: int = 20_000,
    *,
    seed: int = 0,
    n_factors: int = 8,
    popularity_exponent: float = 1.0,
    affinity: float = 4.0,
) -> pd.DataFrame:
    """Interactions with a planted structure a collaborative model can find.

    There are `n_factors` tastes. Item i has a random unit vector v_i, and taste k draws items
    with probability proportional to exp(affinity * v_ik) * rank_i^-popularity_exponent, where
    rank_i is the item's Zipf popularity rank. Each user mixes the tastes with weights from a
    sparse Dirichlet, so users who share a taste share items: a model that learns the factors
    beats popularity, and popularity beats random. User activity is long-tailed (log-normal), at
    least 5 and at most n_items // 2 per user; a user's items are drawn without replacement.

    Sampling is a with-replacement stream per user whose first unseen draws are kept (the same
    distribution as successive sampling without replacement), topped up in rounds, with an exact
    Gumbel-top-k pass for the few heavy users still short; all vectorized over users.

    This builds the whole frame; `write_synthetic` streams the same rows to a file in blocks,
    with memory bounded by one block, for data sets of any size.

    Returns:
        Canonical frame sorted by user and time: user_id and item_id (str, "1".."n"), rating
        (float64, 1..5, higher where the item fits the taste it was drawn from) and timestamp
        (int64 seconds, strictly increasing per user).
    """
    tables = synthetic_tables(
        n_users,
        n_items,
        n_interactions,
        seed=seed,
        n_factors=n_factors,
        popularity_exponent=popularity_exponent,
        affinity=affinity,
    )
    return pa.concat_tables(tables).to_pandas()


def synthetic_tables(
    n_users: int = 500,
    n_items: int = 300,
    n_interactions: int = 20_000,
    *,
    seed: int = 0,
    n_factors: int = 8,
    popularity_exponent: float = 1.0,
    affinity: float = 4.0,
) -> Iterator[pa.Table]:
    """The rows of `synthetic_interactions` as Arrow tables, one per block of whole users.

    The global part (item vectors and popularity, per-user activity: O(n_users + n_items)) is
    computed here, so bad arguments fail before the first block; each block of consecutive users
    (about `_BLOCK_ROWS` rows) is generated only when the iterator reaches it, from its own
    random stream. Concatenated, the tables are `synthetic_interactions`' frame.

    Raises:
        ConfigError: sizes that cannot hold the guarantees, or a negative seed.
    """
    cap = n_items // 2
    if n_users < 1 or n_factors < 1 or cap < 5:
        raise ConfigError("synthetic data needs n_users >= 1, n_factors >= 1 and n_items >= 10")
    if not 5 * n_users <= n_interactions <= cap * n_users:
        raise ConfigError(
            f"n_interactions must lie in [5 * n_users, n_items // 2 * n_users] = "
            f"[{5 * n_users}, {cap * n_users}], got {n_interactions}"
        )
    if seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    # Each item leans towards one taste (its cluster) with some mixing, so tastes overlap a little.
    vectors = rng.normal(scale=0.15, size=(n_items, n_factors))
    vectors[np.arange(n_items), rng.integers(n_factors, size=n_items)] += 1.0
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    log_pop = -popularity_exponent * np.log(rng.permutation(n_items) + 1.0)
    # Scaled by sqrt(K) so `affinity` means the same whatever the number of factors.
    logits = affinity * np.sqrt(n_factors) * vectors.T + log_pop  # (K, I)
    taste_items = np.exp(logits - logits.max(axis=1, keepdims=True))
    taste_items /= taste_items.sum(axis=1, keepdims=True)
    catalog = _Catalog(
        taste_items=taste_items,
        item_cdf=np.cumsum(taste_items, axis=1),
        fit=(vectors - vectors.mean(axis=0)) / vectors.std(axis=0),
        labels=_id_strings(1, n_items + 1),
    )
    counts = _activity(rng, n_users, n_interactions, cap)
    # Blocks of whole users, cut where the running row count crosses a multiple of _BLOCK_ROWS:
    # at most _BLOCK_ROWS + cap rows each, however active the users are.
    block = (np.cumsum(counts) - counts) // _BLOCK_ROWS
    edges = np.concatenate([[0], np.flatnonzero(np.diff(block)) + 1, [n_users]])
    return (
        _block(
            np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, b))),
            int(edges[b]),
            counts[edges[b] : edges[b + 1]],
            catalog,
        )
        for b in range(edges.size - 1)
    )


def _block(rng: np.random.Generator, first: int, counts: np.ndarray, catalog: _Catalog) -> pa.Table:
    """Interactions of users first .. first + len(counts) - 1, with counts[u] items each."""
    n_factors = catalog.taste_items.shape[0]
    user_tastes = rng.dirichlet(np.full(n_factors, 0.2), size=counts.size)  # (U, K)
    users, items, tastes = _draw_items(rng, counts, user_tastes, catalog)
    noise = rng.normal(size=users.size)
    ratings = np.clip(np.rint(2.5 + 0.6 * catalog.fit[items, tastes] + noise), 1.0, 5.0)
    gaps = 1 + rng.exponential(86_400.0, size=users.size).astype(np.int64)
    elapsed = np.cumsum(gaps)
    starts = np.cumsum(counts) - counts
    before = np.repeat(elapsed[starts] - gaps[starts], counts)
    start_time = rng.integers(946_684_800, 1_420_070_400, size=counts.size)  # 2000..2015
    return pa.Table.from_arrays(
        [
            _id_strings(first + 1, first + counts.size + 1).take(pa.array(users)),
            catalog.labels.take(pa.array(items)),
            pa.array(ratings),
            pa.array(start_time[users] + elapsed - before),
        ],
        schema=_SYNTHETIC_SCHEMA,
    )


def _draw_items(
    rng: np.random.Generator, counts: np.ndarray, user_tastes: np.ndarray, catalog: _Catalog
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, taste) per interaction, counts[u] distinct items for user u, by user.

    Within a user the rows keep their draw order, which the caller turns into time.
    """
    n_users, n_factors = user_tastes.shape
    n_items = catalog.taste_items.shape[1]
    taste_cdf = np.cumsum(user_tastes, axis=1)
    need = counts.copy()
    seen = np.empty(0, dtype=np.int64)  # sorted user * n_items + item of kept pairs
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for attempt in range(8):
        active = np.flatnonzero(need)
        if active.size == 0:
            break
        # Users still short after a round are the ones whose draws keep repeating: oversample more.
        factor = 1.25 * 2**attempt
        # Narrow dtypes: every array here is memory-bandwidth bound.
        users = np.repeat(
            active.astype(np.int32), np.ceil(need[active] * factor).astype(np.int64) + 2
        )
        tastes = np.zeros(users.size, dtype=np.int16)
        draw = rng.random(users.size)
        for k in range(n_factors - 1):
            tastes += draw > taste_cdf[users, k]
        items = np.empty(users.size, dtype=np.int32)
        for k in range(n_factors):
            rows = np.flatnonzero(tastes == k)
            cdf = catalog.item_cdf[k]
            items[rows] = np.searchsorted(cdf, rng.random(rows.size) * cdf[-1])
        np.minimum(items, n_items - 1, out=items)  # guards float rounding at the cdf's end
        keys = users.astype(np.int64) * n_items + items
        _, first = np.unique(keys, return_index=True)
        first.sort()  # back to draw order, which is grouped by user
        if seen.size:
            pos = np.minimum(np.searchsorted(seen, keys[first]), seen.size - 1)
            first = first[seen[pos] != keys[first]]
        owner = users[first]
        rank = np.arange(first.size) - np.searchsorted(owner, owner)
        first = first[rank < need[owner]]
        parts.append((users[first], items[first], tastes[first]))
        need -= np.bincount(users[first], minlength=n_users)
        seen = np.sort(np.concatenate([seen, keys[first]]), kind="stable")
    active = np.flatnonzero(need)
    if active.size:
        parts.append(_gumbel_top_up(rng, active, need, seen, user_tastes, catalog.taste_items))
    users, items, tastes = (np.concatenate(p) for p in zip(*parts, strict=True))
    order = np.argsort(users, kind="stable")  # keeps each user's draw order
    return users[order], items[order], tastes[order]


def _activity(rng: np.random.Generator, n_users: int, total: int, cap: int) -> np.ndarray:
    """Long-tailed per-user counts in [5, cap] summing to `total`."""
    weights = rng.lognormal(0.0, 1.0, size=n_users)
    counts = np.full(n_users, 5, dtype=np.int64)
    left = total - counts.sum()
    while left > 0:  # redistribute what the cap cut off; converges in a few passes
        open_ = counts < cap
        p = np.where(open_, weights, 0.0)
        counts += rng.multinomial(left, p / p.sum())
        left = int(np.maximum(counts - cap, 0).sum())
        np.minimum(counts, cap, out=counts)
    return counts


def _gumbel_top_up(
    rng: np.random.Generator,
    active: np.ndarray,
    need: np.ndarray,
    seen: np.ndarray,
    user_tastes: np.ndarray,
    taste_items: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact draws without replacement for users still short: Gumbel-top-k over unseen items."""
    n_items = taste_items.shape[1]
    rows_per_chunk = max(1, (1 << 23) // n_items)
    users_out, items_out, tastes_out = [], [], []
    for lo in range(0, active.size, rows_per_chunk):
        chunk = active[lo : lo + rows_per_chunk]
        scores = np.log(user_tastes[chunk] @ taste_items + 1e-300)  # (C, I)
        scores += rng.gumbel(size=scores.shape)
        begin = np.searchsorted(seen, chunk * n_items)
        end = np.searchsorted(seen, (chunk + 1) * n_items)
        lengths = end - begin
        row = np.repeat(np.arange(chunk.size), lengths)
        offsets = np.repeat(begin - np.cumsum(lengths) + lengths, lengths)
        taken = seen[np.arange(lengths.sum()) + offsets]
        scores[row, taken % n_items] = -np.inf
        # Only the top `need` per row matter: partition, then order that short head.
        width = int(need[chunk].max())
        head = np.argpartition(-scores, width - 1, axis=1)[:, :width]
        head = np.take_along_axis(head, np.argsort(-np.take_along_axis(scores, head, 1), 1), 1)
        keep = np.arange(width)[None, :] < need[chunk][:, None]
        users = np.repeat(chunk, need[chunk])
        items = head[keep]
        # The taste that most likely produced each pick, for its rating.
        tastes = np.argmax(user_tastes[users] * taste_items[:, items].T, axis=1)
        users_out.append(users)
        items_out.append(items)
        tastes_out.append(tastes)
    return np.concatenate(users_out), np.concatenate(items_out), np.concatenate(tastes_out)


def _id_strings(low: int, high: int) -> pa.Array:
    """Ids low .. high - 1 as Arrow strings, built in C++: no Python str per row or per id."""
    return pc.cast(pa.array(np.arange(low, high, dtype=np.int64)), pa.string())


def write_synthetic(path: str | Path, **kwargs: Any) -> Path:
    """Write `synthetic_interactions(**kwargs)` to .parquet or .csv (by extension), atomically.

    The rows are streamed block by block (one Parquet row group per block, about `_BLOCK_ROWS`
    rows), so peak memory is bounded by one block whatever the total; the file holds exactly
    `synthetic_interactions(**kwargs)`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"{path}: write_synthetic writes .parquet or .csv, not {suffix!r}")
    tables = synthetic_tables(**kwargs)  # bad arguments fail here, before a file is created
    rows = 0
    with atomic_path(path) as tmp:
        if suffix == ".parquet":
            with pq.ParquetWriter(tmp, _SYNTHETIC_SCHEMA) as parquet:
                for table in tables:
                    parquet.write_table(table, row_group_size=table.num_rows)
                    rows += table.num_rows
        else:
            options = pacsv.WriteOptions(quoting_style="none")  # ids are digits
            with pacsv.CSVWriter(tmp, _SYNTHETIC_SCHEMA, write_options=options) as text:
                for table in tables:
                    text.write_table(table)
                    rows += table.num_rows
    log.info("wrote %d synthetic interactions to %s", rows, path)
    return path
