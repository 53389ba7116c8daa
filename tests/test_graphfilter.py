"""GraphFilter: the filter against its dense formula, linearity in the history, learning the
planted clusters, exact explanations, new users, a checkpoint round trip and the CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import planted_frame, run_cli, write_lightgcn_split
from ranking_fixtures import hit_rate, planted_split, popularity_hit_rate
from recommender.config import Config
from recommender.data.interactions import Interactions
from recommender.explain import FilterExplainer
from recommender.inference import FOLDED_IN, Recommender
from recommender.models import graphfilter, ials
from recommender.models.graphfilter import GraphFilter
from recommender.serving.app import create_app

# users 0..3, items 0..4; item 4 has no edge
USERS, ITEMS = np.array([0, 0, 1, 1, 2, 2, 3]), np.array([0, 1, 1, 2, 2, 3, 0])


def tiny(rank: int = 2, sharpen: float = 0.5, degree_power: float = 0.2) -> GraphFilter:
    model = GraphFilter(4, 5, rank, ideal_weight=0.7, sharpen=sharpen, degree_power=degree_power)
    model.set_graph(USERS, ITEMS)
    return model.fit()


def dense_scores(model: GraphFilter) -> torch.Tensor:
    """The module doc's formula with a dense P and an exact SVD."""
    r = torch.zeros(4, 5)
    r[USERS, ITEMS] = 1.0
    d_user, d_item = r.sum(1), r.sum(0)
    inv = torch.where(d_item > 0, d_item.rsqrt(), 0.0)
    norm = d_user.rsqrt()[:, None] * r * inv[None, :]
    p = norm.T @ norm
    v = torch.linalg.svd(norm).Vh[: model.basis.shape[1]].T
    ideal = (inv[:, None] * v) @ (v.T * d_item.sqrt()[None, :])
    filt = (p + model.ideal_weight * ideal) @ (torch.eye(5) - model.sharpen * p)
    return (r @ filt) * d_item.clamp(min=1) ** model.degree_power


@pytest.mark.parametrize("dense", [True, False])
def test_the_filter_matches_its_dense_formula(monkeypatch: pytest.MonkeyPatch, dense: bool):
    if not dense:  # the sparse path of large catalogs: two sparse products, P never formed
        monkeypatch.setattr(graphfilter, "DENSE_ITEMS", 0)
    model = tiny()
    torch.testing.assert_close(model.score_all(torch.arange(4)), dense_scores(model))
    # pairs, and (B, K) items, agree with the catalog scores
    catalog = model.score_all(torch.arange(4))
    users, items = torch.tensor([2, 0, 2]), torch.tensor([3, 1, 4])
    torch.testing.assert_close(model(users, items), catalog[users, items])
    grid = torch.tensor([[0, 4], [1, 2], [3, 3]])
    torch.testing.assert_close(model(users, grid), catalog[users[:, None], grid])


def test_scores_are_linear_in_the_history():
    model = tiny()
    a, b = torch.zeros(1, 5), torch.zeros(1, 5)
    a[0, [0, 2]], b[0, 3] = 1.0, 1.0
    torch.testing.assert_close(model.filter(a + b), model.filter(a) + model.filter(b))


def test_a_checkpoint_rebuilds_identical_scores():
    model = tiny()
    assert set(model.state_dict()) == {"edges", "basis", "spectrum", "item_factors", "als_scale"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = GraphFilter(4, 5, 2, ideal_weight=0.7, sharpen=0.5, degree_power=0.2)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    every = torch.arange(4)
    torch.testing.assert_close(rebuilt.score_all(every), model.score_all(every), rtol=0, atol=0)
    # a run written before the ALS term (no ALS buffers) loads as the filter alone
    older = {k: v for k, v in model.state_dict().items() if k in ("edges", "basis", "spectrum")}
    rebuilt = GraphFilter(4, 5, 2, ideal_weight=0.7, sharpen=0.5, degree_power=0.2)
    rebuilt.load_state_dict(older)
    torch.testing.assert_close(rebuilt.score_all(every), model.score_all(every), rtol=0, atol=0)


def test_rank_is_capped_by_the_matrix_and_zero_leaves_the_ideal_filter_out():
    assert tiny(rank=50).basis.shape == (5, 3)  # min(users, items) - 1
    plain = tiny(rank=0, sharpen=0.0, degree_power=0.0)
    r = torch.zeros(4, 5)
    r[USERS, ITEMS] = 1.0
    torch.testing.assert_close(plain.score_all(torch.arange(4)), plain.smooth(r))


def test_the_graph_filter_ranks_the_planted_clusters():
    history, held = planted_split()
    model = GraphFilter(history.n_users, history.n_items, rank=8)
    model.set_graph(history.user_idx, history.item_idx)
    ours, baseline = hit_rate(model.fit(), history, held), popularity_hit_rate(history, held)
    assert ours > baseline + 0.25, (ours, baseline)


def test_explanations_are_the_exact_shares_of_the_history():
    history, _ = planted_split()
    model = GraphFilter(history.n_users, history.n_items, rank=8)
    model.set_graph(history.user_idx, history.item_idx)
    model.fit()
    user = 3
    seen = np.sort(history.item_idx[history.user_idx == user])
    targets = torch.topk(model.score_all(torch.tensor([user]))[0], 5).indices
    why = FilterExplainer(model).user(user, seen).attribute(targets)
    torch.testing.assert_close(why.weights.sum(1), why.score - why.baseline)
    assert why.fidelity is not None and why.fidelity > 0.999
    # removing the top-weighted history item lowers the score more than removing any other
    rows = torch.zeros(len(seen), model.n_items)
    rows[:, torch.from_numpy(seen)] = 1.0
    rows[torch.arange(len(seen)), torch.from_numpy(seen)] = 0.0  # row j: history without j
    without = model.filter(rows)[:, targets]  # (H, T)
    for t in range(len(targets)):
        assert int(torch.argmin(without[:, t])) == int(torch.argmax(why.weights[t]))


def test_the_preset_scores_a_new_users_history_as_the_trained_users(tmp_path: Path, capsys):
    train, test = write_lightgcn_split(planted_frame(), tmp_path / "data")
    out = tmp_path / "run"
    preset = Path(__file__).parents[1] / "configs" / "full-ranking.yaml"
    args = ["train", "--train", str(train), "--test", str(test), "--config", str(preset)]
    code, _, err = run_cli([*args, "--set=model.rank=8", "--out", str(out)], capsys)
    assert code == 0, err
    rec = Recommender.from_run(out)
    user = rec.users.to_ids(np.array([5]))[0]
    history = [str(x) for x in rec.user_history(user)]
    trained = rec.recommend(user, k=10)
    folded = rec.recommend("someone new", k=10, histories={"someone new": history})
    assert rec.representations(["someone new"], {"someone new": history})[0] == FOLDED_IN
    assert list(folded[0]) == list(trained[0])
    np.testing.assert_allclose(folded[1], trained[1], rtol=1e-5)
    for why in rec.explain_many(user, list(trained[0][:3])):
        assert why.method == FilterExplainer.method and why.supporting_items
    for why in rec.explain_many("someone new", list(folded[0][:3]), history=history):
        assert why.supporting_items and why.fidelity is None

    # the service: a trained user, the same history as a new user, a session, similar items
    with TestClient(create_app(out)) as client:
        body = {"user_ids": [user, "new"], "histories": {"new": history}, "k": 5, "explain": True}
        results = client.post("/v1/recommendations", json=body).json()["results"]
        session = client.post("/v1/recommendations", json={"session_item_ids": history[:2]})
        similar = client.get(f"/v1/items/{history[0]}/similar?k=3")
    assert [r["representation"] for r in results] == ["trained", "folded_in"]
    assert [i["item_id"] for i in results[1]["items"]] == list(trained[0][:5])
    assert results[1]["items"][0]["explanation"]["method"] == FilterExplainer.method
    assert session.status_code == 200 and session.json()["results"][0]["items"]
    assert similar.status_code == 200 and len(similar.json()["items"]) == 3

    code, stdout, err = run_cli(["evaluate", "--run", str(out), "--json"], capsys)
    assert code == 0, err
    metrics = json.loads(stdout)["results"]
    assert metrics["graphfilter/full"]["metrics"]["recall@20"] > (
        metrics["popularity/full"]["metrics"]["recall@20"] + 0.2
    )


def test_its_settings_stay_out_of_other_models_digests():
    mf = Config.model_validate({"model": {"name": "mf"}})
    changed = Config.model_validate({"model": {"name": "mf", "rank": 8, "sharpen": 0.0}})
    assert mf.training_digest() == changed.training_digest()
    gf = Config.model_validate({"model": {"name": "graphfilter"}})
    other = Config.model_validate({"model": {"name": "graphfilter", "sharpen": 0.0}})
    assert gf.training_digest() != other.training_digest()


def with_als(history: Interactions, weight: float = 1.0) -> GraphFilter:
    model = GraphFilter(
        history.n_users, history.n_items, rank=8, als_weight=weight, factors=8, als_reg=1.0
    )
    model.set_graph(history.user_idx, history.item_idx)
    return model.fit()


def test_a_users_als_vector_is_the_exact_optimum_of_their_history():
    """UserSystems against the normal equations solved densely, one row at a time: histories of
    different lengths in one batch (padding), weights other than 1, and an empty row."""
    torch.manual_seed(0)
    y = torch.randn(9, 3)
    rows = torch.zeros(4, 9)
    rows[0, [1, 4]] = 1.0
    rows[1, [0, 2, 3, 5, 6, 8]] = 1.0
    rows[2, [7]] = 2.0
    reg, alpha = 0.5, 4.0
    solved = ials.UserSystems(rows, y, reg, alpha).user_vectors()
    kept = ials.UserSystems(rows, y, reg, alpha, ials.item_gram(y, reg)).user_vectors()
    torch.testing.assert_close(kept, solved, rtol=0, atol=0)  # a kept Gram changes nothing
    for r in range(4):
        w = rows[r]
        a = y.T @ y + reg * torch.eye(3) + alpha * (y.T * w) @ y
        torch.testing.assert_close(solved[r], torch.linalg.solve(a, (1 + alpha) * (y.T @ w)))
    assert torch.equal(solved[3], torch.zeros(3))


def test_als_alone_learns_the_planted_clusters():
    history, held = planted_split()
    users, items = (torch.from_numpy(a) for a in (history.user_idx, history.item_idx))
    y = ials.fit_item_factors(users, items, history.n_users, history.n_items, 8, 1.0, 10.0, 8)
    rows = GraphFilter(history.n_users, history.n_items)
    rows.set_graph(history.user_idx, history.item_idx)
    history_rows = rows.history_rows(torch.arange(history.n_users))
    scores = ials.UserSystems(history_rows, y, 1.0, 10.0).user_vectors() @ y.T
    ours, baseline = hit_rate(scores, history, held), popularity_hit_rate(history, held)
    assert ours > baseline + 0.25, (ours, baseline)
    again = ials.fit_item_factors(users, items, history.n_users, history.n_items, 8, 1.0, 10.0, 8)
    assert torch.equal(again, y)  # a fixed-seed start: the same pairs give the same factors


def test_the_als_term_is_scaled_to_the_filter_and_weighed():
    history, _ = planted_split()
    alone, half, full = (with_als(history, w) for w in (0.0, 0.5, 1.0))
    assert alone.item_factors.shape == (history.n_items, 0) and float(alone.als_scale) == 0.0
    torch.testing.assert_close(half.als_scale * 2, full.als_scale)
    rows = full.history_rows(torch.arange(history.n_users))
    filtered = full.filter(rows)
    assert (filtered < 0).any()  # the sharpening pushes some items below zero ...
    als = full.score_rows(rows) - filtered.clamp_min(0)  # ... where, beside ALS, it is floored
    torch.testing.assert_close(als, full.als_scale * full._als(rows))
    torch.testing.assert_close(als.std(1).mean(), filtered.std(1).mean(), rtol=0.2, atol=0)


def test_with_als_new_users_checkpoints_and_explanations_stay_exact():
    history, held = planted_split()
    model = with_als(history)
    every = torch.arange(history.n_users)
    assert hit_rate(model, history, held) > popularity_hit_rate(history, held) + 0.25
    assert set(model.state_dict()) == {"edges", "basis", "spectrum", "item_factors", "als_scale"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = GraphFilter(
        history.n_users, history.n_items, 8, als_weight=1.0, factors=8, als_reg=1.0
    )
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(rebuilt.score_all(every), model.score_all(every), rtol=0, atol=0)

    user = 3
    seen = np.sort(history.item_idx[history.user_idx == user])
    trained = model.score_all(torch.tensor([user]))[0]
    explainer = FilterExplainer(model)
    torch.testing.assert_close(explainer.new_users([seen])[0], trained)
    floored = (model.filter(model.history_rows(torch.tensor([user])))[0] <= 0).nonzero()[:3, 0]
    targets = torch.cat([torch.topk(trained, 5).indices, floored])  # shares of floored items too
    why = explainer.user(user, seen).attribute(targets)
    torch.testing.assert_close(why.weights.sum(1), why.score - why.baseline)
    torch.testing.assert_close(why.score, torch.sigmoid(trained[targets]))
    assert why.fidelity is not None and why.fidelity > 0.999
