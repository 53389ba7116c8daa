"""Inference on a trained run: top-N recommendations, pair scores, similar items, explanations.

The `Recommender` speaks raw ids only; it maps them through the vocabularies saved with the
model. Item-side tensors are computed once at load, so scoring a user against the whole catalog
is a single batched pass. Unknown users get the popularity fallback, or, given the items they
interacted with, a user vector folded in from them (explain/'s fit, the run's training loss);
`representations` says which. Unknown items are an error, except in a new user's history, where
they are dropped: a live history may hold items newer than the model. Explanations attribute
the model's score to the user's history items (explain/).

Example:
    >>> rec = Recommender.from_run("runs/demo")                    # doctest: +SKIP
    >>> items, scores = rec.recommend("196", k=10)                 # (10,), (10,)
    >>> items, scores = rec.recommend(["196", "186"], k=10)        # (2, 10), (2, 10)
    >>> items, scores = rec.recommend("new", histories={"new": ["50", "181"]})  # folded in
    >>> whys = rec.explain_many("196", items, n=3)                 # one Explanation per item
    >>> items, scores = rec.recommend_next(["50", "181"], user_id="196")  # context, sasrec
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from recommender.checkpoint import load_best
from recommender.config import ModelConfig, TrainConfig
from recommender.data.interactions import Vocabulary, csr_rows
from recommender.evaluate import exact_top_k
from recommender.explain import Explainer, FilterExplainer, FoldIn, explainer
from recommender.explanations import (
    ExplainedItems,
    Explanation,
    Fold,
    FoldCache,
    from_attribution,
)
from recommender.models import Popularity, RecModel, build_model
from recommender.utils import RecommenderError

UserIds = str | int | Sequence[str | int] | np.ndarray
# New users' histories: raw user id -> the raw ids of the items they interacted with, oldest first.
Histories = Mapping[str, Sequence[str | int]]
# A model's item side as a Recommender keeps it: (item_cache tensors, normalised item space).
ItemSide = tuple[tuple[torch.Tensor, ...], torch.Tensor | None]


class Retriever(Protocol):
    """Approximate top-k for known users over a catalog too large to score whole per request
    (serving.retrieval.TwoStageRetriever): (U,) user indices -> (U, k) item indices (-1:
    empty) and probabilities; `exclude[u]` holds the item indices user u must not get."""

    def topk(
        self, user_idx: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]: ...


class Neighbours(Protocol):
    """Approximate nearest items in the item space, for a catalog too large to score whole per
    request (serving.retrieval.ItemNeighbours): (Q, r) query vectors -> (Q, k) item indices
    (-1: empty) and their inner products; `exclude[q]` holds the items query q must not get."""

    def topk(
        self, queries: torch.Tensor, k: int, exclude: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray]: ...


# How `recommend` represents a user (`representations`): their trained vector, a vector folded
# in from a given history, or the popularity list (an unknown user without a usable history,
# or a run with no user vectors).
TRAINED, FOLDED_IN, POPULARITY = "trained", "folded_in", "popularity"
# Users whose folds (explanations.FoldCache) a Recommender keeps for their next explanations.
FOLD_CACHE_USERS = 256
# Trained users whose explained items (explanations.ExplainedItems) a Recommender keeps: a few
# kilobytes a user's list.
EXPLAINED_USERS = 10_000
# New users folded in per batched solve: a bound on its (users, N, D) tensors, not a speed-up
# (a user's fold-in costs the same alone or in a batch).
FOLD_CHUNK = 32


@dataclass(frozen=True)
class _NewUsers:
    """The rows of a request answered by folding in their histories, and those histories as
    item indices: each item once (`items`), and for a model.context run the (F, context)
    latest of them, latest first, n_items padding (`latest`; None otherwise)."""

    rows: np.ndarray
    items: list[np.ndarray]
    latest: np.ndarray | None


class Recommender:
    """A trained run, answering in raw ids: the one object the CLI, the report and the HTTP
    service ask for recommendations, scores, similar items and explanations.

    It holds the model in eval mode, the user and item vocabularies saved with it, each
    user's training history (CSR: `indptr`, `history`) for excluding seen items and
    explaining, and the item counts behind the popularity fallback of unknown users. The
    item-side tensors are computed once here, so a request costs one pass over the catalog.
    Build it with `from_run`; the constructor is for code that already holds these parts.

    Shapes: `recommend` gives (k,) ids and scores for one user, (U, k) for a list of U;
    `score` gives (P,) for P (user, item) pairs; ids are strings, scores probabilities.

    Example:
        >>> rec = Recommender.from_run("runs/demo")               # doctest: +SKIP
        >>> rec.recommend(["196", "nobody"], k=3)[0].shape         # doctest: +SKIP
        (2, 3)
        >>> rec.known_users(["196", "nobody"]).tolist()           # doctest: +SKIP
        [True, False]
    """

    def __init__(
        self,
        model: RecModel,
        users: Vocabulary,
        items: Vocabulary,
        history_indptr: np.ndarray,
        history_items: np.ndarray,
        item_counts: np.ndarray,
        meta: dict[str, Any],
        device: torch.device | str = "cpu",
        item_side: ItemSide | None = None,
    ) -> None:
        """`item_side`: the model's item-side tensors computed beforehand (`item_side` of a
        Recommender of the same weights): a service reads them from where a process of their
        own computed them (serving/indexes.py) instead of spending its cores on them."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.users, self.items = users, items
        self.indptr, self.history = history_indptr, history_items
        self.item_counts = np.asarray(item_counts)
        # Fallback scores: each item's count as a share of the most popular item's, computed once.
        counts = torch.as_tensor(self.item_counts, dtype=torch.float32, device=self.device)
        self._popularity_share = counts / counts.max().clamp(min=1)
        self.meta = meta
        self.folds = FoldCache(FOLD_CACHE_USERS)
        self.explained = ExplainedItems(EXPLAINED_USERS)
        titles = meta.get("item_titles")
        self.titles: dict[str, str] | None = (
            dict(zip(items.ids, titles, strict=True)) if titles is not None else None
        )
        if item_side is not None:
            self._cache, self._item_rep = item_side
            return
        with torch.no_grad():
            self._cache = model.item_cache()
            rep = model.item_representation()
            self._item_rep = F.normalize(rep, dim=1) if rep is not None else None

    @property
    def item_side(self) -> ItemSide:
        """What the constructor computes from the item side of the model: the tensors every
        user's scores reuse (`item_cache`) and the normalised item space (`item_space`)."""
        return self._cache, self._item_rep

    def release(self) -> None:
        """Free the vocabularies and the model's parameters a piece at a time; the
        Recommender cannot answer afterwards. For a replaced version freed while another
        serves (serving/lifecycle.py): a 1M-item NeuMF dropped at once held the GIL for about
        100 ms (its item vocabulary 70, its parameters 30), and every request of the process
        waited it out."""
        self.users.release()
        self.items.release()
        for parameter in self.model.parameters():
            parameter.data = torch.empty(0, dtype=parameter.dtype)

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        device: torch.device | str = "cpu",
        item_side: Callable[[int], ItemSide | None] | None = None,
    ) -> Recommender:
        """Rebuild model and vocabularies from `run_dir/best.pt` alone. `item_side`, once the
        checkpoint is read, is called with the catalog's size; what it returns is the item
        side computed elsewhere (see the constructor), None computes it here."""
        ckpt = load_best(Path(run_dir))
        # a model trained with ccl scores by cosine (models.build_model)
        loss = TrainConfig.model_validate((ckpt.config or {}).get("train", {})).loss
        # Built on the meta device, then given the checkpoint's tensors: no random tables drawn
        # only to be overwritten (1.2 s for a 1M-item NeuMF).
        with torch.device("meta"):
            model = build_model(
                ModelConfig(**ckpt.model_config), ckpt.n_users, ckpt.n_items, cosine=loss == "ccl"
            )
        if isinstance(model, Popularity):
            model = model.to_empty(device="cpu").fit(ckpt.item_counts.numpy())
        else:
            model.load_state_dict(ckpt.state_dict, assign=True)
        meta = ckpt.meta() | {"run_dir": str(run_dir)}
        side = item_side(ckpt.n_items) if item_side is not None else None
        return cls(
            model,
            Vocabulary(ckpt.user_ids, "user"),
            Vocabulary(ckpt.item_ids, "item"),
            ckpt.history_indptr.numpy(),
            ckpt.history_items.numpy().astype(np.int64),
            ckpt.item_counts.numpy(),
            meta,
            device,
            side,
        )

    @property
    def model_name(self) -> str:
        """The model's name as results and reports label it; "mf-context" for an MF with the
        Markov term, so it stands apart from a plain MF next to it."""
        config = self.meta.get("model_config", {})
        name = str(config.get("name", type(self.model).__name__))
        return f"{name}-context" if config.get("context") else name

    @property
    def personalised(self) -> bool:
        """False for a popularity run: every user, and every session, gets the one list."""
        return self.model.personalised

    @property
    def reads_context(self) -> bool:
        """True for a run that reads users' latest items (model.context, sasrec):
        `recommend_next` follows recent items."""
        return self.model.context > 0

    # -- ids ---------------------------------------------------------------------------------

    @staticmethod
    def _as_list(ids: UserIds) -> tuple[list[str], bool]:
        if isinstance(ids, (str, int, np.integer)):
            return [str(ids)], True
        return [str(x) for x in ids], False

    def known_users(self, user_ids: UserIds) -> np.ndarray:
        """(U,) bool: which users the run has trained on (the others get the fallback)."""
        ids, _ = self._as_list(user_ids)
        return self.users.lookup(ids) >= 0

    def known_items(self, item_ids: Sequence[str | int] | np.ndarray) -> np.ndarray:
        """(I,) bool: which items are in the catalog (an unknown item is the caller's error)."""
        return self.items.lookup([str(x) for x in item_ids]) >= 0

    def history_of(self, user_idx: int) -> np.ndarray:
        return self.history[self.indptr[user_idx] : self.indptr[user_idx + 1]]

    # -- scoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def _all_scores(self, user_idx: np.ndarray) -> torch.Tensor:
        """(U,) indices of known users -> (U, n_items) probabilities."""
        u = torch.from_numpy(user_idx).to(self.device)
        return torch.sigmoid(self.model.score_all(u, self._cache).float())

    @torch.no_grad()
    def recommend(
        self,
        user_ids: UserIds,
        k: int = 10,
        exclude_seen: bool = True,
        retriever: Retriever | None = None,
        histories: Histories | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items and scores per user: shapes (k,) for one user, (U, k) for a list.

        Scores are probabilities (the popularity share for fallback users). k is capped at the
        catalog size; slots beyond the items a user has not seen hold item id None, score NaN.
        With a `retriever` (the service's ANN search over a large catalog) known users' lists
        are its candidates re-scored by the model instead of the whole catalog.

        `histories` holds what users the run has not seen interacted with (raw user id ->
        item ids, oldest first): each such user is scored from a vector folded in from those
        items (FoldIn.new_users, all of them in one solve), their history left out with
        `exclude_seen`. Known users keep their trained vector; unknown items are dropped, and
        a user with no known item left gets the popularity list. `representations` says which.
        """
        if k < 1:
            raise RecommenderError(f"k must be >= 1, got {k}")
        ids, single = self._as_list(user_ids)
        user_idx = self.users.lookup(ids)
        if retriever is not None and (user_idx >= 0).any():
            item_ids, top_scores = self._retrieved(retriever, user_idx, k, exclude_seen)
        else:
            item_ids, top_scores = self._exact(user_idx, k, exclude_seen)
        new = self._new_users(ids, user_idx, histories)
        if len(new.rows) and isinstance(self._fold_in, FoldIn | FilterExplainer):
            folded = self._folded(self._fold_in, new, k, exclude_seen)
            item_ids[new.rows], top_scores[new.rows] = folded
        return (item_ids[0], top_scores[0]) if single else (item_ids, top_scores)

    def representations(self, user_ids: UserIds, histories: Histories | None = None) -> np.ndarray:
        """(U,) how `recommend` answers each user with these `histories`: TRAINED ("trained",
        a user the run was trained on), FOLDED_IN ("folded_in", an unknown user with a history
        holding known items) or POPULARITY ("popularity": the fallback, and every user of a
        run with no user vectors)."""
        ids, _ = self._as_list(user_ids)
        user_idx = self.users.lookup(ids)
        kinds = np.where(user_idx >= 0, TRAINED if self.personalised else POPULARITY, POPULARITY)
        kinds = kinds.astype(object)
        kinds[self._new_users(ids, user_idx, histories).rows] = FOLDED_IN
        return kinds

    def _new_users(
        self, ids: list[str], user_idx: np.ndarray, histories: Histories | None
    ) -> _NewUsers:
        """The unknown users among `ids` with a history holding known items, for a run whose
        model has user vectors to fold in."""
        rows, items, latest = [], [], []
        # LightGCN's users are propagated over the training graph: no free vector to fold in;
        # GraphFilter scores any history as it is
        if histories and isinstance(self._fold_in, FoldIn | FilterExplainer):
            for row in np.flatnonzero(user_idx < 0):
                given = histories.get(ids[row])
                if given is None:
                    continue
                unique, recent = self._history_indices(given)
                if len(unique):
                    rows.append(row)
                    items.append(unique)
                    latest.append(recent)
        context = np.stack(latest) if self.reads_context and latest else None
        return _NewUsers(np.array(rows, dtype=np.int64), items, context)

    def _history_indices(self, item_ids: Sequence[str | int]) -> tuple[np.ndarray, np.ndarray]:
        """A new user's history (raw ids, oldest first) -> its known items, each once, and the
        (context,) latest of them, latest first, n_items padding (width 0 without context)."""
        idx = self.items.lookup([str(x) for x in item_ids])
        idx = idx[idx >= 0]
        latest = np.full(self.model.context, len(self.items), dtype=np.int64)
        recent = idx[::-1][: self.model.context]
        latest[: len(recent)] = recent
        return np.unique(idx), latest

    def _folded(
        self, fold_in: FoldIn | FilterExplainer, new: _NewUsers, k: int, exclude_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(F, k) item ids and scores of the new users, from vectors folded in from their
        histories, over the whole catalog."""
        latest = None if new.latest is None else torch.from_numpy(new.latest).to(self.device)
        # In chunks: the MLP's Jacobian is (users, N, D), 28 MB for 32 users on MovieLens-100K.
        chunks = []
        for start in range(0, len(new.items), FOLD_CHUNK):
            part = slice(start, start + FOLD_CHUNK)
            given = None if latest is None else latest[part]
            chunks.append(fold_in.new_users(new.items[part], given))
        scores = torch.sigmoid(torch.cat(chunks).float())
        seen = None
        if exclude_seen:
            lengths = [len(h) for h in new.items]
            seen = (np.repeat(np.arange(len(new.items)), lengths), np.concatenate(new.items))
        return self._ids(*exact_top_k(scores, k, seen))

    def _exact(
        self, user_idx: np.ndarray, k: int, exclude_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """(U,) indices (-1 = unknown) -> (U, k) item ids and scores over the whole catalog;
        an unknown user's are the popularity list's first k."""
        known = user_idx >= 0
        if known.all():
            seen = self._seen_coordinates(user_idx) if exclude_seen else None
            return self._ids(*exact_top_k(self._all_scores(user_idx), k, seen))
        width = min(k, len(self.items))
        item_ids = np.full((len(user_idx), width), None, dtype=object)
        top_scores = np.full((len(user_idx), width), np.nan, dtype=np.float32)
        order = self._popular_order[:width]
        item_ids[~known] = self.items.to_ids(order)
        top_scores[~known] = self._popularity_share[order].cpu().numpy()
        if known.any():
            item_ids[known], top_scores[known] = self._exact(user_idx[known], k, exclude_seen)
        return item_ids, top_scores

    @cached_property
    def _popular_order(self) -> torch.Tensor:
        """(n_items,) item indices, most interactions first, ties by index: the fallback list
        of every unknown user, ranked once instead of a top-k over the catalog per request."""
        return torch.argsort(self._popularity_share, descending=True, stable=True).cpu()

    def _retrieved(
        self, retriever: Retriever, user_idx: np.ndarray, k: int, exclude_seen: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """As `_exact`, the known users' lists from the retriever's candidates."""
        width = min(k, len(self.items))
        item_ids = np.full((len(user_idx), width), None, dtype=object)
        top_scores = np.full((len(user_idx), width), np.nan, dtype=np.float32)
        rows = np.flatnonzero(user_idx >= 0)
        exclude = None
        if exclude_seen:
            _, cols = self._seen_coordinates(user_idx[rows])
            lengths = self.indptr[user_idx[rows] + 1] - self.indptr[user_idx[rows]]
            exclude = np.split(cols, np.cumsum(lengths)[:-1])
        idx, scores = retriever.topk(user_idx[rows], k, exclude)
        idx, scores = idx[:, :width], scores[:, :width]
        item_ids[rows] = np.where(idx >= 0, self.items.ids[np.maximum(idx, 0)], None)
        top_scores[rows] = scores
        unknown = np.flatnonzero(user_idx < 0)
        if len(unknown):
            item_ids[unknown], top_scores[unknown] = self._exact(user_idx[unknown], k, False)
        return item_ids, top_scores

    def _ids(self, scores: torch.Tensor, idx: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(U, k) top scores and item indices (-1: no item left) -> item ids and scores, None
        and NaN in the empty slots."""
        empty = (idx < 0).cpu().numpy()
        item_ids = self.items.to_ids(idx.clamp(min=0)).astype(object)
        item_ids[empty] = None
        top_scores: np.ndarray = scores.cpu().numpy()
        top_scores[empty] = np.nan
        return item_ids, top_scores

    @torch.no_grad()
    def recommend_next(
        self,
        recent_item_ids: Sequence[str | int],
        k: int = 10,
        user_id: str | int | None = None,
        exclude_seen: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of what comes after `recent_item_ids` (oldest first), for a run trained with
        model.context or a sasrec run, so a list follows what the user does now without
        retraining.

        With a known `user_id` the recent items come after the user's latest items stored at
        training: the Markov term reads the `context` latest of both, and the user's own vector
        adds their long-term taste; SASRec reads the latest max_len of the stored sequence
        followed by the recent items (with `exclude_seen`, the training history is left out).
        Without one, or for an unknown id, the recent items are the whole context (MF's mean
        trained user stands in): an anonymous session. The recent items are left out with
        `exclude_seen`. Returns (k,) item ids and (k,) scores, as `recommend` for one user.
        """
        if k < 1:
            raise RecommenderError(f"k must be >= 1, got {k}")
        user_idx = self.users.lookup([str(user_id)]) if user_id is not None else np.array([-1])
        model, recent, context = self._next_context(recent_item_ids, int(user_idx[0]))
        known = bool(user_idx[0] >= 0)
        users = torch.from_numpy(user_idx).to(self.device) if known else None
        logits = model.score_after(torch.from_numpy(context[None]).to(self.device), users)
        scores = torch.sigmoid(logits.float())
        seen = None
        if exclude_seen:
            rows, cols = self._seen_coordinates(user_idx)  # none for an unknown user
            seen = (np.r_[np.zeros(len(recent), dtype=np.int64), rows], np.r_[recent, cols])
        item_ids, top_scores = self._ids(*exact_top_k(scores, k, seen))
        return item_ids[0], top_scores[0]

    def _next_context(
        self, recent_item_ids: Sequence[str | int], user_idx: int
    ) -> tuple[RecModel, np.ndarray, np.ndarray]:
        """The context model, the recent items' indices and the row `score_after` reads after
        them for a known user (`user_idx` >= 0) or a session (RecModel.context_after)."""
        model = self.model
        if not model.context:
            raise RecommenderError(
                f"recommend_next needs a run trained with model.context or model.name=sasrec; "
                f"this {self.model_name} run scores no recent items"
            )
        if not len(recent_item_ids):
            raise RecommenderError("recent_item_ids is empty")
        recent = self.items.index([str(x) for x in recent_item_ids])
        user = user_idx if user_idx >= 0 else None
        context = model.context_after(torch.from_numpy(recent).to(self.device), user)
        return model, recent, context.cpu().numpy()

    def _seen_coordinates(self, user_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, item) coordinates of the history items of the known users among `user_idx`."""
        known_rows = np.flatnonzero(user_idx >= 0)
        rows, cols = csr_rows(self.indptr, self.history, user_idx[known_rows])
        return known_rows[rows], cols

    @torch.no_grad()
    def score(self, user_ids: UserIds, item_ids: Sequence[str | int] | np.ndarray) -> np.ndarray:
        """Probability per (user, item) pair; unknown users get the popularity share."""
        users, _ = self._as_list(user_ids)
        items = [str(x) for x in item_ids]
        if len(users) != len(items):
            raise RecommenderError(f"{len(users)} users but {len(items)} items")
        u = self.users.lookup(users)
        i = torch.from_numpy(self.items.index(items)).to(self.device)
        known = torch.from_numpy(u >= 0).to(self.device)
        ut = torch.from_numpy(np.maximum(u, 0)).to(self.device)
        model_scores = torch.sigmoid(self.model(ut, i).float())
        fallback = self._popularity_share[i]
        return torch.where(known, model_scores, fallback).cpu().numpy()

    @property
    def item_space(self) -> torch.Tensor | None:
        """(n_items, r) normalised item representations: `similar_items` ranks by their inner
        products (cosine similarity); None for a model without an item representation."""
        return self._item_rep

    @torch.no_grad()
    def similar_items(
        self, item_id: str | int, k: int = 10, neighbours: Neighbours | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items closest to `item_id` by cosine similarity of the model's item representation;
        with `neighbours` (the service's ANN search over a large catalog), among its candidates."""
        space = self._space()
        idx = self.items.index([item_id])
        return self._nearest(space[int(idx[0])], idx, k, neighbours)

    @torch.no_grad()
    def similar_to_items(
        self, item_ids: Sequence[str | int], k: int = 10, neighbours: Neighbours | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Items closest to a set of items (an anonymous session), the set itself excluded.

        The score is the cosine similarity to the mean of the items' normalised vectors, so a
        visitor with no user id is answered from what they just looked at. `neighbours`: as
        in `similar_items`.
        """
        space = self._space()
        if not len(item_ids):
            raise RecommenderError("similar_to_items needs at least one item id")
        idx = self.items.index([str(x) for x in item_ids])
        query = space[torch.from_numpy(idx).to(self.device)].mean(0)
        return self._nearest(query, np.unique(idx), k, neighbours)

    def _space(self) -> torch.Tensor:
        if self._item_rep is None:
            raise RecommenderError(f"the {self.model_name} model has no item representation")
        return self._item_rep

    def _nearest(
        self, query: torch.Tensor, exclude: np.ndarray, k: int, neighbours: Neighbours | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(r,) query -> ids and scores of the items with the largest inner product with it in
        the item space, best first, `exclude` (item indices) left out: over the whole catalog,
        or over the candidates of `neighbours`."""
        if neighbours is not None:
            idx, scores = neighbours.topk(query[None], k, [exclude])
            found = idx[0] >= 0
            return self.items.to_ids(idx[0][found]), scores[0][found]
        sims = self._space() @ query  # (n_items,)
        sims[torch.from_numpy(exclude).to(self.device)] = -torch.inf
        top = torch.topk(sims, min(k, len(self.items) - len(exclude)))
        return self.items.to_ids(top.indices), top.values.cpu().numpy()

    @cached_property
    def _fold_in(self) -> Explainer | None:
        """The explainer, built on first use; None for a model without a user to explain."""
        # the loss and negatives as training used them (the saved config, else the defaults)
        train = TrainConfig.model_validate((self.meta.get("config") or {}).get("train", {}))
        return explainer(self.model, train, self.item_counts)

    def explain(self, user_id: str | int, item_id: str | int, n: int = 3) -> Explanation:
        """The user's history items that raise `item_id`'s score most; see `explain_many`."""
        return self.explain_many(user_id, [item_id], n)[0]

    @torch.no_grad()
    def explain_many(
        self,
        user_id: str | int,
        item_ids: Sequence[str | int] | np.ndarray,
        n: int = 3,
        after: Sequence[str | int] | None = None,
        history: Sequence[str | int] | None = None,
        keep_fold: bool = True,
    ) -> list[Explanation]:
        """One Explanation per item, in order, from a single fold-in of the user's history.

        Explaining a whole recommendation list costs about as much as explaining one item
        (tens of milliseconds on a CPU for MovieLens-100K), and the fold is kept (`folds`,
        the latest FOLD_CACHE_USERS users; not with `keep_fold` False), so the same user's
        next list costs a few; a trained user's items explained before are looked up
        (`explained`). Unknown users, users without a history and the Popularity model get the
        popularity fallback; unknown items are an error.
        `after` explains a `recommend_next` list of a known user: the recent items join the
        history, and the Markov term reads the context that list was scored with. `history`
        explains an unknown user's list scored from that history (`recommend(histories=)`):
        its known items are the ones that support, and fidelity is None (no trained user).
        """
        if n < 1:
            raise RecommenderError(f"n must be >= 1, got {n}")
        items = [str(x) for x in item_ids]
        item_idx = self.items.index(items)
        user_idx = int(self.users.lookup([user_id])[0])
        trained = user_idx >= 0 and after is None  # explained from the training history alone
        if trained and (kept := self.explained.get(user_idx, n, items)) is not None:
            return kept
        seen = self.history_of(user_idx) if user_idx >= 0 else self.history[:0]
        latest = None
        if after is not None and user_idx >= 0:
            _, recent, latest = self._next_context(after, user_idx)
            seen = np.union1d(seen, recent)
        elif history is not None and user_idx < 0:
            seen, latest = self._history_indices(history)
        fold_in = self._fold_in
        unfoldable = user_idx < 0 and not isinstance(fold_in, FoldIn | FilterExplainer)
        if fold_in is None or unfoldable or not len(seen) or not items:
            return [Explanation(item, [], [], "popularity") for item in items]
        targets = torch.from_numpy(item_idx).to(self.device)
        key = (user_idx, seen.tobytes(), None if latest is None else latest.tobytes())

        def build() -> Fold:
            if isinstance(fold_in, FoldIn | FilterExplainer):  # these fold in unknown users
                return fold_in.user(user_idx if user_idx >= 0 else None, seen, latest)
            return fold_in.user(user_idx, seen, latest)

        fold = self.folds.get(key, build) if keep_fold else build()
        explanations = from_attribution(
            fold.attribute(targets), seen, self.items, items, n, fold_in.method
        )
        if trained:
            self.explained.put(user_idx, n, explanations)
        return explanations

    def title(self, item_id: str) -> str:
        return self.titles.get(item_id, item_id) if self.titles else item_id

    # -- browsing the catalog (the service's page) -------------------------------------------

    @cached_property
    def _search_keys(self) -> np.ndarray:
        """(n_items,) lower-case titles, the id where an item has none: what search reads."""
        ids = np.asarray(self.items.to_list(), dtype=str)
        if not self.titles:
            return ids
        names = np.asarray(list(self.titles.values()), dtype=str)
        return np.char.lower(np.where(names == "", ids, names))

    def search_items(self, query: str, limit: int = 20) -> np.ndarray:
        """(≤ limit,) raw ids of the items whose title contains `query` (any case), or whose
        id is `query`, most popular first; an empty query lists the most popular items. A run
        without titles is searched by id."""
        if limit < 1:
            raise RecommenderError(f"limit must be >= 1, got {limit}")
        text = query.strip().lower()
        found = np.char.find(self._search_keys, text) >= 0
        exact = self.items.lookup([query.strip()])[0]
        if exact >= 0:
            found[exact] = True
        hits = np.flatnonzero(found)
        order = np.argsort(-self.item_counts[hits], kind="stable")[:limit]
        return self.items.to_ids(hits[order])

    def user_history(self, user_id: str | int) -> np.ndarray:
        """A known user's training items as raw ids (empty for an unknown user). The checkpoint
        keeps a history as a set, so the order is the catalog's, except that the stored latest
        items of a run that reads them (model.context, sasrec) come first, latest first."""
        user_idx = int(self.users.lookup([str(user_id)])[0])
        if user_idx < 0:
            return np.array([], dtype=object)
        items = self.history_of(user_idx)
        if self.reads_context:
            latest = self.model.latest_of(user_idx).cpu().numpy()
            items = np.concatenate([latest, items[~np.isin(items, latest)]])
        return self.items.to_ids(items)

    def most_active_users(self, n: int = 20) -> np.ndarray:
        """(≤ n,) raw ids of the users with the longest training histories, longest first."""
        if n < 1:
            raise RecommenderError(f"n must be >= 1, got {n}")
        lengths = np.diff(self.indptr)
        return self.users.to_ids(np.argsort(-lengths, kind="stable")[:n])
