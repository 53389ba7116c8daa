"""Metrics on hand-computed cases, both protocols against brute force, ties against the model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FixedScores
from recommender.data.interactions import Interactions
from recommender.evaluate import (
    PAD,
    evaluate_full,
    evaluate_sampled,
    format_table,
    ranking_metrics,
    sample_negatives,
)
from recommender.models import Popularity


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)


def test_ranking_metrics_hand_computed():
    # User 0: positives at 0-based ranks 0 and 2; user 1: one positive at rank 4.
    ranks = torch.tensor([[2.0, 0.0, PAD], [4.0, PAD, PAD]])
    neg_below = torch.tensor([[4.0, 5.0, 0.0], [1.0, 0.0, 0.0]])
    n_neg = torch.tensor([6.0, 5.0])
    m = ranking_metrics(ranks, neg_below, n_neg, [1, 3])
    idcg2 = 1 + 1 / math.log2(3)
    expected = {
        "auc": [(5 / 6 + 4 / 6) / 2, 1 / 5],
        "mrr": [1.0, 1 / 5],
        "hr@1": [1.0, 0.0],
        "recall@1": [0.5, 0.0],
        "precision@1": [1.0, 0.0],
        "ndcg@1": [1.0, 0.0],
        "map@1": [1.0, 0.0],
        "map_all@1": [0.5, 0.0],
        "hr@3": [1.0, 0.0],
        "recall@3": [1.0, 0.0],
        "precision@3": [2 / 3, 0.0],
        "ndcg@3": [(1 + 1 / math.log2(4)) / idcg2, 0.0],
        "map@3": [(1 / 1 + 2 / 3) / 2, 0.0],
        "map_all@3": [(1 / 1 + 2 / 3) / 2, 0.0],
    }
    assert set(m) == set(expected)
    for name, values in expected.items():
        assert m[name].tolist() == pytest.approx(values), name


def test_ndcg_and_map_with_more_positives_than_k():
    # Three positives at ranks 0, 1, 5 with k=2: the ideal DCG has two hits, not three.
    m = ranking_metrics(
        torch.tensor([[0.0, 1.0, 5.0]]), torch.zeros(1, 3), torch.tensor([10.0]), [2]
    )
    assert m["ndcg@2"].item() == pytest.approx(1.0)
    assert m["map@2"].item() == pytest.approx(1.0)
    assert m["map_all@2"].item() == pytest.approx(2 / 3)
    assert m["recall@2"].item() == pytest.approx(2 / 3)
    assert m["precision@2"].item() == pytest.approx(1.0)


def test_a_miss_scores_zero_except_mrr():
    m = ranking_metrics(torch.tensor([[20.0]]), torch.tensor([[0.0]]), torch.tensor([30.0]), [10])
    assert m["mrr"].item() == pytest.approx(1 / 21)
    for name in ("auc", "hr@10", "ndcg@10", "recall@10", "precision@10", "map@10"):
        assert m[name].item() == 0.0, name


def brute_force(scores, history, targets, k):
    """Per-user metrics by definition, in plain Python, ties pessimistic."""
    out = {n: [] for n in ("auc", "mrr", f"hr@{k}", f"ndcg@{k}", f"recall@{k}",
                           f"precision@{k}", f"map@{k}", f"map_all@{k}")}  # fmt: skip
    for u in sorted(targets):
        seen, pos = history.get(u, set()), targets[u]
        cands = [i for i in range(scores.shape[1]) if i not in seen]
        negs = [i for i in cands if i not in pos]
        ranks = sorted(
            sum(1 for c in cands if c != t and scores[u, c] >= scores[u, t]) for t in pos
        )
        hits = [r for r in ranks if r < k]
        aucs = [sum(scores[u, n] < scores[u, t] for n in negs) / len(negs) for t in pos]
        out["auc"].append(sum(aucs) / len(pos))
        out["mrr"].append(1 / (ranks[0] + 1))
        out[f"hr@{k}"].append(float(bool(hits)))
        idcg = sum(1 / math.log2(j + 2) for j in range(min(len(pos), k)))
        out[f"ndcg@{k}"].append(sum(1 / math.log2(r + 2) for r in hits) / idcg)
        out[f"recall@{k}"].append(len(hits) / len(pos))
        out[f"precision@{k}"].append(len(hits) / k)
        ap = sum((j + 1) / (r + 1) for j, r in enumerate(hits))
        out[f"map@{k}"].append(ap / min(len(pos), k))
        out[f"map_all@{k}"].append(ap / len(pos))
    return {name: float(np.mean(v)) for name, v in out.items()}


def as_interactions(pairs: dict[int, set[int]], n_users: int, n_items: int) -> Interactions:
    rows = [(u, i) for u, items in pairs.items() for i in sorted(items)]
    u, i = zip(*rows, strict=True) if rows else ((), ())
    return Interactions(np.array(u, dtype=np.int64), np.array(i, dtype=np.int64), n_users, n_items)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_users=st.integers(1, 8),
    n_items=st.integers(5, 20),
    k=st.integers(1, 6),
    levels=st.sampled_from([2, 4, 1000]),
)
def test_evaluate_full_matches_brute_force(seed, n_users, n_items, k, levels):
    rng = np.random.default_rng(seed)
    # Few distinct score values (levels=2, 4) make many ties, which must count against the model.
    scores = rng.integers(0, levels, size=(n_users, n_items)).astype(np.float32)
    history, targets = {}, {}
    for u in range(n_users):
        items = rng.permutation(n_items)
        n_seen = int(rng.integers(0, n_items - 3))
        history[u] = set(items[:n_seen].tolist())
        if rng.random() < 0.8:  # some users have no target: they are not evaluated
            # Up to 8 targets: both the counting path (at most COUNT_POSITIVES a user in a
            # chunk) and the sorting path of evaluate_full.
            n_targets = min(int(rng.integers(1, 9)), n_items - n_seen - 1)  # keep a negative
            targets[u] = set(items[n_seen : n_seen + n_targets].tolist())
    if not targets:
        targets[0] = {int(next(i for i in range(n_items) if i not in history[0]))}
    result = evaluate_full(
        FixedScores(scores),
        as_interactions(history, n_users, n_items),
        as_interactions(targets, n_users, n_items),
        [k],
        batch_users=3,  # several chunks
    )
    expected = brute_force(scores, history, targets, k)
    assert result.protocol == "full"
    assert result.n_users == len(targets)
    for name, value in expected.items():
        assert close(result.metrics[name], value), (name, result.metrics[name], value)
    assert 0 < result.metrics[f"coverage@{k}"] <= 1


def test_evaluate_full_masks_training_items():
    # The training items score highest; if they were not masked the target would rank 3rd.
    scores = np.array([[9.0, 8.0, 1.0, 0.5, 0.2]])
    history = Interactions(np.array([0, 0]), np.array([0, 1]), 1, 5)
    target = Interactions(np.array([0]), np.array([2]), 1, 5)
    result = evaluate_full(FixedScores(scores), history, target, [1])
    assert result.metrics["hr@1"] == 1.0
    assert result.metrics["auc"] == 1.0
    assert result.metrics["mrr"] == 1.0
    # Top-k lists exclude history items too: coverage counts item 2 only.
    assert result.metrics["coverage@1"] == pytest.approx(1 / 5)


def test_recall_and_ndcg_at_20_over_several_test_items_hand_computed():
    """The graph-recommendation literature's definitions (NGCF, LightGCN): Recall@K = hits /
    |test items|, NDCG@K with binary gains over an ideal DCG of min(|test items|, K) hits, the
    mean over users with a test item; training items are excluded from the ranking."""
    n_items = 40
    scores = np.tile(-np.arange(n_items, dtype=np.float32), (4, 1))  # item 0 first for everyone
    # user 0's training items 0 and 1 score highest and are excluded: item j ranks j - 2
    history = as_interactions({0: {0, 1}, 3: {5}}, 4, n_items)
    targets = as_interactions({0: {2, 6, 27}, 1: set(range(22)), 2: {3}}, 4, n_items)
    result = evaluate_full(FixedScores(scores), history, targets, [20], batch_users=2)
    assert result.n_users == 3  # user 3 has no test item: not in the means
    # user 0: ranks 0, 4, 25 -> 2 hits of 3; user 1: 22 items at ranks 0..21 -> 20 of 22, all
    # 20 slots relevant (ideal DCG over 20 positions, so NDCG 1); user 2: one item at rank 3.
    recall = [2 / 3, 20 / 22, 1.0]
    ndcg = [(1 + 1 / math.log2(6)) / (1 + 1 / math.log2(3) + 1 / math.log2(4)), 1.0,
            1 / math.log2(5)]  # fmt: skip
    assert result.metrics["recall@20"] == pytest.approx(np.mean(recall))
    assert result.metrics["ndcg@20"] == pytest.approx(np.mean(ndcg))
    assert result.metrics["hr@20"] == pytest.approx(1.0)
    assert result.metrics["precision@20"] == pytest.approx((2 + 20 + 1) / 20 / 3)


def test_one_test_item_recall_is_hit_rate_and_ndcg_is_ncfs():
    """With one test item per user (the NCF protocol) Recall@K is HR@K and NDCG@K is
    1 / log2(rank + 2) for a hit: the single-item metrics are unchanged."""
    rng = np.random.default_rng(3)
    n_users, n_items = 50, 60
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    history = as_interactions({u: set(rng.choice(n_items, 5, replace=False).tolist())
                               for u in range(n_users)}, n_users, n_items)  # fmt: skip
    seen = {u: set(history.item_idx[history.user_idx == u].tolist()) for u in range(n_users)}
    target = {u: int(next(i for i in rng.permutation(n_items) if i not in seen[u]))
              for u in range(n_users)}  # fmt: skip
    targets = as_interactions({u: {i} for u, i in target.items()}, n_users, n_items)
    result = evaluate_full(FixedScores(scores), history, targets, [5, 10, 20])
    others = [[c for c in range(n_items) if c not in seen[u] and c != target[u]]
              for u in range(n_users)]  # fmt: skip
    ranks = np.array([(scores[u, others[u]] >= scores[u, target[u]]).sum() for u in range(n_users)])
    for k in (5, 10, 20):
        assert result.metrics[f"recall@{k}"] == result.metrics[f"hr@{k}"]
        assert result.metrics[f"hr@{k}"] == pytest.approx(np.mean(ranks < k))
        ncf_ndcg = np.where(ranks < k, 1 / np.log2(ranks + 2), 0.0).mean()
        assert result.metrics[f"ndcg@{k}"] == pytest.approx(ncf_ndcg)


def constant_setup(n_users=6, n_items=40, seed=0):
    rng = np.random.default_rng(seed)
    history, targets = {}, {}
    for u in range(n_users):
        items = rng.permutation(n_items)
        history[u], targets[u] = set(items[:5].tolist()), set(items[5:7].tolist())
    return (
        as_interactions(history, n_users, n_items),
        as_interactions(targets, n_users, n_items),
    )


def test_constant_scorer_gets_zero_under_both_protocols():
    history, targets = constant_setup()
    model = FixedScores(np.full((6, 40), 0.3))
    ks = [1, 5, 10]
    full = evaluate_full(model, history, targets, ks)
    negatives = sample_negatives(history, targets, 20, seed=0)
    sampled = evaluate_sampled(model, history, targets, negatives, ks)
    for result, n_candidates in ((full, 40 - 5), (sampled, 21)):
        for name, value in result.metrics.items():
            if name == "mrr":
                # The reciprocal rank never reaches 0: a constant scorer gets the worst rank.
                assert value == pytest.approx(1 / n_candidates), result.protocol
            elif not name.startswith("coverage"):
                assert value == 0.0, (result.protocol, name)


def test_evaluate_sampled_hand_computed():
    # Row 0: target scores 5, negatives 9, 5, 1 -> 2 negatives at least as high: rank 2.
    # Row 1: target 8 beats all of 1, 2, 3 -> rank 0.
    scores = np.zeros((2, 10), dtype=np.float32)
    scores[0, [1, 2, 3, 4]] = [5, 9, 5, 1]
    scores[1, [5, 6, 7, 8]] = [8, 1, 2, 3]
    history = Interactions(np.array([0, 1]), np.array([0, 0]), 2, 10)
    targets = Interactions(np.array([0, 1]), np.array([1, 5]), 2, 10)
    negatives = np.array([[2, 3, 4], [6, 7, 8]])
    result = evaluate_sampled(FixedScores(scores), history, targets, negatives, [1, 3])
    assert result.protocol == "sampled"
    m = result.metrics
    assert m["hr@1"] == pytest.approx(0.5)
    assert m["hr@3"] == pytest.approx(1.0)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(4) + 1) / 2)
    assert m["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["auc"] == pytest.approx((1 / 3 + 1) / 2)


def test_evaluate_sampled_equals_full_when_negatives_are_every_other_item():
    rng = np.random.default_rng(5)
    n_items = 15
    scores = rng.normal(size=(4, n_items)).astype(np.float32)
    history = as_interactions({u: {u} for u in range(4)}, 4, n_items)
    targets = as_interactions({u: {u + 5} for u in range(4)}, 4, n_items)
    negatives = np.array([[i for i in range(n_items) if i not in (u, u + 5)] for u in range(4)])
    model = FixedScores(scores)
    full = evaluate_full(model, history, targets, [3])
    sampled = evaluate_sampled(model, history, targets, negatives, [3], batch_rows=3)
    for name in ("auc", "mrr", "hr@3", "ndcg@3", "map@3"):
        assert close(full.metrics[name], sampled.metrics[name]), name


def test_sample_negatives_avoid_history_and_targets_and_are_seeded():
    history, targets = constant_setup()
    a = sample_negatives(history, targets, 30, seed=3)
    b = sample_negatives(history, targets, 30, seed=3)
    assert a.shape == (len(targets), 30)
    np.testing.assert_array_equal(a, b)
    known = {(u, i) for u, i in zip(history.user_idx, history.item_idx, strict=True)}
    known |= {(u, i) for u, i in zip(targets.user_idx, targets.item_idx, strict=True)}
    for u, row in zip(targets.user_idx, a, strict=True):
        assert not {(int(u), int(i)) for i in row} & known


def test_cold_users_are_scored_by_the_fallback_and_counted(caplog: pytest.LogCaptureFixture):
    n_items = 30
    counts = np.arange(n_items)[::-1].copy()  # item 0 most popular
    # User 0 has history; users 1 and 2 have none (cold). Their targets are the most
    # popular unseen items, so the fallback ranks them first; the model itself ranks them last.
    history = Interactions(np.array([0, 0]), np.array([10, 11]), 3, n_items)
    targets = Interactions(np.array([0, 1, 2]), np.array([0, 0, 1]), 3, n_items)
    scores = np.tile(np.arange(n_items, dtype=np.float32), (3, 1))  # item 0 ranked last
    model = FixedScores(scores)
    fallback = Popularity(3, n_items).fit(counts)
    with caplog.at_level("WARNING", logger="recommender"):
        full = evaluate_full(model, history, targets, [1, 2], fallback=fallback)
    assert full.n_users == 3 and full.n_cold_users == 2
    assert full.metrics["hr@2"] == pytest.approx(2 / 3)  # the two cold users hit, user 0 misses
    assert full.notes and "2 test users" in full.notes[0] and "popularity" in full.notes[0]
    assert "popularity fallback" in caplog.text
    negatives = np.array([[5, 6], [5, 6], [5, 6]])
    sampled = evaluate_sampled(model, history, targets, negatives, [1], fallback=fallback)
    assert sampled.n_cold_users == 2
    assert sampled.metrics["hr@1"] == pytest.approx(2 / 3)
    # Without a fallback the cold users are still counted (scored by the model itself).
    bare = evaluate_full(model, history, targets, [1])
    assert bare.n_users == 3 and bare.n_cold_users == 2


def test_format_table_labels_the_protocol():
    history, targets = constant_setup()
    model = FixedScores(np.random.default_rng(0).normal(size=(6, 40)))
    full = evaluate_full(model, history, targets, [10])
    table = format_table({"gmf/full": full}, ["hr@10", "ndcg@10"])
    assert "protocol" in table.splitlines()[0]
    assert "gmf" in table and "full" in table.splitlines()[2]
    assert full.to_dict()["protocol"] == "full"
