"""The `recommender` command end to end, and every bad input the issue lists.

Bad input must give one line on stderr naming the file and line (or the config key), exit code
2, no traceback, and no half-written run directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import (
    FAST,
    planted_frame,
    run_cli,
    walk_successors,
    write_csv,
    write_lightgcn_split,
    write_ncf_split,
)
from recommender.checkpoint import read_config
from recommender.inference import Recommender

SRC = Path(__file__).parents[1] / "src"


def fast_sets(*extra: str) -> list[str]:
    return [f"--set={s}" for s in [*FAST, *extra]]


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# -- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_reports_both_protocols_and_beats_popularity(gmf_run: Path, capsys):
    code, out, err = run_cli(["evaluate", "--run", str(gmf_run), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report == json.loads((gmf_run / "eval.json").read_text())
    results = report["results"]
    assert set(results) == {"gmf/full", "gmf/sampled", "popularity/full", "popularity/sampled"}
    for protocol in ("full", "sampled"):
        ours = results[f"gmf/{protocol}"]
        pop = results[f"popularity/{protocol}"]
        assert ours["protocol"] == pop["protocol"] == protocol
        assert ours["n_users"] == 160
        # The planted structure: a collaborative model clearly beats popularity.
        assert ours["metrics"]["hr@10"] > pop["metrics"]["hr@10"] + 0.3, protocol
        assert ours["metrics"]["ndcg@10"] > pop["metrics"]["ndcg@10"] + 0.15, protocol
    assert any(n.startswith("FULL:") for n in report["notes"])
    assert any("50 sampled negatives" in n for n in report["notes"])

    code, out, _ = run_cli(["evaluate", "--run", str(gmf_run)], capsys)
    assert code == 0
    assert "protocol" in out and "full" in out and "sampled" in out and "note: SAMPLED" in out


@pytest.mark.slow
def test_evaluate_runs_on_the_runs_own_threads(gmf_run: Path, capsys, monkeypatch):
    """As training and `report` do: torch's default of a thread a core made two evaluations
    side by side on two cores several times slower."""
    threads: list[int | None] = []
    monkeypatch.setattr("recommender.cli.set_threads", threads.append)
    code, _, err = run_cli(["evaluate", "--run", str(gmf_run)], capsys)
    assert code == 0, err
    assert threads == [read_config(gmf_run).threads]


@pytest.mark.slow
def test_neumf_on_ncf_split_files_end_to_end(tmp_path: Path, capsys):
    train, test, negatives = write_ncf_split(planted_frame(seed=1), tmp_path / "ncf")
    out = tmp_path / "runs" / "neumf"
    args = ["train", "--train", str(train), "--test", str(test), "--test-negatives",
            str(negatives), "--model", "neumf", "--out", str(out)]  # fmt: skip
    code, stdout, err = run_cli(args + fast_sets("train.epochs=3", "train.lr=0.005"), capsys)
    assert code == 0, err
    assert "trained neumf" in stdout
    assert {"best.pt", "last.pt", "config.yaml", "metrics.jsonl"} <= {p.name for p in out.iterdir()}
    code, stdout, err = run_cli(["evaluate", "--run", str(out), "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    assert any("given negatives file" in n for n in report["notes"])
    for protocol in ("full", "sampled"):
        ours = report["results"][f"neumf/{protocol}"]["metrics"]["hr@10"]
        pop = report["results"][f"popularity/{protocol}"]["metrics"]["hr@10"]
        assert ours > pop + 0.25, (protocol, ours, pop)


@pytest.mark.parametrize("model", ["popularity", "mf"])
def test_lightgcn_files_report_recall_and_ndcg_at_20(tmp_path: Path, capsys, model: str):
    train, test = write_lightgcn_split(planted_frame(), tmp_path / "gowalla-like")
    out = tmp_path / "runs" / model
    args = ["train", "--train", str(train), "--test", str(test), "--model", model]
    code, stdout, err = run_cli([*args, "--out", str(out), *fast_sets("train.epochs=2")], capsys)
    assert code == 0, err
    code, stdout, err = run_cli(["evaluate", "--run", str(out), "--json"], capsys)
    assert code == 0, err
    report = json.loads(stdout)
    # no negatives file: FULL ranking only, SAMPLED said to be not applicable
    assert set(report["results"]) == {f"{model}/full", "popularity/full"}
    assert any(n.startswith("SAMPLED: not applicable") for n in report["notes"])
    assert any(n.startswith("several test items per user: recall@K") for n in report["notes"])
    metrics = report["results"][f"{model}/full"]["metrics"]
    assert 0 < metrics["recall@20"] <= 1 and 0 < metrics["ndcg@20"] <= 1
    code, stdout, _ = run_cli(["evaluate", "--run", str(out)], capsys)
    table = stdout.split("note:")[0]
    assert "recall@20" in table and "ndcg@20" in table and "sampled" not in table
    assert "note: SAMPLED: not applicable" in stdout


def test_recommend_for_one_user(gmf_run: Path, capsys):
    code, out, err = run_cli(
        ["recommend", "--run", str(gmf_run), "--user", "u10", "--k", "5"], capsys
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "top-5 for user u10"
    assert len(lines) == 6 and lines[1].strip().startswith("1.")


def test_recommend_with_explanations_and_fallback(gmf_run: Path, capsys):
    args = ["recommend", "--run", str(gmf_run), "--user", "u10", "--k", "3", "--explain"]
    code, out, _ = run_cli(args, capsys)
    assert code == 0
    assert out.count("because you liked") == 3
    code, out, _ = run_cli(["recommend", "--run", str(gmf_run), "--user", "stranger"], capsys)
    assert code == 0
    assert out.splitlines()[0] == "top-10 for user stranger (popularity fallback)"


def test_recommend_for_a_new_users_history(gmf_run: Path, capsys):
    base = ["recommend", "--run", str(gmf_run), "--k", "3", "--explain"]
    code, out, err = run_cli([*base, "--history", "15", "25", "no-such-item"], capsys)
    assert code == 0, err
    assert out.splitlines()[0] == "top-3 for user new (folded in from 3 items)"
    assert out.count("because you liked") == 3
    code, out, err = run_cli([*base, "--history", "15", "--after", "25"], capsys)
    assert code == 2 and "--history is a new user's" in err


def test_recommend_after_given_items(walks_run: Path, gmf_run: Path, capsys):
    rec = Recommender.from_run(walks_run)
    first = rec.items.to_list()[3]
    walk = [first, walk_successors()[first]]
    for user in ([], ["--user", "u10"]):
        args = ["recommend", "--run", str(walks_run), *user, "--k", "3", "--after", *walk]
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        lines = out.splitlines()
        who = "an anonymous session" if not user else "user u10"
        assert lines[0] == f"top-3 for {who} after {walk[0]}, {walk[1]}"
        expected = rec.recommend_next(walk, k=3, user_id=user[1] if user else None)[0]
        assert [line.split()[1] for line in lines[1:]] == expected.tolist()
    code, _, err = run_cli(["recommend", "--run", str(gmf_run), "--after", "15"], capsys)
    assert_one_line_error(code, err, "model.context")
    args = ["recommend", "--run", str(walks_run), "--after", *walk, "--explain"]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, "--explain with --after needs --user")
    code, out, err = run_cli([*args, "--user", "u10", "--k", "2"], capsys)
    assert code == 0, err
    assert out.count("because you liked") == 2


def test_recommend_all_users_to_csv(gmf_run: Path, tmp_path: Path, capsys):
    path = tmp_path / "recs.csv"
    args = ["recommend", "--run", str(gmf_run), "--all-users", "--k", "7", "--out", str(path)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    recs = pd.read_csv(path, dtype={"user_id": str, "item_id": str})
    assert list(recs.columns) == ["user_id", "item_id", "rank", "score"]
    assert len(recs) == 160 * 7
    assert recs.groupby("user_id")["rank"].apply(list).map(lambda r: r == list(range(1, 8))).all()
    frame = planted_frame()
    seen = set(zip(frame["user_id"], frame["item_id"].astype(str), strict=True))
    # History = train + validation; only the held-out test item may reappear.
    overlap = [p for p in zip(recs["user_id"], recs["item_id"], strict=True) if p in seen]
    assert len(overlap) <= 160
    assert set(recs["item_id"]) <= set(frame["item_id"].astype(str))


def test_score_pairs_keeps_rows_and_order(gmf_run: Path, tmp_path: Path, capsys):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_id,item_id\nu10,15\nstranger,25\nu10,25\nu13,15\n")
    out = tmp_path / "scores.csv"
    args = ["score", "--run", str(gmf_run), "--pairs", str(pairs), "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    scored = pd.read_csv(out, dtype={"user_id": str, "item_id": str})
    assert list(scored.columns) == ["user_id", "item_id", "score"]
    assert scored[["user_id", "item_id"]].values.tolist() == [
        ["u10", "15"], ["stranger", "25"], ["u10", "25"], ["u13", "15"],
    ]  # fmt: skip
    assert scored["score"].between(0, 1).all()


def test_train_refuses_a_non_empty_run_directory(planted_csv: Path, tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["train", "--data", str(planted_csv), "--model", "popularity", "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert (out / "notes.txt").read_text() == "keep me"
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err
    assert not (out / "notes.txt").exists() and (out / "best.pt").is_file()


def test_data_path_is_taken_literally(tmp_path: Path, capsys):
    # Paths go through the config as YAML strings; a ' #' must not start a comment.
    path = write_csv(planted_frame(n_users=30, per_user=8), tmp_path / "ratings #2.csv")
    out = tmp_path / "run"
    args = ["train", "--data", str(path), "--model", "popularity", "--out", str(out)]
    code, _, err = run_cli(args + fast_sets(), capsys)
    assert code == 0, err


def test_popularity_run_recommends(planted_csv: Path, tmp_path: Path, capsys):
    out = tmp_path / "pop"
    code, _, err = run_cli(
        ["train", "--data", str(planted_csv), "--model", "popularity", "--out", str(out)], capsys
    )
    assert code == 0, err
    code, stdout, err = run_cli(["recommend", "--run", str(out), "--user", "u10"], capsys)
    assert code == 0, err
    assert len(stdout.splitlines()) == 11
    code, stdout, err = run_cli(["evaluate", "--run", str(out), "--json"], capsys)
    assert code == 0, err
    assert set(json.loads(stdout)["results"]) == {"popularity/full", "popularity/sampled"}


# -- bad input -------------------------------------------------------------------------------

HEADER = "user_id,item_id,rating,timestamp\n"
GOOD_ROWS = "".join(f"u{u},{i},5,{u * 10 + i}\n" for u in range(3) for i in range(4))

BAD_FILES = {
    "misnamed_columns": ("user,item,rating,timestamp\n" + GOOD_ROWS, ["'user_id'"]),
    "missing_column": ("user_id,rating,timestamp\nu1,5,1\n", ["'item_id'"]),
    "non_numeric_rating": (HEADER + "u1,1,5,10\nu1,2,five,11\n", ["line 3", "rating", "five"]),
    "non_numeric_timestamp": (HEADER + "u1,1,5,10\nu1,2,5,noon\n", ["line 3", "timestamp"]),
    "nan_rating": (HEADER + GOOD_ROWS + "u9,1,NaN,10\n", ["line 14", "rating"]),
    "nan_timestamp": (HEADER + "u1,1,5,nan\n", ["line 2", "timestamp"]),
    "empty_user": (HEADER + "u1,1,5,10\n,2,5,11\n", ["line 3", "user_id"]),
    "empty_file": ("", ["empty"]),
    "header_only": (HEADER, ["empty"]),
    "ragged_row": (HEADER + "u1,1,5,10\nu1,2,5,11,extra\n", ["line 3"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_data_files(case: str, tmp_path: Path, capsys):
    text, fragments = BAD_FILES[case]
    path = tmp_path / f"{case}.csv"
    path.write_text(text)
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(path), "--out", str(out), *fast_sets()], capsys)
    assert_one_line_error(code, err, str(path), *fragments)
    assert not out.exists()


def test_missing_data_file(tmp_path: Path, capsys):
    path = tmp_path / "nope.csv"
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(path), "--out", str(out)], capsys)
    assert_one_line_error(code, err, str(path), "not found")
    assert not out.exists()


def ncf_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    return write_ncf_split(planted_frame(n_users=20, per_user=6), tmp_path / "ncf", 5)


@pytest.mark.parametrize(
    ("line", "fragments"),
    [
        ("u10,5\t15\t25\t35\t45\t55", ["line 2", "(user,item)"]),
        ("(u10,5)\t15\t25", ["line 2", "negatives"]),
    ],
    ids=["no_parentheses", "too_few_negatives"],
)
def test_malformed_negatives_line(tmp_path: Path, capsys, line: str, fragments: list[str]):
    train, test, negatives = ncf_files(tmp_path)
    lines = negatives.read_text().splitlines()
    lines[1] = line
    negatives.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["train", "--train", str(train), "--test", str(test), "--test-negatives",
            str(negatives), "--out", str(out), *fast_sets()]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(negatives), *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda lines: ["(u7,99999)" + lines[0][lines[0].index(")") + 1 :], *lines[1:]],
         "(u7,99999), which is not a pair"),
        (lambda lines: ["(u7,15)" + lines[0][lines[0].index(")") + 1 :], *lines[1:]],
         "(u7,15), which is not a pair"),
        (lambda lines: lines[1:], "no negatives line for test pair"),
    ],
    ids=["unknown_item", "not_the_test_item", "missing_line"],
)  # fmt: skip
def test_negatives_that_do_not_match_the_test_file(tmp_path: Path, capsys, edit, fragment):
    train, test, negatives = ncf_files(tmp_path)
    test_items = dict(line.split("\t")[:2] for line in test.read_text().splitlines())
    assert test_items["u7"] != "15"
    lines = edit(negatives.read_text().splitlines())
    negatives.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["train", "--train", str(train), "--test", str(test), "--test-negatives",
            str(negatives), "--out", str(out), *fast_sets()]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(negatives), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    ("train_text", "test_text", "bad", "fragments"),
    [
        ("0 1 2\n1 2 3\n", "0 4\n1 x\n", "test", ["line 2", "'x'"]),
        ("0 1 2\n1 2 3.0\n", "0 4\n", "train", ["line 2", "'3.0'"]),
        ("", "0 4\n", "train", ["file is empty"]),
        ("0 1 2\n1 2 3\n", "0 4\n2 5\n", "test", ["line 2", "user '2'", "no training items"]),
    ],
    ids=["non_integer_test", "non_integer_train", "empty_train", "test_user_without_training"],
)
def test_bad_lightgcn_files(tmp_path: Path, capsys, train_text, test_text, bad, fragments):
    files = {"train": tmp_path / "train.txt", "test": tmp_path / "test.txt"}
    files["train"].write_text(train_text)
    files["test"].write_text(test_text)
    out = tmp_path / "run"
    args = ["train", "--train", str(files["train"]), "--test", str(files["test"]), "--set",
            "data.format=lightgcn", "--out", str(out), *fast_sets()]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(files[bad]), *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    ("sets", "fragment"),
    [
        (["train.epoch=3"], "unknown config key 'train.epoch'"),
        (["modle.name=gmf"], "unknown config key 'modle'"),
        (["train.epochs=zero"], "train.epochs"),
        (["train.monitor=accuracy"], "train.monitor"),
    ],
)
def test_bad_config_values(planted_csv: Path, tmp_path: Path, capsys, sets, fragment):
    out = tmp_path / "run"
    args = ["train", "--data", str(planted_csv), "--out", str(out), *fast_sets(*sets)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_unknown_key_in_config_file(planted_csv: Path, tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 2\n  learning_rate: 0.1\n")
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", str(planted_csv), "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(config), "train.learning_rate")
    assert not out.exists()


def test_data_without_validation_split_leaves_no_run_dir(tmp_path: Path, capsys):
    path = tmp_path / "tiny.csv"
    path.write_text(HEADER + "".join(f"u{u},{u},5,1\nu{u},{u + 1},5,2\n" for u in range(4)))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(path), "--out", str(out), *fast_sets()], capsys)
    assert_one_line_error(code, err, str(path), "validation")
    assert not out.exists()


@pytest.mark.parametrize("command", ["evaluate", "recommend", "score"])
@pytest.mark.parametrize("kind", ["missing", "empty_dir", "file", "garbage_checkpoint"])
def test_a_run_directory_that_is_not_one(tmp_path: Path, capsys, command: str, kind: str):
    run = tmp_path / "run"
    if kind == "empty_dir":
        run.mkdir()
    elif kind == "file":
        run.write_text("hello")
    elif kind == "garbage_checkpoint":
        run.mkdir()
        (run / "best.pt").write_bytes(b"junk")
        (run / "config.yaml").write_text("seed: 1\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("user_id,item_id\nu1,5\n")
    args = {
        "evaluate": ["evaluate", "--run", str(run)],
        "recommend": ["recommend", "--run", str(run), "--user", "u1"],
        "score": [
            "score",
            "--run",
            str(run),
            "--pairs",
            str(pairs),
            "--out",
            str(tmp_path / "o.csv"),
        ],
    }[command]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(run))
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("user,item\nu10,15\n", ["missing column"]),
        ("", ["empty"]),
        ("user_id,item_id\nu10,15\nu10,nope\n", ["line 3", "unknown item_id 'nope'"]),
        ("user_id,item_id\nu10,15\n,15\n", ["line 3", "empty user_id"]),
    ],
)
def test_score_bad_pairs(gmf_run: Path, tmp_path: Path, capsys, text, fragments):
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(text)
    out = tmp_path / "scores.csv"
    args = ["score", "--run", str(gmf_run), "--pairs", str(pairs), "--out", str(out)]
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, str(pairs), *fragments)
    assert not out.exists()


def test_recommend_needs_a_user(gmf_run: Path, capsys):
    code, _, err = run_cli(["recommend", "--run", str(gmf_run)], capsys)
    assert_one_line_error(code, err, "--user")
    code, _, err = run_cli(["recommend", "--run", str(gmf_run), "--all-users"], capsys)
    assert_one_line_error(code, err, "--out")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--train", "a.rating"], "--train and --test"),
        (["--data", "a.csv", "--test-negatives", "a.negative"], "--test-negatives needs"),
        (["--data", "a.csv", "--resume", "--overwrite"], "contradict"),
    ],
)
def test_contradictory_flags(tmp_path: Path, capsys, flags: list[str], fragment: str):
    code, _, err = run_cli(["train", *flags, "--out", str(tmp_path / "r")], capsys)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_real_process_prints_one_line_and_exits_2(tmp_path: Path):
    """The installed entry point, in a fresh process: no traceback reaches the user."""
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + "u1,1,5,10\nu1,2,NaN,11\n")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run(
        [sys.executable, "-m", "recommender", "train", "--data", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert str(path) in proc.stderr and "line 3" in proc.stderr
    assert not out.exists()
