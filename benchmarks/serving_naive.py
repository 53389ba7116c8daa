"""The naive baseline service: the full model over every item, from scratch, per request.

What a first version of a recommendation endpoint usually does: repeat the user index once per
item, run `model(users, items)` over the whole catalog (no item-side precomputation, no ANN),
mask the history, take the top k. Same run, same JSON shape and the same uvicorn settings as
the real service, so the benchmark compares the scoring strategies and nothing else.

    python benchmarks/serving_naive.py --run runs/demo --port 8001
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(
        create_naive_app(args.run),
        host="127.0.0.1",
        port=args.port,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
