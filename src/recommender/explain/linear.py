"""Explanations for the graph filter: its score is a sum over the history, so each history
item's share is exact.

GraphFilter scores a history row r by logit = r F (models/graphfilter.py), F a fixed matrix:
item i's logit is the sum over history items j of F[j, i], item j's contribution. With its ALS
term the filter's part is floored at zero (an item whose filter sum is not positive keeps no
filter shares) and the logit gains c y_iᵀ A⁻¹ (1 + alpha) sum_j y_j, A the history's own ALS
system (models/ials.py) and c the term's scale: again one share per history item, c (1 + alpha)
y_iᵀ A⁻¹ y_j, added to F[j, i]. The service shows sigmoid(logit); along the straight path from
no history (logit 0) to the whole history's shares, integrated gradients give item j the weight

    share[j, i] * (sigmoid(logit_i) - sigmoid(0)) / logit_i

(sigmoid'(0) = 1/4 times the share where logit_i = 0): the weights sum to score - baseline
exactly, with no quadrature, and an item's weight orders it as its share does. The same model
scores a user the run has not seen from the items they give (`new_users`): nothing is fitted
per user, so such a user is scored exactly as a trained user with that history would be.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recommender.explain.fold_in import Attribution, one_hot_histories, spearman
from recommender.models.graphfilter import GraphFilter
from recommender.utils import RecommenderError


class FilterExplainer:
    """Exact attributions, and scores of new users, for a fitted GraphFilter."""

    method = "graph-filter contributions"  # what an Explanation says produced it

    def __init__(self, model: GraphFilter) -> None:
        self.model = model

    @property
    def n_items(self) -> int:
        return self.model.n_items

    def user(
        self,
        user_idx: int | None,
        history: torch.Tensor | np.ndarray,
        latest: torch.Tensor | np.ndarray | None = None,
    ) -> FilterUser:
        """One history (item indices, each once); `user_idx` None for a user the model has not
        seen (fidelity None). `latest` is accepted for the fold-in's signature and unused."""
        history = torch.as_tensor(history, dtype=torch.long, device=self.model.edges.device)
        if not len(history):
            raise RecommenderError(f"user {user_idx} has no history to explain with")
        return FilterUser(self.model, user_idx, history)

    @torch.no_grad()
    def new_users(
        self, histories: Sequence[torch.Tensor | np.ndarray], latest: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, n_items) logits of B users the model has not seen, from their histories (item
        indices, none empty): the model applied to each history row."""
        rows = one_hot_histories(histories, self.n_items, self.model.edges.device)
        return self.model.score_rows(rows)


class FilterUser:
    """One history's per-item contributions to every item's logit."""

    def __init__(self, model: GraphFilter, user_idx: int | None, history: torch.Tensor) -> None:
        self.model, self.user_idx, self.history = model, user_idx, history
        one_hot = torch.zeros(len(history), model.n_items, device=history.device)
        one_hot[torch.arange(len(history), device=history.device), history] = 1.0
        self.contributions = model.filter(one_hot)  # (H, n_items): row j is item j's share
        if model.item_factors.shape[1]:
            # beside ALS the filter is floored at zero: a floored item's filter shares are none
            self.contributions *= self.contributions.sum(0) > 0
            als = model.systems(one_hot.sum(0, keepdim=True)).shares(history)
            self.contributions += model.als_scale * als

    def attribute(self, targets: torch.Tensor) -> Attribution:
        """Exact integrated gradients of the (T,) target items' scores (module doc)."""
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < self.model.n_items:
            raise RecommenderError(f"target item indices must lie in [0, {self.model.n_items})")
        shares = self.contributions[:, targets].T  # (T, H)
        logits = shares.sum(1)
        score = torch.sigmoid(logits)
        baseline = torch.full_like(score, 0.5)
        safe = torch.where(logits == 0, torch.ones_like(logits), logits)
        slope = torch.where(logits == 0, torch.full_like(logits, 0.25), (score - 0.5) / safe)
        fidelity = None
        if self.user_idx is not None:
            mine = self.contributions.sum(0)
            trained = self.model.score_all(torch.tensor([self.user_idx], device=mine.device))[0]
            fidelity = spearman(mine, trained)
        return Attribution(shares * slope[:, None], score, baseline, fidelity)
