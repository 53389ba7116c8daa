"""What every model shares: the scoring contract used by training, evaluation and serving.

A model is only the network: `forward(user_idx, item_idx) -> logits`. Sigmoid is applied where
probabilities are shown, never inside the model, so training uses the stable BCE-with-logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

# Bound on B x n_items x width floats materialised at once when scoring every item. Small
# chunks (8 MiB) stay in cache: full ranking of ml-100k ran 2.5x faster than with 128 MiB ones.
SCORE_BUDGET = 1 << 21
# Floats of one (users x items x width) tile pushed through an MLP tower at once (1 MiB: L2).
SCORE_TILE = 1 << 18


class RecModel(nn.Module):
    """Base class: subclasses implement forward, item_cache and _score_cached.

    What a model can do is asked of it, never read from its class: `personalised` and
    `context` below, `item_representation` and `retrieval_vectors` (None where absent).
    """

    n_users: int
    n_items: int
    pair_width: int = 1  # floats per (user, item) pair while scoring all items
    # False for a model that ranks every user's items alike (popularity): no user or item
    # vectors, so a session or a similar-items question gets its one list.
    personalised: bool = True
    # How many of a user's latest items the model reads (MF's Markov term, SASRec's sequence);
    # 0: none. A model with context keeps each user's latest items in `latest` ((n_users,
    # context) buffer, set by `set_latest`, in the model's own order: `latest_of` reads it) and
    # scores what follows given items with `score_after` of a `context_after` row.
    context: int = 0
    latest: torch.Tensor
    # True for a model that reads the training graph (LightGCN, GraphFilter): the trainer calls
    # `set_graph` with each stage's own training pairs before it trains or fits.
    graph: bool = False

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(B,) user indices with (B,) item indices -> (B,) logits; trainable models also take
        (B, K) items, K per row, or (1, K) items shared by every row -> (B, K) logits."""
        raise NotImplementedError

    def set_graph(self, users: np.ndarray, items: np.ndarray) -> None:
        """Propagate over these (E,) training pairs; for a model with `graph` only."""
        raise NotImplementedError(f"{type(self).__name__} propagates over no graph")

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        """Item-side tensors computed once per model version, reused for every user."""
        raise NotImplementedError

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        raise NotImplementedError

    def score_all(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """(B,) user indices -> (B, n_items) logits, in user chunks that bound memory."""
        cache = self.item_cache() if cache is None else cache
        rows = max(1, SCORE_BUDGET // (self.n_items * self.pair_width))
        if len(user_idx) <= rows:
            return self._score_cached(user_idx, cache)
        return torch.cat([self._score_cached(chunk, cache) for chunk in user_idx.split(rows)])

    def set_latest(self, latest: np.ndarray) -> None:
        """Keep each user's latest items ((n_users, context), Interactions.latest_items) as
        the context of every later score; for a model with `context` only."""
        raise NotImplementedError(f"{type(self).__name__} reads no context")

    def score_after(
        self, context: torch.Tensor, user_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, W) rows of `context_after` [, (B,) users] -> (B, n_items) logits of what comes
        next; for a model with `context` only."""
        raise NotImplementedError(f"{type(self).__name__} reads no context")

    def latest_of(self, user_idx: int) -> torch.Tensor:
        """(n,) the user's stored latest items, latest first, without padding (n <= context)."""
        row = self.latest[user_idx]
        return row[row != self.n_items]

    def context_after(self, recent: torch.Tensor, user_idx: int | None = None) -> torch.Tensor:
        """(R,) items just interacted with, oldest first [, a known user] -> (context,) the
        row `score_after` reads (with that user's index) to score what follows them: here the
        Markov term's, the latest `context` of the recent items and then of the user's stored
        ones, latest first, n_items padding (the stored items stand in for what was not given).
        """
        latest = recent.flip(0)
        if user_idx is not None:
            latest = torch.cat([latest, self.latest_of(user_idx)])
        row = latest.new_full((self.context,), self.n_items)
        row[: min(len(latest), self.context)] = latest[: self.context]
        return row

    def item_representation(self) -> torch.Tensor | None:
        """(n_items, r) vectors whose cosine similarity reflects how the model sees items."""
        return None

    def retrieval_vectors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(user_vecs, item_vecs) whose dot product approximates the score, for ANN retrieval."""
        return None


def pair_dot(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Dot products of (B, d) user vectors with (B, d) item vectors -> (B,); with (B, K, d)
    vectors, K per row -> (B, K); with (1, K, d) vectors shared by every row -> (B, K) by one
    matmul, never a (B, K, d) copy."""
    if items.dim() == 2:
        return (users * items).sum(-1)
    if len(items) == 1:
        return users @ items[0].T
    return torch.bmm(items, users.unsqueeze(-1)).squeeze(-1)


def pool_dot(
    users: torch.Tensor, items: torch.Tensor, item_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, d) user vectors and (B + P, d) item vectors, each row's own item first, then a pool
    shared by every row -> (B, 1 + P): each row's dot product with its own item, then with the
    pool by one matmul; (B + P,) `item_bias` is added the same way. What a sampled softmax
    scores, without the (B, B) block of every row against every other row's item: with a
    batch of 8,192 and a pool of 64 that block was 99% of the scores."""
    b = len(users)
    scores = torch.cat([(users * items[:b]).sum(-1, keepdim=True), users @ items[b:].T], 1)
    if item_bias is None:
        return scores
    return scores + torch.cat([item_bias[:b, None], item_bias[None, b:].expand(b, -1)], 1)


def resize_buffers(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, names: tuple[str, ...]
) -> None:
    """Give each named buffer the shape of its saved tensor before a state dict loads into it:
    a graph model's edge count (and its basis) is the checkpoint's, not the empty
    constructor's."""
    for name in names:
        saved = state_dict.get(prefix + name)
        current = getattr(module, name)
        if isinstance(saved, torch.Tensor) and saved.shape != current.shape:
            setattr(module, name, torch.empty_like(saved, device=current.device))


def init_embedding(table: nn.Embedding, std: float = 0.01) -> None:
    nn.init.normal_(table.weight, std=std)
