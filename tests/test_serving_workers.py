"""`recommender serve --workers 2`, the real processes: reloads reach both workers, `/metrics`
adds up both, and SIGTERM turns `/readyz` to 503 while a request in flight finishes.

Every request opens its own connection (`Connection: close`), so the kernel hands requests to
both workers; `/metrics` shows each worker's model (one `pid` per worker), which is how the test
knows both answered and agree.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import FAST, free_port, kill_server, request_in_flight, start_server, wait_ready
from recommender.checkpoint import BEST_FILE, CONFIG_FILE
from recommender.cli import main
from recommender.serving import app as serving_app
from recommender.serving.settings import ENV_PREFIX, ServeSettings

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLOSE = {"Connection": "close"}
AGREE_WITHIN_S = 2.0
INFO = re.compile(r'recommender_model_info\{[^}]*pid="(\d+)"[^}]*version="([^"]+)"\} 1\.0')


@pytest.fixture(scope="module")
def second_run(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another GMF on the same data (another seed): a different model version."""
    out = tmp_path_factory.mktemp("workers") / "gmf2"
    args = ["train", "--data", str(planted_csv), "--model", "gmf", "--out", str(out)]
    assert main([*args, *(f"--set={s}" for s in [*FAST, "train.epochs=2", "seed=1"])]) == 0
    return out


def versions_by_worker(base: str) -> dict[str, str]:
    """pid -> the version that worker serves, from the aggregated /metrics."""
    text = httpx.get(f"{base}/metrics", headers=CLOSE, timeout=5).text
    return dict(INFO.findall(text))


def wait_agreement(base: str, version: str, workers: int, limit_s: float = 10.0) -> float:
    """Seconds until every worker serves `version` and `/v1/model` answers it 10 times in a
    row (bounded by `limit_s`)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        served = versions_by_worker(base)
        if len(served) == workers and set(served.values()) == {version}:
            answers = {
                httpx.get(f"{base}/v1/model", headers=CLOSE).json()["version"] for _ in range(10)
            }
            if answers == {version}:
                return time.perf_counter() - start
        time.sleep(0.05)
    raise AssertionError(f"workers still disagree after {limit_s} s: {versions_by_worker(base)}")


def copy_run_files(source: Path, run_dir: Path) -> None:
    """Write `source`'s model into `run_dir` as training does: a temporary file beside each
    target, renamed over it, so a reader never sees half a file."""
    for name in (CONFIG_FILE, BEST_FILE):
        tmp = run_dir / f".{name}.tmp"
        shutil.copyfile(source / name, tmp)
        os.replace(tmp, run_dir / name)


def test_two_workers_agree_after_reloads_count_together_and_drain(
    gmf_run: Path, second_run: Path, tmp_path: Path
):
    run_a = tmp_path / "a"  # copies: the test writes new models into them
    run_b = tmp_path / "b"
    shutil.copytree(gmf_run, run_a)
    shutil.copytree(second_run, run_b)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "serve.log"
    env = {"RECOMMENDER_ADMIN_TOKEN": TOKEN, f"{ENV_PREFIX}DRAIN_S": "1"}
    proc = start_server(run_a, port, log_file, "--workers", "2", env=env)
    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:  # plain requests all through the reloads: none may fail
        while not stop.is_set():
            try:
                url = f"{base}/v1/users/u10/recommendations?k=5"
                statuses.append(httpx.get(url, headers=CLOSE, timeout=10).status_code)
            except httpx.HTTPError:
                statuses.append(-1)

    try:
        wait_ready(base, proc)
        version_a = httpx.get(f"{base}/v1/model").json()["version"]
        wait_agreement(base, version_a, workers=2)
        loader = threading.Thread(target=hammer)
        loader.start()

        # An admin reload, taken by one worker, reaches the other.
        reload = httpx.post(
            f"{base}/admin/reload", headers=AUTH, json={"run_dir": str(run_b)}, timeout=30
        )
        assert reload.status_code == 200, reload.text
        version_b = reload.json()["model_version"]
        assert version_b != version_a
        assert wait_agreement(base, version_b, workers=2) < AGREE_WITHIN_S

        # A new best.pt written into the served run: every worker notices it on its own.
        copy_run_files(run_a, run_b)
        assert wait_agreement(base, version_a, workers=2) < AGREE_WITHIN_S
        stop.set()
        loader.join(timeout=30)
        assert statuses and set(statuses) == {200}

        # /metrics counts both workers' requests: a burst adds exactly its size to the total.
        def model_requests() -> float:
            text = httpx.get(f"{base}/metrics", headers=CLOSE).text
            found = re.search(r'route="/v1/model",status="200"\} (\S+)', text)
            return float(found.group(1)) if found else 0.0

        before = model_requests()
        for _ in range(40):
            assert httpx.get(f"{base}/v1/model", headers=CLOSE).status_code == 200
        assert model_requests() == before + 40
        assert len(versions_by_worker(base)) == 2

        # SIGTERM: not ready from then on, while a request in flight is still answered.
        body = {"user_ids": ["u10"], "k": 2}
        with request_in_flight(port, "/v1/recommendations", body) as finish:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 5
            ready = 200
            while ready == 200 and time.monotonic() < deadline:
                ready = httpx.get(f"{base}/readyz", headers=CLOSE, timeout=5).status_code
                time.sleep(0.05)
            assert ready == 503
            response = finish()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = log_file.read_text()
        assert "Traceback" not in log and "died" not in log
    finally:
        stop.set()
        kill_server(proc)


def test_two_workers_share_one_build_of_each_versions_indexes(
    gmf_run: Path, second_run: Path, tmp_path: Path
):
    """Above the ANN threshold, each version's indexes are built once, by a process of their
    own, for both workers: at start and after a reload."""
    pytest.importorskip("faiss")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "serve.log"
    env = {"RECOMMENDER_ADMIN_TOKEN": TOKEN, f"{ENV_PREFIX}ANN_THRESHOLD": "0"}
    proc = start_server(gmf_run, port, log_file, "--workers", "2", env=env)
    try:
        wait_ready(base, proc)
        first = httpx.get(f"{base}/v1/model").json()
        assert first["retrieval"] == "two-stage"
        wait_agreement(base, first["version"], workers=2, limit_s=60)
        reload = httpx.post(
            f"{base}/admin/reload", headers=AUTH, json={"run_dir": str(second_run)}, timeout=60
        )
        assert reload.status_code == 200, reload.text
        wait_agreement(base, reload.json()["model_version"], workers=2, limit_s=60)
        answer = httpx.get(f"{base}/v1/users/u10/recommendations?k=5", headers=CLOSE)
        assert answer.status_code == 200 and len(answer.json()["items"]) == 5
        proc.send_signal(signal.SIGTERM)  # a clean stop removes the shared folder, indexes too
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        kill_server(proc)
    log = log_file.read_text()
    assert log.count("building the ANN indexes of") == 2, log
    assert "Traceback" not in log


def test_serve_gives_workers_time_to_load(gmf_run: Path, monkeypatch: pytest.MonkeyPatch):
    """uvicorn's supervisor kills a worker that does not answer its ping in time; a worker
    loading its model on a busy machine may not, so `serve` passes a generous limit."""
    import uvicorn

    seen: dict[str, object] = {}
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kw: seen.update(kw))
    monkeypatch.setenv(f"{ENV_PREFIX}WORKER_HEALTHCHECK_S", "90")
    monkeypatch.setattr(os, "environ", {**os.environ})  # what serve sets for its workers
    serving_app.serve(gmf_run, workers=2)
    assert seen["workers"] == 2 and seen["timeout_worker_healthcheck"] == 90
    assert ServeSettings().worker_healthcheck_s > 5  # uvicorn's own default
    shared = Path(os.environ[serving_app.SHARED_ENV])
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(shared / "metrics")
    assert not shared.exists()  # removed on exit
