"""Fold-in integrated gradients: the local model is the model, and attributions are faithful.

Every model that has user vectors is trained on the planted clusters (conftest) for a few
epochs, with BCE; GMF and MF also with the full softmax, the fold-in then following that loss,
and MF with its Markov term over the latest items (model.context) too.
A faithful attribution is checked the way the issue asks: refolding the user without the three
history items with the largest weights lowers the folded score more than refolding without
three random ones, for every (user, recommended item) pair tested.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, N_CLUSTERS
from recommender.cli import main
from recommender.config import ModelConfig
from recommender.explain import Attribution, FoldIn, GraphExplainer, GraphUser, UserFold, supports
from recommender.inference import Recommender
from recommender.models import MF, LightGCN, Popularity, build_model
from recommender.utils import RecommenderError

# Epochs that learn the planted clusters in about a second each (no refit stage).
EPOCHS = {"mf": 8, "mlp": 20, "neumf": 6}
# Full-batch Adam steps of the softmax models: they learn the clusters in a tenth of a second.
SOFTMAX_STEPS = 30
USERS = range(0, 160, 20)  # 8 users
TOP = 3  # recommended items explained per user, and history items removed
DRAWS = 10  # random removals averaged per pair
CONTEXT = 3  # latest items of MF's Markov term


@pytest.fixture(scope="module")
def context_run(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MF with the Markov term, trained with the full softmax: the planted data's timestamps
    order each user's items, and its latest items share the user's cluster."""
    out = tmp_path_factory.mktemp("explain") / "mf-context"
    args = ["train", "--data", str(planted_csv), "--model", "mf", "--out", str(out)]
    settings = [*FAST, f"train.epochs={EPOCHS['mf']}", "train.refit=false"]
    settings += [f"model.context={CONTEXT}", "train.loss=softmax"]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    return out


@pytest.fixture(scope="module")
def lightgcn_run(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LightGCN with three layers (where the user's recomputed layers are exact), trained with
    BCE like the models above, so that its scores are probabilities that removals can move."""
    out = tmp_path_factory.mktemp("explain") / "lightgcn"
    args = ["train", "--data", str(planted_csv), "--model", "lightgcn", "--out", str(out)]
    settings = [*FAST, "train.epochs=6", "train.refit=false", "model.layers=3"]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    return out


@pytest.fixture(
    scope="module",
    params=["gmf", "mf", "mlp", "neumf", "gmf-softmax", "mf-softmax", "mf-context", "lightgcn"],
)
def rec(
    request: pytest.FixtureRequest,
    gmf_run: Path,
    planted_csv: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Recommender:
    name, _, variant = request.param.partition("-")
    if variant == "softmax":
        return softmax_trained(Recommender.from_run(gmf_run), name)
    if variant == "context":
        return Recommender.from_run(request.getfixturevalue("context_run"))
    if name == "lightgcn":
        return Recommender.from_run(request.getfixturevalue("lightgcn_run"))
    if name == "gmf":
        return Recommender.from_run(gmf_run)
    out = tmp_path_factory.mktemp("explain") / name
    args = ["train", "--data", str(planted_csv), "--model", name, "--out", str(out)]
    settings = [*FAST, f"train.epochs={EPOCHS[name]}", "train.refit=false"]
    assert main(args + [f"--set={s}" for s in settings]) == 0
    return Recommender.from_run(out)


def softmax_trained(data: Recommender, name: str) -> Recommender:
    """A `name` model trained with the full softmax on `data`'s histories, its run's saved
    config saying so. A short full-batch loop of that loss, so these tests need no trainer."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = ModelConfig(name=name, embedding_dim=16)
        model = build_model(config, len(data.users), len(data.items))
    users = torch.from_numpy(np.repeat(np.arange(len(data.users)), np.diff(data.indptr)))
    items = torch.from_numpy(data.history)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(SOFTMAX_STEPS):
        loss = F.cross_entropy(model.score_all(users), items)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = copy.deepcopy(data.meta)
    meta["config"]["train"]["loss"] = "softmax"
    meta["model_config"] = config.model_dump()
    meta["trained_by"] = "softmax_trained"
    return Recommender(
        model, data.users, data.items, data.indptr, data.history, data.item_counts, meta
    )


def explainer(rec: Recommender) -> FoldIn | GraphExplainer:
    """The explainer serving builds: a FoldIn with the run's training loss and negatives, or
    LightGCN's GraphExplainer."""
    train = rec.meta["config"]["train"]
    if isinstance(rec.model, LightGCN):
        return GraphExplainer(rec.model)
    return FoldIn(rec.model, train["num_negatives"], loss=train["loss"])


def fold_in_only(rec: Recommender) -> None:
    """Skip a test of the fold-in's own machinery for LightGCN, which is explained over its
    graph's edges instead (test_lightgcn_* below)."""
    if isinstance(rec.model, LightGCN):
        pytest.skip("LightGCN is explained over its graph, not by a fold-in")


def explained(rec: Recommender) -> list[tuple[UserFold | GraphUser, torch.Tensor, Attribution]]:
    """(fold-in, recommended item indices, attribution) for each tested user."""
    fold_in = explainer(rec)
    out = []
    for user in USERS:
        user_id = rec.users.to_ids(np.array([user]))[0]
        items, _ = rec.recommend(user_id, k=TOP)
        targets = torch.from_numpy(rec.items.index(items.tolist()))
        fold = fold_in.user(user, rec.history_of(user))
        out.append((fold, targets, fold.attribute(targets)))
    return out


@pytest.fixture(scope="module")
def attributions(rec: Recommender) -> list[tuple[UserFold | GraphUser, torch.Tensor, Attribution]]:
    return explained(rec)


def test_the_local_model_scores_like_the_model(rec: Recommender):
    fold_in_only(rec)
    side = FoldIn(rec.model).side
    users = torch.arange(len(rec.users))
    expected = rec.model.score_all(users)
    torch.testing.assert_close(side.trained_logits(users), expected, atol=1e-4, rtol=1e-4)
    theta = side.trained[:3] + 0.3 * torch.randn(3, side.trained.shape[1])
    theta.requires_grad_(True)
    logits, jacobian = side.jacobian(theta.detach())
    item = 7
    (grad,) = torch.autograd.grad(side.logits(theta)[:, item].sum(), theta)
    torch.testing.assert_close(jacobian[:, item], grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, side.logits(theta.detach()))


def test_no_history_folds_to_the_mean_user(rec: Recommender):
    fold_in_only(rec)
    fold_in = explainer(rec)
    fold = fold_in.user(0, rec.history_of(0))
    theta = fold.fold(torch.zeros(2, len(fold.history)))
    torch.testing.assert_close(theta, fold_in.mean.expand(2, -1), atol=1e-4, rtol=0)


def test_serving_folds_in_with_the_runs_training_loss(rec: Recommender):
    fold_in_only(rec)
    fold_in = rec._fold_in
    assert fold_in is not None
    assert fold_in.loss == rec.meta["config"]["train"]["loss"]


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_the_fold_in_moves_with_alpha_as_its_implicit_derivative(
    rec: Recommender, loss: Literal["bce", "softmax"]
):
    """At the optimum the objective's own (autograd) gradient vanishes, and central differences
    of the fold-in in each alpha_j match -H^-1 g_j, which integrated gradients integrate.

    White-box: the optimum is polished by an exact Newton step, as `attribute` does, since the
    line-searched fold-in stops where float32 can no longer see the objective fall.
    """
    fold_in_only(rec)
    fold = FoldIn(rec.model, loss=loss).user(USERS[1], rec.history_of(USERS[1]))
    n_history, jac = len(fold.history), fold.jacobian
    generator = torch.Generator().manual_seed(0)
    alpha = 0.3 + 0.5 * torch.rand(1, n_history, generator=generator)
    step = 1e-2 * torch.eye(n_history)
    alpha = torch.cat([alpha, alpha + step, alpha - step])  # (1 + 2H, H)
    weights = fold._weights(alpha)
    theta = fold.fold(alpha)
    prob = fold._prob(fold.logits(theta))
    hessian = fold._hessian(weights, prob, jac)
    theta = theta - torch.linalg.solve(hessian, fold._gradient(theta, weights, prob, jac))

    at = theta[:1].clone().requires_grad_(True)
    with torch.enable_grad():
        objective = fold._objective(at, weights[:1], local=True).sum()
        (gradient,) = torch.autograd.grad(objective, at)
    assert float(gradient.abs().max()) < 1e-4

    prob = fold._prob(fold.logits(theta[:1]))
    g = fold._item_gradients(prob)[0]  # (H, D)
    implicit = -torch.linalg.solve(fold._hessian(weights[:1], prob, jac)[0], g.T).T
    central = (theta[1 : 1 + n_history] - theta[1 + n_history :]) / 2e-2  # (H, D)
    scale = float(implicit.abs().max())
    torch.testing.assert_close(central, implicit, atol=1e-3 * scale, rtol=1e-2)


def test_the_folded_user_ranks_items_like_the_trained_one(rec: Recommender, attributions):
    fidelity = np.array([why.fidelity for _, _, why in attributions])
    # The MLP alone leaves many (user, item) pairs on dead ReLUs, a constant score, which its
    # linearised fold-in reproduces less well (measured: 0.90 against 0.96 to 0.98).
    assert fidelity.mean() > (0.85 if rec.model_name == "mlp" else 0.9)
    assert fidelity.min() > 0.5


def test_a_new_user_folded_in_from_a_history_gets_the_trained_users_list(rec: Recommender):
    """Trained users, asked for again as users the run has never seen with their own history
    (in time order, so MF's Markov term reads the same latest items), get lists close to their
    trained ones: every model with user vectors folds a live history in."""
    fold_in_only(rec)  # LightGCN's users come from the graph: a new one gets popularity
    users = rec.users.to_ids(np.arange(0, len(rec.users), 4))  # 40 users
    histories = {f"new-{u}": time_ordered(rec, u) for u in users}
    trained, _ = rec.recommend(users, k=10)
    folded, _ = rec.recommend(list(histories), k=10, histories=histories)
    assert set(rec.representations(list(histories), histories)) == {"folded_in"}
    overlap = [len(set(a) & set(b)) / 10 for a, b in zip(trained, folded, strict=True)]
    # measured: 0.83 to 0.93 on average for the trained runs; the MLP (dead ReLUs, as above)
    # 0.76; the 30-step full-batch softmax models (softmax_trained) 0.75 to 0.77
    floor = {"mlp": 0.65}.get(rec.model_name, 0.7 if softmax_fixture(rec) else 0.75)
    assert np.mean(overlap) > floor, overlap


def softmax_fixture(rec: Recommender) -> bool:
    """Whether `rec` is one of softmax_trained's short full-batch models (no run directory)."""
    return rec.meta.get("trained_by") == "softmax_trained"


def time_ordered(rec: Recommender, user: str) -> list[str]:
    """A trained user's history, oldest first as far as the run knows: their stored latest
    items (MF's Markov term) last, the latest of them at the end."""
    idx = int(rec.users.index([user])[0])
    history = rec.history_of(idx)
    latest = rec.model.latest[idx].numpy() if rec.reads_context else history[:0]
    latest = latest[latest < len(rec.items)][::-1]
    order = np.r_[history[~np.isin(history, latest)], latest]
    return [str(x) for x in rec.items.to_ids(order)]


def test_attributions_sum_to_the_score_change(attributions):
    for _, targets, why in attributions:
        assert why.weights.shape == (len(targets), why.weights.shape[1])
        change = why.score - why.baseline
        np.testing.assert_allclose(why.weights.sum(1), change, rtol=0.02, atol=5e-3)
        assert bool(((why.score > 0) & (why.score < 1)).all())


def flat_mlp(request: pytest.FixtureRequest, rec: Recommender) -> None:
    """Expect (not require) a failure for the seed's MLP alone: trained on the planted data it
    often puts a user's whole cluster on one flat score (every unit of its last layer off), so
    its top items tie and no history item moves their score. Whether more than half the tested
    pairs land there depends on float rounding of the CPU that trains it (seen on two
    machines), not on the explainer: the fidelity and completeness tests still run for it."""
    if rec.model_name == "mlp":
        reason = "the MLP's top items often tie on a flat score (see flat_mlp)"
        request.applymarker(pytest.mark.xfail(reason=reason, strict=False))


def test_removing_the_top_weighted_items_lowers_the_score_most(
    request: pytest.FixtureRequest, rec: Recommender, attributions
):
    flat_mlp(request, rec)
    rng = np.random.default_rng(0)
    gaps, moved = [], []
    for fold, targets, why in attributions:
        n_history = len(fold.history)
        alpha = torch.ones(len(targets) * (1 + DRAWS), n_history)
        for row, top in enumerate(why.weights.topk(TOP, dim=1).indices):
            alpha[row, top] = 0
            for draw in range(DRAWS):
                removed = torch.from_numpy(rng.choice(n_history, TOP, replace=False))
                alpha[len(targets) + row * DRAWS + draw, removed] = 0
        scores = torch.sigmoid(fold.explained_logits(alpha))[:, targets]  # (rows, T)
        full = torch.sigmoid(fold.explained_logits(torch.ones(1, n_history)))[0, targets]
        drop_top = full - scores[: len(targets)].diagonal()
        random = scores[len(targets) :].view(len(targets), DRAWS, len(targets))
        drop_random = full - random.diagonal(dim1=0, dim2=2).mean(0)
        gaps.append(drop_top - drop_random)
        moved.append((why.score - why.baseline).abs() > 0.01)
    # A pair whose score the history does not move (an MLP unit that is dead for every user)
    # has nothing to attribute, so no removal can lower it.
    gap = torch.cat(gaps)[torch.cat(moved)]
    assert len(gap) >= len(USERS) * TOP // 2
    assert bool((gap > 0).all()), gap
    assert float(gap.mean()) > 0.01


def test_supporting_items_share_the_recommended_items_cluster(
    request: pytest.FixtureRequest, rec: Recommender, attributions
):
    flat_mlp(request, rec)
    same = []
    for fold, targets, why in attributions:
        top = fold.history[why.weights.topk(TOP, dim=1).indices]  # (T, TOP) item indices
        same.append((top % N_CLUSTERS == targets[:, None] % N_CLUSTERS).float().mean())
    # Chance is 1 / N_CLUSTERS; items of one cluster share index modulo N_CLUSTERS.
    assert float(torch.stack(same).mean()) > 0.7


def test_attributions_are_deterministic(rec: Recommender, attributions):
    why = attributions[0][2]
    again = explained(rec)[0][2]
    assert torch.equal(why.weights, again.weights)
    assert torch.equal(why.score, again.score) and why.fidelity == again.fidelity


def test_bad_input_is_a_clear_error(rec: Recommender):
    fold_in_only(rec)
    explainer = FoldIn(rec.model)
    with pytest.raises(RecommenderError, match="no history"):
        explainer.user(0, np.array([], dtype=np.int64))
    fold = explainer.user(0, rec.history_of(0))
    with pytest.raises(RecommenderError, match=r"alpha must be \(B, "):
        fold.fold(torch.ones(2, len(fold.history) + 1))
    with pytest.raises(RecommenderError, match=r"alpha must lie in \[0, 1\]"):
        fold.fold(torch.full((1, len(fold.history)), 2.0))
    with pytest.raises(RecommenderError, match="target item indices"):
        fold.attribute(torch.tensor([len(rec.items)]))
    with pytest.raises(RecommenderError, match="path_points must be >= 1"):
        FoldIn(rec.model, path_points=0)
    with pytest.raises(RecommenderError, match="negative_weights"):
        FoldIn(rec.model, negative_weights=torch.ones(3))
    with pytest.raises(RecommenderError, match="loss must be 'bce' or 'softmax'"):
        FoldIn(rec.model, loss="hinge")  # type: ignore[arg-type]


def test_the_markov_term_is_attributed_exactly_to_the_latest_items():
    """An MF whose score is biases plus the Markov term (no item embeddings, so the history
    cannot move the softmax fold-in): each latest item's weight is its share of the Markov
    term times the mean slope of the sigmoid along the path, every other item's is 0, and the
    score is the model's. A latest item outside the history counts neither in the weights nor
    in the score, and the others keep their share (1 / n over all n latest items)."""
    n_items = 30
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = ModelConfig(name="mf", embedding_dim=8, context=CONTEXT)
        model = build_model(config, 4, n_items)
        assert isinstance(model, MF)
        with torch.no_grad():
            model.item_emb.weight.zero_()
            model.item_bias.weight.normal_(std=1.0)
            model.context_emb.weight[:n_items].normal_(std=0.7)
            model.target_emb.weight.normal_(std=0.7)
    pad = n_items
    model.set_latest(np.array([[3, 7, pad], [5, 12, 20], [pad] * 3, [pad] * 3]))
    fold_in = FoldIn(model, loss="softmax")
    context = model.context_emb.weight.detach().double()
    target = model.target_emb.weight.detach().double()
    base = (model.item_bias.weight[:, 0] + model.bias).detach().double()  # the mean user's
    t = torch.linspace(0, 1, 20001, dtype=torch.float64)[:, None]
    # (user, history, its latest items in the history, those not in it)
    cases = [(0, [1, 3, 7, 9], [3, 7], []), (1, [2, 5, 8, 12], [5, 12], [20])]
    for user, history, latest, missing in cases:
        why = fold_in.user(user, np.array(history)).attribute(torch.arange(n_items))
        shares = context[latest] @ target.T / (len(latest) + len(missing))  # (n, N)
        slope = torch.sigmoid(base + t * shares.sum(0))
        mean_slope = torch.trapezoid(slope * (1 - slope), t, dim=0)  # (N,)
        found = torch.tensor([history.index(item) for item in latest])
        expected = (shares * mean_slope).T  # (N, n)
        torch.testing.assert_close(why.weights[:, found].double(), expected, atol=1e-5, rtol=1e-3)
        others = torch.ones(len(history), dtype=torch.bool)
        others[found] = False
        assert float(why.weights[:, others].abs().max()) < 1e-5
        trained = model.score_all(torch.tensor([user]))[0].detach().double()
        left_out = (context[missing] @ target.T / CONTEXT).sum(0)
        torch.testing.assert_close(why.score.double(), torch.sigmoid(trained - left_out))
        torch.testing.assert_close(why.baseline.double(), torch.sigmoid(base))
        if not missing:  # the folded user is the trained one
            assert why.fidelity > 0.999


def test_a_latest_item_that_predicts_an_item_supports_it_most(context_run: Path):
    """On the trained MF with context, one of a user's latest items is made to predict an
    item of another cluster (its target embedding along the item's context embedding): that
    latest item becomes the item's top supporting item in serving's explanation, which it is
    not before."""
    rec = Recommender.from_run(context_run)
    model = copy.deepcopy(rec.model)
    assert isinstance(model, MF)
    user = USERS[1]
    history = rec.history_of(user)
    latest = int(model.latest[user, 0])
    target = next(
        item
        for item in range(len(rec.items))
        if item % N_CLUSTERS != latest % N_CLUSTERS and item not in history
    )
    user_id = rec.users.to_ids(np.array([user]))[0]
    item_id, latest_id = rec.items.to_ids(np.array([target, latest]))
    before = rec.explain(user_id, item_id, n=1)
    with torch.no_grad():
        context = model.context_emb.weight[latest]
        model.target_emb.weight[target] = 6 * CONTEXT * context / context.dot(context)
    changed = Recommender(
        model, rec.users, rec.items, rec.indptr, rec.history, rec.item_counts, rec.meta
    )
    after = changed.explain(user_id, item_id, n=1)
    assert before.supporting_items[:1] != [str(latest_id)]
    assert after.supporting_items[:1] == [str(latest_id)]
    assert after.score is not None and before.score is not None
    assert after.score > before.score


def test_popularity_has_nothing_to_fold_in():
    model = Popularity(4, 5)
    assert not supports(model)
    with pytest.raises(RecommenderError, match="Popularity has no user vector"):
        FoldIn(model)


@pytest.mark.parametrize("layers", [1, 3])
def test_lightgcn_user_layers_are_the_propagation_with_its_edges_reweighted(layers: int):
    """Up to three layers, the user's recomputed representation is exactly that of a whole-graph
    propagation whose user-edge entries are scaled by alpha; alpha = 1 is the model's score."""
    rng = np.random.default_rng(0)
    n_users, n_items = 6, 9
    cells = rng.choice(n_users * n_items, 25, replace=False)
    users, items = cells // n_items, cells % n_items
    torch.manual_seed(0)
    model = LightGCN(n_users, n_items, dim=4, layers=layers)
    model.set_graph(users, items)
    user = int(users[0])
    history = np.sort(items[users == user])
    fold = GraphExplainer(model).user(user, history)
    alpha = torch.rand(3, len(history), generator=torch.Generator().manual_seed(1))
    alpha[0] = 1.0
    r = model.adjacency()[0].to_dense()
    with torch.no_grad():
        expected = []
        for row in alpha:
            scaled = r.clone()
            scaled[user, torch.from_numpy(history)] *= row
            u, i = model.user_emb.weight, model.item_emb.weight
            total = u[user].clone()
            for _ in range(layers):
                u, i = scaled @ i, scaled.T @ u
                total = total + u[user]
            expected.append(total / (layers + 1) @ model.propagate()[1].T)
    torch.testing.assert_close(fold.explained_logits(alpha), torch.stack(expected))
    torch.testing.assert_close(
        fold.explained_logits(alpha[:1])[0], model.score_all(torch.tensor([user]))[0].detach()
    )


def test_lightgcn_explanations_are_served(lightgcn_run: Path):
    rec = Recommender.from_run(lightgcn_run)
    user_id = rec.users.to_ids(np.array([USERS[1]]))[0]
    items, _ = rec.recommend(user_id, k=3)
    for why in rec.explain_many(user_id, items, n=3):
        assert why.method != "popularity" and why.supporting_items
        assert why.fidelity is not None and why.fidelity > 0.999
