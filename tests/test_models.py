"""One contract run against every model: shapes, score_all == forward, gradients; NeuMF fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recommender.config import ModelConfig
from recommender.models import GMF, MF, MLP, NeuMF, Popularity, RecModel, base, build_model
from recommender.models import mlp as mlp_module

N_USERS, N_ITEMS = 9, 13
MODELS = ["gmf", "mlp", "neumf", "mf", "mf-context", "popularity"]
# Each user's latest items for "mf-context" (MF with model.context=2); N_ITEMS pads a slot.
LATEST = np.array([[u % N_ITEMS, (3 * u + 1) % N_ITEMS] for u in range(N_USERS)])
LATEST[0, 1] = LATEST[5] = N_ITEMS  # one user with a single latest item, one with none


def make(name: str, seed: int = 0, **kw) -> RecModel:
    torch.manual_seed(seed)
    if name == "mf-context":
        name, kw = "mf", {"context": 2, **kw}
    cfg = ModelConfig(name=name, embedding_dim=6, mlp_layers=[8, 6, 4], **kw)
    model = build_model(cfg, N_USERS, N_ITEMS)
    if isinstance(model, Popularity):
        model.fit(np.arange(N_ITEMS) % 5)
    else:
        # Non-trivial weights everywhere, so the checks below are not passed by zeros.
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.5)
        if isinstance(model, MF) and model.context:
            model.set_latest(LATEST)
    return model.eval()


def all_pairs() -> tuple[torch.Tensor, torch.Tensor]:
    users = torch.arange(N_USERS).repeat_interleave(N_ITEMS)
    items = torch.arange(N_ITEMS).repeat(N_USERS)
    return users, items


def test_build_model_types():
    expected = {"gmf": GMF, "mlp": MLP, "neumf": NeuMF, "mf": MF, "popularity": Popularity}
    for name, cls in expected.items():
        model = make(name)
        assert type(model) is cls
        assert (model.n_users, model.n_items) == (N_USERS, N_ITEMS)


@pytest.mark.parametrize("name", MODELS)
def test_forward_shape_and_logits(name: str):
    model = make(name)
    users = torch.tensor([0, 3, 8, 3])
    items = torch.tensor([12, 0, 5, 5])
    out = model(users, items)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    if name != "popularity":
        # Logits, not probabilities: the network applies no sigmoid.
        assert (out < 0).any() or (out > 1).any()


@pytest.mark.parametrize("name", MODELS)
def test_score_all_equals_forward_over_every_pair(name: str):
    model = make(name)
    users, items = all_pairs()
    with torch.no_grad():
        expected = model(users, items).view(N_USERS, N_ITEMS)
        got = model.score_all(torch.arange(N_USERS))
        subset = model.score_all(torch.tensor([4, 1]), model.item_cache())
    assert got.shape == (N_USERS, N_ITEMS)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(subset, expected[[4, 1]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_score_all_in_chunks_is_the_same(name: str, monkeypatch: pytest.MonkeyPatch):
    model = make(name)
    with torch.no_grad():
        whole = model.score_all(torch.arange(N_USERS))
        monkeypatch.setattr(base, "SCORE_BUDGET", 2 * N_ITEMS * model.pair_width)
        # MLP towers also tile the catalog: 3 items per tile leaves a ragged last tile
        monkeypatch.setattr(mlp_module, "SCORE_TILE", 2 * 3 * model.pair_width)
        chunked = model.score_all(torch.arange(N_USERS))
    torch.testing.assert_close(chunked, whole)


@pytest.mark.parametrize("name", ["mlp", "neumf"])
def test_many_items_a_row_score_the_same_in_chunks(name: str, monkeypatch: pytest.MonkeyPatch):
    """MLPTower.scores takes rows CHUNK_FLOATS activations at a time (a pool, or K items a
    row): the scores and every gradient are the one-pass ones, and match pair by pair."""
    model = make(name, dropout=0.0).train()  # no dropout: the chunks must agree exactly
    users, own = torch.tensor([0, 3, 8, 3, 5]), torch.tensor([12, 0, 5, 5, 1])
    pool, many = torch.tensor([2, 7, 12]), torch.tensor([[1, 4], [0, 2], [3, 3], [9, 5], [6, 7]])

    def run() -> list[torch.Tensor]:
        model.zero_grad()
        pooled, rows = model(users, own, pool=pool), model(users, many)
        shared = model(users, pool[None, :])  # (1, K) items for every row
        (pooled.sum() + rows.sum() + shared.pow(2).sum()).backward()
        return [pooled, rows, shared, *(p.grad.clone() for p in model.parameters())]

    whole = run()
    monkeypatch.setattr(mlp_module, "CHUNK_FLOATS", 2 * 4 * model.pair_width)  # ragged chunks
    for got, expected in zip(run(), whole, strict=True):
        torch.testing.assert_close(got, expected)
    scored = (torch.cat([own[:, None], pool.expand(5, 3)], 1), many, pool.expand(5, 3))
    for got, items in zip(whole[:3], scored, strict=True):  # each row's items, pair by pair
        k = items.shape[1]
        pairs = model(users.repeat_interleave(k), items.flatten())
        torch.testing.assert_close(got, pairs.view(5, k))


def test_sparse_tower_tables_give_sparse_gradients():
    """A tower's table no larger than the batch is projected whole (mlp._project), unless its
    gradient must be sparse."""
    model = build_model(ModelConfig(name="mlp", mlp_layers=[8, 4]), N_USERS, N_ITEMS, sparse=True)
    users, items = all_pairs()  # more rows than either table has
    model(users, items).sum().backward()
    assert model.tower.user_emb.weight.grad.is_sparse
    assert model.tower.item_emb.weight.grad.is_sparse


@pytest.mark.parametrize("name", ["gmf", "mlp", "neumf", "mf", "mf-context"])
def test_every_parameter_gets_a_gradient(name: str):
    model = make(name).train()
    users, items = all_pairs()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        model(users, items), (items % 2).float()
    )
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_popularity_has_no_parameters_and_ranks_by_count():
    model = make("popularity")
    assert not list(model.parameters())
    scores = model.score_all(torch.tensor([0, 5]))
    assert torch.equal(scores[0], scores[1])
    counts = np.arange(N_ITEMS) % 5
    assert int(scores[0].argmax()) in np.flatnonzero(counts == counts.max())
    assert "log_counts" in model.state_dict()


@pytest.mark.parametrize("name", ["gmf", "mlp", "neumf", "mf"])
def test_item_representation_shape(name: str):
    rep = make(name).item_representation()
    assert rep is not None and rep.shape[0] == N_ITEMS and rep.ndim == 2
    assert make("popularity").item_representation() is None


@pytest.mark.parametrize("name", ["gmf", "mf", "mf-context"])
def test_retrieval_vectors_rank_like_the_model(name: str):
    # For GMF and MF the dot product differs from the score by a per-user constant only.
    model = make(name)
    with torch.no_grad():
        users, items = model.retrieval_vectors()
        diff = model.score_all(torch.arange(N_USERS)) - users @ items.T
    torch.testing.assert_close(diff, diff[:, :1].expand_as(diff), rtol=1e-5, atol=1e-5)


def test_mlp_first_layer_sees_the_concatenation():
    model = make("mlp")
    assert model.tower.user_emb.embedding_dim == 4  # mlp_layers[0] / 2
    assert model.tower.first.in_features == 8
    widths = [model.tower.first.out_features] + [lin.out_features for lin in model.tower.linears]
    assert widths == [6, 4]
    assert model.out.in_features == 4


def test_dropout_only_in_training_mode():
    model = make("mlp", dropout=0.5)
    users, items = all_pairs()
    with torch.no_grad():
        a, b = model(users, items), model(users, items)
        assert torch.equal(a, b)
        model.train()
        torch.manual_seed(0)
        c = model(users, items)
    assert not torch.equal(a, c)


def test_tower_dropout_is_relu_then_inverted_dropout():
    """The tower's own dropout (faster than nn.Dropout on CPU) keeps each unit with probability
    1 - p (p rounded to 1 / 256), scales kept ones by the inverse of that probability, and
    passes gradients only where ReLU and the mask both let the unit through."""
    tower = make("mlp", dropout=0.2).tower
    tower.train()
    h = torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(0)
    out = tower._drop(h)
    positive = h.detach() > 0
    kept = out.detach() != 0
    assert not (kept & ~positive).any()  # ReLU first
    scale = 256 / (256 - round(0.2 * 256))  # 1 / 0.8 to 2e-3
    torch.testing.assert_close(out[kept], h[kept] * scale)  # inverted scaling
    rate = kept[positive].float().mean().item()
    assert abs(rate - 0.8) < 0.01, rate  # 100k positive units: sd 0.0013
    out.sum().backward()
    assert h.grad is not None
    torch.testing.assert_close(h.grad, kept.float() * scale)
    tower.eval()
    assert torch.equal(tower._drop(h), torch.relu(h))


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_neumf_load_pretrained_reproduces_the_weighted_sum(alpha: float):
    gmf, mlp = make("gmf", seed=1), make("mlp", seed=2)
    neumf = make("neumf", seed=3)
    neumf.load_pretrained(gmf, mlp, alpha)
    users, items = all_pairs()
    with torch.no_grad():
        expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
        torch.testing.assert_close(neumf(users, items), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            neumf.score_all(torch.arange(N_USERS)),
            expected.view(N_USERS, N_ITEMS),
            rtol=1e-5,
            atol=1e-5,
        )
        # A copy, not shared storage: changing NeuMF afterwards leaves GMF and MLP untouched.
        before = gmf(users, items), mlp(users, items)
        for p in neumf.parameters():
            p.add_(1.0)
        assert torch.equal(gmf(users, items), before[0])
        assert torch.equal(mlp(users, items), before[1])


def test_neumf_branches_have_separate_embeddings():
    model = make("neumf")
    assert model.user_emb.embedding_dim == 6
    assert model.tower.user_emb.embedding_dim == 4
    assert model.out.in_features == 6 + 4
    assert model.branches(torch.tensor([0]), torch.tensor([1])).shape == (1, 10)


def test_sparse_embeddings_give_sparse_gradients():
    model = build_model(ModelConfig(name="gmf", embedding_dim=4), N_USERS, N_ITEMS, sparse=True)
    model(torch.tensor([0, 1]), torch.tensor([2, 3])).sum().backward()
    assert model.user_emb.weight.grad.is_sparse


def test_context_term_is_the_mean_over_the_latest_items():
    model = make("mf-context")
    assert isinstance(model, MF)
    plain = MF(N_USERS, N_ITEMS, 6)
    plain.load_state_dict(
        {
            k: v
            for k, v in model.state_dict().items()
            if not k.startswith(("context", "target", "latest"))
        }
    )
    with torch.no_grad():
        markov = model.score_all(torch.arange(N_USERS)) - plain.score_all(torch.arange(N_USERS))
        c, t = model.context_emb.weight, model.target_emb.weight
    torch.testing.assert_close(markov[1], (c[LATEST[1]].mean(0)) @ t.T)
    torch.testing.assert_close(markov[0], c[LATEST[0, 0]] @ t.T)  # the pad is not averaged in
    assert torch.equal(markov[5], torch.zeros(N_ITEMS))  # no latest item: the plain MF score


def test_context_given_replaces_the_latest_items_and_is_saved():
    model = make("mf-context")
    users, items = torch.tensor([1, 2]), torch.tensor([4, 7])
    given = torch.tensor(LATEST[[1, 2]])
    with torch.no_grad():
        assert torch.equal(model(users, items, given), model(users, items))
        other = model(users, items, torch.tensor([[3, N_ITEMS], [3, N_ITEMS]]))
        assert not torch.allclose(other, model(users, items))
        catalog = model(users, None, given)  # softmax's whole-catalog logits
        torch.testing.assert_close(catalog, model.score_all(users))
    rebuilt = build_model(ModelConfig(name="mf", embedding_dim=6, context=2), N_USERS, N_ITEMS)
    rebuilt.load_state_dict(model.state_dict())  # the latest items travel with the weights
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval().score_all(users), model.score_all(users))
