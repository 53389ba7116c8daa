"""Losses on hand-computed cases, the logQ correction, and each ranking loss learning the planted
clusters with MF."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ranking_fixtures import hit_rate, planted_split, popularity_hit_rate, train_ranking
from recommender.data.sampling import PoolSampler
from recommender.losses import bce, bpr, ccl, sampled_softmax, softmax
from recommender.models import MF


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_bce_by_hand():
    logits, labels = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 0.0])
    each = [-log_sigmoid(2.0), -log_sigmoid(1.0)]  # log(1 - σ(-1)) = log σ(1)
    assert float(bce(logits, labels)) == pytest.approx(sum(each) / 2, abs=1e-6)
    weighted = bce(logits, labels, torch.tensor([3.0, 1.0]))
    assert float(weighted) == pytest.approx((3 * each[0] + each[1]) / 4, abs=1e-6)


def test_softmax_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    z = math.log(math.exp(2) + 1 + math.exp(-1))
    each = [z - 2.0, math.log(3)]
    assert float(softmax(logits, torch.tensor([0, 2]))) == pytest.approx(sum(each) / 2, abs=1e-6)
    weighted = softmax(logits, torch.tensor([0, 2]), torch.tensor([1.0, 3.0]))
    assert float(weighted) == pytest.approx((each[0] + 3 * each[1]) / 4, abs=1e-6)


def test_sampled_softmax_by_hand():
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 2.0]])
    plain = math.log(math.exp(1) + 1 + math.exp(2)) - 1
    assert float(sampled_softmax(pos, neg)) == pytest.approx(plain, abs=1e-6)
    # logQ: each logit minus the log of its expected copies in the pool
    q_pos, q_neg = torch.tensor([math.log(0.5)]), torch.tensor([math.log(2.0), math.log(0.25)])
    s_pos, s_neg = 1 - math.log(0.5), [0 - math.log(2.0), 2 - math.log(0.25)]
    corrected = math.log(math.exp(s_pos) + sum(map(math.exp, s_neg))) - s_pos
    got = sampled_softmax(pos, neg, log_q_pos=q_pos, log_q_neg=q_neg)
    assert float(got) == pytest.approx(corrected, abs=1e-6)


def test_sampled_softmax_drops_accidental_hits():
    pos_items, pool = torch.tensor([7, 3]), torch.tensor([3, 5, 7])
    pos, neg = torch.tensor([1.0, 1.0]), torch.tensor([[0.5, 0.0, 9.0], [9.0, 0.0, 0.5]])
    got = sampled_softmax(pos, neg, pos_items=pos_items, neg_items=pool)
    # row 0 drops item 7 (its positive), row 1 item 3: the 9.0 logits never count
    expected = math.log(math.exp(1) + math.exp(0.5) + 1) - 1
    assert float(got) == pytest.approx(expected, abs=1e-6)
    # a hit's logit gets no gradient either
    neg.requires_grad_(True)
    sampled_softmax(pos, neg, pos_items=pos_items, neg_items=pool).backward()
    assert neg.grad is not None and neg.grad[0, 2] == 0 and neg.grad[1, 0] == 0


def test_bpr_by_hand_and_its_gradient_direction():
    pos = torch.tensor([1.0, 0.0], requires_grad=True)
    neg = torch.tensor([[0.0, 3.0], [1.0, -1.0]], requires_grad=True)
    each = [-log_sigmoid(1.0), -log_sigmoid(-2.0), -log_sigmoid(-1.0), -log_sigmoid(1.0)]
    value = bpr(pos, neg)
    assert float(value.detach()) == pytest.approx(sum(each) / 4, abs=1e-6)
    value.backward()
    assert pos.grad is not None and neg.grad is not None
    assert (pos.grad < 0).all() and (neg.grad > 0).all()  # descent: positives up, negatives down


def test_ccl_by_hand_and_its_gradient_direction():
    pos = torch.tensor([0.9, 0.2], requires_grad=True)
    neg = torch.tensor([[0.7, 0.1], [0.6, 0.55]], requires_grad=True)
    # margin 0.5, weight 2: row 0 (1 - 0.9) + 2/2 (0.2 + 0); row 1 (1 - 0.2) + 2/2 (0.1 + 0.05)
    value = ccl(pos, neg, margin=0.5, neg_weight=2.0)
    assert float(value.detach()) == pytest.approx((0.3 + 0.95) / 2, abs=1e-6)
    value.backward()
    assert pos.grad is not None and neg.grad is not None
    assert (pos.grad < 0).all()
    assert neg.grad[0, 0] > 0 and neg.grad[0, 1] == 0  # below the margin: no push


def test_pool_sampler_log_q_is_the_expected_count():
    counts = torch.tensor([6.0, 3.0, 1.0, 0.0])
    batch = torch.tensor([0, 1])
    uniform = PoolSampler(counts, 8)
    torch.testing.assert_close(uniform.log_q(batch, 2), torch.full((2,), math.log(8 / 4)))
    mixed = PoolSampler(counts, 8, alpha=1.0, in_batch=True)
    # 8 draws by popularity plus the batch's 2 positives, both from f = counts / 10
    expected = torch.log(10 * counts[:3] / 10)
    torch.testing.assert_close(mixed.log_q(torch.tensor([0, 1, 2]), 2), expected)
    items, log_q = mixed.sample(batch, torch.Generator().manual_seed(0))
    assert len(items) == 10 and (items[8:] == batch).all()
    assert not (items == 3).any()  # zero count: never drawn by popularity
    torch.testing.assert_close(log_q, mixed.log_q(items, 2))


def test_pool_sampler_draws_by_popularity():
    counts = torch.tensor([1.0, 3.0])
    pool = PoolSampler(counts, 40_000, alpha=1.0)
    items, _ = pool.sample(torch.tensor([0]), torch.Generator().manual_seed(0))
    assert float((items == 1).float().mean()) == pytest.approx(0.75, abs=0.01)
    with pytest.raises(ValueError, match="empty pool"):
        PoolSampler(counts, 0)


def test_logq_correction_brings_the_gradient_close_to_the_full_softmax():
    """Many popularity-drawn pools for one row: the mean gradient on the negatives' logits
    approximates the full softmax's once corrected; uncorrected it over-pushes popular items."""
    n, rows, size, target = 200, 4000, 40, 3
    logits = torch.randn(n, generator=torch.Generator().manual_seed(0))
    counts = torch.arange(n, 0, -1).double() ** 1.5
    pool = PoolSampler(counts, size, alpha=1.0)
    g = torch.Generator().manual_seed(1)
    items = torch.stack([pool.sample(torch.tensor([target]), g)[0] for _ in range(rows)])
    pos = torch.full((rows,), target)

    def grad(correct: bool) -> torch.Tensor:
        s = logits.clone().requires_grad_(True)
        q = {"log_q_pos": pool.log_q(pos, 1), "log_q_neg": pool.log_q(items, 1)}
        sampled_softmax(
            s[pos], s[items], pos_items=pos, neg_items=items, **(q if correct else {})
        ).backward()
        assert s.grad is not None
        return s.grad

    full = F.softmax(logits, 0) - F.one_hot(torch.tensor(target), n)
    others = torch.arange(n) != target

    def error(g: torch.Tensor) -> float:
        return float((g[others] - full[others]).norm() / full[others].norm())

    corrected, uncorrected = error(grad(True)), error(grad(False))
    assert corrected < 0.25 and corrected < 0.6 * uncorrected, (corrected, uncorrected)


LOSSES = [
    "bpr", "ccl", "sampled_softmax/uniform", "sampled_softmax/popularity",
    "sampled_softmax/in_batch",
]  # fmt: skip


@pytest.mark.parametrize("loss", LOSSES)
def test_each_ranking_loss_learns_the_planted_clusters(loss: str):
    history, held = planted_split()
    torch.manual_seed(0)
    model = MF(history.n_users, history.n_items, 16)
    if loss == "ccl":
        # SimpleX scores by cosine: the loss and the ranking both see normalised vectors
        def score(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            items = F.normalize(model.item_emb.weight, dim=-1)
            return (F.normalize(model.user_emb(u), dim=-1) @ items.T).gather(1, i)

        params = [model.user_emb.weight, model.item_emb.weight]
        train_ranking(params, score, history, loss)
        users, items = (F.normalize(t.weight, dim=-1) for t in (model.user_emb, model.item_emb))
        ours = hit_rate((users @ items.T).detach(), history, held)
    else:

        def score(u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            return model(u).gather(1, i)  # the tiny catalog: cheaper than gathering pairs

        train_ranking(model.parameters(), score, history, loss)
        ours = hit_rate(model, history, held)
    baseline = popularity_hit_rate(history, held)
    assert ours > baseline + 0.25, (ours, baseline)
