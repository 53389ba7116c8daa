"""Negative sampling and epoch batches, as whole-tensor operations on the training device.

Each epoch draws fresh negatives for every positive in one shot and rejects the few that hit a
training positive of that user, redrawing only those, until none are left. Membership is a
lookup in a dense bool bitmap when users x items is small, in a packed bitset (one bit a cell:
463 MB for MovieLens-20M's 3.7e9 cells) up to BITSET_LIMIT, else a binary search in the sorted
positive keys (8x slower lookups than the bitset at 20M positives, measured). No per-row
Python anywhere.

Batches are contiguous slices of the epoch after one permutation: no Dataset, no DataLoader,
no per-sample `__getitem__` (the approach of NVIDIA's NCF example). They come as pairs (each
positive and each negative a row with its label: BCE) or as rows (each positive with its own
negatives beside it: BPR, CCL). Sampled softmax draws one pool of negatives per batch instead
(PoolSampler), shared by every row of it. Large epochs are built a
chunk of positives at a time, so memory stays bounded at 100M samples. Per-positive weights
(confidences from play counts) are optional and ride along with the same permutations.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, overload

import numpy as np
import torch

from recommender.data.interactions import Interactions
from recommender.utils import DataError

# Up to this many user-item cells, one byte a cell (fastest lookups).
DENSE_LIMIT = 1 << 28
# Up to this many cells, one bit a cell (512 MiB at the limit); beyond it, sorted keys, whose
# binary search is about 8x slower at 20M positives but needs only 8 bytes a positive.
BITSET_LIMIT = 1 << 32
# Positives per chunk of an epoch: bounds the epoch's working memory (a few hundred MB) whatever
# the epoch's size; sampling and shuffling are per chunk, the permutation is over the epoch.
EPOCH_CHUNK = 1 << 20


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> tensor on `device`; through pinned memory and an async copy on CUDA."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
        cells = positives.n_users * positives.n_items
        self._dense: torch.Tensor | None = None
        self._bits: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        if cells > BITSET_LIMIT:
            self._keys = torch.sort(to_device(positives.keys, self.device)).values
        else:
            dense = cells <= DENSE_LIMIT
            size = cells if dense else (cells + 7) // 8
            table = torch.zeros(
                size, dtype=torch.bool if dense else torch.uint8, device=self.device
            )
            one = torch.ones(1, dtype=torch.uint8, device=self.device)
            # In slices, so 20M positives never need 20M-long temporaries.
            for lo in range(0, len(positives), EPOCH_CHUNK):
                users = positives.user_idx[lo : lo + EPOCH_CHUNK]
                keys = to_device(
                    users * self.n_items + positives.item_idx[lo : lo + EPOCH_CHUNK], self.device
                )
                if dense:
                    table[keys] = True
                else:
                    # Pairs are distinct, so the bits added into a byte differ: the sum is an OR.
                    table.index_put_(
                        (keys >> 3,), one << (keys & 7).to(torch.uint8), accumulate=True
                    )
            if dense:
                self._dense = table
            else:
                self._bits = table
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
        shape, keys = keys.shape, keys.reshape(-1)
        # index_select, not `table[keys]`: 3x faster gathers on CPU (measured at 8M keys).
        if self._dense is not None:
            return self._dense.index_select(0, keys).view(shape)
        if self._bits is not None:
            byte = self._bits.index_select(0, keys >> 3)
            return ((byte >> (keys & 7).to(torch.uint8)) & 1 == 1).view(shape)
        assert self._keys is not None
        if not len(self._keys):
            return torch.zeros(shape, dtype=torch.bool, device=keys.device)
        pos = torch.searchsorted(self._keys, keys).clamp_(max=len(self._keys) - 1)
        return (self._keys.index_select(0, pos) == keys).view(shape)

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


@overload
def epoch_batches(
    users: torch.Tensor,
    items: torch.Tensor,
    sampler: NegativeSampler | None,
    *,
    num_negatives: int,
    batch_size: int,
    generator: torch.Generator,
    weights: None = None,
    context: None = None,
    rank: int = 0,
    world_size: int = 1,
    chunk: int = EPOCH_CHUNK,
    pairs: bool = True,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...
@overload
def epoch_batches(
    users: torch.Tensor,
    items: torch.Tensor,
    sampler: NegativeSampler | None,
    *,
    num_negatives: int,
    batch_size: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    chunk: int = EPOCH_CHUNK,
    pairs: bool = True,
) -> Iterator[tuple[torch.Tensor, ...]]: ...
def epoch_batches(
    users: torch.Tensor,
    items: torch.Tensor,
    sampler: NegativeSampler | None,
    *,
    num_negatives: int,
    batch_size: int,
    generator: torch.Generator,
    weights: torch.Tensor | None = None,
    context: torch.Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    chunk: int = EPOCH_CHUNK,
    pairs: bool = True,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield (user_idx, item_idx, label[, weight][, context]) batches: one epoch's positives,
    new negatives. With `pairs=False`, (user_idx, item_idx, negatives[, weight][, context])
    batches of positives, each row with its (B, num_negatives) own negatives; with no sampler
    (a loss that draws none per positive), every batch is positives only.

    One permutation orders the positives; each chunk of `chunk` positives gets its negatives
    and is shuffled with them, so a batch mixes positives and negatives of many users while
    only one chunk's samples are in memory. Every batch but the last has `batch_size` rows.

    With `weights` ((P,) float, one per positive, aligned with `users` and `items`: a
    confidence) each batch carries a 4th tensor, the row weights: the positive's own, 1 for a
    negative. The weights follow the same permutations and draw no random numbers, so the
    first three tensors are those of the same epoch without weights; without them nothing
    extra is built. `context` ((P, k) items, the ones that preceded each positive) works the
    same way and comes last: a negative gets its positive's context, as it is scored in the
    same situation.

    With `world_size > 1` each rank takes a disjoint, equal-sized share of the positives (the
    same permutation on every rank, as the generator is seeded identically), so ranks step in
    lockstep for DistributedDataParallel; negatives then come from a generator offset by the
    rank, so no two ranks draw the same stream.

    Example:
        >>> for u, i, y in epoch_batches(users, items, sampler, num_negatives=4,
        ...                              batch_size=4096, generator=g): ...  # doctest: +SKIP
    """
    if weights is not None and weights.shape != users.shape:
        raise DataError(
            f"weights has shape {tuple(weights.shape)}; it must match the {len(users)} positives"
        )
    if context is not None and context.shape[0] != len(users):
        raise DataError(
            f"context has {context.shape[0]} rows; it must match the {len(users)} positives"
        )
    if sampler is None and num_negatives:
        raise ValueError(f"num_negatives={num_negatives} needs a NegativeSampler")
    device = users.device if sampler is None else sampler.device
    perm = torch.randperm(len(users), generator=generator, device=device)
    if world_size > 1:
        share = len(perm) // world_size
        perm = perm[rank * share : (rank + 1) * share]
        offset = int(torch.randint(2**62, (1,), generator=generator, device=device))
        generator = torch.Generator(device=device).manual_seed(offset + rank)
    carry: list[torch.Tensor] = []
    for lo in range(0, len(perm), chunk):
        part = perm[lo : lo + chunk]
        pos_users, pos_items = users[part], items[part]
        if sampler is None:
            negatives = pos_items.new_empty(len(part), 0)
        else:
            negatives = sampler.sample(pos_users, num_negatives, generator)  # (P, k)
        if not pairs:  # the permutation has shuffled the rows already
            block = [pos_users, pos_items, negatives]
            if weights is not None:
                block.append(weights[part])
            if context is not None:
                block.append(context[part])
        else:
            block = _pairs(pos_users, pos_items, negatives, generator)
            order = block.pop()
            if weights is not None:
                ones = torch.ones(negatives.numel(), dtype=weights.dtype, device=device)
                block.append(torch.cat([weights[part], ones])[order])
            if context is not None:
                pos_context = context[part]
                repeated = pos_context.repeat_interleave(num_negatives, dim=0)
                block.append(torch.cat([pos_context, repeated])[order])
        if carry:  # the previous chunk's tail, too short for a batch of its own
            block = [torch.cat([a, b]) for a, b in zip(carry, block, strict=True)]
        last = lo + chunk >= len(perm)
        full = len(block[0]) if last else len(block[0]) - len(block[0]) % batch_size
        for start in range(0, full, batch_size):
            end = min(start + batch_size, full)
            yield tuple(t[start:end] for t in block)
        carry = [t[full:] for t in block]


def _pairs(
    users: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor, generator: torch.Generator
) -> list[torch.Tensor]:
    """(P,) positives and their (P, k) negatives -> shuffled (user, item, label) pairs, and the
    shuffle, so that other per-pair tensors can follow it."""
    k = negatives.shape[1]
    all_users = torch.cat([users, users.repeat_interleave(k)])
    all_items = torch.cat([items, negatives.view(-1)])
    labels = torch.cat(
        [
            torch.ones(len(users), device=users.device),
            torch.zeros(negatives.numel(), device=users.device),
        ]
    )
    order = torch.randperm(len(all_users), generator=generator, device=users.device)
    return [all_users[order], all_items[order], labels[order], order]


class PoolSampler:
    """Negatives for sampled_softmax: one pool per batch, scored by every row of it.

    The pool holds `size` items drawn with replacement from q(j) ∝ count_j ** alpha (alpha=0:
    uniform over the catalog; 1: by popularity) followed, with `in_batch`, by the batch's own
    positives, which are draws from the item frequency f(j) = count_j / Σ count since batches
    are slices of a permutation of the training positives. With both, it is the mixed negative
    sampling of Yang et al. (WWW 2020): in-batch items are free but miss the long tail.

    log_q(j) is the log of item j's expected number of copies in the pool,
    size * q(j) + B * f(j): one correction for either source or both.

    Example:
        >>> counts = torch.tensor([5.0, 1.0, 0.0, 2.0])
        >>> pool = PoolSampler(counts, size=3, alpha=1.0, in_batch=True)
        >>> items, log_q = pool.sample(torch.tensor([0, 3]), torch.Generator().manual_seed(0))
        >>> items.shape, log_q.shape
        (torch.Size([5]), torch.Size([5]))
    """

    def __init__(
        self, item_counts: torch.Tensor, size: int, *, alpha: float = 0.0, in_batch: bool = False
    ) -> None:
        """`item_counts`: (n_items,) training positives per item, on the device of the pool."""
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        if not size and not in_batch:
            raise ValueError("an empty pool: draw size > 0 items, or use in_batch negatives")
        counts = item_counts.double()
        if in_batch and not counts.sum() > 0:
            raise ValueError("in-batch negatives need item counts with at least one positive")
        weights = counts.pow(alpha)
        if size and not weights.sum() > 0:
            raise ValueError("item counts give every item zero probability of being drawn")
        self.size, self.alpha, self.in_batch = size, alpha, in_batch
        self._q = (weights / weights.sum()).float() if size else None
        self._f = (counts / counts.sum()).float() if in_batch else None

    def log_q(self, items: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Log of the expected copies of each of `items` (any shape) in a batch's pool."""
        expected = torch.zeros(items.shape, device=items.device)
        if self._q is not None:
            expected = expected + self.size * self._q[items]
        if self._f is not None:
            expected = expected + batch_size * self._f[items]
        return expected.log()

    def sample(
        self, pos_items: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) the batch's positives -> (P,) pool items and their (P,) log_q."""
        parts = []
        if self._q is not None:
            if self.alpha == 0:
                drawn = torch.randint(
                    len(self._q), (self.size,), generator=generator, device=self._q.device
                )
            else:
                drawn = torch.multinomial(self._q, self.size, replacement=True, generator=generator)
            parts.append(drawn)
        if self.in_batch:
            parts.append(pos_items)
        items = torch.cat(parts) if len(parts) > 1 else parts[0]
        return items, self.log_q(items, len(pos_items))
