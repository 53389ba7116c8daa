"""How a batch becomes a loss (train.loss): what a batch holds, what each row is scored
against, and which pure function of losses.py turns those scores into the step's loss.

| train.loss      | a batch (data/sampling.epoch_batches)      | each row scored against          |
|-----------------|--------------------------------------------|----------------------------------|
| bce             | pairs with 0/1 labels, num_negatives per   | its own item                     |
|                 | positive mixed in                          |                                  |
| softmax         | positives                                  | the whole catalog                |
| sampled_softmax | positives                                  | its positive and one pool of     |
|                 |                                            | negatives shared by the batch    |
| bpr, ccl        | positives, each with num_negatives own     | its positive and its negatives   |
|                 | negatives                                  |                                  |

A batch is scored by one call of the network, so DDP's wrapper synchronises the gradients of
everything it scored. A sampled-softmax batch is scored as B x (1 + P): each row against its
positive and the pool, `model(u, i, pool=pool)`; a dot-product model scores the pool by one
matmul (models.base.pool_dot), an MLP tower computes the pool's half of its first layer once
for every row and passes each (row, item) pair through the rest.

Example:
    >>> objective = Objective("bpr", num_negatives=4)                            # doctest: +SKIP
    >>> loss = objective(model, users, items, negatives)                           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from recommender import losses
from recommender.config import TrainConfig
from recommender.data.sampling import PoolSampler
from recommender.models.lightgcn import LightGCN


@dataclass(frozen=True)
class Objective:
    """train.loss and its settings, with the pool of the split it trains on (sampled_softmax).

    `num_negatives`: negatives the epoch draws per positive, none a positive of its user (bce:
    pairs of their own; bpr, ccl: beside their positive); 0 for the softmax losses, which draw
    none per positive. `embedding_l2` applies to LightGCN only (losses.embedding_l2).
    """

    loss: str = "bce"
    num_negatives: int = 0
    pool: PoolSampler | None = None
    logq: bool = True
    ccl_margin: float = 0.8
    ccl_neg_weight: float = 10.0
    embedding_l2: float = 0.0

    @classmethod
    def from_config(cls, t: TrainConfig, item_counts: torch.Tensor) -> Objective:
        """The objective of `t` on a split whose (n_items,) training positives per item are
        `item_counts` (on the training device): what the pool's draws and its logQ follow."""
        pool = None
        if t.loss == "sampled_softmax":
            in_batch = t.pool in ("in_batch", "mix")
            size = 0 if t.pool == "in_batch" else t.pool_size
            alpha = t.popularity_power if t.pool == "popularity" else 0.0
            pool = PoolSampler(item_counts, size, alpha=alpha, in_batch=in_batch)
        return cls(
            loss=t.loss,
            num_negatives=t.num_negatives if t.loss in ("bce", "bpr", "ccl") else 0,
            pool=pool,
            logq=t.logq,
            ccl_margin=t.ccl_margin,
            ccl_neg_weight=t.ccl_neg_weight,
            embedding_l2=t.embedding_l2,
        )

    @property
    def pairs(self) -> bool:
        """Batches of (user, item, label) pairs; False: positives with their own negatives."""
        return self.loss not in ("bpr", "ccl")

    def rows_per_positive(self) -> int:
        """Batch rows an epoch holds per training positive."""
        return 1 + self.num_negatives if self.pairs else 1

    def __call__(
        self,
        net: torch.nn.Module,
        u: torch.Tensor,
        i: torch.Tensor,
        extra: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The loss of one batch: (B,) users and items, `extra` the (B,) 0/1 labels (bce) or
        the (B, N) negatives (bpr, ccl), unused otherwise; (B,) row `weight`s (confidences);
        (B, k) `context` items for a model with model.context. `generator` draws the pool."""
        kw = {} if context is None else {"context": context}
        model = getattr(net, "module", net)  # DDP's wrapper holds the model
        negatives: torch.Tensor | None = None
        if self.loss == "bce":
            value = losses.bce(net(u, i, **kw).float(), extra, weight)
        elif self.loss == "softmax":
            value = losses.softmax(net(u, **kw).float(), i, weight)
        elif self.loss in ("bpr", "ccl"):
            negatives = extra
            scores = net(u, torch.cat([i[:, None], negatives], 1), **kw).float()  # (B, 1 + N)
            pos, neg = scores[:, 0], scores[:, 1:]
            if self.loss == "bpr":
                value = losses.bpr(pos, neg, weight)
            else:
                value = losses.ccl(pos, neg, self.ccl_margin, self.ccl_neg_weight, weight)
        elif self.loss == "sampled_softmax":
            value, negatives = self._sampled_softmax(net, u, i, weight, kw, generator)
        else:
            raise ValueError(f"unknown loss {self.loss!r}")
        if self.embedding_l2 and isinstance(model, LightGCN):
            users, items = model.user_emb, model.item_emb
            neg = None if negatives is None else items(negatives)
            value = value + self.embedding_l2 * losses.embedding_l2(users(u), items(i), neg)
        return value

    def _sampled_softmax(
        self,
        net: torch.nn.Module,
        u: torch.Tensor,
        i: torch.Tensor,
        weight: torch.Tensor | None,
        kw: dict[str, torch.Tensor],
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss against this batch's pool, and the pool's (P,) items."""
        if self.pool is None or generator is None:
            raise ValueError("sampled_softmax needs a pool and a generator to draw it")
        pool, log_q = self.pool.sample(i, generator)
        scores = net(u, i, pool=pool, **kw).float()  # (B, 1 + P)
        pos, neg = scores[:, 0], scores[:, 1:]
        # The positive is corrected only where it is itself a draw of the pool (in-batch items):
        # with a pool drawn apart from it, leaving it be tracks the full softmax more closely.
        log_q_pos = self.pool.log_q(i, len(i)) if self.logq and self.pool.in_batch else None
        value = losses.sampled_softmax(
            pos,
            neg,
            log_q_pos=log_q_pos,
            log_q_neg=log_q if self.logq else None,
            pos_items=i,
            neg_items=pool,
            weights=weight,
        )
        return value, pool


def descend(loss: torch.Tensor, optimizers: Sequence[torch.optim.Optimizer]) -> torch.Tensor:
    """One optimiser step on `loss` (every optimizer: dense and sparse parameters may have their
    own); returns the loss, detached. The one step pair models and sequence models share."""
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in optimizers:
        opt.step()
    return loss.detach()
