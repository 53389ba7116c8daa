"""The seed's NCF: user and item embeddings, concatenated, through an MLP to one logit.

UserEmbedding(n_users, d0/2), ItemEmbedding(n_items, d0/2)
-> concat (B, d0) -> [Linear -> ReLU -> Dropout] per hidden width -> Linear(d_last, 1)
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from recommender.models.base import SCORE_TILE, RecModel, init_embedding

# Random bits behind each unit's keep draw: p is rounded to a multiple of 1 / 2**16.
KEEP_BITS = 16


class ReLUDropout(torch.autograd.Function):
    """ReLU then inverted dropout, as one op with one saved mask.

    Each unit is kept with probability 1 - p (p rounded to 1 / 65,536) and scaled by the
    inverse of that probability, as nn.Dropout does. Why not relu + nn.Dropout: in a training
    step of the seed's network (32-dim embeddings, 64 -> 64 -> 32, one CPU thread) dropout's
    uniform draws took a quarter of the step (torch's CPU generator spends one 32-bit draw per
    float); four units' keep draws come from one 64-bit draw here, and ReLU's mask folds into
    dropout's, so the backward is one multiply instead of a threshold and a multiply. Draws
    come from torch's default generator, so seeding and checkpointed RNG states cover them.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, p: float) -> torch.Tensor:
        dropped = min(round(p * (1 << KEEP_BITS)), (1 << KEEP_BITS) - 1)
        n = h.numel()
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=h.device)
        words.random_(-(1 << 63), (1 << 63) - 1)
        draws = words.view(torch.int16)[:n].view(h.shape)  # uniform over the int16 range
        keep = draws >= dropped - (1 << (KEEP_BITS - 1))
        mask = keep.logical_and_(h > 0).to(h.dtype)
        mask.mul_((1 << KEEP_BITS) / ((1 << KEEP_BITS) - dropped))
        ctx.save_for_backward(mask)
        return h * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class MLPTower(nn.Module):
    """Embeddings plus hidden layers; returns the last hidden vector, which NeuMF reuses.

    The first Linear sees [p_u, q_i], so its weight splits into a user half and an item half.
    Scoring one user against every item precomputes the item half once (item_cache), turning
    the widest layer into a broadcast add.
    """

    def __init__(
        self, n_users: int, n_items: int, layers: list[int], dropout: float, sparse: bool = False
    ) -> None:
        super().__init__()
        half = layers[0] // 2
        self.user_emb = nn.Embedding(n_users, half, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, half, sparse=sparse)
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        self.first = nn.Linear(layers[0], layers[1])
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(layers[1:]))
        self.dropout = nn.Dropout(dropout)
        self.width = layers[1]

    def _drop(self, h: torch.Tensor) -> torch.Tensor:
        """ReLU, then inverted dropout while training (ReLUDropout)."""
        p = self.dropout.p
        if not self.training or p == 0:
            return torch.relu(h)
        return ReLUDropout.apply(h, p)

    def _rest(self, h: torch.Tensor) -> torch.Tensor:
        h = self._drop(h)
        for linear in self.linears:
            h = self._drop(linear(h))
        return h

    def forward(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor, pool: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,), (B,) -> (B, layers[-1]); (B,) users with (B, K) or (1, K) items, or with (B,)
        items and a (P,) `pool` shared by every row (K = 1 + P: each row's item, then the
        pool) -> (B, K, layers[-1]). The user half of layer one is computed once per row and
        the item half once per item, so a row scores its K items for K additions, not K
        concatenations; a shared pool's item half is computed once for every row."""
        if pool is None and item_idx.dim() == user_idx.dim():
            x = torch.cat([self.user_emb(user_idx), self.item_emb(item_idx)], -1)  # (B, d0)
            return self._rest(self.first(x))
        half = self.user_emb.embedding_dim
        user_half = self.user_emb(user_idx) @ self.first.weight[:, :half].T + self.first.bias
        if pool is None:
            item_half = self.item_emb(item_idx) @ self.first.weight[:, half:].T  # (B | 1, K, w1)
            return self._rest(user_half[:, None, :] + item_half)
        item_half = self.item_emb(torch.cat([item_idx, pool])) @ self.first.weight[:, half:].T
        b = len(user_idx)
        own = (user_half + item_half[:b])[:, None, :]  # (B, 1, w1)
        return self._rest(torch.cat([own, user_half[:, None, :] + item_half[b:]], 1))

    def item_half(self) -> torch.Tensor:
        """(n_items, layers[1]): the item embeddings through the item half of layer one."""
        half = self.user_emb.embedding_dim
        return self.item_emb.weight @ self.first.weight[:, half:].T

    def score_items(
        self, user_idx: torch.Tensor, item_half: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """(B,) users against every item -> (B, n_items) = last hidden layer @ weight.

        Inference only (no dropout). The catalog is walked in tiles of about SCORE_TILE
        floats: each tile's hidden activations stay in the CPU cache through every layer,
        bias and ReLU are fused into the matmul or done in place, so a large catalog runs at
        matmul speed instead of streaming (B, n_items, width) temporaries through memory.
        """
        half = self.user_emb.embedding_dim
        user_half = self.user_emb(user_idx) @ self.first.weight[:, :half].T + self.first.bias
        n_users, n_items = len(user_idx), len(item_half)
        block = max(1, SCORE_TILE // (n_users * self.width))
        out = torch.empty(n_users, n_items, dtype=weight.dtype, device=weight.device)
        for start in range(0, n_items, block):
            tile = item_half[start : start + block]
            h = (user_half[:, None, :] + tile[None, :, :]).relu_().flatten(0, 1)
            for linear in self.linears:
                assert isinstance(linear, nn.Linear)
                h = torch.addmm(linear.bias, h, linear.weight.T).relu_()
            out[:, start : start + block] = (h @ weight).view(n_users, len(tile))
        return out


class MLP(RecModel):
    """The NCF paper's MLP model (He et al. 2017): a user and an item embedding, concatenated,
    through a tower of ReLU layers to one logit; the layers can learn interactions a dot
    product cannot express. `layers[0]` is the concatenated width (each embedding half of
    it); `layers[-1]` feeds the output.

    forward: (B,) user indices, (B,) item indices -> (B,) logits. score_all: (B,) users ->
    (B, n_items), the item half of the first layer precomputed once (item_cache).

    Example:
        >>> model = MLP(n_users=100, n_items=50, layers=[32, 16, 8], dropout=0.0)
        >>> model(torch.tensor([0, 1]), torch.tensor([3, 4])).shape
        torch.Size([2])
        >>> model.score_all(torch.tensor([0, 1])).shape
        torch.Size([2, 50])
    """

    def __init__(
        self, n_users: int, n_items: int, layers: list[int], dropout: float, sparse: bool = False
    ) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.tower = MLPTower(n_users, n_items, layers, dropout, sparse)
        self.out = nn.Linear(layers[-1], 1)
        self.pair_width = self.tower.width

    def forward(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor, pool: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) logits of (B,) pairs; (B, K) of (B, K) or (1, K) items; (B, 1 + P) of (B,)
        items and a (P,) `pool` (MLPTower.forward)."""
        return self.out(self.tower(user_idx, item_idx, pool)).squeeze(-1)

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return (self.tower.item_half(),)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return self.tower.score_items(user_idx, cache[0], self.out.weight[0]) + self.out.bias

    def item_representation(self) -> torch.Tensor:
        return self.tower.item_half()
