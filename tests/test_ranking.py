"""Ranking objectives and LightGCN through the real Trainer and CLI: every loss learns the planted
clusters with every model it applies to, a loss builds only the sampler it uses, LightGCN
trains on each stage's own graph, resumes exactly, and serves from its checkpoint alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST, run_cli
from recommender.checkpoint import load_checkpoint
from recommender.config import load_config
from recommender.data.pipeline import DataBundle, load_data
from recommender.data.sampling import PoolSampler
from recommender.evaluate import evaluate_full
from recommender.losses import bpr, sampled_softmax
from recommender.models import GMF, MF, MLP, LightGCN, NeuMF, Popularity
from recommender.objective import Objective
from recommender.train import Trainer

# Positives only per row: small batches, so a few epochs hold enough steps.
RANKING = [*FAST, "train.batch_size=64", "train.refit=false", "train.pool_size=32"]
RANKING += ["train.num_negatives=4", "train.pretrain.enabled=false", "model.layers=2"]
# The tower alone learns the clusters slower: more steps, no dropout.
MLP_SETS = ["train.lr=0.01", "train.epochs=12", "model.dropout=0"]
CASES = {
    "mf-bpr": ("mf", ["train.loss=bpr"]),
    "mf-ccl": ("mf", ["train.loss=ccl", "train.ccl_margin=0.5", "train.ccl_neg_weight=2"]),
    "mf-sampled_softmax": ("mf", ["train.loss=sampled_softmax"]),
    "mf-sampled_softmax-popularity": (
        "mf",
        ["train.loss=sampled_softmax", "train.pool=popularity"],
    ),
    "gmf-sampled_softmax-in_batch": ("gmf", ["train.loss=sampled_softmax", "train.pool=in_batch"]),
    "gmf-bpr": ("gmf", ["train.loss=bpr"]),
    "mlp-sampled_softmax": ("mlp", ["train.loss=sampled_softmax", *MLP_SETS]),
    "mlp-bpr": ("mlp", ["train.loss=bpr", *MLP_SETS]),
    "neumf-sampled_softmax-mix": ("neumf", ["train.loss=sampled_softmax", "train.pool=mix"]),
    "neumf-bpr": ("neumf", ["train.loss=bpr", "train.lr=0.01"]),
    "lightgcn-bpr": ("lightgcn", ["train.loss=bpr"]),
    "lightgcn-bce": ("lightgcn", ["train.loss=bce", "train.batch_size=512"]),
    "lightgcn-softmax": ("lightgcn", ["train.loss=softmax"]),
    "lightgcn-sampled_softmax": ("lightgcn", ["train.loss=sampled_softmax"]),
    "lightgcn-ccl": ("lightgcn", ["train.loss=ccl", "train.ccl_margin=0.5"]),
}


def config(planted_csv: Path, model: str, *sets: str):
    return load_config(
        None,
        [*RANKING, "train.epochs=6", "data.dataset=null", f"data.path={planted_csv}",
         f"model.name={model}", *sets],
    )  # fmt: skip


@pytest.fixture(scope="module")
def data(planted_csv: Path) -> DataBundle:
    cfg = config(planted_csv, "mf")
    return load_data(cfg.data, cfg.seed)


def hr10(model, data: DataBundle, history=None) -> float:
    history = data.train if history is None else history
    return evaluate_full(model, history, data.valid, [10]).metrics["hr@10"]


@pytest.mark.parametrize("case", list(CASES))
def test_each_loss_learns_the_planted_clusters(
    case: str, planted_csv: Path, data: DataBundle, tmp_path: Path
):
    model_name, sets = CASES[case]
    cfg = config(planted_csv, model_name, *sets)
    trainer = Trainer(cfg, data, tmp_path, torch.device("cpu"))
    model = trainer.fit()
    source = trainer._epoch_source("train")
    # only the sampler the loss uses: negatives per positive, or a pool, or neither
    assert (source.sampler is not None) == (cfg.train.loss in ("bce", "bpr", "ccl"))
    assert (source.objective.pool is not None) == (cfg.train.loss == "sampled_softmax")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rows = len(data.train) * (1 + cfg.train.num_negatives if cfg.train.loss == "bce" else 1)
    assert all(r["train_samples"] == rows for r in records)
    popularity = Popularity(len(data.users), len(data.items)).fit(data.train.item_counts())
    ours, baseline = hr10(model, data), hr10(popularity, data)
    assert ours > baseline + 0.25, (ours, baseline)


def test_a_softmax_run_builds_no_sampler(planted_csv: Path, data: DataBundle, tmp_path: Path):
    cfg = config(planted_csv, "mf", "train.loss=softmax")
    trainer = Trainer(cfg, data, tmp_path, torch.device("cpu"))
    assert trainer._epoch_source("train").sampler is None


def test_the_pool_is_scored_as_the_loss_says():
    """Every model scores a pool shared by the batch (one matmul for the dot products, the
    first layer's item half once for the towers) as it scores each row's own items: the loss
    is losses.sampled_softmax of the pair scores, logQ on the negatives only for a pool drawn
    apart from the positives, on both sides for the batch's own positives."""
    torch.manual_seed(0)
    u, i = torch.tensor([0, 1, 2, 1]), torch.tensor([3, 5, 3, 0])
    counts = torch.tensor([4.0, 1.0, 2.0, 6.0, 0.0, 3.0])
    graph = LightGCN(3, 6, dim=4, layers=1)
    graph.set_graph(np.array([0, 1, 2, 2]), np.array([1, 2, 3, 5]))
    models = (
        MF(3, 6, 4), MF(3, 6, 4, context=2), MF(3, 6, 4, cosine=True), GMF(3, 6, 4), graph,
        MLP(3, 6, [8, 4], 0.0), NeuMF(3, 6, 4, [8, 4], 0.0),
    )  # fmt: skip
    for model in models:
        for in_batch in (False, True):
            pool = PoolSampler(counts, 5, in_batch=in_batch)
            objective = Objective("sampled_softmax", pool=pool)
            got = objective(model, u, i, i, generator=torch.Generator().manual_seed(1))
            items, log_q = pool.sample(i, torch.Generator().manual_seed(1))
            scores = model(u, torch.cat([i[:, None], items.expand(4, -1)], 1))
            log_q_pos = pool.log_q(i, 4) if in_batch else None
            expected = sampled_softmax(
                scores[:, 0], scores[:, 1:], log_q_pos=log_q_pos, log_q_neg=log_q,
                pos_items=i, neg_items=items,
            )  # fmt: skip
            torch.testing.assert_close(got, expected)


def test_bpr_pairs_each_positive_with_its_own_negatives():
    torch.manual_seed(0)
    model = LightGCN(3, 6, dim=4, layers=1)
    model.set_graph(np.array([0, 1, 2, 2]), np.array([1, 2, 3, 5]))
    u, i, neg = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([[0, 4], [2, 2]])
    got = Objective("bpr", num_negatives=2, embedding_l2=0.1)(model, u, i, neg)
    scores = model.score_all(u)
    users, items = model.user_emb.weight, model.item_emb.weight
    l2 = 0.5 * (users[u].pow(2).sum(1) + items[i].pow(2).sum(1) + items[neg].pow(2).sum(2).mean(1))
    expected = bpr(scores.gather(1, i[:, None])[:, 0], scores.gather(1, neg)) + 0.1 * l2.mean()
    torch.testing.assert_close(got, expected)


def test_lightgcn_trains_on_each_stages_own_graph(planted_csv: Path, data: DataBundle, tmp_path):
    cfg = config(planted_csv, "lightgcn", "train.loss=bpr", "train.refit=true", "train.epochs=2")
    trainer = Trainer(cfg, data, tmp_path, torch.device("cpu"))
    final = trainer.fit()
    assert isinstance(final, LightGCN)

    def pairs(edges: torch.Tensor) -> set[tuple[int, int]]:
        return set(map(tuple, edges.T.tolist()))

    select = trainer.completed["select/lightgcn"]["state_dict"]["edges"]
    expected = {(u, i) for u, i in zip(data.train.user_idx, data.train.item_idx, strict=True)}
    assert pairs(select) == expected  # selection: no validation pair in the graph
    full = data.train_full
    assert pairs(final.edges) == set(
        zip(full.user_idx.tolist(), full.item_idx.tolist(), strict=True)
    )


def test_lightgcn_serves_from_its_checkpoint_alone(planted_csv: Path, tmp_path: Path, capsys):
    pytest.importorskip("faiss")
    from recommender.inference import Recommender
    from recommender.serving.retrieval import TwoStageRetriever

    out = tmp_path / "run"
    sets = [*RANKING, "train.epochs=3", "train.loss=sampled_softmax", "train.pool=mix"]
    args = ["train", "--data", str(planted_csv), "--model", "lightgcn", "--out", str(out)]
    code, _, err = run_cli(args + [f"--set={s}" for s in sets], capsys)
    assert code == 0, err
    best = load_checkpoint(out / "best.pt")  # weights_only: the graph is a plain tensor
    assert best["state_dict"]["edges"].shape[0] == 2
    rec = Recommender.from_run(out)
    assert isinstance(rec.model, LightGCN)
    every = torch.arange(len(rec.users))
    users, items = rec.model.retrieval_vectors()
    torch.testing.assert_close(users @ items.T, rec.model.score_all(every))
    retriever = TwoStageRetriever(rec.model, candidates=len(rec.items), nprobe=1000)
    ids = rec.users.to_ids(np.arange(5))
    two_stage, _ = rec.recommend(ids, k=10, retriever=retriever)
    exact, _ = rec.recommend(ids, k=10)
    assert two_stage.tolist() == exact.tolist()


def test_a_ccl_run_scores_by_cosine_after_loading(planted_csv: Path, tmp_path: Path, capsys):
    from recommender.inference import Recommender

    out = tmp_path / "run"
    sets = [*RANKING, "train.epochs=2", "train.loss=ccl"]
    args = ["train", "--data", str(planted_csv), "--model", "mf", "--out", str(out)]
    assert run_cli(args + [f"--set={s}" for s in sets], capsys)[0] == 0
    model = Recommender.from_run(out).model
    assert isinstance(model, MF) and model.cosine
    scores = model.score_all(torch.arange(4)).detach()
    assert float(scores.abs().max()) <= 1 + 1e-5


@pytest.mark.slow
def test_lightgcn_resumes_exactly(planted_csv: Path, tmp_path: Path, monkeypatch, capsys):
    """Killed after its 2nd epoch and resumed: the same records and weights as a run never
    stopped, the pool's draws (train.pool=mix) included."""
    sets = [*RANKING, "train.epochs=3", "train.refit=true", "train.loss=sampled_softmax"]
    sets += ["train.pool=mix"]

    def args(out: Path) -> list[str]:
        cli = ["train", "--data", str(planted_csv), "--model", "lightgcn", "--out", str(out)]
        return cli + [f"--set={s}" for s in sets]

    assert run_cli(args(tmp_path / "whole"), capsys)[0] == 0
    calls = {"n": 0}
    original = Trainer.train_epoch

    def killed(self, *a, **kw):
        result = original(self, *a, **kw)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Trainer, "train_epoch", killed)
    assert run_cli(args(tmp_path / "run"), capsys)[0] == 130
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert run_cli([*args(tmp_path / "run"), "--resume"], capsys)[0] == 0

    def records(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        timing = {"train_seconds", "samples_per_second"}
        return [{k: v for k, v in json.loads(x).items() if k not in timing} for x in lines]

    assert records(tmp_path / "run") == records(tmp_path / "whole")
    for name, key in (("best.pt", "state_dict"), ("last.pt", "model")):
        expected = load_checkpoint(tmp_path / "whole" / name)[key]
        got = load_checkpoint(tmp_path / "run" / name)[key]
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[k], got[k]) for k in expected), name
