"""The plan of a run: which models train, in which order, on which data, for how many epochs.

Plain training is one stage; NeuMF with pretraining trains GMF, then MLP, then NeuMF
initialised from both. With `train.refit`, every stage is first run with early stopping on the
validation split to choose its number of epochs, then re-run on train + validation for exactly
that many epochs. `train.max_epochs` caps every stage's budget, for a short run of the whole
plan, and a run logs its plan before it starts (`log_plan`), so a run that will take hours says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from recommender.config import Config
from recommender.losses import CLOSED_FORM

log = logging.getLogger("recommender")


@dataclass(frozen=True)
class Stage:
    """One model trained for up to `epochs` epochs on `data` ("train" or "full")."""

    name: str
    model: str
    data: str
    epochs: int
    lr: float
    weight_decay: float
    early_stopping: bool
    init_from: tuple[str, str] | None = None  # (gmf stage, mlp stage) for NeuMF pretraining


def plan_stages(cfg: Config) -> list[Stage]:
    """The stages a config asks for, in order; the last one produces the served model.

    `train.max_epochs` caps every stage's budget; a refit stage runs the epochs its select
    stage chose, which the cap has already bounded.
    """
    t, name = cfg.train, cfg.model.name
    if name in CLOSED_FORM:
        return []
    cap = t.max_epochs or math.inf
    pretrain = name == "neumf" and t.pretrain.enabled
    phases = [("select", "train", True)] + ([("refit", "full", False)] if t.refit else [])
    stages = []
    for phase, data, early in phases:
        init = None
        if pretrain:
            for sub, sc in (("gmf", t.pretrain.gmf), ("mlp", t.pretrain.mlp)):
                epochs = int(min(sc.epochs, cap))
                stages.append(
                    Stage(f"{phase}/{sub}", sub, data, epochs, sc.lr, sc.weight_decay, early)
                )
            init = (f"{phase}/gmf", f"{phase}/mlp")
        lr = t.pretrain.finetune_lr if pretrain else t.lr
        epochs = int(min(t.epochs, cap))
        stages.append(Stage(f"{phase}/{name}", name, data, epochs, lr, t.weight_decay, early, init))
    return stages


def log_plan(cfg: Config, stages: Sequence[Stage]) -> None:
    """Say what a run will do before it does it: one INFO line per stage, with its data and
    epoch budget, so a run that will take hours (NeuMF's pretraining and refit) says so."""
    if not stages:
        log.info(
            "plan: %s is fitted in closed form on train + validation; nothing to train",
            cfg.model.name,
        )
        return
    cap = cfg.train.max_epochs
    refit = "then refit on train + validation" if cfg.train.refit else "no refit"
    capped = f", train.max_epochs={cap} caps every stage" if cap is not None else ""
    log.info("plan: %d stage(s), %s%s", len(stages), refit, capped)
    steps = cfg.train.patience_steps
    patience = f"{cfg.train.patience} epochs" if steps is None else f"{steps} steps"
    for number, stage in enumerate(stages, 1):
        if stage.early_stopping:
            budget = (
                f"up to {stage.epochs} epoch(s), early stopping on validation "
                f"{cfg.train.monitor} (patience {patience})"
            )
        else:
            select = stage.name.replace("refit/", "select/", 1)
            budget = f"the epoch count {select} chooses (at most {stage.epochs})"
        data = "train" if stage.data == "train" else "train + validation"
        init = f", initialised from {' and '.join(stage.init_from)}" if stage.init_from else ""
        log.info(
            "plan %d/%d %s: %s on %s, %s, lr %g%s",
            number,
            len(stages),
            stage.name,
            stage.model,
            data,
            budget,
            stage.lr,
            init,
        )
