"""Quality on the NCF paper's ml-100k split files, mean of several seeds, both protocols.

Each model is trained by the real `recommender train` command with the default config (only
the model name and the seed change), tuned on the validation split only, then evaluated by
`recommender evaluate`. The peers' figures come from the core issue's table, measured on the
same files.

    python benchmarks/bench_quality.py --data-dir ../shared/data/ml-100k-loo \
        --models neumf mf --seeds 1 2 3 --out runs/bench-quality
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

METRICS = [("sampled", "hr@10"), ("sampled", "ndcg@10"), ("full", "hr@10"), ("full", "ndcg@10")]
BAR = {"sampled hr@10": 0.6002, "sampled ndcg@10": 0.3289, "full hr@10": 0.0905,
       "full ndcg@10": 0.0437}  # fmt: skip


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return done.stdout


def train_and_evaluate(
    data_dir: Path, model: str, seed: int, out: Path, threads: int, overrides: list[str]
) -> dict[str, float]:
    run_dir = out / f"{model}-seed{seed}"
    run(
        [
            sys.executable, "-m", "recommender", "train",
            "--train", str(data_dir / "ml-100k.train.rating"),
            "--test", str(data_dir / "ml-100k.test.rating"),
            "--test-negatives", str(data_dir / "ml-100k.test.negative"),
            "--model", model, "--set", f"seed={seed}", "--set", "train.progress=false",
            "--set", f"threads={threads}", *(a for o in overrides for a in ("--set", o)),
            "--out", str(run_dir), "--overwrite",
        ]
    )  # fmt: skip
    report = json.loads(run([sys.executable, "-m", "recommender", "evaluate", "--run",
                             str(run_dir), "--json"]))  # fmt: skip
    results = report["results"]
    return {
        f"{protocol} {metric}": results[f"{model}/{protocol}"]["metrics"][metric]
        for protocol, metric in METRICS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/ml-100k-loo"))
    parser.add_argument("--models", nargs="+", default=["neumf", "mf", "popularity"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-quality"))
    parser.add_argument("--jobs", type=int, default=1, help="seeds trained in parallel")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (the defaults are the benchmark)",
    )
    args = parser.parse_args()
    table: dict[str, dict[str, float]] = {}
    for model in args.models:
        with ThreadPoolExecutor(args.jobs) as pool:
            per_seed = list(
                pool.map(
                    lambda s, m=model: train_and_evaluate(
                        args.data_dir, m, s, args.out, args.threads, args.set
                    ),
                    args.seeds,
                )
            )
        table[model] = {k: statistics.mean(r[k] for r in per_seed) for k in per_seed[0]}
        table[model] |= {f"{k} std": statistics.pstdev(r[k] for r in per_seed) for k in per_seed[0]}
        print(model, json.dumps({k: round(v, 4) for k, v in table[model].items()}), flush=True)
    print("\n| model | sampled HR@10 | sampled NDCG@10 | full HR@10 | full NDCG@10 |")
    print("|---|---|---|---|---|")
    for model, row in table.items():
        cells = " | ".join(f"{row[k]:.4f}" for k in BAR)
        print(f"| {model} (mean of {len(args.seeds)} seeds) | {cells} |")
    print("| bar (best peer) | " + " | ".join(f"{v:.4f}" for v in BAR.values()) + " |")
    if "neumf" in table:
        beats = all(table["neumf"][k] > v for k, v in BAR.items())
        print(f"\nNeuMF beats every peer on all four: {beats}")


if __name__ == "__main__":
    main()
