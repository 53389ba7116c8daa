"""`recommender report`: one self-contained HTML report of a run, with its figures as PNGs.

    recommender report --run runs/NAME [--mf runs/MF | --no-mf] [--mf-set KEY=VALUE]
        [--out DIR] [--k 10] [--users 6]

The report (RUN/report/report.html, figures beside it, numbers in insights.json) holds: a
summary, the training curves from metrics.jsonl, test metrics of the model, MF and Popularity
under both protocols (from `evaluate_run`), NeuMF's GMF / MLP branch share, the item map,
popularity bias and coverage, metrics by user activity and sample recommendations with titles
and explanations. Figures are embedded as base64 data URIs, so the single HTML file can be
mailed; nothing in it refers to an external resource, and every piece of text from the data
(titles, ids, paths) is HTML-escaped.

Without `--mf`, an MF baseline is trained once with the run's data config (model.name=mf,
pretraining off, otherwise defaults, plus any `--mf-set` overrides) into RUN/baselines/mf and
reused by later builds while its config is unchanged. The report folder is built in a temporary
folder and swapped in at the end, so a failed build leaves the previous report (or none).
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
import math
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recommender.checkpoint import is_run, read_config, read_metrics
from recommender.config import Config, load_config
from recommender.utils import RecommenderError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from recommender.data.pipeline import DataBundle
    from recommender.inference import Recommender
    from recommender.insights import (
        ActivityBuckets,
        BranchShare,
        BucketMetrics,
        ItemMap,
        PopularityBias,
    )

log = logging.getLogger("recommender")

SECTIONS = {
    "summary": "Summary",
    "training": "Training curves",
    "metrics": "Test metrics",
    "branches": "GMF vs MLP branches",
    "item-map": "Item embedding map",
    "popularity": "Popularity bias and coverage",
    "activity": "Metrics by user activity",
    "samples": "Sample recommendations",
}
MAX_GENRES = 9  # genres coloured on the item map; the rest are drawn as "other"


# -- loading ---------------------------------------------------------------------------------


def _data_differences(a: Config, b: Config) -> list[str]:
    """Config keys that make two runs' test data differ; where the data is cached does not."""
    da, db = a.data.model_dump(mode="json"), b.data.model_dump(mode="json")
    keys = [f"data.{k}" for k in da if k not in ("cache", "root") and da[k] != db[k]]
    return keys + (["seed"] if a.seed != b.seed else [])


def _scratch_dir(target: Path) -> Path:
    """A new empty folder beside `target`, to be renamed over it once complete.

    Created with mkdir, not mkdtemp, so it gets the usual permissions rather than 0700.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    return tmp


# -- the MF baseline -------------------------------------------------------------------------


def mf_baseline_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """MF on the run's data, seed, device and evaluation settings; default training otherwise."""
    keep = {
        "seed": cfg.seed,
        "device": cfg.device,
        "threads": cfg.threads,
        "data": cfg.data.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json"),
    }
    # JSON is YAML, so every kept value round-trips through the override parser unchanged.
    sets = [f"{key}={json.dumps(value)}" for key, value in keep.items()]
    sets += ["model.name=mf", "train.pretrain.enabled=false", "train.progress=false"]
    return load_config(None, [*sets, *overrides])


def ensure_mf_baseline(
    run_dir: Path, cfg: Config, data: DataBundle, overrides: Sequence[str] = ()
) -> tuple[Path, bool]:
    """RUN/baselines/mf, trained now unless a baseline with the same config is there already.

    Returns (the baseline's run dir, whether it was trained now). Training goes to a temporary
    folder renamed into place at the end, so a killed build never leaves a baseline to reuse.
    """
    from recommender.train import Trainer
    from recommender.utils import resolve_device

    mf_cfg = mf_baseline_config(cfg, overrides)
    target = run_dir / "baselines" / "mf"
    if is_run(target):
        if read_config(target).training_digest() == mf_cfg.training_digest():
            log.info("report: reusing the MF baseline in %s", target)
            return target, False
        log.info("report: the MF baseline in %s has another config; training it again", target)
    tmp = _scratch_dir(target)
    try:
        log.info("report: training an MF baseline into %s", target)
        Trainer(mf_cfg, data, tmp, resolve_device(mf_cfg.device)).fit()
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target, True


# -- figures ---------------------------------------------------------------------------------


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure outside pyplot: no global backend or state, safe in any process."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    return buf.getvalue()


def _style(ax: Axes, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)


def plot_training(records: list[dict[str, Any]], monitor: str) -> bytes:
    """Loss per epoch of every stage, and the validation metric of the selection stages."""
    fig, (loss_ax, valid_ax) = _figure(11, 3.8, 2)
    stages = list(dict.fromkeys(r["stage"] for r in records))
    colors = {
        s.split("/")[-1]: f"C{i}"
        for i, s in enumerate(dict.fromkeys(s.split("/")[-1] for s in stages))
    }
    for stage in stages:
        rows = [r for r in records if r["stage"] == stage]
        epochs = [r["epoch"] for r in rows]
        style = "-" if stage.startswith("select/") else "--"
        color = colors[stage.split("/")[-1]]
        loss_ax.plot(epochs, [r["loss"] for r in rows], style, color=color, label=stage)
        valid = [(r["epoch"], r["valid"][monitor]) for r in rows if monitor in r.get("valid", {})]
        if valid:
            x, y = zip(*valid, strict=True)
            valid_ax.plot(x, y, style, color=color, marker="o", markersize=3, label=stage)
    _style(loss_ax, "Training loss (BCE)", "epoch", "loss")
    _style(valid_ax, f"Validation {monitor} (FULL protocol)", "epoch", monitor)
    loss_ax.legend(fontsize=8)
    if valid_ax.lines:
        valid_ax.legend(fontsize=8)
    return _png(fig)


def plot_branches(share: BranchShare) -> bytes:
    """GMF's share of |logit| over top-k and random pairs; top-k overlap with one branch."""
    assert share.top_shares is not None and share.random_shares is not None
    fig, (hist_ax, bar_ax) = _figure(11, 3.6, 2)
    bins = np.linspace(0, 1, 41).tolist()
    for values, label, color in (
        (share.random_shares, "random pairs", "C7"),
        (share.top_shares, f"top-{share.k} pairs", "C0"),
    ):
        if len(values):
            hist_ax.hist(values, bins=bins, density=True, alpha=0.55, color=color, label=label)
            hist_ax.axvline(float(values.mean()), color=color, linewidth=2)
    _style(
        hist_ax, "GMF share of |logit| per (user, item) pair", "|GMF| / (|GMF| + |MLP|)", "density"
    )
    hist_ax.set_xlim(0, 1)
    hist_ax.legend(fontsize=8)
    names = ["GMF only", "MLP only"]
    overlaps = [share.overlap_gmf_only or 0.0, share.overlap_mlp_only or 0.0]
    bars = bar_ax.bar(names, overlaps, color=["C1", "C2"], width=0.5)
    bar_ax.bar_label(bars, labels=[f"{v:.0%}" for v in overlaps])
    bar_ax.set_ylim(0, 1.1)
    _style(bar_ax, f"Top-{share.k} kept when ranking by one branch", "", "overlap with full top-k")
    return _png(fig)


def plot_item_map(imap: ItemMap) -> bytes:
    """Item map coloured by primary genre (when known) and by popularity."""
    has_genres = imap.genres is not None and bool((imap.genres != "").any())
    fig, axes = _figure(12 if has_genres else 6.2, 4.8, 2 if has_genres else 1)
    x, y = imap.coords[:, 0], imap.coords[:, 1]
    xlabel = f"PC1 ({imap.explained[0]:.0%} of variance)"
    ylabel = f"PC2 ({imap.explained[1]:.0%} of variance)"
    size = max(3.0, min(18.0, 10_000 / max(len(x), 1)))  # smaller points for big catalogs
    if has_genres:
        assert imap.genres is not None
        ax = axes[0]
        names, counts = np.unique(imap.genres[imap.genres != ""], return_counts=True)
        shown = names[np.argsort(-counts, kind="stable")][:MAX_GENRES]
        colors = np.full(len(x), "0.82", dtype=object)
        for i, genre in enumerate(shown):
            colors[imap.genres == genre] = f"C{i}"
            ax.scatter([], [], s=20, color=f"C{i}", label=str(genre))  # legend entries only
        if (colors == "0.82").any():
            ax.scatter([], [], s=20, color="0.82", label="other / none")
        # One scatter in a fixed random order, so no genre is painted over all the others.
        order = np.random.default_rng(0).permutation(len(x))
        ax.scatter(x[order], y[order], s=size, c=list(colors[order]), alpha=0.85, linewidths=0)
        _style(ax, "Items by first listed genre", xlabel, ylabel)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    ax = axes[-1]
    order = np.argsort(imap.popularity, kind="stable")  # popular items drawn last, on top
    points = ax.scatter(
        x[order],
        y[order],
        s=size,
        c=np.log10(1 + imap.popularity[order]),
        cmap="viridis",
        linewidths=0,
    )
    fig.colorbar(points, ax=ax, label="log10(1 + training interactions)")
    _style(ax, "Items by popularity", xlabel, ylabel)
    return _png(fig)


def plot_popularity(biases: dict[str, PopularityBias]) -> bytes:
    """Share of recommendations per popularity decile, and Lorenz curves of their counts."""
    fig, (dec_ax, lorenz_ax) = _figure(11, 3.8, 2)
    first = next(iter(biases.values()))
    n = len(biases) + 1
    width = 0.8 / n
    deciles = np.arange(1, 11)
    dec_ax.bar(
        deciles - 0.4 + width / 2,
        first.interaction_decile_share,
        width,
        color="0.6",
        label="interactions",
    )
    for i, (name, bias) in enumerate(biases.items(), 1):
        dec_ax.bar(
            deciles - 0.4 + width * (i + 0.5),
            bias.decile_share,
            width,
            color=f"C{i - 1}",
            label=f"{name} top-{bias.k}",
        )
    dec_ax.set_xticks(deciles)
    _style(
        dec_ax,
        "Where recommendations come from",
        "catalog popularity decile (1 = most popular 10%)",
        "share",
    )
    dec_ax.legend(fontsize=8)
    for i, (name, bias) in enumerate(biases.items()):
        counts = np.sort(bias.rec_counts)
        cum = np.concatenate([[0], np.cumsum(counts)]) / max(counts.sum(), 1)
        share = np.linspace(0, 1, len(cum))
        lorenz_ax.plot(share, cum, color=f"C{i}", label=f"{name} (Gini {bias.gini:.2f})")
    lorenz_ax.plot([0, 1], [0, 1], ":", color="0.5", label="equal exposure")
    _style(
        lorenz_ax,
        "Concentration of recommendations (Lorenz curve)",
        "share of catalog, least recommended first",
        "share of recommendations",
    )
    lorenz_ax.legend(fontsize=8)
    return _png(fig)


def plot_activity(buckets: list[BucketMetrics], metric: str) -> bytes:
    """`metric` per activity bucket for every model."""
    fig, (ax,) = _figure(7, 3.6)
    models = list(dict.fromkeys(m for b in buckets for m in b.metrics))
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(buckets))
    for i, model in enumerate(models):
        values = [b.metrics.get(model, {}).get(metric, math.nan) for b in buckets]
        bars = ax.bar(x - 0.4 + width * (i + 0.5), values, width, color=f"C{i}", label=model)
        ax.bar_label(bars, labels=[f"{v:.3f}" if v == v else "" for v in values], fontsize=7)
    ax.set_xticks(x, [f"{b.name}\n{b.interactions} ({b.n_users} users)" for b in buckets])
    _style(ax, f"FULL {metric} by user activity (training interactions)", "", metric)
    ax.legend(fontsize=8)
    return _png(fig)


# -- HTML ------------------------------------------------------------------------------------


class Raw(str):
    """Markup this module wrote itself; every other string is escaped on the way in."""


def esc(value: object) -> str:
    return value if isinstance(value, Raw) else html.escape(str(value), quote=True)


def _table(header: Sequence[object], rows: Sequence[Sequence[object]], cls: str = "") -> Raw:
    attr = f' class="{esc(cls)}"' if cls else ""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return Raw(f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _img(png: bytes, alt: str) -> Raw:
    data = base64.b64encode(png).decode("ascii")
    return Raw(f'<img alt="{esc(alt)}" src="data:image/png;base64,{data}">')


def _p(text: object) -> Raw:
    return Raw(f"<p>{esc(text)}</p>")


def _ul(items: Sequence[object]) -> Raw:
    return Raw("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.0%}"


CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#222;
max-width:1140px;margin:2em auto;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:2em}nav a{margin-right:1em}img{max-width:100%;height:auto}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right;vertical-align:top}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
table.left td{text-align:left}.muted{color:#777}
"""


@dataclass
class _Report:
    """The sections as they are built, and the figures to write beside the HTML."""

    title: str
    parts: dict[str, list[Raw]] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)

    def add(self, section: str, *items: Raw) -> None:
        self.parts.setdefault(section, []).extend(items)

    def figure(self, section: str, name: str, png: bytes, alt: str) -> None:
        self.figures[name] = png
        self.add(section, _img(png, alt))

    def html(self) -> str:
        nav = " ".join(f'<a href="#{key}">{esc(title)}</a>' for key, title in SECTIONS.items())
        body = "".join(
            f'<section id="{key}"><h2>{esc(title)}</h2>{"".join(self.parts.get(key, []))}</section>'
            for key, title in SECTIONS.items()
        )
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(self.title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{esc(self.title)}</h1><nav>{nav}</nav>{body}</body></html>\n"
        )


# -- sections --------------------------------------------------------------------------------


def _summary_section(
    report: _Report, run_dir: Path, cfg: Config, rec: Recommender, data: DataBundle, mf_note: str
) -> None:
    n_full = len(data.train) + len(data.valid)
    model = (
        f"{rec.model_name} (epoch {rec.meta.get('epoch')}, config {rec.meta.get('config_digest')})"
    )
    rows = [
        ["run", str(run_dir)],
        ["model", model],
        ["data", data.source],
        ["users / items", f"{len(data.users):,} / {len(data.items):,}"],
        [
            "interactions",
            f"train {len(data.train):,} + validation {len(data.valid):,} = "
            f"{n_full:,}; test {len(data.test):,}",
        ],
        ["split", cfg.data.split],
        ["MF comparison", mf_note],
        ["checkpoint written", rec.meta.get("created_at", "")],
    ]
    report.add("summary", _table(["", ""], rows, "left"))
    report.add(
        "summary",
        _p(
            "FULL ranks each held-out item against every item the user has no history with: it is "
            "what a served top-k list faces. SAMPLED ranks it against a fixed set of sampled "
            "negatives, as in the NCF paper; its numbers are far higher and can order models "
            "differently, so the two are always labelled."
        ),
    )


def _training_section(report: _Report, run_dir: Path, monitor: str) -> None:
    records = read_metrics(run_dir)
    if not records:
        report.add("training", _p("No training epochs: this model is fitted by counting."))
        return
    report.figure(
        "training",
        "training_curves.png",
        plot_training(records, monitor),
        "training loss and validation metric per epoch",
    )
    report.add(
        "training",
        _p(
            "Solid: selection stages (early stopping on the validation split); dashed: the refit "
            "on train + validation for the selected number of epochs, which has no validation data "
            "left to score."
        ),
    )


def _metric_columns(ks: list[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")] + ["mrr", "auc", f"coverage@{max(ks)}"]


def _metrics_section(
    report: _Report,
    results: dict[str, dict[str, Any]],
    order: list[str],
    ks: list[int],
    notes: list[str],
) -> None:
    columns = _metric_columns(ks)
    for protocol in ("full", "sampled"):
        rows = [
            [
                name,
                results[key]["n_users"],
                *(_fmt(results[key]["metrics"].get(c)) for c in columns),
            ]
            for name in order
            if (key := f"{name}/{protocol}") in results
        ]
        report.add("metrics", Raw(f"<h3>{protocol.upper()} protocol</h3>"))
        report.add("metrics", _table(["model", "test users", *columns], rows))
    report.add("metrics", _ul(notes))


def _branch_section(report: _Report, share: BranchShare) -> None:
    if not share.applicable:
        report.add("branches", _p(share.note[0].upper() + share.note[1:] + "."))
        return
    report.figure(
        "branches",
        "branch_share.png",
        plot_branches(share),
        "GMF share of the logit and top-k overlap per branch",
    )
    k = share.k
    mlp = None if share.top_gmf is None else 1 - share.top_gmf
    report.add(
        "branches",
        _p("logit = GMF part + MLP part + bias, split exactly at NeuMF's linear output layer."),
        _ul(
            [
                f"Top-{k} pairs ({share.n_users:,} users): GMF carries {_pct(share.top_gmf)} of "
                f"|GMF part| + |MLP part|, the MLP {_pct(mlp)}.",
                f"Random (user, item) pairs: GMF carries {_pct(share.random_gmf)}.",
                f"Ranking by the GMF part alone keeps {_pct(share.overlap_gmf_only)} of the full "
                f"top-{k}; by the MLP part alone {_pct(share.overlap_mlp_only)}.",
                f"Across each user's unseen items, {_pct(share.spread_gmf)} of the score variance "
                "is GMF's: the branch with most of it decides what is plausible at all.",
                f"Mean parts over the top-{k} (logits): GMF {_fmt(share.mean_gmf_part, 2)}, "
                f"MLP {_fmt(share.mean_mlp_part, 2)}, bias {_fmt(share.bias, 2)}.",
            ]
        ),
    )


def _item_map_section(report: _Report, imap: ItemMap | None, name: str) -> None:
    if imap is None:
        report.add("item-map", _p(f"The {name} model has no item vectors to project."))
        return
    report.figure("item-map", "item_map.png", plot_item_map(imap), "2D map of the items")
    genre_note = (
        "colours: each item's first listed genre"
        if imap.genres is not None
        else "the data carries no genres, so items are coloured by popularity only"
    )
    report.add(
        "item-map",
        _p(
            f"PCA of {imap.source}; the two axes hold {imap.explained[0]:.0%} and "
            f"{imap.explained[1]:.0%} of the variance and are signed so that popular items lie on "
            f"the positive side; {genre_note}. Nearby points are items the model treats alike."
        ),
    )


def _bias_rows(biases: dict[str, PopularityBias]) -> list[list[object]]:
    first = next(iter(biases.values()))
    heads = list(first.head_share)
    rows: list[list[object]] = [
        [
            "catalog (each item once)",
            _fmt(first.catalog_mean_popularity, 1),
            _fmt(first.quantiles["catalog"]["p50"], 0),
            "50.0",
            *(h[4:] for h in heads),
            "",
            "",
        ],
        [
            "interactions (the data)",
            _fmt(first.interaction_mean_popularity, 1),
            _fmt(first.quantiles["interactions"]["p50"], 0),
            "",
            *(f"{first.interaction_head_share[h]:.1%}" for h in heads),
            _fmt(first.interaction_gini, 3),
            "",
        ],
    ]
    for name, bias in biases.items():
        rows.append(
            [
                f"{name} top-{bias.k}",
                _fmt(bias.mean_popularity, 1),
                _fmt(bias.quantiles["recommended"]["p50"], 0),
                _fmt(bias.mean_percentile, 1),
                *(f"{bias.head_share[h]:.1%}" for h in heads),
                _fmt(bias.gini, 3),
                f"{bias.coverage:.1%}",
            ]
        )
    return rows


def _popularity_section(report: _Report, biases: dict[str, PopularityBias], name: str) -> None:
    report.figure(
        "popularity",
        "popularity_bias.png",
        plot_popularity(biases),
        "share of recommendations per popularity decile, and Lorenz curves",
    )
    main = biases[name]
    heads = list(main.head_share)
    header = ["", "mean popularity", "median", "mean percentile"]
    header += [f"share from {h}" for h in heads] + ["Gini", f"coverage@{main.k}"]
    report.add("popularity", _table(header, _bias_rows(biases)))
    head = heads[0]
    report.add(
        "popularity",
        _ul(
            [
                "Popularity is an item's number of training interactions; its percentile is the "
                "share of the catalog less popular than it.",
                f"{name}'s top-{main.k} items average {main.mean_popularity:.0f} interactions, "
                f"against {main.interaction_mean_popularity:.0f} for the item behind a random "
                f"interaction and {main.catalog_mean_popularity:.0f} for a random catalog item.",
                f"{main.head_share[head]:.0%} of its recommendations come from the {head} most "
                f"popular items, which hold {main.interaction_head_share[head]:.0%} of the "
                "interactions.",
                f"Its lists cover {main.coverage:.0%} of the catalog over {main.n_users:,} users; "
                f"the Gini of recommendation counts is {main.gini:.2f} (0: equal exposure).",
            ]
        ),
    )


def _activity_section(
    report: _Report,
    buckets: ActivityBuckets,
    by_bucket: list[BucketMetrics],
    order: list[str],
    k: int,
) -> None:
    metric, shown = f"ndcg@{k}", [f"hr@{k}", f"ndcg@{k}"]
    report.figure(
        "activity",
        "activity.png",
        plot_activity(by_bucket, metric),
        f"{metric} per user activity bucket",
    )
    rows: list[list[object]] = []
    for b in by_bucket:
        if not b.metrics:
            rows.append([b.name, b.interactions, 0, "", *("" for _ in shown)])
        rows += [
            [b.name, b.interactions, b.n_users, m, *(_fmt(b.metrics[m].get(c)) for c in shown)]
            for m in order
            if m in b.metrics
        ]
    header = ["bucket", "training interactions", "test users", "model", *shown]
    report.add("activity", _table(header, rows))
    report.add("activity", _p(f"FULL protocol. Buckets: {buckets.rule}."))


def _sample_users(test_users: np.ndarray, bucket_of: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n test users taken in turn from the cold, regular and heavy buckets, shuffled."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(test_users[bucket_of[test_users] == b]) for b in range(3)]
    turns = [u for row in itertools.zip_longest(*pools) for u in row if u is not None]
    return np.asarray(turns[:n], dtype=np.int64)


def _samples_section(
    report: _Report,
    rec: Recommender,
    data: DataBundle,
    users: np.ndarray,
    bucket_of: np.ndarray,
    k: int,
) -> None:
    from recommender.insights import BUCKETS

    ids = [str(u) for u in data.users.to_ids(users)]
    items, scores = rec.recommend(ids, k=k)
    full, test = data.train_full, data.test
    for row, (u, user_id) in enumerate(zip(users, ids, strict=True)):
        mine = np.flatnonzero(full.user_idx == u)
        if full.timestamp is not None:
            mine = mine[np.argsort(full.timestamp[mine], kind="stable")]
        recent = [rec.title(str(i)) for i in data.items.to_ids(full.item_idx[mine[-5:]])[::-1]]
        held_out = [str(i) for i in data.items.to_ids(test.item_idx[test.user_idx == u])]
        heading = (
            f"<h3>User {esc(user_id)} <span class='muted'>({BUCKETS[bucket_of[u]]}, "
            f"{len(mine)} training interactions)</span></h3>"
        )
        report.add("samples", Raw(heading))
        report.add("samples", _p(f"Latest in history: {'; '.join(recent) or 'none'}"))
        report.add("samples", _p(f"Held out: {'; '.join(rec.title(i) for i in held_out)}"))
        rows = [
            [
                rank,
                f"{rec.title(item)} ({item})" if rec.titles else item,
                f"{score:.3f}",
                "yes" if item in held_out else "",
                rec.explain(user_id, item, n=3).one_line(rec.titles),
            ]
            for rank, (item, score) in enumerate(zip(items[row], scores[row], strict=True), 1)
            if item is not None
        ]
        header = ["rank", "item", "score", "held out", "why"]
        report.add("samples", _table(header, rows, "left"))
    report.add(
        "samples",
        _p(
            "Explanations name the history items closest to the recommended one in the model's "
            "item space, with their cosine similarity (see Recommender.explain)."
        ),
    )


# -- the report ------------------------------------------------------------------------------


def _mf_comparison(
    run_dir: Path,
    cfg: Config,
    data: DataBundle,
    name: str,
    mf_run: str | Path | None,
    skip_mf: bool,
    overrides: Sequence[str],
) -> tuple[Path | None, str]:
    """The MF run to compare against (None: the run is MF, or MF is skipped) and a note."""
    if name == "mf":
        return None, "the run itself is an MF model"
    if skip_mf:
        return None, "skipped (--no-mf)"
    if mf_run is None:
        mf_dir, trained = ensure_mf_baseline(run_dir, cfg, data, overrides)
        when = "trained for this report" if trained else "reused from an earlier build"
        extra = f", overrides {' '.join(overrides)}" if overrides else ""
        return mf_dir, f"{mf_dir}: {when}; the run's data, default MF settings{extra}"
    mf_dir = Path(mf_run)
    mf_cfg = read_config(mf_dir)
    if mf_cfg.model.name != "mf":
        raise RecommenderError(f"--mf {mf_dir}: a {mf_cfg.model.name} run, expected an mf run")
    differ = _data_differences(cfg, mf_cfg)
    if differ:
        raise RecommenderError(
            f"--mf {mf_dir}: trained on other data than {run_dir} ({', '.join(differ)} "
            "differ), so its metrics are not comparable"
        )
    return mf_dir, f"MF run {mf_dir}"


def build_report(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    mf_run: str | Path | None = None,
    skip_mf: bool = False,
    mf_overrides: Sequence[str] = (),
    k: int = 10,
    n_sample_users: int = 6,
) -> Path:
    """Write the HTML report of a run, its PNG figures and insights.json into `out`.

    Args:
        run_dir: a run directory (config.yaml, best.pt, metrics.jsonl).
        out: the report folder, RUN/report by default; replaced as a whole.
        mf_run: an MF run on the same data to compare against; by default one is trained into
            RUN/baselines/mf, or reused from there while its config is unchanged.
        skip_mf: no MF comparison.
        mf_overrides: config overrides (`train.epochs=5`) for the MF baseline trained here.
        k: length of the top-k lists the insights examine.
        n_sample_users: test users shown with their recommendations.
    Returns:
        The path of report.html.
    """
    from recommender.inference import Recommender
    from recommender.insights import (
        branch_share,
        item_map,
        metrics_by_activity,
        popularity_bias,
        top_k_items,
    )
    from recommender.models import Popularity, RecModel
    from recommender.runs import check_vocabularies, evaluate_run, load_run

    started = time.perf_counter()
    run_dir = Path(run_dir)
    if k < 1:
        raise RecommenderError(f"k must be >= 1, got {k}")
    if skip_mf and mf_run is not None:
        raise RecommenderError("give an MF run or skip MF, not both")
    cfg, rec, data = load_run(run_dir)
    name = rec.model_name
    history = data.train_full
    counts = history.item_counts()
    popularity = Popularity(len(data.users), len(data.items)).fit(counts)
    mf_dir, mf_note = _mf_comparison(run_dir, cfg, data, name, mf_run, skip_mf, mf_overrides)

    evaluation = evaluate_run(run_dir, (cfg, rec, data))
    results: dict[str, dict[str, Any]] = dict(evaluation["results"])
    models: dict[str, RecModel] = {name: rec.model}
    if mf_dir is not None:
        # same data config and seed as the run (checked), so its data is this run's data
        mf_rec = Recommender.from_run(mf_dir)
        check_vocabularies(mf_dir, mf_rec, data)
        mf_results = evaluate_run(mf_dir, (read_config(mf_dir), mf_rec, data))["results"]
        results.update({key: v for key, v in mf_results.items() if key.startswith("mf/")})
        models["mf"] = mf_rec.model
    models.setdefault("popularity", popularity)
    order = [m for m in dict.fromkeys([name, "mf", "popularity"]) if f"{m}/full" in results]

    report = _Report(f"{name} run {run_dir.name}")
    _summary_section(report, run_dir, cfg, rec, data, mf_note)
    _training_section(report, run_dir, cfg.train.monitor)
    _metrics_section(report, results, order, cfg.eval.ks, list(evaluation["notes"]))

    users = np.flatnonzero(history.user_counts() > 0)
    share = branch_share(rec.model, history, users, k=k, seed=cfg.seed)
    _branch_section(report, share)
    imap = item_map(rec.model, counts, rec.meta.get("item_genres"))
    _item_map_section(report, imap, name)
    biases = {
        m: popularity_bias(top_k_items(model, history, users, k), counts)
        for m, model in models.items()
    }
    _popularity_section(report, biases, name)
    ks = sorted({*cfg.eval.ks, k})
    buckets, by_bucket = metrics_by_activity(
        models, history, data.test, ks, fallback=popularity, batch_users=cfg.eval.batch_users
    )
    _activity_section(report, buckets, by_bucket, list(models), k)
    bucket_of = buckets.assign(history.user_counts())
    sample = _sample_users(np.unique(data.test.user_idx), bucket_of, n_sample_users, cfg.seed)
    _samples_section(report, rec, data, sample, bucket_of, k)

    seconds = time.perf_counter() - started
    report.add("summary", _p(f"Report built in {seconds:.1f} s."))
    insights = {
        "run": str(run_dir),
        "model": name,
        "k": k,
        "mf_comparison": mf_note,
        "branch_share": share.summary(),
        "item_map": None if imap is None else {"source": imap.source, "explained": imap.explained},
        "popularity_bias": {m: b.summary() for m, b in biases.items()},
        "activity": {
            "cold_max": buckets.cold_max,
            "heavy_min": buckets.heavy_min,
            "rule": buckets.rule,
            "buckets": [asdict(b) for b in by_bucket],
        },
        "build_seconds": round(seconds, 2),
    }
    log.info("report: built in %.1f s", seconds)
    return _write(report, insights, Path(out) if out is not None else run_dir / "report")


def _write(report: _Report, insights: dict[str, Any], out: Path) -> Path:
    """Write everything into a temporary folder beside `out`, then swap it in."""
    tmp = _scratch_dir(out)
    old = tmp.with_suffix(".old")
    try:
        for fname, png in report.figures.items():
            (tmp / fname).write_bytes(png)
        (tmp / "insights.json").write_text(json.dumps(insights, indent=2), encoding="utf-8")
        (tmp / "report.html").write_text(report.html(), encoding="utf-8")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out / "report.html"
