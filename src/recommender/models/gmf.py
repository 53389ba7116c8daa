"""Generalized Matrix Factorization (He et al. 2017, eq. 9): a weighted element-wise product."""

from __future__ import annotations

import torch
from torch import nn

from recommender.models.base import RecModel, init_embedding, pair_dot, pool_dot


class GMF(RecModel):
    """logit(u, i) = h · (p_u ⊙ q_i) + b."""

    def __init__(self, n_users: int, n_items: int, dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        self.out = nn.Linear(dim, 1)
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)

    def interaction(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) -> (B, d): the vector the output layer weighs."""
        return self.user_emb(user_idx) * self.item_emb(item_idx)

    def forward(
        self,
        user_idx: torch.Tensor,
        item_idx: torch.Tensor | None = None,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,) logits of (B,) pairs; (B, K) of (B, K) or (1, K) items (base.pair_dot); with
        (B,) items and a (P,) `pool` (B, 1 + P) (base.pool_dot); with no `item_idx` (B,
        n_items): the whole catalog (train.loss=softmax, called through DDP's wrapper so
        gradients are synchronised)."""
        if item_idx is None:
            return self._score_cached(user_idx, self.item_cache())
        if pool is not None or item_idx.dim() > 1:
            weighted_users = self.user_emb(user_idx) * self.out.weight  # (B, d)
            if pool is None:
                return pair_dot(weighted_users, self.item_emb(item_idx)) + self.out.bias
            items = self.item_emb(torch.cat([item_idx, pool]))
            return pool_dot(weighted_users, items) + self.out.bias
        return self.out(self.interaction(user_idx, item_idx)).squeeze(-1)

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return (self.item_emb.weight,)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        weighted_users = self.user_emb(user_idx) * self.out.weight  # (B, d)
        return weighted_users @ cache[0].T + self.out.bias

    def item_representation(self) -> torch.Tensor:
        return self.item_emb.weight * self.out.weight.abs().sqrt()

    def retrieval_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb.weight * self.out.weight, self.item_emb.weight
