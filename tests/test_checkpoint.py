"""The run directory: format versions, packed strings, refused pickles, metrics.jsonl, and no
import cycle."""

from __future__ import annotations

import ast
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
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
    pack_strings,
    read_metrics,
    save_best,
    truncate_metrics,
    unpack_strings,
)
from recommender.inference import Recommender
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
    assert again.user_ids.tolist() == ckpt.user_ids.tolist()
    assert again.state_dict.keys() == ckpt.state_dict.keys()
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
        code, err, str(run / BEST_FILE), "checkpoint format 7", "reads format 1 or 2"
    )


# Ids as readers give them: leading zeros kept, non-ASCII, an empty string, a NUL inside.
ODD = ["007", "0", "", "é", "日本語", "a b", "a\x00b", "🎬", "x" * 300]


def test_packed_strings_round_trip_exactly():
    packed = pack_strings(ODD)
    assert packed["utf8"].dtype == torch.uint8 and packed["offsets"].dtype == torch.int64
    assert bytes(packed["utf8"].numpy()) == "".join(ODD).encode("utf-8")
    back = unpack_strings(packed, "item_ids", Path("best.pt"))
    assert back is not None and back.dtype == object and back.tolist() == ODD
    assert unpack_strings(pack_strings([]), "item_ids", Path("best.pt")).tolist() == []
    assert unpack_strings(pack_strings(np.array(ODD[:2])), "x", Path("x")).tolist() == ODD[:2]
    with pytest.raises(ValueError, match="None"):
        pack_strings(["a", None])
    many = ODD * 2500  # unpacked slice by slice: the slices' edges lose or repeat nothing
    back = unpack_strings(pack_strings(many), "item_ids", Path("best.pt"))
    assert back is not None and back.tolist() == many


def longest_list(value: Any) -> int:
    """The length of the longest list or tuple in `value`, nested dicts included."""
    if isinstance(value, dict):
        return max((longest_list(v) for v in value.values()), default=0)
    if isinstance(value, list | tuple):
        return max([len(value), *(longest_list(v) for v in value)])
    return 0


def test_best_pt_holds_its_strings_as_tensors(gmf_run: Path, tmp_path: Path):
    run = copy_run(gmf_run, tmp_path / "run")
    best = load_best(run)
    n_users, n_items = best.n_users, best.n_items
    users = np.array([f"{i:03d}" if i % 2 else f"ü{i}" for i in range(n_users)], dtype=object)
    titles = np.array(["" if i % 3 else f"Film {i} — é" for i in range(n_items)], dtype=object)
    save_best(run, dataclasses.replace(best, user_ids=users, item_titles=titles))
    payload = torch.load(run / BEST_FILE, weights_only=True)
    for name in ("user_ids", "item_ids", "item_titles"):
        assert set(payload[name]) == {"offsets", "utf8"}, name
        assert all(isinstance(t, torch.Tensor) for t in payload[name].values()), name
    # lists of settings only (layer sizes, cut-offs), nothing per user or per item
    assert longest_list(payload) < 10, longest_list(payload)
    again = load_best(run)
    assert (
        again.user_ids.tolist() == users.tolist() and again.item_titles.tolist() == titles.tolist()
    )
    assert again.item_ids.tolist() == best.item_ids.tolist()
    rec = Recommender.from_run(run)
    assert rec.known_users(["001", "ü0", "1"]).tolist() == [True, True, False]
    assert rec.title(str(best.item_ids[0])) == "Film 0 — é"


def test_a_format_1_run_still_loads(gmf_run: Path, tmp_path: Path):
    """Format 1 stored best.pt's string columns as lists of str; nothing else differs."""
    run = copy_run(gmf_run, tmp_path / "run")
    payload = torch.load(run / BEST_FILE, weights_only=True)
    for name in ("user_ids", "item_ids"):
        payload[name] = unpack_strings(payload[name], name, run).tolist()
    payload["format_version"] = 1
    torch.save(payload, run / BEST_FILE)
    old, new = Recommender.from_run(run), Recommender.from_run(gmf_run)
    assert old.users.ids.tolist() == new.users.ids.tolist()
    users = new.users.ids[:5]
    assert (old.recommend(users, k=5)[0] == new.recommend(users, k=5)[0]).all()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: p["offsets"].__setitem__(-1, 10**6), "damaged"),  # past the bytes' end
        (lambda p: p["offsets"].__setitem__(1, 5), "damaged"),  # out of order
        (lambda p: p["utf8"].__setitem__(0, 0xFF), "damaged"),  # not UTF-8
        (lambda p: p.__setitem__("offsets", p["offsets"].int()), "not a packed string column"),
        (lambda p: p.pop("utf8"), "not a packed string column"),
    ],
)
def test_a_damaged_string_column_is_refused(gmf_run: Path, tmp_path: Path, damage, message):
    run = copy_run(gmf_run, tmp_path / "run")
    payload = torch.load(run / BEST_FILE, weights_only=True)
    damage(payload["item_ids"])
    torch.save(payload, run / BEST_FILE)
    with pytest.raises(RecommenderError, match=f"'item_ids' (is )?{message}"):
        load_best(run)


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
