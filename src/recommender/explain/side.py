"""An ID model as a function of an explicit user vector, its item side frozen: what a fold-in
fits and differentiates (fold_in.py). GMF and MF are linear in the user vector; the MLP and
NeuMF go through the MLP tower, whose first layer splits into a user part and a per-item part.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from recommender.models import GMF, MF, MLP, NeuMF, RecModel
from recommender.models.mlp import MLPTower
from recommender.utils import RecommenderError


def _flush(x: torch.Tensor) -> torch.Tensor:
    """`x` with its subnormal floats set to 0. Products of small trained weights (NeuMF's item
    embeddings times its output layer) land there, and CPU arithmetic on subnormals is slow:
    one NeuMF fold-in Hessian on MovieLens-100K took 109 ms with them, 1.5 ms without. They
    are far below any score's resolution."""
    return x.masked_fill(x.abs() < torch.finfo(x.dtype).tiny, 0.0)


def supports(model: RecModel) -> bool:
    """Whether `model` has a user vector to fold in: GMF, MF, MLP and NeuMF, but not an MF
    that scores by cosine (train.loss=ccl), which no linear fold-in reproduces."""
    return isinstance(model, (GMF, MF, MLP, NeuMF)) and not getattr(model, "cosine", False)


class UserSide:
    """A model as a function of an explicit user vector theta, with the item side frozen.

    logit(theta, i) = offset_i + features_i . theta_lin + w_out . tower(W1u theta_mlp + c_i),
    where theta = [theta_lin, theta_mlp]; with MF's Markov term added (`markov`), the model's
    own scores at its trained user vectors.
    """

    def __init__(self, model: RecModel) -> None:
        self.nonlinear = False
        if getattr(model, "cosine", False):
            raise RecommenderError(
                f"{type(model).__name__} scores by cosine (train.loss=ccl): no linear fold-in "
                "reproduces it"
            )
        with torch.no_grad():
            if isinstance(model, GMF):
                features = model.item_emb.weight * model.out.weight[0]
                offset = model.out.bias.expand(model.n_items)
                users = [model.user_emb.weight]
            elif isinstance(model, MF):
                ones = torch.ones_like(model.item_bias.weight)
                features = torch.cat([model.item_emb.weight, ones], 1)
                offset = model.item_bias.weight[:, 0] + model.bias
                users = [model.user_emb.weight, model.user_bias.weight]
            elif isinstance(model, NeuMF):
                features = model.item_emb.weight * model.out.weight[0, : model.dim]
                offset = model.out.bias.expand(model.n_items)
                users = [model.user_emb.weight, model.tower.user_emb.weight]
                self._freeze_tower(model.tower, model.out.weight[0, model.dim :])
            elif isinstance(model, MLP):
                features = model.out.weight.new_zeros(model.n_items, 0)
                offset = model.out.bias.expand(model.n_items)
                users = [model.tower.user_emb.weight]
                self._freeze_tower(model.tower, model.out.weight[0])
            else:
                raise RecommenderError(f"{type(model).__name__} has no user vector to fold in")
            self.features = _flush(features.detach().float())  # (N, d_lin)
            self.offset = offset.detach().float()  # (N,)
            self.trained = torch.cat(users, 1).detach().float()  # (n_users, D)
            self.d_lin = self.features.shape[1]
            if isinstance(model, MF) and model.context:
                latest = model.latest
                context, target = model.context_emb.weight, model.target_emb.weight
            else:  # no Markov term: no latest items, zero-width embeddings
                latest = torch.zeros(len(self.trained), 0, dtype=torch.long)
                context, target = features.new_zeros(len(offset) + 1, 0), features[:, :0]
            self.latest = latest.to(self.offset.device)  # (n_users, k), n_items pads
            self.context_emb = context.detach().float()  # (N + 1, d_ctx), zero padding row
            self.target_emb = target.detach().float()  # (N, d_ctx)

    def _freeze_tower(self, tower: MLPTower, w_out: torch.Tensor) -> None:
        """Keep the MLP branch's tensors; the item half of layer one is computed once."""
        half = tower.user_emb.embedding_dim
        self.nonlinear = True
        self.w_user = tower.first.weight[:, :half].detach().float()  # (w1, d_mlp)
        self.item_half = (tower.item_half() + tower.first.bias).detach().float()  # (N, w1)
        linears = cast("list[nn.Linear]", list(tower.linears))
        self.layers = [(lin.weight.detach().float(), lin.bias.detach().float()) for lin in linears]
        self.w_out = w_out.detach().float()  # (w_last,)

    @property
    def n_items(self) -> int:
        return len(self.offset)

    def logits(self, theta: torch.Tensor) -> torch.Tensor:
        """(B, D) user vectors -> (B, N) logits over the catalog."""
        z = self.offset + theta[:, : self.d_lin] @ self.features.T
        if self.nonlinear:
            z = z + self._top(theta) @ self.w_out
        return z

    def markov(
        self, user_idx: torch.Tensor | None, latest: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) users -> their latest items (B, k) and each one's share of the users' Markov
        term (B, k, N), context_l . t_i / n for n non-padding items (padding's share is 0):
        the shares sum to c_u . t_i. k = 0 for a model without the term. `latest` ((B, k),
        n_items pads) replaces the users' stored latest items (and stands for new users, whose
        `user_idx` is None)."""
        if latest is None:
            if user_idx is None:
                raise RecommenderError("markov: give the latest items of users not trained on")
            latest = self.latest[user_idx]
        present = (latest != self.n_items).float()  # (B, k): padding masked, as the model does
        count = present.sum(1).clamp(min=1)
        shares = (
            self.context_emb[latest] @ self.target_emb.T * (present / count[:, None])[..., None]
        )
        return latest, shares

    def trained_logits(
        self, user_idx: torch.Tensor, latest: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) users -> (B, N) the model's logits for its trained users, Markov term included
        (over `latest` instead of the stored latest items when given)."""
        return self.logits(self.trained[user_idx]) + self.markov(user_idx, latest)[1].sum(1)

    def jacobian(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) -> logits (B, N) and their Jacobian in theta (B, N, D)."""
        z = self.offset + theta[:, : self.d_lin] @ self.features.T
        parts = [self.features.expand(len(theta), -1, -1)]
        if self.nonlinear:
            hidden, masks = self._tower(theta)
            z = z + hidden[-1] @ self.w_out
            # Backpropagate by hand through the ReLU masks: delta is d logit / d pre-activation.
            delta = self.w_out * masks[-1]  # (B, N, w_last)
            for (weight, _), mask in zip(reversed(self.layers), reversed(masks[:-1]), strict=True):
                delta = (delta @ weight) * mask
            parts.append(delta @ self.w_user)  # (B, N, d_mlp)
        return z, torch.cat(parts, -1)

    def _top(self, theta: torch.Tensor) -> torch.Tensor:
        """(B, N, w_last) the tower's last hidden layer alone: `_tower` without the masks and
        the layers kept for backpropagation (a fold-in's line search evaluates many thetas)."""
        hidden = ((theta[:, self.d_lin :] @ self.w_user.T)[:, None, :] + self.item_half).relu_()
        for weight, bias in self.layers:
            hidden = (
                torch.addmm(bias, hidden.flatten(0, 1), weight.T)
                .relu_()
                .view(*hidden.shape[:2], -1)
            )
        return hidden

    def _tower(self, theta: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Hidden activations and ReLU masks of every layer, (B, N, width) each."""
        pre = (theta[:, self.d_lin :] @ self.w_user.T)[:, None, :] + self.item_half
        hidden, masks = [torch.relu(pre)], [pre > 0]
        for weight, bias in self.layers:
            pre = hidden[-1] @ weight.T + bias
            hidden.append(torch.relu(pre))
            masks.append(pre > 0)
        return hidden, masks
