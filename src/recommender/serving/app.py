"""The FastAPI app factory, its error handlers, and `serve` (what `recommender serve` runs).

Nothing is loaded at import: `create_app` only wires routes, and the model is loaded in the
lifespan, when the server starts. Every error leaves as JSON naming the field at fault, never
as a stack trace.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from recommender import __version__
from recommender.checkpoint import require_run
from recommender.serving.engine import ModelCalls, settle_heap
from recommender.serving.lifecycle import GRACEFUL_SHUTDOWN_S, Worker
from recommender.serving.metrics import MULTIPROC_ENV, Metrics, MetricsMiddleware
from recommender.serving.routes import ApiError, router
from recommender.serving.schemas import ErrorResponse, FieldError
from recommender.serving.settings import ENV_PREFIX, ServeSettings
from recommender.utils import RecommenderError, set_threads, setup_logging

log = logging.getLogger("recommender")

RUN_ENV = ENV_PREFIX + "RUN"
SHARED_ENV = ENV_PREFIX + "SHARED_DIR"


def _error(
    status: int, errors: list[FieldError], headers: Mapping[str, str] | None = None
) -> JSONResponse:
    detail = "; ".join(f"{e.field}: {e.message}" if e.field else e.message for e in errors)
    body = ErrorResponse(detail=detail, errors=errors).model_dump()
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    """('body', 'pairs', 0, 'item_id') -> 'pairs.0.item_id'; ('query', 'k') -> 'k'."""
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    return ".".join(parts)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    bad_json = [e for e in errors if e["type"] == "json_invalid"]
    if bad_json:
        reason = bad_json[0].get("ctx", {}).get("error", "not JSON")
        return _error(400, [FieldError(field="body", message=f"malformed JSON: {reason}")])
    return _error(422, [FieldError(field=_field(e["loc"]), message=e["msg"]) for e in errors])


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    return _error(exc.status, [FieldError(field=exc.field, message=exc.message)], exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, [FieldError(field=None, message=str(exc.detail))], exc.headers)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return _error(500, [FieldError(field=None, message="internal error; see the server log")])


def create_app(
    run_dir: str | Path, settings: ServeSettings | None = None, shared_dir: Path | None = None
) -> FastAPI:
    """The service for `run_dir`. The model loads when the app starts (lifespan), not here.
    `shared_dir`: the folder the workers of one `serve` share to agree on the model (see
    lifecycle.py); without it, admin reloads reach only this app.

    Example:
        >>> app = create_app("runs/demo")                      # doctest: +SKIP
        >>> with TestClient(app) as client:                    # doctest: +SKIP
        ...     client.get("/v1/users/196/recommendations?k=5").json()
    """
    settings = settings or ServeSettings()

    metrics = Metrics()
    worker = Worker(run_dir, settings, metrics, shared_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The worker accepts connections only once this returns, so a worker still loading
        # takes no traffic (the others, or the listen backlog, hold it).
        set_threads(settings.threads)
        settle_heap()
        app.state.calls = ModelCalls(settings.model_threads, settings.explain_threads)
        await worker.start()
        worker.drain_on_sigterm()
        watcher = asyncio.create_task(worker.watch())
        yield
        watcher.cancel()
        with suppress(asyncio.CancelledError):
            await watcher
        if worker.served is not None:
            worker.served.retire()
        worker.served = None
        worker.close()
        metrics.worker_stopped()
        app.state.calls.close()

    app = FastAPI(
        title="recommender",
        version=__version__,
        description="Neural Collaborative Filtering recommendations over HTTP.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.worker = worker
    app.state.metrics = metrics
    app.state.admin_token = os.environ.get(settings.admin_token_env) or None
    if app.state.admin_token is None:
        log.warning("%s is not set: admin routes answer 401", settings.admin_token_env)
    app.include_router(router)
    app.exception_handler(RequestValidationError)(_validation_error)
    app.exception_handler(ApiError)(_api_error)
    app.exception_handler(HTTPException)(_http_error)
    app.exception_handler(Exception)(_internal_error)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def app_from_env() -> FastAPI:
    """Factory for uvicorn workers, which inherit only the environment `serve` sets."""
    setup_logging()  # a worker's own process: its reloads and drains are logged too
    run_dir = os.environ.get(RUN_ENV)
    if not run_dir:
        raise RecommenderError(f"{RUN_ENV} is not set")
    shared = os.environ.get(SHARED_ENV)
    return create_app(run_dir, ServeSettings.from_env(), Path(shared) if shared else None)


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Run the service under uvicorn until SIGINT / SIGTERM, which drain requests in flight.

    Settings come from RECOMMENDER_SERVE_* variables. Each worker is its own process with its
    own model copy; they share a temporary folder, removed on exit, through which reloads
    reach all of them (lifecycle.py) and `/metrics` adds up all of their counts (metrics.py).
    """
    import uvicorn

    require_run(Path(run_dir), config=False)
    if workers < 1:
        raise RecommenderError(f"--workers must be >= 1, got {workers}")
    settings = ServeSettings.from_env()  # fail here, with one line, on a bad variable
    shared = Path(tempfile.mkdtemp(prefix="recommender-serve-"))
    env = {RUN_ENV: str(run_dir), SHARED_ENV: str(shared), **settings.to_env()}
    if workers > 1:
        # Read by prometheus_client when a worker imports it, so set before they start.
        (shared / "metrics").mkdir()
        env[MULTIPROC_ENV] = str(shared / "metrics")
    os.environ.update(env)
    try:
        uvicorn.run(
            "recommender.serving.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            access_log=False,  # per-request logging costs more than a request; /metrics counts
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            timeout_worker_healthcheck=settings.worker_healthcheck_s,
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)
