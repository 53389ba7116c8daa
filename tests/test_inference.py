"""The Recommender contract: raw ids in and out, one user and a batch alike, clear failures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import walk_successors
from recommender.explanations import ATTRIBUTION, ExplainedItems, Explanation, FoldCache
from recommender.inference import Recommender
from recommender.models import MF, Popularity
from recommender.utils import RecommenderError


@pytest.fixture(scope="module")
def rec(gmf_run: Path) -> Recommender:
    return Recommender.from_run(gmf_run)


def history_ids(rec: Recommender, user: str) -> set[str]:
    idx = int(rec.users.index([user])[0])
    return set(rec.items.to_ids(rec.history_of(idx)).tolist())


def test_loads_from_the_run_directory_alone(rec: Recommender, gmf_run: Path):
    assert rec.model_name == "gmf"
    assert len(rec.users) == 160 and len(rec.items) == 120
    assert rec.meta["run_dir"] == str(gmf_run)
    assert not rec.model.training


def test_single_user_and_batch_agree(rec: Recommender):
    users = ["u10", "u7", "u484"]
    items, scores = rec.recommend(users, k=10)
    assert items.shape == scores.shape == (3, 10)
    for row, user in enumerate(users):
        one_items, one_scores = rec.recommend(user, k=10)
        assert one_items.shape == (10,)
        assert one_items.tolist() == items[row].tolist()
        np.testing.assert_allclose(one_scores, scores[row], rtol=1e-6)
    # Integer-typed and string-typed ids name the same item / user.
    assert rec.recommend(np.array(["u10"]), k=3)[0][0].tolist() == items[0, :3].tolist()


def test_scores_are_sorted_probabilities(rec: Recommender):
    items, scores = rec.recommend("u10", k=20)
    assert np.all(np.diff(scores) <= 0)
    assert np.all((scores > 0) & (scores < 1))
    assert len(set(items.tolist())) == 20
    assert all(isinstance(i, str) for i in items)


def test_exclude_seen_excludes_the_history(rec: Recommender):
    seen = history_ids(rec, "u10")
    assert seen
    items, _ = rec.recommend("u10", k=len(rec.items) - len(seen))
    assert not set(items.tolist()) & seen
    everything, _ = rec.recommend("u10", k=len(rec.items), exclude_seen=False)
    assert set(everything.tolist()) == set(rec.items.to_list())
    # A trained model ranks the items the user interacted with near the top.
    top = set(everything[:20].tolist())
    assert len(top & seen) >= 5


def test_k_beyond_the_unseen_items_pads_with_none(rec: Recommender):
    seen = history_ids(rec, "u10")
    items, scores = rec.recommend("u10", k=len(rec.items) + 5)
    n_unseen = len(rec.items) - len(seen)
    assert all(i is not None for i in items[:n_unseen])
    assert all(i is None for i in items[n_unseen:])
    assert np.isnan(scores[n_unseen:]).all()
    with pytest.raises(RecommenderError, match="k must be"):
        rec.recommend("u10", k=0)


def test_unknown_user_gets_the_popularity_fallback(rec: Recommender):
    assert rec.known_users(["u10", "nobody"]).tolist() == [True, False]
    assert rec.known_users("nobody").tolist() == [False]
    items, scores = rec.recommend("nobody", k=10)
    counts = rec.item_counts.astype(float)
    # The fallback's scores are the top-10 counts (ties may pick either item), as a share.
    np.testing.assert_allclose(scores, np.sort(counts)[::-1][:10] / counts.max(), rtol=1e-5)
    np.testing.assert_allclose(counts[rec.items.index(items)] / counts.max(), scores, rtol=1e-5)
    batch_items, _ = rec.recommend(["u10", "nobody"], k=10)
    assert batch_items[1].tolist() == items.tolist()
    assert batch_items[0].tolist() == rec.recommend("u10", k=10)[0].tolist()
    # ranked once: most interactions first, ties by item index, whatever k
    order = np.argsort(-counts, kind="stable")
    assert items.tolist() == rec.items.to_ids(order[:10]).tolist()
    everything, _ = rec.recommend(["nobody"], k=10_000)
    assert everything[0].tolist() == rec.items.to_ids(order).tolist()


def test_a_new_users_history_is_folded_in(rec: Recommender):
    """An unknown user with a history gets a list from it, not the popularity list; known
    users keep their trained vector; unknown items in a history are dropped, and a history with
    no known item leaves the user on popularity. `representations` says which is which."""
    history = sorted(history_ids(rec, "u10"))
    histories = {"new": history, "u7": history, "strangers": ["no-such-item"], "gone": []}
    users = ["u7", "new", "nobody", "strangers", "gone"]
    assert rec.representations(users, histories).tolist() == [
        "trained", "folded_in", "popularity", "popularity", "popularity"
    ]  # fmt: skip
    items, scores = rec.recommend(users, k=10, histories=histories)
    alone, _ = rec.recommend("new", k=10, histories={"new": [*history, "no-such-item"]})
    assert items[1].tolist() == alone.tolist()  # one user and a batch alike, unknown item dropped
    assert not set(items[1]) & set(history)
    assert len(set(items[1]) & set(rec.recommend("u10", k=10)[0])) >= 7  # u10's own history
    assert items[0].tolist() == rec.recommend("u7", k=10)[0].tolist()
    popular = rec.recommend("nobody", k=10)[0].tolist()
    assert [row.tolist() for row in items[2:]] == [popular] * 3
    assert np.all(np.diff(scores[1]) <= 0) and np.all((scores[1] > 0) & (scores[1] < 1))
    everything, _ = rec.recommend("new", k=len(rec.items), exclude_seen=False, histories=histories)
    assert set(everything[:20]) & set(history)  # the history itself ranks high when kept


def test_a_new_users_list_is_explained_by_their_history(rec: Recommender):
    history = sorted(history_ids(rec, "u10"))
    items, _ = rec.recommend("new", k=3, histories={"new": history})
    whys = rec.explain_many("new", items, history=[*history, "no-such-item"])
    assert [why.method for why in whys] == [ATTRIBUTION] * 3
    assert all(set(why.supporting_items) <= set(history) and why.weights for why in whys)
    assert all(why.fidelity is None and why.score is not None for why in whys)
    assert rec.explain_many("new", items, history=["no-such-item"])[0].method == "popularity"


def test_a_popularity_run_folds_nobody_in(rec: Recommender):
    model = Popularity(len(rec.users), len(rec.items)).fit(rec.item_counts)
    popular = Recommender(model, rec.users, rec.items, rec.indptr, rec.history, rec.item_counts, {})
    histories = {"new": ["15", "25"]}
    assert popular.representations(["u10", "new"], histories).tolist() == ["popularity"] * 2
    items, _ = popular.recommend("new", k=5, histories=histories)
    assert items.tolist() == popular.recommend("nobody", k=5)[0].tolist()


def test_unknown_item_is_a_clear_error(rec: Recommender):
    with pytest.raises(RecommenderError, match="unknown item 'no-such-item'"):
        rec.score(["u10"], ["no-such-item"])
    with pytest.raises(RecommenderError, match="unknown item"):
        rec.similar_items("no-such-item")
    with pytest.raises(RecommenderError, match="unknown item"):
        rec.explain("u10", "no-such-item")
    with pytest.raises(RecommenderError, match="unknown item 'nope'"):
        rec.explain_many("nobody", ["15", "nope"])


def test_score_keeps_the_order_and_matches_recommend(rec: Recommender):
    items, top_scores = rec.recommend("u10", k=5)
    users = ["u10"] * 5
    scores = rec.score(users, items.tolist())
    np.testing.assert_allclose(scores, top_scores, rtol=1e-5)
    reversed_scores = rec.score(users, items.tolist()[::-1])
    np.testing.assert_allclose(reversed_scores, scores[::-1], rtol=1e-6)
    mixed = rec.score(["u10", "nobody", "u7"], [15, "15", 25])
    assert mixed.shape == (3,)
    assert mixed[0] == pytest.approx(rec.score(["u10"], ["15"])[0])
    counts = rec.item_counts.astype(float)
    assert mixed[1] == pytest.approx(counts[rec.items.index(["15"])[0]] / counts.max(), rel=1e-5)
    with pytest.raises(RecommenderError, match="2 users but 1 items"):
        rec.score(["u10", "u7"], ["15"])


def test_similar_items_excludes_the_item_itself(rec: Recommender):
    items, sims = rec.similar_items("15", k=10)
    assert len(items) == 10 and "15" not in items.tolist()
    assert np.all(np.diff(sims) <= 1e-6)
    everything, _ = rec.similar_items(15, k=1000)
    assert len(everything) == len(rec.items) - 1


def test_similar_items_recover_the_planted_clusters(rec: Recommender):
    # Items i and j share a cluster when (i - j) is a multiple of 8 (conftest N_CLUSTERS).
    items, _ = rec.similar_items("15", k=5)  # raw id 15 is item index 1
    clusters = [((int(i) - 5) // 10) % 8 for i in items]
    assert sum(c == 1 for c in clusters) >= 3


def test_explain_returns_history_items_with_weights(rec: Recommender):
    items, _ = rec.recommend("u10", k=3)
    seen = history_ids(rec, "u10")
    for item in items:
        why = rec.explain("u10", item, n=3)
        assert isinstance(why, Explanation)
        assert why.item_id == item and why.method == ATTRIBUTION
        assert 1 <= len(why.supporting_items) <= 3
        assert set(why.supporting_items) <= seen
        assert len(why.weights) == len(why.supporting_items)
        assert all(w > 0 for w in why.weights)  # the largest positive attributions
        assert why.weights == sorted(why.weights, reverse=True)
        assert why.score is not None and why.baseline_score is not None
        assert why.fidelity is not None and why.fidelity > 0.8
        assert why.one_line().startswith("because you liked ")


def test_explain_many_folds_in_once_and_agrees_with_explain(rec: Recommender):
    items, _ = rec.recommend("u10", k=4)
    many = rec.explain_many("u10", items, n=2)
    assert [why.item_id for why in many] == items.tolist()
    for item, why in zip(items, many, strict=True):
        assert why == rec.explain("u10", item, n=2)
        assert len(why.supporting_items) <= 2
    assert rec.explain_many("u10", []) == []
    with pytest.raises(RecommenderError, match="n must be >= 1"):
        rec.explain_many("u10", items, n=0)


def test_a_kept_fold_explains_as_a_fresh_one(gmf_run: Path):
    """A user's second list is explained from their kept fold, other items included, exactly
    as a Recommender that never saw them explains it; another context is another fold."""
    kept = Recommender.from_run(gmf_run)
    items, _ = kept.recommend("u10", k=6)
    first = kept.explain_many("u10", items[:3])
    again = kept.explain_many("u10", items)
    assert len(kept.folds) == 1
    assert again == Recommender.from_run(gmf_run).explain_many("u10", items)
    assert again[:3] == first
    kept.explain_many("new", items, history=["15", "25"])
    assert len(kept.folds) == 2


def test_the_fold_cache_forgets_the_least_recently_used():
    cache = FoldCache(2)
    built: list[str] = []

    def build(key: str) -> Any:
        built.append(key)
        return key

    for key in ["a", "b", "a", "c", "a", "b"]:
        assert cache.get(key, lambda key=key: build(key)) == key
    assert built == ["a", "b", "c", "b"] and len(cache) == 2  # "b" went out when "c" came


def test_explained_items_are_looked_up_not_folded_again(
    gmf_run: Path, monkeypatch: pytest.MonkeyPatch
):
    """A trained user's items explained once come back as they were, in any order or subset,
    with no fold built; another n, or an item not explained yet, folds again."""
    rec = Recommender.from_run(gmf_run)
    items, _ = rec.recommend("u10", k=6)
    first = rec.explain_many("u10", items, keep_fold=False)
    user_idx = int(rec.users.index(["u10"])[0])
    assert len(rec.folds) == 0 and rec.explained.get(user_idx, 3, items.tolist()) == first

    def refold(*args: object) -> None:
        raise AssertionError("folded again")

    monkeypatch.setattr(rec._fold_in, "user", refold)
    assert rec.explain_many("u10", items[::-1]) == first[::-1]
    assert rec.explain_many("u10", items[:2]) == first[:2]
    unexplained = next(i for i in rec.items.to_list() if i not in set(items))
    for n, asked in ((2, items), (3, [*items[:2], unexplained])):
        with pytest.raises(AssertionError, match="folded again"):
            rec.explain_many("u10", asked, n=n)


def test_explained_items_keep_the_latest_users():
    kept = ExplainedItems(2)

    def why(item: str) -> Explanation:
        return Explanation(item, ["1"], [0.5], ATTRIBUTION, 0.9, 0.2, 0.99)

    kept.put(1, 3, [why("a"), why("b")])
    kept.put(2, 3, [why("c")])
    assert kept.get(1, 3, ["b", "a"]) == [why("b"), why("a")]  # user 1 the latest now
    assert kept.get(1, 3, ["a", "z"]) is None and kept.get(1, 2, ["a"]) is None
    kept.put(3, 3, [why("d")])
    assert kept.get(2, 3, ["c"]) is None and len(kept) == 2  # user 2 went out
    assert kept.get(1, 3, ["a"]) == [why("a")]


def test_one_line_wording():
    why = Explanation("9", ["1", "2"], [0.1234, 0.05], ATTRIBUTION, 0.8, 0.3, 0.97)
    assert why.one_line({"1": "Alien"}) == "because you liked Alien (+0.123), 2 (+0.050)"
    nothing = Explanation("9", [], [], ATTRIBUTION, 0.2, 0.3, 0.97)
    assert nothing.one_line() == "no item in your history raises its score"


def test_explain_for_an_unknown_user_falls_back(rec: Recommender):
    why = rec.explain("nobody", "15")
    assert why.supporting_items == [] and why.method == "popularity"
    assert why.score is None and why.fidelity is None
    assert why.one_line() == "popular with all users"


def test_the_popularity_model_explains_by_popularity(rec: Recommender):
    model = Popularity(len(rec.users), len(rec.items)).fit(rec.item_counts)
    popular = Recommender(model, rec.users, rec.items, rec.indptr, rec.history, rec.item_counts, {})
    whys = popular.explain_many("u10", ["15", "25"])
    assert [why.method for why in whys] == ["popularity", "popularity"]


def test_from_run_rejects_what_is_not_a_run(tmp_path: Path):
    with pytest.raises(RecommenderError, match="not a run directory"):
        Recommender.from_run(tmp_path / "missing")
    with pytest.raises(RecommenderError, match="checkpoint not found"):
        Recommender.from_run(tmp_path)


def test_similar_to_items_excludes_the_given_items(rec: Recommender):
    one, one_sims = rec.similar_to_items(["15"], k=5)
    items, sims = rec.similar_items("15", k=5)
    assert one.tolist() == items.tolist()
    np.testing.assert_allclose(one_sims, sims, rtol=1e-5)
    several, scores = rec.similar_to_items(["15", 25, "15"], k=10)
    assert not {"15", "25"} & set(several.tolist())
    assert np.isfinite(scores).all() and np.all(np.diff(scores) <= 1e-6)
    with pytest.raises(RecommenderError, match="unknown item"):
        rec.similar_to_items(["15", "nope"])
    with pytest.raises(RecommenderError, match="at least one"):
        rec.similar_to_items([])


def test_recommend_next_follows_the_recent_items(walks_run: Path):
    """On walks through one fixed cycle, what follows two steps of a walk is the next step: an
    anonymous session gets it first, and so does a known user whose recent items are given (in
    place of the latest items stored at training)."""
    rec = Recommender.from_run(walks_run)
    assert rec.model_name == "mf-context"  # labelled apart from a plain MF in results
    after = walk_successors()
    walks = [[i, after[i]] for i in rec.items.to_list()[:40]]  # oldest first
    first = [rec.recommend_next(walk, k=1)[0][0] for walk in walks]
    assert np.mean([f == after[w[1]] for f, w in zip(first, walks, strict=True)]) > 0.9
    user = "u10"
    user_idx = int(rec.users.index([user])[0])
    seen = history_ids(rec, user)
    fresh = [w for w in walks if not {*w, after[w[1]]} & seen][:10]
    assert len(fresh) == 10
    everything = len(rec.items)
    stored = rec.recommend(user, k=everything)[0].tolist()  # with the latest items of training
    given = [rec.recommend_next(w, k=everything, user_id=user)[0].tolist() for w in fresh]
    rank_given = [g.index(after[w[1]]) for g, w in zip(given, fresh, strict=True)]
    rank_stored = [stored.index(after[w[1]]) for w in fresh]
    # the user's own taste still counts, but the given walk lifts its next step to the top few
    assert np.median(rank_given) <= 2 and np.median(rank_stored) > 20, (rank_given, rank_stored)
    # one recent item comes before the user's latest stored one in the context (k = 2)
    assert isinstance(rec.model, MF)
    one = rec.items.index([fresh[0][1]])[0]
    stored = int(rec.model.latest[rec.users.index([user])[0], 0])
    with torch.no_grad():
        logits = rec.model.score_after(torch.tensor([[one, stored]]), torch.tensor([user_idx]))
    top = torch.sigmoid(logits)[0]
    top[rec.items.index([*seen, fresh[0][1]])] = -torch.inf
    expected = rec.items.to_ids(torch.topk(top, 5).indices.numpy()).tolist()
    assert rec.recommend_next([fresh[0][1]], k=5, user_id=user)[0].tolist() == expected
    ranked, scores = rec.recommend_next(fresh[0], k=len(rec.items), user_id=user)
    kept = [i for i in ranked.tolist() if i is not None]
    assert not set(kept) & (seen | set(fresh[0]))  # history and the recent items are left out
    assert np.all(np.diff(scores[: len(kept)]) <= 0)


def test_recommend_next_needs_a_context_run_and_known_items(walks_run: Path, rec: Recommender):
    with pytest.raises(RecommenderError, match=r"needs a run trained with model\.context"):
        rec.recommend_next(["15"])
    walks = Recommender.from_run(walks_run)
    with pytest.raises(RecommenderError, match="unknown item 'nope'"):
        walks.recommend_next(["15", "nope"])
    with pytest.raises(RecommenderError, match="recent_item_ids is empty"):
        walks.recommend_next([])
    with pytest.raises(RecommenderError, match="k must be >= 1"):
        walks.recommend_next(["15"], k=0)


def test_explanations_of_a_list_after_given_items_read_those_items(walks_run: Path):
    """The next step of a given walk is explained by the walk's items (the Markov term's
    context), which join the history; without `after`, the stored latest items are read."""
    rec = Recommender.from_run(walks_run)
    after = walk_successors()
    user = "u10"
    seen = history_ids(rec, user)
    walks = [
        [i, after[i]] for i in rec.items.to_list() if not {i, after[i], after[after[i]]} & seen
    ]
    # a walk whose next step tops the user's list (elsewhere the user's own taste wins)
    walk = next(w for w in walks if rec.recommend_next(w, k=1, user_id=user)[0][0] == after[w[1]])
    nxt = [after[walk[1]]]
    why = rec.explain_many(user, nxt, n=3, after=walk)[0]
    assert why.supporting_items[0] in walk and why.fidelity is not None and why.fidelity > 0.5
    stored = rec.explain_many(user, nxt, n=3)[0]  # the walk is not in the stored history
    assert not set(stored.supporting_items) & set(walk)
    assert why.score is not None and stored.score is not None and why.score > stored.score


def test_search_users_and_history(rec: Recommender, walks_run: Path):
    hits = rec.search_items("5", limit=200).tolist()
    assert set(hits) == {i for i in rec.items.to_list() if "5" in i}  # no titles: ids
    counts = rec.item_counts[rec.items.index(hits)]
    assert (np.diff(counts) <= 0).all() and len(rec.search_items("", limit=7)) == 7
    active = rec.most_active_users(3).tolist()
    assert [len(history_ids(rec, u)) for u in active] == sorted(np.diff(rec.indptr))[::-1][:3]
    assert set(rec.user_history("u10").tolist()) == history_ids(rec, "u10")
    assert len(rec.user_history("stranger")) == 0
    with pytest.raises(RecommenderError, match="limit"):
        rec.search_items("5", limit=0)
    # a model.context run keeps each user's latest items: they come first, latest first
    walks = Recommender.from_run(walks_run)
    items = walks.user_history("u10").tolist()
    assert set(items) == history_ids(walks, "u10") and len(items) == len(set(items))
    assert walk_successors()[items[1]] == items[0]
