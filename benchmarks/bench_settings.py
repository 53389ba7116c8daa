"""How configs/full-ranking.yaml's settings were chosen: each candidate on validation carves of
the training files, never on a test split.

The carves: from an NCF training file (MovieLens-1M's `ml-1m.train.rating`), one random training
row per user (users with two rows or more) becomes the validation item, with `--negatives` items
drawn uniformly from those absent from the user's training rows; from a LightGCN/NGCF training
file (Gowalla's `train.txt`) and from Last.fm HetRec's `user_artists.dat`, a random `--fraction`
of each user's items (at least one, for users with two items or more). Every candidate is
`recommender train --config CONFIG --set ...` on the carved files, then `recommender evaluate`,
in this process; the table shows SAMPLED and FULL HR / NDCG@10 for NCF files and FULL Recall /
NDCG@20 for the others.

    python benchmarks/bench_settings.py --ml-1m D/ml-1m.train.rating --gowalla G/train.txt \\
        --lastfm L/user_artists.dat [--row "model.als_reg=30" ...] [--out settings.json]

Without --row the candidates are the ALS term's rows of docs/BENCHMARKS.md. `--smoke` carves
tiny synthetic files and runs two candidates.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from smoke import add_arguments, folder, tiny_ncf

PRESET = Path(__file__).resolve().parents[1] / "configs" / "full-ranking.yaml"
# (label, overrides) of the ALS term's table in docs/BENCHMARKS.md
ROWS = [
    ("the filter alone", "model.als_weight=0"),
    ("reg 10, alpha 20", "model.als_reg=10 model.als_alpha=20"),
    ("reg 30, alpha 10", "model.als_reg=30"),
    ("reg 50, alpha 10 (the preset)", ""),
    ("reg 50, alpha 10, weight 1.5", "model.als_weight=1.5"),
    ("reg 100, alpha 10", "model.als_reg=100"),
    ("reg 100, alpha 20", "model.als_reg=100 model.als_alpha=20"),
    ("the preset, sharpen 0.75", "model.sharpen=0.75"),
    ("the preset, ALS weight 100 (ALS nearly alone)", "model.als_weight=100"),
]
NCF_COLUMNS = ["sampled/hr@10", "sampled/ndcg@10", "full/hr@10", "full/ndcg@10"]
LIGHTGCN_COLUMNS = ["full/recall@20", "full/ndcg@20"]


def carve_ncf(train: Path, out: Path, negatives: int, seed: int) -> list[str]:
    """One random training row per user held out, with negatives never in the user's rows;
    -> the --train, --test, --test-negatives arguments of the carved files."""
    frame = pd.read_csv(train, sep="\t", header=None, names=["user", "item", "rating", "time"])
    rng = np.random.default_rng(seed)
    _, users = np.unique(frame["user"].to_numpy(), return_inverse=True)
    catalog, items = np.unique(frame["item"].to_numpy(), return_inverse=True)
    order = np.lexsort((rng.random(len(frame)), users))  # each user's rows in random order
    first = np.ones(len(order), dtype=bool)
    first[1:] = users[order][1:] != users[order][:-1]
    count = np.bincount(users)
    held = order[first & (count[users[order]] >= 2)]
    kept = np.ones(len(frame), dtype=bool)
    kept[held] = False
    seen = np.zeros((int(users.max()) + 1, len(catalog)), dtype=bool)
    seen[users, items] = True
    drawn = catalog[np.argsort(rng.random(seen.shape) + seen, axis=1)[:, :negatives]]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"valid.{name}" for name in ("train.rating", "test.rating", "test.negative")]
    frame[kept].to_csv(paths[0], sep="\t", header=False, index=False)
    frame.iloc[held].to_csv(paths[1], sep="\t", header=False, index=False)
    test = frame.iloc[held]
    lines = [
        f"({u},{i})\t" + "\t".join(map(str, drawn[row]))
        for u, i, row in zip(test["user"], test["item"], users[held], strict=True)
    ]
    paths[2].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return ["--train", str(paths[0]), "--test", str(paths[1]), "--test-negatives", str(paths[2])]


def read_pairs(path: Path, format: str) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) of a file the package reads whose ids are integers (`lightgcn`,
    `hetrec-lastfm`), both renumbered from 0 in numeric order."""
    from recommender.data.readers import read_interactions

    frame = read_interactions(path, format=format)
    _, users = np.unique(frame["user_id"].astype(np.int64), return_inverse=True)
    _, items = np.unique(frame["item_id"].astype(np.int64), return_inverse=True)
    return users.astype(np.int64), items.astype(np.int64)


def carve_lightgcn(
    users: np.ndarray, items: np.ndarray, out: Path, fraction: float, seed: int
) -> list[str]:
    """A random `fraction` of each user's items held out -> --train, --test of LightGCN files."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(users)), users))
    count = np.bincount(users)
    start = np.cumsum(count) - count
    rank = np.arange(len(order)) - start[users[order]]
    quota = np.where(count >= 2, np.maximum(1, np.round(fraction * count)), 0)
    held = np.zeros(len(users), dtype=bool)
    held[order] = rank < quota[users[order]]
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "train.txt", out / "test.txt"]
    for path, rows in zip(paths, (~held, held), strict=True):
        frame = pd.DataFrame({"user": users[rows], "item": items[rows]}).sort_values("user")
        lines = frame.groupby("user")["item"].agg(lambda s: " ".join(map(str, s)))
        path.write_text("\n".join(f"{u} {i}" for u, i in lines.items()) + "\n", encoding="utf-8")
    return ["--train", str(paths[0]), "--test", str(paths[1])]


def run(files: list[str], config: Path, overrides: str, where: Path) -> dict[str, float]:
    """Train one candidate on carved files and evaluate it; -> its metrics by protocol/name."""
    from recommender.cli import main

    out = where / "run"
    sets = [a for s in overrides.split() for a in ("--set", s)]
    args = ["train", *files, "--config", str(config), "--out", str(out), "--overwrite", *sets]
    with contextlib.redirect_stdout(io.StringIO()):  # the CLI's own tables; ours follows
        failed = main(args) or main(["evaluate", "--run", str(out)])
    if failed:
        raise SystemExit(f"recommender {' '.join(args)} failed")
    report = json.loads((out / "eval.json").read_text())
    metrics: dict[str, float] = {}
    for protocol in ("sampled", "full"):
        result = report["results"].get(f"{report['model']}/{protocol}")
        if result is not None:
            metrics |= {f"{protocol}/{k}": v for k, v in result["metrics"].items()}
    return metrics


def table(results: dict[str, dict[str, dict[str, float]]], labels: list[str]) -> str:
    """Markdown: one row per candidate, each data set's columns side by side."""
    columns = [
        (name, c)
        for name, rows in results.items()
        for c in (NCF_COLUMNS if "sampled/hr@10" in next(iter(rows.values())) else LIGHTGCN_COLUMNS)
    ]
    head = ["candidate", *(f"{name} {c}" for name, c in columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label in labels:
        cells = [f"{results[name][label].get(c, float('nan')):.4f}" for name, c in columns]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ml-1m", type=Path, help="an NCF .train.rating file")
    parser.add_argument("--gowalla", type=Path, help="a LightGCN/NGCF train.txt")
    parser.add_argument("--lastfm", type=Path, help="HetRec's user_artists.dat")
    parser.add_argument("--config", type=Path, default=PRESET)
    parser.add_argument(
        "--row", action="append", default=[], help="a candidate: space-separated key=value"
    )
    parser.add_argument("--negatives", type=int, default=99)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, help="where the carves and runs go (default: temp)")
    parser.add_argument("--out", type=Path, help="write the metrics as JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    rows = [(r or "the config", r) for r in args.row] or ROWS
    with folder(args.smoke_dir if args.smoke else args.work) as where:
        carves: dict[str, list[str]] = {}
        if args.smoke:
            tiny = tiny_ncf(where / "tiny", "tiny")
            carves["ncf"] = carve_ncf(tiny / "tiny.train.rating", where / "ncf", 20, args.seed)
            frame = pd.read_csv(tiny / "tiny.train.rating", sep="\t", header=None)
            users, items = frame[0].to_numpy(), frame[1].to_numpy()
            carves["lightgcn"] = carve_lightgcn(users, items, where / "lgcn", 0.2, args.seed)
            rows = [("the filter alone", "model.als_weight=0"), ("with ALS", "model.als_weight=1")]
            small = "model.rank=4 model.embedding_dim=4 model.als_sweeps=2 threads=1"
            rows = [(label, f"{sets} {small} data.root={where / 'data'}") for label, sets in rows]
        else:
            if args.ml_1m:
                carves["ml-1m"] = carve_ncf(args.ml_1m, where / "ml-1m", args.negatives, args.seed)
            if args.gowalla:
                users, items = read_pairs(args.gowalla, "lightgcn")
                carves["gowalla"] = carve_lightgcn(
                    users, items, where / "gowalla", args.fraction, args.seed
                )
            if args.lastfm:
                users, items = read_pairs(args.lastfm, "hetrec-lastfm")
                carves["lastfm"] = carve_lightgcn(
                    users, items, where / "lastfm", args.fraction, args.seed
                )
            if not carves:
                parser.error("give --ml-1m, --gowalla and/or --lastfm (or --smoke)")
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, files in carves.items():
            results[name] = {}
            for label, sets in rows:
                results[name][label] = found = run(files, args.config, sets, where / name)
                shown = {
                    k: round(v, 4) for k, v in found.items() if k in NCF_COLUMNS + LIGHTGCN_COLUMNS
                }
                print(f"{name} | {label}: {shown}", flush=True)
    print(table(results, [label for label, _ in rows]))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
