"""SASRec: causal self-attention over a user's recent items (Kang & McAuley, ICDM 2018).

A sequence is the user's latest items in time order, LEFT-padded to `max_len` with the index
`n_items`, so the most recent item is always the last column. Each position's output, after L
pre-LayerNorm attention blocks that only look backwards, is scored against the item embedding
table by dot product: the next item is predicted at every position during training, and the
catalog is one matmul against a precomputed item side when serving (full ranking, ANN).

Positions are counted from the sequence's end (the latest item is position 0), so the same
items give the same outputs however much padding precedes them, and padded keys are masked, so
padding never leaks into a real position.

After training, every user's latest `max_len` items are kept in the `latest` buffer (saved with
the weights), which makes the RecModel contract (`forward(user_idx, item_idx)`, `score_all`)
answer for known users; `score_after` answers for any given sequence (a session) and for a
known user's stored sequence followed by given items (`sequence_after`).

The losses of this model are pure functions of its logits: `sequence_softmax_loss` (the full
softmax at every position), and for catalogs where a softmax at every position is too big,
`sampled_softmax_loss` (against uniformly drawn negatives shared by the batch, logQ-corrected)
and `gbce_loss` (gSASRec's calibrated BCE with such negatives).

Example:
    >>> model = SASRec(n_users=943, n_items=1682, max_len=50)
    >>> logits = model(inputs, targets, negatives)  # (B, L), (B, L), (K,) -> (N, 1 + K)
    >>> loss = gbce_loss(logits, n_items=1682)
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recommender.models.base import SCORE_BUDGET, RecModel


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(LN(x)), then x + ffn(LN(x))."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by n_heads {n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.attn_norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        # SASRec's point-wise feed-forward keeps the width at dim.
        self.ffn = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, L, d), (B, 1, L, L) bool (True: may attend) -> (B, L, d)."""
        b, length, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).split(d, dim=-1)
        q, k, v = (t.view(b, length, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.drop(self.out(a.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class SASRec(RecModel):
    """Next-item logits: encode(seq)[position] · item_emb[item] + bias."""

    latest: torch.Tensor  # (n_users, max_len) each user's latest items, latest last

    def __init__(
        self,
        n_users: int,
        n_items: int,
        dim: int = 64,
        max_len: int = 50,
        n_blocks: int = 2,
        n_heads: int = 1,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        self.n_users, self.n_items, self.dim, self.max_len = n_users, n_items, dim, max_len
        self.context = max_len  # recommend_next and sessions follow given items (RecModel)
        # Row n_items is the padding: zero and without gradient.
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)
        self.pos_emb = nn.Embedding(max_len, dim)
        # Inputs are scaled by sqrt(dim), so items enter the blocks at unit scale while the
        # same table, unscaled, gives logits of unit scale at the output.
        nn.init.normal_(self.item_emb.weight, std=dim**-0.5)
        nn.init.normal_(self.pos_emb.weight, std=0.5)
        with torch.no_grad():
            self.item_emb.weight[n_items].zero_()
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, dropout) for _ in range(n_blocks))
        self.final_norm = nn.LayerNorm(dim)
        # One offset for every logit: no effect on a ranking or a softmax, but BCE-type losses
        # (gbce_loss) want most logits far below zero from the start; left at zero, gBCE spent
        # its first hundreds of steps pushing every hidden state into one shared direction
        # and stayed near a popularity model on ml-100k.
        self.bias = nn.Parameter(torch.tensor(-math.log(n_items)))
        self.register_buffer("latest", torch.full((n_users, max_len), n_items))

    def set_latest(self, latest: np.ndarray) -> None:
        """Keep each user's latest items ((n_users, max_len), left-padded, latest last, as
        data.sequences.latest_sequences gives them) as the sequence every later score reads."""
        self.latest.copy_(torch.from_numpy(latest))

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) item indices, left-padded with n_items, L <= max_len -> (B, L, d) outputs;
        the output at position t depends only on the items at positions <= t."""
        length = seq.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {self.max_len}")
        real = seq != self.n_items  # (B, L)
        positions = torch.arange(length - 1, -1, -1, device=seq.device)  # latest: 0
        x = self.item_emb(seq) * math.sqrt(self.dim) + self.pos_emb(positions)
        x = self.emb_drop(x) * real.unsqueeze(-1)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        # A query sees earlier real items and always itself, so a padded row is never empty
        # (an all-masked softmax is NaN); padded outputs are zeroed after every block.
        mask = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=seq.device)
        mask = mask.unsqueeze(1)  # (B, 1, L, L): shared by the heads
        for block in self.blocks:
            x = block(x, mask) * real.unsqueeze(-1)
        return self.final_norm(x)

    def last_hidden(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) sequences, any L (only the latest max_len items are read) -> (B, d) the
        output after each sequence's latest item: the user side of the next item's score."""
        return self.encode(seq[:, -self.max_len :])[:, -1]

    def forward(
        self,
        x: torch.Tensor,
        items: torch.Tensor | None = None,
        negatives: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits; the rank of `x` tells the two uses apart.

        - x (B,) user indices, items (B,) -> (B,): the RecModel contract, each user's score of
          an item after their stored latest sequence (evaluation, serving).
        - x (B, L) input sequences, items (B, L) their targets (n_items where none), training:
          with `negatives` (K,) -> (N, 1 + K): at the N positions with a target, row-major,
          the target, then K negatives shared by every position, -inf where a negative is
          that target (gbce_loss, sampled_softmax_loss); without -> (N, n_items): the catalog
          at those positions, labels `items[items != n_items]` (sequence_softmax_loss).
          Padded positions are never scored: a batch is cut to its longest sequence, and the
          shorter ones' padding would otherwise cost an output row each.
        Training goes through forward so that DDP's wrapper synchronises the gradients.
        """
        if x.dim() == 1:
            if items is None:
                raise ValueError("scoring users needs items (B,)")
            users, inverse = torch.unique(x, return_inverse=True)  # a user once, not per item
            hidden = self.last_hidden(self.latest[users])[inverse]  # (B, d)
            return (hidden * self.item_emb(items)).sum(-1) + self.bias
        if items is None:
            raise ValueError("training on sequences needs their targets (B, L)")
        real = items != self.n_items
        hidden = self.encode(x)[real]  # (N, d)
        if negatives is None:
            return hidden @ self.item_emb.weight[: self.n_items].T + self.bias
        targets = items[real]
        positive = (hidden * self.item_emb(targets)).sum(-1, keepdim=True)  # (N, 1)
        negative = hidden @ self.item_emb(negatives).T  # (N, K)
        # A drawn negative that is the position's own target is no negative: with K/n_items
        # of 15% it would otherwise push down the very item it should raise.
        negative = negative.masked_fill_(negatives == targets[:, None], -torch.inf)
        return torch.cat([positive, negative], -1) + self.bias

    def sequence_after(
        self, context: torch.Tensor, user_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) items in time order, latest last, n_items padding [, (B,) users] -> (B,
        L') the sequences the model reads: the items alone (a session) or each user's stored
        sequence followed by them, the padding moved to the left and the latest max_len kept.
        Stored sequences are left-padded, so without the move a user with fewer than max_len
        items would have padding between their items and the given ones, and every earlier
        item would sit at a position it was never trained at. Columns that are padding in
        every row are cut (they change no output), so short sequences cost what they hold."""
        seq = context if user_idx is None else torch.cat([self.latest[user_idx], context], 1)
        real = (seq != self.n_items).to(torch.uint8)
        order = torch.sort(real, dim=1, stable=True).indices  # padding first, items in order
        longest = max(int(real.sum(1).max()), 1) if len(seq) else 1
        return seq.gather(1, order)[:, -min(longest, self.max_len) :]

    def context_after(self, recent: torch.Tensor, user_idx: int | None = None) -> torch.Tensor:
        """(R,) items just interacted with, oldest first -> (min(R, max_len),) the latest of
        them in time order: `score_after` puts a known user's stored sequence before them."""
        return recent[-self.max_len :]

    def latest_of(self, user_idx: int) -> torch.Tensor:
        """As RecModel's; the stored sequence is oldest first, so it is read backwards."""
        row = self.latest[user_idx]
        return row[row != self.n_items].flip(0)

    def score_after(
        self, context: torch.Tensor, user_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, L) items in time order, latest last, n_items padding [, (B,) users] ->
        (B, n_items) logits of the next item after `sequence_after`'s sequences."""
        hidden = self.last_hidden(self.sequence_after(context, user_idx))
        return hidden @ self.item_emb.weight[: self.n_items].T + self.bias

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return (self.item_emb.weight[: self.n_items],)

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        # sequence_after cuts the padding columns the users share: short histories cost less
        return self.last_hidden(self.sequence_after(self.latest[user_idx])) @ cache[0].T + self.bias

    def item_representation(self) -> torch.Tensor:
        return self.item_emb.weight[: self.n_items]

    @torch.no_grad()
    def retrieval_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(n_users, d + 1) outputs after each user's latest sequence and a 1, (n_items, d + 1)
        item table and the bias."""
        rows = max(1, SCORE_BUDGET // (self.max_len * self.dim))
        users = torch.cat([self.last_hidden(chunk) for chunk in self.latest.split(rows)])
        items = self.item_emb.weight[: self.n_items]
        return (
            torch.cat([users, torch.ones_like(users[:, :1])], 1),
            torch.cat([items, self.bias.expand(self.n_items, 1)], 1),
        )


def sequence_softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., n_items) catalog logits, (...) target items, n_items where none -> scalar mean
    cross-entropy over the positions with a target: the full softmax of next-item training."""
    n_items = logits.shape[-1]
    return F.cross_entropy(logits.reshape(-1, n_items), targets.reshape(-1), ignore_index=n_items)


def sampled_softmax_loss(logits: torch.Tensor, n_items: int, logq: bool = True) -> torch.Tensor:
    """Sampled softmax with K uniformly drawn negatives (Jean et al. 2015; Yi et al. 2019).

    (N, 1 + K) logits of N positions, the target first (a negative that is the target at
    -inf) -> scalar mean of the target's cross-entropy against itself and the negatives.
    `logq` subtracts from each negative's logit the log of its expected copies among K uniform
    draws, log(K / n_items), so the K terms stand for the whole catalog's and the loss follows
    the full softmax's as K grows.
    """
    shift = math.log((logits.shape[-1] - 1) / n_items) if logq else 0.0
    negatives = torch.logsumexp(logits[:, 1:], -1) - shift
    return (torch.logaddexp(logits[:, 0], negatives) - logits[:, 0]).mean()


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """gSASRec's exponent: beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = K / (n_items - 1)
    the negative sampling rate; t = 0 is plain BCE, t = 1 fully calibrated."""
    alpha = n_negatives / (n_items - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def gbce_loss(logits: torch.Tensor, n_items: int, t: float = 0.75) -> torch.Tensor:
    """Generalised BCE (Petrov & Macdonald, RecSys 2023) with uniformly sampled negatives.

    (N, 1 + K) logits of N positions, the target first -> scalar: the mean of
    -log(sigmoid(s+)^beta) - sum_k log(1 - sigmoid(s-_k)). Raising the positive's probability
    to beta < 1 undoes the overconfidence that BCE with few sampled negatives learns, so its
    scores rank like a full softmax's.
    """
    beta = gbce_beta(logits.shape[-1] - 1, n_items, t)
    return (beta * F.softplus(-logits[:, 0]) + F.softplus(logits[:, 1:]).sum(-1)).mean()
