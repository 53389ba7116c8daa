"""The naive baseline service: the full model over every item, from scratch, per request.

What a first version of a recommendation endpoint usually does: repeat the user index once per
item, run `model(users, items)` over the whole catalog (no item-side precomputation, no ANN),
mask the history, take the top k. Same run, same JSON shape and the same uvicorn settings as
the real service, so the benchmark compares the scoring strategies and nothing else.

    python benchmarks/serving_naive.py --run runs/demo --port 8001

`--smoke` answers a few requests in-process (no port) on a small constructed run.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI, Query

from recommender.inference import Recommender
from recommender.serving import ServeSettings
from serving_synthetic import write_synthetic_run
from smoke import add_arguments, folder


def create_naive_app(run_dir: str | Path) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(ServeSettings().threads)  # as the real service does
        app.state.rec = Recommender.from_run(run_dir)
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    @app.get("/v1/users/{user_id}/recommendations")
    @torch.no_grad()
    async def recommendations(user_id: str, k: int = Query(10, ge=1, le=1000)) -> dict:
        rec: Recommender = app.state.rec
        n_items = len(rec.items)
        user = int(rec.users.lookup([user_id])[0])
        if user < 0:
            return {"user_id": user_id, "items": [], "fallback": "popularity"}
        users = torch.full((n_items,), user, dtype=torch.long)
        scores = torch.sigmoid(rec.model(users, torch.arange(n_items)))  # (n_items,)
        scores[torch.from_numpy(rec.history_of(user))] = -torch.inf
        top = torch.topk(scores, k)
        ids = rec.items.to_ids(top.indices)
        items = [
            {"item_id": str(i), "score": float(s)} for i, s in zip(ids, top.values, strict=True)
        ]
        return {"user_id": user_id, "items": items, "fallback": None}

    return app


def smoke(where: Path) -> None:
    from fastapi.testclient import TestClient

    run = write_synthetic_run(where / "run", n_items=500, n_users=50, n_clusters=20)
    with TestClient(create_naive_app(run)) as client:
        assert client.get("/readyz").status_code == 200
        for user in ("u0", "u1", "no-such-user"):
            response = client.get(f"/v1/users/{user}/recommendations?k=5")
            response.raise_for_status()
            print(response.json())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run")
    parser.add_argument("--port", type=int, default=8001)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        with folder(args.smoke_dir) as where:
            smoke(where)
        return
    if args.run is None:
        parser.error("--run is required (or --smoke)")
    uvicorn.run(
        create_naive_app(args.run),
        host="127.0.0.1",
        port=args.port,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
