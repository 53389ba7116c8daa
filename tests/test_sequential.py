"""SASRec trained by the real CLI on planted walks: what it learns, resume, the data it refuses,
the SASRec data format and the last_two_out split, NCF split files with timestamps (serving and
explaining such a run: test_sasrec_serving.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import (
    N_ITEMS,
    SASREC,
    interrupted_run,
    run_cli,
    sequential_frame,
    write_csv,
    write_ncf_split,
)
from recommender.checkpoint import load_checkpoint
from recommender.config import load_config
from recommender.inference import Recommender
from recommender.models import SASRec
from recommender.runs import load_run
from recommender.sequential import SequenceSource, sequence_batches
from recommender.tune import inert_keys
from recommender.utils import ConfigError

TIMING = {"train_seconds", "samples_per_second"}


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--model", "sasrec", "--out", str(out)] + [
        f"--set={s}" for s in [*SASREC, *extra]
    ]


def full_hr10(run: Path, capsys: pytest.CaptureFixture[str]) -> tuple[float, float]:
    """(the run's, Popularity's) FULL HR@10 on the test split."""
    code, text, err = run_cli(["evaluate", "--run", str(run), "--json"], capsys)
    assert code == 0, err
    results = json.loads(text)["results"]
    return results["sasrec/full"]["metrics"]["hr@10"], results["popularity/full"]["metrics"][
        "hr@10"
    ]


@pytest.fixture(scope="module")
def walks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(sequential_frame(), tmp_path_factory.mktemp("walks") / "walks.csv")


def test_sasrec_learns_the_walk(sasrec_run: Path, capsys):
    """Only order predicts a walk's next item; Popularity ranks it by chance."""
    ours, popularity = full_hr10(sasrec_run, capsys)
    assert ours > 0.9 and ours > popularity + 0.6, (ours, popularity)


@pytest.mark.parametrize(
    "extra",
    [
        ["train.loss=gbce", "train.num_negatives=16"],
        ["train.loss=sampled_softmax", "train.pool_size=16"],
    ],
    ids=["gbce", "sampled_softmax"],
)
def test_sampled_losses_learn_the_walk(walks: Path, tmp_path: Path, capsys, extra: list[str]):
    """16 sampled negatives of 120 items a batch: the walk is learnt as with the softmax."""
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(walks, out, *extra), capsys)
    assert code == 0, err
    ours, popularity = full_hr10(out, capsys)
    assert ours > 0.9 and ours > popularity + 0.6, (ours, popularity)


def test_a_pool_as_large_as_the_catalog_trains_the_full_softmax(
    walks: Path, tmp_path: Path, capsys
):
    """sampled_softmax with pool_size >= n_items is the full softmax, to the last bit."""
    runs = {}
    for loss, pool in (("softmax", 16), ("sampled_softmax", N_ITEMS)):
        runs[loss] = tmp_path / loss
        extra = ["train.epochs=3", f"train.loss={loss}", f"train.pool_size={pool}"]
        assert run_cli(train_args(walks, runs[loss], *extra), capsys)[0] == 0
    assert records(runs["softmax"]) == records(runs["sampled_softmax"])


def test_recommender_recommends_what_follows_the_stored_sequence(sasrec_run: Path):
    """Loaded from its run directory, the model's top item for a user is the test item: the
    walk's step after the training and validation items it stored."""
    rec = Recommender.from_run(sasrec_run)
    test_items = sequential_frame().groupby("user_id")["item_id"].last()
    items, _ = rec.recommend(list(test_items.index), k=1)
    assert np.mean(items[:, 0].astype(int) == test_items.to_numpy()) > 0.9


def records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING} for x in lines]


@pytest.mark.parametrize("kill_at", [3, 5], ids=["mid-selection", "at-refit-start"])
def test_resume_gives_the_uninterrupted_result(
    walks: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kill_at: int
):
    """Killed after an epoch trained but before its checkpoint, then --resume: the same
    metrics and bit-identical weights (dropout's RNG and the batch order restored)."""
    extra = ["train.epochs=4", "train.loss=gbce", "train.num_negatives=8", "model.dropout=0.3"]
    whole = tmp_path / "whole"
    assert run_cli(train_args(walks, whole, *extra), capsys)[0] == 0
    out = tmp_path / "run"
    interrupted_run(train_args(walks, out, *extra), kill_at, capsys)
    code, _, err = run_cli([*train_args(walks, out, *extra), "--resume"], capsys)
    assert code == 0, err
    assert records(out) == records(whole)
    for name, key in (("best.pt", "state_dict"), ("last.pt", "model")):
        expected, got = (load_checkpoint(run / name)[key] for run in (whole, out))
        assert all(torch.equal(expected[k], got[k]) for k in expected), name


def test_data_without_an_order_is_refused_before_a_run_directory(tmp_path: Path, capsys):
    frame = sequential_frame(n_users=30, per_user=10)
    path = write_csv(frame.drop(columns="timestamp"), tmp_path / "no_time.csv")
    out = tmp_path / "run"
    code, _, err = run_cli(train_args(path, out, "data.split=random"), capsys)
    assert code == 2 and "model.name=sasrec reads each user's items in time order" in err, err
    assert "no timestamp column" in err and not out.exists()
    # one timestamp on every row orders nothing either
    path = write_csv(frame.assign(timestamp=7), tmp_path / "same_time.csv")
    code, _, err = run_cli(train_args(path, out, "data.split=random"), capsys)
    assert code == 2 and "one timestamp on every row" in err and not out.exists(), err


def test_losses_that_do_not_apply_are_refused():
    with pytest.raises(ConfigError, match=r"train\.loss=bce with model\.name=sasrec"):
        load_config(None, ["model.name=sasrec", "train.loss=bce"])
    with pytest.raises(ConfigError, match=r"train\.loss=gbce with model\.name=mf"):
        load_config(None, ["model.name=mf", "train.loss=gbce"])
    with pytest.raises(ConfigError, match=r"train\.pool=popularity does not apply to sasrec"):
        load_config(
            None, ["model.name=sasrec", "train.loss=sampled_softmax", "train.pool=popularity"]
        )
    with pytest.raises(ConfigError, match="not divisible by heads=3"):
        load_config(None, ["model.name=sasrec", "model.heads=3"])
    assert load_config(None, ["model.name=sasrec"]).train.loss == "softmax"


def test_sasrec_format_and_last_two_out_split(tmp_path: Path, capsys):
    """Walks written in the SASRec format (`user item` lines in time order, ids renumbered),
    plus two users with 2 items, who stay in training only. At test time the model reads
    everything before the test item, the validation item last."""
    frame = sequential_frame()
    short = frame.groupby("user_id").head(2).assign(user_id=lambda f: f["user_id"] + "x")
    frame = pd.concat([frame, short.head(4)]).sort_values(["user_id", "timestamp"], kind="stable")
    users = frame["user_id"].factorize()[0] + 1
    path = tmp_path / "walks.txt"
    path.write_text("".join(f"{u} {i}\n" for u, i in zip(users, frame["item_id"], strict=True)))
    out = tmp_path / "run"
    extra = ["data.format=sasrec", "data.split=last_two_out", "eval.num_negatives=100"]
    code, _, err = run_cli(train_args(path, out, *extra), capsys)
    assert code == 0, err
    _, rec, data = load_run(out)
    n_users = frame["user_id"].nunique()
    assert len(data.test) == len(data.valid) == n_users - 2 and len(data.users) == n_users
    assert len(data.train) == len(frame) - 2 * (n_users - 2)
    model = rec.model
    assert isinstance(model, SASRec)
    valid_user = data.valid.user_idx
    assert model.latest[valid_user, -1].tolist() == data.valid.item_idx.tolist()
    ours, popularity = full_hr10(out, capsys)
    assert ours > 0.9 and ours > popularity + 0.6, (ours, popularity)
    report = json.loads((out / "eval.json").read_text())
    assert "100 sampled negatives" in " ".join(report["notes"])


def test_ncf_split_files_with_timestamps_train_as_they_are(tmp_path: Path, capsys):
    """Training items ordered by time, the latest one validation, the test item predicted
    after all of them: without a refit too, where training and validation read train alone."""
    train, test, negatives = write_ncf_split(sequential_frame(), tmp_path / "ncf")
    out = tmp_path / "run"
    args = ["train", "--train", str(train), "--test", str(test), "--test-negatives",
            str(negatives), "--model", "sasrec", "--out", str(out)]  # fmt: skip
    code, _, err = run_cli(args + [f"--set={s}" for s in [*SASREC, "train.refit=false"]], capsys)
    assert code == 0, err
    _, rec, data = load_run(out)
    assert isinstance(rec.model, SASRec)
    assert rec.model.latest[data.valid.user_idx, -1].tolist() == data.valid.item_idx.tolist()
    assert full_hr10(out, capsys)[0] > 0.9


def test_ranks_share_the_permutation_but_not_the_negatives():
    rows = torch.arange(21)[:, None]  # row r holds item r: a batch names its rows
    source = SequenceSource(rows, rows, n_items=30)
    drawn = []
    for rank in (0, 1):
        gen = torch.Generator().manual_seed(3)
        batches = sequence_batches(source, batch_size=4, num_negatives=5, generator=gen,
                                   rank=rank, world_size=2)  # fmt: skip
        drawn.append(list(batches))
    taken = [torch.cat([inputs for inputs, _, _ in batches]).ravel() for batches in drawn]
    assert [len(t) for t in taken] == [10, 10]  # equal shares, so ranks step in lockstep
    assert len(torch.unique(torch.cat(taken))) == 20  # disjoint
    negatives = [torch.stack([n for _, _, n in batches if n is not None]) for batches in drawn]
    assert negatives[0].shape == negatives[1].shape == (3, 5)
    assert not torch.equal(negatives[0], negatives[1])


def test_batches_are_cut_to_their_longest_sequence():
    pad = 9
    inputs = torch.tensor([[pad, pad, pad, 1], [pad, pad, 2, 3], [4, 5, 6, 7]])
    source = SequenceSource(inputs, inputs, n_items=pad)
    gen = torch.Generator().manual_seed(0)
    widths = {
        int(x[:, -1].min()): x.shape[1]
        for x, _, _ in sequence_batches(source, batch_size=1, num_negatives=0, generator=gen)
    }
    assert widths == {1: 1, 3: 2, 7: 4}


def test_a_study_tunes_only_what_sasrec_reads():
    gbce = load_config(None, ["model.name=sasrec", "train.loss=gbce"])
    assert {"model.mlp_layers", "train.pretrain"} <= inert_keys(gbce)
    assert "train.gbce_t" not in inert_keys(gbce)
    softmax = load_config(None, ["model.name=sasrec"])
    assert {"train.gbce_t", "train.num_negatives", "train.pool_size"} <= inert_keys(softmax)
    sampled = load_config(None, ["model.name=sasrec", "train.loss=sampled_softmax"])
    assert {"train.gbce_t", "train.num_negatives", "train.pool"} <= inert_keys(sampled)
    assert not {"train.pool_size", "train.logq"} & inert_keys(sampled)


def test_sequential_preset_is_sasrec_with_a_loss_that_scales():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "sequential.yaml")
    assert cfg.model.name == "sasrec" and cfg.train.loss == "gbce"
    assert not cfg.train.refit and cfg.eval.num_negatives == 100
