"""The HTTP endpoints. Handlers are thin: validate, call the ServedModel, shape the response.

Handlers are `async`; they validate on the event loop and hand the model work of a request,
shaping its answer included, to the worker's model threads (engine.ModelCalls) in one call.
Most requests are a millisecond of tensor work, but an explanation or a fold-in takes tens:
run inline, it would hold every other request behind it, and the event loop could not even
accept them. Each handler takes the served model once, through `served_model`, so a reload
mid-request cannot mix two versions in one answer.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request
from fastapi.responses import FileResponse, PlainTextResponse

from recommender.serving.engine import ModelCalls, Ranked, ServedModel
from recommender.serving.metrics import CONTENT_TYPE, Metrics
from recommender.serving.schemas import (
    MAX_K,
    ErrorResponse,
    Item,
    ItemExplanation,
    ItemSearch,
    ModelInfo,
    RecommendationList,
    RecommendationsRequest,
    RecommendationsResponse,
    RecommendedItem,
    ReloadRequest,
    ReloadResponse,
    ScoreRequest,
    ScoreResponse,
    SimilarItems,
    Status,
    UserHistory,
    UserList,
)
from recommender.serving.settings import ServeSettings
from recommender.utils import RecommenderError

log = logging.getLogger("recommender")

# The page at `/`: plain HTML, CSS and JS shipped in the package, served as they are.
STATIC = Path(__file__).parent / "static"
ASSETS = {"page.js": "text/javascript", "page.css": "text/css"}


class ApiError(Exception):
    """An answer other than 2xx; `field` names the input at fault, when there is one."""

    def __init__(
        self,
        status: int,
        message: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers


def served_model(request: Request) -> ServedModel:
    served: ServedModel | None = request.app.state.worker.served
    if served is None:
        raise ApiError(503, "the model is not loaded yet")
    return served


def settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def model_calls(request: Request) -> ModelCalls:
    return request.app.state.calls


Served = Annotated[ServedModel, Depends(served_model)]
Settings = Annotated[ServeSettings, Depends(settings)]
Registry = Annotated[Metrics, Depends(metrics)]
Calls = Annotated[ModelCalls, Depends(model_calls)]
K = Annotated[int, Query(ge=1, le=MAX_K, description="List length.")]
ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 409, 413, 422, 503)
}

router = APIRouter(responses=ERRORS)


def _check_size(field: str, n: int, cap: int) -> None:
    if n > cap:
        raise ApiError(413, f"{n} entries, at most {cap} per request", field)


def _check_items(served: ServedModel, item_ids: list[str], field: str, status: int = 422) -> None:
    """Unknown items are the caller's error: name the first one and where it was."""
    unknown = ~served.known_items(item_ids)
    if unknown.any():
        pos = int(unknown.argmax())
        raise ApiError(status, f"unknown item '{item_ids[pos]}'", field.format(pos))


def _check_histories(histories: dict[str, list[str]], users: list[str], cap: int) -> None:
    """Every history names a user of the batch and holds at most `cap` items (unknown items
    are not checked: the Recommender leaves them out)."""
    asked = set(users)
    for user, items in histories.items():
        if user not in asked:
            raise ApiError(422, f"user '{user}' is not in user_ids", f"histories.{user}")
        _check_size(f"histories.{user}", len(items), cap)


def _as_list(
    served: ServedModel, ranked: Ranked, explain: bool, after: list[str] | None = None
) -> RecommendationList:
    whys: list[dict[str, Any] | None] = [None] * len(ranked.item_ids)
    if explain and ranked.user_id is not None:
        ids = list(ranked.item_ids)
        whys = list(served.explain_many(ranked.user_id, ids, after, ranked.history))
    items = [
        RecommendedItem(
            item_id=item,
            score=score,
            title=served.title(item),
            explanation=ItemExplanation(**why) if why is not None else None,
        )
        for item, score, why in zip(ranked.item_ids, ranked.scores, whys, strict=True)
    ]
    return RecommendationList(
        user_id=ranked.user_id,
        items=items,
        fallback="popularity" if ranked.fallback else None,
        representation=ranked.representation,
        model_version=served.version,
    )


def _user_list(
    served: ServedModel, user_id: str, k: int, exclude_seen: bool, explain: bool
) -> RecommendationList:
    return _as_list(served, served.recommend([user_id], k, exclude_seen)[0], explain)


@router.get("/v1/users/{user_id}/recommendations", tags=["recommendations"])
async def user_recommendations(
    user_id: str,
    served: Served,
    registry: Registry,
    calls: Calls,
    k: K = 10,
    exclude_seen: bool = True,
    explain: bool = False,
) -> RecommendationList:
    """Top-k items for one user; an unknown user gets the popularity list."""
    call = calls.explained if explain else calls
    answer = await call(_user_list, served, user_id, k, exclude_seen, explain)
    registry.fallback(int(answer.fallback is not None))
    return answer


def _lists(
    served: ServedModel, body: RecommendationsRequest, users: list[str]
) -> list[RecommendationList]:
    """The lists of a batch request (`users`, or an anonymous session, or one user after
    the session's items), explained when asked."""
    after = None  # the recent items of one user's list, which its explanations read
    session = body.session_item_ids
    if session is None:
        ranked = served.recommend(users, body.k, body.exclude_seen, body.histories)
    elif body.user_ids is None:
        ranked = [served.session(session, body.k)]
    else:
        try:
            ranked = [served.after(users[0], session, body.k, body.exclude_seen)]
        except RecommenderError as exc:  # a model that reads no recent items
            raise ApiError(409, str(exc), "session_item_ids") from None
        after = session
    return [_as_list(served, r, body.explain, after) for r in ranked]


@router.post("/v1/recommendations", tags=["recommendations"])
async def batch_recommendations(
    body: RecommendationsRequest,
    served: Served,
    limits: Settings,
    registry: Registry,
    calls: Calls,
) -> RecommendationsResponse:
    """A batch of users, new ones with the items they interacted with (`histories`: a user
    vector folded in from them); an anonymous session (what follows its items under a
    model.context run's Markov term or a sasrec run, else item similarity); or one user with
    their recent items. Each list says what it was scored from (`representation`)."""
    users = body.user_ids if body.user_ids is not None else list(body.histories or {})
    if body.session_item_ids is None:
        _check_size("user_ids", len(users), limits.max_batch)
        if body.histories is not None:
            _check_histories(body.histories, users, limits.max_session_items)
    else:
        session = body.session_item_ids
        _check_size("session_item_ids", len(session), limits.max_session_items)
        _check_items(served, session, "session_item_ids.{}")
    call = calls.explained if body.explain else calls
    results = await call(_lists, served, body, users)
    registry.fallback(sum(r.fallback is not None for r in results))
    return RecommendationsResponse(results=results, model_version=served.version)


@router.get("/v1/items/{item_id}/similar", tags=["items"])
async def similar_items(item_id: str, served: Served, calls: Calls, k: K = 10) -> SimilarItems:
    """Items closest to `item_id` in the model's item space (cosine similarity)."""
    _check_items(served, [item_id], "item_id", status=404)  # the path names a resource
    try:
        ranked = await calls(served.similar, item_id, k)
    except RecommenderError as exc:
        raise ApiError(409, str(exc)) from None
    items = [
        RecommendedItem(item_id=i, score=s, title=served.title(i))
        for i, s in zip(ranked.item_ids, ranked.scores, strict=True)
    ]
    return SimilarItems(item_id=item_id, items=items, model_version=served.version)


def _items(served: ServedModel, item_ids: list[str]) -> list[Item]:
    return [Item(item_id=i, title=served.title(i)) for i in item_ids]


@router.get("/v1/items", tags=["items"])
async def search_items(
    served: Served,
    calls: Calls,
    q: Annotated[str, Query(max_length=200, description="Part of a title, or an id.")] = "",
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ItemSearch:
    """Items whose title contains `q` (any case) or whose id is `q`, most popular first; an
    empty `q` lists the most popular items. A run without titles matches ids."""
    items = _items(served, await calls(served.search, q, limit))  # a pass over every title
    return ItemSearch(query=q, items=items, model_version=served.version)


@router.get("/v1/users", tags=["users"])
async def users(served: Served, limit: Annotated[int, Query(ge=1, le=100)] = 20) -> UserList:
    """Some known users to look at: the longest training histories first."""
    return UserList(
        user_ids=served.most_active_users(limit),
        n_users=served.info()["n_users"],
        model_version=served.version,
    )


@router.get("/v1/users/{user_id}/history", tags=["users"])
async def user_history(user_id: str, served: Served, n: K = 20) -> UserHistory:
    """The items a user trained with (their recommendations leave these out); an unknown user
    has none."""
    history = served.user_history(user_id)
    return UserHistory(
        user_id=user_id,
        known=bool(served.known_users([user_id])[0]),
        n_items=len(history),
        items=_items(served, history[:n]),
        model_version=served.version,
    )


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The web page: pick a user, search items, click a session (see static/page.js)."""
    return FileResponse(STATIC / "index.html")


@router.get("/static/{name}", include_in_schema=False)
async def page_asset(name: str) -> FileResponse:
    """The page's script and style sheet; a route of its own, so /metrics labels it."""
    if name not in ASSETS:
        raise ApiError(404, f"no file '{name}'", "name")
    return FileResponse(STATIC / name, media_type=ASSETS[name])


@router.post("/v1/score", tags=["recommendations"])
async def score(
    body: ScoreRequest, served: Served, limits: Settings, calls: Calls
) -> ScoreResponse:
    """Probability per (user, item) pair, in request order; unknown users get popularity."""
    _check_size("pairs", len(body.pairs), limits.max_batch)
    items = [p.item_id for p in body.pairs]
    _check_items(served, items, "pairs.{}.item_id")
    scores = await calls(served.score, [p.user_id for p in body.pairs], items)
    return ScoreResponse(scores=scores, model_version=served.version)


@router.get("/healthz", tags=["operations"])
async def healthz() -> Status:
    """The process is up and answering (liveness)."""
    return Status(status="ok")


@router.get("/readyz", tags=["operations"])
async def readyz(request: Request, served: Served) -> Status:
    """A model is loaded and requests are welcome (readiness); 503 until the model is loaded,
    and again from SIGTERM on, while the worker drains."""
    if request.app.state.worker.draining:
        raise ApiError(503, "shutting down: finishing the requests in flight")
    return Status(status="ready", model_version=served.version)


@router.get("/metrics", tags=["operations"], response_class=PlainTextResponse)
async def prometheus_metrics(registry: Registry) -> PlainTextResponse:
    """Prometheus metrics of every worker of the service, whichever one answers."""
    return PlainTextResponse(registry.render(), media_type=CONTENT_TYPE)


@router.get("/v1/model", tags=["operations"])
async def model_info(served: Served) -> ModelInfo:
    """Version, training date, validation metrics and config digest of the served model."""
    return ModelInfo(**served.info())


def require_admin(request: Request, authorization: Annotated[str | None, Header()] = None) -> None:
    """Bearer token check. With no token configured every call is refused the same way, so
    an unconfigured server never exposes admin routes."""
    expected: str | None = request.app.state.admin_token
    scheme, _, token = (authorization or "").partition(" ")
    if (
        expected is None
        or scheme.lower() != "bearer"
        or not hmac.compare_digest(token.encode(), expected.encode())
    ):
        raise ApiError(
            401,
            "admin routes need 'Authorization: Bearer <token>' matching the server's token",
            headers={"WWW-Authenticate": "Bearer"},
        )


@router.post("/admin/reload", tags=["operations"], dependencies=[Depends(require_admin)])
async def reload(
    request: Request,
    served: Served,
    body: Annotated[ReloadRequest | None, Body()] = None,
) -> ReloadResponse:
    """Load a run beside the serving one, then swap one reference: requests in flight finish
    on the old model. The other workers follow within a second (see lifecycle.py). A run
    that fails to load is refused and the old model keeps serving everywhere."""
    run_dir = body.run_dir if body is not None and body.run_dir else served.run_dir
    try:
        old, new = await request.app.state.worker.reload(run_dir)
    # Any failure (a missing file, a foreign checkpoint, shapes that do not match the
    # architecture) means the run is unusable; none of them may take the service down.
    except Exception as exc:
        log.warning("reload of %s refused: %s", run_dir, exc)
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        message = (
            first_line
            if isinstance(exc, RecommenderError)
            else (f"{type(exc).__name__}: {first_line}")
        )
        raise ApiError(
            422, f"run refused, still serving {served.version}: {message}", "run_dir"
        ) from None
    log.info("reloaded: %s -> %s", old.version, new.version)
    return ReloadResponse(
        model_version=new.version,
        previous_version=old.version,
        run_dir=str(run_dir),
        load_seconds=new.load_seconds,
    )
