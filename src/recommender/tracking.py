"""Optional MLflow tracking: the resolved config as params, every epoch's metrics, the run files.

Off unless asked for (`--mlflow` on `train` and `tune`). MLflow is imported only then, so the
package works without it installed. Runs go where MLflow sends them: `MLFLOW_TRACKING_URI` when
set, else MLflow 3's default, `sqlite:///mlflow.db` in the working directory with artifacts under
`./mlruns`. (The plain `./mlruns` file store is in maintenance mode in MLflow 3 and refuses to
open unless `MLFLOW_ALLOW_FILE_STORE=true`.)

`mlflow_run` opens a run and yields an `MlflowRun`, which is a Trainer epoch callback:

    >>> with mlflow_run("gmf", cfg.to_dict(), artifacts=out) as run:  # doctest: +SKIP
    ...     Trainer(cfg, data, out, device, callbacks=[run]).fit()
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

from recommender.checkpoint import LAST_FILE
from recommender.utils import RecommenderError

log = logging.getLogger("recommender")


def import_mlflow() -> ModuleType:
    """The mlflow module, or a one-line error that says what to install."""
    try:
        import mlflow
    except ImportError:
        raise RecommenderError(
            "--mlflow needs the mlflow package: pip install mlflow-skinny"
        ) from None
    return mlflow


def flat_params(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: {"train.pretrain.gmf.lr": "0.005", ...}, lists as JSON."""
    params: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return params


def epoch_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as MLflow metrics named by stage: "select/gmf/valid/ndcg_at_10".

    MLflow metric names may not contain "@", hence "_at_".
    """
    stage = record["stage"]
    metrics = {
        f"{stage}/loss": float(record["loss"]),
        f"{stage}/samples_per_second": float(record["samples_per_second"]),
    }
    for name, value in record.get("valid", {}).items():
        metrics[f"{stage}/valid/{name.replace('@', '_at_')}"] = float(value)
    return metrics


class MlflowRun:
    """An open MLflow run. Called with a Trainer epoch record, it logs that epoch (step = epoch).

    A failed log call is a warning, not an error: a tracking server that hiccups must not end a
    long training run.
    """

    def __init__(self, mlflow: ModuleType, run_id: str) -> None:
        self._mlflow, self.run_id = mlflow, run_id

    def __call__(self, record: dict[str, Any]) -> None:
        self.log_metrics(epoch_metrics(record), step=int(record["epoch"]))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        try:
            self._mlflow.log_metrics(dict(metrics), step=step, run_id=self.run_id)
        except Exception as exc:  # MlflowException, or the HTTP client's own errors
            log.warning("MLflow: could not log metrics (%s)", exc)

    def log_dir(self, folder: Path, skip: Collection[str]) -> None:
        """Every file and folder in `folder` as artifacts, except the names in `skip`."""
        for path in sorted(folder.iterdir()):
            if path.name in skip or path.name.startswith("."):  # .NAME.tmp: an atomic write
                continue
            try:
                if path.is_dir():
                    self._mlflow.log_artifacts(str(path), path.name, run_id=self.run_id)
                else:
                    self._mlflow.log_artifact(str(path), run_id=self.run_id)
            except Exception as exc:  # as in log_metrics
                log.warning("MLflow: could not log %s (%s)", path, exc)


@contextmanager
def mlflow_run(
    name: str,
    config: Mapping[str, Any],
    artifacts: Path | None = None,
    *,
    skip: Collection[str] = (LAST_FILE,),
    nested: bool = False,
    finished_on: tuple[type[BaseException], ...] = (),
) -> Iterator[MlflowRun]:
    """Open a run named `name` with `config` flattened into params; on leaving, log the files in
    `artifacts` (if it still exists) and close the run as FINISHED, FAILED or KILLED (Ctrl-C).

    `last.pt` is skipped by default: it only serves `--resume` and is as large as the model and
    its optimiser state together. `nested` opens a child of the active run (a tuning trial);
    exceptions in `finished_on` (a pruned trial) end the run as FINISHED and propagate.
    """
    mlflow = import_mlflow()
    from mlflow.exceptions import MlflowException

    try:
        active = mlflow.start_run(run_name=name, nested=nested)
    except MlflowException as exc:
        lines = str(exc).splitlines() or [exc.__class__.__name__]
        raise RecommenderError(f"MLflow: {lines[0]}") from None
    run = MlflowRun(mlflow, active.info.run_id)
    status = "FAILED"
    try:
        mlflow.log_params(flat_params(config), run_id=run.run_id)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except finished_on:
        status = "FINISHED"
        raise
    finally:
        if artifacts is not None and artifacts.is_dir():
            run.log_dir(artifacts, skip)
        mlflow.end_run(status)
