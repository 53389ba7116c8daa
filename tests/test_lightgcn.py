"""LightGCN: the normalised graph, propagation against a dense reference, learning the planted
clusters, and a checkpoint round trip."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch

from ranking_fixtures import hit_rate, planted_split, popularity_hit_rate, train_ranking
from recommender.models.lightgcn import LightGCN, normalized_adjacency

# users 0..2, items 0..3; item 2 has no edge
USERS, ITEMS = np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 1, 3])


def tiny(layers: int, seed: int = 0) -> LightGCN:
    torch.manual_seed(seed)
    model = LightGCN(3, 4, dim=5, layers=layers)
    model.set_graph(USERS, ITEMS)
    return model


def test_normalized_adjacency_is_one_over_root_degrees():
    r, r_t = normalized_adjacency(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 1]), 2, 3)
    # degrees: users (2, 1), items (1, 2, 0)
    expected = torch.tensor(
        [[1 / math.sqrt(2 * 1), 1 / math.sqrt(2 * 2), 0.0], [0.0, 1 / math.sqrt(1 * 2), 0.0]]
    )
    torch.testing.assert_close(r.to_dense(), expected)
    torch.testing.assert_close(r_t.to_dense(), expected.T)


def test_without_layers_it_is_a_dot_product_of_the_embeddings():
    model = tiny(layers=0)
    users, items = model.user_emb.weight, model.item_emb.weight
    torch.testing.assert_close(model.score_all(torch.arange(3)), users @ items.T)
    u, i = torch.tensor([0, 2]), torch.tensor([3, 1])
    torch.testing.assert_close(model(u, i), (users[u] * items[i]).sum(-1))


def dense_propagation(model: LightGCN) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's matrix form: E_{k+1} = D^-½ A D^-½ E_k over the (users + items)² adjacency."""
    n_users, n = model.n_users, model.n_users + model.n_items
    adjacency = torch.zeros(n, n)
    adjacency[USERS, n_users + ITEMS] = 1.0
    adjacency[n_users + ITEMS, USERS] = 1.0
    degree = adjacency.sum(1)
    scale = torch.where(degree > 0, degree.rsqrt(), 0.0)
    norm = scale[:, None] * adjacency * scale[None, :]
    layer = torch.cat([model.user_emb.weight, model.item_emb.weight])
    total = layer
    for _ in range(model.layers):
        layer = norm @ layer
        total = total + layer
    mean = total / (model.layers + 1)
    return mean[:n_users], mean[n_users:]


def test_propagation_and_its_gradient_match_the_dense_computation():
    model = tiny(layers=3)
    weights = torch.randn(3, 5), torch.randn(4, 5)

    def grads(users: torch.Tensor, items: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        ((users * weights[0]).sum() + (items * weights[1]).sum()).backward()
        return [p.grad.clone() for p in (model.user_emb.weight, model.item_emb.weight)]  # type: ignore[union-attr]

    sparse, dense = model.propagate(), dense_propagation(model)
    for got, expected in zip(sparse, dense, strict=True):
        torch.testing.assert_close(got, expected)
    for got, expected in zip(grads(*model.propagate()), grads(*dense), strict=True):
        torch.testing.assert_close(got, expected)


def test_forward_shapes_agree_with_the_catalog_scores():
    model = tiny(layers=2)
    catalog = model.score_all(torch.tensor([1, 2]))  # (2, 4)
    torch.testing.assert_close(model(torch.tensor([1, 2])), catalog)
    pairs = model(torch.tensor([1, 2]), torch.tensor([3, 0]))
    torch.testing.assert_close(pairs, catalog[[0, 1], [3, 0]])
    grid = torch.tensor([[0, 1, 3], [2, 2, 1]])
    torch.testing.assert_close(model(torch.tensor([1, 2]), grid), catalog.gather(1, grid))
    users, items = model.retrieval_vectors()
    torch.testing.assert_close(users[[1, 2]] @ items.T, catalog)


def test_a_checkpoint_rebuilds_identical_scores():
    model = tiny(layers=2)
    assert set(model.state_dict()) == {"user_emb.weight", "item_emb.weight", "edges"}
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = LightGCN(3, 4, dim=5, layers=2)  # no graph until the state is loaded
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    every = torch.arange(3)
    torch.testing.assert_close(rebuilt.score_all(every), model.score_all(every), rtol=0, atol=0)
    copied = copy.deepcopy(model)  # as a best-state snapshot might be taken
    torch.testing.assert_close(copied.score_all(every), model.score_all(every), rtol=0, atol=0)


def test_set_graph_refuses_bad_edges():
    model = LightGCN(3, 4, dim=2)
    with pytest.raises(ValueError, match="repeat"):
        model.set_graph(np.array([0, 0]), np.array([1, 1]))
    with pytest.raises(ValueError, match="item index outside"):
        model.set_graph(np.array([0]), np.array([4]))


def test_lightgcn_learns_the_planted_clusters_with_bpr():
    history, held = planted_split()
    torch.manual_seed(0)
    model = LightGCN(history.n_users, history.n_items, dim=16, layers=2)
    model.set_graph(history.user_idx, history.item_idx)

    def score(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return model(u).gather(1, i)  # one propagation scores every pair of the step

    train_ranking(model.parameters(), score, history, "bpr", steps=200, lr=0.01)
    ours, baseline = hit_rate(model, history, held), popularity_hit_rate(history, held)
    assert ours > baseline + 0.25, (ours, baseline)


def test_it_trains_under_bfloat16_autocast():
    """train.amp: the sparse matmuls stay in float32, the rest may run in bfloat16."""
    model = tiny(layers=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.tensor([0, 1]), torch.tensor([1, 3]))
    logits.float().sum().backward()
    assert model.user_emb.weight.grad is not None and model.user_emb.weight.grad.abs().sum() > 0
