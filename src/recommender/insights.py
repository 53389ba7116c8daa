"""Global insights into a trained model: what drives its scores and whom it serves well.

Pure computations over a model and index data, returning plain dataclasses and arrays (no
plotting, no files; `report/` draws and writes them):

- `branch_share`: NeuMF's fused output layer is linear over [GMF vector ; MLP last hidden], so
  every logit splits exactly into a GMF part, an MLP part and the bias. How large each part is,
  and how the top-k changes when one branch is dropped, says which branch does the ranking.
- `item_map`: a 2D PCA projection of the item vectors the model ranks with (its
  `item_representation`), with each item's primary genre and popularity, for a scatter plot.
- `popularity_bias`: how popular the recommended items are next to the catalog and the
  interactions (short-head share, popularity deciles), the Gini of recommendation counts and
  catalog coverage of the top-k lists.
- `activity_buckets` / `metrics_by_activity`: FULL-protocol metrics for cold, regular and heavy
  test users, split by the length of their training history.

Example:
    >>> tops = top_k_items(model, data.train_full, users, k=10)        # doctest: +SKIP
    >>> bias = popularity_bias(tops, data.train_full.item_counts())    # doctest: +SKIP
    >>> bias.head_share["top 10%"], bias.gini, bias.coverage           # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from recommender.data.interactions import Interactions
from recommender.evaluate import PAD, evaluate_full, exact_top_k
from recommender.models import NeuMF, Popularity, RecModel
from recommender.models.base import SCORE_BUDGET
from recommender.utils import RecommenderError

BUCKETS = ("cold", "regular", "heavy")
HEADS = (0.1, 0.2)  # the "short head": the most popular 10% and 20% of the catalog


def _device(model: RecModel) -> torch.device:
    """Where the model's tensors live (CPU for a model with none)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _user_chunks(model: RecModel, users: np.ndarray, batch_users: int) -> list[np.ndarray]:
    """Slices of `users` small enough that (B, n_items, pair_width) stays within budget."""
    rows = max(1, min(batch_users, SCORE_BUDGET // (model.n_items * model.pair_width)))
    return [users[i : i + rows] for i in range(0, len(users), rows)]


@torch.no_grad()
def top_k_items(
    model: RecModel,
    history: Interactions,
    users: np.ndarray,
    k: int,
    *,
    batch_users: int = 512,
) -> np.ndarray:
    """(U,) user indices -> (U, k) item indices of each user's top-k, history items excluded.

    Slots beyond the items a user has not seen hold -1.
    """
    model.eval()
    device, cache = _device(model), model.item_cache()
    tops = []
    for chunk in _user_chunks(model, np.asarray(users, dtype=np.int64), batch_users):
        scores = model.score_all(torch.from_numpy(chunk).to(device), cache).float()  # (B, n)
        tops.append(exact_top_k(scores, k, history.seen_mask(chunk))[1].cpu())
    return torch.cat(tops).numpy() if tops else np.zeros((0, k), dtype=np.int64)


# -- GMF versus MLP in NeuMF -----------------------------------------------------------------


@torch.no_grad()
def neumf_pair_parts(
    model: NeuMF, user_idx: torch.Tensor, item_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,), (B,) -> GMF part, MLP part, bias, each (B,); they sum to `model(user_idx, item_idx)`.

    The output layer is h · [φ_GMF ; φ_MLP] + b, so the GMF part is h_GMF · φ_GMF and the MLP part
    h_MLP · φ_MLP: an exact split, not an approximation.
    """
    weight = model.out.weight[0]
    phi = model.branches(user_idx, item_idx)  # (B, dim + layers[-1])
    gmf = phi[:, : model.dim] @ weight[: model.dim]
    mlp = phi[:, model.dim :] @ weight[model.dim :]
    return gmf, mlp, model.out.bias.expand_as(gmf)


@torch.no_grad()
def neumf_item_parts(
    model: NeuMF, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) users against every item -> GMF part and MLP part, each (B, n_items).

    `cache` is `model.item_cache()`; the parts are the ones `score_all` adds up.
    """
    gmf, mlp = model.branch_scores(user_idx, cache)
    return gmf.float(), mlp.float()


def _gmf_share(gmf: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """|GMF| / (|GMF| + |MLP|) per pair; NaN where both parts are exactly zero (no share)."""
    total = gmf.abs() + mlp.abs()
    return torch.where(total > 0, gmf.abs() / total.clamp(min=1e-30), torch.nan)


def _mean(values: torch.Tensor) -> float | None:
    """Mean over the defined (non-NaN) values; None when there are none."""
    kept = values[~torch.isnan(values)]
    return float(kept.mean()) if len(kept) else None


def _masked_variance(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, n) values, (B, n) bool mask -> (B,) variance of each row's masked-in values."""
    n = mask.sum(1).clamp(min=1)
    mean = torch.where(mask, values, 0).sum(1, keepdim=True) / n[:, None]
    return torch.where(mask, (values - mean) ** 2, 0).sum(1) / n


def _overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, k), (B, k) item indices (-1 padded) -> (B,) share of b's valid items also in a."""
    same = (a[:, :, None] == b[:, None, :]) & (b[:, None, :] >= 0)
    return same.any(1).sum(1) / (b >= 0).sum(1).clamp(min=1)


@dataclass(frozen=True)
class BranchShare:
    """How much of NeuMF's score comes from the GMF branch and how much from the MLP branch.

    Shares are GMF's: |GMF part| / (|GMF part| + |MLP part|), averaged over the pairs where
    either part is non-zero; the MLP's share is one minus it. `spread_gmf` compares how much
    each part varies across one user's candidate items (variance over the unseen items,
    averaged over users): a part can be large yet nearly constant per user, and then it shifts
    every score without reordering any.
    `overlap_*_only` is the share of the full top-k that the top-k from one branch alone
    recovers (1: that branch ranks like the whole model).
    """

    applicable: bool
    note: str
    k: int = 0
    n_users: int = 0
    top_gmf: float | None = None
    random_gmf: float | None = None
    spread_gmf: float | None = None
    overlap_gmf_only: float | None = None
    overlap_mlp_only: float | None = None
    mean_gmf_part: float | None = None  # signed means over the top-k pairs, in logits
    mean_mlp_part: float | None = None
    bias: float | None = None
    top_shares: np.ndarray | None = None  # (n_pairs,) per (user, top-k item) pair
    random_shares: np.ndarray | None = None  # (n_pairs,) per random (user, item) pair

    def summary(self) -> dict[str, object]:
        """The scalar fields, for JSON."""
        return {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}


@torch.no_grad()
def branch_share(
    model: RecModel,
    history: Interactions,
    users: np.ndarray,
    *,
    k: int = 10,
    random_per_user: int = 10,
    seed: int = 0,
    batch_users: int = 512,
) -> BranchShare:
    """GMF versus MLP over (user, top-k item) pairs and random pairs of `users` (indices).

    Random pairs draw `random_per_user` items per user uniformly from the whole catalog, the
    reference for what the branches do on an arbitrary item rather than a recommended one.
    Models other than NeuMF have one branch; the result then says so and holds no numbers.
    """
    if not isinstance(model, NeuMF):
        return BranchShare(
            False,
            f"not applicable: the {type(model).__name__} model has a single scoring branch; "
            "the GMF / MLP decomposition exists for NeuMF only",
        )
    model.eval()
    users = np.asarray(users, dtype=np.int64)
    if not len(users):
        raise RecommenderError("branch_share needs at least one user")
    gen = torch.Generator().manual_seed(seed)
    device, cache = _device(model), model.item_cache()
    top_shares, random_shares, spreads, over_g, over_m, parts = [], [], [], [], [], []
    for chunk in _user_chunks(model, users, batch_users):
        u = torch.from_numpy(chunk).to(device)
        gmf, mlp = neumf_item_parts(model, u, cache)  # (B, n_items) each
        full = gmf + mlp
        _, top_full = exact_top_k(full, k, history.seen_mask(chunk))  # masks `full`
        unseen = torch.isfinite(full)
        over_g.append(_overlap(exact_top_k(torch.where(unseen, gmf, -PAD), k)[1], top_full))
        over_m.append(_overlap(exact_top_k(torch.where(unseen, mlp, -PAD), k)[1], top_full))
        valid = top_full >= 0
        g_top = gmf.gather(1, top_full.clamp(min=0))[valid]
        m_top = mlp.gather(1, top_full.clamp(min=0))[valid]
        top_shares.append(_gmf_share(g_top, m_top))
        parts.append(torch.stack([g_top, m_top], 1))
        rand = torch.randint(model.n_items, (len(chunk), random_per_user), generator=gen)
        rand = rand.to(device)
        random_shares.append(_gmf_share(gmf.gather(1, rand), mlp.gather(1, rand)).ravel())
        spreads.append(_gmf_share(_masked_variance(gmf, unseen), _masked_variance(mlp, unseen)))
    tops, rands = torch.cat(top_shares).cpu(), torch.cat(random_shares).cpu()
    mean_parts = torch.cat(parts).mean(0)  # (2,): GMF, MLP
    return BranchShare(
        True,
        "logit = GMF part + MLP part + bias, split exactly at NeuMF's linear output layer",
        k,
        len(users),
        _mean(tops),
        _mean(rands),
        _mean(torch.cat(spreads)),
        float(torch.cat(over_g).mean()),
        float(torch.cat(over_m).mean()),
        float(mean_parts[0]),
        float(mean_parts[1]),
        float(model.out.bias),
        tops[~torch.isnan(tops)].numpy(),
        rands[~torch.isnan(rands)].numpy(),
    )


# -- item map --------------------------------------------------------------------------------


def primary_genres(item_genres: Sequence[str | None] | None) -> np.ndarray | None:
    """Each item's first listed genre ('|'-separated), "" where it has none; None without data."""
    if item_genres is None:
        return None
    first = pd.Series(list(item_genres), dtype=object).fillna("").astype(str).str.split("|").str[0]
    return first.to_numpy(dtype=object)


@dataclass(frozen=True)
class ItemMap:
    """Items projected onto the first two principal axes of the model's item vectors."""

    coords: np.ndarray  # (n_items, 2)
    explained: tuple[float, float]  # share of the total variance on each axis
    popularity: np.ndarray  # (n_items,) training interaction counts
    genres: np.ndarray | None  # (n_items,) primary genre, "" where none; None without data
    source: str  # what was projected


@torch.no_grad()
def item_map(
    model: RecModel,
    item_counts: np.ndarray,
    item_genres: Sequence[str | None] | None = None,
) -> ItemMap | None:
    """PCA of the unit-normalised `item_representation()`; None for a model without one.

    The representation is the item side the model ranks with and that `Recommender` measures
    similarity in (for NeuMF both branches, each normalised), so nearby points are items the
    model treats alike. Each axis is signed so that popular items lie on its positive side,
    which makes the picture reproducible and its orientation readable.
    """
    rep = model.item_representation()
    if rep is None:
        return None
    x = F.normalize(rep.detach().float().cpu(), dim=1)
    x = x - x.mean(0)
    u, s, _ = torch.linalg.svd(x, full_matrices=False)
    coords = (u[:, :2] * s[:2]).numpy()
    if coords.shape[1] < 2:  # a one-dimensional representation
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    counts = np.asarray(item_counts, dtype=np.float64)
    pop = np.log1p(counts) - np.log1p(counts).mean()
    coords = coords * np.where(pop @ coords < 0, -1.0, 1.0)
    energy = (s**2).numpy()
    explained = energy[:2] / max(float(energy.sum()), 1e-30)
    explained = np.pad(explained, (0, 2 - len(explained)))
    genres = primary_genres(item_genres)
    if genres is not None and len(genres) != model.n_items:
        raise RecommenderError(f"{len(genres)} item genres for {model.n_items} items")
    return ItemMap(
        coords.astype(np.float32),
        (float(explained[0]), float(explained[1])),
        np.asarray(item_counts),
        genres,
        f"{type(model).__name__}.item_representation(), rows scaled to unit length",
    )


# -- popularity bias and coverage ------------------------------------------------------------


def gini(counts: np.ndarray) -> float:
    """Gini coefficient of non-negative counts: 0 when all are equal, (n-1)/n when one holds all."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    ranks = np.arange(1, n + 1)
    return float(2 * (ranks * x).sum() / (n * total) - (n + 1) / n)


def popularity_rank(item_counts: np.ndarray) -> np.ndarray:
    """(n_items,) rank of each item by training count, 0 = most popular (ties by index)."""
    order = np.argsort(-np.asarray(item_counts), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def popularity_percentile(item_counts: np.ndarray) -> np.ndarray:
    """(n_items,) percent of the catalog less popular than each item (ties count half)."""
    counts = np.asarray(item_counts)
    ordered = np.sort(counts)
    below = np.searchsorted(ordered, counts, "left")
    ties = np.searchsorted(ordered, counts, "right") - below
    return 100.0 * (below + ties / 2) / max(len(counts), 1)


def _quantiles(values: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    """p10 / p25 / p50 / p75 / p90 of values, optionally weighted by integer counts."""
    qs = (10, 25, 50, 75, 90)
    if weights is not None:
        values = np.repeat(values, weights)
    if not len(values):
        return {f"p{q}": math.nan for q in qs}
    return {f"p{q}": float(v) for q, v in zip(qs, np.percentile(values, qs), strict=True)}


def _decile_share(rank: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(10,) share of `weights` per catalog popularity decile, the most popular decile first."""
    decile = rank * 10 // max(len(rank), 1)
    share = np.bincount(decile, weights=weights, minlength=10)[:10]
    return share / max(float(share.sum()), 1e-30)


@dataclass(frozen=True)
class PopularityBias:
    """How the popularity of recommended items compares with the catalog and the interactions.

    Popularity is an item's number of training interactions. The "interactions" view weighs
    each item by its count (what a random interaction's item looks like), the "catalog" view
    weighs every item once: a recommender that mirrors its users lands near the former.
    """

    k: int
    n_users: int
    n_recommendations: int
    mean_popularity: float  # mean count of a recommended item
    mean_percentile: float  # mean catalog popularity percentile (0-100) of a recommended item
    catalog_mean_popularity: float
    interaction_mean_popularity: float
    quantiles: dict[str, dict[str, float]]  # recommended / catalog / interactions -> p10..p90
    head_share: dict[str, float]  # "top 10%" -> share of recommendations from that head
    interaction_head_share: dict[str, float]  # the same for the interactions themselves
    gini: float  # of recommendation counts over the catalog (0: spread evenly)
    interaction_gini: float  # of interaction counts over the catalog, for reference
    coverage: float  # share of the catalog in at least one top-k list
    decile_share: np.ndarray  # (10,) share of recommendations per popularity decile
    interaction_decile_share: np.ndarray  # (10,) share of interactions per decile
    rec_counts: np.ndarray  # (n_items,) times each item was recommended

    def summary(self) -> dict[str, object]:
        """The scalar fields and the decile shares (as lists), for JSON."""
        out = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        for name in ("decile_share", "interaction_decile_share"):
            out[name] = [round(float(x), 6) for x in getattr(self, name)]
        return out


def popularity_bias(
    top_items: np.ndarray, item_counts: np.ndarray, heads: Sequence[float] = HEADS
) -> PopularityBias:
    """Popularity statistics of (U, k) top-k lists (item indices, -1 padded).

    `item_counts` are the training counts of every item (n_items,), which define popularity,
    the short head (the `heads` fractions of the catalog with the highest counts) and deciles.
    """
    counts = np.asarray(item_counts, dtype=np.int64)
    n_items = len(counts)
    if top_items.ndim != 2:
        raise RecommenderError(f"top_items must be (users, k), got shape {top_items.shape}")
    recs = top_items[top_items >= 0]
    if len(recs) and recs.max() >= n_items:
        raise RecommenderError(f"recommended item index {recs.max()} outside {n_items} items")
    rec_counts = np.bincount(recs, minlength=n_items)
    rank = popularity_rank(counts)
    head_share, interaction_head_share = {}, {}
    for frac in heads:
        in_head = rank < math.ceil(frac * n_items)
        label = f"top {frac:.0%}"
        head_share[label] = float(in_head[recs].mean()) if len(recs) else math.nan
        interaction_head_share[label] = float(counts[in_head].sum() / max(counts.sum(), 1))
    rec_pop = counts[recs]
    percentile = popularity_percentile(counts)[recs]
    return PopularityBias(
        k=top_items.shape[1],
        n_users=len(top_items),
        n_recommendations=len(recs),
        mean_popularity=float(rec_pop.mean()) if len(recs) else math.nan,
        mean_percentile=float(percentile.mean()) if len(recs) else math.nan,
        catalog_mean_popularity=float(counts.mean()),
        interaction_mean_popularity=float((counts**2).sum() / max(counts.sum(), 1)),
        quantiles={
            "recommended": _quantiles(rec_pop),
            "catalog": _quantiles(counts),
            "interactions": _quantiles(counts, counts),
        },
        head_share=head_share,
        interaction_head_share=interaction_head_share,
        gini=gini(rec_counts),
        interaction_gini=gini(counts),
        coverage=float((rec_counts > 0).mean()),
        decile_share=_decile_share(rank, rec_counts),
        interaction_decile_share=_decile_share(rank, counts),
        rec_counts=rec_counts,
    )


# -- metrics by user activity ----------------------------------------------------------------


@dataclass(frozen=True)
class ActivityBuckets:
    """Cold: at most `cold_max` training interactions; heavy: at least `heavy_min`; else regular."""

    cold_max: int
    heavy_min: int
    rule: str  # how the thresholds were chosen

    def __post_init__(self) -> None:
        if self.heavy_min <= self.cold_max:
            raise RecommenderError(
                f"activity buckets: heavy_min ({self.heavy_min}) must exceed "
                f"cold_max ({self.cold_max})"
            )

    def assign(self, history_counts: np.ndarray) -> np.ndarray:
        """(U,) history lengths -> (U,) bucket index into BUCKETS (0 cold, 1 regular, 2 heavy)."""
        counts = np.asarray(history_counts)
        return (counts > self.cold_max).astype(np.int64) + (counts >= self.heavy_min)

    def ranges(self) -> dict[str, str]:
        """Bucket name -> its range of training interactions, for labels."""
        lo, hi = self.cold_max + 1, self.heavy_min - 1
        regular = "none" if lo > hi else f"{lo}" if lo == hi else f"{lo}-{hi}"
        return {"cold": f"<= {self.cold_max}", "regular": regular, "heavy": f">= {self.heavy_min}"}


def activity_buckets(
    history_counts: np.ndarray,
    *,
    quantiles: tuple[float, float] = (0.2, 0.8),
    thresholds: tuple[int, int] | None = None,
) -> ActivityBuckets:
    """Thresholds from explicit (cold_max, heavy_min), or from quantiles of the history lengths.

    With quantiles (q_cold, q_heavy), cold users have at most the q_cold quantile of training
    interactions and heavy users at least the q_heavy quantile (computed over the users given,
    e.g. the test users), so about 20% / 60% / 20% of them by default, less evenly where many
    users share a length. The thresholds are whole counts and stated in `rule`.
    """
    if thresholds is not None:
        cold_max, heavy_min = (int(t) for t in thresholds)
        return ActivityBuckets(cold_max, heavy_min, "fixed thresholds")
    q_cold, q_heavy = quantiles
    if not 0 <= q_cold < q_heavy <= 1:
        raise RecommenderError(
            f"activity quantiles must satisfy 0 <= cold < heavy <= 1, got {quantiles}"
        )
    counts = np.asarray(history_counts)
    if not len(counts):
        raise RecommenderError("activity buckets need at least one user")
    cold_max = int(np.quantile(counts, q_cold, method="lower"))
    heavy_min = max(int(np.quantile(counts, q_heavy, method="higher")), cold_max + 1)
    return ActivityBuckets(
        cold_max,
        heavy_min,
        f"cold: at most the {q_cold:.0%} quantile of training interactions over test users; "
        f"heavy: at least the {q_heavy:.0%} quantile",
    )


@dataclass(frozen=True)
class BucketMetrics:
    """FULL-protocol test metrics of several models for one activity bucket."""

    name: str
    interactions: str  # the bucket's range of training interactions
    n_users: int
    metrics: dict[str, dict[str, float]]  # model name -> metric -> mean over the bucket's users


def metrics_by_activity(
    models: dict[str, RecModel],
    history: Interactions,
    targets: Interactions,
    ks: list[int],
    buckets: ActivityBuckets | None = None,
    *,
    fallback: Popularity | None = None,
    batch_users: int = 512,
) -> tuple[ActivityBuckets, list[BucketMetrics]]:
    """FULL metrics per activity bucket of the test users (`targets`), for every model.

    Buckets default to `activity_buckets` over the test users' history lengths. An empty bucket
    is listed with n_users 0 and no metrics.
    """
    test_users = np.unique(targets.user_idx)
    history_counts = history.user_counts()
    if buckets is None:
        buckets = activity_buckets(history_counts[test_users])
    row_bucket = buckets.assign(history_counts[targets.user_idx])
    ranges = buckets.ranges()
    out = []
    for index, name in enumerate(BUCKETS):
        rows = row_bucket == index
        part = targets.subset(rows)
        n_users = len(np.unique(part.user_idx))
        metrics = {}
        if n_users:
            for model_name, model in models.items():
                result = evaluate_full(
                    model,
                    history,
                    part,
                    ks,
                    batch_users=batch_users,
                    fallback=fallback,
                    device=_device(model),
                )
                metrics[model_name] = result.metrics
        out.append(BucketMetrics(name, ranges[name], n_users, metrics))
    return buckets, out
