"""The report's figures: each insight of a run drawn with matplotlib and returned as PNG bytes.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot, so a report
touches no global backend or state and can be built in any process. PNGs are written without
the software tag, so the same run gives the same bytes.
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from recommender.insights import BranchShare, BucketMetrics, ItemMap, PopularityBias

MAX_GENRES = 9  # genres coloured on the item map; the rest are drawn as "other"


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
