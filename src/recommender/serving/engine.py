"""One loaded model version as the service sees it: the `Recommender` plus serving extras,
and `ModelCalls`, the threads that run it.

A `ServedModel` is immutable once built. A reload builds a new one beside the old and swaps a
single reference, so a request that picked up the old version finishes on it. The build, the
checkpoint and a first call of each kind, runs off the serving path (`ServedModel.load`): in a
thread of its own at low CPU priority, so the old version keeps answering at full speed until
the new one is ready to take over; a large catalog's ANN indexes are built once for every
worker, by a process of their own at the lowest priority (indexes.py). Once it serves, a
paced thread explains its most active users' lists ahead of their requests
(`warm_explanations`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from recommender.checkpoint import best_file_id
from recommender.explanations import FoldCache
from recommender.inference import FOLDED_IN, POPULARITY, TRAINED, ItemSide, Recommender
from recommender.serving.indexes import Prebuilt, VersionChanged, prebuilt
from recommender.serving.retrieval import ItemNeighbours, TwoStageRetriever
from recommender.serving.settings import ServeSettings

T = TypeVar("T")

log = logging.getLogger("recommender")

# Raw ids are never empty, so no vocabulary holds this one: asking the Recommender for it
# returns its popularity fallback list.
ANONYMOUS = ""


# Ranked.representation of a list scored from items alone (a session, similar items).
SESSION = "session"
# Nice values beside a serving version: BUILD_NICE for the thread that reads a new version's
# run, LONG_BUILD_NICE, the lowest priority, for the process that builds a large catalog's ANN
# indexes (indexes.py: it shares no GIL with serving). A thread of a worker that holds the GIL
# (any Python) while a lower priority keeps it off the busy cores makes every serving thread
# of the worker wait with it: with both cores busy, a thread sleeping 1 ms woke up to 283 ms
# late beside a nice-19 thread running Python, 20 ms beside nice 5 and 10 ms beside nice 0
# (benchmarks/bench_priority.py; a 1M reload at nice 19 queued requests for 20 s in one run of
# three). At nice 0 the read competes with requests for the GIL all along instead (the 1M
# mixed load's p99 208 / 104 / 208 ms against 134 ms, the median of five runs, at nice 5:
# docs/BENCHMARKS.md). Explaining ahead runs for minutes: it keeps the worker's priority and
# takes EXPLAIN_AHEAD_SHARE of a core by resting after each user for three times as long as
# the user took.
BUILD_NICE = 5
LONG_BUILD_NICE = 19
EXPLAIN_AHEAD_SHARE = 0.25
# Loads of a version whose best.pt is replaced while it loads: each tries the newer file.
LOAD_ATTEMPTS = 3
# Seconds a thread may hold the GIL while another waits for it (Python's default is 5 ms).
# Short, because request handling waits on it at every hand-over: while a model version
# loads, its unpickling holds the GIL for seconds, and a model thread's Python holds it
# between torch calls (1M-item reload, longest stall of a thread sleeping 1 ms: 20 ms at
# the default, 7 ms at 0.2 ms).
GIL_SWITCH_S = 0.0005


@dataclass(frozen=True)
class Ranked:
    """One ranked list: raw item ids and scores, best first; `fallback` marks popularity for
    an unknown user; `representation` says what the list was scored from (TRAINED, FOLDED_IN,
    POPULARITY or SESSION); `history`: a folded-in user's items, which explain the list."""

    user_id: str | None
    item_ids: list[str]
    scores: list[float]
    fallback: bool = False
    representation: str = TRAINED
    history: list[str] | None = None


def _ranked(
    user_id: str | None,
    ids: np.ndarray,
    scores: np.ndarray,
    fallback: bool,
    representation: str,
    history: list[str] | None = None,
) -> Ranked:
    """Drop the empty slots (id None) that pad a list shorter than k."""
    keep = [i for i, item in enumerate(ids) if item is not None]
    items, kept = [str(ids[i]) for i in keep], [float(scores[i]) for i in keep]
    return Ranked(user_id, items, kept, fallback, representation, history)


class ServedModel:
    def __init__(
        self,
        rec: Recommender,
        settings: ServeSettings,
        load_seconds: float,
        prebuilt: Prebuilt | None = None,
    ) -> None:
        """`prebuilt`: a large catalog's ANN indexes built beforehand (indexes.py); without
        them a catalog above `ann_threshold` builds its indexes here."""
        self.rec = rec
        self.load_seconds = load_seconds
        self.file_id: tuple[int, int, int] | None = None  # the best.pt it was loaded from
        self.explainable = rec.personalised and len(rec.users) > 0
        # not above ann_threshold: a fold there holds an items x dims Jacobian of the catalog
        exact = len(rec.items) <= settings.ann_threshold
        warm = self.explainable and exact
        self.to_warm = min(settings.explain_warm_users, len(rec.users)) if warm else 0
        self.warmed = 0  # of the to_warm users, whose top-k list is explained
        self._retired = threading.Event()
        digest = str(rec.meta.get("config_digest") or "unknown")
        created = str(rec.meta.get("created_at") or "")
        stamp = "".join(ch for ch in created[:19] if ch.isdigit())
        # Digest plus training time: a rerun of the same config is still a new version.
        self.version = f"{digest}-{stamp}" if stamp else digest
        rec.folds = FoldCache(settings.explain_cache)
        self.retriever: TwoStageRetriever | None = None
        self.neighbours: ItemNeighbours | None = None
        if exact:
            return
        if rec.model.retrieval_vectors() is None:
            log.warning(
                "%s has no retrieval vectors: scoring all %d items exactly per user",
                rec.model_name,
                len(rec.items),
            )
        else:
            self.retriever = TwoStageRetriever(
                rec.model,
                settings.ann_candidates,
                settings.ann_nprobe,
                settings.ann_nlist,
                rec.device,
                prebuilt.users if prebuilt is not None else None,
            )
        if rec.item_space is not None:
            self.neighbours = ItemNeighbours(
                rec.item_space,
                settings.ann_candidates,
                settings.ann_item_nprobe,
                settings.ann_nlist,
                prebuilt.items if prebuilt is not None else None,
            )

    @classmethod
    def load(
        cls,
        run_dir: str | Path,
        settings: ServeSettings,
        index_root: Path,
        file_id: tuple[int, int, int] | None = None,
        beside: bool = True,
    ) -> ServedModel:
        """Load `run_dir`, build what serving precomputes and answer one request of each kind,
        off the serving path (module doc); returns once the version is ready to swap in.

        A catalog above `ann_threshold` takes its ANN indexes and item side from `index_root`,
        where the first worker to need them has a process of their own build them
        (indexes.py) for the best.pt `file_id` names (default: the one there now; a file
        replaced during the load is loaded instead). `beside`: another version serves
        meanwhile, so the run is read at BUILD_NICE and the parts built at LONG_BUILD_NICE
        (not for a worker's first load, which nothing waits behind). Raises what the load
        raised (RecommenderError for a run that is not one, or whose parts failed to build).
        """
        lower = partial(_renice_self, BUILD_NICE) if beside else None
        index_nice = LONG_BUILD_NICE if beside else 0
        file_id = file_id or best_file_id(run_dir)
        attempts = 1
        with ThreadPoolExecutor(1, "model-build", initializer=lower) as builder:
            while True:
                job = builder.submit(cls._build, run_dir, settings, index_root, file_id, index_nice)
                try:
                    served = job.result()
                    break
                except VersionChanged:
                    if attempts == LOAD_ATTEMPTS:
                        raise
                    attempts += 1
                    file_id = best_file_id(run_dir)
        served.file_id = file_id
        return served

    @classmethod
    def _build(
        cls,
        run_dir: str | Path,
        settings: ServeSettings,
        index_root: Path,
        file_id: tuple[int, int, int] | None,
        index_nice: int,
    ) -> ServedModel:
        start = time.perf_counter()
        parts: Prebuilt | None = None

        def built_elsewhere(n_items: int) -> ItemSide | None:
            nonlocal parts
            if n_items <= settings.ann_threshold or file_id is None:
                return None
            if best_file_id(run_dir) != file_id:  # what was just read may be another file
                raise VersionChanged(f"{run_dir}/best.pt changed while it was read")
            parts = prebuilt(run_dir, file_id, settings, index_root, index_nice)
            return parts.item_side

        rec = Recommender.from_run(run_dir, item_side=built_elsewhere)
        served = cls(rec, settings, 0.0, parts)
        served._warm_up()
        served.load_seconds = round(time.perf_counter() - start, 3)
        log.info("loaded %s (%s) in %.1f s", run_dir, served.version, served.load_seconds)
        return served

    def _warm_up(self) -> None:
        """One call of each kind, so the first requests after a swap do not pay for lazy
        set-up (torch kernels, FAISS, the explainer of an exactly scored catalog)."""
        rec = self.rec
        if len(rec.users):
            self.recommend([str(rec.users.ids[0])], 10, True)
        if len(rec.items) and rec.item_space is not None:
            self.similar(str(rec.items.ids[0]), 10)
        if self.explainable and self.retriever is None:
            user = str(rec.users.ids[0])
            rec.explain_many(user, self.recommend([user], 1, True)[0].item_ids, keep_fold=False)

    def start_warming(self) -> threading.Thread:
        """`warm_explanations` in a daemon thread of its own."""
        thread = threading.Thread(target=self.warm_explanations, name="explain-ahead", daemon=True)
        thread.start()
        return thread

    def warm_explanations(self, k: int = 10) -> None:
        """Explain the top-k lists of the `to_warm` most active users ahead of their requests,
        until done or `retire`d (`start_warming` runs it once this version serves).

        A user's first explained list costs a fold-in and its integration path, tens of
        milliseconds (docs/BENCHMARKS.md); explained once, the list's items are a look-up in
        `rec.explained`, which a reload of the same best.pt takes over (`adopt`). The folds
        are not kept: the explanations are what requests ask for again. It takes about
        EXPLAIN_AHEAD_SHARE of a core, by resting between users rather than at a lower
        priority (BUILD_NICE says why).
        """
        rest = 1 / EXPLAIN_AHEAD_SHARE - 1
        try:
            for user in self.rec.most_active_users(self.to_warm) if self.to_warm else []:
                if self._retired.is_set():
                    return
                start = time.perf_counter()
                ranked = self.recommend([str(user)], k, True)[0]
                self.rec.explain_many(user, ranked.item_ids, keep_fold=False)
                self.warmed += 1
                if self._retired.wait((time.perf_counter() - start) * rest):
                    return
        except Exception:  # the version still serves; its explanations are computed on demand
            log.exception("explaining %s's lists ahead of requests failed", self.version)
        else:
            log.info("%s: %d users' lists explained ahead of requests", self.version, self.warmed)

    def adopt(self, old: ServedModel) -> None:
        """Take over what `old` explained when both were loaded from the same best.pt: an
        explanation is a function of the weights, so a reload of the same file keeps them."""
        if self.file_id is not None and old.file_id == self.file_id:
            self.rec.explained = old.rec.explained

    def retire(self) -> None:
        """This version no longer serves: stop explaining ahead for it."""
        self._retired.set()

    @property
    def retrieval(self) -> str:
        return "two-stage" if self.retriever is not None else "exact"

    def info(self) -> dict[str, Any]:
        meta = self.rec.meta
        return {
            "version": self.version,
            "model": self.rec.model_name,
            "run_dir": meta.get("run_dir"),
            "created_at": meta.get("created_at"),
            "config_digest": meta.get("config_digest"),
            "epoch": meta.get("epoch"),
            "valid_metrics": meta.get("valid_metrics") or {},
            "n_users": len(self.rec.users),
            "n_items": len(self.rec.items),
            "retrieval": self.retrieval,
            "load_seconds": self.load_seconds,
            "explained_ahead": {"users": self.warmed, "of": self.to_warm},
        }

    @property
    def run_dir(self) -> str:
        return str(self.rec.meta["run_dir"])

    def known_items(self, item_ids: list[str]) -> np.ndarray:
        """(I,) bool: which items the model knows."""
        return self.rec.known_items(item_ids)

    def title(self, item_id: str) -> str | None:
        return self.rec.titles.get(item_id) if self.rec.titles else None

    def recommend(
        self,
        user_ids: list[str],
        k: int,
        exclude_seen: bool,
        histories: dict[str, list[str]] | None = None,
    ) -> list[Ranked]:
        """Top-k per user; unknown users get a list folded in from their history in
        `histories`, else the popularity list with `fallback` set."""
        rec = self.rec
        ids, scores = rec.recommend(user_ids, k, exclude_seen, self.retriever, histories)
        kinds = rec.representations(user_ids, histories)
        known = rec.known_users(user_ids)
        return [
            _ranked(
                u,
                ids[r],
                scores[r],
                not known[r] and kinds[r] == POPULARITY,
                kinds[r],
                (histories or {}).get(u) if kinds[r] == FOLDED_IN else None,
            )
            for r, u in enumerate(user_ids)
        ]

    def session(self, item_ids: list[str], k: int) -> Ranked:
        """An anonymous visitor: what follows the session's items (oldest first) for a run that
        reads recent items (model.context's Markov term, sasrec), else the items most similar to
        them (item similarity).

        A model without an item space (popularity) answers with the popularity list.
        """
        if not self.rec.personalised:
            ids, scores = self.rec.recommend(ANONYMOUS, k=k, exclude_seen=False)
            return _ranked(None, ids, scores, True, POPULARITY)
        if self.rec.reads_context:
            ids, scores = self.rec.recommend_next(item_ids, k=k)
        else:
            ids, scores = self.rec.similar_to_items(item_ids, k, self.neighbours)
        return _ranked(None, ids, scores, False, SESSION)

    def after(self, user_id: str, item_ids: list[str], k: int, exclude_seen: bool) -> Ranked:
        """One user's list after the items they just interacted with (oldest first), for a
        model.context or sasrec run (RecommenderError otherwise); an unknown user is scored as an
        anonymous session. See Recommender.recommend_next."""
        ids, scores = self.rec.recommend_next(
            item_ids, k=k, user_id=user_id, exclude_seen=exclude_seen
        )
        known = bool(self.rec.known_users([user_id])[0])
        return _ranked(user_id, ids, scores, False, TRAINED if known else SESSION)

    def similar(self, item_id: str, k: int) -> Ranked:
        ids, scores = self.rec.similar_items(item_id, k, self.neighbours)
        return _ranked(None, ids, scores, False, SESSION)

    def score(self, user_ids: list[str], item_ids: list[str]) -> list[float]:
        return [float(s) for s in self.rec.score(user_ids, item_ids)]

    def explain_many(
        self,
        user_id: str,
        item_ids: list[str],
        after: list[str] | None = None,
        history: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """One fold-in of the user explains the whole list (see explain/); `after`: the
        recent items an `after` list was scored with; `history`: a new user's items, which
        their list was folded in from."""
        return [
            {
                "supporting_items": e.supporting_items,
                "weights": e.weights,
                "method": e.method,
                "text": e.one_line(self.rec.titles),
                "score": e.score,
                "baseline_score": e.baseline_score,
                "fidelity": e.fidelity,
            }
            for e in self.rec.explain_many(user_id, item_ids, after=after, history=history)
        ]

    def search(self, query: str, limit: int) -> list[str]:
        """Items whose title contains `query`, most popular first (see Recommender.search_items)."""
        return [str(i) for i in self.rec.search_items(query, limit)]

    def user_history(self, user_id: str) -> list[str]:
        """A known user's training items, none for an unknown one (Recommender.user_history)."""
        return [str(i) for i in self.rec.user_history(user_id)]

    def most_active_users(self, n: int) -> list[str]:
        return [str(u) for u in self.rec.most_active_users(n)]

    def known_users(self, user_ids: list[str]) -> np.ndarray:
        """(U,) bool: which users the model trained on (the others get the fallback)."""
        return self.rec.known_users(user_ids)


def settle_heap() -> None:
    """Leave this process's long-lived objects out of every later cyclic garbage collection,
    once per process, before the first model version loads.

    With torch, pandas and FastAPI imported a worker holds about 350,000 objects the
    collector tracks (modules, classes, functions: none of them ever garbage), and a full
    collection traversed them all while holding the GIL: about 140 ms in which no request of
    the worker moved, and a reload allocates enough to set off full collections. Frozen
    (`gc.freeze`), they are no longer traversed: a full collection beside two 1M-item
    versions took under 1 ms. What loading a run imports on first use (building a model on
    the meta device brings in torch._dynamo) is imported here first, so it is frozen too, and
    so that no version's load runs that import: torch.fx keeps the frames of the code that
    imported it, which held the first version loaded in a reference cycle that only a full
    collection freed. Versions are created afterwards, free of cycles: reference counting
    frees each one when its last reference goes (lifecycle.release_later).
    """
    if gc.get_freeze_count():
        return
    import torch

    with torch.device("meta"):
        torch.nn.Embedding(1, 1)
    gc.collect()
    gc.freeze()


def _renice_self(nice: int) -> None:
    """Give the calling thread a nice value (only ever a lower priority); on Linux only, where
    a nice value is per thread (elsewhere setpriority takes process ids)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class ModelCalls:
    """The threads that run model calls for the request handlers: `threads` at most at once,
    and explained lists on `explain_threads` of their own.

    A handler awaits its call, so the event loop keeps accepting and parsing requests while
    a slow call (a fold-in) runs, and calls beyond `threads` queue here rather than on the
    event loop. A user's first explanation costs tens of milliseconds of a model thread;
    in the same pool, plain lists queued behind a few of them (ml-100k mixed load at 100/s,
    15% explained lists: all requests p99 132 ms with one pool), so they take their own lane.
    Torch releases the GIL inside its kernels, and the interpreter hands the GIL over every
    GIL_SWITCH_S (a per-process setting, put back by `close`), so request handling never
    waits long behind another thread's Python.

    Example:
        >>> calls = ModelCalls(threads=2, explain_threads=1)              # doctest: +SKIP
        >>> ranked = await calls(served.recommend, ["196"], 10, True)    # doctest: +SKIP
        >>> why = await calls.explained(served.explain_many, "196", ids) # doctest: +SKIP
    """

    def __init__(self, threads: int, explain_threads: int = 1) -> None:
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(GIL_SWITCH_S)
        self._pool = ThreadPoolExecutor(threads, "model-call")
        self._explain_pool = ThreadPoolExecutor(explain_threads, "model-explain")

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    async def explained(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a call that explains what it returns, in the explanations' lane."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._explain_pool, partial(fn, *args))

    def close(self) -> None:
        for pool in (self._pool, self._explain_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        sys.setswitchinterval(self._switch_interval)
