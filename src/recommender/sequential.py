"""Training a next-item model (SASRec) on users' sequences: an epoch's batches and its step.

An epoch's rows are users, each an (inputs, targets) pair of left-padded sequences
(data.sequences.training_sequences) predicting the next item at every position. One seeded
permutation shuffles the rows and batches are slices of it, as for the pair models
(data/sampling.py); under DDP every rank takes a disjoint, equal share of the same permutation.
The loss is the full softmax over the catalog at every position, or gSASRec's gBCE against
`num_negatives` items drawn uniformly once per batch and shared by all its positions: a cost
per position that does not grow with the catalog.

Trainer.train_epoch hands a SASRec's epoch to `sequence_epoch`; everything around it (stages,
early stopping, checkpoints, resume, callbacks) is the one loop of train.py. An epoch's
"samples" are the positions with a target, so samples_per_second is positions per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from recommender.config import TrainConfig
from recommender.data.interactions import Interactions
from recommender.data.sampling import to_device
from recommender.data.sequences import training_sequences
from recommender.distributed import Dist
from recommender.models.sasrec import gbce_loss, sampled_softmax_loss, sequence_softmax_loss
from recommender.objective import descend


@dataclass(frozen=True)
class SequenceSource:
    """A split's training sequences on the device: users with at least one target."""

    inputs: torch.Tensor  # (R, L) items, left-padded with n_items
    targets: torch.Tensor  # (R, L) the item after each input, n_items where none
    n_items: int


def sequence_source(data: Interactions, max_len: int, device: torch.device) -> SequenceSource:
    """The (inputs, targets) rows of `data`'s users with two or more items, on `device`."""
    inputs, targets = training_sequences(data, max_len)
    keep = (targets != data.n_items).any(1)
    return SequenceSource(
        to_device(inputs[keep], device), to_device(targets[keep], device), data.n_items
    )


def sequence_batches(
    source: SequenceSource,
    *,
    batch_size: int,
    num_negatives: int,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yield (inputs (B, L), targets (B, L), negatives (K,) or None) batches of one epoch, L
    the longest sequence in the batch (at most max_len).

    num_negatives > 0 draws K uniform items per batch (gbce, sampled_softmax); 0 draws none
    (softmax). Under DDP the permutation is the same on every rank (the generator is seeded
    identically) and negatives come from a generator offset by the rank, as in
    sampling.epoch_batches.
    """
    device = source.inputs.device
    perm = torch.randperm(len(source.inputs), generator=generator, device=device)
    if world_size > 1:
        share = len(perm) // world_size
        perm = perm[rank * share : (rank + 1) * share]
        offset = int(torch.randint(2**62, (1,), generator=generator, device=device))
        generator = torch.Generator(device=device).manual_seed(offset + rank)
    for rows in perm.split(batch_size):
        negatives = None
        if num_negatives:
            negatives = torch.randint(
                source.n_items, (num_negatives,), generator=generator, device=device
            )
        inputs, targets = source.inputs[rows], source.targets[rows]
        # Columns that are padding in every row change no output (positions count from the
        # end, padding is masked): cut them, so a batch of short sequences costs what they do.
        first = int((inputs != source.n_items).any(0).int().argmax())
        yield inputs[:, first:], targets[:, first:], negatives


def sequence_step(
    net: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor | None,
    *,
    n_items: int,
    loss: str,
    gbce_t: float = 0.75,
    logq: bool = True,
    amp: bool = False,
) -> torch.Tensor:
    """One optimisation step on (B, L) sequences; returns the detached mean loss over the
    positions with a target. Without negatives: the full softmax (SASRec's forward gives the
    catalog's logits at each such position); with (K,) negatives: `loss`, gbce or
    sampled_softmax."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = net(inputs, targets, negatives).float()
    if negatives is None:
        value = sequence_softmax_loss(logits, targets[targets != n_items])
    elif loss == "sampled_softmax":
        value = sampled_softmax_loss(logits, n_items, logq)
    else:
        value = gbce_loss(logits, n_items, gbce_t)
    return descend(value, optimizers)


def drawn_negatives(train: TrainConfig, n_items: int) -> int:
    """Negatives a batch draws for SASRec: num_negatives for gbce; pool_size for
    sampled_softmax, unless the pool would hold the whole catalog, whose full softmax is then
    exact and no dearer (ml-100k's 1,682 items under a pool of 4,096); none for softmax."""
    if train.loss == "gbce":
        return train.num_negatives
    if train.loss == "sampled_softmax" and train.pool_size < n_items:
        return train.pool_size
    return 0


def sequence_epoch(
    net: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    source: SequenceSource,
    train: TrainConfig,
    generator: torch.Generator,
    dist: Dist,
    *,
    amp: bool,
    desc: str,
) -> tuple[float, int, float]:
    """One epoch of this rank's share: (mean loss over its positions, positions, seconds)."""
    negatives = drawn_negatives(train, source.n_items)
    net.train()
    start = time.perf_counter()
    batches = sequence_batches(
        source,
        batch_size=train.batch_size,
        num_negatives=negatives,
        generator=generator,
        rank=dist.rank,
        world_size=dist.world_size,
    )
    n_batches = math.ceil(len(source.inputs) // dist.world_size / train.batch_size)
    quiet = not train.progress or not dist.is_main
    bar = tqdm(total=n_batches, desc=desc, leave=False, disable=quiet, unit="batch")
    total_loss = torch.zeros((), device=source.inputs.device)
    seen = torch.zeros((), dtype=torch.long, device=source.inputs.device)  # no sync per step
    for step, (inputs, targets, negs) in enumerate(batches):
        loss = sequence_step(
            net, optimizers, inputs, targets, negs, n_items=source.n_items, loss=train.loss,
            gbce_t=train.gbce_t, logq=train.logq, amp=amp,
        )  # fmt: skip
        positions = (targets != source.n_items).sum()
        total_loss += loss * positions
        seen += positions
        if step % 25 == 0:
            rate = int(seen) / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", positions_s=f"{rate:,.0f}")
        bar.update()
    bar.close()
    return float(total_loss) / max(int(seen), 1), int(seen), time.perf_counter() - start
