"""What a large catalog's model version precomputes, built once, by a process of its own, and
read by every worker: the two ANN indexes and the item side.

A catalog above `ann_threshold` is served through two FAISS indexes (retrieval.py) that take
seconds of CPU to build (about 11 s for 1,000,000 items on this project's 2-core machine), and
its Recommender computes item-side tensors once (the item half of NeuMF's first MLP layer, the
normalised item space: about 1 s of a core for 1M items). Built inside a worker, that work
shares the worker's cores and GIL with its serving threads, and with `--workers N` every worker
did the same work: a 1M-item reload lifted every endpoint's p99 from about 25 ms to 100-300 ms
(docs/BENCHMARKS.md).

Instead the first worker that needs a version's parts starts `python -m
recommender.serving.indexes` (at nice 19 for a reload beside a serving version), which loads
the run, builds both indexes and the item side and writes them into a folder named for the
version: the run, the best.pt it was built from (inode, size, mtime) and the index settings.
The other workers wait on the folder's lock, then read the files, as does the first one: an
index read is a copy inside FAISS with the GIL released, the item side is memory-mapped. The
builder refuses to write when best.pt changed while it read it, so a folder always holds the
parts of the file its name says.

Folders live in `root` (the `serve` command's shared folder); the newest KEEP stay, so a worker
still loading the previous version finds its files.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import recommender
from recommender.checkpoint import best_file_id
from recommender.inference import ItemSide, Recommender
from recommender.serving.retrieval import ItemNeighbours, TwoStageRetriever, import_faiss
from recommender.serving.settings import ServeSettings
from recommender.utils import RecommenderError

log = logging.getLogger("recommender")

USERS_FILE = "users.faiss"  # the item side of TwoStageRetriever (user queries)
ITEMS_FILE = "items.faiss"  # ItemNeighbours' quantised index of the item space
ITEM_SIDE_FILE = "item_side.pt"  # Recommender.item_side: tensors only
MANIFEST = "indexes.json"
# Index folders kept in a root: the version being loaded and the one before it.
KEEP = 2
CHANGED_EXIT = 3  # the builder's exit status for VersionChanged


@dataclass(frozen=True)
class Prebuilt:
    """One model version's parts built by the builder process: the two indexes, None where
    its model has no such vectors (no retrieval vectors: users are scored exactly; no item
    space: no similar items), and the Recommender's item side."""

    users: Any | None
    items: Any | None
    item_side: ItemSide


class VersionChanged(RecommenderError):
    """best.pt is no longer the file a load started from: load the new one."""


def version_key(run_dir: str | Path, file_id: tuple[int, int, int], settings: ServeSettings) -> str:
    """The folder name of a version's indexes: what they were built from and with."""
    what = [str(Path(run_dir).resolve()), *map(str, file_id), str(settings.ann_nlist)]
    return hashlib.sha256("\n".join(what).encode()).hexdigest()[:24]


def prebuilt(
    run_dir: str | Path,
    file_id: tuple[int, int, int],
    settings: ServeSettings,
    root: Path,
    nice: int = 0,
) -> Prebuilt:
    """This version's parts, built by a process of their own at `nice` unless another worker
    (or an earlier load) built them; raises VersionChanged when best.pt is no longer the file
    `file_id` names, RecommenderError when the build failed."""
    root.mkdir(parents=True, exist_ok=True)
    key = version_key(run_dir, file_id, settings)
    folder = root / key
    with open(root / f"{key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per version; the others wait for it
        if not (folder / MANIFEST).is_file():
            _run_builder(run_dir, file_id, settings, folder, nice)
        os.utime(folder)  # the most recently used: pruning keeps it
    _prune(root, keep=KEEP)
    return read_prebuilt(folder, settings)


def read_prebuilt(folder: Path, settings: ServeSettings) -> Prebuilt:
    """What a builder wrote into `folder`, the indexes with the settings' nprobe."""
    faiss = import_faiss()
    built = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    users = items = None
    if built["users"]:
        users = faiss.read_index(str(folder / USERS_FILE))
        users.nprobe = settings.ann_nprobe
    if built["items"]:
        items = faiss.read_index(str(folder / ITEMS_FILE))
        items.nprobe = settings.ann_item_nprobe
    # Memory-mapped: the builder's files are never rewritten, only replaced by a rename.
    side = torch.load(folder / ITEM_SIDE_FILE, weights_only=True, mmap=True)
    return Prebuilt(users, items, (tuple(side["cache"]), side["space"]))


def _run_builder(
    run_dir: str | Path,
    file_id: tuple[int, int, int],
    settings: ServeSettings,
    folder: Path,
    nice: int,
) -> None:
    args = [sys.executable, "-m", "recommender.serving.indexes", str(run_dir), str(folder)]
    args += ["--file-id", ",".join(map(str, file_id))]
    # Started at its nice value, not lowered once running: its imports (torch, FAISS) take
    # seconds of a core, which at the serving workers' priority showed as a 100-400 ms tail
    # in the seconds after a reload arrived (1M catalog, two workers at 200 requests/s).
    if nice > 0 and (wrapper := shutil.which("nice")):
        args = [wrapper, "-n", str(nice), *args]
    if settings.ann_nlist is not None:
        args += ["--nlist", str(settings.ann_nlist)]
    # The package as this process imported it, whatever made it importable here.
    package_root = str(Path(recommender.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package_root, *([path] if path else [])])}
    log.info("building the ANN indexes of %s in a process of their own", run_dir)
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        error = VersionChanged if done.returncode == CHANGED_EXIT else RecommenderError
        raise error(
            f"building the ANN indexes of {run_dir} failed (exit {done.returncode}): "
            + " | ".join(tail)
        )


def _prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used index folders (and their locks)."""
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for old in folders[keep:]:
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (root / f"{old.name}.lock").unlink()


def build(run_dir: Path, folder: Path, file_id: tuple[int, int, int], nlist: int | None) -> None:
    """Load the run, build its indexes and item side, write them into `folder` (atomically: a
    folder of another name renamed into place). Raises VersionChanged when best.pt is not,
    before and after the load, the file `file_id` names."""
    if best_file_id(run_dir) != file_id:
        raise VersionChanged(f"{run_dir}/best.pt is no longer the file to build for")
    rec = Recommender.from_run(run_dir)
    if best_file_id(run_dir) != file_id:
        raise VersionChanged(f"{run_dir}/best.pt changed while it was read")
    faiss = import_faiss()
    users = rec.model.retrieval_vectors() is not None
    cache, space = rec.item_side
    part = folder.with_name(f".{folder.name}.{os.getpid()}")
    part.mkdir(parents=True)
    try:
        # Built as the two retrieval classes build their own (the readers set nprobe).
        if users:
            index = TwoStageRetriever(rec.model, 1, 1, nlist).index
            faiss.write_index(index, str(part / USERS_FILE))
        if space is not None:
            faiss.write_index(ItemNeighbours(space, 1, 1, nlist).index, str(part / ITEMS_FILE))
        torch.save({"cache": list(cache), "space": space}, part / ITEM_SIDE_FILE)
        manifest = {"users": users, "items": space is not None}
        (part / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
        part.rename(folder)
    finally:
        shutil.rmtree(part, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a run's ANN indexes into a folder.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--file-id", required=True, help="inode,size,mtime_ns of best.pt")
    parser.add_argument("--nlist", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    inode, size, mtime = (int(x) for x in args.file_id.split(","))
    try:
        build(args.run_dir, args.folder, (inode, size, mtime), args.nlist)
    except RecommenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(CHANGED_EXIT if isinstance(exc, VersionChanged) else 2) from None


if __name__ == "__main__":
    main()
