"""Several workers: start-up, reloads reaching every worker, and the drain after SIGTERM.

`recommender serve --workers N` on a copy of `--run`, on 127.0.0.1, measured under an open-loop
load of top-10 requests (benchmarks/serving_load.py):

- start: seconds until every worker answers, and how often uvicorn's supervisor replaced a
  worker it took for dead (its log says "died");
- reloads: admin reloads alternating between two versions of the run, then new best.pt files
  written into the served run as training writes them; for each, seconds until every worker
  serves the new version (each worker's model gauge in the aggregated /metrics, polled every
  20 ms), and every request of the load during them (any answer but 200 is an error);
- drain: a request held in flight (half its body sent), SIGTERM; seconds until /readyz says
  503, the held request's status once its body is sent, and seconds until the service exits.

`--busy K` runs K processes of matrix products meanwhile, the "training job on the same
cores" the supervisor used to kill workers under.

    PYTHONPATH=src python benchmarks/bench_workers.py --run runs/NAME --workers 2 --busy 2

`--smoke` trains a tiny run and goes through every step once, in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

import recommender
from bench_serving import free_port, user_shots
from recommender.checkpoint import BEST_FILE, load_best
from serving_load import run_fixed_rate, serving_versions
from serving_synthetic import second_version
from smoke import add_arguments, folder, tiny_run

TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLOSE = {"Connection": "close"}  # one connection per probe, so any worker may answer it


# A training job's stand-in: matrix products on every core torch uses, for argv[1] seconds.
BURN = """
import sys, time, torch
a, end = torch.randn(512, 512), time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    a = (a @ a).clamp_(-1, 1)
"""


def write_best(source: Path, run_dir: Path) -> None:
    """source's best.pt into run_dir as training writes it: a temporary file, renamed over."""
    tmp = run_dir / f".{BEST_FILE}.bench.tmp"
    shutil.copyfile(source / BEST_FILE, tmp)
    os.replace(tmp, run_dir / BEST_FILE)


async def workers_serving(client: httpx.AsyncClient) -> dict[str, str]:
    """pid -> version each live worker serves, from the aggregated /metrics."""
    return serving_versions((await client.get("/metrics", headers=CLOSE)).text)


async def until_agreed(
    client: httpx.AsyncClient, version: str, workers: int, limit_s: float
) -> float | None:
    """Seconds until all `workers` serve `version` (None: not within `limit_s`)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        served = await workers_serving(client)
        if len(served) == workers and set(served.values()) == {version}:
            return round(time.perf_counter() - start, 3)
        await asyncio.sleep(0.02)
    return None


async def reloads(
    client: httpx.AsyncClient, runs: tuple[Path, Path], versions: tuple[str, str], args: Any
) -> dict[str, Any]:
    """Admin reloads alternating between the two runs, then best.pt writes into the served
    one (copies of the two runs' files, kept aside), each `args.gap_s` after the last."""
    admin, written = [], []
    for i in range(args.reloads):
        await asyncio.sleep(args.gap_s)
        target = (i + 1) % 2
        response = await client.post(
            "/admin/reload", headers=AUTH, json={"run_dir": str(runs[target])}, timeout=120
        )
        agreed = await until_agreed(client, versions[target], args.workers, args.limit_s)
        admin.append({"status": response.status_code, "agreed_s": agreed})
    served = runs[args.reloads % 2]  # the run serving after the admin reloads
    aside = served.parent / "aside"
    for i, run in enumerate(runs):
        (aside / str(i)).mkdir(parents=True)
        shutil.copyfile(run / BEST_FILE, aside / str(i) / BEST_FILE)
    for i in range(args.reloads):
        await asyncio.sleep(args.gap_s)
        target = (args.reloads + i + 1) % 2
        start = time.perf_counter()
        write_best(aside / str(target), served)
        agreed = await until_agreed(client, versions[target], args.workers, args.limit_s)
        written.append(round(time.perf_counter() - start, 3) if agreed is not None else None)
    return {"admin_reloads": admin, "best_pt_writes_agreed_s": written}


async def drain(proc: subprocess.Popen[bytes], base: str, user: str) -> dict[str, Any]:
    release = asyncio.Event()
    payload = json.dumps({"user_ids": [user], "k": 5}).encode()

    async def body() -> AsyncIterator[bytes]:
        yield payload[:5]
        await release.wait()
        yield payload[5:]

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        json_body = {"content-type": "application/json"}
        held = asyncio.create_task(
            client.post("/v1/recommendations", content=body(), headers=json_body)
        )
        await asyncio.sleep(0.5)
        start = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        ready_statuses: list[int] = []
        while time.perf_counter() - start < 10:
            try:
                ready_statuses.append((await client.get("/readyz", headers=CLOSE)).status_code)
            except httpx.HTTPError:
                ready_statuses.append(0)
            if ready_statuses[-1] == 503:
                break
            await asyncio.sleep(0.01)
        not_ready_s = round(time.perf_counter() - start, 3)
        release.set()
        try:
            held_status = (await held).status_code
        except httpx.HTTPError:
            held_status = 0
    code = await asyncio.to_thread(proc.wait, 60)
    return {
        "readyz_503_after_s": not_ready_s if ready_statuses[-1:] == [503] else None,
        "readyz_200_after_sigterm": ready_statuses.count(200),
        "held_request_status": held_status,
        "exit_code": code,
        "exit_s": round(time.perf_counter() - start, 3),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    users = load_best(Path(args.run)).user_ids[:20_000]
    busy = [
        subprocess.Popen([sys.executable, "-c", BURN, str(args.busy_s)]) for _ in range(args.busy)
    ]
    results: dict[str, Any] = {
        "workers": args.workers,
        "busy_processes": args.busy,
        "cpus": os.cpu_count(),
        "load_avg_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        runs = (Path(tmp) / "a", second_version(Path(args.run), Path(tmp) / "b"))
        shutil.copytree(args.run, runs[0])
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        src = str(Path(recommender.__file__).resolve().parents[1])
        env = {**os.environ, "RECOMMENDER_ADMIN_TOKEN": TOKEN, "PYTHONPATH": src}
        cmd = [sys.executable, "-m", "recommender", "serve", "--run", str(runs[0])]
        cmd += ["--port", str(port), "--workers", str(args.workers)]
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            results.update(asyncio.run(session(proc, base, runs, users, rng, args)))
        finally:
            if proc.poll() is None:  # its workers too, or they outlive a failed measurement
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            text = log_path.read_text(errors="replace")
            results["workers_replaced"] = text.count(" died")
            results["tracebacks"] = text.count("Traceback")
    for p in busy:
        p.terminate()
        p.wait()
    results["load_avg_end"] = os.getloadavg()
    return results


async def session(
    proc: subprocess.Popen[bytes],
    base: str,
    runs: tuple[Path, Path],
    users: np.ndarray,
    rng: np.random.Generator,
    args: argparse.Namespace,
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # A reload waits for CPU the busy processes leave (engine.BUILD_NICE): a long timeout.
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        start = time.perf_counter()
        while time.perf_counter() - start < args.limit_start_s:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}")
            try:
                if len(await workers_serving(client)) == args.workers:
                    break
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)
        out["start_s"] = round(time.perf_counter() - start, 2)
        version_a = (await client.get("/v1/model")).json()["version"]
        load_b = await client.post("/admin/reload", headers=AUTH, json={"run_dir": str(runs[1])})
        version_b = load_b.json()["model_version"]
        await client.post("/admin/reload", headers=AUTH, json={"run_dir": str(runs[0])})
        await until_agreed(client, version_a, args.workers, args.limit_s)
    span_s = 2 * args.reloads * (args.gap_s + 1.0) + 1.0  # the load outlasts the reloads
    shots = user_shots(users, int(args.rate * span_s), rng)

    async def during(_: httpx.AsyncClient) -> dict[str, Any]:
        # A client of its own: queued behind the load's connections, a /metrics poll would
        # time the client's queue, not the workers.
        async with httpx.AsyncClient(base_url=base, timeout=30) as own:
            return await reloads(own, runs, (version_a, version_b), args)

    outcome = await run_fixed_rate(base, shots, args.rate, during=during)
    out["load_during_reloads"] = outcome.summary()
    out["drain"] = await drain(proc, base, str(users[0]))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", help="a trained run directory (required)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="CPU-burning processes meanwhile")
    parser.add_argument("--busy-s", type=float, default=300.0, help="at most this long")
    parser.add_argument("--reloads", type=int, default=6, help="admin reloads, then as many writes")
    parser.add_argument("--gap-s", type=float, default=1.0, help="between reloads")
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s during reloads")
    parser.add_argument("--limit-s", type=float, default=30.0, help="longest wait for agreement")
    parser.add_argument("--limit-start-s", type=float, default=180.0)
    parser.add_argument("--out", help="write the results as JSON here")
    add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.smoke:
        if args.run is None:
            parser.error("--run is required (or --smoke)")
        report(measure(args), args.out)
        return
    with folder(args.smoke_dir) as where:
        args.run, args.out = tiny_run(where), where / "workers.json"
        args.reloads, args.gap_s, args.rate, args.busy, args.busy_s = 2, 0.2, 20.0, 1, 3.0
        logging.getLogger("httpx").setLevel(logging.WARNING)  # training turned INFO logs on
        report(measure(args), args.out)


def report(results: dict[str, Any], out: str | Path | None) -> None:
    text = json.dumps(results, indent=2, default=str)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
