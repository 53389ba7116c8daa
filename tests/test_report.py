"""`recommender report` end to end on a tiny planted run with titles and genres.

The data is the planted cluster structure of conftest, imported as a local copy of a built-in
dataset (ml-1m layout), so the run carries titles and genres: each item's genre is its planted
cluster, and its title holds characters that must be escaped in HTML. User activity varies
(4 to 16 interactions), so the activity buckets are not empty.
"""

from __future__ import annotations

import json
import re
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import FAST, N_CLUSTERS, planted_frame, run_cli
from recommender.cli import main
from recommender.data.datasets import fetch
from recommender.inference import Recommender
from recommender.insights import item_map
from recommender.report import SECTIONS, build_report
from recommender.utils import RecommenderError

GENRES = ["Action", "Comedy", "Drama", "Horror", "Sci-Fi", "Western", "Musical", "Noir"]
NASTY = '<i>&"Q"</i>'  # in every title: must reach the HTML escaped
FIGURES = [
    "training_curves.png",
    "branch_share.png",
    "item_map.png",
    "popularity_bias.png",
    "activity.png",
]
MF_FAST = ["train.epochs=3", "train.batch_size=512", "train.lr=0.02", "model.embedding_dim=8"]


def write_dataset(folder: Path) -> None:
    """ratings.dat and movies.dat (ml-1m layout) of the planted data, activity 4 to 16."""
    frame = planted_frame().sort_values(["user_id", "timestamp"], kind="stable")
    users = pd.factorize(frame["user_id"])[0]
    keep = np.array([4, 8, 16])[users % 3]  # every third user keeps 4, 8 or all 16
    frame = frame[frame.groupby("user_id").cumcount().to_numpy() < keep]
    folder.mkdir(parents=True)
    columns = [frame[c].astype(str) for c in ("user_id", "item_id", "rating", "timestamp")]
    lines = columns[0] + "::" + columns[1] + "::" + columns[2] + "::" + columns[3]
    (folder / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    items = np.sort(frame["item_id"].unique())
    cluster = (items - 5) // 10 % N_CLUSTERS  # conftest: item i has id 10 i + 5, cluster i % 8
    movies = [
        f"{item}::Film {item} {NASTY}::{GENRES[c]}|Drama"
        for item, c in zip(items, cluster, strict=True)
    ]
    (folder / "movies.dat").write_text("\n".join(movies) + "\n", encoding="latin-1")


@pytest.fixture(scope="module")
def titled_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NeuMF run (pretraining on) on the planted data, with titles and genres."""
    base = tmp_path_factory.mktemp("report")
    write_dataset(base / "copy")
    fetch("ml-1m", base / "data", local=base / "copy")
    out = base / "runs" / "neumf"
    sets = [*FAST, "train.epochs=4", f"data.root={base / 'data'}"]
    args = ["train", "--dataset", "ml-1m", "--model", "neumf", "--out", str(out)]
    assert main(args + [f"--set={s}" for s in sets]) == 0
    return out


@pytest.fixture(scope="module")
def built(titled_run: Path) -> Path:
    return build_report(titled_run, mf_overrides=MF_FAST)


def table(part: str) -> dict[str, dict[str, str]]:
    """The first HTML table in `part`: first cell of each row -> column name -> cell."""
    header = re.findall(r"<th>([^<]*)</th>", part.split("</thead>")[0])
    body = part.split("</thead>")[1].split("</table>")[0]
    cells = [re.findall(r"<td>([^<]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", body)]
    return {row[0]: dict(zip(header, row, strict=True)) for row in cells}


def section(html: str, key: str) -> str:
    """The HTML of one report section."""
    match = re.search(f'<section id="{key}">(.*?)</section>', html, re.S)
    assert match, key
    return match.group(1)


@pytest.mark.slow
def test_report_files_and_sections(titled_run: Path, built: Path):
    assert built == titled_run / "report" / "report.html"
    folder = built.parent
    for name in FIGURES:
        assert (folder / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = built.read_text(encoding="utf-8")
    for key, title in SECTIONS.items():
        assert f'<section id="{key}"><h2>{title}</h2>' in html
    assert html.count("data:image/png;base64,") == len(FIGURES)
    # Self-contained: every src / href is an embedded image or an anchor; no scripts, no links.
    for target in re.findall(r'(?:src|href)="([^"]*)"', html):
        assert target.startswith(("data:image/png;base64,", "#")), target
    assert not re.search(r"<script|<link|@import|url\(", html)
    assert (titled_run / "baselines" / "mf" / "best.pt").is_file()
    insights = json.loads((folder / "insights.json").read_text())
    assert set(insights["popularity_bias"]) == {"neumf", "mf", "popularity"}


@pytest.mark.slow
def test_metrics_table_has_every_model_under_both_protocols(built: Path):
    metrics = section(built.read_text(encoding="utf-8"), "metrics")
    full, sampled = metrics.split("<h3>SAMPLED protocol</h3>")
    assert "<h3>FULL protocol</h3>" in full
    for part in (full, sampled):
        assert list(table(part)) == ["neumf", "mf", "popularity"]
    # The planted structure: NeuMF's FULL hr@10 is well above Popularity's.
    rows = table(full)
    assert float(rows["neumf"]["hr@10"]) > float(rows["popularity"]["hr@10"]) + 0.2


@pytest.mark.slow
def test_text_from_the_data_is_escaped(built: Path):
    html = built.read_text(encoding="utf-8")
    assert NASTY not in html
    samples = section(html, "samples")
    assert samples.count(escape(NASTY)) >= 20  # in titles and in the reasons that name titles
    assert "because you liked" in samples


@pytest.mark.slow
def test_insight_sections_say_what_they_found(built: Path):
    html = built.read_text(encoding="utf-8")
    branches = section(html, "branches")
    assert "GMF carries" in branches and "by the MLP part alone" in branches
    assert "first listed genre" in section(html, "item-map")
    activity = section(html, "activity")
    for bucket in ("cold", "regular", "heavy"):
        assert f"<td>{bucket}</td>" in activity
    insights = json.loads((built.parent / "insights.json").read_text())
    buckets = insights["activity"]["buckets"]
    assert [b["n_users"] for b in buckets] == [54, 53, 53]  # 4, 8 and 16 interactions
    share = insights["branch_share"]
    assert share["applicable"] and 0 < share["top_gmf"] < 1
    pop, ours = (insights["popularity_bias"][m] for m in ("popularity", "neumf"))
    # Popularity lives in the short head; a model that learned the clusters reaches further.
    assert pop["head_share"]["top 20%"] > ours["head_share"]["top 20%"]
    assert pop["mean_percentile"] > ours["mean_percentile"]
    assert ours["coverage"] > 2 * pop["coverage"]


@pytest.mark.slow
def test_item_map_groups_the_planted_genres(titled_run: Path):
    rec = Recommender.from_run(titled_run)
    imap = item_map(rec.model, rec.item_counts, rec.meta["item_genres"])
    assert imap is not None and imap.genres is not None
    assert set(imap.genres) <= set(GENRES)  # the first listed genre: the planted cluster
    coords, genres = imap.coords, imap.genres
    dist = np.linalg.norm(coords[:, None] - coords[None], axis=-1)
    same = genres[:, None] == genres[None]
    off_diagonal = ~np.eye(len(genres), dtype=bool)
    assert dist[same & off_diagonal].mean() < 0.7 * dist[~same].mean()


@pytest.mark.slow
def test_rebuild_reuses_the_baseline_and_no_mf_says_so(titled_run: Path, built: Path):
    baseline = titled_run / "baselines" / "mf" / "best.pt"
    stamp = baseline.stat().st_mtime_ns
    again = build_report(titled_run, mf_overrides=MF_FAST)
    assert baseline.stat().st_mtime_ns == stamp
    assert "reused from an earlier build" in section(again.read_text(encoding="utf-8"), "summary")
    skipped = build_report(titled_run, skip_mf=True, out=titled_run / "no-mf")
    html = skipped.read_text(encoding="utf-8")
    assert "skipped (--no-mf)" in section(html, "summary")
    assert "<td>mf</td>" not in section(html, "metrics")
    assert not list(titled_run.glob(".*.tmp"))  # no scratch folder left behind


@pytest.mark.slow
def test_given_mf_run_must_be_mf_on_the_same_data(titled_run: Path, built: Path, tmp_path: Path):
    with pytest.raises(RecommenderError, match="a neumf run, expected an mf run"):
        build_report(titled_run, mf_run=titled_run, out=tmp_path / "r")
    other = tmp_path / "mf"
    baseline = titled_run / "baselines" / "mf"
    other.mkdir()
    (other / "best.pt").write_bytes((baseline / "best.pt").read_bytes())
    config = (baseline / "config.yaml").read_text().replace("seed: 42", "seed: 7")
    (other / "config.yaml").write_text(config)
    with pytest.raises(RecommenderError, match=r"other data .*\(seed differ"):
        build_report(titled_run, mf_run=other, out=tmp_path / "r")
    with pytest.raises(RecommenderError, match="not a run directory"):
        build_report(tmp_path, skip_mf=True)


@pytest.mark.slow
def test_failed_build_keeps_the_previous_report(titled_run: Path, built: Path, monkeypatch):
    before = built.read_text(encoding="utf-8")

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr("recommender.report.sections.plot_activity", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        build_report(titled_run, mf_overrides=MF_FAST)
    assert built.read_text(encoding="utf-8") == before
    assert not list(titled_run.glob(".report*"))


@pytest.mark.slow
def test_single_branch_run_without_titles(gmf_run: Path, tmp_path: Path):
    html = build_report(gmf_run, skip_mf=True, out=tmp_path / "gmf").read_text(encoding="utf-8")
    assert "Not applicable: the GMF model has a single scoring branch" in section(html, "branches")
    assert "no genres" in section(html, "item-map")
    assert not (tmp_path / "gmf" / "branch_share.png").exists()


@pytest.mark.slow
def test_report_command(gmf_run: Path, tmp_path: Path, capsys):
    out = tmp_path / "cli"
    args = ["report", "--run", str(gmf_run), "--no-mf", "--out", str(out)]
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert f"report: {out / 'report.html'}" in stdout
    code, _, err = run_cli(["report", "--run", str(tmp_path / "missing"), "--no-mf"], capsys)
    assert code == 2 and "not a run directory" in err
