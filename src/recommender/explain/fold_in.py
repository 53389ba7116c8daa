"""Explanations that attribute a recommendation's score to the user's history items.

The models are ID-based: a score comes from a learned user vector, not from the history itself.
To ask which history items make a score high, the user vector is re-derived from the history
(a fold-in) and the score is differentiated through that derivation:

1. Fold-in. With the item side, the MLP and the output layer frozen, the user vector theta (all
   of the model's user parameters: p_u for GMF; p_u and b_u for MF; the GMF and the MLP
   embedding for NeuMF) is the MAP fit to the history of the loss the model was trained with
   (train.loss), history item j a positive with weight alpha_j in [0, 1]. BCE: every other
   item is a negative, weighted as the training sampler draws them (num_negatives per unit of
   positive weight, uniform or by popularity), so there is no sample to draw and the explained
   item is never over-weighted by landing in one. Softmax: item j's term is its cross-entropy
   against the whole catalog, history included, as the full softmax trains it. The prior is a
   Gaussian fitted to the trained users' vectors (their mean and covariance): training's L2
   penalty, centred and scaled where trained users live. Solved by Newton's method with a line
   search, all weightings of one user in one batch.
2. Integrated gradients over alpha from 0 (no history: the mean user) to 1 (the history):
   weight_j = integral over t of d score / d alpha_j at alpha = t * 1, by Gauss-Legendre
   quadrature. The derivative comes from the implicit function theorem at the optimum,
   d theta / d alpha_j = -H^-1 g_j (H the objective's Hessian, g_j the gradient of item j's
   terms), so the path's m points are m folded users and every explained item shares them.
   The weights sum to score(1) - score(0) up to the quadrature error (completeness).
3. GMF and MF are linear in theta, so steps 1 and 2 are exact for them. The ReLU layers of MLP
   and NeuMF make the fold-in objective piecewise smooth: Newton stalls on kinks with a large
   gradient left, and the fold-in jumps as alpha changes (measured on MovieLens-100K: finite
   differences at steps 1e-5 to 1e-2 disagreed with each other and with the implicit
   derivative, in sign too). For those models the user is first refitted to the whole history
   with the real model (Gauss-Newton steps from the trained user, from the mean user for a
   user the model has not seen), and steps 1 and 2 run on the model linearised in theta around that
   refit: exact at the refitted user, an approximation towards the no-history end. Influence
   functions for neural networks make the same choice (the Gauss-Newton Hessian).
4. MF with context adds its Markov term c_u . t_i, c_u the mean context embedding of the
   user's n latest items: a sum of one exact share per latest item l, context_l . t_i / n. The
   fold-in leaves it out, and the explained logit adds each latest item's share times that
   item's alpha: no Markov term at the baseline, all of it at alpha = 1. Its derivative in
   alpha_l, sigmoid'(logit) times l's share, is exact and adds to the path through theta.
   Only latest items in the history count (a run's latest items come from its training data,
   which serving's history holds): one outside it has no alpha, so it is left out of the
   score too, and the fidelity shows the gap.

The same fit gives users the model has never seen a vector from the items they interacted with
(`FoldIn.new_users`, all of a request's new users in one batched solve): serving recommends to
them from it, and explains their lists as above, with no trained user to compare to.

Every attribution reports its fidelity: the Spearman correlation over the catalog between the
folded user's scores and the trained user's. On MovieLens-100K (50 users): 0.996 for MF and
0.979 for NeuMF, against 0.80 and 0.76 for the mean user; top-10 overlaps 0.83 and 0.63.

Example:
    >>> fold_in = FoldIn(model, num_negatives=16)                       # doctest: +SKIP
    >>> user = fold_in.user(user_idx, history)                          # doctest: +SKIP
    >>> attribution = user.attribute(torch.tensor([10, 42]))            # weights: (2, H)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from recommender.explain.side import UserSide
from recommender.models import RecModel
from recommender.utils import RecommenderError

# Newton step fractions of the line search; 0 last, so a step never raises the objective.
STEP_FRACTIONS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.0)
# The MLP / NeuMF refit stops once no row's objective fell by more than this share in a step:
# on MovieLens-100K NeuMF it falls by 1e-1 to 1e-2, then 1e-3, then under 1e-3 by step 4.
REFIT_STALL = 1e-3
# Ridge added to the trained users' covariance, as a share of its mean variance, so the prior's
# precision exists even with fewer users than dimensions.
COVARIANCE_RIDGE = 1e-3
# Step size that ends the chord method along an explanation's path: an exact Newton step
# follows, which squares the error left (on MovieLens-100K MF, MLP and NeuMF the weights agree
# with those of tolerance 1e-4 to 1e-5, at a third fewer steps).
PATH_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Attribution:
    """Integrated-gradients attribution of T folded scores to a user's H history items.

    weights: (T, H) signed, in units of the score; row t sums to score[t] - baseline[t] up to
    the quadrature error. score: (T,) sigmoid of the logit of the user folded in from the whole
    history, with MF's Markov term (a probability under BCE, a ranking score under softmax).
    baseline: (T,) the same with no history (the mean trained user, no Markov term). fidelity:
    Spearman correlation over the catalog between the folded user's scores and the model's
    (None for a user the model has not seen).
    """

    weights: torch.Tensor
    score: torch.Tensor
    baseline: torch.Tensor
    fidelity: float | None


@dataclass(frozen=True)
class _Walked:
    """UserFold's integration path, independent of the explained items: the (m,) quadrature
    weights; at each point the (m, N) explained logits, the (m, H, D) items' gradients and the
    Cholesky factors of the (m, D, D) Hessian; the (N,) logits of the whole history's fold and of
    the baseline; the fidelity."""

    quadrature: torch.Tensor
    logits: torch.Tensor
    item_gradients: torch.Tensor
    hessian_factor: torch.Tensor
    full: torch.Tensor
    baseline: torch.Tensor
    fidelity: float | None


class FoldIn:
    """Fold-in and integrated gradients for one trained GMF, MF, MLP or NeuMF model (MF with
    its Markov term too, module doc step 4).

    Args:
        model: the trained model. Its item side is computed here: build a new FoldIn after
            training it further.
        num_negatives: negatives per positive in training (train.num_negatives); BCE only.
        negative_weights: (N,) relative odds of drawing each item as a negative in training
            (ones for uniform sampling, count ** power for popularity sampling); None: uniform.
            BCE only: the full softmax draws no negatives.
        prior_strength: scale of the prior's precision; 1 is the trained users' own spread.
        path_points: Gauss-Legendre points on the alpha path (folded users per explanation);
            12 keep the completeness error under 0.01 on MovieLens-100K, 8 did not.
        max_steps: steps per fold-in of the (local) model, stopped once every step is below
            `tolerance` (about 10 are taken on MovieLens-100K).
        refit_steps: Gauss-Newton steps of the MLP / NeuMF refit with the real model; ReLU
            kinks keep it from converging, and fidelity gains little after 6.
        loss: the model's training loss (train.loss), which the fold-in fits the history with.
    """

    method = "fold-in integrated gradients"  # what an Explanation says produced it

    def __init__(
        self,
        model: RecModel,
        num_negatives: int = 16,
        negative_weights: torch.Tensor | None = None,
        prior_strength: float = 1.0,
        path_points: int = 12,
        max_steps: int = 40,
        refit_steps: int = 6,
        tolerance: float = 1e-4,
        loss: str = "bce",
    ) -> None:
        counts = {"num_negatives": num_negatives, "path_points": path_points}
        counts |= {"max_steps": max_steps, "refit_steps": refit_steps}
        for name, value in counts.items():
            if value < 1:
                raise RecommenderError(f"FoldIn: {name} must be >= 1, got {value}")
        if prior_strength <= 0 or tolerance <= 0:
            raise RecommenderError("FoldIn: prior_strength and tolerance must be > 0")
        if loss not in ("bce", "softmax"):
            raise RecommenderError(f"FoldIn: loss must be 'bce' or 'softmax', got {loss!r}")
        self.side = UserSide(model)
        users = self.side.trained
        cov = torch.cov(users.T, correction=0)
        ridge = COVARIANCE_RIDGE * cov.diagonal().mean() + 1e-8
        self.mean = users.mean(0)  # (D,)
        self.precision = prior_strength * torch.linalg.inv(
            cov + ridge * torch.eye(len(cov), device=cov.device)
        )  # (D, D)
        n_items = self.side.n_items
        if negative_weights is None:
            negative_weights = torch.ones(n_items, device=users.device)
        if negative_weights.shape != (n_items,) or bool((negative_weights < 0).any()):
            raise RecommenderError(f"negative_weights must be {n_items} non-negative numbers")
        self.negative_weights = negative_weights.float().to(users.device)
        self.num_negatives = num_negatives
        self.path_points = path_points
        self.max_steps = max_steps
        self.refit_steps = refit_steps
        self.tolerance = tolerance
        self.loss = loss

    @torch.no_grad()
    def user(
        self,
        user_idx: int | None,
        history: torch.Tensor | np.ndarray,
        latest: torch.Tensor | np.ndarray | None = None,
    ) -> UserFold:
        """The fold-in of one user's history (item indices, each once). `latest` ((k,) item
        indices, latest first, n_items pads) replaces the user's stored latest items in MF's
        Markov term: a list after items given now, which then belong in `history` too.
        `user_idx` None: a user the model has not seen, with no trained user to compare the
        fold-in to (fidelity None) and no Markov term unless `latest` is given."""
        device = self.mean.device
        history = torch.as_tensor(history, dtype=torch.long, device=device)
        if not len(history):
            raise RecommenderError(f"user {user_idx} has no history to explain with")
        if latest is None and user_idx is None:
            latest = history.new_empty(0)
        given = None if latest is None else torch.as_tensor(latest, dtype=torch.long, device=device)
        return UserFold(self, user_idx, history, given)

    @torch.no_grad()
    def new_users(
        self, histories: Sequence[torch.Tensor | np.ndarray], latest: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, N) the model's logits for B users it has not seen, each folded in from their
        history (item indices, each once, none empty): step 1's fit at alpha = 1, all B users
        in one batched solve. Newton's method converges for GMF and MF; MLP and NeuMF take the
        Gauss-Newton refit with the real model (module doc step 3), as a recommendation is
        scored by the real model. `latest` ((B, k) item indices, latest first, n_items pads)
        adds MF's Markov term over each user's latest items.

        Each step costs a (B, D, N) by (B, N, D) product: about 5 steps for GMF and MF (until
        `tolerance`), and for MLP and NeuMF, whose ReLUs keep it from converging, up to
        refit_steps, until the objective stalls (REFIT_STALL). On MovieLens-100K a 20-item
        history takes 3 ms (MF) and 9 ms (NeuMF) at p50 on one thread
        (benchmarks/bench_foldin.py). The steps matter most to the MLP (planted clusters,
        top-10 overlap with the trained users' own lists: 0.54 after 2 steps, 0.76 after 6;
        NeuMF 0.83 and 0.85).
        """
        labels = one_hot_histories(histories, self.side.n_items, self.mean.device)
        fit = _Fit(self, labels)
        start, weights = self.mean.expand(len(labels), -1), fit._loss_weights(labels)
        theta = fit._newton(start, weights, local=not self.side.nonlinear)
        logits = self.side.logits(theta)
        if latest is not None:
            logits = logits + self.side.markov(None, latest.to(self.mean.device))[1].sum(1)
        return logits


class _Fit:
    """The fold-in's objective and its Newton solver, for rows of history weights.

    The labels mark history items: (N,) for rows that are weightings of one user's history,
    or (B, N) for B users, one row each. The local model is logit(theta) = offset + theta @
    jacobian.T: here the model itself for GMF and MF (MLP and NeuMF fit with the real model,
    `local=False`); UserFold moves it to a linearisation.
    """

    def __init__(self, fold_in: FoldIn, labels: torch.Tensor) -> None:
        self.fold_in, self.labels = fold_in, labels
        self.softmax = fold_in.loss == "softmax"
        # Each negative's share of the training sampler's draws for the user (BCE).
        share = fold_in.negative_weights * (1 - labels)
        self.negative_share = share / share.sum(-1, keepdim=True).clamp(min=1e-12)
        self.jacobian = fold_in.side.features  # (N, D)
        self.offset = fold_in.side.offset  # (N,)

    def _loss_weights(self, positive: torch.Tensor) -> torch.Tensor:
        """(B, N) weights of the history items, zero elsewhere -> (B, N) weights of every
        item's loss term. BCE adds the negatives, num_negatives per unit of the row's history
        weight, shared as the sampler draws them; softmax has none, each positive's term spans
        the catalog."""
        if self.softmax:
            return positive
        negatives = positive.sum(1, keepdim=True) * self.negative_share
        return positive + self.fold_in.num_negatives * negatives

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """(B, D) folded user vectors -> (B, N) logits of the local model, the fold-in's."""
        return self.offset + theta @ self.jacobian.T

    def _prob(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, N) logits -> the training loss's probabilities: each item's sigmoid (BCE), or
        the softmax over the catalog."""
        return logits.softmax(1) if self.softmax else torch.sigmoid(logits)

    def _objective(
        self,
        theta: torch.Tensor,
        weights: torch.Tensor,
        local: bool,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, D), (B, N) -> (B,): the weighted training loss plus the Gaussian prior; `rows`:
        which of the (B, N) labels of several users these are (the line search's stragglers)."""
        logits = self.logits(theta) if local else self.fold_in.side.logits(theta)
        if self.softmax:
            loss = -logits.log_softmax(1)  # item i's cross-entropy as the positive
        else:
            labels = self.labels if rows is None or self.labels.ndim == 1 else self.labels[rows]
            # Per-user labels repeat down the rows: the line search stacks its trials.
            shaped = logits.view(-1, *labels.shape)
            loss = F.binary_cross_entropy_with_logits(
                shaped, labels.expand_as(shaped), reduction="none"
            ).view_as(logits)
        centred = theta - self.fold_in.mean
        prior = 0.5 * ((centred @ self.fold_in.precision) * centred).sum(1)
        return (weights * loss).sum(1) + prior

    def _gradient(
        self, theta: torch.Tensor, weights: torch.Tensor, prob: torch.Tensor, jac: torch.Tensor
    ) -> torch.Tensor:
        """The objective's gradient (B, D) from the probabilities (B, N) at theta (B, D):
        J^T r plus the prior's, r = w (p - labels) for BCE, A p - w for softmax (A = sum w)."""
        if self.softmax:
            residual = weights.sum(1, keepdim=True) * prob - weights
        else:
            residual = weights * (prob - self.labels)
        grad = (residual[:, None, :] @ jac)[:, 0]  # (B, D)
        return grad + (theta - self.fold_in.mean) @ self.fold_in.precision

    def _hessian(
        self, weights: torch.Tensor, prob: torch.Tensor, jac: torch.Tensor
    ) -> torch.Tensor:
        """Gauss-Newton Hessian plus the prior precision, (B, D, D): J^T diag(w p (1 - p)) J
        for BCE, A J^T (diag(p) - p p^T) J for softmax (A = sum w)."""
        if self.softmax:
            # As A Jc^T diag(p) Jc with Jc = J - p^T J (the same, since p sums to 1): no
            # difference of two near-equal matrices, as for MF's user bias, which no softmax
            # can see (its derivative is 1 for every item) and whose curvature must be 0.
            jac = jac - prob[:, None, :] @ jac  # (B, N, D)
            curvature = weights.sum(1, keepdim=True) * prob
        else:
            curvature = weights * prob * (1 - prob)
        return (jac.transpose(-1, -2) * curvature[:, None, :]) @ jac + self.fold_in.precision

    def _newton(
        self,
        theta: torch.Tensor,
        weights: torch.Tensor,
        local: bool = False,
        chord: torch.Tensor | None = None,
        tolerance: float | None = None,
    ) -> torch.Tensor:
        """Minimise the fold-in objective for B weightings at once, with a line search.

        Newton's method, or with `chord` (B, D, D) the Cholesky factor of a fixed stand-in
        for the Hessian (a chord method); `tolerance` replaces the FoldIn's.
        """
        fold_in = self.fold_in
        objective = self._objective(theta, weights, local)  # (B,)
        for _ in range(fold_in.max_steps if local else fold_in.refit_steps):
            if local:
                logits, jac = self.logits(theta), self.jacobian
            else:
                logits, jac = fold_in.side.jacobian(theta)
            prob = self._prob(logits)
            grad = self._gradient(theta, weights, prob, jac)
            # The Gauss-Newton Hessian plus the prior's precision is positive definite.
            chol = chord
            if chol is None:
                chol = torch.linalg.cholesky(self._hessian(weights, prob, jac))
            step = torch.cholesky_solve(grad[..., None], chol)[..., 0]  # (B, D)
            before = objective
            step, objective = self._line_search(theta, step, weights, objective, local)
            theta = theta - step
            if float(step.norm(dim=1).max()) < (tolerance or fold_in.tolerance):
                break
            # The refit cannot converge on ReLU kinks; it stops where the objective stalls.
            if not local and bool((before - objective <= REFIT_STALL * before.abs()).all()):
                break
        return theta

    def _line_search(
        self,
        theta: torch.Tensor,
        step: torch.Tensor,
        weights: torch.Tensor,
        objective: torch.Tensor,
        local: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The full step for each row it lowers the objective of (one evaluation, the usual
        case); each other row takes its best of STEP_FRACTIONS, evaluated for those rows alone
        (a chord step along an explanation's path misses for a row or two of 12 in most
        steps). Returns the steps and the new objectives."""
        full = self._objective(theta - step, weights, local)
        missed = (full >= objective).nonzero()[:, 0]
        if not len(missed):
            return step, full
        fractions = torch.tensor(STEP_FRACTIONS, device=theta.device)
        trial = theta[missed] - fractions[1:, None, None] * step[missed]  # (S - 1, M, D)
        m, d = len(missed), theta.shape[1]
        scores = self._objective(
            trial.reshape(-1, d), weights[missed].repeat(len(fractions) - 1, 1), local, missed
        )
        scores = torch.cat([full[missed][None], scores.view(-1, m)])  # (S, M)
        best = scores.argmin(0)
        step, full = step.clone(), full.clone()
        step[missed] = fractions[best][:, None] * step[missed]
        full[missed] = scores.gather(0, best[None])[0]
        return step, full


class UserFold(_Fit):
    """One user's history, folded in under the (locally linear) model; see the module doc.

    The local model is logit(theta) = offset + theta @ jacobian.T: the model itself for GMF and
    MF, its linearisation around the user's full-history refit for MLP and NeuMF. The explained
    logits add MF's Markov term, each latest item's share weighted by its alpha (`markov`).
    """

    def __init__(
        self,
        fold_in: FoldIn,
        user_idx: int | None,
        history: torch.Tensor,
        latest: torch.Tensor | None = None,
    ) -> None:
        side = fold_in.side
        labels = torch.zeros(side.n_items, device=history.device)
        labels[history] = 1.0
        super().__init__(fold_in, labels)
        self.user_idx, self.history = user_idx, history
        self.latest = None if latest is None else latest[None]  # (1, k): given, not stored
        whole = self._weights(self.labels.new_ones(1, len(history)))
        self.whole_weight = float(whole.sum())  # the data term's total weight at alpha = 1
        start = fold_in.mean[None]
        if side.nonlinear:
            start = self._refit(whole)
            logits, jacobian = side.jacobian(start)
            self.jacobian = jacobian[0]  # (N, D)
            self.offset = logits[0] - self.jacobian @ start[0]
        self.full = self._newton(start, whole, local=True)  # (1, D): the whole history's fold-in
        prob = self._prob(self.logits(self.full))
        # The history's curvature at the full fold-in, without the prior: other weightings
        # scale it by their mean weight as a fixed Newton matrix (a chord method), which spares
        # a Hessian over every item at every step and converges to the same optimum.
        self.curvature = self._hessian(whole, prob, self.jacobian)[0] - fold_in.precision
        # The Markov term stays out of the fold-in's objective: training fitted p_u with each
        # positive's own preceding items as context, not with the user's latest items.
        user = None if user_idx is None else torch.tensor([user_idx], device=history.device)
        latest, shares = side.markov(user, self.latest)
        found = latest[0, :, None] == history  # (k, H)
        kept = found.any(1)
        self.markov_at = found[kept].int().argmax(1)  # (k',) history positions of latest items
        self.markov_shares = shares[0, kept]  # (k', N)

    def _refit(self, whole: torch.Tensor) -> torch.Tensor:
        """(1, N) the whole history's weights -> (1, D) the MLP / NeuMF user refitted to them
        with the real model: from the trained user for a user the model has seen, from the
        mean user for a new one.

        ReLUs make the objective non-convex: a history item whose units are dead for the
        current user has a zero Jacobian row, so Gauss-Newton cannot pull the user towards it.
        From the mean user the refit can stall in such a basin, the user's own cluster dead
        and scored as one constant (planted data: fidelity 0.05 to 0.5 for one user in eight,
        its objective well above the trained user's). The trained user is the model's own
        answer for that user, and its basin is the one an explanation of the model's list
        should describe: refitting from the mean user too found a lower objective for 22 of
        100 MovieLens-100K NeuMF users, at the same mean fidelity (0.994), and cost a third of
        a first explanation's time.
        """
        start = self.fold_in.mean[None]
        if self.user_idx is not None:  # a new user has no trained vector to start from
            start = self.fold_in.side.trained[self.user_idx][None]
        return self._newton(start, whole, local=False)

    def markov(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, H) history weights -> (B, N) MF's Markov term, each latest item's share times
        its weight; zero for other models."""
        return alpha[:, self.markov_at] @ self.markov_shares

    @torch.no_grad()
    def explained_logits(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, H) history weights -> (B, N) the logits that `attribute` explains: the fold-in's
        plus the Markov term at those weights."""
        return self.logits(self.fold(alpha)) + self.markov(alpha.to(self.labels))

    @torch.no_grad()
    def fold(self, alpha: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
        """(B, H) weights of the history items -> (B, D) user vectors fitted to them, to the
        FoldIn's tolerance unless `tolerance` is given."""
        if alpha.ndim != 2 or alpha.shape[1] != len(self.history):
            raise RecommenderError(f"alpha must be (B, {len(self.history)}), got {alpha.shape}")
        alpha = alpha.to(self.labels)
        if bool(((alpha < 0) | (alpha > 1)).any()):
            raise RecommenderError("alpha must lie in [0, 1]")
        scale = alpha.sum(1) / len(self.history)  # (B,)
        chord = scale[:, None, None] * self.curvature + self.fold_in.precision
        start = self.full.expand(len(alpha), -1)
        weights, factor = self._weights(alpha), torch.linalg.cholesky(chord)
        return self._newton(start, weights, local=True, chord=factor, tolerance=tolerance)

    @torch.no_grad()
    def attribute(self, targets: torch.Tensor) -> Attribution:
        """Integrated gradients of the (T,) target items' folded probabilities."""
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < len(self.labels):
            raise RecommenderError(f"target item indices must lie in [0, {len(self.labels)})")
        path, jac = self._walked, self.jacobian
        # The score is the sigmoid whichever loss trained the model: what serving shows.
        p_t = torch.sigmoid(path.logits[:, targets])
        slope = p_t * (1 - p_t)  # (m, T)
        rhs = (slope[..., None] * jac[targets]).transpose(1, 2)
        solved = torch.cholesky_solve(rhs, path.hessian_factor)
        grads = -(path.item_gradients @ solved)  # (m, H, T): d score_t / d alpha_j at each point
        # The Markov term is linear in alpha: a latest item adds its share of the targets' logits.
        grads.index_add_(1, self.markov_at, slope[:, None, :] * self.markov_shares[:, targets])
        attributions = torch.einsum("m,mht->th", path.quadrature, grads)
        score = torch.sigmoid(path.full[targets])
        baseline = torch.sigmoid(path.baseline[targets])
        return Attribution(attributions, score, baseline, path.fidelity)

    @cached_property
    def _walked(self) -> _Walked:
        """The integration path's folded users and what `attribute` needs of them for any
        targets, computed on first use: a fold kept for a served user explains its next list
        at the cost of the targets' solves alone."""
        history = self.history
        nodes, quad = self._path()
        alpha = nodes[:, None].expand(-1, len(history))  # (m, H): the path's points
        theta = self.fold(alpha, PATH_TOLERANCE)
        weights, jac = self._weights(alpha), self.jacobian
        prob = self._prob(self.logits(theta))  # (m, N)
        # Positive definite (Gauss-Newton plus the prior): one Cholesky factor serves the
        # Newton step and every target's solve.
        factor = torch.linalg.cholesky(self._hessian(weights, prob, jac))  # (m, D, D)
        # One exact Newton step finishes the chord method's linear convergence; the implicit
        # gradients below need the optimum, and the Hessian barely moves in that step.
        step = torch.cholesky_solve(self._gradient(theta, weights, prob, jac)[..., None], factor)
        theta = theta - step[..., 0]
        local = self.logits(theta)
        full = self.logits(self.full)[0] + self.markov(self.labels.new_ones(1, len(history)))[0]
        return _Walked(
            quadrature=quad,
            logits=local + self.markov(alpha),
            item_gradients=self._item_gradients(self._prob(local)),  # (m, H, D)
            hessian_factor=factor,
            full=full,
            baseline=self.logits(self.fold_in.mean[None])[0],
            fidelity=self._fidelity(full),
        )

    def _path(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Gauss-Legendre nodes and weights for t in (0, 1), spaced geometrically.

        The fold-in's data term grows like t * W against a fixed prior, W the total weight of
        its terms at t = 1: H (1 + num_negatives) for BCE, H for softmax (whose negatives sit
        inside each positive's term). So scores move mostly at small t;
        t = (e^(k u) - 1) / (e^k - 1) with k = ln(1 + W) spreads that change evenly over u.
        """
        u, w = np.polynomial.legendre.leggauss(self.fold_in.path_points)
        u = (u + 1) / 2
        k = math.log1p(self.whole_weight)
        t = np.expm1(k * u) / math.expm1(k)
        dt = w / 2 * k * np.exp(k * u) / math.expm1(k)
        device = self.history.device
        return (
            torch.as_tensor(t, dtype=torch.float32, device=device),
            torch.as_tensor(dt, dtype=torch.float32, device=device),
        )

    def _weights(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, H) history weights -> (B, N) weights of the items' loss terms (`_loss_weights`)."""
        positive = alpha.new_zeros(len(alpha), len(self.labels))
        positive[:, self.history] = alpha
        return self._loss_weights(positive)

    def _item_gradients(self, prob: torch.Tensor) -> torch.Tensor:
        """(B, N) probabilities of the local model -> (B, H, D): g_j = d/d alpha_j of the
        objective's gradient. BCE: item j's own gradient, plus the num_negatives draws per unit
        of its weight, spread over the negatives. Softmax: J^T (p - e_j)."""
        jac, history = self.jacobian, self.history
        if self.softmax:
            return (prob @ jac)[:, None, :] - jac[history]
        negatives = self.fold_in.num_negatives * ((self.negative_share * prob) @ jac)  # (B, D)
        return (prob[:, history] - 1)[..., None] * jac[history] + negatives[:, None, :]

    def _fidelity(self, folded: torch.Tensor) -> float | None:
        """Spearman correlation over the catalog: the folded user's explained logits (N,)
        against the model's own for the trained user; None for a user not trained on."""
        if self.user_idx is None:
            return None
        user = torch.tensor([self.user_idx], device=folded.device)
        return spearman(folded, self.fold_in.side.trained_logits(user, self.latest)[0])


def one_hot_histories(
    histories: Sequence[torch.Tensor | np.ndarray], n_items: int, device: torch.device
) -> torch.Tensor:
    """B new users' histories (item indices, each once, none empty) -> (B, n_items) rows,
    1 at each history item: what `new_users` of a fold-in or a graph filter starts from."""
    items = [torch.as_tensor(h, dtype=torch.long, device=device) for h in histories]
    lengths = torch.tensor([len(h) for h in items], device=device)
    if not len(items) or bool((lengths == 0).any()):
        raise RecommenderError("new_users needs at least one user, each with a history")
    rows = torch.repeat_interleave(torch.arange(len(items), device=device), lengths)
    matrix = torch.zeros(len(items), n_items, device=device)
    matrix[rows, torch.cat(items)] = 1.0
    return matrix


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two (N,) score vectors (an explanation's fidelity)."""
    ranks = torch.stack([a, b]).argsort(1).argsort(1).float()
    ranks = ranks - ranks.mean(1, keepdim=True)
    return float((ranks[0] @ ranks[1]) / (ranks[0].norm() * ranks[1].norm()).clamp(min=1e-12))
