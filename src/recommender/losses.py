"""Training objectives as pure functions of scores and targets, and the pool of shared negatives
that sampled softmax scores every row against.

Every loss returns a scalar: the mean of per-row losses or, with `weights` ((B,) row weights,
e.g. confidences), sum(w * l) / sum(w), so weights change the balance between rows and not the
step size. Logits are unnormalised scores; no sigmoid or softmax is applied by a model.

Example:
    >>> logits = torch.tensor([[2.0, 0.0, -1.0]])
    >>> round(float(softmax(logits, torch.tensor([0]))), 4)
    0.1698
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(per_row: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(B,) losses -> their mean, or their `weights`-weighted mean."""
    if weights is None:
        return per_row.mean()
    return (weights * per_row).sum() / weights.sum()


def bce(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy of (B,) pair logits against (B,) 0/1 labels (the NCF objective).

    l = -(y log σ(s) + (1 - y) log(1 - σ(s))), computed from the logits for stability.
    """
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    return F.binary_cross_entropy_with_logits(logits, labels, weight=weights, reduction="sum") / (
        weights.sum()
    )


def softmax(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy over the whole catalog: (B, n_items) logits, (B,) target item indices.

    l = -s_t + log Σ_j exp(s_j), every other item a negative.
    """
    if weights is None:
        return F.cross_entropy(logits, targets)
    return _mean(F.cross_entropy(logits, targets, reduction="none"), weights)


def sampled_softmax(
    pos_logits: torch.Tensor,
    neg_logits: torch.Tensor,
    *,
    log_q_pos: torch.Tensor | None = None,
    log_q_neg: torch.Tensor | None = None,
    pos_items: torch.Tensor | None = None,
    neg_items: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax of each positive against sampled negatives, with the logQ correction.

    Args:
        pos_logits: (B,) logits of each row's positive.
        neg_logits: (B, P) logits of the negatives: a pool shared by every row, or each row's own.
        log_q_pos: (B,) log of how often each positive is expected in the pool
            (PoolSampler.log_q); None leaves the positives uncorrected. Yi et al. correct the
            positive, itself a draw of an in-batch pool; with a pool drawn apart from the
            positives, leaving it uncorrected tracks the full softmax more closely (a rare
            positive's expected count is below 1, so correcting it damps its gradient).
        log_q_neg: (P,) for a shared pool or (B, P): the same for the negatives.
        pos_items, neg_items: (B,) and (P,) or (B, P) item indices; given both, a negative equal
            to its row's positive (an accidental hit, certain for in-batch negatives) is dropped.
    Returns:
        mean over rows of l = -s'_+ + log(exp(s'_+) + Σ_j exp(s'_j)), s' = s - log q.

    Subtracting log q (Yi et al., RecSys 2019) undoes the sampling's preference: a popular item
    is drawn often, so each copy counts for less. Without it, sampling by popularity would push
    popular items down far harder than the full softmax does.
    """
    if log_q_pos is not None:
        pos_logits = pos_logits - log_q_pos
    if log_q_neg is not None:
        neg_logits = neg_logits - log_q_neg
    if pos_items is not None and neg_items is not None:
        neg_logits = neg_logits.masked_fill(neg_items == pos_items[:, None], float("-inf"))
    logits = torch.cat([pos_logits[:, None], neg_logits], 1)  # (B, 1 + P)
    return _mean(torch.logsumexp(logits, 1) - pos_logits, weights)


def bpr(
    pos_logits: torch.Tensor, neg_logits: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Bayesian personalised ranking (Rendle et al. 2009): (B,) positive and (B, N) negative
    logits of the same rows.

    l = mean_j -log σ(s_+ - s_j), averaged over the N negatives of a row.
    """
    return _mean(F.softplus(neg_logits - pos_logits[:, None]).mean(1), weights)


def ccl(
    pos_cos: torch.Tensor,
    neg_cos: torch.Tensor,
    margin: float,
    neg_weight: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cosine contrastive loss of SimpleX (Mao et al., CIKM 2021): (B,) positive and (B, N)
    negative cosine similarities.

    l = (1 - cos_+) + w / N Σ_j max(0, cos_j - m). Negatives already below the margin `m` cost
    nothing, so the many easy ones do not drown the few hard ones; `w` balances the two terms.
    """
    neg = F.relu(neg_cos - margin).mean(1)
    return _mean(1 - pos_cos + neg_weight * neg, weights)


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
