"""Dot-product matrix factorisation with biases (the baseline of Rendle et al. 2020)."""

from __future__ import annotations

import torch
from torch import nn

from recommender.models.base import RecModel, init_embedding


class MF(RecModel):
    """logit(u, i) = p_u · q_i + b_u + b_i + b."""

    def __init__(self, n_users: int, n_items: int, dim: int, sparse: bool = False) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        self.user_bias = nn.Embedding(n_users, 1, sparse=sparse)
        self.item_bias = nn.Embedding(n_items, 1, sparse=sparse)
        self.bias = nn.Parameter(torch.zeros(1))
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        nn.init.zeros_(self.user_bias.weight)
        nn.init.zeros_(self.item_bias.weight)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) logits of the pairs, or with no `item_idx` (B, n_items): the whole catalog
        (train.loss=softmax, called through DDP's wrapper so gradients are synchronised)."""
        if item_idx is None:
            return self._score_cached(user_idx, self.item_cache())
        p, q = self.user_emb(user_idx), self.item_emb(item_idx)  # (B, d)
        bias = self.user_bias(user_idx) + self.item_bias(item_idx)  # (B, 1)
        return (p * q).sum(-1) + bias.squeeze(-1) + self.bias

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return self.item_emb.weight, self.item_bias.weight.squeeze(-1) + self.bias

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        items, item_bias = cache
        return self.user_emb(user_idx) @ items.T + item_bias + self.user_bias(user_idx)

    def item_representation(self) -> torch.Tensor:
        return self.item_emb.weight

    def retrieval_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        ones = torch.ones(self.n_users, 1, device=self.bias.device)
        users = torch.cat([self.user_emb.weight, ones], 1)
        items = torch.cat([self.item_emb.weight, self.item_bias.weight], 1)
        return users, items
