"""The `recommender` command: data, train, tune, evaluate, recommend, score, serve, report.

Each command parses its arguments, calls the library (train.py, tune.py, runs.py,
inference.py, serving, report/) and prints. Errors a user can fix print one line and exit with
code 2; nothing else prints a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd

from recommender.config import Config, ModelName, load_config
from recommender.losses import CLOSED_FORM
from recommender.utils import (
    DataError,
    RecommenderError,
    atomic_path,
    resolve_device,
    retain_freed_memory,
    set_threads,
    setup_logging,
)

log = logging.getLogger("recommender")


def _quoted(text: str) -> str:
    """A YAML string literal, so a path like `2024` or `a #2.csv` stays that exact string."""
    return json.dumps(text)


def _config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.set or [])
    if args.dataset:
        overrides += [f"data.dataset={_quoted(args.dataset)}", "data.path=null"]
    if args.data:
        overrides += ["data.dataset=null", f"data.path={_quoted(args.data)}"]
    if args.train or args.test:
        if not (args.train and args.test):
            raise RecommenderError("--train and --test must be given together")
        overrides += ["data.dataset=null", f"data.train_path={_quoted(args.train)}"]
        overrides += [f"data.test_path={_quoted(args.test)}"]
        if args.test_negatives:
            overrides.append(f"data.test_negatives_path={_quoted(args.test_negatives)}")
    elif args.test_negatives:
        raise RecommenderError("--test-negatives needs --train and --test")
    if args.model:
        overrides.append(f"model.name={args.model}")
    return load_config(args.config, overrides)


def cmd_data_fetch(args: argparse.Namespace) -> None:
    from recommender.data.datasets import fetch

    files = fetch(args.name, args.root, local=args.local)
    print(f"{args.name}: {files.ratings} ({files.source})")


def cmd_data_synthetic(args: argparse.Namespace) -> None:
    from recommender.data.synthetic import write_synthetic

    path = write_synthetic(
        args.out,
        n_users=args.users,
        n_items=args.items,
        n_interactions=args.interactions,
        seed=args.seed,
    )
    print(f"{path}: {args.interactions:,} interactions, {args.users:,} users, {args.items:,} items")


def _training_process(cfg: Config) -> None:
    """Set a training process up (train, tune): its threads, and freed memory kept for the
    next step's tensors, except for models fitted without steps, where it only holds memory."""
    set_threads(cfg.threads)
    if cfg.model.name not in CLOSED_FORM:
        retain_freed_memory()


def cmd_train(args: argparse.Namespace) -> None:
    """Train; under torchrun (RANK / WORLD_SIZE set) every rank runs this, see distributed.py."""
    from recommender.checkpoint import BEST_FILE, check_new_run, prepare_run_dir
    from recommender.data.pipeline import load_data
    from recommender.distributed import Dist
    from recommender.tracking import import_mlflow, mlflow_run
    from recommender.train import Trainer

    dist = Dist.from_env()
    if not dist.is_main:
        log.setLevel(logging.WARNING)  # one rank speaks
    cfg = _config_from_args(args)
    out = Path(args.out)
    track = args.mlflow and dist.is_main
    if track:
        import_mlflow()  # a missing package fails before any data is read
    check_new_run(out, overwrite=args.overwrite, resume=args.resume)
    _training_process(cfg)
    device = dist.device(resolve_device(cfg.device))
    dist.init(device)
    try:
        dist.barrier()  # every rank has checked --out before rank 0 touches it
        if not dist.is_main:
            dist.barrier()  # rank 0 ingests first and writes the processed cache ...
        data = load_data(cfg.data, cfg.seed)
        if dist.is_main:
            dist.barrier()  # ... which the other ranks then map
        trainer = Trainer(cfg, data, out, device, dist)  # validates the rest of the config
        if dist.is_main:
            prepare_run_dir(out, overwrite=args.overwrite, resume=args.resume)
        dist.barrier()
        tracking = (
            mlflow_run(out.name, cfg.model_dump(mode="json", exclude={"tune"}), out)
            if track
            else nullcontext(None)
        )
        try:
            with tracking as run:
                if run is not None:
                    trainer.callbacks.append(run)
                trainer.fit(resume=args.resume)
        except RecommenderError:
            # A new run that fails on bad input leaves no half-written directory behind; a
            # resumed one keeps its checkpoints.
            if not args.resume and dist.is_main:
                shutil.rmtree(out, ignore_errors=True)
            raise
        # Leave together: rank 0 still writes checkpoints after the others finish, and a rank
        # tearing the gloo group down meanwhile is the likely cause of a rare abort seen in CI
        # ("terminate called without an active exception" as a 2-process run ended).
        dist.barrier()
    finally:
        dist.close()
    if dist.is_main:
        print(f"trained {cfg.model.name}: {out / BEST_FILE}")


def cmd_tune(args: argparse.Namespace) -> None:
    """Search `tune.space` with Optuna on validation data; see tune.py."""
    from recommender.data.pipeline import load_data
    from recommender.distributed import Dist
    from recommender.tracking import import_mlflow
    from recommender.tune import check_study_dir, leaderboard, run_study

    if Dist.from_env().enabled:
        raise RecommenderError("tune runs in one process; start it without torchrun")
    cfg = _config_from_args(args)
    out = Path(args.out)
    if args.mlflow:
        import_mlflow()
    check_study_dir(out, cfg)  # before the data is read
    _training_process(cfg)
    device = resolve_device(cfg.device)
    data = load_data(cfg.data, cfg.seed)
    try:
        run_study(
            cfg,
            data,
            out,
            n_trials=args.trials,
            timeout=args.timeout,
            device=device,
            mlflow=args.mlflow,
        )
    finally:
        board = leaderboard(out, cfg.train.monitor)  # also after Ctrl-C: the finished trials
        if board:
            print(board)
    print(f"best config: {out / 'best.yaml'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Evaluate with the run's own thread setting, as training used: two evaluations side by
    side on two cores each took torch's default of one thread a core, and scoring Gowalla
    through a NeuMF tower ran several times slower than on one thread each."""
    from recommender.checkpoint import read_config
    from recommender.runs import evaluate_run

    set_threads(read_config(Path(args.run)).threads)
    report = evaluate_run(Path(args.run))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(report["table"])
        for note in report["notes"]:
            print(f"note: {note}")


def _open_recommender(run: str):
    from recommender.inference import Recommender

    return Recommender.from_run(run)


def cmd_recommend(args: argparse.Namespace) -> None:
    from recommender.runs import write_all_recommendations

    rec = _open_recommender(args.run)
    if args.history and (args.all_users or args.after):
        raise RecommenderError("--history is a new user's, not with --all-users or --after")
    if args.all_users:
        if args.after:
            raise RecommenderError("--after takes one --user (or none), not --all-users")
        if not args.out:
            raise RecommenderError("--all-users needs --out FILE")
        write_all_recommendations(rec, args.k, Path(args.out))
        print(f"wrote top-{args.k} for {len(rec.users)} users to {args.out}")
        return
    if args.after:
        if args.explain and args.user is None:
            raise RecommenderError("--explain with --after needs --user: whose history explains")
        items, scores = rec.recommend_next(args.after, k=args.k, user_id=args.user)
        who = "an anonymous session" if args.user is None else f"user {args.user}"
        print(f"top-{args.k} for {who} after {', '.join(map(str, args.after))}")
    elif args.user is None and not args.history:
        raise RecommenderError(
            "give --user USER_ID, --history ITEM_ID ..., --all-users or --after ITEM_ID ..."
        )
    else:
        user = args.user = "new" if args.user is None else args.user
        histories = {user: args.history} if args.history else None
        items, scores = rec.recommend(user, k=args.k, histories=histories)
        note = ""
        if rec.representations(user, histories)[0] == "folded_in":
            note = f" (folded in from {len(args.history)} items)"
        elif not rec.known_users(user)[0]:
            note = " (popularity fallback)"
        print(f"top-{args.k} for user {user}{note}")
    shown = [item for item in items if item is not None]
    whys = []
    if args.explain:
        whys = rec.explain_many(args.user, shown, after=args.after, history=args.history)
    for rank, (item, score) in enumerate(zip(shown, scores, strict=False), 1):
        line = f"{rank:>3}. {item:>8}  {score:.4f}  {rec.title(item)}"
        if args.explain:
            line += f"\n       {whys[rank - 1].one_line(rec.titles)}"
        print(line)


def cmd_score(args: argparse.Namespace) -> None:
    rec = _open_recommender(args.run)
    path = Path(args.pairs)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        pairs = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty file") from None
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed CSV ({str(exc).strip()})") from None
    missing = [c for c in ("user_id", "item_id") if c not in pairs.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(pairs.columns)}")
    for col in ("user_id", "item_id"):
        blank = pairs[col].str.strip() == ""
        if blank.any():
            raise DataError(f"{path} line {int(np.flatnonzero(blank)[0]) + 2}: empty {col}")
    unknown = rec.items.lookup(pairs["item_id"].to_numpy()) < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise DataError(f"{path} line {row + 2}: unknown item_id '{pairs['item_id'].iloc[row]}'")
    pairs["score"] = rec.score(pairs["user_id"].to_numpy(), pairs["item_id"].to_numpy())
    with atomic_path(Path(args.out)) as tmp:
        pairs.to_csv(tmp, index=False, float_format="%.6g")
    print(f"scored {len(pairs)} pairs -> {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from recommender.serving import serve

    serve(args.run, host=args.host, port=args.port, workers=args.workers)


def cmd_report(args: argparse.Namespace) -> None:
    """Build the report with the run's own thread setting, as training used."""
    from recommender.checkpoint import read_config
    from recommender.report import build_report

    run_dir = Path(args.run)
    set_threads(read_config(run_dir).threads)
    path = build_report(
        run_dir,
        out=args.out,
        mf_run=args.mf,
        skip_mf=args.no_mf,
        mf_overrides=args.mf_set,
        k=args.k,
        n_sample_users=args.users,
    )
    print(f"report: {path}")


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    """The flags that make a config (train and tune), and --mlflow."""
    parser.add_argument("--config", help="YAML config (defaults: configs/config.yaml values)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", help="built-in dataset, e.g. ml-100k")
    source.add_argument("--data", help="one interactions file (CSV/TSV/Parquet/MovieLens)")
    source.add_argument(
        "--train", help="pre-split train file (NCF .train.rating, or LightGCN / NGCF train.txt)"
    )
    parser.add_argument("--test", help="pre-split test file (NCF .test.rating, or test.txt)")
    parser.add_argument("--test-negatives", help="NCF .test.negative file")
    parser.add_argument("--model", choices=get_args(ModelName))
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override")
    parser.add_argument(
        "--mlflow", action="store_true", help="log to MLflow (MLFLOW_TRACKING_URI, or ./mlflow.db)"
    )


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `kind(text)`, which must be above zero."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recommender", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="dataset utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser("fetch", help="download and verify a built-in dataset")
    fetch.add_argument("name")
    fetch.add_argument("--root", default="data")
    fetch.add_argument(
        "--from",
        dest="local",
        metavar="PATH",
        help="import a copy you already have: the official zip (sha256-verified) "
        "or its extracted folder (every row parsed)",
    )
    fetch.set_defaults(func=cmd_data_fetch)
    synthetic = data_sub.add_parser(
        "synthetic", help="write planted synthetic interactions to .parquet or .csv (streamed)"
    )
    synthetic.add_argument("--users", type=int, default=138_493, help="default: ML-20M's 138,493")
    synthetic.add_argument("--items", type=int, default=26_744, help="default: ML-20M's 26,744")
    synthetic.add_argument("--interactions", type=int, default=20_000_263, help="default: ML-20M's")
    synthetic.add_argument("--seed", type=int, default=0)
    synthetic.add_argument("--out", required=True, help="output file: .parquet or .csv")
    synthetic.set_defaults(func=cmd_data_synthetic)

    train = sub.add_parser("train", help="train a model into a run directory")
    _add_config_args(train)
    train.add_argument("--out", required=True, help="run directory, e.g. runs/NAME")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    train.add_argument("--resume", action="store_true", help="continue from --out/last.pt")
    train.set_defaults(func=cmd_train)

    tune = sub.add_parser("tune", help="search tune.space with Optuna on validation data")
    _add_config_args(tune)
    tune.add_argument("--trials", type=_positive(int), required=True, help="trials to add")
    tune.add_argument(
        "--timeout", type=_positive(float), metavar="S", help="start no trial after S seconds"
    )
    tune.add_argument(
        "--out", default="runs/tune", help="study directory; rerun with it to add trials"
    )
    tune.set_defaults(func=cmd_tune)

    evaluate = sub.add_parser("evaluate", help="test metrics (FULL and SAMPLED) vs popularity")
    evaluate.add_argument("--run", required=True)
    evaluate.add_argument("--json", action="store_true", help="print JSON instead of a table")
    evaluate.set_defaults(func=cmd_evaluate)

    recommend = sub.add_parser("recommend", help="top-k recommendations")
    recommend.add_argument("--run", required=True)
    who = recommend.add_mutually_exclusive_group()
    who.add_argument("--user", help="raw user id")
    who.add_argument("--all-users", action="store_true")
    recommend.add_argument("--k", type=int, default=10)
    recommend.add_argument("--explain", action="store_true")
    recommend.add_argument(
        "--after",
        nargs="+",
        metavar="ITEM_ID",
        help="items just interacted with, oldest first: what follows them (model.context and "
        "sasrec runs; "
        "with --user, that user's list, else an anonymous session's)",
    )
    recommend.add_argument(
        "--history",
        nargs="+",
        metavar="ITEM_ID",
        help="items a user the run has never seen interacted with, oldest first: their list "
        "from a user vector folded in from them (--user names them; default 'new')",
    )
    recommend.add_argument("--out", help="CSV for --all-users: user_id,item_id,rank,score")
    recommend.set_defaults(func=cmd_recommend)

    score = sub.add_parser("score", help="score (user_id, item_id) pairs from a CSV")
    score.add_argument("--run", required=True)
    score.add_argument("--pairs", required=True)
    score.add_argument("--out", required=True)
    score.set_defaults(func=cmd_score)

    serve = sub.add_parser("serve", help="HTTP service for a run (settings: RECOMMENDER_SERVE_*)")
    serve.add_argument("--run", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="processes, each with the model")
    serve.set_defaults(func=cmd_serve)

    report = sub.add_parser("report", help="HTML report: curves, metrics, insights")
    report.add_argument("--run", required=True, help="run directory")
    report.add_argument("--out", help="report folder (default RUN/report)")
    mf = report.add_mutually_exclusive_group()
    mf.add_argument("--mf", help="MF run on the same data (default: train RUN/baselines/mf)")
    mf.add_argument("--no-mf", action="store_true", help="no MF comparison")
    report.add_argument(
        "--mf-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the MF baseline trained by the report",
    )
    report.add_argument("--k", type=int, default=10, help="top-k length the insights examine")
    report.add_argument("--users", type=int, default=6, help="sample users shown")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except RecommenderError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
