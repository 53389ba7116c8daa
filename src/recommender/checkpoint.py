"""The run directory: its file names, the checkpoint format, and metrics.jsonl.

A run directory, written by training and read by inference, the service and the report:

    config.yaml    the resolved config the run trained with
    best.pt        the model for inference (`BestCheckpoint`): weights, model config,
                   vocabularies, the training history and item counts, titles
    last.pt        everything `--resume` needs (`LastCheckpoint`): the model and optimisers of
                   the stage in progress, finished stages, early-stopping state, RNG states
    metrics.jsonl  one JSON record per epoch, appended as training goes
    eval.json      test metrics, written by `recommender evaluate`

Checkpoints are written atomically (temporary file, then rename) and read with
`torch.load(weights_only=True)`, which unpickles tensors and plain containers only: a file that
holds any other object is refused before anything in it runs. Each carries `format_version`;
a checkpoint of a format this version cannot read is refused with the versions named, rather
than read by keys that may have changed meaning.

best.pt's string columns (the vocabularies, titles, genres) are stored as two tensors each, the
UTF-8 bytes end to end and their offsets (`pack_strings`): torch's restricted unpickler costs
seconds per million Python strings, with the GIL held, while two tensors load at disk speed.
Format 1 stored them as lists of strings; its runs still load.

This module is the one place that knows these names and layouts; every other module reads and
writes a run directory through it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from recommender.config import Config, load_config
from recommender.data.interactions import LOOKUP_SLICE
from recommender.utils import RecommenderError, atomic_path, atomic_write_text

if TYPE_CHECKING:
    from recommender.data.pipeline import DataBundle

CONFIG_FILE = "config.yaml"
BEST_FILE = "best.pt"
LAST_FILE = "last.pt"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"

# Raised when a payload's keys or their meaning change; loading compares it.
FORMAT_VERSION = 2
# The formats this version reads: format 1 differs only in best.pt's string columns, which it
# stored as lists (read by `unpack_strings`).
READABLE_FORMATS = (1, 2)


# -- checking a run directory ----------------------------------------------------------------


def check_new_run(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to mix a new run into an old directory unless asked to overwrite it.

    Called before any data is read, so a refused run leaves nothing behind.
    """
    if resume and overwrite:
        raise RecommenderError("--resume and --overwrite contradict each other")
    if resume:
        if not (out / LAST_FILE).is_file():
            raise RecommenderError(
                f"{out}: no {LAST_FILE} to resume from (is this a run directory?)"
            )
        return
    if out.exists() and not out.is_dir():
        raise RecommenderError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RecommenderError(
            f"run directory {out} is not empty; pass --overwrite to replace it "
            "or --resume to continue it"
        )


def prepare_run_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Check, then create (or empty, with overwrite) the run directory."""
    check_new_run(out, overwrite=overwrite, resume=resume)
    if resume:
        return
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


def is_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds a trained run: its config and its best checkpoint."""
    return (run_dir / CONFIG_FILE).is_file() and (run_dir / BEST_FILE).is_file()


def require_run(run_dir: Path, *, config: bool = True) -> Path:
    """`run_dir` if it holds a trained run (best.pt, and config.yaml unless `config` is False);
    otherwise a one-line error that says what is missing."""
    run_dir = Path(run_dir)
    needed = ([CONFIG_FILE] if config else []) + [BEST_FILE]
    missing = [name for name in needed if not (run_dir / name).is_file()]
    if missing:
        raise RecommenderError(
            f"{run_dir}: not a run directory (no {' or '.join(missing)}; "
            "train a model into it first)"
        )
    return run_dir


def best_file_id(run_dir: str | Path) -> tuple[int, int, int] | None:
    """Which best.pt `run_dir` holds now (inode, size, mtime), None without one. Training
    writes best.pt by renaming a new file over it, so each write gives a new id: the service
    compares ids to notice a new model without reading the file."""
    try:
        st = os.stat(Path(run_dir) / BEST_FILE)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def read_config(run_dir: Path) -> Config:
    """The saved config of a trained run."""
    return load_config(require_run(run_dir) / CONFIG_FILE)


def write_config(run_dir: Path, cfg: Config) -> None:
    cfg.save(Path(run_dir) / CONFIG_FILE)


# -- checkpoint files --------------------------------------------------------------------------


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """torch.save through a temporary file, so a crash never leaves a truncated checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of this format as a dict, loaded without running anything stored in it.

    weights_only=True rebuilds tensors and plain containers only; anything else (a pickled
    object whose loading could run code) is refused, as are other formats and foreign files.
    The tensors are memory-mapped from the file (copy on write), not read: reading a 1M-item
    model's tables is one call per tensor that holds the GIL for tens of milliseconds, which a
    service loading a new version beside the serving one waits out in every request; mapped,
    their pages come in as they are first used. Files are replaced by renaming (atomic_path),
    so a mapped file is never rewritten under a loaded model.
    """
    path = Path(path)
    if not path.is_file():
        raise RecommenderError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # the refusal below is the one line a user sees
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location=map_location, weights_only=True, mmap=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        why = (
            f"it holds a pickled {found.group(1)}, not only tensors and plain containers; "
            "refused without loading it"
            if found
            else exc.__class__.__name__
        )
        raise RecommenderError(f"{path}: not a readable checkpoint ({why})") from None
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise RecommenderError(f"{path}: not a checkpoint written by this project")
    if payload["format_version"] not in READABLE_FORMATS:
        readable = " or ".join(str(v) for v in READABLE_FORMATS)
        raise RecommenderError(
            f"{path}: checkpoint format {payload['format_version']}, this version reads format "
            f"{readable}; retrain or use a matching version"
        )
    return payload


def _payload(obj: Any) -> dict[str, Any]:
    # Not dataclasses.asdict: that deep-copies every tensor.
    return {"format_version": FORMAT_VERSION} | {f.name: getattr(obj, f.name) for f in fields(obj)}


def pack_strings(strings: Sequence[str] | np.ndarray) -> dict[str, torch.Tensor]:
    """Strings as two tensors, Arrow's layout for a string column: `utf8`, the (B,) uint8 UTF-8
    bytes of all of them end to end, and `offsets`, (n + 1,) int64, string i being
    utf8[offsets[i]:offsets[i + 1]]. Built in C by pyarrow, with no Python loop per string."""
    column = pa.array(strings, type=pa.large_string())
    if column.null_count:
        raise ValueError("a string column holds None")
    _, offsets, data = column.buffers()  # a new array: no validity buffer, starts at offset 0
    starts = np.frombuffer(offsets, dtype=np.int64, count=len(column) + 1)
    utf8 = np.frombuffer(data, dtype=np.uint8, count=int(starts[-1]))
    return {"offsets": torch.from_numpy(starts.copy()), "utf8": torch.from_numpy(utf8.copy())}


def unpack_strings(packed: Any, name: str, path: Path) -> np.ndarray | None:
    """`pack_strings`'s tensors back as an (n,) object array of str, built in C; a format 1
    list as it is; None stays None. Offsets out of order or out of bounds, or bytes that are
    not UTF-8, are refused before any string is built from them."""
    if packed is None:
        return None
    if isinstance(packed, list):
        return np.array(packed, dtype=object)
    starts, utf8 = (
        packed.get(k) if isinstance(packed, dict) else None for k in ("offsets", "utf8")
    )
    if not (
        isinstance(starts, torch.Tensor)
        and isinstance(utf8, torch.Tensor)
        and (starts.dtype, utf8.dtype) == (torch.int64, torch.uint8)
        and starts.dim() == utf8.dim() == 1
        and len(starts) > 0
    ):
        raise RecommenderError(f"{path}: '{name}' is not a packed string column")
    try:
        column = pa.LargeStringArray.from_buffers(
            len(starts) - 1, pa.py_buffer(starts.cpu().numpy()), pa.py_buffer(utf8.cpu().numpy())
        )
        column.validate(full=True)
    except pa.ArrowInvalid as exc:
        raise RecommenderError(f"{path}: '{name}' is damaged ({exc})") from None
    # Slice by slice: one call over a 1,000,000-id column holds the GIL for 50-200 ms, which
    # a service loading a new version beside the serving one would wait out in every request.
    strings = np.empty(len(column), dtype=object)
    for start in range(0, len(column), LOOKUP_SLICE):
        piece = column.slice(start, LOOKUP_SLICE)
        strings[start : start + len(piece)] = piece.to_numpy(zero_copy_only=False)
    return strings


def _fields_of(cls: type, payload: dict[str, Any], path: Path) -> dict[str, Any]:
    """The payload's values for `cls`'s fields; a missing required key names the file."""
    values = {}
    for f in fields(cls):
        if f.name in payload:
            values[f.name] = payload[f.name]
        elif f.default is MISSING and f.default_factory is MISSING:
            raise RecommenderError(f"{path}: checkpoint lacks '{f.name}'")
    return values


# BestCheckpoint fields the Recommender holds in its own form rather than in its `meta`.
_BULKY = {"state_dict", "user_ids", "item_ids", "item_counts", "history_indptr", "history_items"}
# BestCheckpoint's string columns, stored by `pack_strings`.
_STRINGS = ("user_ids", "item_ids", "item_titles", "item_genres")


@dataclass
class BestCheckpoint:
    """best.pt: everything inference needs to rebuild the model from the file alone."""

    model_config: dict[str, Any]  # ModelConfig as JSON
    n_users: int
    n_items: int
    state_dict: dict[str, torch.Tensor]
    epoch: int
    valid_metrics: dict[str, float]
    config: dict[str, Any]  # the run's full config
    config_digest: str
    user_ids: np.ndarray  # (n_users,) str: the vocabularies, index -> raw id
    item_ids: np.ndarray  # (n_items,) str
    item_counts: torch.Tensor  # (n_items,) interactions per item in train + valid
    history_indptr: torch.Tensor  # (n_users + 1,) CSR rows of each user's train + valid items
    history_items: torch.Tensor  # (nnz,) int32 item indices
    item_titles: np.ndarray | None = None  # (n_items,) str, "" where an item has none
    item_genres: np.ndarray | None = None  # (n_items,) str, "|"-separated
    source: str = ""
    package_version: str = ""
    created_at: str = ""

    def to_dict(self) -> dict[str, Any]:
        payload = _payload(self)
        for name in _STRINGS:
            if payload[name] is not None:
                payload[name] = pack_strings(payload[name])
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, Any], path: Path = Path(BEST_FILE)) -> BestCheckpoint:
        values = _fields_of(cls, payload, path)
        for name in _STRINGS:
            if name in values:
                values[name] = unpack_strings(values[name], name, path)
        return cls(**values)

    def meta(self) -> dict[str, Any]:
        """What describes the run besides weights, vocabularies and history."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _BULKY}


@dataclass
class LastCheckpoint:
    """last.pt: the state after an epoch, from which `--resume` continues bit for bit."""

    stage_index: int
    stage: str
    epoch: int
    model: dict[str, torch.Tensor]  # the stage's state_dict
    optimizers: list[dict[str, Any]]
    best_metric: float
    best_epoch: int
    best_state: dict[str, torch.Tensor] | None
    best_valid: dict[str, float]
    bad: int  # epochs since the monitored metric last improved
    completed: dict[str, dict[str, Any]]  # finished stages: model, best epoch/metric, weights
    torch_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    training_digest: str = ""  # Config.training_digest(): resume needs the same one

    def to_dict(self) -> dict[str, Any]:
        return _payload(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any], path: Path = Path(LAST_FILE)) -> LastCheckpoint:
        return cls(**_fields_of(cls, payload, path))


def save_best(run_dir: Path, ckpt: BestCheckpoint) -> None:
    save_checkpoint(Path(run_dir) / BEST_FILE, ckpt.to_dict())


def load_best(run_dir: Path, map_location: str | torch.device = "cpu") -> BestCheckpoint:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RecommenderError(f"{run_dir}: not a run directory")
    path = run_dir / BEST_FILE
    return BestCheckpoint.from_dict(load_checkpoint(path, map_location), path)


def save_last(run_dir: Path, ckpt: LastCheckpoint) -> None:
    save_checkpoint(Path(run_dir) / LAST_FILE, ckpt.to_dict())


def load_last(run_dir: Path, map_location: str | torch.device = "cpu") -> LastCheckpoint:
    path = Path(run_dir) / LAST_FILE
    return LastCheckpoint.from_dict(load_checkpoint(path, map_location), path)


def run_data(data: DataBundle) -> dict[str, Any]:
    """best.pt's fields that come from the data: vocabularies, titles, history, popularity."""
    full = data.train_full
    indptr, items = full.csr()
    info = data.item_info
    titles = genres = None
    if info is not None:
        by_id = info.drop_duplicates("item_id").set_index("item_id")
        ids = data.items.ids
        titles = by_id["title"].reindex(ids).fillna("").astype(str).to_numpy(dtype=object)
        if "genres" in by_id:
            genres = by_id["genres"].reindex(ids).fillna("").astype(str).to_numpy(dtype=object)
    return {
        "user_ids": data.users.ids,
        "item_ids": data.items.ids,
        "item_titles": titles,
        "item_genres": genres,
        "item_counts": torch.from_numpy(full.item_counts()),
        "history_indptr": torch.from_numpy(indptr),
        "history_items": torch.from_numpy(items.astype("int32")),
        "source": data.source,
    }


# -- metrics.jsonl -----------------------------------------------------------------------------


def _metric_lines(run_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every whole line. A line that is not JSON was torn by the kill that
    stopped the run mid-write, and is skipped: by the report, and by resume, which drops it."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError:
            continue
    return out


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / METRICS_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records of metrics.jsonl ([] when the run trained nothing)."""
    return [record for _, record in _metric_lines(run_dir)]


def truncate_metrics(run_dir: Path, stage_index: int, epoch: int) -> None:
    """Drop records after (stage_index, epoch), the checkpoint a resumed run continues from,
    so resumed epochs are not doubled."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return
    kept = [
        line
        for line, record in _metric_lines(run_dir)
        if (record["stage_index"], record["epoch"]) <= (stage_index, epoch)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
