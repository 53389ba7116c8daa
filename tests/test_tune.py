"""`recommender tune`: trials on validation data, pruning, a study that continues, failures,
Ctrl-C, and a best.yaml that retrains to the best trial's validation score."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml

from conftest import FAST, run_cli
from recommender.checkpoint import load_checkpoint
from recommender.config import Config, load_config
from recommender.data.pipeline import DataBundle, load_data
from recommender.evaluate import evaluate_full
from recommender.models import Popularity
from recommender.train import Trainer
from recommender.tune import check_study_dir, inert_keys, open_study, run_study, suggest
from recommender.utils import RecommenderError

# GMF, 4 epochs per trial: a trial takes well under a second on the planted data.
SPACE = (
    "tune.space={train.lr: {type: float, low: 0.005, high: 0.05, log: true}, "
    "model.embedding_dim: {type: categorical, choices: [8, 16]}}"
)
STUDY = [*FAST, "model.name=gmf", "train.epochs=4", "tune.n_startup_trials=1", SPACE]


def study_config(planted_csv: Path, *extra: str) -> Config:
    return load_config(None, [*STUDY, "data.dataset=null", f"data.path={planted_csv}", *extra])


@pytest.fixture(scope="module")
def data(planted_csv: Path) -> DataBundle:
    cfg = study_config(planted_csv)
    return load_data(cfg.data, cfg.seed)


def tune_args(planted_csv: Path, out: Path, trials: int, *extra: str) -> list[str]:
    sets = [f"--set={s}" for s in [*STUDY, *extra]]
    return ["tune", "--data", str(planted_csv), *sets, "--trials", str(trials), "--out", str(out)]


def trials_csv(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "trials.csv", keep_default_na=False, na_values=[""])


def test_best_yaml_retrains_to_the_best_trial_score(
    planted_csv: Path, data: DataBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "study"
    code, stdout, err = run_cli(tune_args(planted_csv, out, 3), capsys)
    assert code == 0, err
    study = optuna.load_study(study_name="recommender", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3
    assert "best validation ndcg@10" in stdout and f"{study.best_trial.number:>7}" in stdout

    # The trials learned the planted clusters: far above Popularity on the validation split.
    popularity = Popularity(len(data.users), len(data.items)).fit(data.train.item_counts())
    baseline = evaluate_full(popularity, data.train, data.valid, [10]).metrics["ndcg@10"]
    assert study.best_value > baseline + 0.1, (study.best_value, baseline)

    table = trials_csv(out)
    assert list(table["number"]) == [0, 1, 2]
    assert {"train.lr", "model.embedding_dim", "epochs", "state", "value"} <= set(table.columns)
    assert table.loc[study.best_trial.number, "value"] == pytest.approx(study.best_value)
    for folder in (out / "trials").iterdir():  # trials keep their records, not checkpoints
        assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.jsonl"]

    best = load_config(out / "best.yaml")
    assert best.train.lr == study.best_params["train.lr"]
    assert best.model.embedding_dim == study.best_params["model.embedding_dim"]
    assert best.train.refit  # as given: only the trials skip the refit
    assert best.tune == study_config(planted_csv).tune

    run = tmp_path / "best"
    code, _, err = run_cli(["train", "--config", str(out / "best.yaml"), "--out", str(run)], capsys)
    assert code == 0, err
    retrained = load_checkpoint(run / "best.pt")["valid_metrics"]["ndcg@10"]
    assert retrained == pytest.approx(study.best_value, abs=1e-6)


def test_weak_trials_are_pruned_after_the_warm_up(
    planted_csv: Path, data: DataBundle, tmp_path: Path
):
    cfg = study_config(
        planted_csv,
        "tune.space={train.lr: {type: categorical, choices: [0.03, 0.00001, 0.00002]}}",
        "tune.warmup_epochs=1",
    )
    out = tmp_path / "study"
    # A good rate first, then two that barely move the model: they fall below its curve.
    for lr in (0.03, 0.00001, 0.00002):
        open_study(cfg, out).enqueue_trial({"train.lr": lr})
    study = run_study(cfg, data, out, n_trials=3)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "PRUNED", "PRUNED"]
    # One report per epoch of the final stage (step = epoch); the warm-up epoch always runs.
    assert sorted(study.trials[0].intermediate_values) == [1, 2, 3, 4]
    for pruned in study.trials[1:]:
        assert sorted(pruned.intermediate_values) == [1, 2]
    assert list(trials_csv(out)["epochs"]) == [4, 2, 2]


def test_neumf_trials_report_the_final_stage_only(
    planted_csv: Path, data: DataBundle, tmp_path: Path
):
    cfg = study_config(
        planted_csv,
        "model.name=neumf",
        "train.epochs=2",
        "tune.space={train.pretrain.finetune_lr: {type: float, low: 0.001, high: 0.01}}",
    )
    study = run_study(cfg, data, tmp_path / "study", n_trials=1)
    trial = study.trials[0]
    assert sorted(trial.intermediate_values) == [1, 2]
    lines = (tmp_path / "study" / "trials" / "0000" / "metrics.jsonl").read_text().splitlines()
    final = [json.loads(line) for line in lines if '"select/neumf"' in line]
    assert [r["valid"]["ndcg@10"] for r in final] == list(trial.intermediate_values.values())
    assert trial.value == max(trial.intermediate_values.values())


def test_repeats_average_the_seeds_and_best_yaml_retrains_the_first(
    planted_csv: Path, data: DataBundle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    cfg = study_config(planted_csv, "tune.repeats=3", "train.lr=0.01")
    out = tmp_path / "study"
    trial = run_study(cfg, data, out, n_trials=1).trials[0]
    folders = [out / "trials" / "0000", *(out / "trials" / "0000" / f"seed-{cfg.seed + r}"
                                          for r in (1, 2))]  # fmt: skip
    bests = []
    for folder in folders:
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        bests.append(max(r["valid"]["ndcg@10"] for r in records))
        assert not list(folder.glob("*.pt"))
    assert len({round(b, 6) for b in bests}) > 1  # three initialisations, three results
    assert trial.value == pytest.approx(sum(bests) / 3, abs=1e-9)
    assert trial.user_attrs["seed_values"] == pytest.approx(bests)
    # Pruning follows the first seed alone: its curve is the trial's intermediate values.
    first = [json.loads(line) for line in (folders[0] / "metrics.jsonl").read_text().splitlines()]
    assert list(trial.intermediate_values.values()) == [r["valid"]["ndcg@10"] for r in first]
    assert "mean of seeds" in (out / "best.yaml").read_text()

    run = tmp_path / "best"
    code, _, err = run_cli(["train", "--config", str(out / "best.yaml"), "--out", str(run)], capsys)
    assert code == 0, err
    retrained = load_checkpoint(run / "best.pt")["valid_metrics"]["ndcg@10"]
    assert retrained == pytest.approx(bests[0], abs=1e-6)


def test_rerunning_adds_trials_to_the_same_study(
    planted_csv: Path, data: DataBundle, tmp_path: Path
):
    out = tmp_path / "study"
    cfg = study_config(planted_csv)
    first = run_study(cfg, data, out, n_trials=2)
    check_study_dir(out, cfg)  # a study of the same config may be continued
    again = run_study(cfg, data, out, n_trials=2)
    assert [t.number for t in again.trials] == [0, 1, 2, 3]
    assert again.trials[0].params == first.trials[0].params
    # The sampler seed moves on with the study: the continuation does not replay trial 0.
    assert again.trials[2].params != again.trials[0].params
    assert list(trials_csv(out)["number"]) == [0, 1, 2, 3]

    with pytest.raises(RecommenderError, match="another training config"):
        check_study_dir(out, study_config(planted_csv, "train.epochs=5"))
    # The space, the pruner and runtime knobs may change between runs.
    check_study_dir(out, study_config(planted_csv, "tune.pruner=none", "eval.batch_users=7"))


def test_a_failed_trial_is_recorded_and_the_study_goes_on(
    planted_csv: Path, data: DataBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original, calls = Trainer.fit, {"n": 0}

    def out_of_memory_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", out_of_memory_once)
    out = tmp_path / "study"
    study = run_study(study_config(planted_csv), data, out, n_trials=2)
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE"]
    table = trials_csv(out)
    assert table.loc[0, "error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert not list((out / "trials" / "0000").glob("*.pt"))
    assert "trial 1" in (out / "best.yaml").read_text().splitlines()[0]


def test_a_study_where_every_trial_fails_is_an_error(
    planted_csv: Path, data: DataBundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def fail(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(Trainer, "fit", fail)
    with pytest.raises(RecommenderError, match="no trial completed"):
        run_study(study_config(planted_csv), data, tmp_path / "study", n_trials=2)
    assert not (tmp_path / "study" / "best.yaml").exists()
    assert list(trials_csv(tmp_path / "study")["state"]) == ["FAIL", "FAIL"]


def test_ctrl_c_keeps_the_finished_trials(
    planted_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
):
    original, calls = Trainer.train_epoch, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # the second epoch of the second trial
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_epoch", interrupted)
    out = tmp_path / "study"
    code, stdout, err = run_cli(tune_args(planted_csv, out, 5, "tune.pruner=none"), capsys)
    assert code == 130 and "interrupted" in err
    assert list(trials_csv(out)["state"]) == ["COMPLETE", "FAIL"]
    assert "trial 0" in (out / "best.yaml").read_text().splitlines()[0]
    assert "2 trials (1 complete, 1 fail)" in stdout

    monkeypatch.setattr(Trainer, "train_epoch", original)
    code, _, err = run_cli(tune_args(planted_csv, out, 1, "tune.pruner=none"), capsys)
    assert code == 0, err
    assert list(trials_csv(out)["state"]) == ["COMPLETE", "FAIL", "COMPLETE"]


@pytest.mark.parametrize(
    ("name", "pretrain", "sampled"),
    [
        ("gmf", True, {"model.embedding_dim", "train.lr"}),
        ("mlp", True, {"model.mlp_layers", "model.dropout", "train.lr"}),
        ("neumf", True, {"model.embedding_dim", "model.mlp_layers", "model.dropout",
                         "train.pretrain.gmf.lr", "train.pretrain.mlp.lr",
                         "train.pretrain.finetune_lr"}),
        ("neumf", False, {"model.embedding_dim", "model.mlp_layers", "model.dropout",
                          "train.lr"}),
    ],
)  # fmt: skip
def test_only_the_keys_a_model_uses_are_sampled(name: str, pretrain: bool, sampled: set[str]):
    cfg = load_config(None, [f"model.name={name}", f"train.pretrain.enabled={pretrain}"])
    always = {"train.weight_decay", "train.num_negatives", "train.batch_size"}
    params = {
        "model.embedding_dim": 32,
        "model.mlp_layers": "[64, 32, 16, 8]",  # list choices travel as JSON text
        "model.dropout": 0.2,
        "train.lr": 0.01,
        "train.weight_decay": 0.0,
        "train.num_negatives": 8,
        "train.batch_size": 1024,
        "train.pretrain.gmf.lr": 0.01,
        "train.pretrain.mlp.lr": 0.01,
        "train.pretrain.finetune_lr": 1e-4,
    }
    values = suggest(optuna.trial.FixedTrial(params), cfg)
    assert set(values) == sampled | always
    if "model.mlp_layers" in values:
        assert values["model.mlp_layers"] == [64, 32, 16, 8]
    assert cfg.with_overrides(values).train.batch_size == 1024


def test_a_tuned_model_name_decides_the_other_keys():
    space = (
        "tune.space={model.name: {type: categorical, choices: [gmf, mlp]}, "
        "model.embedding_dim: {type: categorical, choices: [8, 16]}, "
        "model.dropout: {type: float, low: 0.0, high: 0.5}}"
    )
    cfg = load_config(None, [space])
    params = {"model.embedding_dim": 8, "model.dropout": 0.1}
    gmf = suggest(optuna.trial.FixedTrial({**params, "model.name": "gmf"}), cfg)
    mlp = suggest(optuna.trial.FixedTrial({**params, "model.name": "mlp"}), cfg)
    assert gmf == {"model.name": "gmf", "model.embedding_dim": 8}
    assert mlp == {"model.name": "mlp", "model.dropout": 0.1}
    # NeuMF with BCE reads no LightGCN, sampled-softmax or CCL setting
    others = {"model.layers", "train.embedding_l2", "train.pool", "train.pool_size", "train.logq"}
    others |= {"train.ccl_margin", "train.ccl_neg_weight"}
    assert inert_keys(load_config(None)) == {"train.lr", "train.popularity_power", *others}
    assert inert_keys(load_config(None, ["train.sampling=popularity"])) == {"train.lr", *others}


def test_a_tuned_loss_decides_the_loss_settings():
    cfg = load_config(None, ["model.name=lightgcn", "train.loss=sampled_softmax"])
    inert = inert_keys(cfg)
    assert {"train.num_negatives", "train.sampling", "train.ccl_margin"} <= inert
    assert not {"train.pool", "train.pool_size", "model.layers"} & inert
    assert "train.pool_size" in inert_keys(cfg.with_overrides({"train.pool": "in_batch"}))
    ccl = inert_keys(cfg.with_overrides({"train.loss": "ccl"}))
    assert not {"train.ccl_margin", "train.num_negatives"} & ccl and "train.pool" in ccl


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--set=tune.space={data.path: {type: categorical, choices: [a.csv]}}"],
         "tune.space.data.path: only model.* and train.* settings"),
        (["--set=tune.space={train.lr: {type: float, low: 0.1, high: 0.01}}"],
         "tune.space.train.lr: low (0.1) must be below high (0.01)"),
        (["--set=tune.space={train.refit: {type: categorical, choices: [true, false]}}"],
         "tune.space.train.refit: cannot be tuned"),
        (["--model=popularity", "--set=tune.space={}"], "popularity is fitted in closed form"),
        (["--model=graphfilter", "--set=tune.space={}"], "graphfilter is fitted in closed form"),
    ],
)  # fmt: skip
def test_bad_studies_are_one_line_errors(
    planted_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], args, fragment
):
    out = tmp_path / "study"
    cmd = ["tune", "--data", str(planted_csv), *[f"--set={s}" for s in FAST], *args]
    code, _, err = run_cli([*cmd, "--trials", "1", "--out", str(out)], capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
    assert not (out / "study.db").exists()


def test_tune_refuses_a_directory_that_holds_no_study(
    planted_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"x")
    code, _, err = run_cli(tune_args(planted_csv, out, 1), capsys)
    assert code == 2 and "holds no study.db" in err
    assert sorted(p.name for p in out.iterdir()) == ["best.pt"]


def test_tune_refuses_torchrun(
    planted_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_cli(tune_args(planted_csv, tmp_path / "s", 1), capsys)
    assert code == 2 and "without torchrun" in err


def test_tune_settings_do_not_touch_the_training_digest():
    base = load_config(None)
    tuned = load_config(None, ["tune.sampler_seed=3", "tune.space={}", "tune.pruner=none"])
    # Neither digest changes: resume checks and served model versions ignore tuning settings.
    assert tuned.training_digest() == base.training_digest()
    assert tuned.digest() == base.digest()
    saved = yaml.safe_load(yaml.safe_dump(tuned.to_dict()))
    assert Config.model_validate(saved) == tuned
