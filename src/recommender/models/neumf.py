"""Neural Matrix Factorization (He et al. 2017, eq. 12): GMF and MLP fused at the output.

    logit(u, i) = h · [ p_u^G ⊙ q_i^G ,  MLP(p_u^M, q_i^M) ] + b

The two branches keep separate embeddings. With pretraining, GMF and MLP are trained alone
first and NeuMF starts from their weights, the output layer set to [α h_GMF, (1-α) h_MLP].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from recommender.models.base import RecModel, init_embedding, pair_dot, pool_dot
from recommender.models.gmf import GMF
from recommender.models.mlp import MLP, MLPTower


class NeuMF(RecModel):
    """GMF and MLP side by side with their own embeddings, fused by one linear output layer:
    the element-wise product captures what a dot product does, the tower what it cannot, and
    the output layer learns how much each counts (insights.branch_share measures it).

    forward: (B,) user indices, (B,) item indices -> (B,) logits; `branches` gives the
    (B, dim + layers[-1]) vector the output layer weighs. score_all: (B,) users ->
    (B, n_items). Pretrained GMF and MLP are copied in with `load_pretrained`.

    Example:
        >>> model = NeuMF(n_users=100, n_items=50, dim=8, layers=[32, 16, 8], dropout=0.0)
        >>> model(torch.tensor([0, 1]), torch.tensor([3, 4])).shape
        torch.Size([2])
        >>> model.score_all(torch.tensor([0])).shape
        torch.Size([1, 50])
    """

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int,
        layers: list[int],
        dropout: float,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.user_emb = nn.Embedding(n_users, dim, sparse=sparse)
        self.item_emb = nn.Embedding(n_items, dim, sparse=sparse)
        init_embedding(self.user_emb)
        init_embedding(self.item_emb)
        self.tower = MLPTower(n_users, n_items, layers, dropout, sparse)
        self.out = nn.Linear(dim + layers[-1], 1)
        self.dim = dim
        self.pair_width = self.tower.width

    def branches(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) -> (B, dim + layers[-1]): GMF vector then MLP vector."""
        users = self.user_emb(user_idx)
        return torch.cat([users * self.item_emb(item_idx), self.tower(user_idx, item_idx)], -1)

    def forward(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor, pool: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) logits of (B,) pairs; (B, K) of (B, K) or (1, K) items; (B, 1 + P) of (B,)
        items and a (P,) `pool`. The output layer is linear, so with many items a row the GMF
        part is a dot product (base.pair_dot, or base.pool_dot for a pool) and the tower's
        part comes from MLPTower.scores, in chunks of rows."""
        if pool is None and item_idx.dim() == user_idx.dim():
            return self.out(self.branches(user_idx, item_idx)).squeeze(-1)
        w_gmf, w_mlp = self.out.weight[0, : self.dim], self.out.weight[0, self.dim :]
        users = self.user_emb(user_idx) * w_gmf
        if pool is None:
            gmf = pair_dot(users, self.item_emb(item_idx))
        else:
            gmf = pool_dot(users, self.item_emb(torch.cat([item_idx, pool])))
        return gmf + self.tower.scores(user_idx, item_idx, w_mlp, pool) + self.out.bias

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return self.item_emb.weight, self.tower.item_half()

    def branch_scores(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) users against every item -> the GMF and the MLP part of the logit, each
        (B, n_items); logit = GMF + MLP + bias exactly, as the output layer is linear."""
        items, item_half = cache
        w_gmf, w_mlp = self.out.weight[0, : self.dim], self.out.weight[0, self.dim :]
        gmf = (self.user_emb(user_idx) * w_gmf) @ items.T
        return gmf, self.tower.score_items(user_idx, item_half, w_mlp)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        gmf, mlp = self.branch_scores(user_idx, cache)
        return gmf + mlp + self.out.bias

    def item_representation(self) -> torch.Tensor:
        gmf = self.item_emb.weight * self.out.weight[0, : self.dim].abs().sqrt()
        return torch.cat([F.normalize(gmf, dim=1), F.normalize(self.tower.item_half(), dim=1)], 1)

    def retrieval_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb.weight * self.out.weight[0, : self.dim], self.item_emb.weight

    @torch.no_grad()
    def load_pretrained(self, gmf: GMF, mlp: MLP, alpha: float) -> None:
        """Copy the branches from trained GMF and MLP; weigh their output layers by alpha."""
        self.user_emb.weight.copy_(gmf.user_emb.weight)
        self.item_emb.weight.copy_(gmf.item_emb.weight)
        self.tower.load_state_dict(mlp.tower.state_dict())
        self.out.weight.copy_(
            torch.cat([alpha * gmf.out.weight, (1 - alpha) * mlp.out.weight], dim=1)
        )
        self.out.bias.copy_(alpha * gmf.out.bias + (1 - alpha) * mlp.out.bias)
