"""Most-popular baseline: every user gets the items with the most training interactions."""

from __future__ import annotations

import numpy as np
import torch

from recommender.models.base import RecModel


class Popularity(RecModel):
    """logit(u, i) = log(1 + count_i); no trainable parameters, fitted by counting."""

    log_counts: torch.Tensor
    personalised = False

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.register_buffer("log_counts", torch.zeros(n_items))

    def fit(self, item_counts: np.ndarray) -> Popularity:
        self.log_counts.copy_(torch.log1p(torch.as_tensor(item_counts, dtype=torch.float32)))
        return self

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return self.log_counts[item_idx]

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return (self.log_counts,)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return cache[0].repeat(len(user_idx), 1)
