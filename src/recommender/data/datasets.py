"""Built-in datasets (download, checksum, cache) and a synthetic generator.

The built-in datasets are MovieLens (ml-100k, ml-1m, ml-20m, ml-25m, ml-latest-small: explicit
ratings with timestamps) and Last.fm HetRec 2011 (hetrec2011-lastfm-2k: user-artist play counts,
kept as the rating, and no timestamps, so it needs `data.split=random`).

Archives come from GroupLens's official URLs and are verified against pinned sha256 sums before
anything is extracted. The cache lives under `root/raw/`: the verified zip as `NAME.zip`, the
members in `NAME/`, and `NAME/MANIFEST.json` recording their hashes and where they came from, so
a later run re-verifies them and needs no network.

Without network, a copy the user already has is imported with `fetch(NAME, root, local=PATH)`
(the CLI's `data fetch NAME --from PATH`): the official zip, verified against the pinned sha256,
or a folder with the extracted files, which has no official checksum and is instead checked by
parsing every row. Dropping the official zip at `root/raw/NAME.zip` works too.

MovieLens 100K also ships inside the `recbole==1.2.1` wheel on PyPI; when GroupLens is unreachable
(common behind proxies that only let package registries through) that copy is used instead.

Example:
    >>> interactions, titles, source = load_builtin("ml-100k", root="data")
    >>> files = fetch("ml-latest-small", "data", local="Downloads/ml-latest-small")
    >>> frame = synthetic_interactions(n_users=1000, n_items=500, n_interactions=50_000, seed=1)
    >>> write_synthetic("ml20m.parquet", n_users=138_493, n_items=26_744, n_interactions=20_000_263)
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
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

from recommender.data.readers import read_interactions, read_item_titles
from recommender.utils import ConfigError, DataError, atomic_path

log = logging.getLogger("recommender")

_GROUPLENS = "https://files.grouplens.org/datasets/movielens"
_HETREC = "https://files.grouplens.org/datasets/hetrec2011"
_MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20

# Fallback for ml-100k: RecBole's wheel carries the full 100K ratings in its own .inter format.
_WHEEL_REQUIREMENT = "recbole==1.2.1"
_WHEEL_INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
_WHEEL_ITEM = "recbole/dataset_example/ml-100k/ml-100k.item"
_WHEEL_INTER_SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"


@dataclass(frozen=True)
class DatasetSpec:
    """One official archive and the members the package reads from it (paths inside the zip)."""

    name: str
    url: str
    sha256: str
    ratings_member: str
    ratings_format: str
    items_member: str
    items_format: str


# sha256 sums of the official archives. MovieLens: as pinned by tensorflow/datasets in
# tensorflow_datasets/url_checksums/movielens.txt (ml-100k and ml-1m cross-checked against
# several independent projects that pin the same values). Last.fm: as pinned by the OmniRec
# library (ISG-Siegen/OmniRec, src/omnirec/data_loaders/hetrec_lastfm.py, whose ml-1m pin
# matches TFDS's) and by two unrelated projects that verify the same value. That archive keeps
# its files at the top level, not in a folder.
BUILTIN: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "ml-100k", f"{_GROUPLENS}/ml-100k.zip",
            "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
            "ml-100k/u.data", "ml-100k", "ml-100k/u.item", "ml-100k-item",
        ),
        DatasetSpec(
            "ml-1m", f"{_GROUPLENS}/ml-1m.zip",
            "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
            "ml-1m/ratings.dat", "ml-dat", "ml-1m/movies.dat", "ml-dat-movies",
        ),
        DatasetSpec(
            "ml-20m", f"{_GROUPLENS}/ml-20m.zip",
            "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
            "ml-20m/ratings.csv", "ml-csv", "ml-20m/movies.csv", "ml-csv-movies",
        ),
        DatasetSpec(
            "ml-25m", f"{_GROUPLENS}/ml-25m.zip",
            "8b21cfb7eb1706b4ec0aac894368d90acf26ebdfb6aced3ebd4ad5bd1eb9c6aa",
            "ml-25m/ratings.csv", "ml-csv", "ml-25m/movies.csv", "ml-csv-movies",
        ),
        DatasetSpec(
            "ml-latest-small", f"{_GROUPLENS}/ml-latest-small.zip",
            "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
            "ml-latest-small/ratings.csv", "ml-csv",
            "ml-latest-small/movies.csv", "ml-csv-movies",
        ),
        DatasetSpec(
            "hetrec2011-lastfm-2k", f"{_HETREC}/hetrec2011-lastfm-2k.zip",
            "6738f48195667ff03caaab4d32ca9a3133d8cc026b7c3cdaf6ce1010e913c59c",
            "user_artists.dat", "hetrec-lastfm", "artists.dat", "hetrec-lastfm-artists",
        ),
    )
}  # fmt: skip


@dataclass(frozen=True)
class DatasetFiles:
    """Local, verified files of a built-in dataset and a human-readable note of their origin."""

    ratings: Path
    ratings_format: str
    items: Path | None
    items_format: str | None
    source: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    """Stream `url` into `dest`. Resolving the host first fails in milliseconds when offline."""
    host = urllib.parse.urlparse(url).hostname or ""
    socket.getaddrinfo(host, 443)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, _CHUNK)


def _pip_download(requirement: str, dest: Path) -> Path:
    """Fetch one wheel from the package index without installing it; return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", requirement, "-d", str(dest)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise OSError(f"pip download {requirement} failed: {tail[0]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise OSError(f"pip download {requirement} produced no wheel")
    return wheels[0]


def _spec(name: str) -> DatasetSpec:
    if name not in BUILTIN:
        raise ConfigError(f"unknown dataset {name!r}; built-in: {', '.join(BUILTIN)}")
    return BUILTIN[name]


def _extract(archive: zipfile.ZipFile, member: str, dest: Path) -> Path:
    with atomic_path(dest) as tmp, archive.open(member) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)
    return dest


def _write_manifest(folder: Path, files: DatasetFiles) -> DatasetFiles:
    record = {
        "source": files.source,
        "ratings": [files.ratings.name, files.ratings_format, sha256_file(files.ratings)],
        "items": None
        if files.items is None
        else [files.items.name, files.items_format, sha256_file(files.items)],
    }
    with atomic_path(folder / _MANIFEST) as tmp:
        tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return files


def _from_manifest(folder: Path) -> DatasetFiles | None:
    """Reuse previously extracted files when they still match their recorded hashes."""
    path = folder / _MANIFEST
    if not path.is_file():
        return None
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        entries = [record["ratings"]] + ([record["items"]] if record["items"] else [])
        intact = all(
            (folder / n).is_file() and sha256_file(folder / n) == digest for n, _, digest in entries
        )
    except (ValueError, KeyError, TypeError):
        intact = False
    if not intact:
        log.warning("cached files in %s changed since they were verified; fetching again", folder)
        path.unlink()
        return None
    items = record["items"]
    return DatasetFiles(
        ratings=folder / record["ratings"][0],
        ratings_format=record["ratings"][1],
        items=folder / items[0] if items else None,
        items_format=items[1] if items else None,
        source=f"{record['source']}, cached in {folder}",
    )


def _from_zip(spec: DatasetSpec, archive_path: Path, folder: Path, source: str) -> DatasetFiles:
    """Verify the official archive and extract the ratings and items members."""
    digest = sha256_file(archive_path)
    if digest != spec.sha256:
        raise DataError(
            f"{archive_path}: sha256 {digest} does not match the official {spec.name} archive "
            f"({spec.sha256}); replace it with the official {spec.url}"
        )
    with zipfile.ZipFile(archive_path) as archive:
        ratings = _extract(archive, spec.ratings_member, folder / Path(spec.ratings_member).name)
        items = _extract(archive, spec.items_member, folder / Path(spec.items_member).name)
    files = DatasetFiles(ratings, spec.ratings_format, items, spec.items_format, source)
    return _write_manifest(folder, files)


def _member(folder: Path, member: str) -> Path:
    """A member of an extracted archive: at its path inside the zip, or directly in `folder`."""
    for candidate in (folder / member, folder / Path(member).name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: no {Path(member).name} (looked for {folder / member})")


def _from_folder(spec: DatasetSpec, source: Path, folder: Path) -> DatasetFiles:
    """Copy extracted files into the cache once every row of them has parsed.

    GroupLens publishes sums for the archives only, so parsing is the check: a wrong, truncated
    or edited file fails here with its path and line, not later in training.
    """
    ratings, items = _member(source, spec.ratings_member), _member(source, spec.items_member)
    read_interactions(ratings, format=spec.ratings_format)
    read_item_titles(items, spec.items_format)
    (folder / _MANIFEST).unlink(missing_ok=True)
    copies = []
    for path in (ratings, items):
        with atomic_path(folder / path.name) as tmp:
            shutil.copyfile(path, tmp)
        copies.append(folder / path.name)
    note = f"local folder {source} (not checksum-verified: no official per-file sums; parsed)"
    files = DatasetFiles(copies[0], spec.ratings_format, copies[1], spec.items_format, note)
    return _write_manifest(folder, files)


def _from_local(spec: DatasetSpec, path: Path, folder: Path) -> DatasetFiles:
    """Import a copy the user has: the official zip (sha256 verified) or its extracted folder."""
    if path.is_dir():
        files = _from_folder(spec, path, folder)
    elif path.is_file():
        files = _from_zip(spec, path, folder, f"local archive {path} (sha256 verified)")
    else:
        raise DataError(f"{path}: not found (expected the {spec.name} zip or its extracted folder)")
    log.info("%s: imported %s", spec.name, files.source)
    return files


def _from_grouplens(spec: DatasetSpec, raw: Path, timeout: float) -> DatasetFiles:
    """Download into a temporary file beside the cache; only a verified archive is kept."""
    archive_path = raw / f"{spec.name}.zip"
    with atomic_path(archive_path) as tmp:
        log.info("downloading %s", spec.url)
        _download(spec.url, tmp, timeout)
        digest = sha256_file(tmp)
        if digest != spec.sha256:
            raise DataError(
                f"{spec.url}: downloaded sha256 {digest} does not match the pinned "
                f"{spec.sha256}; nothing was kept"
            )
    source = f"GroupLens {spec.url} (sha256 verified)"
    return _from_zip(spec, archive_path, raw / spec.name, source)


def _from_wheel(folder: Path) -> DatasetFiles:
    """ml-100k from the recbole wheel on PyPI: read two members, never install the package."""
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmpdir:
        wheel = _pip_download(_WHEEL_REQUIREMENT, Path(tmpdir))
        with zipfile.ZipFile(wheel) as archive:
            inter = folder / Path(_WHEEL_INTER).name
            with atomic_path(inter) as tmp:
                with archive.open(_WHEEL_INTER) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                digest = sha256_file(tmp)
                if digest != _WHEEL_INTER_SHA256:
                    raise DataError(
                        f"{wheel.name}: {_WHEEL_INTER} has sha256 {digest}, expected "
                        f"{_WHEEL_INTER_SHA256}; nothing was kept"
                    )
            items = _extract(archive, _WHEEL_ITEM, folder / Path(_WHEEL_ITEM).name)
    source = f"PyPI wheel {_WHEEL_REQUIREMENT} (GroupLens unreachable)"
    return _write_manifest(folder, DatasetFiles(inter, "recbole", items, "recbole-item", source))


def fetch(
    name: str,
    root: str | Path = "data",
    *,
    timeout: float = 30.0,
    local: str | Path | None = None,
) -> DatasetFiles:
    """Return verified local files of a built-in dataset, downloading them only when needed.

    Order: cached files whose hashes still match; an official zip at `root/raw/NAME.zip`;
    GroupLens; for ml-100k only, the copy in the recbole wheel on PyPI.

    Args:
        local: a copy the user already has, imported into the cache instead (replacing what is
            there): the official zip, checked against the pinned sha256, or a folder holding
            the extracted files (the zip's folder itself or the one above it), checked by
            parsing every row. Later calls without `local` use the cached import.

    Raises:
        ConfigError: unknown name.
        DataError: a checksum mismatch, a local copy that is missing a file or has a bad row,
            or no source reachable (the message says how to supply the files by hand).
    """
    spec = _spec(name)
    raw = Path(root) / "raw"
    folder = raw / name
    raw.mkdir(parents=True, exist_ok=True)
    if local is not None:
        return _from_local(spec, Path(local), folder)
    cached = _from_manifest(folder)
    if cached is not None:
        return cached
    archive_path = raw / f"{name}.zip"
    if archive_path.is_file():
        return _from_zip(
            spec, archive_path, folder, f"local archive {archive_path} (sha256 verified)"
        )
    try:
        return _from_grouplens(spec, raw, timeout)
    except (OSError, urllib.error.URLError) as exc:  # URLError, timeouts, DNS: all unreachable
        grouplens_error = f"GroupLens unreachable ({exc})"
    by_hand = (
        f"download {spec.url} elsewhere and place it at {archive_path}, or import a copy you "
        f"have (that zip or its extracted folder) with `recommender data fetch {name} "
        f"--root {root} --from PATH`"
    )
    if name != "ml-100k":
        raise DataError(f"cannot fetch {name}: {grouplens_error}; {by_hand}")
    log.info(
        "%s; falling back to the copy in the PyPI wheel %s", grouplens_error, _WHEEL_REQUIREMENT
    )
    try:
        files = _from_wheel(folder)
    except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(
            f"cannot fetch ml-100k: {grouplens_error}; PyPI wheel {_WHEEL_REQUIREMENT} failed "
            f"({exc}); {by_hand}"
        ) from None
    log.info("ml-100k: using %s", files.source)
    return files


def load_builtin(
    name: str, root: str | Path = "data"
) -> tuple[pd.DataFrame, pd.DataFrame | None, str]:
    """Fetch a built-in dataset and read it: (interactions, item titles or None, source)."""
    files = fetch(name, root)
    interactions = read_interactions(files.ratings, format=files.ratings_format)
    titles = None
    if files.items is not None and files.items_format is not None:
        titles = read_item_titles(files.items, files.items_format)
    return interactions, titles, files.source


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
