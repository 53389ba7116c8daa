"""Negative sampling and epoch batches, as whole-tensor operations on the training device.

Each epoch draws fresh negatives for every positive in one shot and rejects the few that hit a
training positive of that user, redrawing only those, until none are left. Membership is a
lookup in a dense bitmap when users x items is small enough, else a binary search in the sorted
positive keys, so the cost is O(samples · log positives) with no per-row Python.

Batches are contiguous slices of the epoch after one permutation: no Dataset, no DataLoader,
no per-sample `__getitem__` (the approach of NVIDIA's NCF example).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from recommender.data.interactions import Interactions
from recommender.utils import DataError

# Above this many user-item cells, a bitmap costs too much memory; use sorted keys instead.
DENSE_LIMIT = 1 << 28


class NegativeSampler:
    """Draws items that are not training positives of the given user.

    Example:
        >>> sampler = NegativeSampler(train)                              # doctest: +SKIP
        >>> negs = sampler.sample(users, k=4, generator=g)                # (N, 4)
    """

    def __init__(
        self,
        positives: Interactions,
        *,
        strategy: Literal["uniform", "popularity"] = "uniform",
        power: float = 0.75,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_items = positives.n_items
        self.device = torch.device(device)
        counts = positives.user_counts()
        if len(counts) and counts.max() >= self.n_items:
            user = int(counts.argmax())
            raise DataError(f"user index {user} interacted with every item; it has no negatives")
        keys = torch.from_numpy(positives.keys).to(self.device)
        self._dense: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        if positives.n_users * positives.n_items <= DENSE_LIMIT:
            self._dense = torch.zeros(
                positives.n_users * positives.n_items, dtype=torch.bool, device=self.device
            )
            self._dense[keys] = True
        else:
            self._keys = torch.sort(keys).values
        self._cdf: torch.Tensor | None = None
        if strategy == "popularity":
            weights = torch.from_numpy(positives.item_counts()).double().pow(power)
            weights = weights + (weights.sum() == 0)  # all-zero counts: fall back to uniform
            # Items without training interactions have weight 0 and are never drawn, so a user
            # holding every item of positive weight has no negatives: rejection would not end.
            drawable = (weights > 0).numpy()
            held = np.bincount(
                positives.user_idx, weights=drawable[positives.item_idx], minlength=len(counts)
            )
            if len(held) and held.max() >= drawable.sum():
                user = int(held.argmax())
                raise DataError(
                    f"user index {user} interacted with every item that popularity sampling can "
                    "draw; it has no negatives (use train.sampling=uniform)"
                )
            cdf = torch.cumsum(weights / weights.sum(), 0)
            cdf[-1] = 1.0
            self._cdf = cdf.to(self.device)
        elif strategy != "uniform":
            raise DataError(f"unknown sampling strategy '{strategy}' (uniform, popularity)")

    def is_positive(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Bool tensor shaped like `items`: True where (user, item) is a training positive."""
        keys = users * self.n_items + items
        if self._dense is not None:
            return self._dense[keys]
        assert self._keys is not None
        if not len(self._keys):
            return torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self._keys, keys).clamp_(max=len(self._keys) - 1)
        return self._keys[pos] == keys

    def _draw(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self._cdf is None:
            return torch.randint(
                self.n_items, (n,), generator=generator, device=self.device, dtype=torch.int64
            )
        u = torch.rand(n, generator=generator, device=self.device, dtype=torch.float64)
        return torch.searchsorted(self._cdf, u).clamp_(max=self.n_items - 1)

    def sample(self, users: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        """(N,) user indices -> (N, k) negative item indices, none a positive of its user."""
        users = users.to(self.device)
        flat_users = users.repeat_interleave(k)
        items = self._draw(len(flat_users), generator)
        todo = torch.nonzero(self.is_positive(flat_users, items)).squeeze(1)
        while len(todo):
            redraw = self._draw(len(todo), generator)
            items[todo] = redraw
            todo = todo[self.is_positive(flat_users[todo], redraw)]
        return items.view(len(users), k)


def epoch_batches(
    users: torch.Tensor,
    items: torch.Tensor,
    sampler: NegativeSampler,
    *,
    num_negatives: int,
    batch_size: int,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (user_idx, item_idx, label) batches for one epoch: positives plus fresh negatives.

    With `world_size > 1` each rank takes a disjoint, equal-sized share of the positives (the
    same permutation on every rank, as the generator is seeded identically) and draws its own
    negatives, so ranks step in lockstep for DistributedDataParallel.
    """
    device = sampler.device
    perm = torch.randperm(len(users), generator=generator, device=device)
    if world_size > 1:
        share = len(perm) // world_size
        perm = perm[rank * share : (rank + 1) * share]
    pos_users, pos_items = users[perm], items[perm]
    negatives = sampler.sample(pos_users, num_negatives, generator)  # (P, k)
    all_users = torch.cat([pos_users, pos_users.repeat_interleave(num_negatives)])
    all_items = torch.cat([pos_items, negatives.view(-1)])
    labels = torch.cat(
        [
            torch.ones(len(pos_users), device=device),
            torch.zeros(negatives.numel(), device=device),
        ]
    )
    order = torch.randperm(len(all_users), generator=generator, device=device)
    all_users, all_items, labels = all_users[order], all_items[order], labels[order]
    for start in range(0, len(order), batch_size):
        end = start + batch_size
        yield all_users[start:end], all_items[start:end], labels[start:end]
