"""Explanations for LightGCN: its score attributed to the user's history edges.

A fold-in (fold_in.py) re-fits a free user vector to the history, but that is not how LightGCN
represents a user: its user is the mean of layers 0..L of propagation over the training graph,
and the history enters through the graph's edges. So the attribution follows the model:

1. Edge weights. Each history edge (u, j) gets a weight alpha_j in [0, 1] scaling its entry
   r_uj = 1 / sqrt(d_u d_j) of the normalised adjacency (the normalisation kept as trained):
   alpha = 1 is the trained graph, alpha_j = 0 sends no message along (u, j). The user's layers
   are recomputed for that user alone, from the trained layers of its items:
       U_u^(k)     = sum_j alpha_j r_uj X_j^(k-1)
       X_j^(k)     = X_j^(k)[trained] + (alpha_j U_u^(k-1) - U_u^(k-1)[trained]) r_uj
   (item j's layer k minus the message u sent it in training, plus the weighted one). Layer 1
   is exactly a sum over history items; every layer is exact for L <= 3, where no path from a
   user edge comes back to u through another user. From L = 4 on, such paths (u - j - u' - j'
   - u, fourth order in the normalised weights) are held at their trained values.
2. The item side stays as trained, so alpha = 1 gives the model's own scores (fidelity 1) and
   alpha = 0 the user's layer-0 embedding alone, divided by L + 1: the baseline.
3. Integrated gradients over alpha from 0 to 1, by Gauss-Legendre quadrature, of the score the
   service shows (the sigmoid of the logit); the weights sum to score - baseline up to the
   quadrature error. Autograd differentiates step 1, a few (H, d) operations per layer: tens of
   microseconds per history item, whatever the size of the graph.

Example:
    >>> why = GraphExplainer(model).user(user_idx, history).attribute(targets)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from recommender.explain.fold_in import Attribution, spearman
from recommender.models.lightgcn import LightGCN
from recommender.utils import RecommenderError


class GraphExplainer:
    """The trained layers of a LightGCN, from which any user's history edges are re-weighted.

    Args:
        model: the trained model; its layers are computed here (build a new explainer after
            training it further).
        path_points: Gauss-Legendre points on the alpha path.
    """

    method = "graph-edge integrated gradients"  # what an Explanation says produced it

    def __init__(self, model: LightGCN, path_points: int = 12) -> None:
        if path_points < 1:
            raise RecommenderError(f"GraphExplainer: path_points must be >= 1, got {path_points}")
        self.model, self.path_points = model, path_points
        with torch.no_grad():
            user_layers, item_layers = model.layer_embeddings()
            self.user_layers = [u.detach().float() for u in user_layers]  # L + 1 of (n_users, d)
            self.item_layers = [i.detach().float() for i in item_layers]  # L + 1 of (n_items, d)
            self.items = model.propagate()[1].detach().float()  # (n_items, d): the item side
            r = model.adjacency()[0]
            self.crow, self.col, self.values = r.crow_indices(), r.col_indices(), r.values()

    @property
    def n_items(self) -> int:
        return len(self.items)

    def user(
        self,
        user_idx: int,
        history: torch.Tensor | np.ndarray,
        latest: torch.Tensor | np.ndarray | None = None,
    ) -> GraphUser:
        """One user's history edges (item indices, each once), ready to be re-weighted.
        `latest` is accepted for the fold-in's signature; LightGCN reads no context."""
        device = self.items.device
        history = torch.as_tensor(history, dtype=torch.long, device=device)
        if not len(history):
            raise RecommenderError(f"user {user_idx} has no history to explain with")
        return GraphUser(self, user_idx, history)


class GraphUser:
    """One user's layers as a function of its history edges' weights (module doc, step 1)."""

    def __init__(self, explainer: GraphExplainer, user_idx: int, history: torch.Tensor) -> None:
        self.explainer, self.user_idx, self.history = explainer, user_idx, history
        lo, hi = int(explainer.crow[user_idx]), int(explainer.crow[user_idx + 1])
        items, values = explainer.col[lo:hi], explainer.values[lo:hi]  # the user's graph edges
        # A history item with no edge in the graph (given after training) sends no message.
        match = items[:, None] == history  # (E_u, H)
        # An edge outside the given history keeps weight 1 (explains nothing); a history item
        # without an edge (given after training) sends no message, so its weight is 0.
        self.edge_at = torch.where(match.any(1), match.int().argmax(1), -1)  # (E_u,)
        self.edge_items, self.edge_values = items, values.float()  # (E_u,) each

    def logits(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, H) history weights -> (B, n_items) logits, differentiable in alpha."""
        ex = self.explainer
        if alpha.ndim != 2 or alpha.shape[1] != len(self.history):
            raise RecommenderError(f"alpha must be (B, {len(self.history)}), got {alpha.shape}")
        alpha = torch.cat([alpha, alpha.new_ones(len(alpha), 1)], 1)  # column -1: weight 1
        weights = alpha[:, self.edge_at] * self.edge_values  # (B, E_u): alpha_j r_uj
        trained_user = [layer[self.user_idx] for layer in ex.user_layers]  # (d,) each
        user = [trained_user[0].expand(len(alpha), -1)]  # (B, d) per layer
        for k in range(1, len(ex.user_layers)):
            # item j's layer k-1, its training message from u replaced by the weighted one
            items = ex.item_layers[k - 1][self.edge_items]  # (E_u, d)
            if k > 1:
                sent = weights[..., None] * user[k - 2][:, None, :]  # (B, E_u, d)
                items = items - self.edge_values[:, None] * trained_user[k - 2] + sent
            user.append((weights[..., None] * items).sum(1))
        vector = torch.stack(user).mean(0)  # (B, d)
        if ex.model.cosine:
            return F.normalize(vector, dim=-1) @ ex.items.T
        return vector @ ex.items.T

    @torch.no_grad()
    def explained_logits(self, alpha: torch.Tensor) -> torch.Tensor:
        """(B, H) history weights -> (B, n_items): the logits that `attribute` explains."""
        if bool(((alpha < 0) | (alpha > 1)).any()):
            raise RecommenderError("alpha must lie in [0, 1]")
        return self.logits(alpha.to(self.explainer.items))

    def attribute(self, targets: torch.Tensor) -> Attribution:
        """Integrated gradients of the (T,) target items' scores over the history edges."""
        ex, n_history = self.explainer, len(self.history)
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < ex.n_items:
            raise RecommenderError(f"target item indices must lie in [0, {ex.n_items})")
        u, w = np.polynomial.legendre.leggauss(ex.path_points)
        nodes = torch.as_tensor((u + 1) / 2, dtype=torch.float32, device=ex.items.device)
        quad = torch.as_tensor(w / 2, dtype=torch.float32, device=ex.items.device)
        with torch.enable_grad():
            alpha = nodes[:, None].expand(-1, n_history).clone().requires_grad_(True)
            scores = torch.sigmoid(self.logits(alpha)[:, targets])  # (m, T)
            grads = [
                torch.autograd.grad(scores[:, t].sum(), alpha, retain_graph=True)[0]
                for t in range(len(targets))
            ]  # T of (m, H)
        weights = torch.stack([quad @ g for g in grads]) if grads else quad.new_zeros(0, n_history)
        ends = self.explained_logits(
            torch.stack([quad.new_ones(n_history), quad.new_zeros(n_history)])
        )
        trained = ex.model.score_all(torch.tensor([self.user_idx], device=ex.items.device))[0]
        return Attribution(
            weights.detach(),
            torch.sigmoid(ends[0, targets]),
            torch.sigmoid(ends[1, targets]),
            spearman(ends[0], trained.detach().float()),
        )
