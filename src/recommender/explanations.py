"""What an explanation is, how an attribution becomes one, and the cache of users' folds.

`Recommender.explain_many` answers with one `Explanation` per item: the history items whose
attribution (explain/: integrated gradients, or SASRec's occlusion) raises its score most.
Folding a user in and walking the attribution path cost tens of milliseconds and do not depend
on which items are explained, so `FoldCache` keeps the latest users' folds (explain.UserFold,
path included): the user's next list costs only its items' solves. A fold is heavy (an MLP /
NeuMF one holds an items x dims Jacobian), so `ExplainedItems` keeps, for many more users, the
explanations themselves: a trained user's item explained once is a look-up after that. Both
belong to the Recommender that built them, so a new model version, a new Recommender, starts
with empty ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np
import torch

from recommender.data.interactions import Vocabulary
from recommender.explain import Attribution, FilterUser, FoldIn, GraphUser, SequenceUser, UserFold

# What explains one user's list: their fold-in, graph edges, history row or sequence.
Fold = UserFold | GraphUser | FilterUser | SequenceUser
# Explanation.method of an attribution; "popularity" marks the fallback.
ATTRIBUTION = FoldIn.method  # the ID models'; LightGCN's is GraphExplainer.method


@dataclass(frozen=True)
class Explanation:
    """The history items that raise a recommendation's score most, strongest first.

    The weights are integrated-gradients attributions (explain/), in units of the score (a
    probability under train.loss=bce, a ranking score under softmax): how much each history
    item raises the item's score for the user refitted to the history ("fold-in"), against a
    user with no history. All history items' weights, negative ones included, sum to
    `score - baseline_score`; only the top positive ones are listed. `fidelity` is the Spearman
    correlation over the catalog between the refitted user's scores and the trained user's, so
    a reader can tell how closely the refit stands in for the model. LightGCN is explained
    over its graph instead (`method` says which): each history edge re-weighted, the user's
    layers recomputed, so the full-history score is the model's own (fidelity 1). SASRec is
    explained by occlusion ("sequence occlusion"): an item's weight is how much the score drops
    when it is removed from the sequence the model read (explain/sequence.py); score is the
    model's own (fidelity 1), baseline the score after an empty sequence, and the weights do
    not sum to their difference. The last three fields are None for the popularity fallback.
    """

    item_id: str
    supporting_items: list[str]
    weights: list[float]
    method: str
    score: float | None = None
    baseline_score: float | None = None
    fidelity: float | None = None

    def one_line(self, titles: dict[str, str] | None = None) -> str:
        if self.method == "popularity":
            return "popular with all users"
        if not self.supporting_items:
            return "no item in your history raises its score"
        named = [
            f"{titles.get(i, i) if titles else i} (+{w:.3f})"
            for i, w in zip(self.supporting_items, self.weights, strict=True)
        ]
        return "because you liked " + ", ".join(named)


def from_attribution(
    why: Attribution,
    seen: np.ndarray,
    items: Vocabulary,
    item_ids: list[str],
    n: int,
    method: str = ATTRIBUTION,
) -> list[Explanation]:
    """The (T, H) attribution of `item_ids` to the `seen` history (H item indices) -> one
    Explanation per item with its top `n` positive supporting items; `method` names the
    attribution (LightGCN's graph-edge integrated gradients, or the fold-in's)."""
    top = torch.topk(why.weights, min(n, len(seen)), dim=1)
    weights = top.values.cpu().numpy()  # (T, n)
    supporting = seen[top.indices.cpu().numpy()]  # (T, n) item indices
    scores, baselines = why.score.tolist(), why.baseline.tolist()
    fidelity = None if why.fidelity is None else round(why.fidelity, 4)
    explanations = []
    for row, item in enumerate(item_ids):
        positive = weights[row] > 0
        explanations.append(
            Explanation(
                item,
                [str(x) for x in items.to_ids(supporting[row][positive])],
                [round(float(w), 4) for w in weights[row][positive]],
                method,
                round(scores[row], 4),
                round(baselines[row], 4),
                fidelity,
            )
        )
    return explanations


class FoldCache:
    """The folds of the latest `size` users, least recently used out first; safe to share
    between the service's model threads.

    A fold is a pure function of its key (the user, their history, the context), so two
    threads that miss on one key at once both build it and either result is right; the
    build runs outside the lock, so a slow fold never holds up another user's hit. Each
    MLP / NeuMF fold holds an (n_items, user dims) Jacobian: 0.9 MB on MovieLens-100K.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._folds: OrderedDict[Hashable, Fold] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._folds)

    def get(self, key: Hashable, build: Callable[[], Fold]) -> Fold:
        with self._lock:
            fold = self._folds.get(key)
            if fold is not None:
                self._folds.move_to_end(key)
                return fold
        fold = build()
        if self.size:
            with self._lock:
                self._folds[key] = fold
                while len(self._folds) > self.size:
                    self._folds.popitem(last=False)
        return fold


class ExplainedItems:
    """Explanations already given to trained users, per item: the latest `size` users, least
    recently used out first; safe to share between threads.

    A trained user's explanation of an item is a pure function of the model, the user's
    training history, the item and the number of supporting items listed, so it is kept as it
    is and needs no invalidation within a model version. Only lists explained from the user's
    training history belong here (not an `after` list, which reads recent items, nor a new
    user's). A few hundred bytes an item, against a fold's megabytes: the service fills it
    for its most active users ahead of their requests (ServedModel.warm_explanations).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._users: OrderedDict[tuple[int, int], dict[str, Explanation]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._users)

    def get(self, user_idx: int, n: int, item_ids: list[str]) -> list[Explanation] | None:
        """The kept explanations of `item_ids` (with `n` supporting items at most), in order;
        None unless every one of them is kept."""
        with self._lock:
            kept = self._users.get((user_idx, n))
            if kept is None:
                return None
            self._users.move_to_end((user_idx, n))
            found = [kept.get(item) for item in item_ids]
        return None if any(e is None for e in found) else [e for e in found if e is not None]

    def put(self, user_idx: int, n: int, explanations: list[Explanation]) -> None:
        if not self.size:
            return
        with self._lock:
            kept = self._users.setdefault((user_idx, n), {})
            self._users.move_to_end((user_idx, n))
            kept.update((e.item_id, e) for e in explanations)
            while len(self._users) > self.size:
                self._users.popitem(last=False)
