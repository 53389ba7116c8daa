"""Training: stages, checkpoints, metrics.jsonl, a planted answer, and exact resume."""

from __future__ import annotations

import json
import platform
import resource
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import FAST, interrupted_run, planted_frame, run_cli, sequential_frame, write_csv
from recommender.checkpoint import FORMAT_VERSION, load_best, load_checkpoint, save_checkpoint
from recommender.config import load_config
from recommender.data.pipeline import load_data
from recommender.evaluate import evaluate_full
from recommender.models import MF, Popularity
from recommender.stages import plan_stages
from recommender.train import Trainer, confidence_weights, train_step
from recommender.utils import ConfigError, DataError, RecommenderError, retain_freed_memory

TIMING = {"train_seconds", "samples_per_second"}


def test_plan_stages():
    names = [s.name for s in plan_stages(load_config(None))]
    assert names == [
        "select/gmf", "select/mlp", "select/neumf", "refit/gmf", "refit/mlp", "refit/neumf",
    ]  # fmt: skip
    stages = plan_stages(load_config(None, ["model.name=gmf", "train.refit=false"]))
    assert [(s.name, s.data, s.early_stopping) for s in stages] == [("select/gmf", "train", True)]
    refit = plan_stages(load_config(None, ["model.name=mf"]))[-1]
    assert (refit.data, refit.early_stopping) == ("full", False)
    neumf = plan_stages(load_config(None, ["train.refit=false"]))[-1]
    assert neumf.init_from == ("select/gmf", "select/mlp")
    assert plan_stages(load_config(None, ["model.name=popularity"])) == []


def test_max_epochs_caps_every_stage():
    # train.epochs is the final model's budget only: NeuMF's pretraining keeps its 30.
    one = plan_stages(load_config(None, ["train.epochs=1"]))
    assert [s.epochs for s in one] == [30, 30, 1, 30, 30, 1]
    capped = plan_stages(load_config(None, ["train.max_epochs=2"]))
    assert [s.name for s in capped] == [s.name for s in one]  # pretraining and refit kept
    assert [s.epochs for s in capped] == [2] * 6
    low = plan_stages(load_config(None, ["train.max_epochs=50", "train.epochs=3"]))
    assert [s.epochs for s in low] == [30, 30, 3, 30, 30, 3]  # a cap never raises a budget
    with pytest.raises(ConfigError, match=r"train\.max_epochs"):
        load_config(None, ["train.max_epochs=0"])


def test_a_run_logs_its_plan_and_max_epochs_shortens_every_stage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    frame = planted_frame(n_users=30, n_items=20)
    trainer = confidence_run(frame, tmp_path, "train.max_epochs=1")
    with caplog.at_level("INFO", logger="recommender"):
        trainer.fit()
    plan = [r.getMessage() for r in caplog.records if r.getMessage().startswith("plan")]
    assert plan[0] == (
        "plan: 6 stage(s), then refit on train + validation, train.max_epochs=1 caps every stage"
    )
    assert plan[1].startswith("plan 1/6 select/gmf: gmf on train, up to 1 epoch(s)")
    assert plan[6].startswith("plan 6/6 refit/neumf: neumf on train + validation, the epoch")
    assert "initialised from refit/gmf and refit/mlp" in plan[6]
    stages = [(r["stage"], r["epoch"]) for r in records(trainer.out)]
    assert stages == [(s.name, 1) for s in trainer.stages]


def test_checkpoints_exist_and_load_with_weights_only(gmf_run: Path):
    for name in ("best.pt", "last.pt"):
        payload = torch.load(gmf_run / name, map_location="cpu", weights_only=True)
        assert payload["format_version"] == FORMAT_VERSION
    best = load_checkpoint(gmf_run / "best.pt")
    for key in ("model_config", "state_dict", "user_ids", "item_ids", "n_users", "n_items",
                "epoch", "valid_metrics", "config", "config_digest", "item_counts",
                "history_indptr", "history_items"):  # fmt: skip
        assert key in best, key
    assert best["model_config"]["name"] == "gmf"
    ids = load_best(gmf_run)
    assert len(ids.user_ids) == best["n_users"] and len(ids.item_ids) == best["n_items"]
    # Raw ids in vocabulary order: strings sort as text, integer ids (with gaps) as numbers.
    assert ids.user_ids[:3].tolist() == ["u10", "u100", "u103"]
    assert ids.item_ids[:3].tolist() == ["5", "15", "25"]
    assert "ndcg@10" in best["valid_metrics"]
    last = load_checkpoint(gmf_run / "last.pt")
    for key in ("model", "optimizers", "torch_rng", "epoch", "stage_index", "completed"):
        assert key in last, key
    assert not list(gmf_run.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_run_directory_keeps_the_resolved_config(gmf_run: Path):
    saved = load_config(gmf_run / "config.yaml")
    assert saved.model.name == "gmf" and saved.train.epochs == 8
    assert saved.digest() == load_checkpoint(gmf_run / "best.pt")["config_digest"]
    assert yaml.safe_load((gmf_run / "config.yaml").read_text())["train"]["epochs"] == 8


def test_metrics_jsonl_one_line_per_epoch(gmf_run: Path):
    lines = (gmf_run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    cfg = load_config(gmf_run / "config.yaml")
    data = load_data(cfg.data, cfg.seed)
    select = [r for r in records if r["stage"] == "select/gmf"]
    refit = [r for r in records if r["stage"] == "refit/gmf"]
    assert [r["epoch"] for r in select] == list(range(1, 9))
    assert [r["epoch"] for r in refit] == list(range(1, len(refit) + 1))
    assert len(select) + len(refit) == len(records)
    k = 1 + cfg.train.num_negatives
    for r in records:
        for key in ("epoch", "train_samples", "train_seconds", "samples_per_second", "loss"):
            assert key in r, key
        assert r["samples_per_second"] > 0 and r["loss"] > 0
    for r in select:
        assert r["train_samples"] == len(data.train) * k
        assert {"ndcg@10", "hr@10"} <= set(r["valid"])
    for r in refit:
        # The refit trains on train + validation for the chosen number of epochs.
        assert r["train_samples"] == len(data.train_full) * k
    best_epoch = max(select, key=lambda r: r["valid"]["ndcg@10"])["epoch"]
    assert len(refit) == best_epoch
    assert select[-1]["loss"] < select[0]["loss"]


def test_neumf_with_pretraining_beats_popularity(planted_csv: Path, tmp_path: Path):
    cfg = load_config(
        None,
        [*FAST, "data.dataset=null", f"data.path={planted_csv}", "model.name=neumf",
         "train.epochs=3", "train.lr=0.005", "train.refit=false"],
    )  # fmt: skip
    data = load_data(cfg.data, cfg.seed)
    model = Trainer(cfg, data, tmp_path, torch.device("cpu")).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    stages = {json.loads(line)["stage"] for line in lines}
    assert stages == {"select/gmf", "select/mlp", "select/neumf"}
    history = data.train_full
    popularity = Popularity(len(data.users), len(data.items)).fit(history.item_counts())
    ours = evaluate_full(model, history, data.test, [10]).metrics["hr@10"]
    baseline = evaluate_full(popularity, history, data.test, [10]).metrics["hr@10"]
    assert ours > baseline + 0.25, (ours, baseline)


def state(path: Path, key: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[key]


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k not in TIMING})
    return out


def train_args(data: Path, out: Path) -> list[str]:
    # MLP with dropout: resuming must restore the global torch RNG as well as the sampler's.
    sets = [*FAST, "train.epochs=3", "model.dropout=0.2"]
    return ["train", "--data", str(data), "--model", "mlp", "--out", str(out)] + [
        f"--set={s}" for s in sets
    ]


@pytest.fixture(scope="module")
def uninterrupted(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recommender.cli import main

    out = tmp_path_factory.mktemp("resume") / "whole"
    assert main(train_args(planted_csv, out)) == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [2, 4], ids=["mid-selection", "at-refit-start"])
def test_resume_gives_the_uninterrupted_result(
    planted_csv: Path,
    uninterrupted: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kill_at: int,
):
    """Kill the run after epoch `kill_at` trained but before its checkpoint, then --resume.

    Epoch calls 1-3 are selection, 4.. the refit: kill_at=4 dies as a new stage starts.
    """
    out = tmp_path / "run"
    assert "interrupted" in interrupted_run(train_args(planted_csv, out), kill_at, capsys)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == kill_at - 1

    code, _, err = run_cli([*train_args(planted_csv, out), "--resume"], capsys)
    assert code == 0, err
    assert records(out) == records(uninterrupted)
    for name, key in (("best.pt", "state_dict"), ("last.pt", "model")):
        expected, got = state(uninterrupted / name, key), state(out / name, key)
        assert expected.keys() == got.keys()
        for param in expected:
            assert torch.equal(expected[param], got[param]), (name, param)


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused_and_changes_nothing(
    planted_csv: Path, uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    args = [*train_args(planted_csv, run), "--set=train.lr=0.5", "--resume"]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert "same config" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in run.iterdir()}
    assert after.keys() == before.keys()
    # The refused run must not replace the original run's config.yaml with its own.
    assert after["config.yaml"] == before["config.yaml"]
    assert after == before


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_no_result(
    planted_csv: Path, uninterrupted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    code, _, err = run_cli([*train_args(planted_csv, run), "--resume"], capsys)
    assert code == 0, err
    assert records(run) == records(uninterrupted)
    expected, got = (
        state(uninterrupted / "best.pt", "state_dict"),
        state(run / "best.pt", "state_dict"),
    )
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_needs_a_run_directory(planted_csv: Path, tmp_path: Path, capsys):
    code, _, err = run_cli([*train_args(planted_csv, tmp_path / "nothing"), "--resume"], capsys)
    assert code == 2 and "no last.pt to resume from" in err
    assert not (tmp_path / "nothing").exists()


def test_load_checkpoint_rejects_foreign_and_corrupt_files(tmp_path: Path):
    with pytest.raises(RecommenderError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(RecommenderError, match="not a readable checkpoint"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(RecommenderError, match="not a checkpoint written by this project"):
        load_checkpoint(foreign)


def test_checkpoints_refuse_arbitrary_objects(tmp_path: Path):
    # weights_only=True: a pickled object (here a Path) cannot be smuggled into a checkpoint.
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": Path("x")}, path)
    with pytest.raises(RecommenderError, match="not a readable checkpoint"):
        load_checkpoint(path)
    save_checkpoint(tmp_path / "ok.pt", {"format_version": 1, "w": torch.ones(1)})
    assert load_checkpoint(tmp_path / "ok.pt")["w"].item() == 1.0


def test_epoch_callbacks_see_every_metrics_record(planted_csv: Path, tmp_path: Path):
    cfg = load_config(
        None, [*FAST, "data.dataset=null", f"data.path={planted_csv}", "model.name=gmf",
               "train.epochs=3"],
    )  # fmt: skip
    seen: list[dict] = []
    Trainer(
        cfg, load_data(cfg.data, cfg.seed), tmp_path, torch.device("cpu"), callbacks=[seen.append]
    ).fit()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert seen == [json.loads(line) for line in lines]
    assert {r["stage"] for r in seen} == {"select/gmf", "refit/gmf"}


class Stop(Exception):
    pass


def test_a_callback_stops_training_after_a_checkpointed_epoch(planted_csv: Path, tmp_path: Path):
    cfg = load_config(
        None, [*FAST, "data.dataset=null", f"data.path={planted_csv}", "model.name=gmf",
               "train.epochs=5"],
    )  # fmt: skip

    def stop_at_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise Stop

    trainer = Trainer(
        cfg, load_data(cfg.data, cfg.seed), tmp_path, torch.device("cpu"), callbacks=[stop_at_two]
    )
    with pytest.raises(Stop):
        trainer.fit()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 2  # --resume would go on from here


# -- confidence weighting (train.confidence) ----------------------------------------------------


def test_confidence_weights_by_hand():
    counts = np.array([0, 1, 9, 99], dtype=np.float32)
    np.testing.assert_allclose(
        confidence_weights(counts, "log", 2.0, 1.0), 1 + 2 * np.log([1, 2, 10, 100]), rtol=1e-6
    )
    # epsilon is the count unit: log(1 + r / 3)
    np.testing.assert_allclose(
        confidence_weights(counts, "log", 1.0, 3.0), 1 + np.log1p(counts / 3), rtol=1e-6
    )
    linear = confidence_weights(counts, "linear", 0.5, 1.0)
    assert linear.dtype == np.float32 and linear.tolist() == [1.0, 1.5, 5.5, 50.5]
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(DataError, match="ratings >= 0"):
            confidence_weights(np.array([1.0, bad]), "log", 1.0, 1.0)


def test_weighted_train_step_is_the_weighted_mean():
    u, i = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 0])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    w = torch.tensor([5.0, 1.0, 2.0, 1.0])

    def step(weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = MF(3, 3, 4)
        with torch.no_grad():
            logits = model(u, i)
        loss = train_step(model, [torch.optim.Adam(model.parameters())], u, i, y, weight)
        plain = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
        return loss, plain

    loss, plain = step(None)
    assert torch.equal(loss, plain.mean())  # no confidence: exactly today's loss
    loss, plain = step(w)
    torch.testing.assert_close(loss, (w * plain).sum() / w.sum())
    # Normalised by the total weight: scaling every weight leaves the step unchanged.
    torch.testing.assert_close(step(w * 10)[0], loss)


def confidence_run(frame: pd.DataFrame, tmp_path: Path, *sets: str) -> Trainer:
    csv = write_csv(frame, tmp_path / "data.csv")
    cfg = load_config(None, [*FAST, "data.dataset=null", f"data.path={csv}", *sets])
    return Trainer(cfg, load_data(cfg.data, cfg.seed), tmp_path / "run", torch.device("cpu"))


def test_confidence_needs_a_rating_column(tmp_path: Path):
    frame = planted_frame(n_users=20, n_items=30).drop(columns="rating")
    with pytest.raises(ConfigError, match="no rating column"):
        confidence_run(frame, tmp_path, "train.confidence=log")
    confidence_run(frame, tmp_path, "train.confidence=none")  # without confidence, no need


def test_negative_ratings_are_refused_before_training(tmp_path: Path):
    frame = planted_frame(n_users=20, n_items=30)
    frame.loc[3, "rating"] = -2.0
    with pytest.raises(DataError, match="has -2"):
        confidence_run(frame, tmp_path, "train.confidence=linear")


def test_confidence_off_adds_nothing_and_unit_confidence_trains_alike(tmp_path: Path):
    frame = planted_frame(n_users=40, n_items=30).assign(rating=0.0)
    sets = ["model.name=mf", "train.epochs=2"]
    off = confidence_run(frame, tmp_path / "off", *sets)
    assert off._epoch_source("train").weights is None  # no weight tensor when confidence is off
    # linear confidence of rating 0 is 1 for every positive: the same training, up to rounding.
    unit = confidence_run(frame, tmp_path / "unit", *sets, "train.confidence=linear")
    weights = unit._epoch_source("train").weights
    assert weights is not None and torch.equal(weights, torch.ones(len(unit.data.train)))
    models = [off.fit(), unit.fit()]
    losses = [[r["loss"] for r in records(t.out)] for t in (off, unit)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for name, param in models[0].state_dict().items():
        torch.testing.assert_close(models[1].state_dict()[name], param, rtol=1e-4, atol=1e-5)


def play_count_frame(
    seed: int,
    n_users: int = 200,
    n_clusters: int = 6,
    per_cluster: int = 20,
    n_taste: int = 7,
    n_noise: int = 12,
) -> pd.DataFrame:
    """Listening histories whose taste shows in play counts, not in the number of artists.

    Every user played `n_taste` items of their own cluster 20-200 times each, and `n_noise`
    items of one other, decoy cluster once each; the two taste items played last are the
    validation and test items. Counted as equals, most of a user's positives point to the decoy.
    """
    rng = np.random.default_rng(seed)
    taste = rng.integers(n_clusters, size=n_users)
    decoy = (taste + rng.integers(1, n_clusters, size=n_users)) % n_clusters

    def draw(cluster: np.ndarray, k: int) -> np.ndarray:  # k distinct items of each user's cluster
        order = rng.permuted(np.tile(np.arange(per_cluster), (n_users, 1)), axis=1)
        return cluster[:, None] * per_cluster + order[:, :k]

    items = np.concatenate([draw(decoy, n_noise), draw(taste, n_taste)], axis=1)
    plays = np.concatenate(
        [np.ones((n_users, n_noise)), rng.integers(20, 200, size=(n_users, n_taste))], axis=1
    )
    per_user = n_noise + n_taste
    return pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(n_users), per_user),
            "item_id": items.ravel(),
            "rating": plays.ravel(),
            "timestamp": np.tile(np.arange(per_user), n_users),  # taste items last
        }
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_play_count_confidence_finds_the_taste_under_the_noise(tmp_path: Path, seed: int):
    frame = play_count_frame(seed)
    sets = ["model.name=mf", "model.embedding_dim=8", "train.epochs=20", f"seed={seed}",
            "train.num_negatives=4", "train.refit=false", "train.confidence_alpha=10"]  # fmt: skip
    metrics = {}
    for confidence in ("none", "log"):
        trainer = confidence_run(
            frame, tmp_path / confidence, *sets, f"train.confidence={confidence}"
        )
        model = trainer.fit()
        data = trainer.data
        metrics[confidence] = evaluate_full(model, data.train_full, data.test, [10]).metrics
    off, on = metrics["none"], metrics["log"]
    # Over seeds 0-11: NDCG@10 0.09-0.14 -> 0.17-0.25 (ratio >= 1.63), HR@10 gain >= 0.145.
    assert on["ndcg@10"] > 1.4 * off["ndcg@10"], (on, off)
    assert on["hr@10"] > off["hr@10"] + 0.1, (on, off)


def test_softmax_train_step_is_the_catalog_cross_entropy():
    u, i = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 3])
    w = torch.tensor([5.0, 1.0, 2.0, 1.0])
    for weight in (None, w):
        torch.manual_seed(0)
        model = MF(3, 4, 4)
        with torch.no_grad():
            catalog = model.score_all(u)  # (4 rows, 4 items)
        loss = train_step(
            model, [torch.optim.Adam(model.parameters())], u, i, i.float(), weight,
            loss_kind="softmax",
        )  # fmt: skip
        rows = F.cross_entropy(catalog, i, reduction="none")
        expected = rows.mean() if weight is None else (w * rows).sum() / w.sum()
        torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("model_name", ["mf", "gmf"])
def test_softmax_loss_learns_the_planted_structure(
    planted_csv: Path, tmp_path: Path, model_name: str
):
    cfg = load_config(
        None,
        [*FAST, "data.dataset=null", f"data.path={planted_csv}", f"model.name={model_name}",
         "train.loss=softmax", "train.batch_size=128", "train.epochs=6", "train.lr=0.01"],
    )  # fmt: skip
    data = load_data(cfg.data, cfg.seed)
    model = Trainer(cfg, data, tmp_path, torch.device("cpu")).fit()
    rows = records(tmp_path)
    # positives only: the catalog is each row's negatives, nothing is sampled
    assert all(r["train_samples"] == len(data.train if r["stage"].startswith("select") else
                                          data.train_full) for r in rows)  # fmt: skip
    select = [r for r in rows if r["stage"].startswith("select")]
    assert select[-1]["loss"] < select[0]["loss"]
    history = data.train_full
    popularity = Popularity(len(data.users), len(data.items)).fit(history.item_counts())
    ours = evaluate_full(model, history, data.test, [10]).metrics["hr@10"]
    baseline = evaluate_full(popularity, history, data.test, [10]).metrics["hr@10"]
    assert ours > baseline + 0.25, (ours, baseline)


@pytest.mark.parametrize("model_name", ["mlp", "neumf"])
def test_softmax_loss_is_refused_for_the_mlp_towers(model_name: str, tmp_path: Path):
    with pytest.raises(ConfigError, match=f"train.loss=softmax with model.name={model_name}"):
        load_config(None, ["train.loss=softmax", f"model.name={model_name}"])
    # nor can a study draw the pair: refused before any trial runs
    path = tmp_path / "study.yaml"
    path.write_text(
        "tune:\n  space:\n    train.loss: {type: categorical, choices: [bce, softmax]}\n"
    )
    with pytest.raises(ConfigError, match=r"tune\.space can draw train\.loss=softmax with model"):
        load_config(path, [f"model.name={model_name}"])
    load_config(path, ["model.name=mf"])  # a dot-product model takes both


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_context_learns_what_follows_the_latest_item(tmp_path: Path, loss: str):
    """On data whose only signal is order, the Markov term finds each user's next item;
    plain MF, which sees the item sets, cannot tell the walk's next item from its previous."""
    path = write_csv(sequential_frame(), tmp_path / "walks.csv")
    hr = {}
    for context in (0, 2):
        cfg = load_config(
            None,
            [*FAST, "data.dataset=null", f"data.path={path}", "model.name=mf",
             f"model.context={context}", f"train.loss={loss}", "train.batch_size=256",
             "train.epochs=15", "train.lr=0.01", "train.refit=false"],
        )  # fmt: skip
        data = load_data(cfg.data, cfg.seed)
        model = Trainer(cfg, data, tmp_path / f"run{context}", torch.device("cpu")).fit()
        assert isinstance(model, MF) and model.context == context
        # the latest-items buffer holds what precedes the validation item: the train split's
        hr[context] = evaluate_full(model, data.train, data.valid, [1]).metrics["hr@1"]
    assert hr[2] > 0.8 and hr[2] > hr[0] + 0.3, hr


def test_context_batches_carry_each_positives_predecessors(tmp_path: Path):
    path = write_csv(sequential_frame(n_users=20, per_user=5), tmp_path / "walks.csv")
    cfg = load_config(
        None, [*FAST, "data.dataset=null", f"data.path={path}", "model.name=mf", "model.context=3"]
    )
    data = load_data(cfg.data, cfg.seed)
    trainer = Trainer(cfg, data, tmp_path / "run", torch.device("cpu"))
    source = trainer._epoch_source("train")
    context = source.context
    assert context is not None and context.shape == (len(source.users), 3)
    inter = data.train
    order = np.lexsort((inter.item_idx, inter.timestamp, inter.user_idx))
    for row in order[:12]:  # spot-check against a per-user reading of the history
        same = (inter.user_idx == inter.user_idx[row]) & (inter.timestamp < inter.timestamp[row])
        before = inter.item_idx[same][np.argsort(-inter.timestamp[same])][:3]
        expected = np.full(3, inter.n_items)
        expected[: len(before)] = before
        assert context[row].tolist() == expected.tolist()


def test_context_needs_timestamps_and_the_mf_model(tmp_path: Path):
    frame = sequential_frame(n_users=30, per_user=10).drop(columns="timestamp")
    path = write_csv(frame, tmp_path / "no_time.csv")
    cfg = load_config(
        None,
        [*FAST, "data.dataset=null", f"data.path={path}", "data.split=random",
         "model.name=mf", "model.context=2"],
    )  # fmt: skip
    data = load_data(cfg.data, cfg.seed)
    with pytest.raises(ConfigError, match=r"model\.context=2 orders each user's interactions"):
        Trainer(cfg, data, tmp_path / "run", torch.device("cpu"))
    assert not (tmp_path / "run").exists()
    for name in ("gmf", "mlp", "neumf"):
        with pytest.raises(ConfigError, match=f"context=2 with name={name}"):
            load_config(None, [f"model.name={name}", "model.context=2"])


def test_context_warns_when_every_timestamp_is_the_same(tmp_path: Path, caplog):
    frame = sequential_frame(n_users=30, per_user=10).assign(timestamp=0)
    path = write_csv(frame, tmp_path / "no_order.csv")
    cfg = load_config(
        None, [*FAST, "data.dataset=null", f"data.path={path}", "model.name=mf", "model.context=2"]
    )
    with caplog.at_level("WARNING", logger="recommender"):
        Trainer(cfg, load_data(cfg.data, cfg.seed), tmp_path / "run", torch.device("cpu"))
    assert "every timestamp" in caplog.text


@pytest.mark.parametrize(("extra_steps", "patience_epochs"), [(-1, 2), (0, 2), (1, 3)])
def test_patience_steps_waits_that_many_steps_in_whole_epochs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra_steps: int, patience_epochs: int
):
    # With a validation that never improves after epoch 1, the stage runs 1 + patience epochs;
    # patience_steps of two epochs' steps, give or take one, rounds up to whole epochs.
    frame = planted_frame(n_users=40, n_items=30)
    sets = ["model.name=mf", "train.refit=false", "train.epochs=50", "train.num_negatives=1"]
    probe = confidence_run(frame, tmp_path / "probe", *sets, "train.batch_size=64")
    steps = probe._steps_per_epoch(MF(1, 1, 1), probe.stages[0])
    assert steps == -(-len(probe.data.train) * 2 // 64) > 2  # pairs: a positive and a negative
    patience = 2 * steps + extra_steps
    trainer = confidence_run(
        frame, tmp_path, *sets, "train.batch_size=64", f"train.patience_steps={patience}"
    )
    monkeypatch.setattr(trainer, "_validate", lambda model: {"ndcg@10": 0.5, "hr@10": 0.5})
    trainer.fit()
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "run/metrics.jsonl").open()]
    assert epochs == list(range(1, 2 + patience_epochs))


def test_validation_on_a_user_sample_is_fixed_and_early_stopping_reads_it(tmp_path: Path):
    frame = planted_frame()
    sets = ["model.name=mf", "train.epochs=1", "train.refit=false"]
    full = confidence_run(frame, tmp_path / "all", *sets)
    sampled = [
        confidence_run(frame, tmp_path / f"s{i}", *sets, "train.valid_users=7") for i in range(2)
    ]
    users = [np.unique(t.valid.user_idx) for t in sampled]
    assert len(users[0]) == 7 and np.array_equal(users[0], users[1])  # the seed fixes them
    everyone = np.unique(full.valid.user_idx)
    assert len(everyone) > 7 and np.isin(users[0], everyone).all()
    rows = np.isin(full.valid.user_idx, users[0])
    assert len(sampled[0].valid) == rows.sum()  # each chosen user keeps all their rows
    model = sampled[0].fit()
    logged = json.loads((tmp_path / "s0" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    on_sample = evaluate_full(model, sampled[0].data.train, sampled[0].valid, [10])
    on_everyone = evaluate_full(model, full.data.train, full.valid, [10])
    assert logged["valid"]["ndcg@10"] == pytest.approx(on_sample.metrics["ndcg@10"])
    assert logged["valid"]["ndcg@10"] != pytest.approx(on_everyone.metrics["ndcg@10"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_activations_are_reused_without_page_faults():
    """After retain_freed_memory (what `recommender train` calls first), a step's worth of
    1 MiB activations allocated and freed in turn reuse the heap instead of fresh mappings:
    each fresh mapping faults in its 256 pages on first touch."""
    assert retain_freed_memory()
    x = torch.randn(4096, 64)  # 1 MiB, as the seed network's first layer on a 4,096 batch
    live: list[torch.Tensor] = []
    for _ in range(20):  # warm the heap up to its working size
        live = [*live[-3:], torch.relu(x) + torch.relu(x)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):
        live = [*live[-3:], torch.relu(x) + torch.relu(x)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 100
    assert faults < 40, faults  # without it: about 90 an iteration here, with it 8-15
