"""Service settings: limits, the two-stage retrieval switch and its knobs, the admin token,
and how workers start, follow new models and drain.

They are read from `RECOMMENDER_SERVE_<NAME>` environment variables by `from_env`, because
uvicorn workers are separate processes that can only inherit the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recommender.utils import ConfigError

ENV_PREFIX = "RECOMMENDER_SERVE_"


class ServeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch: int = Field(256, ge=1, description="Users or pairs per POST request, at most.")
    max_session_items: int = Field(100, ge=1, description="Items in an anonymous session.")
    ann_threshold: int = Field(
        200_000,
        ge=0,
        description="Catalogs with more items than this use two-stage retrieval (ANN "
        "candidates, then exact re-ranking); smaller ones are scored exactly.",
    )
    ann_candidates: int = Field(
        200, ge=1, description="Candidates retrieved per user, item or session."
    )
    ann_nprobe: int = Field(16, ge=1, description="IVF lists visited per user query.")
    ann_item_nprobe: int = Field(
        64,
        ge=1,
        description="IVF lists visited per similar-items or session query. More than for "
        "users: the item space (for NeuMF half GMF, half MLP) clusters less tightly than the "
        "retrieval vectors (1M-item synthetic catalog, recall of the exact top-10: 0.59 at "
        "16, 0.80 at 64, 0.89 at 128; about 1 ms per 16 lists).",
    )
    ann_nlist: int | None = Field(
        None, ge=1, description="IVF lists; None picks about sqrt(n_items), at most 4096."
    )
    admin_token_env: str = Field(
        "RECOMMENDER_ADMIN_TOKEN",
        description="Environment variable holding the admin bearer token; unset disables "
        "the admin routes.",
    )
    threads: int = Field(
        1,
        ge=1,
        description="torch intra-op threads per worker. One: a request's tensors are too "
        "small to gain from splitting, and on a busy machine spinning OpenMP threads wreck "
        "the tail (ml-100k top-10 p50 0.8 ms with one thread, 48 ms with two, on 2 cores "
        "shared with a training job). Add workers, not threads, to use more cores.",
    )
    model_threads: int = Field(
        2,
        ge=1,
        description="Threads per worker that run model calls, so the event loop keeps "
        "accepting and parsing requests while a slow one (a fold-in) runs; each uses "
        "`threads` torch threads.",
    )
    explain_threads: int = Field(
        1,
        ge=1,
        description="Threads per worker that run explained lists, apart from the model "
        "threads: a user's first explanation takes tens of milliseconds, and plain requests "
        "queued behind it would wait that long (see docs/BENCHMARKS.md, mixed load).",
    )
    explain_cache: int = Field(
        256,
        ge=0,
        description="Users whose fold-in a worker keeps per model version, so their next "
        "explained list costs about a millisecond instead of tens (an MLP / NeuMF fold holds "
        "an n_items x user-dims Jacobian: 0.9 MB on ml-100k).",
    )
    explain_warm_users: int = Field(
        1000,
        ge=0,
        description="Most active users whose top-10 list a worker explains ahead of their "
        "requests once a model version serves, in a thread paced to a quarter of a core (a "
        "reload of the same best.pt keeps them): their explained lists then cost a look-up, not "
        "a fold-in of tens of milliseconds. About 30 s of one core for ml-100k's 943 users "
        "(NeuMF), so about 2 minutes; not for a catalog above ann_threshold. 0: explain on "
        "demand only.",
    )

    watch_interval_s: float = Field(
        0.5,
        gt=0,
        description="How often each worker looks for a new model: a best.pt written into the "
        "run it serves, or a reload another worker took. Every worker serves it within about "
        "this plus its load time.",
    )
    worker_healthcheck_s: int = Field(
        120,
        ge=1,
        description="Seconds uvicorn's supervisor waits for a worker to answer its ping before "
        "killing it as hung (--workers above 1). uvicorn's default, 5, kills workers whose "
        "model load keeps the answering thread off the CPU on a busy machine.",
    )
    drain_s: float = Field(
        0.0,
        ge=0,
        description="After SIGTERM a worker answers /readyz with 503 and keeps serving until "
        "its requests in flight finish and at least this many seconds have passed, so a load "
        "balancer polling /readyz stops sending it traffic first. Set it to the balancer's "
        "probe period.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ServeSettings:
        """Settings from `RECOMMENDER_SERVE_<FIELD>` variables; unset fields keep defaults."""
        values = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in environ
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ENV_PREFIX + str(err["loc"][0]).upper()
            raise ConfigError(f"{name}: {err['msg']}") from None

    def to_env(self) -> dict[str, str]:
        """The variables that make `from_env` rebuild these settings in another process."""
        return {
            ENV_PREFIX + name.upper(): str(value)
            for name, value in self.model_dump().items()
            if value is not None
        }
