"""Explanations: which of a user's history items make a recommendation's score high.

Each model is explained the way it represents a user. The ID-based models (GMF, MF, MLP,
NeuMF) learn a free user vector, which fold_in.py re-derives from the history (a fold-in)
and differentiates; LightGCN's user is propagated over the training graph, so graph.py
re-weights the user's history edges instead. GraphFilter's score is a sum over the history
(its ALS term's included), so linear.py reads each item's share off exactly. These attribute
by integrated gradients; SASRec's user is the sequence of their latest items, so sequence.py
removes each item from it and re-scores (occlusion). All return an Attribution; `explainer`
picks the one for a trained run.

Example:
    >>> why = explainer(model, train).user(user_idx, history).attribute(items)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from recommender.config import TrainConfig
from recommender.explain.fold_in import Attribution, FoldIn, UserFold
from recommender.explain.graph import GraphExplainer, GraphUser
from recommender.explain.linear import FilterExplainer, FilterUser
from recommender.explain.sequence import SequenceExplainer, SequenceUser
from recommender.explain.side import supports
from recommender.models import GraphFilter, LightGCN, RecModel, SASRec

__all__ = [
    "Attribution",
    "Explainer",
    "FilterExplainer",
    "FilterUser",
    "FoldIn",
    "GraphExplainer",
    "GraphUser",
    "SequenceExplainer",
    "SequenceUser",
    "UserFold",
    "explainer",
    "fold_in_loss",
    "supports",
]

# What explains a trained run's users (`explainer`), one kind per way a model represents a user.
Explainer = FoldIn | GraphExplainer | FilterExplainer | SequenceExplainer


def fold_in_loss(loss: str) -> Literal["bce", "softmax"]:
    """The objective a fold-in fits a history with, for a model trained with `loss`: BCE for
    BCE; the full softmax for the ranking losses, since sampled softmax estimates it, and BPR,
    like it, ranks a user's items above the rest and is blind to a shift of all of them."""
    return "bce" if loss == "bce" else "softmax"


def explainer(
    model: RecModel, train: TrainConfig, item_counts: np.ndarray | None = None
) -> Explainer | None:
    """The explainer of a trained model, trained with `train` (train.loss, the negatives it
    drew, from the run's saved config); None for a model with no user to explain with
    (Popularity, an MF scoring by cosine). `item_counts` ((n_items,) training positives per
    item) weigh the fold-in's negatives as popularity sampling drew them."""
    if isinstance(model, LightGCN):
        return GraphExplainer(model)
    if isinstance(model, GraphFilter):
        return FilterExplainer(model)
    if isinstance(model, SASRec):
        return SequenceExplainer(model)
    if not supports(model):
        return None
    odds = None
    if train.sampling == "popularity" and item_counts is not None:
        device = next(model.parameters()).device
        counts = torch.as_tensor(item_counts, dtype=torch.float32, device=device)
        odds = counts**train.popularity_power
    return FoldIn(model, train.num_negatives, odds, loss=fold_in_loss(train.loss))
