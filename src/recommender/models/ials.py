"""Implicit-feedback ALS (Hu, Koren & Volinsky, ICDM 2008), the weighted matrix factorisation
that implicit's `AlternatingLeastSquares` fits: the term GraphFilter adds to its filter.

Every (user, item) cell is a target, 1 where the user interacted and 0 elsewhere; an observed
cell weighs 1 + alpha, every other cell 1:

    min  sum_ui c_ui (p_ui - x_u . y_i)^2 + reg (|X|^2 + |Y|^2)

Given the item factors Y, a user's optimum solves

    (YᵀY + reg I + alpha Y_hᵀ Y_h) x = (1 + alpha) Y_hᵀ 1        (Y_h: the history's rows)

so a user is a function of their history alone: trained users, new users and an explanation
all come from the same solve (`UserSystems`), and x . y_i splits exactly into one share per
history item, (1 + alpha) y_iᵀ A⁻¹ y_h (the explanation implicit's `explain` gives).

Fitting alternates the two sides with a few conjugate-gradient steps each, warm-started from the
previous sweep (Takács et al., RecSys 2011; implicit's default), with every user's A·p product
done at once: p YᵀY + alpha ((p Yᵀ) sampled at the observed cells) Y, one sampled dense product
and one sparse product over the E training pairs. Only Y is kept: users are solved exactly when
they are scored.
"""

from __future__ import annotations

import torch

from recommender.models.base import SCORE_BUDGET
from recommender.models.lightgcn import csr_matrix

CG_STEPS = 3  # conjugate-gradient steps per side and sweep (implicit's default)
INIT_SCALE = 0.01  # standard deviation of the random starting factors


def _cg(
    matrix: torch.Tensor, gram: torch.Tensor, fixed: torch.Tensor, x: torch.Tensor, alpha: float
) -> torch.Tensor:
    """CG_STEPS conjugate-gradient steps on every row's system at once, from x; `matrix` the
    (rows, cols) CSR of observed cells, `fixed` the (cols, k) other side, gram = its Gram plus
    reg I."""

    def product(p: torch.Tensor) -> torch.Tensor:
        sampled = torch.sparse.sampled_addmm(matrix, p, fixed.T, beta=0.0)
        return p @ gram + alpha * (sampled @ fixed)

    rhs = (1 + alpha) * (matrix @ fixed)
    residual = rhs - product(x)
    direction = residual.clone()
    norm = (residual * residual).sum(1, keepdim=True)
    for _ in range(CG_STEPS):
        step_product = product(direction)
        curvature = (direction * step_product).sum(1, keepdim=True)
        step = norm / curvature.clamp(min=torch.finfo(x.dtype).tiny)
        x = x + step * direction
        residual = residual - step * step_product
        new_norm = (residual * residual).sum(1, keepdim=True)
        direction = residual + (new_norm / norm.clamp(min=torch.finfo(x.dtype).tiny)) * direction
        norm = new_norm
    return x


def item_gram(item_factors: torch.Tensor, reg: float) -> torch.Tensor:
    """YᵀY + reg I of one side's factors: the part of every row's system on the other side
    that no history changes."""
    k = item_factors.shape[1]
    eye = torch.eye(k, device=item_factors.device, dtype=item_factors.dtype)
    return item_factors.T @ item_factors + reg * eye


def fit_item_factors(
    users: torch.Tensor,
    items: torch.Tensor,
    n_users: int,
    n_items: int,
    factors: int,
    reg: float,
    alpha: float,
    sweeps: int,
) -> torch.Tensor:
    """(E,) distinct training pairs -> (n_items, factors) item factors after `sweeps`
    alternations. The same pairs always give the same factors (a fixed-seed start)."""
    generator = torch.Generator(device=users.device).manual_seed(0)
    x = torch.randn(n_users, factors, generator=generator, device=users.device) * INIT_SCALE
    y = torch.randn(n_items, factors, generator=generator, device=users.device) * INIT_SCALE
    ones = torch.ones(len(users), device=users.device)
    r = csr_matrix(users, items, ones, (n_users, n_items))
    r_t = csr_matrix(items, users, ones, (n_items, n_users))
    for _ in range(sweeps):
        x = _cg(r, item_gram(y, reg), y, x, alpha)
        y = _cg(r_t, item_gram(x, reg), x, y, alpha)
    return y


class UserSystems:
    """The exact systems A x = b of B history rows against fixed item factors (module doc).

    Rows are (B, n_items) non-negative weights, 1 per history item. A row's A gathers only its
    own items' factors: rows are bucketed by history length (powers of two), so that padding
    at most doubles the work, and gathered SCORE_BUDGET floats at a time.
    """

    def __init__(
        self,
        rows: torch.Tensor,
        item_factors: torch.Tensor,
        reg: float,
        alpha: float,
        gram: torch.Tensor | None = None,
    ) -> None:
        """`gram`: YᵀY + reg I, (k, k), when the caller keeps it (it costs n_items k² to form:
        more than a small batch of users' own systems)."""
        self.item_factors, self.alpha = item_factors, alpha
        n, k = len(rows), item_factors.shape[1]
        row, col = rows.nonzero(as_tuple=True)  # row-major: each row's items contiguous
        weight = rows[row, col]
        self.rhs = torch.zeros(n, k, device=rows.device, dtype=item_factors.dtype)
        self.rhs.index_add_(0, row, (1 + alpha) * weight[:, None] * item_factors[col])
        if gram is None:
            gram = item_gram(item_factors, reg)
        gram = gram.expand(n, k, k).clone()
        lengths = torch.bincount(row, minlength=n)
        starts = lengths.cumsum(0) - lengths
        bucket = torch.ceil(torch.log2(lengths.clamp(min=1).float())).long()
        bucket[lengths == 0] = -1
        for b in bucket.unique().tolist():
            if b < 0:
                continue
            members = torch.nonzero(bucket == b)[:, 0]
            width = int(lengths[members].max())
            for users in members.split(max(1, SCORE_BUDGET // (width * k))):
                slot = torch.arange(width, device=rows.device)
                valid = slot[None, :] < lengths[users, None]
                index = torch.where(valid, starts[users, None] + slot[None, :], 0)
                scale = torch.where(valid, weight[index].sqrt(), 0.0)
                gathered = item_factors[col[index]] * scale[..., None]  # (U, width, k)
                gram[users] += alpha * gathered.transpose(1, 2) @ gathered
        self.cholesky = torch.linalg.cholesky(gram)

    def user_vectors(self) -> torch.Tensor:
        """(B, k) each row's optimum."""
        return torch.cholesky_solve(self.rhs[..., None], self.cholesky)[..., 0]

    def shares(self, history: torch.Tensor) -> torch.Tensor:
        """For one row (B = 1) of weight 1 at these (H,) history items: (H, n_items) each
        history item's share of every item's score, (1 + alpha) y_iᵀ A⁻¹ y_h; the shares of
        an item sum to its score."""
        solved = torch.cholesky_solve(self.item_factors[history].T, self.cholesky[0])  # (k, H)
        return (1 + self.alpha) * solved.T @ self.item_factors.T
