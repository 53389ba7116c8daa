"""Building a report: load the run, compute its insights, lay out the sections, write the folder.

The report folder is built in a temporary folder beside it and swapped in at the end, so a
failed build leaves the previous report (or none).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from recommender.checkpoint import read_config
from recommender.report.baseline import mf_comparison, scratch_dir
from recommender.report.page import Page, para
from recommender.report.sections import (
    activity_section,
    branch_section,
    item_map_section,
    metrics_section,
    popularity_section,
    sample_users,
    samples_section,
    summary_section,
    training_section,
)
from recommender.utils import RecommenderError

log = logging.getLogger("recommender")


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
    mf_dir, mf_note = mf_comparison(run_dir, cfg, data, name, mf_run, skip_mf, mf_overrides)

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

    report = Page(f"{name} run {run_dir.name}")
    summary_section(report, run_dir, cfg, rec, data, mf_note)
    training_section(report, run_dir, cfg.train.monitor)
    metrics_section(report, results, order, cfg.eval.ks, list(evaluation["notes"]))

    users = np.flatnonzero(history.user_counts() > 0)
    share = branch_share(rec.model, history, users, k=k, seed=cfg.seed)
    branch_section(report, share)
    imap = item_map(rec.model, counts, rec.meta.get("item_genres"))
    item_map_section(report, imap, name)
    biases = {
        m: popularity_bias(top_k_items(model, history, users, k), counts)
        for m, model in models.items()
    }
    popularity_section(report, biases, name)
    ks = sorted({*cfg.eval.ks, k})
    buckets, by_bucket = metrics_by_activity(
        models, history, data.test, ks, fallback=popularity, batch_users=cfg.eval.batch_users
    )
    activity_section(report, buckets, by_bucket, list(models), k)
    bucket_of = buckets.assign(history.user_counts())
    sample = sample_users(np.unique(data.test.user_idx), bucket_of, n_sample_users, cfg.seed)
    samples_section(report, rec, data, sample, bucket_of, k)

    seconds = time.perf_counter() - started
    report.add("summary", para(f"Report built in {seconds:.1f} s."))
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


def _write(report: Page, insights: dict[str, Any], out: Path) -> Path:
    """Write everything into a temporary folder beside `out`, then swap it in."""
    tmp = scratch_dir(out)
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
