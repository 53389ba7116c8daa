"""Shared fixtures: a planted synthetic data set with a known answer, and one small trained run.

The planted data has users in clusters that each prefer one cluster of items, plus a mild item
popularity inside every cluster. A collaborative model that learns the clusters ranks a user's
held-out item near the top; the Popularity baseline, blind to clusters, mostly cannot. Raw ids
are strings and integers with gaps, so every test also exercises the vocabularies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

import recommender
from recommender.cli import main
from recommender.models.base import RecModel

# Small enough to train in about a second on one thread, big enough for a clear HR@10 margin.
N_USERS = 160
N_ITEMS = 120
N_CLUSTERS = 8
PER_USER = 16
IN_CLUSTER_WEIGHT = 40.0

# Settings that make a tiny run fast: short stages, no progress bar, one thread.
FAST = [
    "train.batch_size=512",
    "train.lr=0.02",
    "train.progress=false",
    "train.patience=100",
    "train.pretrain.gmf.epochs=4",
    "train.pretrain.gmf.lr=0.02",
    "train.pretrain.mlp.epochs=4",
    "train.pretrain.mlp.lr=0.02",
    "model.embedding_dim=16",
    "model.mlp_layers=[32,16,8]",
    "eval.num_negatives=50",
    "threads=1",
    "device=cpu",
]

# A one-block SASRec small enough to learn `sequential_frame`'s 120-item walks in about a second.
SASREC = [*FAST, "model.embedding_dim=16", "model.max_len=16", "model.blocks=1",
          "model.dropout=0.1", "train.batch_size=32", "train.lr=0.01",
          "train.epochs=10"]  # fmt: skip


def user_id(u: np.ndarray | int) -> np.ndarray:
    """Raw user ids: strings with gaps ("u7", "u10", ...)."""
    return np.char.add("u", (np.asarray(u) * 3 + 7).astype(str))


def item_id(i: np.ndarray | int) -> np.ndarray:
    """Raw item ids: integers with gaps (5, 15, 25, ...), written as numbers in the CSV."""
    return np.asarray(i) * 10 + 5


def planted_frame(
    n_users: int = N_USERS,
    n_items: int = N_ITEMS,
    n_clusters: int = N_CLUSTERS,
    per_user: int = PER_USER,
    seed: int = 0,
) -> pd.DataFrame:
    """Interactions (user_id, item_id, rating, timestamp) with a planted cluster structure.

    Every interaction, the latest included, follows the structure, so leave-last-out test items
    are predictable from the rest of the history.
    """
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(n_clusters, size=n_users)
    item_cluster = np.arange(n_items) % n_clusters
    popularity = 1.0 + rng.pareto(2.0, n_items)
    # Gumbel top-k: per_user distinct items per user, drawn with the planted weights.
    weights = popularity[None, :] * np.where(
        item_cluster[None, :] == user_cluster[:, None], IN_CLUSTER_WEIGHT, 1.0
    )
    keys = np.log(weights) + rng.gumbel(size=(n_users, n_items))
    items = np.argsort(-keys, axis=1)[:, :per_user]
    users = np.repeat(np.arange(n_users), per_user)
    timestamps = (
        1_000_000 + rng.permuted(np.tile(np.arange(per_user), (n_users, 1)), axis=1).ravel() * 60
    )
    return pd.DataFrame(
        {
            "user_id": user_id(users),
            "item_id": item_id(items.ravel()),
            "rating": rng.integers(1, 6, size=len(users)).astype(float),
            "timestamp": timestamps + users,
        }
    )


def sequential_frame(
    n_users: int = N_USERS, n_items: int = N_ITEMS, per_user: int = PER_USER, seed: int = 0
) -> pd.DataFrame:
    """Interactions where order is the whole signal: every user walks one fixed cycle through
    the catalog (item i is followed by successor[i]) from a random start, so a user's next
    item follows from the latest one, while which items a user has is random. A model of the
    order predicts the held-out latest item; one of the item set alone cannot."""
    rng = np.random.default_rng(seed)
    cycle = rng.permutation(n_items)
    start = rng.integers(n_items, size=n_users)
    steps = (start[:, None] + np.arange(per_user)[None, :]) % n_items  # (U, per_user)
    users = np.repeat(np.arange(n_users), per_user)
    return pd.DataFrame(
        {
            "user_id": user_id(users),
            "item_id": item_id(cycle[steps].ravel()),
            "rating": np.ones(len(users)),
            "timestamp": 1_000_000 + np.tile(np.arange(per_user), n_users) * 60 + users,
        }
    )


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def write_ncf_split(
    frame: pd.DataFrame, folder: Path, n_negatives: int = 50, seed: int = 0
) -> tuple[Path, Path, Path]:
    """The NCF paper's files: latest interaction per user to test, plus sampled negatives."""
    rng = np.random.default_rng(seed)
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    is_test = ~frame["user_id"].duplicated(keep="last")
    train, test = frame[~is_test], frame[is_test]
    catalog = np.unique(frame["item_id"].to_numpy())
    seen = frame.groupby("user_id")["item_id"].apply(set)
    lines = []
    for user, item in zip(test["user_id"], test["item_id"], strict=True):
        pool = np.array([i for i in catalog if i not in seen[user]])
        negatives = rng.choice(pool, size=n_negatives, replace=False)
        lines.append("\t".join([f"({user},{item})", *map(str, negatives)]))
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "x.train.rating", folder / "x.test.rating", folder / "x.test.negative")
    for part, path in zip((train, test), paths[:2], strict=True):
        part.to_csv(path, sep="\t", header=False, index=False)
    paths[2].write_text("\n".join(lines) + "\n")
    return paths


def write_lightgcn_split(
    frame: pd.DataFrame, folder: Path, test_share: float = 0.25, seed: int = 0
) -> tuple[Path, Path]:
    """NGCF / LightGCN files: train.txt and test.txt, one line per user, `user item item ...`;
    a random `test_share` of each user's items (never the first) goes to test, so users have
    several test items. User ids lose their "u" (the format's ids are integers)."""
    rng = np.random.default_rng(seed)
    users = frame["user_id"].str.lstrip("u").astype(int).to_numpy()
    is_test = rng.random(len(frame)) < test_share
    is_test[np.unique(users, return_index=True)[1]] = False
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "train.txt", folder / "test.txt")
    for path, part in zip(paths, (~is_test, is_test), strict=True):
        rows = pd.DataFrame({"user": users[part], "item": frame["item_id"].to_numpy()[part]})
        lines = rows.groupby("user", sort=True)["item"].apply(lambda s: " ".join(map(str, s)))
        path.write_text("".join(f"{u} {items}\n" for u, items in lines.items()))
    return paths


def interrupted_run(args: list[str], kill_at: int, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `recommender train` killed after its `kill_at`-th epoch trained but before that
    epoch's checkpoint, as a Ctrl-C (or a kill) would; returns its stderr."""
    from recommender.train import Trainer

    calls = {"n": 0}
    original = Trainer.train_epoch

    def killed(self: Trainer, *a: Any, **kw: Any) -> tuple[float, int, float]:
        result = original(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "train_epoch", killed)
        code, _, err = run_cli(args, capsys)
    assert code == 130, err
    return err


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """The CI machine has two shared cores; one intra-op thread is faster and reproducible."""
    torch.set_num_threads(1)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def planted_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(planted_frame(), tmp_path_factory.mktemp("planted") / "interactions.csv")


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the `recommender` command in-process; returns (exit code, stdout, stderr)."""
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def gmf_run(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GMF run trained once through the CLI (selection on validation, then refit)."""
    out = tmp_path_factory.mktemp("runs") / "gmf"
    args = ["train", "--data", str(planted_csv), "--model", "gmf", "--out", str(out)]
    args += [f"--set={s}" for s in [*FAST, "train.epochs=8"]]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def walks_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MF with the Markov term (model.context=2, full softmax) trained on `sequential_frame`."""
    folder = tmp_path_factory.mktemp("walks")
    path = write_csv(sequential_frame(), folder / "walks.csv")
    settings = [*FAST, "model.context=2", "train.loss=softmax", "train.batch_size=256"]
    settings += ["train.epochs=15", "train.lr=0.01"]
    args = ["train", "--data", str(path), "--model", "mf", "--out", str(folder / "run")]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    return folder / "run"


@pytest.fixture(scope="session")
def sasrec_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SASRec (full softmax, SASREC's settings) trained on `sequential_frame`: each user's
    stored sequence holds 15 items (the 16th is test), below max_len, so it is left-padded."""
    folder = tmp_path_factory.mktemp("walks-sasrec")
    path = write_csv(sequential_frame(), folder / "walks.csv")
    args = ["train", "--data", str(path), "--model", "sasrec", "--out", str(folder / "run")]
    assert main(args + [f"--set={s}" for s in SASREC]) == 0
    return folder / "run"


def walk_successors() -> dict[str, str]:
    """Raw item id -> the raw id that follows it in every walk of `sequential_frame()`."""
    frame = sequential_frame()
    nxt = frame.groupby("user_id")["item_id"].shift(-1)
    pairs = frame.assign(nxt=nxt).dropna()
    return dict(
        zip(pairs["item_id"].astype(str), pairs["nxt"].astype(int).astype(str), strict=True)
    )


class FixedScores(RecModel):
    """A model whose logits are a given (n_users, n_items) matrix: a known answer for metrics."""

    def __init__(self, scores: np.ndarray | torch.Tensor) -> None:
        super().__init__()
        self.scores = torch.as_tensor(scores, dtype=torch.float32)
        self.n_users, self.n_items = self.scores.shape

    def forward(self, user_idx: torch.Tensor, item_idx: torch.Tensor) -> torch.Tensor:
        return self.scores[user_idx, item_idx]

    def item_cache(self) -> tuple[torch.Tensor, ...]:
        return ()

    def _score_cached(
        self, user_idx: torch.Tensor, cache: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        return self.scores[user_idx]


@pytest.fixture
def fixed_scores() -> Callable[[np.ndarray | torch.Tensor], FixedScores]:
    return FixedScores


# -- the real service in a process ---------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    run_dir: Path, port: int, log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`recommender serve` of `run_dir` on 127.0.0.1:`port`, from this source tree, its output
    in `log` (a file: a pipe nobody reads would fill and stall the server)."""
    src = str(Path(recommender.__file__).parents[1])
    path = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "recommender", "serve", "--run", str(run_dir)]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*cmd, "--port", str(port), *args],
            env={**os.environ, **(env or {}), "PYTHONPATH": path},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: `kill_server` reaches the workers
        )


def kill_server(proc: subprocess.Popen[bytes]) -> None:
    """Kill a `start_server` process and its workers, if it is still running (a test that
    failed before stopping it): killing the supervisor alone would leave its workers behind."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("server not ready in time")


@contextmanager
def request_in_flight(port: int, path: str, body: dict[str, Any]) -> Iterator[Callable[[], bytes]]:
    """A POST held in flight: its headers and first bytes go now, the rest when the test calls
    `finish()`, which returns the whole raw response."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        f"\r\nContent-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head + payload[:5])

        def finish() -> bytes:
            conn.sendall(payload[5:])
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
            return response

        yield finish
