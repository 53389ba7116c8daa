"""A SASRec run answering as an mf-context run does: what follows given items (a session, or a
known user's stored sequence and then the items), by the library, the command line and the
service; and its explanations, by occlusion of the sequence the model read, with the
faithfulness criterion of test_explain.py and the planted walks' known answer.

Every user of `sequential_frame` walks one fixed cycle, so what follows a walk is its next
step, and what explains that step is the walk's latest item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import run_cli, walk_successors
from recommender.explain import SequenceExplainer
from recommender.inference import Recommender
from recommender.models import SASRec
from recommender.serving import create_app

USER = "u10"
USERS = range(0, 160, 20)  # 8 users, as in test_explain.py
TOP = 3  # recommended items explained per user, and items removed
DRAWS = 10  # random removals averaged per pair


@pytest.fixture(scope="module")
def rec(sasrec_run: Path) -> Recommender:
    return Recommender.from_run(sasrec_run)


def walks(rec: Recommender, user: str | None = None) -> list[list[str]]:
    """Two steps of a walk from each item (oldest first) whose steps and next step are none of
    `user`'s history: given as recent items, nothing of them is left out of a list."""
    after = walk_successors()
    seen = set(rec.user_history(user).tolist()) if user else set()
    starts = [i for i in rec.items.to_list() if not {i, after[i], after[after[i]]} & seen]
    return [[i, after[i]] for i in starts[:40]]


def test_what_follows_a_session_or_a_users_recent_items_is_the_next_step(rec: Recommender):
    after = walk_successors()
    assert rec.reads_context and rec.model_name == "sasrec"
    for user in (None, USER):
        given = walks(rec, user)
        first = [rec.recommend_next(w, k=1, user_id=user)[0][0] for w in given]
        hits = [f == after[w[-1]] for f, w in zip(first, given, strict=True)]
        assert np.mean(hits) > 0.9, (user, np.mean(hits))
    # without recent items, a known user's list follows their stored sequence
    stored = rec.user_history(USER).tolist()  # the stored items first, latest first
    assert rec.recommend(USER, k=1)[0][0] == after[stored[0]]
    ranked, _ = rec.recommend_next(given[0], k=len(rec.items), user_id=USER)
    assert not {i for i in ranked if i is not None} & {*stored, *given[0]}


def test_a_short_stored_sequence_and_the_given_items_are_read_side_by_side(sasrec_run: Path):
    """A user with fewer stored items than max_len: their items and the given ones are read as
    one session of all of them, the padding before them all. Padding left between the two would
    move every stored item to a position it was never trained at, and change the scores."""
    rec = Recommender.from_run(sasrec_run)
    model = rec.model
    assert isinstance(model, SASRec)
    pad, user = len(rec.items), int(rec.users.index([USER])[0])
    short = torch.full_like(model.latest[user], pad)
    short[-4:] = model.latest[user, -4:]
    model.latest[user] = short  # 4 items after 12 slots of padding
    stored = rec.items.to_ids(short[-4:].numpy()).tolist()
    after = walk_successors()
    recent = [after[stored[-1]], after[after[stored[-1]]]]
    everything = len(rec.items)
    ids, scores = rec.recommend_next(recent, k=everything, user_id=USER, exclude_seen=False)
    session_ids, session_scores = rec.recommend_next(
        stored + recent, k=everything, exclude_seen=False
    )
    order, session_order = np.argsort(ids.astype(str)), np.argsort(session_ids.astype(str))
    assert ids[order].tolist() == session_ids[session_order].tolist()
    np.testing.assert_allclose(scores[order], session_scores[session_order], atol=1e-6)
    assert ids[0] == after[recent[-1]]
    # A row of given items padded to a width (a batch pads its shorter sessions) would leave
    # its padding between the stored items and the given ones: score_after closes the gap, and
    # the gap changes what the model reads, so the checks above can fail.
    row = torch.cat([torch.full((2,), pad), torch.from_numpy(rec.items.index(recent))])[None]
    with torch.no_grad():
        session = model.last_hidden(torch.from_numpy(rec.items.index(stored + recent))[None])
        closed = model.last_hidden(model.sequence_after(row, torch.tensor([user])))
        gapped = model.last_hidden(torch.cat([short[None], row], 1))
    assert torch.allclose(closed, session, atol=1e-6)
    assert not torch.allclose(gapped, session, atol=1e-3)


def test_command_line_and_service_answer_what_follows(rec: Recommender, sasrec_run: Path, capsys):
    after = walk_successors()
    session, recent = walks(rec)[0], walks(rec, USER)[0]
    args = ["recommend", "--run", str(sasrec_run), "--user", USER, "--k", "3", "--explain"]
    code, out, err = run_cli([*args, "--after", *recent], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert [line.split()[1] for line in lines[1::2]] == rec.recommend_next(
        recent, k=3, user_id=USER
    )[0].tolist()
    assert out.count("because you liked") >= 1
    with TestClient(create_app(sasrec_run)) as c:
        body = {"session_item_ids": session, "k": 3}
        anonymous = c.post("/v1/recommendations", json=body).json()["results"][0]
        body = {"user_ids": [USER], "session_item_ids": recent, "k": 3, "explain": True}
        known = c.post("/v1/recommendations", json=body).json()["results"][0]
        stored = c.get(f"/v1/users/{USER}/recommendations", params={"k": 3}).json()
        history = c.get(f"/v1/users/{USER}/history", params={"n": 3}).json()
    ids = [i["item_id"] for i in anonymous["items"]]
    assert anonymous["representation"] == "session" and ids[0] == after[session[-1]]
    assert ids == rec.recommend_next(session, k=3)[0].tolist()
    ids = [i["item_id"] for i in known["items"]]
    assert known["representation"] == "trained" and ids[0] == after[recent[-1]]
    assert ids == rec.recommend_next(recent, k=3, user_id=USER)[0].tolist()
    why = known["items"][0]["explanation"]
    assert why["method"] == "sequence occlusion" and why["supporting_items"][0] == recent[-1]
    latest = [i["item_id"] for i in history["items"]]
    assert latest == rec.user_history(USER).tolist()[:3]
    assert stored["items"][0]["item_id"] == after[latest[0]]


def test_a_walks_next_step_is_explained_by_its_latest_item(rec: Recommender):
    """The planted cycle: a user's top item is the step after their latest stored item, and
    that item supports it most; after given items, the latest given one does, and the explained
    score is the one the list shows."""
    after = walk_successors()
    hits = []
    for user in rec.users.to_list()[:40]:
        top = rec.recommend(user, k=1)[0][0]
        why = rec.explain_many(user, [top], n=3)[0]
        latest = rec.user_history(user)[0]
        hits.append(top == after[latest] and why.supporting_items[:1] == [latest])
    assert np.mean(hits) > 0.9, np.mean(hits)
    recent = walks(rec, USER)[0]
    items, scores = rec.recommend_next(recent, k=3, user_id=USER)
    whys = rec.explain_many(USER, items, n=3, after=recent)
    assert whys[0].supporting_items[0] == recent[-1] and whys[0].method == "sequence occlusion"
    assert all(w.fidelity == 1.0 for w in whys)
    np.testing.assert_allclose([w.score for w in whys], scores, atol=1e-4)
    assert whys[0].baseline_score is not None and whys[0].baseline_score < scores[0]


def test_removing_the_top_attributed_items_lowers_the_score_most(rec: Recommender):
    """test_explain.py's criterion: for each (user, recommended item) pair whose score the
    sequence moves, removing the TOP items with the largest weights from the sequence the model
    read lowers the score more than removing TOP random items of it (mean of DRAWS draws)."""
    model = rec.model
    assert isinstance(model, SASRec)
    explainer, pad = SequenceExplainer(model), len(rec.items)
    rng = np.random.default_rng(0)
    gaps = []
    for user in USERS:
        items, _ = rec.recommend(rec.users.to_ids(np.array([user]))[0], k=TOP)
        targets = torch.from_numpy(rec.items.index(items.tolist()))
        history = torch.from_numpy(rec.history_of(user))
        why = explainer.user(user, history).attribute(targets)
        sequence = model.latest[user]
        read = sequence[sequence != pad].numpy()
        removals = [history[why.weights[t].topk(TOP).indices] for t in range(len(targets))]
        removals += [torch.from_numpy(rng.choice(read, TOP, replace=False)) for _ in range(DRAWS)]
        batch = torch.stack([torch.where(torch.isin(sequence, r), pad, sequence) for r in removals])
        with torch.no_grad():
            scores = torch.sigmoid(model.score_after(batch)[:, targets])  # (T + DRAWS, T)
        drop_top = why.score - scores[: len(targets)].diagonal()
        drop_random = why.score - scores[len(targets) :].mean(0)
        moved = (why.score - why.baseline).abs() > 0.01
        gaps.append((drop_top - drop_random)[moved])
    gap = torch.cat(gaps)
    assert len(gap) >= len(USERS) * TOP // 2
    assert bool((gap > 0).all()), gap
    assert float(gap.mean()) > 0.01
