"""The report's sections: each turns one insight of a run into figures, tables and prose.

One function per entry of `SECTIONS`, each adding to a `Page`; the numbers come from
insights.py, runs.py and the run directory, and these functions only lay them out and say what
they mean.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recommender.checkpoint import read_metrics
from recommender.report.figures import (
    plot_activity,
    plot_branches,
    plot_item_map,
    plot_popularity,
    plot_training,
)
from recommender.report.page import Page, Raw, bullets, esc, fmt, para, pct, table

if TYPE_CHECKING:
    from recommender.config import Config
    from recommender.data.pipeline import DataBundle
    from recommender.inference import Recommender
    from recommender.insights import (
        ActivityBuckets,
        BranchShare,
        BucketMetrics,
        ItemMap,
        PopularityBias,
    )


def summary_section(
    report: Page, run_dir: Path, cfg: Config, rec: Recommender, data: DataBundle, mf_note: str
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
    report.add("summary", table(["", ""], rows, "left"))
    report.add(
        "summary",
        para(
            "FULL ranks each held-out item against every item the user has no history with: it is "
            "what a served top-k list faces. SAMPLED ranks it against a fixed set of sampled "
            "negatives, as in the NCF paper; its numbers are far higher and can order models "
            "differently, so the two are always labelled."
        ),
    )


def training_section(report: Page, run_dir: Path, monitor: str) -> None:
    records = read_metrics(run_dir)
    if not records:
        report.add("training", para("No training epochs: this model is fitted by counting."))
        return
    report.figure(
        "training",
        "training_curves.png",
        plot_training(records, monitor),
        "training loss and validation metric per epoch",
    )
    report.add(
        "training",
        para(
            "Solid: selection stages (early stopping on the validation split); dashed: the refit "
            "on train + validation for the selected number of epochs, which has no validation data "
            "left to score."
        ),
    )


def _metric_columns(ks: list[int]) -> list[str]:
    return [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")] + ["mrr", "auc", f"coverage@{max(ks)}"]


def metrics_section(
    report: Page,
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
                *(fmt(results[key]["metrics"].get(c)) for c in columns),
            ]
            for name in order
            if (key := f"{name}/{protocol}") in results
        ]
        report.add("metrics", Raw(f"<h3>{protocol.upper()} protocol</h3>"))
        report.add("metrics", table(["model", "test users", *columns], rows))
    report.add("metrics", bullets(notes))


def branch_section(report: Page, share: BranchShare) -> None:
    if not share.applicable:
        report.add("branches", para(share.note[0].upper() + share.note[1:] + "."))
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
        para("logit = GMF part + MLP part + bias, split exactly at NeuMF's linear output layer."),
        bullets(
            [
                f"Top-{k} pairs ({share.n_users:,} users): GMF carries {pct(share.top_gmf)} of "
                f"|GMF part| + |MLP part|, the MLP {pct(mlp)}.",
                f"Random (user, item) pairs: GMF carries {pct(share.random_gmf)}.",
                f"Ranking by the GMF part alone keeps {pct(share.overlap_gmf_only)} of the full "
                f"top-{k}; by the MLP part alone {pct(share.overlap_mlp_only)}.",
                f"Across each user's unseen items, {pct(share.spread_gmf)} of the score variance "
                "is GMF's: the branch with most of it decides what is plausible at all.",
                f"Mean parts over the top-{k} (logits): GMF {fmt(share.mean_gmf_part, 2)}, "
                f"MLP {fmt(share.mean_mlp_part, 2)}, bias {fmt(share.bias, 2)}.",
            ]
        ),
    )


def item_map_section(report: Page, imap: ItemMap | None, name: str) -> None:
    if imap is None:
        report.add("item-map", para(f"The {name} model has no item vectors to project."))
        return
    report.figure("item-map", "item_map.png", plot_item_map(imap), "2D map of the items")
    genre_note = (
        "colours: each item's first listed genre"
        if imap.genres is not None
        else "the data carries no genres, so items are coloured by popularity only"
    )
    report.add(
        "item-map",
        para(
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
            fmt(first.catalog_mean_popularity, 1),
            fmt(first.quantiles["catalog"]["p50"], 0),
            "50.0",
            *(h[4:] for h in heads),
            "",
            "",
        ],
        [
            "interactions (the data)",
            fmt(first.interaction_mean_popularity, 1),
            fmt(first.quantiles["interactions"]["p50"], 0),
            "",
            *(f"{first.interaction_head_share[h]:.1%}" for h in heads),
            fmt(first.interaction_gini, 3),
            "",
        ],
    ]
    for name, bias in biases.items():
        rows.append(
            [
                f"{name} top-{bias.k}",
                fmt(bias.mean_popularity, 1),
                fmt(bias.quantiles["recommended"]["p50"], 0),
                fmt(bias.mean_percentile, 1),
                *(f"{bias.head_share[h]:.1%}" for h in heads),
                fmt(bias.gini, 3),
                f"{bias.coverage:.1%}",
            ]
        )
    return rows


def popularity_section(report: Page, biases: dict[str, PopularityBias], name: str) -> None:
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
    report.add("popularity", table(header, _bias_rows(biases)))
    head = heads[0]
    report.add(
        "popularity",
        bullets(
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


def activity_section(
    report: Page,
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
            [b.name, b.interactions, b.n_users, m, *(fmt(b.metrics[m].get(c)) for c in shown)]
            for m in order
            if m in b.metrics
        ]
    header = ["bucket", "training interactions", "test users", "model", *shown]
    report.add("activity", table(header, rows))
    report.add("activity", para(f"FULL protocol. Buckets: {buckets.rule}."))


def sample_users(test_users: np.ndarray, bucket_of: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n test users taken in turn from the cold, regular and heavy buckets, shuffled."""
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(test_users[bucket_of[test_users] == b]) for b in range(3)]
    turns = [u for row in itertools.zip_longest(*pools) for u in row if u is not None]
    return np.asarray(turns[:n], dtype=np.int64)


def samples_section(
    report: Page,
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
        report.add("samples", para(f"Latest in history: {'; '.join(recent) or 'none'}"))
        report.add("samples", para(f"Held out: {'; '.join(rec.title(i) for i in held_out)}"))
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
        report.add("samples", table(header, rows, "left"))
    report.add(
        "samples",
        para(
            "Explanations name the history items that raise the recommended item's score most, "
            "each with its share of the score: integrated gradients over a fold-in of the user's "
            "history, the user vector re-derived from the history as the model was trained (see "
            "Recommender.explain)."
        ),
    )
