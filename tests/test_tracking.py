"""Optional MLflow tracking: params, per-epoch metrics and artifacts land in a local store, and
the package works (and `--mlflow` fails clearly) without MLflow installed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import FAST, run_cli
from recommender.tracking import epoch_metrics, flat_params

SETS = [*FAST, "train.epochs=3"]


def train_args(planted_csv: Path, out: Path, *extra: str) -> list[str]:
    sets = [f"--set={s}" for s in SETS]
    return ["train", "--data", str(planted_csv), "--model", "gmf", *sets, "--out", str(out), *extra]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A local MLflow file store under tmp_path (MLflow 3 opens one only when allowed)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def test_flat_params_and_metric_names():
    tree = {"seed": 1, "model": {"mlp_layers": [32, 16], "name": "gmf"}, "data": {"sep": None}}
    assert flat_params(tree) == {
        "seed": "1", "model.mlp_layers": "[32, 16]", "model.name": "gmf", "data.sep": "None",
    }  # fmt: skip
    record = {"stage": "select/gmf", "epoch": 2, "loss": 0.5, "samples_per_second": 10.0,
              "valid": {"ndcg@10": 0.25}}  # fmt: skip
    assert epoch_metrics(record) == {
        "select/gmf/loss": 0.5,
        "select/gmf/samples_per_second": 10.0,
        "select/gmf/valid/ndcg_at_10": 0.25,
    }


def test_a_tracked_run_logs_params_epochs_and_the_run_directory(
    planted_csv: Path, tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(planted_csv, out, "--mlflow"), capsys)
    assert code == 0, err

    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    params = run.data.params
    assert params["model.name"] == "gmf" and params["train.epochs"] == "3"
    assert params["model.mlp_layers"] == "[32, 16, 8]"
    assert not any(key.startswith("tune.") for key in params)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    select = [r for r in records if r["stage"] == "select/gmf"]
    history = client.get_metric_history(run.info.run_id, "select/gmf/valid/ndcg_at_10")
    assert [(m.step, m.value) for m in history] == [
        (r["epoch"], pytest.approx(r["valid"]["ndcg@10"])) for r in select
    ]
    losses = client.get_metric_history(run.info.run_id, "refit/gmf/loss")
    assert [m.step for m in losses] == [r["epoch"] for r in records if r["stage"] == "refit/gmf"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"best.pt", "config.yaml", "metrics.jsonl"}  # last.pt only resumes


def test_a_tracked_study_nests_one_run_per_trial(
    planted_csv: Path, tmp_path: Path, store: str, capsys: pytest.CaptureFixture[str]
):
    mlflow = pytest.importorskip("mlflow")
    out = tmp_path / "study"
    space = "tune.space={train.lr: {type: float, low: 0.005, high: 0.05, log: true}}"
    sets = [f"--set={s}" for s in [*SETS, "model.name=gmf", space, "tune.pruner=none"]]
    args = ["tune", "--data", str(planted_csv), *sets, "--trials", "2", "--out", str(out)]
    code, _, err = run_cli([*args, "--mlflow"], capsys)
    assert code == 0, err

    client = mlflow.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "study")
    trials = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in trials] == ["trial-0000", "trial-0001"]
    for trial in trials:
        assert trial.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert trial.info.status == "FINISHED"
        assert {a.path for a in client.list_artifacts(trial.info.run_id)} == {
            "config.yaml", "metrics.jsonl",
        }  # fmt: skip
        assert trial.data.params["train.refit"] == "False"  # what the trial trained
    assert parent.data.params["tune.space.train.lr.high"] == "0.05"
    best = max(t.data.metrics["best/ndcg_at_10"] for t in trials)
    assert parent.data.metrics["best/ndcg_at_10"] == pytest.approx(best)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"best.yaml", "config.yaml", "study.db", "trials.csv"}


def test_without_mlflow_training_works_and_the_flag_says_what_to_install(
    planted_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` now raises ImportError
    code, _, err = run_cli(train_args(planted_csv, tmp_path / "plain"), capsys)
    assert code == 0, err

    for command in ("train", "tune"):
        out = tmp_path / command
        args = train_args(planted_csv, out, "--mlflow")
        if command == "tune":
            args = ["tune", *args[1:], "--trials", "1"]
        code, _, err = run_cli(args, capsys)
        assert code == 2
        assert err == "error: --mlflow needs the mlflow package: pip install mlflow-skinny\n"
        assert not out.exists()  # refused before any data is read
