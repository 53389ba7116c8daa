"""SASRec and its data: causality, padding and truncation invariance, the SASRec data format,
the last-two-out split, the losses on hand cases, and a planted cycle the model must learn."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from recommender.data.interactions import Interactions
from recommender.data.sequences import (
    last_two_out,
    latest_sequences,
    read_sasrec,
    training_sequences,
)
from recommender.models.sasrec import (
    SASRec,
    gbce_beta,
    gbce_loss,
    sampled_softmax_loss,
    sequence_softmax_loss,
)
from recommender.utils import DataError

N_ITEMS = 30


def model(max_len: int = 8, **kwargs: int) -> SASRec:
    torch.manual_seed(0)
    return SASRec(n_users=4, n_items=N_ITEMS, dim=16, max_len=max_len, **kwargs).eval()


def random_seq(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, N_ITEMS, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_output_at_a_position_ignores_later_items() -> None:
    net = model(n_heads=2)
    seq = random_seq(3, 8)
    changed = seq.clone()
    changed[:, 5:] = random_seq(3, 3, seed=1)
    before, after = net.encode(seq), net.encode(changed)
    assert torch.allclose(before[:, :5], after[:, :5], atol=1e-6)
    assert not torch.allclose(before[:, 5:], after[:, 5:])


def test_left_padding_changes_no_real_output() -> None:
    net = model()
    seq = random_seq(2, 5)
    seq[0, :2] = N_ITEMS  # the first row has 3 items, the second 5
    padded = torch.cat([torch.full((2, 3), N_ITEMS), seq], 1)  # (2, 8)
    short, long = net.encode(seq), net.encode(padded)
    real = seq != N_ITEMS
    assert torch.allclose(short[real], long[:, 3:][real], atol=1e-6)
    assert torch.allclose(net.score_after(seq), net.score_after(padded), atol=1e-5)
    assert torch.isfinite(long).all()


def test_sequences_longer_than_max_len_read_their_latest_items() -> None:
    net = model(max_len=4)
    seq = random_seq(2, 7)
    assert torch.equal(net.score_after(seq), net.score_after(seq[:, -4:]))
    with pytest.raises(ValueError, match="max_len 4"):
        net.encode(seq)


def interactions(users: list[int], items: list[int], times: list[int]) -> Interactions:
    return Interactions(
        np.array(users), np.array(items), max(users) + 1, N_ITEMS, timestamp=np.array(times)
    )


def test_sequences_are_time_ordered_truncated_and_left_padded() -> None:
    # user 0: items 5, 4, 3, 2, 1 at times 1..5 (given out of order); user 1: one item;
    # user 2: a tie at time 7, broken by item index (8 before 9).
    data = interactions(
        [0, 0, 0, 0, 0, 1, 2, 2], [3, 5, 1, 4, 2, 6, 9, 8], [3, 1, 5, 2, 4, 9, 7, 7]
    )
    pad = N_ITEMS
    assert latest_sequences(data, 3).tolist() == [[3, 2, 1], [pad, pad, 6], [pad, 8, 9]]
    inputs, targets = training_sequences(data, 3)
    # User 0's four targets take two windows of 3: the latest, then one more row for item 4.
    assert inputs.tolist() == [[4, 3, 2], [pad, pad, pad], [pad, pad, 8], [pad, pad, 5]]
    assert targets.tolist() == [[3, 2, 1], [pad, pad, pad], [pad, pad, 9], [pad, pad, 4]]


@pytest.mark.parametrize("max_len", [1, 2, 3, 7, 50])
def test_training_sequences_predict_every_item_once(max_len: int) -> None:
    # Every (item, next item) pair of every user's sequence is one (input, target) cell, once,
    # whatever max_len cuts the sequences into.
    rng = np.random.default_rng(0)
    keys = rng.choice(40 * N_ITEMS, 600, replace=False)
    users, items = keys // N_ITEMS, keys % N_ITEMS
    data = Interactions(users, items, 40, N_ITEMS, timestamp=rng.permutation(len(keys)))
    inputs, targets = training_sequences(data, max_len)
    assert inputs.shape == targets.shape and inputs.shape[1] == max_len
    found = targets != N_ITEMS
    pairs = sorted(zip(inputs[found].tolist(), targets[found].tolist(), strict=True))
    order = data.time_order()
    u, i = users[order], items[order]
    same = u[1:] == u[:-1]
    assert pairs == sorted(zip(i[:-1][same].tolist(), i[1:][same].tolist(), strict=True))


def test_sequences_need_timestamps() -> None:
    data = Interactions(np.array([0, 0]), np.array([1, 2]), 1, N_ITEMS)
    with pytest.raises(DataError, match="timestamps"):
        training_sequences(data, 3)


def test_last_two_out_holds_out_only_users_with_three_or_more() -> None:
    # user 0: 4 rows (times 4, 1, 3, 2), user 1: 2 rows, user 2: 3 rows with a tie at the end.
    data = interactions(
        [0, 0, 0, 0, 1, 1, 2, 2, 2], [1, 2, 3, 4, 1, 2, 7, 6, 5], [4, 1, 3, 2, 1, 2, 1, 5, 5]
    )
    train, valid, test = last_two_out(data)
    assert np.flatnonzero(test).tolist() == [0, 7]  # user 2's tie: item 6 is later than 5
    assert np.flatnonzero(valid).tolist() == [2, 8]
    assert np.flatnonzero(train).tolist() == [1, 3, 4, 5, 6]


def test_read_sasrec_gives_line_order_as_time(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("1 10\n1 007\n\n2 10\r\n")
    frame = read_sasrec(path)
    assert frame["user_id"].tolist() == ["1", "1", "2"]
    assert frame["item_id"].tolist() == ["10", "7", "10"]
    assert frame["timestamp"].tolist() == [1, 2, 4]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1 2\n1 x\n", "line 2: item 'x' is not an integer"),
        ("1 2\n-1 3\n", "line 2: user '-1' is not an integer"),
        ("1 2 3\n1 3\n", "line 1: expected 2 fields, found 3"),
        ("1 2\n\n1 3 4\n", "line 3: expected 2 fields, found 3"),
        ("1 2\n1 3 4 5\n", "line 2: expected 2 fields, found 4"),
        ("1 2\n3\n", "line 2: expected 2 fields, found 1"),
        ("", "file is empty"),
        ("\n\n", "file is empty"),
    ],
)
def test_read_sasrec_names_file_and_line_of_bad_input(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.txt"
    path.write_text(text)
    with pytest.raises(DataError, match=f"bad.txt {message}|bad.txt: {message}"):
        read_sasrec(path)


def test_softmax_loss_on_a_hand_case() -> None:
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, math.log(2), 0.0], [5.0, 1.0, 2.0]]])
    targets = torch.tensor([[1, 1, 3]])  # the last position has no target
    expected = (math.log(3) + math.log(2)) / 2  # -log(1/3), -log(2/4)
    assert sequence_softmax_loss(logits, targets).item() == pytest.approx(expected)


def test_sampled_softmax_over_every_other_item_is_the_full_softmax() -> None:
    """Negatives that are the whole catalog but the target, once each, without logQ: the
    catalog's cross-entropy. With logQ, each negative's logit drops by log(K / n_items)."""
    torch.manual_seed(0)
    catalog = torch.randn(5, 5)  # 5 positions, 5 items
    targets = torch.tensor([0, 4, 2, 1, 3])
    others = torch.stack([torch.cat([row[t : t + 1], row[torch.arange(5) != t]]) for row, t in
                          zip(catalog, targets, strict=True)])  # fmt: skip
    expected = sequence_softmax_loss(catalog, targets).item()
    assert sampled_softmax_loss(others, 5, logq=False).item() == pytest.approx(expected)
    logits = torch.tensor([[1.0, 0.0, -torch.inf]])  # a negative equal to the target: -inf
    shift = math.log(2 / 10)  # K = 2 uniform draws from 10 items
    expected_q = math.log(math.exp(1.0) + math.exp(-shift)) - 1.0
    assert sampled_softmax_loss(logits, 10).item() == pytest.approx(expected_q)


def test_gbce_on_a_hand_case() -> None:
    # 5 items, 2 negatives: sampling rate alpha = 2 / 4, beta = alpha (t (1 - 1/alpha) + 1/alpha)
    assert gbce_beta(2, 5, 0.0) == pytest.approx(1.0)
    assert gbce_beta(2, 5, 1.0) == pytest.approx(0.5)
    assert gbce_beta(2, 5, 0.5) == pytest.approx(0.75)
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3), -math.log(3), 0.0]])
    first = 0.75 * math.log(2) + 2 * math.log(2)
    second = -0.75 * math.log(3 / 4) - math.log(3 / 4) - math.log(1 / 2)
    assert gbce_loss(logits, 5, t=0.5).item() == pytest.approx((first + second) / 2)


def test_training_logits_agree_with_serving_scores() -> None:
    net = model(max_len=6)
    seq = random_seq(2, 6)
    seq[0, :2] = N_ITEMS
    targets = torch.roll(seq, -1, 1)
    targets[:, -1] = 0  # the item after each sequence
    targets[0, :2] = N_ITEMS
    catalog = net(seq, targets)  # (N, n_items) at the 10 positions with a target
    assert catalog.shape == (10, N_ITEMS)
    negatives = torch.tensor([3, 7, 11])
    sampled = net(seq, targets, negatives)  # (10, 4): the same positions, target first
    real = targets != N_ITEMS
    assert sampled.shape == (10, 4)
    assert torch.allclose(sampled[:, 0], catalog.gather(1, targets[real][:, None])[:, 0])
    own = negatives == targets[real][:, None]  # a negative drawn as the position's target
    assert own.any()
    assert torch.isneginf(sampled[:, 1:][own]).all()
    assert torch.allclose(sampled[:, 1:][~own], catalog[:, negatives][~own], atol=1e-6)
    assert torch.allclose(catalog[-1], net.score_after(seq[1:, :6]), atol=1e-5)


def test_stored_latest_sequences_serve_the_recmodel_contract() -> None:
    net = model(max_len=5)
    seqs = random_seq(4, 5, seed=3).numpy()
    seqs[1, :3] = N_ITEMS
    net.set_latest(seqs)
    users = torch.arange(net.n_users)
    scores = net.score_all(users)
    assert torch.allclose(scores, net.score_after(torch.from_numpy(seqs)), atol=1e-5)
    items = torch.tensor([0, 5, 9, 29])
    assert torch.allclose(net(users, items), scores[users, items], atol=1e-5)
    user_vecs, item_vecs = net.retrieval_vectors()
    assert torch.allclose(user_vecs @ item_vecs.T, scores, atol=1e-5)


def test_state_dict_round_trip_rebuilds_the_model() -> None:
    net = model(max_len=5, n_blocks=3, n_heads=2)
    net.set_latest(random_seq(4, 5, seed=3).numpy())
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    rebuilt = SASRec(n_users=4, n_items=N_ITEMS, dim=16, max_len=5, n_blocks=3, n_heads=2)
    rebuilt.load_state_dict(torch.load(buffer, weights_only=True))
    rebuilt.eval()
    users = torch.arange(4)
    assert torch.equal(rebuilt.score_all(users), net.score_all(users))


def test_planted_cycle_next_step_ranks_first() -> None:
    """Users walk a fixed cycle of items from random starts; after any walk the next item is
    the cycle's next step, which the model must rank first from the sequence alone."""
    rng = np.random.default_rng(0)
    n_users, cycle, max_len = 64, rng.permutation(N_ITEMS), 10
    lengths = rng.integers(3, 15, n_users)
    starts = rng.integers(0, N_ITEMS, n_users)
    users = np.repeat(np.arange(n_users), lengths)
    step = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    items = cycle[(np.repeat(starts, lengths) + step) % N_ITEMS]
    data = Interactions(users, items, n_users, N_ITEMS, timestamp=step)
    inputs, targets = (torch.from_numpy(a) for a in training_sequences(data, max_len))

    torch.manual_seed(0)
    net = SASRec(n_users, N_ITEMS, dim=32, max_len=max_len, n_blocks=1, dropout=0.1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(80):
        batch = torch.randperm(n_users, generator=gen)[:32]
        x, y = inputs[batch], targets[batch]
        loss = sequence_softmax_loss(net(x, y), y[y != N_ITEMS])
        opt.zero_grad()
        loss.backward()
        opt.step()

    net.eval()
    latest = latest_sequences(data, max_len)
    with torch.no_grad():
        top = net.score_after(torch.from_numpy(latest)).argmax(1).numpy()
    last = cycle[(starts + lengths - 1) % N_ITEMS]
    following = cycle[(np.argsort(cycle)[last] + 1) % N_ITEMS]
    assert (top == following).mean() >= 0.9
