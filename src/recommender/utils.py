"""Shared plumbing: error types, atomic file writes, devices, threads, the allocator, logging.

Everything here is a leaf: no module in this file imports another part of the package.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger("recommender")


class RecommenderError(Exception):
    """An error the user can act on; the CLI prints it on one line and exits with code 2."""


class DataError(RecommenderError):
    """Bad input data. The message names the file and, where there is one, the line."""


class ConfigError(RecommenderError):
    """An invalid or unknown configuration key or value."""


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves the old file (or none) in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: '{name}' requested but CUDA is not available")
    return device


def set_threads(threads: int | None) -> None:
    """Set intra-op threads; warn when that oversubscribes the machine's cores."""
    if threads is None:
        return
    cores = os.cpu_count() or 1
    if threads > cores:
        log.warning("threads=%d exceeds the %d available cores; expect slowdowns", threads, cores)
    torch.set_num_threads(threads)


# glibc malloc: blocks below this come from the heap instead of mmap (default: 128 KiB, rising
# only as large blocks are freed), and up to TRIM bytes free at the heap's top stay mapped.
MALLOC_MMAP_THRESHOLD = 64 << 20
MALLOC_TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def retain_freed_memory() -> bool:
    """Let glibc's malloc keep the memory of freed tensors for the next ones; True if it did.

    Why: a CPU training step allocates and frees the same few 0.1-30 MB activations every
    step. Above malloc's mmap threshold each of them is a fresh mapping whose pages fault in on
    first touch (about 100 faults a step for the seed's network on ml-100k: 4 KiB each), so
    an elementwise op over 1 MB cost 3-10 times its in-cache time; with blocks up to 64 MiB
    served from the heap and 256 MiB of free heap kept, a step took 15-20% less. The cost is
    up to that much freed memory held by the process. Not glibc (macOS, musl): does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
        and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
