"""Request and response bodies of the HTTP API.

Ids travel as strings, the raw ids of the training data, so a numeric id sent as a JSON number
is a type error rather than a silent conversion. Limits that depend on settings (batch sizes)
are checked in the routes; fixed ones (k) live here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_K = 1000


class _Body(BaseModel):
    """Request bodies reject unknown keys, so a misspelt field is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class ItemExplanation(BaseModel):
    """Why one item was recommended, as JSON: inference.Explanation with its one-line text."""

    supporting_items: list[str] = Field(description="History items behind the pick.")
    weights: list[float]
    method: str
    text: str = Field(description="One line for display, e.g. 'because you liked ...'.")
    score: float | None = Field(None, description="The explained probability (fold-in user).")
    baseline_score: float | None = Field(None, description="Its probability with no history.")
    fidelity: float | None = Field(
        None, description="Rank correlation of the fold-in user's scores with the trained user's."
    )


class RecommendedItem(BaseModel):
    item_id: str
    score: float = Field(description="Probability, or popularity share for a fallback.")
    title: str | None = None
    explanation: ItemExplanation | None = None


class RecommendationList(BaseModel):
    user_id: str | None = Field(description="None for an anonymous session.")
    items: list[RecommendedItem]
    fallback: Literal["popularity"] | None = None
    representation: Literal["trained", "folded_in", "popularity", "session"] = Field(
        description="What the list was scored from: the user's trained vector, a vector folded"
        " in from the history given in the request, the popularity list (an unknown user"
        " without one, or a model with no user vectors), or the session's items alone."
    )
    model_version: str


class RecommendationsRequest(_Body):
    """`user_ids` (a batch of known or unknown users), `session_item_ids` (an anonymous
    visitor's recent items, oldest first: answered by what follows them for a run trained with
    model.context or a sasrec run, else by item similarity), or both with one user: that
    user's list after the items they just interacted with (model.context and sasrec runs only).

    `histories` gives users the model has never seen the items they interacted with: each is
    answered from a user vector folded in from them. Its users are the batch when `user_ids`
    is absent, else they must be among `user_ids`."""

    user_ids: list[str] | None = Field(None, min_length=1)
    session_item_ids: list[str] | None = Field(None, min_length=1)
    histories: dict[str, list[str]] | None = Field(
        None,
        min_length=1,
        description="User id -> the items they interacted with, oldest first (at most the"
        " server's max_session_items each). A user the model was trained on keeps their"
        " trained vector; items the model does not know are left out (they may be newer than"
        " the model), and with none left the user gets the popularity list.",
    )
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    explain: bool = False

    @model_validator(mode="after")
    def _sources(self) -> RecommendationsRequest:
        if self.user_ids is None and self.session_item_ids is None and self.histories is None:
            raise ValueError("give user_ids, histories, session_item_ids, or both with one user")
        if self.histories is not None and self.session_item_ids is not None:
            raise ValueError("histories are for lists of users, not with session_item_ids")
        both = self.user_ids is not None and self.session_item_ids is not None
        if both and len(self.user_ids or []) != 1:
            raise ValueError("session_item_ids with user_ids: one user, whose recent items")
        return self


class RecommendationsResponse(BaseModel):
    results: list[RecommendationList]
    model_version: str


class SimilarItems(BaseModel):
    item_id: str
    items: list[RecommendedItem]
    model_version: str


class Pair(_Body):
    user_id: str
    item_id: str


class ScoreRequest(_Body):
    pairs: list[Pair] = Field(min_length=1)


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="One probability per pair, in request order.")
    model_version: str


class ModelInfo(BaseModel):
    version: str
    model: str
    run_dir: str | None
    created_at: str | None = Field(description="When training wrote the checkpoint (UTC).")
    config_digest: str | None
    epoch: int | None
    valid_metrics: dict[str, float]
    n_users: int
    n_items: int
    retrieval: Literal["exact", "two-stage"]
    load_seconds: float
    explained_ahead: dict[str, int] = Field(
        description="users: of the `of` most active users, how many have their top-10 list "
        "explained ahead of their requests so far (RECOMMENDER_SERVE_EXPLAIN_WARM_USERS)."
    )


class ReloadRequest(_Body):
    run_dir: str | None = Field(None, description="Run to load; default: the one serving.")


class ReloadResponse(BaseModel):
    model_version: str
    previous_version: str
    run_dir: str
    load_seconds: float


class Status(BaseModel):
    status: Literal["ok", "ready"]
    model_version: str | None = None


class FieldError(BaseModel):
    field: str | None = Field(description="Dotted path of the offending input, e.g. 'k'.")
    message: str


class ErrorResponse(BaseModel):
    detail: str
    errors: list[FieldError]


class Item(BaseModel):
    item_id: str
    title: str | None = None


class ItemSearch(BaseModel):
    query: str
    items: list[Item] = Field(description="Most popular first.")
    model_version: str


class UserHistory(BaseModel):
    user_id: str
    known: bool = Field(description="False: the model has not trained on this user.")
    n_items: int = Field(description="Items in the user's training history.")
    items: list[Item] = Field(
        description="The first n of them: the latest items a model.context or sasrec run keeps "
        "first, latest first, then the rest in catalog order (the run keeps no other time order)."
    )
    model_version: str


class UserList(BaseModel):
    user_ids: list[str] = Field(description="Longest training history first.")
    n_users: int = Field(description="Users the model has trained on.")
    model_version: str
