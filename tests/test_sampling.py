"""Negative sampling and epoch batches: never a positive, distribution as configured, seeded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recommender.data import sampling
from recommender.data.interactions import Interactions
from recommender.data.sampling import NegativeSampler, epoch_batches
from recommender.utils import DataError


@st.composite
def datasets(draw: st.DrawFn) -> Interactions:
    """Small random positives where every user leaves at least one item unseen."""
    n_users = draw(st.integers(1, 6))
    n_items = draw(st.integers(2, 12))
    users, items = [], []
    for u in range(n_users):
        seen = draw(st.sets(st.integers(0, n_items - 1), max_size=n_items - 1))
        users += [u] * len(seen)
        items += sorted(seen)
    return Interactions(np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
                        n_users, n_items)  # fmt: skip


def positive_set(data: Interactions) -> set[tuple[int, int]]:
    return set(zip(data.user_idx.tolist(), data.item_idx.tolist(), strict=True))


@pytest.fixture(params=["dense", "bitset", "sorted_keys"])
def membership(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test against every membership path: byte bitmap, packed bitset, sorted keys."""
    if request.param != "dense":
        monkeypatch.setattr(sampling, "DENSE_LIMIT", 0)
    if request.param == "sorted_keys":
        monkeypatch.setattr(sampling, "BITSET_LIMIT", 0)
    return request.param


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
# The membership fixture patches a module constant once; it is the same for every example.
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=datasets(), k=st.integers(1, 5), seed=st.integers(0, 2**32))
def test_never_returns_a_positive(membership: str, strategy: str, data, k, seed):
    if strategy == "popularity":
        drawable = set(data.item_idx.tolist())  # items with no count are never drawn
        held = {
            u: len(drawable & {i for v, i in positive_set(data) if v == u})
            for u in range(data.n_users)
        }
        if drawable and max(held.values()) == len(drawable):
            with pytest.raises(DataError, match="no negatives"):
                NegativeSampler(data, strategy=strategy)
            return
    sampler = NegativeSampler(data, strategy=strategy)
    assert (sampler._dense is not None) == (membership == "dense")
    assert (sampler._bits is not None) == (membership == "bitset")
    users = torch.arange(data.n_users).repeat(3)
    negs = sampler.sample(users, k, torch.Generator().manual_seed(seed))
    assert negs.shape == (len(users), k) and negs.dtype == torch.int64
    assert negs.min() >= 0 and negs.max() < data.n_items
    positives = positive_set(data)
    for u, row in zip(users.tolist(), negs.tolist(), strict=True):
        assert not {(u, i) for i in row} & positives


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=datasets(), seed=st.integers(0, 2**32))
def test_is_positive_agrees_with_a_python_set(membership: str, data, seed):
    sampler = NegativeSampler(data)
    gen = torch.Generator().manual_seed(seed)
    users = torch.randint(data.n_users, (50,), generator=gen)
    items = torch.randint(data.n_items, (50,), generator=gen)
    expected = [
        (u, i) in positive_set(data) for u, i in zip(users.tolist(), items.tolist(), strict=True)
    ]
    assert sampler.is_positive(users, items).tolist() == expected


def chi_square(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


# The 0.9999 quantile of chi-square with 16 degrees of freedom is about 45; the seed is fixed,
# so these are deterministic checks with a wide margin, not flaky ones.
CHI2_16_LIMIT = 45.0


def test_uniform_is_uniform_over_non_positives(membership: str):
    n_items = 20
    positives = [0, 3, 7]
    data = Interactions(np.zeros(3, dtype=np.int64), np.array(positives), 1, n_items)
    sampler = NegativeSampler(data)
    negs = sampler.sample(
        torch.zeros(17_000, dtype=torch.int64), 10, torch.Generator().manual_seed(0)
    )
    counts = np.bincount(negs.numpy().ravel(), minlength=n_items)
    assert counts[positives].sum() == 0
    allowed = np.setdiff1d(np.arange(n_items), positives)
    assert len(allowed) == 17
    assert chi_square(counts[allowed], np.full(17, negs.numel() / 17)) < CHI2_16_LIMIT


def test_popularity_sampling_is_proportional_to_count_power(membership: str):
    rng = np.random.default_rng(0)
    n_items, power = 18, 0.75
    item_counts = rng.integers(1, 30, size=n_items)
    # Users 1.. carry the popularity; user 0 has item 0 only, so its negatives are items 1..17.
    items = np.concatenate([[0], np.repeat(np.arange(n_items), item_counts)])
    holders = [1 + rng.choice(60, size=c, replace=False) for c in item_counts]
    users = np.concatenate([[0], *holders])
    data = Interactions(users, items, 61, n_items)
    sampler = NegativeSampler(data, strategy="popularity", power=power)
    negs = sampler.sample(
        torch.zeros(20_000, dtype=torch.int64), 10, torch.Generator().manual_seed(1)
    )
    counts = np.bincount(negs.numpy().ravel(), minlength=n_items)
    assert counts[0] == 0
    weights = data.item_counts()[1:].astype(float) ** power
    expected = weights / weights.sum() * negs.numel()
    assert chi_square(counts[1:], expected) < CHI2_16_LIMIT
    # And it is clearly not uniform: the most popular item is drawn far more than the least.
    ratio = counts[1:].max() / counts[1:].min()
    assert ratio > 0.8 * (weights.max() / weights.min())


def test_popularity_power_zero_is_uniform():
    data = Interactions(np.array([0, 1, 1, 1]), np.array([0, 1, 2, 3]), 2, 10)
    uniform = NegativeSampler(data, strategy="popularity", power=0.0)
    negs = uniform.sample(torch.zeros(9000, dtype=torch.int64), 1, torch.Generator().manual_seed(0))
    counts = np.bincount(negs.numpy().ravel(), minlength=10)[1:]
    assert chi_square(counts, np.full(9, 1000.0)) < 35.0  # 8 dof


def test_user_with_every_item_is_a_data_error():
    data = Interactions(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]), 2, 3)
    with pytest.raises(DataError, match="every item"):
        NegativeSampler(data)


def test_user_with_every_sampleable_item_is_a_data_error_under_popularity():
    # Items 3 and 4 have no training interactions, so popularity sampling can never draw them;
    # user 0 has every other item. Rejection sampling would loop forever: it must refuse.
    data = Interactions(np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0]), 2, 5)
    with pytest.raises(DataError, match="no negatives"):
        NegativeSampler(data, strategy="popularity", power=1.0)


def test_unknown_strategy():
    data = Interactions(np.array([0]), np.array([0]), 1, 3)
    with pytest.raises(DataError, match="unknown sampling strategy"):
        NegativeSampler(data, strategy="hard")  # type: ignore[arg-type]


def epoch(data: Interactions, k: int, batch: int, seed: int, **kw):
    sampler = NegativeSampler(data)
    return list(
        epoch_batches(
            torch.from_numpy(data.user_idx),
            torch.from_numpy(data.item_idx),
            sampler,
            num_negatives=k,
            batch_size=batch,
            generator=torch.Generator().manual_seed(seed),
            **kw,
        )
    )


@settings(max_examples=30, deadline=None)
@given(data=datasets(), k=st.integers(1, 4), batch=st.integers(1, 50), seed=st.integers(0, 999))
def test_epoch_covers_each_positive_once_plus_k_negatives(data, k, batch, seed):
    batches = epoch(data, k, batch, seed)
    if not len(data):
        assert batches == []
        return
    assert all(len(u) == batch for u, _, _ in batches[:-1])
    assert 1 <= len(batches[-1][0]) <= batch
    users = torch.cat([b[0] for b in batches]).tolist()
    items = torch.cat([b[1] for b in batches]).tolist()
    labels = torch.cat([b[2] for b in batches]).tolist()
    assert len(users) == len(data) * (1 + k)
    pos = sorted((u, i) for u, i, y in zip(users, items, labels, strict=True) if y == 1.0)
    assert pos == sorted(positive_set(data))
    negatives = [(u, i) for u, i, y in zip(users, items, labels, strict=True) if y == 0.0]
    assert not set(negatives) & positive_set(data)
    neg_per_user = np.bincount([u for u, _ in negatives], minlength=data.n_users)
    np.testing.assert_array_equal(neg_per_user, k * data.user_counts())


def test_epoch_is_deterministic_for_a_seed_and_shuffled():
    rng = np.random.default_rng(0)
    keys = rng.choice(30 * 40, size=300, replace=False)
    data = Interactions(keys // 40, keys % 40, 30, 40)
    a, b, c = epoch(data, 4, 128, 7), epoch(data, 4, 128, 7), epoch(data, 4, 128, 8)
    for x, y in zip(a, b, strict=True):
        for tx, ty in zip(x, y, strict=True):
            assert torch.equal(tx, ty)
    assert not torch.equal(a[0][1], c[0][1])
    labels = torch.cat([bt[2] for bt in a])
    # Positives are spread through the epoch, not all in the first batches.
    assert 0.1 < labels[: len(labels) // 2].mean() < 0.3


def test_epoch_shards_are_disjoint_and_equal_sized():
    rng = np.random.default_rng(0)
    keys = rng.choice(20 * 30, size=101, replace=False)
    data = Interactions(keys // 30, keys % 30, 20, 30)
    shards = [epoch(data, 2, 1000, 3, rank=r, world_size=2) for r in range(2)]
    positives = []
    for shard in shards:
        u, i, y = (torch.cat(t) for t in zip(*shard, strict=True))
        assert len(u) == 50 * 3
        positives.append(
            {(a, b) for a, b, c in zip(u.tolist(), i.tolist(), y.tolist(), strict=True) if c}
        )
    assert not positives[0] & positives[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sampling_and_batches_on_cuda():
    rng = np.random.default_rng(0)
    keys = rng.choice(50 * 40, size=600, replace=False)
    data = Interactions(keys // 40, keys % 40, 50, 40)
    sampler = NegativeSampler(data, strategy="popularity", device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    users = torch.from_numpy(data.user_idx).cuda()
    items = torch.from_numpy(data.item_idx).cuda()
    batches = list(
        epoch_batches(users, items, sampler, num_negatives=3, batch_size=256, generator=gen)
    )
    u, i, y = (torch.cat(t).cpu() for t in zip(*batches, strict=True))
    assert len(u) == 600 * 4 and int(y.sum()) == 600
    negatives = {
        (a, b) for a, b, c in zip(u.tolist(), i.tolist(), y.tolist(), strict=True) if not c
    }
    assert not negatives & positive_set(data)


def weighted_epoch(data: Interactions, weights: torch.Tensor, seed: int, **kw):
    """The same epoch with and without per-positive weights (chunked, so tails carry over)."""
    args = (torch.from_numpy(data.user_idx), torch.from_numpy(data.item_idx), NegativeSampler(data))
    common = {"num_negatives": 3, "batch_size": 13, "chunk": 17, **kw}
    plain = list(epoch_batches(*args, generator=torch.Generator().manual_seed(seed), **common))
    weighted = list(
        epoch_batches(
            *args, generator=torch.Generator().manual_seed(seed), weights=weights, **common
        )
    )
    return plain, weighted


@pytest.mark.parametrize(("rank", "world_size"), [(0, 1), (0, 3), (2, 3)])
def test_weights_follow_their_positives_and_negatives_weigh_one(rank: int, world_size: int):
    rng = np.random.default_rng(rank + world_size)
    keys = rng.choice(25 * 30, size=160, replace=False)
    data = Interactions(keys // 30, keys % 30, 25, 30)
    # Distinct weights, so a positive given another positive's weight would be caught.
    weights = torch.from_numpy(rng.permutation(len(data)).astype(np.float32) + 2.0)
    lookup = dict(zip(data.keys.tolist(), weights.tolist(), strict=True))
    plain, weighted = weighted_epoch(data, weights, seed=5, rank=rank, world_size=world_size)
    assert all(len(b) == 3 for b in plain) and all(len(b) == 4 for b in weighted)
    # Weights draw no random numbers: the batches are those of the unweighted epoch.
    for a, b in zip(plain, weighted, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b[:3], strict=False))
    u, i, y, w = (torch.cat(t) for t in zip(*weighted, strict=True))
    assert w.dtype == torch.float32
    pos = y == 1
    expected = [lookup[k] for k in (u[pos] * data.n_items + i[pos]).tolist()]
    assert w[pos].tolist() == expected
    assert len(expected) == len(data) // world_size
    assert torch.all(w[~pos] == 1.0)


def test_weights_must_match_the_positives():
    data = Interactions(np.array([0, 1]), np.array([0, 1]), 2, 3)
    with pytest.raises(DataError, match="weights has shape"):
        weighted_epoch(data, torch.ones(3), seed=0)


def test_context_rows_follow_their_positives_and_negatives_share_them():
    rng = np.random.default_rng(3)
    keys = rng.choice(25 * 30, size=160, replace=False)
    data = Interactions(keys // 30, keys % 30, 25, 30)
    # A distinct context row per positive (its own key twice), so a mix-up would be caught.
    context = torch.from_numpy(np.stack([data.keys, -data.keys], 1))
    weights = torch.ones(len(data))
    plain, both = weighted_epoch(data, weights, seed=7, context=context)
    assert all(len(b) == 5 for b in both)  # users, items, labels, weights, then context
    for a, b in zip(plain, both, strict=True):  # context draws no random numbers either
        assert all(torch.equal(x, y) for x, y in zip(a, b[:3], strict=False))
    u, i, y, _, ctx = (torch.cat(t) for t in zip(*both, strict=True))
    pos = y == 1
    assert torch.equal(ctx[pos, 0], u[pos] * data.n_items + i[pos])
    assert torch.equal(ctx[:, 1], -ctx[:, 0])
    # a negative carries the context of a positive of the same user
    assert torch.equal(ctx[~pos, 0] // data.n_items, u[~pos])
    assert set(ctx[~pos, 0].tolist()) <= set(ctx[pos, 0].tolist())


def test_context_must_match_the_positives():
    data = Interactions(np.array([0, 1]), np.array([0, 1]), 2, 3)
    users, items = torch.from_numpy(data.user_idx), torch.from_numpy(data.item_idx)
    with pytest.raises(DataError, match="context has 3 rows"):
        next(
            epoch_batches(
                users, items, NegativeSampler(data), num_negatives=1, batch_size=4,
                generator=torch.Generator(), context=torch.zeros(3, 2, dtype=torch.long),
            )
        )  # fmt: skip
