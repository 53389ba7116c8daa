"""The HTTP service: every endpoint and error in-process, then the real `recommender serve`.

The runs are the conftest's tiny GMF (items "5", "15", ...; users "u7", "u10", ...) and a
popularity run trained here, so a reload has a genuinely different model to swap in.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import (
    FAST,
    free_port,
    kill_server,
    request_in_flight,
    start_server,
    wait_ready,
    walk_successors,
)
from recommender.checkpoint import best_file_id
from recommender.cli import main
from recommender.inference import Recommender
from recommender.serving import ServeSettings, create_app, engine, indexes, lifecycle
from recommender.serving.engine import ServedModel
from recommender.serving.settings import ENV_PREFIX
from recommender.utils import ConfigError

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
USER = "u10"


@pytest.fixture(scope="module")
def pop_run(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("serving") / "pop"
    args = ["train", "--data", str(planted_csv), "--model", "popularity", "--out", str(out)]
    assert main([*args, "--set=train.progress=false", "--set=device=cpu"]) == 0
    return out


@pytest.fixture(scope="module")
def other_gmf_run(planted_csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gmf_run's data and config with another seed: the same ids, another model version."""
    out = tmp_path_factory.mktemp("serving") / "gmf-seed7"
    args = ["train", "--data", str(planted_csv), "--model", "gmf", "--out", str(out)]
    assert main([*args, *(f"--set={s}" for s in [*FAST, "train.epochs=8", "seed=7"])]) == 0
    return out


@pytest.fixture(scope="module")
def rec(gmf_run: Path) -> Recommender:
    return Recommender.from_run(gmf_run)


@pytest.fixture
def client(gmf_run: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv("RECOMMENDER_ADMIN_TOKEN", TOKEN)
    app = create_app(gmf_run, ServeSettings(max_batch=4, max_session_items=3))
    with TestClient(app) as c:
        yield c


def error_field(response: httpx.Response) -> str | None:
    body = response.json()
    assert set(body) == {"detail", "errors"} and "Traceback" not in response.text
    return body["errors"][0]["field"]  # type: ignore[no-any-return]


def history(rec: Recommender, user: str) -> set[str]:
    return set(rec.items.to_ids(rec.history_of(int(rec.users.index([user])[0]))).tolist())


# -- operations --------------------------------------------------------------------------------


def test_health_ready_and_model_info(client: TestClient, gmf_run: Path):
    assert client.get("/healthz").json()["status"] == "ok"
    ready = client.get("/readyz").json()
    info = client.get("/v1/model").json()
    assert ready == {"status": "ready", "model_version": info["version"]}
    assert info["model"] == "gmf" and info["run_dir"] == str(gmf_run)
    assert info["n_items"] == 120 and info["retrieval"] == "exact"
    assert info["version"].startswith(info["config_digest"]) and info["created_at"]
    assert "hr@10" in info["valid_metrics"]
    assert client.get("/docs").status_code == 200


def test_not_ready_before_the_lifespan_loads_the_model(gmf_run: Path):
    client = TestClient(create_app(gmf_run))  # no `with`: the lifespan never runs
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503 and "not loaded" in response.json()["detail"]
    assert client.get(f"/v1/users/{USER}/recommendations").status_code == 503


def test_metrics_count_routes_statuses_and_latency(client: TestClient):
    client.get(f"/v1/users/{USER}/recommendations")
    client.get("/v1/users/nobody/recommendations")
    client.get(f"/v1/users/{USER}/recommendations?k=0")
    client.get("/no/such/path")
    text = client.get("/metrics").text
    route = 'route="/v1/users/{user_id}/recommendations"'
    assert f'recommender_http_requests_total{{method="GET",{route},status="200"}} 2' in text
    assert f'recommender_http_requests_total{{method="GET",{route},status="422"}} 1' in text
    assert 'route="(unmatched)",status="404"} 1' in text
    assert "nobody" not in text  # raw ids never become labels
    hist = "recommender_http_request_duration_seconds"
    assert f'{hist}_bucket{{le="+Inf",method="GET",{route}}} 3' in text
    assert f'{hist}_count{{method="GET",{route}}} 3' in text
    assert "# TYPE recommender_http_request_duration_seconds histogram" in text
    assert "recommender_fallback_total 1" in text
    version = client.get("/v1/model").json()["version"]
    assert f'model="gmf",retrieval="exact",version="{version}"}} 1' in text


# -- recommendations ---------------------------------------------------------------------------


def test_user_recommendations_match_the_recommender(client: TestClient, rec: Recommender):
    body = client.get(f"/v1/users/{USER}/recommendations?k=5").json()
    items, scores = rec.recommend(USER, k=5)
    assert body["user_id"] == USER and body["fallback"] is None
    assert body["representation"] == "trained"
    assert [i["item_id"] for i in body["items"]] == items.tolist()
    np.testing.assert_allclose([i["score"] for i in body["items"]], scores, rtol=1e-6)
    assert body["model_version"] == client.get("/v1/model").json()["version"]
    assert all(i["explanation"] is None for i in body["items"])


def test_exclude_seen_and_explanations(client: TestClient, rec: Recommender):
    seen = history(rec, USER)
    shown = client.get(f"/v1/users/{USER}/recommendations?k=1000").json()["items"]
    assert len(shown) == 120 - len(seen) and not seen & {i["item_id"] for i in shown}
    everything = client.get(f"/v1/users/{USER}/recommendations?k=1000&exclude_seen=false")
    assert len(everything.json()["items"]) == 120
    explained = client.get(f"/v1/users/{USER}/recommendations?k=3&explain=true").json()
    for item in explained["items"]:
        why = item["explanation"]
        assert why["method"] == "fold-in integrated gradients"
        assert set(why["supporting_items"]) <= seen and why["text"]
        assert 0 < why["fidelity"] <= 1 and 0 < why["score"] < 1


def test_plain_lists_do_not_wait_behind_explanations(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
):
    """Explained lists take their own lane: with every explanation thread stuck, plain lists,
    batches and similar items are still answered, and the explained lists finish after."""
    from recommender.serving.engine import ServedModel

    entered, release = threading.Semaphore(0), threading.Event()
    explain_many = ServedModel.explain_many

    def stuck(self: ServedModel, *args: object) -> list[dict[str, object]]:
        entered.release()
        assert release.wait(30)
        return explain_many(self, *args)

    monkeypatch.setattr(ServedModel, "explain_many", stuck)
    statuses: list[int] = []
    explained = [
        threading.Thread(
            target=lambda: statuses.append(
                client.get(f"/v1/users/{USER}/recommendations?k=3&explain=true").status_code
            )
        )
        for _ in range(2)
    ]
    for thread in explained:
        thread.start()
    assert entered.acquire(timeout=30)  # the lane's one thread holds the first explanation
    try:
        assert client.get(f"/v1/users/{USER}/recommendations?k=3").status_code == 200
        body = {"user_ids": [USER, "nobody"], "k": 2}
        assert client.post("/v1/recommendations", json=body).status_code == 200
        assert client.get("/v1/items/5/similar?k=2").status_code == 200
        assert statuses == []
    finally:
        release.set()
    for thread in explained:
        thread.join(30)
    assert statuses == [200, 200]


def wait_for(check: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_most_active_users_lists_are_explained_ahead(
    gmf_run: Path,
    other_gmf_run: Path,
    rec: Recommender,
    monkeypatch: pytest.MonkeyPatch,
):
    """Once a version serves, its most active users' top-10 lists are explained in the
    background: their explained lists are then a look-up (no fold), the same as explained on
    demand. A reload of the same best.pt keeps them; another model explains its own."""
    monkeypatch.setenv("RECOMMENDER_ADMIN_TOKEN", TOKEN)
    app = create_app(gmf_run, ServeSettings(explain_warm_users=3))
    with TestClient(app) as client:
        ahead = {"users": 3, "of": 3}
        wait_for(lambda: client.get("/v1/model").json()["explained_ahead"] == ahead)
        served = app.state.worker.served
        fold_in = served.rec._fold_in
        monkeypatch.setattr(fold_in, "user", lambda *a: pytest.fail("folded on demand"))
        for user in rec.most_active_users(3):
            body = client.get(f"/v1/users/{user}/recommendations?explain=true").json()
            ids = [item["item_id"] for item in body["items"]]
            fresh = Recommender.from_run(gmf_run).explain_many(user, ids)
            got = [item["explanation"] for item in body["items"]]
            assert [g["supporting_items"] for g in got] == [f.supporting_items for f in fresh]
            for g, f in zip(got, fresh, strict=True):
                assert g["weights"] == pytest.approx(f.weights, abs=1e-4)
        assert client.post("/admin/reload", headers=AUTH).status_code == 200
        assert app.state.worker.served.rec.explained is served.rec.explained
        other = {"run_dir": str(other_gmf_run)}
        assert client.post("/admin/reload", headers=AUTH, json=other).status_code == 200
        assert app.state.worker.served.rec.explained is not served.rec.explained
        wait_for(lambda: client.get("/v1/model").json()["explained_ahead"] == ahead)
        assert len(app.state.worker.served.rec.folds) == 0  # the folds are not kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values")
def test_explaining_ahead_rests_between_users_at_the_workers_priority(
    gmf_run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """Explaining ahead shares its worker's GIL, so it keeps the worker's priority (a lower
    one holds the GIL while other processes keep it off the cores, and the worker's requests
    wait with it) and takes about EXPLAIN_AHEAD_SHARE of a core by resting after each user."""
    served = ServedModel.load(gmf_run, ServeSettings(explain_warm_users=3), tmp_path, beside=True)
    busy_s = 0.02
    priorities: list[int] = []

    def explain_many(user: object, items: object, keep_fold: bool = True) -> None:
        priorities.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        time.sleep(busy_s)

    rests: list[float | None] = []

    class Rests(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            rests.append(timeout)
            return False

    monkeypatch.setattr(served.rec, "explain_many", explain_many)
    monkeypatch.setattr(served, "_retired", Rests())
    served.start_warming().join(30)
    assert served.warmed == 3
    assert priorities == [os.getpriority(os.PRIO_PROCESS, 0)] * 3
    rest = busy_s * (1 / engine.EXPLAIN_AHEAD_SHARE - 1)
    assert len(rests) == 3 and all(r is not None and r >= rest for r in rests)


def test_unknown_user_gets_the_popularity_fallback(client: TestClient, rec: Recommender):
    body = client.get("/v1/users/stranger/recommendations?k=4&explain=true").json()
    assert body["fallback"] == "popularity" and body["user_id"] == "stranger"
    assert body["representation"] == "popularity"
    assert [i["item_id"] for i in body["items"]] == rec.recommend("stranger", k=4)[0].tolist()
    assert body["items"][0]["explanation"]["method"] == "popularity"


@pytest.mark.parametrize("k", ["0", "1001", "-3", "abc", "2.5", ""])
def test_k_out_of_range_names_k(client: TestClient, k: str):
    response = client.get(f"/v1/users/{USER}/recommendations?k={k}")
    assert response.status_code == 422 and error_field(response) == "k"
    response = client.post("/v1/recommendations", json={"user_ids": [USER], "k": k})
    assert response.status_code == 422 and error_field(response) == "k"


def test_batch_keeps_order_and_marks_fallbacks(client: TestClient, rec: Recommender):
    users = ["u7", "nobody", USER]
    body = client.post("/v1/recommendations", json={"user_ids": users, "k": 3}).json()
    assert [r["user_id"] for r in body["results"]] == users
    assert [r["fallback"] for r in body["results"]] == [None, "popularity", None]
    expected, _ = rec.recommend(users, k=3)
    assert [[i["item_id"] for i in r["items"]] for r in body["results"]] == expected.tolist()


def test_a_new_users_history_is_folded_in(gmf_run: Path, rec: Recommender):
    """A user the model has never seen, sent with the items they interacted with, gets a list
    folded in from them, explained by them; the batch says how each user was represented."""
    seen = sorted(history(rec, USER))
    histories = {"new": [*seen, "an-item-newer-than-the-model"], "u7": seen}
    body = {"user_ids": ["u7", "new", "nobody"], "histories": histories, "k": 5}
    with TestClient(create_app(gmf_run)) as client:
        results = client.post("/v1/recommendations", json=body).json()["results"]
        alone = {"histories": {"new": seen}, "k": 3, "explain": True}
        (result,) = client.post("/v1/recommendations", json=alone).json()["results"]
    assert [r["representation"] for r in results] == ["trained", "folded_in", "popularity"]
    assert [r["fallback"] for r in results] == [None, None, "popularity"]
    expected, _ = rec.recommend(["u7", "new", "nobody"], k=5, histories=histories)
    assert [[i["item_id"] for i in r["items"]] for r in results] == expected.tolist()
    # histories alone: their users are the batch; explanations read the history
    assert result["user_id"] == "new" and result["representation"] == "folded_in"
    assert [i["item_id"] for i in result["items"]] == expected[1][:3].tolist()
    for item in result["items"]:
        why = item["explanation"]
        assert why["method"] == "fold-in integrated gradients" and why["fidelity"] is None
        assert why["supporting_items"] and set(why["supporting_items"]) <= set(seen)


def test_session_is_answered_by_item_similarity(client: TestClient, rec: Recommender):
    body = client.post("/v1/recommendations", json={"session_item_ids": ["15", "95"], "k": 5})
    result = body.json()["results"][0]
    assert result["user_id"] is None and result["fallback"] is None
    assert result["representation"] == "session"
    ids = [i["item_id"] for i in result["items"]]
    assert ids == rec.similar_to_items(["15", "95"], k=5)[0].tolist()
    assert not {"15", "95"} & set(ids)


def test_session_of_a_context_run_is_answered_by_what_follows(walks_run: Path):
    """A model.context run answers a session with its Markov term: next steps of the walks."""
    rec = Recommender.from_run(walks_run)
    after = walk_successors()
    with TestClient(create_app(walks_run)) as c:
        for item in rec.items.to_list()[:5]:
            session = [item, after[item]]  # oldest first
            body = c.post("/v1/recommendations", json={"session_item_ids": session, "k": 3})
            result = body.json()["results"][0]
            ids = [i["item_id"] for i in result["items"]]
            assert result["fallback"] is None and not set(session) & set(ids)
            assert ids == rec.recommend_next(session, k=3)[0].tolist()
            assert ids[0] == after[after[item]]


def test_a_users_recent_items_steer_a_context_runs_list(walks_run: Path):
    """One user with the items they just interacted with: the list follows those items (the
    Markov term reads them instead of the latest items stored at training)."""
    rec = Recommender.from_run(walks_run)
    after = walk_successors()
    user = "u10"
    # a walk whose next step tops the user's list (elsewhere the user's own taste wins)
    session = next(
        [i, after[i]]
        for i in rec.items.to_list()
        if rec.recommend_next([i, after[i]], k=1, user_id=user)[0][0] == after[after[i]]
    )
    with TestClient(create_app(walks_run)) as c:
        body = {"user_ids": [user], "session_item_ids": session, "k": 5, "explain": True}
        result = c.post("/v1/recommendations", json=body).json()["results"][0]
        stored = c.get(f"/v1/users/{user}/recommendations", params={"k": 5}).json()
    ids = [i["item_id"] for i in result["items"]]
    assert result["user_id"] == user and result["fallback"] is None
    assert ids == rec.recommend_next(session, k=5, user_id=user)[0].tolist()
    assert ids != [i["item_id"] for i in stored["items"]]
    # the walk's next step is explained by the items just given, which the Markov term read
    assert ids[0] == after[session[1]]
    why = result["items"][0]["explanation"]
    assert why["supporting_items"][0] in session, why


def test_session_on_a_popularity_model_falls_back(pop_run: Path):
    with TestClient(create_app(pop_run)) as c:
        result = c.post("/v1/recommendations", json={"session_item_ids": ["15"]}).json()
        assert result["results"][0]["fallback"] == "popularity"
        body = {"user_ids": ["u7", "new"], "histories": {"new": ["15"]}}
        results = c.post("/v1/recommendations", json=body).json()["results"]
        assert [r["representation"] for r in results] == ["popularity", "popularity"]
        response = c.get("/v1/items/15/similar")
        assert response.status_code == 409 and "no item representation" in response.text


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"user_ids": ["u7", 10]}, 422, "user_ids.1"),
        ({"user_ids": "u7"}, 422, "user_ids"),
        ({"user_ids": []}, 422, "user_ids"),
        ({"user_ids": ["a", "b", "c", "d", "e"]}, 413, "user_ids"),
        ({"user_ids": ["u7"], "explain": "maybe"}, 422, "explain"),
        ({"user_ids": ["u7"], "colour": "red"}, 422, "colour"),
        ({}, 422, "body"),
        ({"user_ids": ["u7", "u10"], "session_item_ids": ["15"]}, 422, "body"),
        ({"user_ids": ["u7"], "session_item_ids": ["15"]}, 409, "session_item_ids"),  # no context
        ({"session_item_ids": ["15", "no-such-item"]}, 422, "session_item_ids.1"),
        ({"session_item_ids": ["15", "25", "35", "45"]}, 413, "session_item_ids"),
        ({"user_ids": ["u7"], "histories": {"new": ["15"]}}, 422, "histories.new"),
        ({"histories": {"new": ["15", "25", "35", "45"]}}, 413, "histories.new"),
        ({"histories": {"new": "15"}}, 422, "histories.new"),
        ({"histories": {}}, 422, "histories"),
        ({"histories": {"new": ["15"]}, "session_item_ids": ["15"]}, 422, "body"),
        ([1, 2], 422, "body"),
    ],
)
def test_bad_batch_requests_name_the_field(
    client: TestClient, body: object, status: int, field: str
):
    response = client.post("/v1/recommendations", json=body)
    assert response.status_code == status and error_field(response) == field


@pytest.mark.parametrize(
    ("content", "status"),
    [(b'{"user_ids": ["u7"]', 400), (b"not json", 400), (b"", 422), (b"user_ids=u7", 400)],
)
def test_malformed_json_is_a_400_not_a_500(client: TestClient, content: bytes, status: int):
    headers = {"content-type": "application/json"}
    response = client.post("/v1/recommendations", content=content, headers=headers)
    assert response.status_code == status and error_field(response) == "body"


# -- items and scores --------------------------------------------------------------------------


def test_similar_items(client: TestClient, rec: Recommender):
    body = client.get("/v1/items/15/similar?k=4").json()
    assert body["item_id"] == "15"
    assert [i["item_id"] for i in body["items"]] == rec.similar_items("15", k=4)[0].tolist()
    response = client.get("/v1/items/no-such-item/similar")
    assert response.status_code == 404 and error_field(response) == "item_id"
    response = client.get("/v1/items/15/similar?k=5000")
    assert response.status_code == 422 and error_field(response) == "k"


def test_score_keeps_the_order(client: TestClient, rec: Recommender):
    pairs = [("u7", "15"), ("nobody", "25"), (USER, "35")]
    body = client.post(
        "/v1/score", json={"pairs": [{"user_id": u, "item_id": i} for u, i in pairs]}
    ).json()
    expected = rec.score([u for u, _ in pairs], [i for _, i in pairs])
    np.testing.assert_allclose(body["scores"], expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"pairs": [{"user_id": "u7", "item_id": "15"}, {"user_id": "u7", "item_id": "x"}]},
         422, "pairs.1.item_id"),
        ({"pairs": [{"user_id": "u7"}]}, 422, "pairs.0.item_id"),
        ({"pairs": [{"user_id": "u7", "item_id": 15}]}, 422, "pairs.0.item_id"),
        ({"pairs": []}, 422, "pairs"),
        ({"pairs": [{"user_id": "u7", "item_id": "15"}] * 5}, 413, "pairs"),
    ],
)  # fmt: skip
def test_bad_score_requests_name_the_field(
    client: TestClient, body: object, status: int, field: str
):
    response = client.post("/v1/score", json=body)
    assert response.status_code == status and error_field(response) == field


def test_unknown_paths_and_methods_are_json_4xx(client: TestClient):
    assert client.get("/v2/anything").status_code == 404
    response = client.delete("/v1/score")
    assert response.status_code == 405 and error_field(response) is None


# -- admin reload ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_reload_needs_the_token(client: TestClient, headers: dict[str, str]):
    response = client.post("/admin/reload", headers=headers)
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


def test_admin_is_disabled_without_the_variable(gmf_run: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RECOMMENDER_ADMIN_TOKEN", raising=False)
    with TestClient(create_app(gmf_run)) as c:
        assert c.post("/admin/reload", headers=AUTH).status_code == 401
        assert c.post("/admin/reload", headers={"Authorization": "Bearer "}).status_code == 401


def test_reload_swaps_and_refuses_a_broken_run(
    client: TestClient, pop_run: Path, gmf_run: Path, tmp_path: Path
):
    def model() -> dict[str, object]:  # what serves, less how far it has explained ahead
        info: dict[str, object] = client.get("/v1/model").json()
        return {key: value for key, value in info.items() if key != "explained_ahead"}

    before = model()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "best.pt").write_bytes(b"not a checkpoint")
    # A readable checkpoint whose weights do not fit the architecture it names.
    misfit = tmp_path / "misfit"
    misfit.mkdir()
    ckpt = torch.load(gmf_run / "best.pt", weights_only=True)
    ckpt["model_config"]["embedding_dim"] += 1
    torch.save(ckpt, misfit / "best.pt")
    for run_dir in (broken, misfit, tmp_path / "missing"):
        response = client.post("/admin/reload", headers=AUTH, json={"run_dir": str(run_dir)})
        assert response.status_code == 422 and error_field(response) == "run_dir"
        assert before["version"] in response.json()["detail"]
        assert model() == before
    swapped = client.post("/admin/reload", headers=AUTH, json={"run_dir": str(pop_run)}).json()
    assert swapped["previous_version"] == before["version"]
    assert client.get("/v1/model").json()["model"] == "popularity"
    body = client.get(f"/v1/users/{USER}/recommendations").json()
    assert body["model_version"] == swapped["model_version"]
    again = client.post("/admin/reload", headers=AUTH)  # no body: reload the serving run
    assert again.status_code == 200 and again.json()["run_dir"] == str(pop_run)
    text = client.get("/metrics").text
    assert 'recommender_reloads_total{result="ok"} 2' in text
    assert 'recommender_reloads_total{result="refused"} 3' in text


def reload_during(client: TestClient, hammer: Callable[[], None], runs: list[Path]) -> None:
    """Reload each of `runs` in turn while `hammer` sends requests from another thread."""
    worker = threading.Thread(target=hammer)
    worker.start()
    for run_dir in runs:
        body = {"run_dir": str(run_dir)}
        assert client.post("/admin/reload", headers=AUTH, json=body).status_code == 200
    worker.join()


def test_reload_under_load_drops_nothing(client: TestClient, pop_run: Path, gmf_run: Path):
    statuses: list[int] = []

    def hammer() -> None:
        for _ in range(60):
            statuses.append(client.get(f"/v1/users/{USER}/recommendations").status_code)

    reload_during(client, hammer, [pop_run, gmf_run, pop_run])
    assert statuses == [200] * 60


# -- two-stage retrieval -----------------------------------------------------------------------


def test_two_stage_matches_exact_when_the_search_is_exhaustive(gmf_run: Path, rec: Recommender):
    pytest.importorskip("faiss")
    # Every list probed and every item a candidate: the ANN stage cannot miss anything.
    settings = ServeSettings(ann_threshold=0, ann_candidates=1000, ann_nprobe=1000)
    with TestClient(create_app(gmf_run, settings)) as c:
        assert c.get("/v1/model").json()["retrieval"] == "two-stage"
        users = ["u7", USER, "nobody"]
        body = c.post("/v1/recommendations", json={"user_ids": users, "k": 10}).json()
        expected, scores = rec.recommend(users, k=10)
        for row, result in enumerate(body["results"]):
            assert [i["item_id"] for i in result["items"]] == expected[row].tolist()
            np.testing.assert_allclose([i["score"] for i in result["items"]], scores[row], 1e-5)
        assert body["results"][2]["fallback"] == "popularity"


def test_two_stage_excludes_history_beyond_the_candidate_budget(gmf_run: Path, rec: Recommender):
    pytest.importorskip("faiss")
    # 12 candidates but ~16 history items: the search must ask for the history on top.
    settings = ServeSettings(ann_threshold=0, ann_candidates=12, ann_nprobe=1000)
    with TestClient(create_app(gmf_run, settings)) as c:
        items = c.get(f"/v1/users/{USER}/recommendations?k=10").json()["items"]
        ids = [i["item_id"] for i in items]
        assert len(ids) == len(set(ids)) == 10 and not set(ids) & history(rec, USER)
        scores = [i["score"] for i in items]
        assert scores == sorted(scores, reverse=True)


def test_similar_items_and_sessions_through_the_item_index_agree_with_exact(
    gmf_run: Path, rec: Recommender
):
    """Above the threshold, similar items and sessions are the quantised index's candidates
    re-ranked by their exact cosine: with 30 of 120 items as candidates, the top 10 and
    their scores are the exact ones."""
    pytest.importorskip("faiss")
    settings = ServeSettings(ann_threshold=0, ann_candidates=30, ann_item_nprobe=1000)
    with TestClient(create_app(gmf_run, settings)) as c:
        for item in ["15", "95", "505"]:
            body = c.get(f"/v1/items/{item}/similar?k=10").json()
            expected, scores = rec.similar_items(item, k=10)
            assert [i["item_id"] for i in body["items"]] == expected.tolist()
            np.testing.assert_allclose([i["score"] for i in body["items"]], scores, atol=1e-5)
        session = ["15", "95", "505"]
        body = c.post("/v1/recommendations", json={"session_item_ids": session, "k": 10}).json()
        expected, scores = rec.similar_to_items(session, k=10)
        items = body["results"][0]["items"]
        assert [i["item_id"] for i in items] == expected.tolist()
        np.testing.assert_allclose([i["score"] for i in items], scores, atol=1e-5)


def test_requests_during_reloads_of_two_stage_versions_never_fail(
    monkeypatch: pytest.MonkeyPatch, gmf_run: Path, other_gmf_run: Path
):
    """Each reload builds both ANN indexes and warms the version up off the serving path,
    then swaps it in: every kind of request in between is answered, by one version or the
    other, and an explained list comes from the version that answers it, never from a fold
    the previous version kept."""
    pytest.importorskip("faiss")
    monkeypatch.setenv("RECOMMENDER_ADMIN_TOKEN", TOKEN)
    settings = ServeSettings(ann_threshold=0, ann_candidates=30, ann_item_nprobe=1000)
    shots = [
        ("GET", f"/v1/users/{USER}/recommendations?k=5&explain=true", None),
        ("GET", "/v1/items/15/similar?k=5", None),
        ("POST", "/v1/recommendations", {"session_item_ids": ["15", "95"], "k": 5}),
        ("POST", "/v1/recommendations", {"user_ids": ["u7", USER, "nobody"], "k": 5}),
        ("POST", "/v1/score", {"pairs": [{"user_id": USER, "item_id": "15"}]}),
    ]
    answers: list[httpx.Response] = []
    with TestClient(create_app(gmf_run, settings)) as c:

        def hammer() -> None:
            for n in range(100):
                method, url, body = shots[n % len(shots)]
                answers.append(c.request(method, url, json=body))

        first = c.get("/v1/model").json()["version"]
        reload_during(c, hammer, [other_gmf_run, gmf_run, other_gmf_run])
        last = c.get("/v1/model").json()["version"]
        explained = c.get(f"/v1/users/{USER}/recommendations?k=5&explain=true").json()
    assert [a.status_code for a in answers] == [200] * 100
    assert {a.json()["model_version"] for a in answers} <= {first, last} and first != last
    fresh = Recommender.from_run(other_gmf_run)
    ids = [i["item_id"] for i in explained["items"]]
    whys = [i["explanation"]["supporting_items"] for i in explained["items"]]
    assert whys == [e.supporting_items for e in fresh.explain_many(USER, ids)]
    scores = [i["explanation"]["score"] for i in explained["items"]]
    assert scores == [e.score for e in fresh.explain_many(USER, ids)]
    assert scores != [e.score for e in Recommender.from_run(gmf_run).explain_many(USER, ids)]


def test_a_versions_parts_are_built_once_for_every_worker(
    monkeypatch: pytest.MonkeyPatch, gmf_run: Path, rec: Recommender, tmp_path: Path
):
    """Two workers loading the same version at once: one builder process builds both indexes
    and the item side, and each worker reads them (the indexes with its own nprobe)."""
    pytest.importorskip("faiss")
    builds: list[tuple[object, ...]] = []
    build = indexes._run_builder
    monkeypatch.setattr(indexes, "_run_builder", lambda *a: (builds.append(a), build(*a)))
    settings = ServeSettings(ann_threshold=0, ann_nprobe=7, ann_item_nprobe=9)
    file_id = best_file_id(gmf_run)
    assert file_id is not None
    read: list[indexes.Prebuilt] = []

    def load() -> None:
        read.append(indexes.prebuilt(gmf_run, file_id, settings, tmp_path))

    workers = [threading.Thread(target=load) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(builds) == 1 and len(read) == 2
    cache, space = rec.item_side
    for parts in read:
        assert parts.users is not None and parts.items is not None
        assert parts.users.ntotal == parts.items.ntotal == len(rec.items)
        assert (parts.users.nprobe, parts.items.nprobe) == (7, 9)
        assert all(torch.equal(a, b) for a, b in zip(parts.item_side[0], cache, strict=True))
        assert space is not None and torch.equal(parts.item_side[1], space)


def test_a_best_pt_replaced_during_a_load_is_loaded_instead(gmf_run: Path, tmp_path: Path):
    """The builder refuses a best.pt that is not the file the load started from, writing
    nothing; the load then starts again from the file there now."""
    pytest.importorskip("faiss")
    settings = ServeSettings(ann_threshold=0)
    with pytest.raises(indexes.VersionChanged, match="no longer the file to build for"):
        indexes.prebuilt(gmf_run, (1, 2, 3), settings, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # nothing half-written
    served = ServedModel.load(gmf_run, settings, tmp_path, file_id=(1, 2, 3), beside=False)
    assert served.file_id == best_file_id(gmf_run) and served.retrieval == "two-stage"


def test_a_started_service_leaves_its_imports_out_of_garbage_collections(client: TestClient):
    """engine.settle_heap ran before the first load: modules and classes are frozen out of
    every later collection, what loading a run imports on first use included."""
    assert gc.get_freeze_count() > 0
    assert "torch._dynamo" in sys.modules


def test_a_replaced_version_is_freed_by_a_thread_of_its_own(
    monkeypatch: pytest.MonkeyPatch, gmf_run: Path, other_gmf_run: Path
):
    """After a reload the old version stays alive for the requests still on it, then the
    release timer frees its vocabularies and parameters piece by piece and drops the last
    reference, and reference counting frees the rest: no garbage collection needed, none on
    the event loop."""
    monkeypatch.setenv("RECOMMENDER_ADMIN_TOKEN", TOKEN)
    monkeypatch.setattr(lifecycle, "RELEASE_AFTER_S", 0.3)
    app = create_app(gmf_run, ServeSettings())
    with TestClient(app) as c:
        first = weakref.ref(app.state.worker.served)
        items = app.state.worker.served.rec.items  # held apart from the version
        parameters = list(app.state.worker.served.rec.model.parameters())
        assert len(items) > 0
        gc.disable()
        try:
            reload = c.post("/admin/reload", headers=AUTH, json={"run_dir": str(other_gmf_run)})
            assert reload.status_code == 200
            assert first() is not None
            deadline = time.monotonic() + 10
            while first() is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert first() is None
        finally:
            gc.enable()
        assert len(items) == 0 and all(p.numel() == 0 for p in parameters)
        user = app.state.worker.served.rec.users.ids[0]
        assert c.get(f"/v1/users/{user}/recommendations").status_code == 200  # the new one serves


def test_a_replaced_version_still_held_is_left_whole(
    monkeypatch: pytest.MonkeyPatch, gmf_run: Path, other_gmf_run: Path
):
    """The release timer frees a version piece by piece only when its reference is the last;
    one a request still holds keeps answering, to be freed whole when that reference goes."""
    monkeypatch.setenv("RECOMMENDER_ADMIN_TOKEN", TOKEN)
    monkeypatch.setattr(lifecycle, "RELEASE_AFTER_S", 0.1)
    app = create_app(gmf_run, ServeSettings())
    with TestClient(app) as c:
        held = app.state.worker.served
        user = str(held.rec.users.ids[0])
        reload = c.post("/admin/reload", headers=AUTH, json={"run_dir": str(other_gmf_run)})
        assert reload.status_code == 200
        time.sleep(0.5)
        assert len(held.rec.items) > 0
        ranked = held.recommend([user], 5, True)
        assert len(ranked[0].item_ids) == 5


def test_the_builder_process_starts_at_its_priority(
    monkeypatch: pytest.MonkeyPatch, gmf_run: Path, tmp_path: Path
):
    """Beside a serving version the builder is started under `nice`, so that even its imports
    yield to serving; a first load (nice 0) starts it plainly."""
    started: list[list[str]] = []

    def run(args: list[str], **_: object) -> subprocess.CompletedProcess[str]:
        started.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(indexes.subprocess, "run", run)
    file_id = best_file_id(gmf_run)
    assert file_id is not None
    for nice in (19, 0):
        indexes._run_builder(gmf_run, file_id, ServeSettings(), tmp_path, nice)
    assert Path(started[0][0]).name == "nice" and started[0][1:3] == ["-n", "19"]
    assert started[0][3:] == started[1]
    assert started[1][:3] == [sys.executable, "-m", "recommender.serving.indexes"]


def test_only_the_newest_index_folders_are_kept(gmf_run: Path, tmp_path: Path):
    """Two folders stay: the one a load just used, even an old one, and the newest other."""
    pytest.importorskip("faiss")
    settings = ServeSettings(ann_threshold=0)
    file_id = best_file_id(gmf_run)
    assert file_id is not None
    indexes.prebuilt(gmf_run, file_id, settings, tmp_path)
    used = tmp_path / indexes.version_key(gmf_run, file_id, settings)
    os.utime(used, (1e9, 1e9))  # built long ago
    for age, name in enumerate(["newest", "older"]):
        (tmp_path / name).mkdir()
        (tmp_path / f"{name}.lock").touch()
        os.utime(tmp_path / name, (1.5e9 - age, 1.5e9 - age))
    indexes.prebuilt(gmf_run, file_id, settings, tmp_path)  # the old version loaded again
    kept = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert kept == sorted(["newest", used.name])
    assert not (tmp_path / "older.lock").exists()


# -- settings ----------------------------------------------------------------------------------


def test_settings_round_trip_through_the_environment():
    settings = ServeSettings(max_batch=7, ann_threshold=10, threads=1)
    assert ServeSettings.from_env(settings.to_env()) == settings
    with pytest.raises(ConfigError, match=f"{ENV_PREFIX}MAX_BATCH"):
        ServeSettings.from_env({f"{ENV_PREFIX}MAX_BATCH": "0"})


# -- browsing: the catalog, users and their histories (what the page at / reads) -------------


def test_item_search_matches_ids_when_the_run_has_no_titles(client: TestClient, rec: Recommender):
    body = client.get("/v1/items?q=15&limit=50").json()
    ids = [i["item_id"] for i in body["items"]]
    assert ids == rec.search_items("15", limit=50).tolist()
    assert set(ids) == {i for i in rec.items.to_list() if "15" in i}
    counts = rec.item_counts[rec.items.index(ids)]
    assert (counts[:-1] >= counts[1:]).all()  # most popular first
    assert all(i["title"] is None for i in body["items"])
    popular = client.get("/v1/items?limit=3").json()["items"]
    assert [i["item_id"] for i in popular] == rec.recommend("nobody", k=3)[0].tolist()
    assert client.get("/v1/items?q=no-such-thing").json()["items"] == []
    assert error_field(client.get("/v1/items?limit=0")) == "limit"


def test_users_and_their_history(client: TestClient, rec: Recommender):
    body = client.get("/v1/users?limit=5").json()
    assert body["n_users"] == len(rec.users) and len(body["user_ids"]) == 5
    lengths = [len(history(rec, u)) for u in body["user_ids"]]
    assert lengths == sorted(lengths, reverse=True)
    assert max(lengths) == int(np.diff(rec.indptr).max())
    seen = client.get(f"/v1/users/{USER}/history?n=4").json()
    assert seen["known"] and seen["n_items"] == len(history(rec, USER))
    assert len(seen["items"]) == 4 and {i["item_id"] for i in seen["items"]} <= history(rec, USER)
    stranger = client.get("/v1/users/stranger/history").json()
    assert stranger == {**stranger, "known": False, "n_items": 0, "items": []}
    assert error_field(client.get(f"/v1/users/{USER}/history?n=0")) == "n"


def test_page_and_its_assets(client: TestClient):
    page = client.get("/")
    assert page.status_code == 200 and "<title>recommender</title>" in page.text
    assert client.get("/static/page.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/page.css").headers["content-type"].startswith("text/css")
    assert client.get("/static/../app.py").status_code == 404
    assert error_field(client.get("/static/app.py")) == "name"
    assert 'route="/static/{name}",status="200"} 2' in client.get("/metrics").text


# -- the real process --------------------------------------------------------------------------


def test_real_server_serves_reloads_and_drains_on_sigterm(
    gmf_run: Path, pop_run: Path, tmp_path: Path
):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_file = tmp_path / "serve.log"
    proc = start_server(gmf_run, port, log_file, env={"RECOMMENDER_ADMIN_TOKEN": TOKEN})
    try:
        wait_ready(base, proc)
        first = httpx.get(f"{base}/v1/users/{USER}/recommendations?k=3").json()
        assert len(first["items"]) == 3 and first["fallback"] is None
        reload = httpx.post(
            f"{base}/admin/reload", headers=AUTH, json={"run_dir": str(pop_run)}, timeout=30
        )
        assert reload.status_code == 200
        assert httpx.get(f"{base}/v1/model").json()["model"] == "popularity"

        # A request in flight when SIGTERM arrives: headers and half the body are sent, the
        # rest only after the signal. Draining means it is still answered in full.
        body = {"user_ids": [USER], "k": 2}
        with request_in_flight(port, "/v1/recommendations", body) as finish:
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            response = finish()
        assert response.startswith(b"HTTP/1.1 200"), response[:200]
        assert b'"results"' in response
        # uvicorn re-raises the signal once drained, so supervisors see a SIGTERM stop.
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        log = log_file.read_text()
        assert "Traceback" not in log and "Finished server process" in log
    finally:
        kill_server(proc)


def test_the_fold_in_benchmark_runs(gmf_run: Path, monkeypatch: pytest.MonkeyPatch):
    """benchmarks/bench_foldin.py --smoke: a few new users, in the library and the service."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    bench = importlib.import_module("bench_foldin")
    results = bench.main(["--run", str(gmf_run), "--smoke", "--history", "5"])
    assert results["requests"] == 10 and results["library"]["folded_in"]["p99_ms"] > 0
    assert results["service"]["ok"] == 10 and results["service"]["5xx"] == 0
