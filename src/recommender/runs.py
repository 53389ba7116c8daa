"""A trained run as a whole: its config, model and data loaded together, evaluated, exported.

The CLI (`evaluate`, `recommend --all-users`) and the report call these; the run directory's
files themselves are read through checkpoint.py.

Example:
    >>> cfg, rec, data = load_run(Path("runs/demo"))                     # doctest: +SKIP
    >>> evaluate_run(Path("runs/demo"), (cfg, rec, data))["table"]      # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recommender.checkpoint import EVAL_FILE, read_config
from recommender.config import Config
from recommender.data.pipeline import DataBundle, load_data
from recommender.evaluate import (
    EvalResult,
    evaluate_full,
    evaluate_sampled,
    format_table,
    sample_negatives,
)
from recommender.inference import Recommender
from recommender.models import Popularity, RecModel
from recommender.utils import RecommenderError, atomic_path, atomic_write_text


def load_run(run_dir: Path) -> tuple[Config, Recommender, DataBundle]:
    """The run's config, its Recommender and its data, rebuilt from the saved config.

    The split is deterministic, and the data is checked against the vocabularies in the
    checkpoint, so a changed data file cannot pass silently.
    """
    cfg = read_config(run_dir)
    rec = Recommender.from_run(run_dir)
    data = load_data(cfg.data, cfg.seed)
    check_vocabularies(run_dir, rec, data)
    return cfg, rec, data


def check_vocabularies(run_dir: Path, rec: Recommender, data: DataBundle) -> None:
    """Refuse data whose user or item vocabulary differs from the one the model learned."""
    if rec.users.to_list() != data.users.to_list() or rec.items.to_list() != data.items.to_list():
        raise RecommenderError(
            f"{run_dir}: the data no longer matches the vocabularies the model was trained on"
        )


def evaluate_run(
    run_dir: Path, loaded: tuple[Config, Recommender, DataBundle] | None = None
) -> dict[str, Any]:
    """Test metrics of a run's model and of Popularity, under both protocols (FULL only where
    SAMPLED does not apply: LightGCN files without negatives, see DataBundle.sampled).

    The run is rebuilt by `load_run` unless the caller already has it (`loaded`). The report
    is written to `run_dir/eval.json` and returned.
    """
    cfg, rec, data = loaded if loaded is not None else load_run(run_dir)
    history = data.train_full
    popularity = Popularity(len(data.users), len(data.items)).fit(history.item_counts())
    negatives = data.test_negatives
    sampled_note = "SAMPLED: test item against the given negatives file"
    if not data.sampled:
        sampled_note = (
            "SAMPLED: not applicable (no negatives file; the literature of this format ranks the "
            "full catalog)"
        )
    elif negatives is None:
        negatives = sample_negatives(history, data.test, cfg.eval.num_negatives, cfg.seed)
        sampled_note = (
            f"SAMPLED: test item against {cfg.eval.num_negatives} sampled negatives "
            f"(seed {cfg.seed})"
        )
    models: dict[str, RecModel] = {rec.model_name: rec.model}
    if rec.model_name != "popularity":
        models["popularity"] = popularity
    ks = cfg.eval.ks
    results: dict[str, EvalResult] = {}
    for name, model in models.items():
        results[f"{name}/full"] = evaluate_full(
            model, history, data.test, ks, batch_users=cfg.eval.batch_users, fallback=popularity
        )
        if negatives is not None:
            results[f"{name}/sampled"] = evaluate_sampled(
                model, history, data.test, negatives, ks, fallback=popularity
            )
    shown = ["auc", "mrr"] + [f"{m}@{k}" for k in ks for m in ("hr", "ndcg")]
    shown += [f"{m}@{max(ks)}" for m in ("recall", "precision", "map", "map_all", "coverage")]
    notes = sorted({n for r in results.values() for n in r.notes})
    notes.append("FULL: ranked against every item outside the user's training history")
    notes.append(sampled_note)
    if data.test.user_counts().max(initial=0) > 1:
        notes.append(
            "several test items per user: recall@K = hits in the top K / the user's test items; "
            "ndcg@K with binary gains over an ideal DCG of min(test items, K) hits; means over "
            "users with a test item"
        )
    report: dict[str, Any] = {
        "run": str(run_dir),
        "model": rec.model_name,
        "n_test_users": results[f"{rec.model_name}/full"].n_users,
        "results": {name: res.to_dict() for name, res in results.items()},
        "notes": notes,
    }
    report["table"] = format_table(results, shown)
    atomic_write_text(run_dir / EVAL_FILE, json.dumps(report, indent=2))
    return report


def write_all_recommendations(rec: Recommender, k: int, out: Path, chunk: int = 2048) -> None:
    """Every user's top-k as CSV rows user_id,item_id,rank,score, `chunk` users at a time."""
    frames = []
    user_ids = rec.users.ids
    for start in range(0, len(user_ids), chunk):
        batch = user_ids[start : start + chunk]
        items, scores = rec.recommend(list(batch), k=k)
        frame = pd.DataFrame(
            {
                "user_id": np.repeat(batch, items.shape[1]),
                "item_id": items.ravel(),
                "rank": np.tile(np.arange(1, items.shape[1] + 1), len(batch)),
                "score": scores.ravel(),
            }
        )
        frames.append(frame[frame["item_id"].notna()])
    with atomic_path(out) as tmp:
        pd.concat(frames).to_csv(tmp, index=False, float_format="%.6g")
