"""Training: Adam over epochs of fresh negatives, early stopping, checkpoints.

A run is the list of stages stages.py plans (pretraining, selection with early stopping on the
validation split, refit on train + validation); this module runs them. The test split is never
read here.

Which loss a step minimises, and what its batches hold, is objective.py's (train.loss); the
loss functions themselves are losses.py's. A graph model (LightGCN) propagates over each
stage's own training pairs: the train split while selecting, train + validation in the refit.

With `train.confidence`, each positive's loss term is weighted by a confidence computed from
its rating (a play count on Last.fm), as implicit-feedback models do (Hu, Koren & Volinsky
2008); BCE's negatives weigh 1, and the loss is the weighted mean, so learning rates keep their
meaning.

Checkpoints: `last.pt` (written after every epoch, everything needed to resume, RNG states
included) and `best.pt` (the model for inference), written through checkpoint.py, which owns
the run directory's files and formats.

Callbacks see every epoch's metrics.jsonl record once it is written (rank 0 only): `tune.py`
reports to Optuna and prunes through one, `tracking.py` logs to MLflow through another.

Under torchrun the same loop runs on every rank through DistributedDataParallel (see
distributed.py): each rank trains on its slice of the epoch, rank 0 validates and broadcasts
the result, and only rank 0 writes files. On CUDA the forward pass runs in bf16 autocast.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from recommender import __version__
from recommender.checkpoint import (
    CONFIG_FILE,
    BestCheckpoint,
    LastCheckpoint,
    append_metrics,
    load_last,
    run_data,
    save_best,
    save_last,
    truncate_metrics,
    write_config,
)
from recommender.config import Config, ModelConfig
from recommender.data.interactions import Interactions
from recommender.data.pipeline import DataBundle
from recommender.data.sampling import NegativeSampler, epoch_batches, to_device
from recommender.data.sequences import latest_sequences
from recommender.distributed import Dist, check_supported
from recommender.evaluate import evaluate_full
from recommender.models import GMF, MLP, NeuMF, RecModel, SASRec, build_model, fit_closed_form
from recommender.objective import Objective, descend
from recommender.sequential import SequenceSource, sequence_epoch, sequence_source
from recommender.stages import Stage, log_plan, plan_stages
from recommender.utils import ConfigError, DataError, RecommenderError

log = logging.getLogger("recommender")

# Called with each epoch's metrics.jsonl record (stage, epoch, loss, samples_per_second, and
# valid in select stages) after it is written and checkpointed, on rank 0 only. In a single
# process a callback may raise to stop training (tune.py prunes a trial so); under DDP it must
# not, as the other ranks would wait for rank 0.
EpochCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class EpochSource:
    """A split's training positives on the device, what every epoch's batches are drawn from."""

    users: torch.Tensor  # (P,) user index of each positive
    items: torch.Tensor  # (P,) its item index
    weights: torch.Tensor | None  # (P,) its confidence; None when train.confidence is none
    context: torch.Tensor | None  # (P, k) the items before it; None when model.context is 0
    sampler: NegativeSampler | None  # draws negatives, knowing each user's positives; None
    # for a loss that draws none per positive (softmax, sampled_softmax)
    objective: Objective  # train.loss, with this split's pool (sampled_softmax)


def confidence_weights(
    rating: np.ndarray, kind: Literal["log", "linear"], alpha: float, epsilon: float
) -> np.ndarray:
    """(P,) ratings (play counts) -> (P,) float32 confidences, each >= 1 (Hu et al. 2008).

    log: 1 + alpha * log(1 + r / epsilon), which tames counts spanning five orders of magnitude
    (Last.fm: 1 to 350,000 plays); linear: 1 + alpha * r.

    Example:
        >>> confidence_weights(np.array([0.0, 9.0]), "linear", 0.5, 1.0).tolist()
        [1.0, 5.5]
    """
    r = np.asarray(rating, dtype=np.float32)  # exact for counts below 2**24
    _check_ratings(r)
    return 1 + np.float32(alpha) * (np.log1p(r / np.float32(epsilon)) if kind == "log" else r)


def _valid_sample(valid: Interactions, users: int | None, seed: int) -> Interactions:
    """The validation rows of `users` users drawn once (seeded), or all rows for None or when
    there are no more users than that: every epoch then validates on the same users."""
    present = np.unique(valid.user_idx)
    if users is None or len(present) <= users:
        return valid
    chosen = np.random.default_rng(seed).choice(present, users, replace=False)
    return valid.subset(np.isin(valid.user_idx, chosen))


def _check_ratings(rating: np.ndarray) -> None:
    bad = ~np.isfinite(rating) | (rating < 0)
    if bad.any():
        raise DataError(
            f"train.confidence needs finite ratings >= 0 (play counts); the training data has "
            f"{rating[bad][0]}"
        )


def train_step(
    net: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    u: torch.Tensor,
    i: torch.Tensor,
    y: torch.Tensor,
    weight: torch.Tensor | None = None,
    amp: bool = False,
    loss_kind: str = "bce",
    context: torch.Tensor | None = None,
    objective: Objective | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch; returns the detached loss.

    `objective` says how the batch becomes a loss (objective.py); without one, `loss_kind`
    names bce or softmax. bce: (B,) pairs with their 0/1 targets `y`. softmax: (B,) positives,
    each the target class among the whole catalog's logits (`y` unused). bpr, ccl: `y` holds
    each row's (B, N) negatives. With `weight` ((B,) row weights), the loss is
    sum(w * l) / sum(w): a weighted mean, so confidences change the balance between rows, not
    the step size. `context` ((B, k) items before each row's positive) goes to a model with
    model.context; `generator` draws sampled_softmax's pool. The benchmarks time this same
    function on ready-made batches.
    """
    objective = objective or Objective(loss_kind)
    with torch.autocast(u.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = objective(net, u, i, y, weight=weight, context=context, generator=generator)
    return descend(loss, optimizers)


class Trainer:
    """Trains the configured model on a DataBundle and writes a run directory.

    Example:
        >>> trainer = Trainer(cfg, load_data(cfg.data, cfg.seed), Path("runs/x"))  # doctest: +SKIP
        >>> model = trainer.fit()                                                  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: Config,
        data: DataBundle,
        out: Path,
        device: torch.device,
        dist: Dist | None = None,
        callbacks: Sequence[EpochCallback] = (),
    ) -> None:
        self.cfg, self.data, self.out, self.device = cfg, data, Path(out), device
        self.dist = dist or Dist()
        self.callbacks = list(callbacks)
        check_supported(self.dist, device, cfg.train.sparse)
        amp = cfg.train.amp
        self.amp = amp is True or (amp == "auto" and device.type == "cuda")
        self.stages = plan_stages(cfg)
        if cfg.train.confidence != "none":
            # Checked before the run directory is written; the weights are built per stage.
            for which in {s.data for s in self.stages}:
                rating = self._split(which).rating
                if rating is None:
                    raise ConfigError(
                        f"train.confidence={cfg.train.confidence} weights positives by their "
                        f"rating, but {data.source} has no rating column (map one with "
                        "data.columns.rating, or set train.confidence=none)"
                    )
                _check_ratings(rating)
        stamps = data.train.timestamp
        if cfg.model.context and stamps is None:
            raise ConfigError(
                f"model.context={cfg.model.context} orders each user's interactions by time, "
                f"but {data.source} has no timestamp column (map one with "
                "data.columns.timestamp, or set model.context=0)"
            )
        if cfg.model.context and stamps is not None and len(stamps) and np.ptp(stamps) == 0:
            log.warning(
                "model.context: every timestamp in %s is the same, so a user's 'latest' items "
                "are ordered by item index alone; the Markov term has no order to learn",
                data.source,
            )
        unordered = stamps is None or (len(stamps) > 0 and np.ptp(stamps) == 0)
        if cfg.model.name == "sasrec" and unordered:
            raise ConfigError(
                f"model.name=sasrec reads each user's items in time order, but {data.source} has "
                f"{'no timestamp column' if stamps is None else 'one timestamp on every row'} "
                "(map one with data.columns.timestamp, or use data.format=sasrec, whose line "
                "order is the time order)"
            )
        self.monitor = cfg.train.monitor
        self.valid_ks = sorted({int(self.monitor.partition("@")[2]), *cfg.eval.ks})
        self.valid = _valid_sample(data.valid, cfg.train.valid_users, cfg.seed)
        self.run_data = run_data(data)
        self.completed: dict[str, dict[str, Any]] = {}
        self._tensors: dict[str, EpochSource] = {}
        self._sequences: dict[str, SequenceSource] = {}

    # -- data on the device ------------------------------------------------------------------

    def _split(self, which: str) -> Interactions:
        return self.data.train if which == "train" else self.data.train_full

    def _epoch_source(self, which: str) -> EpochSource:
        """The positives of a split ("train" or "full") on the device, built once per split."""
        if which not in self._tensors:
            self._tensors.clear()  # stages run all on "train", then all on "full": keep one
            inter = self._split(which)
            t = self.cfg.train
            counts = to_device(inter.item_counts().astype(np.float32), self.device)
            objective = Objective.from_config(t, counts)
            sampler = None
            if objective.num_negatives:
                sampler = NegativeSampler(
                    inter, strategy=t.sampling, power=t.popularity_power, device=self.device
                )
            users = to_device(inter.user_idx, self.device)
            items = to_device(inter.item_idx, self.device)
            weights = None
            if t.confidence != "none":
                assert inter.rating is not None  # checked in __init__
                conf = confidence_weights(
                    inter.rating, t.confidence, t.confidence_alpha, t.confidence_epsilon
                )
                weights = to_device(conf, self.device)
            k = self.cfg.model.context
            context = to_device(inter.previous_items(k), self.device) if k else None
            self._tensors[which] = EpochSource(users, items, weights, context, sampler, objective)
        return self._tensors[which]

    def _sequence_source(self, which: str, max_len: int) -> SequenceSource:
        """A split's training sequences on the device (a sequence model), built once per split."""
        if which not in self._sequences:
            self._sequences = {which: sequence_source(self._split(which), max_len, self.device)}
        return self._sequences[which]

    # -- models and optimisers ---------------------------------------------------------------

    def _model_config(self, name: str) -> ModelConfig:
        return self.cfg.model.model_copy(update={"name": name})

    def _build(self, index: int, stage: Stage) -> RecModel:
        torch.manual_seed(self.cfg.seed + 1000 * index)
        model = build_model(
            self._model_config(stage.model),
            len(self.data.users),
            len(self.data.items),
            sparse=self.cfg.train.sparse,
            cosine=self.cfg.train.loss == "ccl",
        ).to(self.device)
        if stage.init_from is not None:
            assert isinstance(model, NeuMF)
            gmf, mlp = (self._completed_model(name) for name in stage.init_from)
            assert isinstance(gmf, GMF) and isinstance(mlp, MLP)
            model.load_pretrained(gmf, mlp, self.cfg.train.pretrain.alpha)
        split = self._split(stage.data)
        if isinstance(model, SASRec):  # scores after this stage use its data, in time order
            model.set_latest(latest_sequences(split, model.max_len))
        elif model.context:  # the Markov term's, latest first
            model.set_latest(split.latest_items(model.context))
        if model.graph:  # the stage's own training pairs: validation pairs never in a selection
            model.set_graph(split.user_idx, split.item_idx)
        return model

    def _completed_model(self, stage_name: str) -> RecModel:
        done = self.completed[stage_name]
        model = build_model(
            self._model_config(done["model"]), len(self.data.users), len(self.data.items)
        ).to(self.device)
        model.load_state_dict(done["state_dict"])
        return model

    def optimizers(self, model: RecModel, stage: Stage) -> list[torch.optim.Optimizer]:
        fused = self.device.type in ("cpu", "cuda")
        if not self.cfg.train.sparse:
            return [
                torch.optim.Adam(
                    model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay, fused=fused
                )
            ]
        sparse = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        ids = {id(p) for p in sparse}
        dense = [p for p in model.parameters() if id(p) not in ids]
        return [
            torch.optim.SparseAdam(sparse, lr=stage.lr),
            torch.optim.Adam(dense, lr=stage.lr, weight_decay=stage.weight_decay, fused=fused),
        ]

    # -- the loop ----------------------------------------------------------------------------

    def _epoch_seed(self, index: int, epoch: int) -> int:
        return (self.cfg.seed * 1_000_003 + index * 10_007 + epoch) % (2**63)

    def train_epoch(
        self,
        model: RecModel,
        optimizers: list[torch.optim.Optimizer],
        stage: Stage,
        generator: torch.Generator,
        desc: str,
        net: torch.nn.Module | None = None,
    ) -> tuple[float, int, float]:
        """One epoch of this rank's share; `net` is the module to step through (DDP's wrapper
        around `model` when distributed). Returns (mean loss, samples, seconds) of this rank."""
        if isinstance(model, SASRec):  # rows are users' sequences: see sequential.py
            rows = self._sequence_source(stage.data, model.max_len)
            return sequence_epoch(
                model if net is None else net, optimizers, rows, self.cfg.train, generator,
                self.dist, amp=self.amp, desc=desc,
            )  # fmt: skip
        source = self._epoch_source(stage.data)
        t, objective = self.cfg.train, source.objective
        net = model if net is None else net
        pool_generator = None
        if objective.pool is not None:  # each rank its own pools, apart from the batches'
            seed = torch.randint(2**62, (1,), generator=generator, device=generator.device)
            pool_generator = torch.Generator(device=self.device)
            pool_generator.manual_seed(int(seed) + self.dist.rank)
        model.train()
        start = time.perf_counter()
        batches = epoch_batches(
            source.users,
            source.items,
            source.sampler,
            num_negatives=objective.num_negatives,
            batch_size=t.batch_size,
            generator=generator,
            weights=source.weights,
            context=source.context,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            pairs=objective.pairs,
        )
        n_batches = self._steps_per_epoch(model, stage)
        total_loss = torch.zeros((), device=self.device)
        total_weight = torch.zeros((), device=self.device)  # with confidences only
        seen = 0
        quiet = not t.progress or not self.dist.is_main
        bar = tqdm(total=n_batches, desc=desc, leave=False, disable=quiet, unit="batch")
        for step, (u, i, y, *rest) in enumerate(batches):
            # epoch_batches appends a batch's weights, then its contexts, when the source has them
            weight = rest[0] if source.weights is not None else None
            ctx = rest[-1] if source.context is not None else None
            loss = train_step(
                net, optimizers, u, i, y, weight, self.amp, t.loss, ctx, objective, pool_generator
            )
            if weight is None:
                total_loss += loss * len(u)
            else:  # the epoch's loss is the weighted mean its steps minimised
                mass = weight.sum()
                total_loss += loss * mass
                total_weight += mass
            seen += len(u)
            if step % 25 == 0:
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.4f}", samples_s=f"{seen / elapsed:,.0f}")
            bar.update()
        bar.close()
        seconds = time.perf_counter() - start
        # Confidences are >= 1, so their sum is 0 only in an empty epoch.
        denominator = seen if source.weights is None else float(total_weight)
        return float(total_loss) / max(denominator, 1), seen, seconds

    def _steps_per_epoch(self, model: RecModel, stage: Stage) -> int:
        """Optimizer steps in one of this rank's epochs of `stage` (the same every epoch)."""
        batch = self.cfg.train.batch_size
        if isinstance(model, SASRec):
            rows = self._sequence_source(stage.data, model.max_len)
            return math.ceil(len(rows.inputs) // self.dist.world_size / batch)
        source = self._epoch_source(stage.data)
        share = len(source.users) // self.dist.world_size
        return math.ceil(share * source.objective.rows_per_positive() / batch)

    def _patience(self, model: RecModel, stage: Stage) -> int:
        """Epochs without validation gain before `stage` stops: train.patience, or
        train.patience_steps in this stage's epochs."""
        steps = self.cfg.train.patience_steps
        if steps is None:
            return self.cfg.train.patience
        return max(1, math.ceil(steps / max(self._steps_per_epoch(model, stage), 1)))

    def _validate(self, model: RecModel) -> dict[str, float]:
        result = evaluate_full(
            model,
            self.data.train,
            self.valid,
            self.valid_ks,
            batch_users=self.cfg.eval.batch_users,
            device=self.device,
        )
        return result.metrics

    def fit(self, resume: bool = False) -> RecModel:
        """Run every stage (continuing from last.pt when resuming); return the final model."""
        if self.dist.is_main:
            log_plan(self.cfg, self.stages)
        state = self._load_resume_state() if resume else None
        if self.dist.is_main:
            write_config(self.out, self.cfg)
        if not self.stages:
            full = self.data.train_full
            fitted = fit_closed_form(self.cfg.model, full, self.device)
            if self.dist.is_main:
                self._save_best(fitted, self.cfg.model.name, 0, {})
            return fitted
        first = state.stage_index if state else 0
        models = [
            self._run_stage(index, state if index == first else None)
            for index in range(first, len(self.stages))
        ]
        if isinstance(models[-1], SASRec):
            models[-1].load_state_dict(self._served_state(models[-1]))
        return models[-1]

    def _load_resume_state(self) -> LastCheckpoint:
        state = load_last(self.out, map_location=self.device)
        if state.training_digest != self.cfg.training_digest():
            raise RecommenderError(
                f"{self.out}: --resume needs the same config as the original run "
                f"(see {self.out / CONFIG_FILE})"
            )
        self.completed = state.completed
        if self.dist.is_main:
            truncate_metrics(self.out, state.stage_index, state.epoch)
        log.info("resuming %s at stage %s, epoch %d", self.out, state.stage, state.epoch + 1)
        return state

    def _run_stage(self, index: int, resume: LastCheckpoint | None) -> RecModel:
        stage = self.stages[index]
        is_final = index == len(self.stages) - 1
        model = self._build(index, stage)
        optimizers = self.optimizers(model, stage)
        main = self.dist.is_main
        epochs = stage.epochs
        if not stage.early_stopping:
            select = stage.name.replace("refit/", "select/", 1)
            epochs = self.completed[select]["best_epoch"]
        best_metric, best_epoch, bad = -math.inf, 0, 0
        best_state: dict[str, torch.Tensor] | None = None
        best_valid: dict[str, float] = {}
        start_epoch = 1
        if resume is not None:
            model.load_state_dict(resume.model)
            for opt, opt_state in zip(optimizers, resume.optimizers, strict=True):
                opt.load_state_dict(opt_state)
            best_metric, best_epoch, bad = resume.best_metric, resume.best_epoch, resume.bad
            best_state, best_valid = resume.best_state, resume.best_valid
            torch.set_rng_state(resume.torch_rng.cpu())
            if resume.cuda_rng:
                torch.cuda.set_rng_state_all([s.cpu() for s in resume.cuda_rng])
            start_epoch = resume.epoch + 1
        # Wrapped after any resumed weights are in: DDP starts every rank from rank 0's.
        net = self.dist.wrap(model, self.device)
        patience = self._patience(model, stage) if stage.early_stopping else 0
        for epoch in range(start_epoch, epochs + 1):
            if stage.early_stopping and bad >= patience:
                break
            gen = torch.Generator(device=self.device).manual_seed(self._epoch_seed(index, epoch))
            loss, per_rank, seconds = self.train_epoch(
                model, optimizers, stage, gen, f"{stage.name} {epoch}/{epochs}", net
            )
            loss_sum, samples_f = self.dist.sum([loss * per_rank, float(per_rank)], self.device)
            samples = int(samples_f)
            record: dict[str, Any] = {
                "stage": stage.name,
                "stage_index": index,
                "epoch": epoch,
                "loss": loss_sum / max(samples, 1),
                "train_samples": samples,
                "train_seconds": round(seconds, 4),
                "samples_per_second": round(samples / max(seconds, 1e-9), 1),
                "world_size": self.dist.world_size,
                "samples_per_rank": per_rank,
            }
            improved = True
            if stage.early_stopping:
                # Rank 0 validates; every rank gets its metrics and so takes the same decision.
                valid = self.dist.broadcast(self._validate(model) if main else None)
                record["valid"] = valid
                improved = valid[self.monitor] > best_metric
                if improved:
                    best_metric, best_valid = valid[self.monitor], valid
                bad = 0 if improved else bad + 1
            if improved:
                best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if is_final and main:
                    self._save_best(model, stage.model, epoch, best_valid or self._select_valid())
            if not main:
                continue
            # Metrics first: a kill before the checkpoint only repeats this epoch on resume,
            # and the resumed run drops the duplicate line.
            append_metrics(self.out, record)
            self._save_last(
                index,
                epoch,
                model,
                optimizers,
                best_metric,
                best_epoch,
                bad,
                best_state,
                best_valid,
            )
            log.info(
                "%s epoch %d: loss %.4f, %s samples/s%s",
                stage.name,
                epoch,
                loss,
                f"{record['samples_per_second']:,.0f}",
                f", valid {self.monitor} {record['valid'][self.monitor]:.4f}"
                if "valid" in record
                else "",
            )
            for callback in self.callbacks:
                callback(record)
        assert best_state is not None
        model.load_state_dict(best_state)
        self.completed[stage.name] = {
            "model": stage.model,
            "best_epoch": best_epoch,
            "best_metric": best_metric,
            "best_valid": best_valid,
            "state_dict": best_state,
        }
        return model

    def _select_valid(self) -> dict[str, float]:
        """Validation metrics of the selection stage that chose this refit's epoch count."""
        final = self.stages[-1].name.replace("refit/", "select/", 1)
        return self.completed.get(final, {}).get("best_valid", {})

    def _save_last(
        self,
        index: int,
        epoch: int,
        model: RecModel,
        optimizers: list[torch.optim.Optimizer],
        best_metric: float,
        best_epoch: int,
        bad: int,
        best_state: dict[str, torch.Tensor] | None,
        best_valid: dict[str, float],
    ) -> None:
        save_last(
            self.out,
            LastCheckpoint(
                training_digest=self.cfg.training_digest(),
                stage_index=index,
                stage=self.stages[index].name,
                epoch=epoch,
                model=model.state_dict(),
                optimizers=[opt.state_dict() for opt in optimizers],
                best_metric=best_metric,
                best_epoch=best_epoch,
                best_state=best_state,
                best_valid=best_valid,
                bad=bad,
                completed=self.completed,
                torch_rng=torch.get_rng_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            ),
        )

    def _served_state(self, model: RecModel) -> dict[str, torch.Tensor]:
        """The final model's weights. A sequence model last trained on train alone (no refit)
        reads train + validation once trained, so the test item is predicted from everything
        before it, as the sequential literature evaluates; its validation read train alone."""
        state = model.state_dict()
        if isinstance(model, SASRec) and self.stages[-1].data == "train":
            latest = latest_sequences(self.data.train_full, model.max_len)
            state["latest"] = torch.from_numpy(latest).to(state["latest"].device)
        return state

    def _save_best(self, model: RecModel, name: str, epoch: int, valid: dict[str, float]) -> None:
        save_best(
            self.out,
            BestCheckpoint(
                package_version=__version__,
                created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                config=self.cfg.to_dict(),
                config_digest=self.cfg.digest(),
                model_config=self._model_config(name).model_dump(mode="json"),
                n_users=len(self.data.users),
                n_items=len(self.data.items),
                state_dict=self._served_state(model),
                epoch=epoch,
                valid_metrics=valid,
                **self.run_data,
            ),
        )
