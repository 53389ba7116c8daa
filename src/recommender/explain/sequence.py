"""Explanations for SASRec: each item of the sequence it read, taken out and the score re-read.

SASRec has no user vector to refit (fold_in.py) and no graph edge to re-weight (graph.py): a
user is the sequence of their latest items, read by causal self-attention. So an item's share
of a recommendation is measured by removing it. The sequence is the one the explained list was
scored from: a known user's stored latest items, followed by the recent items of a
`recommend_next` list (SASRec.sequence_after). Each distinct item of it is removed, every
occurrence, the gap closed so the other items keep their order and stand next to each other,
as if the user had never interacted with it; the item's weight is how much the shown score
(the sigmoid of the logit) drops without it:

    w_j = score(S) - score(S without j)

positive where the item raises the score. All removals go through the model as one batch of
sequences, the whole sequence and the empty one included ((U + 2, max_len) for U distinct
items), and only the (U + 2, d) outputs after each sequence's latest item are kept, so each
explained item then costs one dot product per sequence.

Occlusion, not attention weights: attention says where a layer looked, not what the score
would be without an item, and two blocks mix every position into every other. Occlusion
answers the counterfactual a reader takes "because you watched X" to mean, exactly for one
item; items interact through attention, so the weights do not sum to score - baseline, the
score after the empty sequence.

Example:
    >>> why = SequenceExplainer(model).user(user_idx, history).attribute(targets)  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from recommender.explain.fold_in import Attribution
from recommender.models.sasrec import SASRec
from recommender.utils import RecommenderError


class SequenceExplainer:
    """Occlusion attributions of a trained SASRec's scores to the items of a user's sequence."""

    method = "sequence occlusion"  # what an Explanation says produced it

    def __init__(self, model: SASRec) -> None:
        self.model = model

    @torch.no_grad()
    def user(
        self,
        user_idx: int,
        history: torch.Tensor | np.ndarray,
        latest: torch.Tensor | np.ndarray | None = None,
    ) -> SequenceUser:
        """A known user's sequence: the stored one, followed by `latest` (the row
        `SASRec.context_after` gave a `recommend_next` list, oldest first) where given.
        `history` (H,) holds the items an explanation may name, each once: the user's history
        and recent items, which hold every item of the sequence."""
        device = self.model.item_emb.weight.device
        empty = torch.zeros(1, 0, dtype=torch.long, device=device)
        recent = empty if latest is None else torch.as_tensor(latest, device=device)[None]
        users = torch.tensor([user_idx], device=device)
        sequence = self.model.sequence_after(recent, users)[0]
        history = torch.as_tensor(history, dtype=torch.long, device=device)
        return SequenceUser(self.model, history, sequence)


class SequenceUser:
    """One sequence's outputs with each of its items removed, for any items to explain."""

    def __init__(self, model: SASRec, history: torch.Tensor, sequence: torch.Tensor) -> None:
        self.model, self.history = model, history
        pad = model.n_items
        items = torch.unique(sequence[sequence != pad])  # (U,) sorted
        without = torch.where(sequence == items[:, None], pad, sequence)  # (U, L)
        batch = torch.cat([sequence[None], without, torch.full_like(sequence, pad)[None]])
        # sequence_after moves each gap to the left, closing it
        self.hidden = model.last_hidden(model.sequence_after(batch))  # (U + 2, d)
        # the history items the sequence holds, and the row that removed each; the others,
        # never read, weigh 0
        self.read = torch.isin(history, items)  # (H,)
        self.row = torch.searchsorted(items, history[self.read]) + 1

    @torch.no_grad()
    def attribute(self, targets: torch.Tensor) -> Attribution:
        """(T,) target items -> (T, H) weights over `history`: each item's score drop when
        removed (module doc); score after the whole sequence, baseline after none of it.
        Fidelity 1: the explained scores are the model's own."""
        model = self.model
        if len(targets) and not 0 <= int(targets.min()) <= int(targets.max()) < model.n_items:
            raise RecommenderError(f"target item indices must lie in [0, {model.n_items})")
        scores = torch.sigmoid(self.hidden @ model.item_emb(targets).T + model.bias)  # (U+2, T)
        score, baseline = scores[0], scores[-1]
        weights = scores.new_zeros(len(targets), len(self.history))
        weights[:, self.read] = score[:, None] - scores[self.row].T
        return Attribution(weights, score, baseline, 1.0)
