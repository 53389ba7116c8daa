"""One worker's model over its life: the first load, reloads that reach every worker, the drain.

`recommender serve --workers N` runs N processes, each with its own copy of the model. They
agree on what to serve through a folder `serve` makes for them: `model.json` there names the
run to serve and a generation that each admin reload raises. Every `watch_interval_s` each
worker looks at two things and, when one changed, loads the model again:

- `model.json`: a higher generation is a reload another worker took; load that run;
- the served run's best.pt: training renames a new file over it (a new `best_file_id`); each
  worker notices on its own and loads it, with no admin call needed.

A load runs in a thread beside the serving model and ends in a swap of one reference, so
requests in flight finish on the old model and none fails in between. A worker started late
(or restarted by uvicorn's supervisor) reads `model.json` first and serves what the others do.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from starlette.concurrency import run_in_threadpool

from recommender.checkpoint import best_file_id
from recommender.serving.engine import ServedModel
from recommender.serving.metrics import Metrics
from recommender.serving.settings import ServeSettings
from recommender.utils import atomic_write_text

log = logging.getLogger("recommender")

TARGET_FILE = "model.json"
# Seconds SIGTERM waits for requests in flight before closing connections anyway.
GRACEFUL_SHUTDOWN_S = 30
# Seconds after a swap before the replaced version's last reference is dropped (release_later).
RELEASE_AFTER_S = 2.0

Stop = Callable[[int, FrameType | None], Any]


@dataclass(frozen=True)
class Target:
    run_dir: str
    generation: int


class SharedTarget:
    """The run every worker of one `serve` should serve: `model.json` in their shared folder."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / TARGET_FILE

    def read(self) -> Target | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        return Target(str(data["run_dir"]), int(data["generation"]))

    def publish(self, run_dir: str) -> int:
        """Make `run_dir` the next generation; returns it. A lock file orders two workers
        publishing at once, so each reload gets its own generation and the last one wins."""
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            generation = (current.generation if current else 0) + 1
            atomic_write_text(self.path, json.dumps({"run_dir": run_dir, "generation": generation}))
        return generation


def release_later(old: ServedModel, after_s: float) -> None:
    """Let a replaced version be freed by a thread of its own, `after_s` seconds from now.

    A version is freed when its last reference goes (engine.settle_heap keeps versions out of
    reference cycles), in whatever thread drops it: on the event loop, freeing a 1M-item
    version (its tensors, indexes, vocabularies of a million ids) holds every request of the
    worker for about 100 ms. Requests still on the old version finish within the delay, the
    event loop's own references (the swap, the admin reload's answer) are gone by then, and
    the timer's is the last: it then frees the largest parts a piece at a time
    (`Recommender.release`), so no single call holds the GIL for long. Should anything else
    still hold the version, it is left whole, to be freed when that reference goes.
    """
    holder = [old]
    del old

    def release() -> None:
        version = holder.pop()
        # Two references each: this name (or the version's attribute) and the call's argument.
        if sys.getrefcount(version) == 2 and sys.getrefcount(version.rec) == 2:
            version.rec.release()

    timer = threading.Timer(after_s, release)
    timer.daemon = True
    timer.start()


class Worker:
    """The model this process serves, how it changes, and whether it still takes traffic."""

    def __init__(
        self,
        run_dir: str | Path,
        settings: ServeSettings,
        metrics: Metrics,
        shared_dir: Path | None = None,
    ) -> None:
        self.served: ServedModel | None = None
        self.draining = False
        self._run_dir = str(run_dir)
        self._settings = settings
        self._metrics = metrics
        self._shared = SharedTarget(shared_dir) if shared_dir is not None else None
        # Where large catalogs' ANN indexes are built for every worker (indexes.py); without
        # a shared folder, a temporary one of this worker's, made when first needed.
        self._index_root = Path(shared_dir) / "indexes" if shared_dir is not None else None
        self._generation = 0  # of model.json, last followed
        self._file: tuple[int, int, int] | None = None  # best.pt last loaded or tried
        self._lock = asyncio.Lock()  # one load at a time: admin reloads and the watcher
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Load the model the other workers serve (the run given, if none has reloaded)."""
        target = self._shared.read() if self._shared is not None else None
        if target is not None:
            self._run_dir, self._generation = target.run_dir, target.generation
        await self._swap(self._run_dir)

    async def _swap(self, run_dir: str) -> ServedModel:
        """Load `run_dir` in a thread, then serve it; raises what loading raised."""
        file_id = best_file_id(run_dir)  # before loading: a file replaced meanwhile loads next
        old = self.served
        if self._index_root is None:
            self._index_root = Path(tempfile.mkdtemp(prefix="recommender-ann-"))
        new = await run_in_threadpool(
            ServedModel.load, run_dir, self._settings, self._index_root, file_id, old is not None
        )
        if old is not None:
            new.adopt(old)
            old.retire()  # it stops explaining ahead; requests in flight still finish on it
        self.served, self._file = new, new.file_id
        self._metrics.serving(new.info(), old.info() if old is not None else None)
        new.start_warming()
        if old is not None:
            release_later(old, RELEASE_AFTER_S)
        return new

    async def reload(self, run_dir: str | None = None) -> tuple[ServedModel, ServedModel]:
        """An admin reload of `run_dir` (default: the run serving): (old, new) once this worker
        serves it; the others follow within `watch_interval_s` plus their load. A run that
        fails to load raises here, and every worker keeps its model."""
        async with self._lock:
            old = self.served
            if old is None:
                raise RuntimeError("reload before the first load")
            try:
                new = await self._swap(run_dir or old.run_dir)
            except Exception:
                self._metrics.reload("refused")
                raise
            if self._shared is not None:
                self._generation = self._shared.publish(new.run_dir)
        self._metrics.reload("ok")
        return old, new

    async def watch(self) -> None:
        """Until cancelled: follow other workers' reloads and new best.pt files."""
        while True:
            await asyncio.sleep(self._settings.watch_interval_s)
            try:
                await self._follow()
            except Exception:  # one failed look must not end the watching
                log.exception("looking for a new model failed")

    async def _follow(self) -> None:
        target = self._shared.read() if self._shared is not None else None
        async with self._lock:
            old = self.served
            if old is None:
                return
            if target is not None and target.generation > self._generation:
                self._generation = target.generation  # one try per generation
                run_dir, why = target.run_dir, "another worker's reload"
            else:
                file_id = best_file_id(old.run_dir)
                if file_id == self._file:
                    return
                self._file = file_id  # one try per file
                run_dir, why = old.run_dir, "a new best.pt"
            try:
                new = await self._swap(run_dir)
            except Exception as exc:  # any failure: the run is unusable, the old model stays
                self._metrics.reload("refused")
                log.warning("%s: %s refused, still serving %s: %s", why, run_dir, old.version, exc)
                return
        self._metrics.reload("ok")
        log.info("%s: reloaded %s -> %s", why, old.version, new.version)

    def close(self) -> None:
        """The worker stops: remove the index folder it made for itself."""
        if self._shared is None and self._index_root is not None:
            shutil.rmtree(self._index_root, ignore_errors=True)
            self._index_root = None

    def drain_on_sigterm(self) -> None:
        """From SIGTERM on, `/readyz` answers 503 while the worker keeps serving, until its
        requests in flight are answered and `drain_s` has passed; then uvicorn's own shutdown
        runs (stop accepting, finish what is left). A second SIGTERM stops at once.

        Wraps the SIGTERM handler uvicorn's server installs; only in the main thread, where
        uvicorn runs the app (a TestClient runs it in another thread and has no signals).
        """
        if threading.current_thread() is not threading.main_thread():
            return
        stop = signal.getsignal(signal.SIGTERM)
        if not callable(stop):
            return
        loop = asyncio.get_running_loop()

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            if self.draining:
                stop(signum, frame)
                return
            self.draining = True
            loop.call_soon_threadsafe(self._start_drain, stop)

        signal.signal(signal.SIGTERM, on_sigterm)

    def _start_drain(self, stop: Stop) -> None:
        task = asyncio.get_running_loop().create_task(self._drain(stop))
        self._tasks.add(task)  # the loop keeps only a weak reference
        task.add_done_callback(self._tasks.discard)

    async def _drain(self, stop: Stop) -> None:
        start = time.monotonic()
        log.info("SIGTERM: not ready; draining %d requests in flight", self._metrics.in_flight)
        while time.monotonic() - start < GRACEFUL_SHUTDOWN_S:
            waited = time.monotonic() - start
            if self._metrics.in_flight == 0 and waited >= self._settings.drain_s:
                break
            await asyncio.sleep(0.02)
        stop(signal.SIGTERM, None)
