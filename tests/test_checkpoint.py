"""The run directory: format versions, refused pickles, metrics.jsonl, and no import cycle."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from recommender.checkpoint import (
    BEST_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    METRICS_FILE,
    BestCheckpoint,
    append_metrics,
    load_best,
    read_metrics,
    truncate_metrics,
)
from recommender.utils import RecommenderError

SRC = Path(__file__).resolve().parents[1] / "src" / "recommender"


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for name in (CONFIG_FILE, BEST_FILE):
        shutil.copy(run / name, to / name)
    return to


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_best_checkpoint_round_trips(gmf_run: Path):
    ckpt = load_best(gmf_run)
    assert ckpt.to_dict()["format_version"] == FORMAT_VERSION
    again = BestCheckpoint.from_dict(ckpt.to_dict())
    assert again.user_ids == ckpt.user_ids and again.state_dict.keys() == ckpt.state_dict.keys()
    assert "state_dict" not in ckpt.meta() and ckpt.meta()["epoch"] == ckpt.epoch


@pytest.mark.parametrize("command", ["recommend", "evaluate"])
def test_a_checkpoint_of_another_format_is_refused(
    gmf_run: Path, tmp_path: Path, capsys, command: str
):
    run = copy_run(gmf_run, tmp_path / "run")
    payload = torch.load(run / BEST_FILE, weights_only=True)
    payload["format_version"] = 7
    torch.save(payload, run / BEST_FILE)
    args = [command, "--run", str(run)] + (["--user", "u10"] if command == "recommend" else [])
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(
        code, err, str(run / BEST_FILE), "checkpoint format 7", f"reads format {FORMAT_VERSION}"
    )


class Touch:
    """Unpickling this opens (so creates) a file: what a malicious checkpoint could do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_holding_an_object_is_refused_without_running_it(
    gmf_run: Path, tmp_path: Path, capsys
):
    run = copy_run(gmf_run, tmp_path / "run")
    marker = tmp_path / "touched"
    payload = torch.load(run / BEST_FILE, weights_only=True)
    payload["item_titles"] = Touch(marker)
    torch.save(payload, run / BEST_FILE)
    code, _, err = run_cli(["recommend", "--run", str(run), "--user", "u10"], capsys)
    assert_one_line_error(code, err, str(run / BEST_FILE), "refused")
    assert not marker.exists()
    with pytest.raises(RecommenderError, match="not only tensors"):
        load_best(run)
    assert not marker.exists()


def test_metrics_skip_a_torn_line_and_truncate_to_the_checkpoint(tmp_path: Path):
    for stage, epoch in ((0, 1), (0, 2), (1, 1)):
        append_metrics(tmp_path, {"stage_index": stage, "epoch": epoch})
    with open(tmp_path / METRICS_FILE, "a") as fh:
        fh.write('{"stage_index": 1, "ep')  # killed mid-write
    assert [r["epoch"] for r in read_metrics(tmp_path)] == [1, 2, 1]
    truncate_metrics(tmp_path, 0, 2)
    assert read_metrics(tmp_path) == [{"stage_index": 0, "epoch": e} for e in (1, 2)]
    assert read_metrics(tmp_path / "none") == []


def test_no_import_cycle_inside_the_package():
    """Every module's imports of the package, as a graph, has no cycle (lazy imports count)."""
    modules = {
        ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in SRC.rglob("*.py")
    }
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError(" -> ".join([*path[path.index(name) :], name]))
        if name not in done:
            for target in sorted(graph[name]):
                visit(target, [*path, name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
