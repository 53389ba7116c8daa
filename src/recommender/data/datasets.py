"""Built-in datasets: download, checksum, cache.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

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
