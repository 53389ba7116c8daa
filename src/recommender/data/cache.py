"""The processed-data cache: vocabularies, splits and CSR histories as memory-mapped .npy files.

Ingesting 20M interactions (read, label, de-duplicate, index, split, sort) takes minutes; the
processed form reloads in about a second, memory-mapped, so pages are read only when touched
and several processes (DDP ranks) share them. Layout of `root/processed/<key>/`:

    meta.json                      sizes, source, what the key was computed from
    users.npy, items.npy           vocabulary ids (fixed-width unicode, no pickle)
    full_{user,item,timestamp,rating}.npy   train + valid rows (train first: n_train rows)
    test_{user,item,timestamp,rating}.npy
    {train,full}_csr_{indptr,items}.npy     per-user sorted histories
    test_negatives.npy, item_info.parquet   when the source has them

The key hashes the data config (all but `cache` and `root`), the seed when a split is seeded,
the cache format version, and each input file's path, size and mtime: an edited file or a
changed setting gets a new folder. A folder is written under a temporary name and renamed
into place, so a crash or a concurrent writer never leaves a half-written cache that loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recommender.config import DataConfig
from recommender.data.interactions import Interactions, Vocabulary
from recommender.utils import DataError

CACHE_VERSION = 1
# `data.cache: auto` caches inputs at least this large (ml-1m's 24 MB reads in about a second).
AUTO_MIN_BYTES = 64 << 20


@dataclass
class Processed:
    """What the cache holds: the parts of a DataBundle."""

    users: Vocabulary
    items: Vocabulary
    train: Interactions
    valid: Interactions
    test: Interactions
    train_full: Interactions
    test_negatives: np.ndarray | None
    item_info: pd.DataFrame | None
    source: str
    sampled: bool = True  # DataBundle.sampled


def input_files(cfg: DataConfig) -> list[Path]:
    paths = [cfg.path, cfg.train_path, cfg.test_path, cfg.test_negatives_path]
    return [Path(p) for p in paths if p is not None]


def cache_dir(cfg: DataConfig, seed: int) -> Path | None:
    """The folder for this config's processed data, or None when caching does not apply."""
    files = input_files(cfg)
    if cfg.cache is False or not files or not all(f.is_file() for f in files):
        return None  # built-in datasets are checksummed small downloads, read directly
    stats = [f.stat() for f in files]
    if cfg.cache == "auto" and sum(s.st_size for s in stats) < AUTO_MIN_BYTES:
        return None
    settings = cfg.model_dump(mode="json", exclude={"cache", "root"})
    blob = {
        "version": CACHE_VERSION,
        "data": settings,
        # seeded splits: random ones, and NCF files' validation when timestamps give no order
        "seed": seed if cfg.split == "random" or cfg.train_path is not None else None,
        "files": [
            [str(f.resolve()), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats, strict=True)
        ],
    }
    key = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.root) / "processed" / key


def _columns(prefix: str, inter: Interactions) -> dict[str, np.ndarray]:
    out = {f"{prefix}_user": inter.user_idx, f"{prefix}_item": inter.item_idx}
    if inter.timestamp is not None:
        out[f"{prefix}_timestamp"] = inter.timestamp
    if inter.rating is not None:
        out[f"{prefix}_rating"] = inter.rating
    return out


def save(folder: Path, data: Processed) -> None:
    """Write `data` to `folder` atomically (a temporary sibling, then one rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        arrays = {
            "users": data.users.ids.astype(str),
            "items": data.items.ids.astype(str),
            **_columns("full", data.train_full),
            **_columns("test", data.test),
        }
        for name, inter in (("train", data.train), ("full", data.train_full)):
            indptr, items = inter.csr()
            arrays[f"{name}_csr_indptr"], arrays[f"{name}_csr_items"] = indptr, items
        if data.test_negatives is not None:
            arrays["test_negatives"] = data.test_negatives
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        if data.item_info is not None:
            data.item_info.to_parquet(tmp / "item_info.parquet", index=False)
        meta = {
            "version": CACHE_VERSION,
            "source": data.source,
            "sampled": data.sampled,
            "n_train": len(data.train),
            "n_users": len(data.users),
            "n_items": len(data.items),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not a concurrent writer's finished copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load(folder: Path) -> Processed | None:
    """Memory-map a cache folder; None when there is none (or it is from another version)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("version") != CACHE_VERSION:
        return None

    def arr(name: str) -> np.ndarray | None:
        path = folder / f"{name}.npy"
        if not path.is_file():
            return None
        # Copy-on-write: shared, lazily read pages that torch.from_numpy accepts as writable.
        return np.load(path, mmap_mode="c", allow_pickle=False)

    def get(name: str) -> np.ndarray:
        array = arr(name)
        if array is None:
            raise DataError(f"{folder}: processed cache is missing {name}.npy; delete the folder")
        return array

    n_users, n_items, n_train = meta["n_users"], meta["n_items"], meta["n_train"]

    def inter(prefix: str, rows: slice, csr: str | None) -> Interactions:
        ts, rating = arr(f"{prefix}_timestamp"), arr(f"{prefix}_rating")
        return Interactions.known_unique(
            get(f"{prefix}_user")[rows],
            get(f"{prefix}_item")[rows],
            n_users,
            n_items,
            None if ts is None else ts[rows],
            None if rating is None else rating[rows],
            csr=None if csr is None else (get(f"{csr}_csr_indptr"), get(f"{csr}_csr_items")),
        )

    everything = slice(None)
    info_path = folder / "item_info.parquet"
    return Processed(
        users=Vocabulary(get("users"), "user"),
        items=Vocabulary(get("items"), "item"),
        train=inter("full", slice(0, n_train), "train"),
        valid=inter("full", slice(n_train, None), None),
        test=inter("test", everything, None),
        train_full=inter("full", everything, "full"),
        test_negatives=arr("test_negatives"),
        item_info=pd.read_parquet(info_path) if info_path.is_file() else None,
        source=meta["source"],
        sampled=meta.get("sampled", True),
    )
