"""Scale benchmarks at MovieLens-20M shape: ingestion, sampling, training, evaluation, sparse.

    python benchmarks/bench_scale.py --data /tmp/scale/ml20m.parquet [--only ingest,sample,...]

Sections (each prints one JSON object; heavy ones run in a child process so their peak RSS
is their own):
  ingest   columnar (pyarrow) vs general (pandas) ingestion: seconds and peak RSS, then the
           cached reload; the pandas path at --compare-rows rows (both engines measured there).
  command  the real `recommender train` command from a cold cache under /usr/bin/time -v,
           stopped with SIGINT after --command-seconds: peak RSS of ingestion + training.
  sample   one epoch's negatives (positives x 4), packed bitset vs sorted keys.
  train    pure-compute bound (random ready-made batches) vs the real pipeline (epoch_batches:
           permutation, sampling, shuffling) for the same model, dense fused Adam and SparseAdam
           at each --batch-sizes; --pipeline-samples each (default: one epoch chunk, sampling
           included), extrapolated to the 100M-sample epoch.
  sparse   a 5,000,000-user table: dense fused Adam vs SparseAdam, step time and peak RSS.
  eval     FULL-protocol evaluation of every test user, chunked: seconds and peak RSS.

Without --data, a ML-20M-shaped synthetic file is written first (about 15 s, 0.5 GiB peak).
Children run --threads intra-op threads (default 1: on a 2-core machine shared with other
work, 2 OpenMP threads measured 20x slower than 1, as each waits for the descheduled other).
`--smoke` runs every section on tiny synthetic data in seconds, the children in this process
(their peak RSS is then the whole run's).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from smoke import TINY, add_arguments, folder

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODEL = ["model.embedding_dim=32", "model.mlp_layers=[64,32,16,8]"]
# The epoch: 4 negatives per positive (about 100M samples at MovieLens-20M size).
BENCH_TRAIN = ["train.num_negatives=4"]
ML20M = {"n_users": 138_493, "n_items": 26_744, "n_interactions": 20_000_263}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def child(section: str, args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    """Run `section` of this script in a fresh process; return its JSON line."""
    argv = ["--child", section, "--data", str(args.data), "--root", str(args.root), *extra]
    if args.smoke:  # in this process: a torch start-up per section would take most of the time
        return CHILDREN[section](build_parser().parse_args(argv))
    cmd = [sys.executable, __file__, *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{section} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def config(args: argparse.Namespace, *sets: str):
    from recommender.config import load_config

    return load_config(
        None,
        [
            "data.dataset=null",
            f"data.path={args.data}",
            f"data.root={args.root}",
            "train.progress=false",
            *BENCH_TRAIN,
            *BENCH_MODEL,
            *sets,
        ],
    )


# -- children --------------------------------------------------------------------------------


def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from recommender.data import pipeline

    cfg = config(args, "data.cache=false")
    columnar = pipeline.read_indexed
    if args.engine == "pandas":
        pipeline.read_indexed = lambda cfg: None
    try:
        start = time.perf_counter()
        data = pipeline.load_data(cfg.data, cfg.seed)
    finally:
        pipeline.read_indexed = columnar  # a --smoke run's later sections share this process
    return {
        "engine": args.engine,
        "rows": len(data.train) + len(data.valid) + len(data.test),
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def run_reload(args: argparse.Namespace) -> dict[str, Any]:
    from recommender.data.pipeline import load_data

    cfg = config(args, "data.cache=true")
    load_data(cfg.data, cfg.seed)  # writes the cache when it is not there yet
    start = time.perf_counter()
    data = load_data(cfg.data, cfg.seed)
    seconds = time.perf_counter() - start
    _ = data.train_full.csr()
    return {"cached_reload_seconds": round(seconds, 2), "peak_rss_gib": round(peak_rss_gib(), 2)}


def run_sample(args: argparse.Namespace) -> dict[str, Any]:
    from recommender.data import sampling
    from recommender.data.pipeline import load_data

    cfg = config(args, "data.cache=true")
    data = load_data(cfg.data, cfg.seed).train_full
    users = torch.from_numpy(data.user_idx)
    out: dict[str, Any] = {"positives": len(users), "negatives": 4 * len(users)}
    default = sampling.BITSET_LIMIT
    try:
        for name, limit in (("bitset", default), ("sorted_keys", 0)):
            sampling.BITSET_LIMIT = limit
            start = time.perf_counter()
            sampler = sampling.NegativeSampler(data)
            built = time.perf_counter() - start
            gen = torch.Generator().manual_seed(0)
            seconds, returned = 0.0, 0
            for part in users.split(sampling.EPOCH_CHUNK):  # as epoch_batches draws them
                start = time.perf_counter()
                negs = sampler.sample(part, 4, gen)
                seconds += time.perf_counter() - start
                returned += int(sampler.is_positive(part[:, None], negs).sum())  # checked, untimed
            out[name] = {
                "build_seconds": round(built, 2),
                "sample_seconds": round(seconds, 2),
                "positives_returned": returned,
            }
    finally:
        sampling.BITSET_LIMIT = default  # a --smoke run's later sections share this process
    out["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return out


def _step_fn(model, optimizers):
    from recommender.train import train_step

    return lambda u, i, y: train_step(model, optimizers, u, i, y)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    from recommender.data.pipeline import load_data
    from recommender.data.sampling import epoch_batches
    from recommender.models import build_model
    from recommender.train import Trainer

    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    for sparse, batch_size in itertools.product((False, True), sizes):
        cfg = config(
            args,
            "data.cache=true",
            f"train.batch_size={batch_size}",
            f"train.sparse={str(sparse).lower()}",
            "train.refit=false",
            "train.pretrain.enabled=false",
        )
        data = load_data(cfg.data, cfg.seed)
        trainer = Trainer(cfg, data, Path(args.root) / "unused", torch.device("cpu"))
        n_users, n_items = len(data.users), len(data.items)
        stage = trainer.stages[-1]
        model = build_model(cfg.model, n_users, n_items, sparse=sparse)
        step = _step_fn(model, trainer.optimizers(model, stage))
        gen = torch.Generator().manual_seed(0)
        b = batch_size
        ready = [
            (
                torch.randint(n_users, (b,), generator=gen),
                torch.randint(n_items, (b,), generator=gen),
                torch.randint(2, (b,), generator=gen).float(),
            )
            for _ in range(16)
        ]
        for k in range(10):
            step(*ready[k % 16])
        start = time.perf_counter()
        steps = max(20, args.bound_samples // b)
        for k in range(steps):
            step(*ready[k % 16])
        bound = steps * b / (time.perf_counter() - start)

        source = trainer._epoch_source("train")
        model = build_model(cfg.model, n_users, n_items, sparse=sparse)
        step = _step_fn(model, trainer.optimizers(model, stage))
        start = time.perf_counter()
        batches = epoch_batches(
            source.users,
            source.items,
            source.sampler,
            num_negatives=cfg.train.num_negatives,
            batch_size=b,
            generator=torch.Generator().manual_seed(1),
        )
        samples = 0
        for u, i, y in itertools.islice(batches, max(1, args.pipeline_samples // b)):
            step(u, i, y)
            samples += len(y)
        pipe = samples / (time.perf_counter() - start)
        epoch = len(source.users) * (1 + cfg.train.num_negatives)
        out[f"{'sparse_adam' if sparse else 'dense_fused_adam'}_batch_{b}"] = {
            "compute_bound_samples_s": round(bound),
            "pipeline_samples_s": round(pipe),
            "ratio": round(pipe / bound, 3),
            "pipeline_samples_measured": samples,
            "epoch_samples": epoch,
            "epoch_minutes_extrapolated": round(epoch / pipe / 60, 1),
        }
        del trainer, source, model
    out["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return out


def run_sparse(args: argparse.Namespace) -> dict[str, Any]:
    from recommender.config import ModelConfig
    from recommender.models import build_model

    n_users, n_items, b = args.sparse_users, 26_744, args.batch_size
    model = build_model(
        ModelConfig(name="gmf", embedding_dim=args.sparse_dim),
        n_users,
        n_items,
        sparse=args.variant == "sparse",
    )
    if args.variant == "sparse":
        tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        dense = [p for p in model.parameters() if all(p is not t for t in tables)]
        optimizers: list[torch.optim.Optimizer] = [
            torch.optim.SparseAdam(tables, lr=1e-3),
            torch.optim.Adam(dense, lr=1e-3, fused=True),
        ]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)]
    step = _step_fn(model, optimizers)
    gen = torch.Generator().manual_seed(0)

    def batch():
        return (
            torch.randint(n_users, (b,), generator=gen),
            torch.randint(n_items, (b,), generator=gen),
            torch.randint(2, (b,), generator=gen).float(),
        )

    for _ in range(3):
        step(*batch())
    times = []
    for _ in range(args.sparse_steps):
        u, i, y = batch()
        start = time.perf_counter()
        step(u, i, y)
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "variant": args.variant,
        "users": n_users,
        "dim": args.sparse_dim,
        "batch_size": b,
        "median_step_ms": round(1000 * times[len(times) // 2], 2),
        "samples_s": round(b / times[len(times) // 2]),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    from recommender.data.pipeline import load_data
    from recommender.evaluate import evaluate_full
    from recommender.models import build_model

    cfg = config(args, "data.cache=true")
    data = load_data(cfg.data, cfg.seed)
    out: dict[str, Any] = {"test_users": len(data.test)}
    for name, sets in (
        ("bench NeuMF (32, [64,32,16,8])", BENCH_MODEL),
        ("MF (32)", ["model.name=mf"]),
    ):
        mcfg = config(args, *sets).model
        model = build_model(mcfg, len(data.users), len(data.items))
        test = data.test
        if args.eval_users:
            test = test.subset(test.user_idx < args.eval_users)
        start = time.perf_counter()
        evaluate_full(model, data.train_full, test, [10], batch_users=args.eval_batch)
        seconds = time.perf_counter() - start
        out[name] = {
            "users_measured": len(test),
            "seconds": round(seconds, 1),
            "all_users_seconds_extrapolated": round(seconds * len(data.test) / len(test), 1),
        }
    out["peak_rss_gib"] = round(peak_rss_gib(), 2)
    return out


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    """The real CLI from a cold cache, stopped after a while; /usr/bin/time -v reports the peak."""
    root = Path(tempfile.mkdtemp(prefix="cmd-", dir=args.root))
    cmd = ["/usr/bin/time", "-v", "timeout", "-s", "INT", str(args.command_seconds)]
    cmd += [sys.executable, "-m", "recommender", "train", "--data", str(args.data)]
    cmd += [
        "--out",
        str(root / "run"),
        "--set",
        f"data.root={root}",
        "--set",
        "train.progress=false",
    ]
    cmd += ["--set", "train.pretrain.enabled=false", "--set", f"train.batch_size={args.batch_size}"]
    cmd += ["--set", f"threads={args.threads}"]
    cmd += [f"--set={s}" for s in BENCH_TRAIN + BENCH_MODEL]
    if args.smoke:
        cmd += ["--set=train.max_epochs=1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    rss_kib = next(
        int(line.split(":")[1]) for line in proc.stderr.splitlines() if "Maximum resident" in line
    )
    shutil.rmtree(root, ignore_errors=True)
    return {
        "command": " ".join(cmd[6:]),
        "stopped_after_seconds": round(seconds),
        "exit_code": proc.returncode,
        "peak_rss_gib": round(rss_kib / 2**20, 2),
        "log_tail": proc.stderr.splitlines()[:6],
    }


CHILDREN = {
    "ingest": run_ingest,
    "reload": run_reload,
    "sample": run_sample,
    "train": run_train,
    "sparse": run_sparse,
    "eval": run_eval,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, help="ML-20M-shaped parquet (written if absent)")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "bench_scale")
    parser.add_argument("--only", default="ingest,command,sample,train,sparse,eval")
    parser.add_argument("--compare-rows", type=int, default=2_000_000)
    parser.add_argument("--command-seconds", type=int, default=150)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4096, help="command and sparse")
    parser.add_argument("--batch-sizes", default="4096,16384", help="train section")
    parser.add_argument("--bound-samples", type=int, default=2_000_000)
    parser.add_argument("--pipeline-samples", type=int, default=10_485_760)
    parser.add_argument("--sparse-steps", type=int, default=10)
    parser.add_argument("--sparse-dim", type=int, default=32)
    parser.add_argument("--sparse-users", type=int, default=5_000_000)
    parser.add_argument("--eval-users", type=int, default=0, help="0: every test user")
    parser.add_argument("--eval-batch", type=int, default=512)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="pyarrow", help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="dense", help=argparse.SUPPRESS)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.child:  # one section, in the fresh process child() started
        torch.set_num_threads(args.threads)
        print(json.dumps(CHILDREN[args.child](args)))
        return
    if not args.smoke:
        run(args, ML20M)
        return
    with folder(args.smoke_dir) as where:
        args.root, args.data, args.compare_rows, args.command_seconds = where, None, 1_000, 120
        args.batch_size, args.batch_sizes, args.bound_samples = 256, "256", 2_048
        args.pipeline_samples, args.sparse_steps, args.sparse_users = 2_048, 2, 1_000
        if not Path("/usr/bin/time").is_file():
            args.only = args.only.replace("command", "")
            print("command: skipped (no /usr/bin/time)")
        run(args, TINY)


def run(args: argparse.Namespace, shape: dict[str, int]) -> None:
    """Every section of --only, on --data or on synthetic data of `shape` written first."""
    args.root.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    from recommender.data.synthetic import write_synthetic

    if args.data is None:
        args.data = args.root / "ml20m.parquet"
    if not args.data.is_file():
        write_synthetic(args.data, **{"seed": 0, **shape})
    only = args.only.split(",")
    report: dict[str, Any] = {
        "machine": f"{os.cpu_count()} cores, {args.threads} thread(s), torch {torch.__version__}",
        "load_average_at_start": os.getloadavg(),
        "data": str(args.data),
    }
    if "ingest" in only:
        import pyarrow.parquet as pq

        small = args.root / f"first_{args.compare_rows}.parquet"
        if not small.is_file():
            pq.write_table(pq.read_table(args.data).slice(0, args.compare_rows), small)
        full = argparse.Namespace(**{**vars(args)})
        part = argparse.Namespace(**{**vars(args), "data": small})
        report["ingest"] = {
            "full_pyarrow": child("ingest", full, "--engine", "pyarrow"),
            f"{args.compare_rows}_rows_pyarrow": child("ingest", part, "--engine", "pyarrow"),
            f"{args.compare_rows}_rows_pandas": child("ingest", part, "--engine", "pandas"),
            "full_cached_reload": child("reload", full),
        }
        print(json.dumps(report["ingest"], indent=2), flush=True)
    if "command" in only:
        report["command"] = run_command(args)
        print(json.dumps(report["command"], indent=2), flush=True)
    extra = [
        f"--threads={args.threads}",
        f"--batch-size={args.batch_size}",
        f"--batch-sizes={args.batch_sizes}",
        f"--bound-samples={args.bound_samples}",
        f"--pipeline-samples={args.pipeline_samples}",
        f"--sparse-steps={args.sparse_steps}",
        f"--sparse-dim={args.sparse_dim}",
        f"--eval-users={args.eval_users}",
        f"--eval-batch={args.eval_batch}",
        f"--sparse-users={args.sparse_users}",
    ]
    for section in ("sample", "train", "eval"):
        if section in only:
            report[section] = child(section, args, *extra)
            print(json.dumps(report[section], indent=2), flush=True)
    if "sparse" in only:
        report["sparse_5m_users"] = [
            child("sparse", args, *extra, "--variant", v) for v in ("dense", "sparse")
        ]
        print(json.dumps(report["sparse_5m_users"], indent=2), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
