"""A closed-form graph filter: LightGCN's smoothing taken to its limit, fitted without training.

Shen et al. (GF-CF, CIKM 2021) showed that what LightGCN learns is close to a fixed low-pass
filter on the item-item graph, and that the filter itself, applied to a user's history, ranks
as well. With R̃ = D_u^-½ R D_i^-½ the normalised training matrix and P = R̃ᵀR̃ the item graph
it induces (eigenvalues in [0, 1]), a user's history row r (1 per item interacted with) scores
the catalog by

    s = r (P + a D_i^-½ V Vᵀ D_i^½) (I - h P) ⊙ d_i^γ

- r P, the linear filter: items that co-occur with the history, each normalised by degree;
- D_i^-½ V Vᵀ D_i^½, the ideal low-pass filter: V holds the top `rank` right singular vectors
  of R̃, so only the smooth, community-level directions of the history pass (weight a);
- (I - h P), one sharpening step (the inverse diffusion of BSPM, Choi et al., SIGIR 2023):
  it takes back part of the smoothing, so items every neighbourhood shares give way to items
  specific to this user's;
- d_i^γ, the item's training degree to a power: a popularity correction (γ > 0 favours
  popular items).

The filter is linear in the history, so a new user is scored exactly from the items they gave
and an explanation is an exact sum over history items (explain/linear.py). P is never formed
(41k² floats on Gowalla): x P = (x R̃ᵀ) R̃, two sparse products with the stored CSR matrices.
Fitting is one truncated SVD (torch.svd_lowrank, randomised, a few seconds on Gowalla).

With `als_weight` > 0 a second, learned term joins the filter: implicit-feedback ALS
(models/ials.py), whose user is the exact solve of their history against the fitted item
factors. The filter smooths over co-occurrence and ranks the top of a list well; ALS's dense
low-rank reconstruction orders the rest of the catalog better (a random item against a held-out
one: MovieLens-1M's sampled protocol). Their sum beats the filter alone on the validation splits
of MovieLens-1M, Gowalla and Last.fm, and ALS alone on the first two (docs/BENCHMARKS.md). The
two scores live on different scales, so the ALS term is rescaled at fit time to the filter's
spread (the mean over users of the standard deviation of their scores) and then weighed by
`als_weight`. Beside ALS the filter is floored at zero: below zero it holds no evidence for an
item, only the sharpening's push-down of items the user's neighbourhood touched, which would
otherwise rank them under random items nobody near the user touched; floored, ALS alone orders
them all. On the validation carves this lifted MovieLens-1M's four columns (sampled HR@10
0.8260 -> 0.8310) and left Gowalla's and Last.fm's lists the same or better (their tops are
positive scores). A user is still a function of their history alone, so new users and
explanations stay exact: an explanation is the filter's shares (none for an item floored)
plus ALS's (1 + alpha) y_iᵀ A⁻¹ y_h, one per history item.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recommender.models.base import SCORE_BUDGET, RecModel, resize_buffers
from recommender.models.ials import UserSystems, fit_item_factors, item_gram
from recommender.models.lightgcn import check_edges, normalized_adjacency

# Catalogs up to this many items keep P as a dense (n_items, n_items) matrix (256 MiB at the
# bound): one GEMM per score instead of two sparse products; MovieLens-1M's 6,040 users score
# in 2.2 s instead of 6.0 s on one thread.
DENSE_ITEMS = 8192

# Extra random directions and power iterations of the randomised SVD. With them GF-CF's own
# settings rank Gowalla within 0.002 of an exact (Lanczos) SVD: Recall@20 / NDCG@20 0.1865 /
# 0.1533 against 0.1849 / 0.1518.
SVD_OVERSAMPLE = 32
SVD_ITERATIONS = 6

# Users whose scores set the ALS term's scale at fit time (evenly spread over the user indices).
SCALE_USERS = 1024


class GraphFilter(RecModel):
    """logit(u, i) = the filtered history of u at item i, plus ALS's score with als_weight
    (module doc); fitted by `fit`.

    Example:
        >>> model = GraphFilter(3, 4, rank=2)
        >>> model.set_graph(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 3]))
        >>> model.fit().score_all(torch.tensor([0, 2])).shape
        torch.Size([2, 4])
    """

    edges: torch.Tensor  # (2, E) int64: user and item index of every training pair
    basis: torch.Tensor  # (n_items, k): top right singular vectors of R̃
    spectrum: torch.Tensor  # (k,): their singular values
    item_factors: torch.Tensor  # (n_items, factors): ALS's item side; (n_items, 0) without it
    als_scale: torch.Tensor  # (): als_weight x the filter's spread / ALS's
    graph = True

    def __init__(
        self,
        n_users: int,
        n_items: int,
        rank: int = 256,
        ideal_weight: float = 0.3,
        sharpen: float = 1.0,
        degree_power: float = 0.1,
        als_weight: float = 0.0,
        factors: int = 64,
        als_reg: float = 50.0,
        als_alpha: float = 10.0,
        als_sweeps: int = 15,
    ) -> None:
        super().__init__()
        if rank < 0:
            raise ValueError(f"GraphFilter needs rank >= 0, got {rank}")
        self.n_users, self.n_items, self.rank = n_users, n_items, rank
        self.ideal_weight, self.sharpen, self.degree_power = ideal_weight, sharpen, degree_power
        self.als_weight, self.factors, self.als_sweeps = als_weight, factors, als_sweeps
        self.als_reg, self.als_alpha = als_reg, als_alpha
        self.register_buffer("edges", torch.zeros(2, 0, dtype=torch.int64))
        self.register_buffer("basis", torch.zeros(n_items, 0))
        self.register_buffer("spectrum", torch.zeros(0))
        self.register_buffer("item_factors", torch.zeros(n_items, 0))
        self.register_buffer("als_scale", torch.zeros(()))
        self._derived: dict[str, torch.Tensor] | None = None
        self._gram: tuple[torch.Tensor, torch.Tensor] | None = None  # (item_factors, its Gram)

    def set_graph(self, users: np.ndarray | torch.Tensor, items: np.ndarray | torch.Tensor) -> None:
        """Filter over these (E,) distinct training pairs; `fit` then computes the basis."""
        self.edges = check_edges(users, items, self.n_users, self.n_items, self.edges.device)
        self._derived = None

    @torch.no_grad()
    def fit(self) -> GraphFilter:
        """The ideal filter's basis (the top right singular vectors of R̃) and, with
        als_weight > 0, ALS's item factors and their scale (module doc)."""
        r = self._graph()["r"]
        k = min(self.rank, min(self.n_users, self.n_items) - 1)
        device = self.edges.device
        self.item_factors = torch.zeros(self.n_items, 0, device=device)
        self.als_scale = torch.zeros((), device=device)
        if k < 1 or not self.edges.shape[1]:
            self.basis = torch.zeros(self.n_items, 0, device=device)
            self.spectrum = torch.zeros(0, device=device)
        else:
            q = min(k + SVD_OVERSAMPLE, min(self.n_users, self.n_items))
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(0)  # the same graph always gives the same basis
            try:
                _, s, v = torch.svd_lowrank(r.to_sparse_coo(), q=q, niter=SVD_ITERATIONS)
            finally:
                torch.random.set_rng_state(generator_state)
            self.basis, self.spectrum = v[:, :k].contiguous(), s[:k].contiguous()
        if self.als_weight and self.edges.shape[1]:
            users, items = self.edges
            self.item_factors = fit_item_factors(
                users,
                items,
                self.n_users,
                self.n_items,
                self.factors,
                self.als_reg,
                self.als_alpha,
                self.als_sweeps,
            )
            some = torch.linspace(0, self.n_users - 1, min(SCALE_USERS, self.n_users))
            rows = self.history_rows(some.round().long().to(device))
            spread = self.filter(rows).std(1).mean() / self._als(rows).std(1).mean()
            self.als_scale = self.als_weight * torch.nan_to_num(spread, nan=0.0, posinf=0.0)
        return self

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # a run written before the ALS term has no ALS buffers: it is the filter alone
        state_dict.setdefault(prefix + "item_factors", self.item_factors.new_zeros(self.n_items, 0))
        state_dict.setdefault(prefix + "als_scale", self.als_scale.new_zeros(()))
        resize_buffers(self, state_dict, prefix, ("edges", "basis", "spectrum", "item_factors"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._derived = None
        self._gram = None  # loading copies into item_factors in place

    def __getstate__(self) -> dict[str, Any]:
        # CSR tensors cannot be deep-copied or pickled; a copy rebuilds them from `edges`.
        return {**self.__dict__, "_derived": None, "_gram": None}

    def _graph(self) -> dict[str, Any]:
        """R̃ and R̃ᵀ (CSR), the binary R's row pointers and columns, and the item degrees'
        powers; built once per graph and device."""
        if self._derived is None or self._derived["r"].device != self.edges.device:
            users, items = self.edges
            r, r_t = normalized_adjacency(users, items, self.n_users, self.n_items)
            degree = torch.bincount(items, minlength=self.n_items).float()
            self._derived = {
                "r": r,
                "r_t": r_t,
                "crow": r.crow_indices(),
                "col": r.col_indices(),
                "inv_sqrt": torch.where(degree > 0, degree.rsqrt(), 0.0),
                "sqrt": degree.sqrt(),
                "scale": degree.clamp(min=1) ** self.degree_power,
            }
        return self._derived

    def _dense_p(self) -> torch.Tensor | None:
        """P itself for a catalog of at most DENSE_ITEMS items, else None; built on first use
        by scoring, never by `fit`, whose SVD reads R̃ alone."""
        if self.n_items > DENSE_ITEMS:
            return None
        g = self._graph()
        if "p" not in g:
            g["p"] = (g["r_t"] @ g["r"]).to_dense()  # sparse product: no dense R
        return g["p"]

    def smooth(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_items) -> x P, through R̃ and R̃ᵀ (P itself is never formed)."""
        p = self._dense_p()
        if p is not None:
            return x @ p
        g = self._graph()
        return (g["r_t"] @ (g["r"] @ x.T.contiguous())).T

    def history_rows(self, user_idx: torch.Tensor) -> torch.Tensor:
        """(B,) users -> (B, n_items) their training rows of R, 1 per item interacted with."""
        g = self._graph()
        start, end = g["crow"][user_idx], g["crow"][user_idx + 1]
        lengths = end - start
        row = torch.repeat_interleave(torch.arange(len(user_idx), device=start.device), lengths)
        offset = torch.arange(int(lengths.sum()), device=start.device)
        offset = offset - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
        rows = torch.zeros(len(user_idx), self.n_items, device=start.device)
        rows[row, g["col"][torch.repeat_interleave(start, lengths) + offset]] = 1.0
        return rows

    @torch.no_grad()
    def filter(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, n_items) history rows (any weights) -> (B, n_items) logits; linear in `rows`."""
        g = self._graph()
        rows = rows.float()
        scores = self.smooth(rows)
        if self.basis.shape[1] and self.ideal_weight:
            ideal = ((rows * g["inv_sqrt"]) @ self.basis) @ (self.basis.T * g["sqrt"])
            scores = scores + self.ideal_weight * ideal
        if self.sharpen:
            scores = scores - self.sharpen * self.smooth(scores)
        return scores * g["scale"]

    def systems(self, rows: torch.Tensor) -> UserSystems:
        """ALS's exact systems for (B, n_items) history rows (models/ials.py); YᵀY + reg I is
        formed once per item factors, not per batch."""
        if self._gram is None or self._gram[0] is not self.item_factors:
            self._gram = (self.item_factors, item_gram(self.item_factors, self.als_reg))
        return UserSystems(
            rows.float(), self.item_factors, self.als_reg, self.als_alpha, self._gram[1]
        )

    def _als(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, n_items) history rows -> (B, n_items) ALS scores of each row's user, in slices
        whose (B, factors, factors) systems stay within SCORE_BUDGET floats."""
        per = max(1, SCORE_BUDGET // self.item_factors.shape[1] ** 2)
        users = [self.systems(x).user_vectors() for x in rows.split(per)]
        return torch.cat(users) @ self.item_factors.T

    @torch.no_grad()
    def score_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(B, n_items) history rows -> (B, n_items) logits: the filter, plus, when it has ALS,
        ALS's rescaled scores beside the filter floored at zero (module doc)."""
        scores = self.filter(rows)
        if not self.item_factors.shape[1]:
            return scores
        return scores.clamp_min_(0) + self.als_scale * self._als(rows)

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        """(B,) users with (B,) items -> (B,) logits; with (B, K) items -> (B, K). Each
        distinct user's catalog is scored once, however many pairs it has."""
        users, row = torch.unique(user_idx, return_inverse=True)
        scores = self.score_all(users)
        if item_idx.dim() == 1:
            return scores[row, item_idx]
        return scores[row[:, None], item_idx.expand(len(user_idx), -1)]

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        self._graph()
        self._dense_p()  # once per model version, before the first user is scored
        return ()

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return self.score_rows(self.history_rows(user_idx))

    def item_representation(self) -> torch.Tensor | None:
        """Items in the ideal filter's spectral coordinates (V scaled by the singular values):
        items close there are smoothed into each other's scores."""
        if not self.basis.shape[1]:
            return None
        return self.basis * self.spectrum
