"""Global insights on hand-computable cases: the exact GMF / MLP split, Gini, popularity bias,
activity buckets and the item map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recommender.config import ModelConfig
from recommender.data.interactions import Interactions
from recommender.insights import (
    ActivityBuckets,
    activity_buckets,
    branch_share,
    gini,
    item_map,
    metrics_by_activity,
    neumf_item_parts,
    neumf_pair_parts,
    popularity_bias,
    primary_genres,
    top_k_items,
)
from recommender.models import GMF, MF, NeuMF, Popularity, build_model
from recommender.utils import RecommenderError

N_USERS, N_ITEMS = 7, 11


def neumf(seed: int = 0) -> NeuMF:
    torch.manual_seed(seed)
    cfg = ModelConfig(name="neumf", embedding_dim=6, mlp_layers=[8, 6, 4])
    model = build_model(cfg, N_USERS, N_ITEMS)
    with torch.no_grad():  # non-trivial weights, so no check passes on zeros
        for p in model.parameters():
            p.normal_(0, 0.5)
    assert isinstance(model, NeuMF)
    return model.eval()


def small_history() -> Interactions:
    """User u has seen items 0..u-1 (user 0 has seen nothing)."""
    users = np.concatenate([np.full(u, u) for u in range(N_USERS)])
    items = np.concatenate([np.arange(u) for u in range(N_USERS)])
    return Interactions(users, items, N_USERS, N_ITEMS)


# -- GMF versus MLP --------------------------------------------------------------------------


def test_branch_parts_sum_to_the_logit_for_pairs_and_for_every_item():
    model = neumf()
    users = torch.arange(N_USERS).repeat_interleave(N_ITEMS)
    items = torch.arange(N_ITEMS).repeat(N_USERS)
    gmf, mlp, bias = neumf_pair_parts(model, users, items)
    with torch.no_grad():
        torch.testing.assert_close(gmf + mlp + bias, model(users, items))
    all_gmf, all_mlp = neumf_item_parts(model, torch.arange(N_USERS), model.item_cache())
    assert all_gmf.shape == all_mlp.shape == (N_USERS, N_ITEMS)
    torch.testing.assert_close(all_gmf.ravel(), gmf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(all_mlp.ravel(), mlp, rtol=1e-5, atol=1e-5)
    # The GMF part is the GMF formula itself: h_GMF · (p_u ⊙ q_i).
    w = model.out.weight[0, : model.dim]
    expected = ((model.user_emb(users) * model.item_emb(items)) * w).sum(1)
    torch.testing.assert_close(gmf, expected.detach())


@pytest.mark.parametrize("silenced", ["mlp", "gmf"])
def test_branch_share_with_one_branch_silenced(silenced: str):
    model = neumf()
    with torch.no_grad():
        if silenced == "mlp":
            model.out.weight[0, model.dim :] = 0
        else:
            model.out.weight[0, : model.dim] = 0
    share = branch_share(model, small_history(), np.arange(N_USERS), k=3)
    alive = 1.0 if silenced == "mlp" else 0.0
    assert share.applicable and share.k == 3 and share.n_users == N_USERS
    assert share.top_gmf == pytest.approx(alive)
    assert share.random_gmf == pytest.approx(alive)
    assert share.spread_gmf == pytest.approx(alive)
    # The live branch alone ranks exactly like the whole model.
    live_overlap = share.overlap_gmf_only if silenced == "mlp" else share.overlap_mlp_only
    assert live_overlap == pytest.approx(1.0)


def test_branch_share_matches_a_brute_force_computation():
    model, history = neumf(seed=3), small_history()
    users, k = np.arange(N_USERS), 4
    share = branch_share(model, history, users, k=k)
    u = torch.arange(N_USERS).repeat_interleave(N_ITEMS)
    i = torch.arange(N_ITEMS).repeat(N_USERS)
    gmf, mlp, _ = (t.view(N_USERS, N_ITEMS) for t in neumf_pair_parts(model, u, i))
    shares, overlaps = [], []
    for user in range(N_USERS):
        unseen = [j for j in range(N_ITEMS) if j >= user]  # user u has seen 0..u-1
        full = sorted(unseen, key=lambda j: -float(gmf[user, j] + mlp[user, j]))[:k]
        by_gmf = sorted(unseen, key=lambda j: -float(gmf[user, j]))[:k]
        shares += [abs(gmf[user, j]) / (abs(gmf[user, j]) + abs(mlp[user, j])) for j in full]
        overlaps.append(len(set(full) & set(by_gmf)) / len(full))
    assert share.top_gmf == pytest.approx(float(np.mean(shares)), rel=1e-5)
    assert share.overlap_gmf_only == pytest.approx(float(np.mean(overlaps)))
    assert share.top_shares is not None and len(share.top_shares) == N_USERS * k


def test_branch_share_is_not_applicable_to_single_branch_models():
    share = branch_share(GMF(N_USERS, N_ITEMS, 4), small_history(), np.arange(N_USERS))
    assert not share.applicable
    assert "NeuMF" in share.note and "GMF" in share.note
    assert share.top_gmf is None and share.summary()["applicable"] is False


# -- top-k and popularity bias ---------------------------------------------------------------


def test_top_k_items_excludes_history_and_pads(fixed_scores):
    scores = np.tile(np.arange(N_ITEMS, 0, -1, dtype=float), (N_USERS, 1))  # item 0 best
    tops = top_k_items(fixed_scores(scores), small_history(), np.array([0, 2, 6]), k=6)
    assert tops.tolist() == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7], [6, 7, 8, 9, 10, -1]]


def test_gini_hand_cases():
    assert gini(np.full(5, 7)) == pytest.approx(0.0)
    assert gini(np.array([0, 0, 0, 9])) == pytest.approx(3 / 4)  # (n - 1) / n
    assert gini(np.array([3, 0, 1, 0])) == pytest.approx(0.625)  # mean |xi - xj| / (2 mean)
    assert gini(np.zeros(3)) == 0.0


def test_popularity_bias_hand_case():
    counts = np.array([50, 30, 10, 5, 3, 1, 1, 0, 0, 0])  # 10 items, 100 interactions
    tops = np.array([[0, 1], [0, 2], [1, -1]])  # 5 recommendations, one empty slot
    bias = popularity_bias(tops, counts)
    assert (bias.k, bias.n_users, bias.n_recommendations) == (2, 3, 5)
    assert bias.mean_popularity == pytest.approx((50 + 30 + 50 + 10 + 30) / 5)
    # Percent of the catalog below each item: item 0 -> 95, item 1 -> 85, item 2 -> 75.
    assert bias.mean_percentile == pytest.approx((95 + 85 + 95 + 75 + 85) / 5)
    assert bias.head_share == pytest.approx({"top 10%": 2 / 5, "top 20%": 4 / 5})
    assert bias.interaction_head_share == pytest.approx({"top 10%": 0.5, "top 20%": 0.8})
    assert bias.coverage == pytest.approx(3 / 10)
    assert bias.rec_counts.tolist() == [2, 2, 1, 0, 0, 0, 0, 0, 0, 0]
    assert bias.gini == pytest.approx(0.74)  # 2 * 46 / (10 * 5) - 11 / 10
    assert bias.catalog_mean_popularity == pytest.approx(10.0)
    assert bias.interaction_mean_popularity == pytest.approx(3536 / 100)  # sum c^2 / sum c
    np.testing.assert_allclose(bias.decile_share, [0.4, 0.4, 0.2, 0, 0, 0, 0, 0, 0, 0])
    assert bias.interaction_decile_share[0] == pytest.approx(0.5)
    assert bias.quantiles["recommended"]["p50"] == 30
    with pytest.raises(RecommenderError, match="users, k"):
        popularity_bias(np.array([0, 1]), counts)
    with pytest.raises(RecommenderError, match="outside 10 items"):
        popularity_bias(np.array([[10]]), counts)


# -- activity buckets ------------------------------------------------------------------------


def test_activity_buckets_from_quantiles_and_fixed_thresholds():
    buckets = activity_buckets(np.arange(1, 11))
    assert (buckets.cold_max, buckets.heavy_min) == (2, 9)  # 20% lower, 80% higher quantile
    assert buckets.assign(np.array([1, 2, 3, 8, 9, 10])).tolist() == [0, 0, 1, 1, 2, 2]
    assert buckets.ranges() == {"cold": "<= 2", "regular": "3-8", "heavy": ">= 9"}
    assert "20% quantile" in buckets.rule
    # Everybody alike: everybody is cold, and the other buckets are empty.
    tied = activity_buckets(np.full(6, 5))
    assert (tied.cold_max, tied.heavy_min) == (5, 6)
    assert tied.ranges()["regular"] == "none"
    fixed = activity_buckets(np.arange(5), thresholds=(1, 3))
    assert fixed.ranges() == {"cold": "<= 1", "regular": "2", "heavy": ">= 3"}
    with pytest.raises(RecommenderError, match="heavy_min"):
        ActivityBuckets(3, 3, "bad")
    with pytest.raises(RecommenderError, match="quantiles"):
        activity_buckets(np.arange(5), quantiles=(0.8, 0.2))


def test_metrics_by_activity_evaluates_each_bucket_on_its_own_users(fixed_scores):
    # History lengths 1,1,3,3,5,5 -> cold (<= 1): users 0,1; regular: 2,3; heavy (>= 5): 4,5.
    lengths = [1, 1, 3, 3, 5, 5]
    users = np.repeat(np.arange(6), lengths)
    items = np.concatenate([np.arange(n) for n in lengths])
    history = Interactions(users, items, 6, 10)
    targets = Interactions(np.arange(6), np.full(6, 9), 6, 10)
    scores = np.zeros((6, 10))
    scores[:, 9] = [-1, -1, 1, 1, 1, 1]  # held-out item 9: last for cold users, first otherwise
    models = {"planted": fixed_scores(scores), "flat": fixed_scores(np.zeros((6, 10)))}
    buckets, rows = metrics_by_activity(
        models, history, targets, [1], ActivityBuckets(1, 5, "fixed")
    )
    assert buckets.cold_max == 1
    assert [(r.name, r.interactions, r.n_users) for r in rows] == [
        ("cold", "<= 1", 2),
        ("regular", "2-4", 2),
        ("heavy", ">= 5", 2),
    ]
    assert [r.metrics["planted"]["hr@1"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r.metrics["flat"]["hr@1"] for r in rows] == [0.0, 0.0, 0.0]  # ties count against
    _, rows = metrics_by_activity(models, history, targets, [1], ActivityBuckets(5, 9, "fixed"))
    assert [r.n_users for r in rows] == [6, 0, 0]
    assert rows[2].metrics == {}


# -- item map --------------------------------------------------------------------------------


def test_item_map_projects_planted_clusters_apart():
    model = MF(3, 10, dim=4)
    rng = np.random.default_rng(0)
    vectors = rng.normal(scale=0.05, size=(10, 4))
    vectors[:5, 0] += 1.0  # two planted clusters on orthogonal directions
    vectors[5:, 1] += 1.0
    with torch.no_grad():
        model.item_emb.weight.copy_(torch.from_numpy(vectors))
    counts = np.array([1, 2, 1, 3, 2, 40, 30, 50, 20, 60])  # the second cluster is popular
    genres = ["Drama|Action", "Drama", None, "", "Drama"] + ["Comedy"] * 5
    imap = item_map(model, counts, genres)
    assert imap is not None and imap.coords.shape == (10, 2)
    assert imap.explained[0] > 0.8 and sum(imap.explained) <= 1 + 1e-6
    x = imap.coords[:, 0]
    assert x[5:].min() > 0 > x[:5].max()  # split on PC1, popular cluster on the positive side
    assert imap.genres is not None
    assert imap.genres.tolist() == ["Drama", "Drama", "", "", "Drama"] + ["Comedy"] * 5
    assert item_map(Popularity(3, 10), counts) is None
    with pytest.raises(RecommenderError, match="3 item genres for 10 items"):
        item_map(model, counts, ["a", "b", "c"])


def test_primary_genres_without_data():
    assert primary_genres(None) is None
    genres = primary_genres(["Sci-Fi|Horror", None])
    assert genres is not None and genres.tolist() == ["Sci-Fi", ""]
