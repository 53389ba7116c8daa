"""Dot-product matrix factorisation with biases (the baseline of Rendle et al. 2020), and, with
`context` > 0, a factorised Markov term over the user's latest items (FPMC, Rendle et al. 2010).

The Markov term scores item i by how well it follows what the user did last: c_u · t_i, where
c_u is the mean context embedding of the user's k latest items. It is one more block of the
dot product, so the catalog is still scored by one matmul and ANN retrieval still applies.
During training each positive sees the k items that preceded it (passed as `context`); after
training every user's k latest items are kept in the `latest` buffer, saved with the weights.

With `cosine` (a model trained with train.loss=ccl, SimpleX), the score is the cosine of the
user and item vectors and there are no biases: what the cosine contrastive loss trains is what
ranks, and the unit vectors still rank the catalog by one matmul and serve ANN retrieval.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recommender.models.base import RecModel, init_embedding, pair_dot, pool_dot


class MF(RecModel):
    """logit(u, i) = p_u · q_i + b_u + b_i + b  (+ c_u · t_i with context); with `cosine`,
    cos([p_u, c_u], [q_i, t_i])."""

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        sparse: bool = False,
        context: int = 0,
        cosine: bool = False,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.context = n_users, n_items, context
        self.cosine = cosine
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        if not cosine:  # a cosine has no use for them, and DDP refuses unused parameters
            self.user_bias = nn.Embedding(n_users, 1, sparse=sparse)
            self.item_bias = nn.Embedding(n_items, 1, sparse=sparse)
            self.bias = nn.Parameter(torch.zeros(1))
            nn.init.zeros_(self.user_bias.weight)
            nn.init.zeros_(self.item_bias.weight)
        if context:
            # Row n_items stands for "no earlier item" and stays zero (padding_idx: no gradient).
            self.context_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items, sparse=sparse)
            self.target_emb = nn.Embedding(n_items, dim, sparse=sparse)
            init_embedding(self.context_emb)
            init_embedding(self.target_emb)
            with torch.no_grad():
                self.context_emb.weight[n_items].zero_()
            self.register_buffer("latest", torch.full((n_users, context), n_items))

    def set_latest(self, latest: np.ndarray) -> None:
        """Keep each user's latest items ((n_users, context), Interactions.latest_items) as
        the context of every later score."""
        self.latest.copy_(torch.from_numpy(latest))

    def context_vector(self, items: torch.Tensor) -> torch.Tensor:
        """(B, k) items (n_items pads) -> (B, d) the mean of their context embeddings, zero for
        a row with none."""
        present = (items != self.n_items).unsqueeze(-1)  # (B, k, 1)
        total = (self.context_emb(items) * present).sum(1)  # padding masked, whatever its row
        return total / present.sum(1).clamp(min=1)

    def user_vectors(
        self, user_idx: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) -> (B, d) or, with context, (B, 2d): the user side of the dot product."""
        p = self.user_emb(user_idx)
        if not self.context:
            return p
        items = self.latest[user_idx] if context is None else context  # (B, k)
        return torch.cat([p, self.context_vector(items)], 1)

    def item_vectors(self) -> torch.Tensor:
        """(n_items, d) or, with context, (n_items, 2d): the item side of the dot product."""
        q = self.item_emb.weight
        return torch.cat([q, self.target_emb.weight], 1) if self.context else q

    def _user_bias(self, user_idx: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """(B, 1) user biases; zeros when scoring by cosine."""
        return users.new_zeros(len(users), 1) if self.cosine else self.user_bias(user_idx)

    def forward(
        self,
        user_idx: torch.Tensor,
        item_idx: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B,) logits of (B,) pairs; (B, K) of (B, K) or (1, K) items (base.pair_dot); with
        (B,) items and a (P,) `pool` (B, 1 + P): each row's item, then the pool (base.pool_dot,
        train.loss=sampled_softmax); with no `item_idx` (B, n_items): the whole catalog
        (train.loss=softmax). Losses call it through DDP's wrapper so gradients are
        synchronised. `context` ((B, k) items, n_items padding) replaces the users' latest
        items."""
        users = self.user_vectors(user_idx, context)
        if item_idx is None:
            return self._catalog(users, self._user_bias(user_idx, users), self.item_cache())
        if pool is not None:
            item_idx = torch.cat([item_idx, pool])
        q = self.item_emb(item_idx)
        if self.context:
            q = torch.cat([q, self.target_emb(item_idx)], -1)
        if self.cosine:
            dot = pair_dot if pool is None else pool_dot
            return dot(F.normalize(users, dim=-1), F.normalize(q, dim=-1))
        if pool is not None:
            item_bias = self.item_bias(item_idx).squeeze(-1)  # (B + P,)
            return pool_dot(users, q, item_bias) + self.user_bias(user_idx) + self.bias
        if item_idx.dim() > 1:
            item_bias = self.item_bias(item_idx).squeeze(-1)  # (B | 1, K)
            return pair_dot(users, q) + item_bias + self.user_bias(user_idx) + self.bias
        bias = self.user_bias(user_idx) + self.item_bias(item_idx)  # (B, 1)
        return (users * q).sum(-1) + bias.squeeze(-1) + self.bias

    def score_after(
        self, context: torch.Tensor, user_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, k) items just interacted with (n_items pads) [, (B,) users] -> (B, n_items)
        logits of what comes next: the users' own vectors with this context in place of their
        stored latest items or, without users, the mean trained user's (an anonymous session)."""
        if user_idx is not None:
            return self(user_idx, None, context)
        mean_user = self.user_emb.weight.mean(0).expand(len(context), -1)
        users = torch.cat([mean_user, self.context_vector(context)], 1)
        bias = users.new_zeros(()) if self.cosine else self.user_bias.weight.mean()
        return self._catalog(users, bias, self.item_cache())

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        items = self.item_vectors()
        if self.cosine:
            return F.normalize(items, dim=-1), items.new_zeros(self.n_items)
        return items, self.item_bias.weight.squeeze(-1) + self.bias

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        users = self.user_vectors(user_idx)
        return self._catalog(users, self._user_bias(user_idx, users), cache)

    def _catalog(
        self, users: torch.Tensor, user_bias: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """(B, D) user vectors and their (B, 1) biases -> (B, n_items) logits, one matmul."""
        items, item_bias = cache
        if self.cosine:
            users = F.normalize(users, dim=-1)
        return users @ items.T + item_bias + user_bias

    def item_representation(self) -> torch.Tensor:
        return self.item_emb.weight

    def retrieval_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.item_emb.weight.device
        users = self.user_vectors(torch.arange(self.n_users, device=device))
        if self.cosine:
            return F.normalize(users, dim=-1), F.normalize(self.item_vectors(), dim=-1)
        ones = torch.ones(self.n_users, 1, device=device)
        items = torch.cat([self.item_vectors(), self.item_bias.weight], 1)
        return torch.cat([users, ones], 1), items
