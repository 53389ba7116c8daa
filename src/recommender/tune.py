"""Hyperparameter search: Optuna over the config's `tune.space`, judged on validation data only.

`recommender tune --config FILE --trials N [--timeout S] --out runs/NAME`:

- The data is loaded once per study. A trial sets its sampled values in the config and runs the
  normal Trainer on the select stages only (no refit); its value is the final stage's best
  validation `train.monitor` (NDCG@10 by default). The test split is never read.
- Every epoch of the final stage reports that metric to Optuna (step = epoch), and the median
  pruner stops a trial that, after `tune.warmup_epochs` epochs, is below the median of earlier
  trials at the same epoch. NeuMF's pretraining stages report nothing: they train other models,
  whose curves say little about the fused one. Median rather than Hyperband: trials end at
  different epochs (early stopping), and the median rule needs neither a fixed epoch budget nor
  the hundreds of trials Hyperband's brackets need to pay off.
- Keys the trial's model ignores (the pretraining rates for GMF, `train.lr` for a pretrained
  NeuMF, ...) are not sampled, so one default space serves every model, and a space that tunes
  `model.name` samples only what the chosen model uses.
- With `tune.repeats` = R > 1 a trial trains R times, at seeds seed .. seed + R - 1 on the same
  data, and its value is the mean of their best validation metrics. On MovieLens-100K's
  leave-last-out split one seed's best trial (0.0727 against 0.0701 for a hand-tuned NeuMF) was
  below the defaults on the test split: one initialisation's luck is about as large as the
  differences a study ranks. Pruning watches the first seed's curve.
- A failed trial (out of memory, an invalid combination) is recorded as failed and the study
  goes on; Ctrl-C and `--timeout` stop it with the completed trials summarised.

The study directory:

    study.db       the Optuna study (SQLite); the same command with the same --out adds trials
    config.yaml    the study's config
    trials/NNNN/   each trial's config.yaml and metrics.jsonl (checkpoints are deleted); with
                   repeats, the further seeds' in trials/NNNN/seed-S/
    trials.csv     number, state, value, epochs, best_epoch, seconds, the sampled values, error
    best.yaml      the best trial's full config (`tune` as given): `recommender train --config
                   best.yaml` retrains it to the same validation score (with repeats, to its
                   first seed's score)
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from recommender.checkpoint import BEST_FILE, CONFIG_FILE, LAST_FILE, prepare_run_dir
from recommender.config import Config
from recommender.data.pipeline import DataBundle
from recommender.search_space import CategoricalParam, FloatParam, IntParam
from recommender.stages import plan_stages
from recommender.tracking import mlflow_run
from recommender.train import EpochCallback, Trainer
from recommender.utils import RecommenderError, atomic_path

if TYPE_CHECKING:
    import optuna

log = logging.getLogger("recommender")

STUDY_NAME = "recommender"
STUDY_DB = "study.db"
# Sampled first: they decide which of the other keys the trial's model uses.
SWITCHES = ("model.name", "train.pretrain.enabled", "train.loss", "train.sampling", "train.pool")


def inert_keys(cfg: Config) -> set[str]:
    """Dotted keys (or whole sections) that cannot change what `cfg` trains.

    Mirrors models.build_model (which model reads which size), stages.plan_stages (which
    stage reads which rate) and objective.Objective (which loss reads which setting).
    """
    name, t = cfg.model.name, cfg.train
    inert = set()
    if name in ("gmf", "mf", "lightgcn"):
        inert |= {"model.mlp_layers", "model.dropout"}
    if name == "mlp":
        inert.add("model.embedding_dim")
    if name != "lightgcn":
        inert |= {"model.layers", "train.embedding_l2"}
    if name != "neumf":
        inert.add("train.pretrain")
    elif t.pretrain.enabled:
        inert.add("train.lr")  # the fused model trains at pretrain.finetune_lr
    else:
        inert |= {f"train.pretrain.{k}" for k in ("gmf", "mlp", "alpha", "finetune_lr")}
    draws = t.loss in ("bce", "bpr", "ccl")  # num_negatives per positive (objective.py)
    if not draws:
        inert |= {"train.num_negatives", "train.sampling"}
    if t.loss != "sampled_softmax":
        inert |= {"train.pool", "train.pool_size", "train.logq"}
    elif t.pool == "in_batch":
        inert.add("train.pool_size")
    if t.loss != "ccl":
        inert |= {"train.ccl_margin", "train.ccl_neg_weight"}
    by_popularity = (draws and t.sampling == "popularity") or (
        t.loss == "sampled_softmax" and t.pool == "popularity"
    )
    if not by_popularity:
        inert.add("train.popularity_power")
    if name == "sasrec":
        inert.add("model.mlp_layers")
        if t.loss != "gbce":
            inert |= {"train.gbce_t", "train.num_negatives"}
        inert.add("train.pool")  # sampled_softmax: uniform only
    return inert


def _is_inert(key: str, inert: set[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in inert)


def _suggest_one(
    trial: optuna.Trial, key: str, spec: FloatParam | IntParam | CategoricalParam
) -> Any:
    if isinstance(spec, FloatParam):
        return trial.suggest_float(key, spec.low, spec.high, log=spec.log)
    if isinstance(spec, IntParam):
        return trial.suggest_int(key, spec.low, spec.high, step=spec.step, log=spec.log)
    if any(isinstance(c, list) for c in spec.choices):
        # Optuna's categorical choices are scalars: lists (MLP widths) go in as their JSON text.
        return json.loads(trial.suggest_categorical(key, [json.dumps(c) for c in spec.choices]))
    return trial.suggest_categorical(key, spec.choices)


def suggest(trial: optuna.Trial, cfg: Config) -> dict[str, Any]:
    """The trial's value for every space key that its model uses, as {dotted key: value}."""
    space = cfg.tune.space
    values = {key: _suggest_one(trial, key, space[key]) for key in SWITCHES if key in space}
    inert = inert_keys(cfg.with_overrides(values) if values else cfg)
    for key, spec in space.items():
        if key not in values and not _is_inert(key, inert):
            values[key] = _suggest_one(trial, key, spec)
    return values


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise RecommenderError("tune needs the optuna package: pip install optuna") from None
    return optuna


def _storage_url(out: Path) -> str:
    return f"sqlite:///{(out / STUDY_DB).resolve()}"


def _check_same_training(study: optuna.Study, cfg: Config, out: Path) -> None:
    """A study's values compare only under one training config (the space may change)."""
    if study.user_attrs.get("training_digest") != cfg.training_digest():
        raise RecommenderError(
            f"{out} holds a study of another training config (see {out / CONFIG_FILE}); "
            "continue it with that config or choose a new --out"
        )


def check_study_dir(out: Path, cfg: Config) -> None:
    """Before any data is read: `out` is new, empty, or a study of the same training config."""
    if out.exists() and not out.is_dir():
        raise RecommenderError(f"{out} exists and is not a directory")
    if (out / STUDY_DB).is_file():
        optuna = _import_optuna()
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=_storage_url(out))
        except KeyError:
            raise RecommenderError(f"{out / STUDY_DB}: holds no '{STUDY_NAME}' study") from None
        _check_same_training(study, cfg, out)
    elif out.is_dir() and any(out.iterdir()):
        raise RecommenderError(f"{out} is not empty and holds no {STUDY_DB}; choose a new --out")


def open_study(cfg: Config, out: Path) -> optuna.Study:
    """Create the study in `out`, or load it to add trials."""
    optuna = _import_optuna()
    check_study_dir(out, cfg)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=_storage_url(out),
        direction="maximize",
        load_if_exists=True,
    )
    if "training_digest" not in study.user_attrs:
        study.set_user_attr("training_digest", cfg.training_digest())
        cfg.save(out / CONFIG_FILE)
    tune = cfg.tune
    done = len(study.trials)
    if done:
        log.info("continuing the study in %s after %d trials", out, done)
    # Offset by the trials so far, or a continued study would replay the first random draws.
    study.sampler = optuna.samplers.TPESampler(
        seed=tune.sampler_seed + done, n_startup_trials=tune.n_startup_trials
    )
    # Steps are epochs from 1 and Optuna prunes from step n_warmup_steps: hence the + 1.
    study.pruner = (
        optuna.pruners.MedianPruner(
            n_startup_trials=tune.n_startup_trials, n_warmup_steps=tune.warmup_epochs + 1
        )
        if tune.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return study


class _Objective:
    """One trial: sample, train the select stages into trials/NNNN, return the best value."""

    def __init__(
        self, cfg: Config, data: DataBundle, out: Path, device: torch.device, mlflow: bool
    ) -> None:
        self.cfg, self.data, self.out, self.device, self.mlflow = cfg, data, out, device, mlflow

    def __call__(self, trial: optuna.Trial) -> float:
        optuna = _import_optuna()
        try:
            return self._run(trial)
        except optuna.TrialPruned:
            raise
        except BaseException as exc:  # recorded for trials.csv; Optuna marks the trial failed
            trial.set_user_attr("error", f"{exc.__class__.__name__}: {exc}".splitlines()[0])
            raise

    def _run(self, trial: optuna.Trial) -> float:
        optuna = _import_optuna()
        values = suggest(trial, self.cfg)
        trial.set_user_attr("values", values)
        cfg = self.cfg.with_overrides(values, source=f"trial {trial.number}")
        select_only = cfg.with_overrides({"train.refit": False})
        final = plan_stages(select_only)[-1].name
        monitor = cfg.train.monitor

        def report(record: dict[str, Any]) -> None:
            if record["stage"] != final:
                return
            trial.report(record["valid"][monitor], step=record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned(f"{monitor} below the median at epoch {record['epoch']}")

        folder = self.out / "trials" / f"{trial.number:04d}"
        prepare_run_dir(folder, overwrite=True, resume=False)
        tracking = (
            mlflow_run(
                f"trial-{trial.number:04d}",
                select_only.model_dump(mode="json", exclude={"tune"}),
                folder,
                skip=(LAST_FILE, BEST_FILE),
                nested=True,
                finished_on=(optuna.TrialPruned,),  # a pruned trial stopped; it did not fail
            )
            if self.mlflow
            else nullcontext(None)
        )
        bests: list[dict[str, Any]] = []
        try:
            with tracking as run:
                for repeat in range(cfg.tune.repeats):
                    callbacks: list[EpochCallback] = []
                    if repeat == 0:
                        # The config's own seed (best.yaml retrains it) alone reports epochs,
                        # to MLflow first so the epoch that gets a trial pruned is logged.
                        run_cfg, where = select_only, folder
                        callbacks = [report] if run is None else [run, report]
                    else:
                        run_cfg = select_only.with_overrides({"seed": select_only.seed + repeat})
                        where = folder / f"seed-{run_cfg.seed}"
                        prepare_run_dir(where, overwrite=True, resume=False)
                    trainer = Trainer(run_cfg, self.data, where, self.device, callbacks=callbacks)
                    trainer.fit()
                    bests.append(trainer.completed[final])
                value = statistics.fmean(float(b["best_metric"]) for b in bests)
                if run is not None:
                    run.log_metrics({f"best/{monitor.replace('@', '_at_')}": value})
        finally:
            # The best trial is retrained from best.yaml; trial checkpoints would only pile up.
            for checkpoint in folder.glob("**/*.pt"):
                checkpoint.unlink()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        trial.set_user_attr("best_epoch", bests[0]["best_epoch"])
        if len(bests) > 1:
            trial.set_user_attr("seed_values", [float(b["best_metric"]) for b in bests])
        return value


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial: number, state, value, epochs, best_epoch, seconds, values, error."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        values = t.user_attrs.get("values", {})
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "value": t.value,
                "epochs": max(t.intermediate_values, default=None),
                "best_epoch": t.user_attrs.get("best_epoch"),
                "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
                **{k: json.dumps(v) if isinstance(v, list) else v for k, v in values.items()},
                "error": t.user_attrs.get("error", ""),
            }
        )
    fixed = ["number", "state", "value", "epochs", "best_epoch", "seconds", "error"]
    frame = pd.DataFrame(rows) if rows else pd.DataFrame(columns=fixed)
    params = [c for c in frame.columns[6:] if c != "error"]
    frame = frame[[*frame.columns[:6], *params, "error"]]
    return frame.astype({"epochs": "Int64", "best_epoch": "Int64"})


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    optuna = _import_optuna()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def write_summary(study: optuna.Study, cfg: Config, out: Path) -> None:
    """Write trials.csv and, once a trial has completed, best.yaml."""
    with atomic_path(out / "trials.csv") as tmp:
        trials_frame(study).to_csv(tmp, index=False)
    complete = _completed(study)
    if complete:
        best = study.best_trial
        seeds = best.user_attrs.get("seed_values")
        per_seed = f" (mean of seeds: {', '.join(f'{v:.6f}' for v in seeds)})" if seeds else ""
        header = (
            f"# Best of {len(complete)} completed trials in {out}: trial {best.number}, "
            f"validation {cfg.train.monitor} {best.value:.6f}{per_seed}.\n"
            f"# Retrain it: recommender train --config {out / 'best.yaml'} --out runs/NAME\n"
        )
        cfg.with_overrides(best.user_attrs["values"]).save(out / "best.yaml", header)


def run_study(
    cfg: Config,
    data: DataBundle,
    out: Path,
    *,
    n_trials: int,
    timeout: float | None = None,
    device: torch.device | None = None,
    mlflow: bool = False,
) -> optuna.Study:
    """Add up to `n_trials` trials (fewer if `timeout` seconds pass) to the study in `out`.

    trials.csv and best.yaml are rewritten after every trial and once more on the way out, so
    they hold every finished trial even after Ctrl-C.
    """
    if not plan_stages(cfg) and "model.name" not in cfg.tune.space:
        raise RecommenderError(
            f"model.name {cfg.model.name} is fitted in closed form, with no validation curve "
            "for a study to follow; compare its settings with train and evaluate on a "
            "validation split"
        )
    device = device or torch.device("cpu")
    study = open_study(cfg, out)
    objective = _Objective(cfg, data, out, device, mlflow)
    tracking = (
        mlflow_run(out.name, cfg.to_dict(), out, skip=("trials",)) if mlflow else nullcontext(None)
    )
    with tracking as run:
        try:
            study.optimize(
                objective,
                n_trials=n_trials,
                timeout=timeout,
                catch=(RecommenderError, RuntimeError),  # torch.OutOfMemoryError is one
                callbacks=[lambda study, _: write_summary(study, cfg, out)],
            )
        finally:
            write_summary(study, cfg, out)
        if not _completed(study):
            raise RecommenderError(f"no trial completed; see {out / 'trials.csv'} and the log")
        if run is not None:
            run.log_metrics({f"best/{cfg.train.monitor.replace('@', '_at_')}": study.best_value})
    return study


def leaderboard(out: Path, monitor: str, top: int = 5) -> str:
    """The best `top` trials of the study in `out`, from its trials.csv ('' before any)."""
    path = out / "trials.csv"
    if not path.is_file():
        return ""
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    if frame.empty:
        return ""
    counts = frame["state"].value_counts()
    states = ", ".join(f"{n} {str(s).lower()}" for s, n in counts.items())
    lines = [f"{len(frame)} trials ({states}); best validation {monitor}:"]
    lines.append(f"  {'trial':>5}  {monitor:>9}  {'epochs':>6}  values")
    params = [c for c in frame.columns[6:] if c != "error"]
    ranked = frame[frame["state"] == "COMPLETE"].sort_values("value", ascending=False)
    for _, row in ranked.head(top).iterrows():
        shown = " ".join(f"{k}={_short(row[k])}" for k in params if not _missing(row[k]))
        lines.append(f"  {row['number']:>5}  {row['value']:>9.5f}  {row['epochs']:>6.0f}  {shown}")
    return "\n".join(lines)


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
