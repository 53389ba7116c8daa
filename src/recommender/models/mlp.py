"""The seed's NCF: user and item embeddings, concatenated, through an MLP to one logit.

UserEmbedding(n_users, d0/2), ItemEmbedding(n_items, d0/2)
-> concat (B, d0) -> [Linear -> ReLU -> Dropout] per hidden width -> Linear(d_last, 1)
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from recommender.models.base import SCORE_TILE, RecModel, init_embedding

# Random bits behind each unit's keep draw: p is rounded to a multiple of 1 / 2**8.
KEEP_BITS = 8
# First-layer activations a chunk of MLPTower.scores holds (2 MiB of float32: the L2 cache).
CHUNK_FLOATS = 1 << 19


class ReLUDropout(torch.autograd.Function):
    """ReLU then inverted dropout, as one op that saves nothing but its output.

    Each unit is kept with probability 1 - p (p rounded to 1 / 256, so 0.2 drops 51 / 256 =
    0.1992) and scaled by the inverse of that probability, as nn.Dropout does. Why not relu +
    nn.Dropout: in a training step of the seed's network (32-dim embeddings, 64 -> 64 -> 32,
    one CPU thread) dropout's uniform draws took a quarter of the step (torch's CPU generator
    spends one 32-bit draw per float); eight units' keep draws come from one 64-bit draw here,
    and the draws are still the largest part of the op. The mask is built from
    float ops (a clamp of the draws): torch's CPU comparisons and bool-to-float casts cost
    five to eight times a float multiply there. The backward passes the gradient where the
    output is positive (ReLU's and dropout's joint mask), so no mask is saved. Draws come
    from torch's default generator, so seeding and checkpointed RNG states cover them.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, p: float) -> torch.Tensor:
        dropped = min(round(p * (1 << KEEP_BITS)), (1 << KEEP_BITS) - 1)
        scale = (1 << KEEP_BITS) / ((1 << KEEP_BITS) - dropped)
        n = h.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=h.device)
        words.random_(-(1 << 63), (1 << 63) - 1)
        draws = words.view(torch.int8)[:n].view(h.shape)  # uniform over the int8 range
        # kept iff draw >= threshold; draws are integers, so clamping to [threshold - 1,
        # threshold] and shifting gives 0 or 1 (in float32, where every int8 is exact)
        threshold = float(dropped - (1 << (KEEP_BITS - 1)))
        keep = draws.float().clamp_(threshold - 1, threshold).sub_(threshold - 1).mul_(scale)
        out = torch.relu(h).mul_(keep)
        ctx.scale = scale
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (out,) = ctx.saved_tensors
        # grad where out > 0 (ReLU's own backward kernel, one pass), times dropout's scale
        return torch.ops.aten.threshold_backward(grad, out, 0).mul_(ctx.scale), None


def _project(
    emb: nn.Embedding, idx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """emb(idx) @ weight.T (+ bias), shaped idx.shape + (weight rows,).

    A dense table with no more rows than idx holds indices is projected whole and then
    gathered: the same product for fewer FLOPs (the seed's network on ml-100k: 943 and 1,682
    rows against a batch of 4,096), and its backward is an index_add into the small projected
    table plus two table-sized matmuls, where gathering first costs torch's embedding backward
    (which sorts a batch of more than 3,000 indices on CPU) and a batch-sized matmul. Sparse
    tables (SparseAdam) keep the gather, which is what their sparse gradient comes from.
    """
    if emb.sparse or emb.num_embeddings > idx.numel():
        return F.linear(emb(idx), weight, bias)
    table = F.linear(emb.weight, weight, bias)  # the bias too once per row, not per index
    return torch.index_select(table, 0, idx.flatten()).view(*idx.shape, weight.shape[0])


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

    def _halves(
        self, user_idx: torch.Tensor, item_idx: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer one's user half (with its bias) and item half: its weight split along
        [p_u, q_i], so a pair's first layer is their sum and a row scores K items for K
        additions, not K concatenations. Shapes: user_idx's and item_idx's, plus (layers[1],)."""
        half = self.user_emb.embedding_dim
        weight = self.first.weight
        user_half = _project(self.user_emb, user_idx, weight[:, :half], self.first.bias)
        return user_half, _project(self.item_emb, item_idx, weight[:, half:])

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(B,), (B,) pairs -> (B, layers[-1]); many items a row go through `scores`."""
        user_half, item_half = self._halves(user_idx, item_idx)
        return self._rest(user_half + item_half)

    def scores(
        self,
        user_idx: torch.Tensor,
        item_idx: torch.Tensor,
        weight: torch.Tensor,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """forward(...) @ weight: (B,) of (B,) pairs; (B, K) of (B, K) or (1, K) items;
        (B, 1 + P) of (B,) items and a (P,) `pool` shared by every row (each row's item, then
        the pool; the pool's item half computed once for every row).

        Many items a row are scored CHUNK_FLOATS first-layer activations at a time, and only
        each chunk's scores are kept: a step of the sampled softmax (B x (1 + P) pairs, tens of
        MB a layer at once) otherwise streams every layer through memory and pays the page
        faults of freshly mapped buffers; in chunks it ran 2.6-2.9x faster (4,096 rows, a pool
        of 64, the seed's network, one thread; docs/BENCHMARKS.md). The chunks' graphs are
        kept for backward, so the gradient is the whole batch's, as in one pass.
        """
        if pool is None and item_idx.dim() == user_idx.dim():
            return self.forward(user_idx, item_idx) @ weight
        items = item_idx if pool is None else torch.cat([item_idx, pool])
        user_half, item_half = self._halves(user_idx, items)
        b = len(user_idx)
        if pool is None:  # (B | 1, K, w1)
            k = item_half.shape[1]
        else:  # each row's own item, (B, 1, w1), and the pool's, (P, w1)
            own, pooled = item_half[:b, None, :], item_half[b:]
            k = 1 + len(pool)
        rows = max(1, CHUNK_FLOATS // (k * self.width))
        chunks = []
        for start in range(0, b, rows):
            users = user_half[start : start + rows, None, :]
            if pool is None:
                mine = item_half if len(item_half) == 1 else item_half[start : start + rows]
                chunks.append(self._rest(users + mine) @ weight)
            else:
                mine = self._rest(users + own[start : start + rows]) @ weight  # (rows, 1)
                chunks.append(torch.cat([mine, self._rest(users + pooled) @ weight], 1))
        return torch.cat(chunks)

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
        items and a (P,) `pool` (MLPTower.scores, the output layer applied per chunk)."""
        return self.tower.scores(user_idx, item_idx, self.out.weight[0], pool) + self.out.bias

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return (self.tower.item_half(),)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return self.tower.score_items(user_idx, cache[0], self.out.weight[0]) + self.out.bias

    def item_representation(self) -> torch.Tensor:
        return self.tower.item_half()
