"""Training objectives as pure functions of scores and targets (the pool of shared negatives
that sampled softmax scores every row against is drawn by data/sampling.PoolSampler).

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

# Which models each loss can train, and why not the others (the models missing from a list).
# Models fitted in closed form, not by descending a loss: train.loss does not apply to them.
CLOSED_FORM = ("popularity", "graphfilter")

# bce and bpr score pairs, which every model but sasrec does; sampled_softmax trains them all.
LOSS_MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "softmax": (
        ("mf", "gmf", "lightgcn", "sasrec"),
        "softmax scores the whole catalog at every step, one matmul for the dot-product models "
        "(mf, gmf, lightgcn) but a pass of the MLP tower per item for {name}; use "
        "train.loss=sampled_softmax (a pool of sampled items) or bce for it",
    ),
    "ccl": (
        ("mf", "lightgcn"),
        "ccl trains the cosine of a user vector and an item vector (SimpleX), and mf and "
        "lightgcn score by that cosine after it; {name} scores a pair through its own output "
        "layer, which has no such cosine; use train.loss=bpr or sampled_softmax for it",
    ),
}


# What trains sasrec: a loss over each position's next item.
SEQUENCE_LOSSES = ("softmax", "sampled_softmax", "gbce")


def loss_refusal(loss: str, name: str) -> str | None:
    """Why `loss` cannot train model `name`, or None when it can. sasrec's targets are the
    next items of sequences: it trains with softmax, sampled_softmax or gbce, and gbce is for
    it alone."""
    if name in CLOSED_FORM:
        return None
    if (name == "sasrec" and loss not in SEQUENCE_LOSSES) or (name != "sasrec" and loss == "gbce"):
        return (
            "sasrec trains with softmax (the whole catalog), sampled_softmax or gbce (sampled "
            "negatives), and gbce is for sasrec only"
        )
    fits, reason = LOSS_MODELS.get(loss, ((), ""))
    return reason.format(name=name) if reason and name not in fits else None


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


def embedding_l2(
    users: torch.Tensor, items: torch.Tensor, negatives: torch.Tensor | None = None
) -> torch.Tensor:
    """LightGCN's penalty on the layer-0 embeddings of a step (He et al. 2020): (B, d) users,
    (B, d) items (the positives, or BCE's pairs), and (B, N, d) each row's negatives or (P, d)
    a pool shared by the rows; None where the loss has none apart (bce, the full softmax).

    l = ½ mean_b (|e_u|² + |e_i|² + mean_j |e_j|²): for BPR's one negative the paper's term;
    the mean over negatives keeps its scale whatever their number.
    """
    per_row = users.float().pow(2).sum(-1) + items.float().pow(2).sum(-1)  # (B,)
    if negatives is not None and negatives.shape[-2]:
        per_row = per_row + negatives.float().pow(2).sum(-1).mean(-1)  # (B,) or a pool's scalar
    return 0.5 * per_row.mean()
