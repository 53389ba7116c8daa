"""Distributed training: torchrun environment, per-rank epochs, and a real 2-process DDP run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, run_cli
from recommender.checkpoint import load_checkpoint
from recommender.data.interactions import Interactions
from recommender.data.sampling import NegativeSampler, epoch_batches
from recommender.distributed import Dist, check_supported
from recommender.inference import Recommender
from recommender.utils import ConfigError

SRC = Path(__file__).resolve().parents[1] / "src"


def test_dist_from_env():
    assert Dist.from_env({}) == Dist()
    assert not Dist().enabled and Dist().is_main
    d = Dist.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.enabled, d.is_main) == (1, 2, 1, True, False)
    assert d.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert d.device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="torchrun"):
        Dist.from_env({"WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="outside"):
        Dist.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_single_process_helpers_are_identity():
    d = Dist()
    model = torch.nn.Linear(2, 1)
    assert d.wrap(model, torch.device("cpu")) is model
    assert d.broadcast({"a": 1}) == {"a": 1}
    assert d.sum([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]


def test_sparse_ddp_on_cuda_is_refused_up_front():
    with pytest.raises(ConfigError, match="NCCL"):
        check_supported(Dist(0, 2, 0), torch.device("cuda", 0), sparse=True)
    check_supported(Dist(0, 2, 0), torch.device("cpu"), sparse=True)  # gloo has sparse


def test_ranks_share_the_permutation_but_not_the_negatives(rng):
    keys = rng.choice(40 * 200, size=400, replace=False)
    data = Interactions(keys // 200, keys % 200, 40, 200)
    sampler = NegativeSampler(data)
    shards = []
    for rank in range(2):
        batches = epoch_batches(
            torch.from_numpy(data.user_idx),
            torch.from_numpy(data.item_idx),
            sampler,
            num_negatives=4,
            batch_size=10_000,
            generator=torch.Generator().manual_seed(5),
            rank=rank,
            world_size=2,
        )
        shards.append([torch.cat(t) for t in zip(*batches, strict=True)])
    pos = [set((u * 200 + i)[y == 1].tolist()) for u, i, y in shards]
    assert len(pos[0]) == len(pos[1]) == 200 and not pos[0] & pos[1]
    assert pos[0] | pos[1] == set(keys.tolist())
    # Each rank's negatives come from its own stream: sorted per user, they differ.
    neg = [np.sort((u[y == 0] * 200 + i[y == 0]).numpy()) for u, i, y in shards]
    assert len(neg[0]) == len(neg[1]) == 800
    assert not np.array_equal(neg[0] % 200, neg[1] % 200)


def _hr10(run: Path, capsys) -> tuple[float, float]:
    code, text, err = run_cli(["evaluate", "--run", str(run), "--json"], capsys)
    assert code == 0, err
    report = json.loads(text)
    res, name = report["results"], report["model"]  # "mf-context" for MF with context
    return res[f"{name}/full"]["metrics"]["hr@10"], res["popularity/full"]["metrics"]["hr@10"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("gmf", []),
        ("gmf", ["train.loss=softmax"]),
        ("mf", ["train.loss=softmax", "model.context=2"]),
        # the graph buffer, the L2 penalty beside DDP's forward, and a shared pool per rank
        ("lightgcn", ["train.loss=sampled_softmax", "train.pool=mix", "train.pool_size=32"]),
        ("sasrec", ["model.max_len=16", "model.blocks=1", "train.batch_size=16"]),
    ],
)
def test_two_process_ddp_matches_single_process_and_loads_alone(
    planted_csv: Path, tmp_path: Path, capsys, model: str, extra: list[str]
):
    """Both losses, the Markov term's context rows and latest-items buffer, and SASRec's
    sequences (a rank's samples: the positions of its share of users) under DDP."""
    sets = [f"--set={s}" for s in [*FAST, "train.epochs=8", *extra]]
    common = ["train", "--data", str(planted_csv), "--model", model, *sets]
    single = tmp_path / "single"
    code, _, err = run_cli([*common, "--out", str(single)], capsys)
    assert code == 0, err

    ddp = tmp_path / "ddp"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run(
        [*launcher, "-m", "recommender", *common, "--out", str(ddp)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(f"trained {model}") == 1  # rank 0 alone reports and writes

    records = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    assert records and all(r["world_size"] == 2 for r in records)
    if model != "sasrec":  # whose ranks have equal users, not equal positions
        assert all(r["train_samples"] == 2 * r["samples_per_rank"] for r in records)
    assert [r["epoch"] for r in records if r["stage"] == f"select/{model}"] == list(range(1, 9))

    state = load_checkpoint(ddp / "best.pt")["state_dict"]
    assert not any(key.startswith("module.") for key in state)
    rec = Recommender.from_run(ddp)  # a single process loads the DDP checkpoint
    items, _ = rec.recommend(rec.users.ids[0], k=5)
    assert len(items) == 5

    hr_ddp, pop = _hr10(ddp, capsys)
    hr_single, _ = _hr10(single, capsys)
    assert abs(hr_ddp - hr_single) <= 0.1, (hr_ddp, hr_single)
    assert hr_ddp > pop + 0.2
