"""The tuning search space: typed parameter specs, the default space and the keys never tuned.

`Config.tune.space` maps a dotted model.* / train.* key to one of these specs; tune.py turns a
spec into an Optuna suggestion, and config.py checks every value a spec can draw (its edge
values) against the setting it tunes, so a bad space fails at load time, not in trial 40.

Example:
    >>> FloatParam(low=1e-4, high=1e-2, log=True).edge_values()
    [0.0001, 0.01]
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FloatParam(_Spec):
    """A float drawn from [low, high], uniformly or, with `log`, log-uniformly."""

    type: Literal["float"] = "float"
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> FloatParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log scale needs low > 0")
        return self

    def edge_values(self) -> list[Any]:
        return [self.low, self.high]


class IntParam(_Spec):
    """An integer from low, low + step, ..., high, or log-uniform in [low, high] with `log`."""

    type: Literal["int"] = "int"
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntParam:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if (self.high - self.low) % self.step:
            raise ValueError(f"high - low must be a multiple of step ({self.step})")
        if self.log and (self.step != 1 or self.low < 1):
            raise ValueError("a log scale needs step 1 and low >= 1")
        return self

    def edge_values(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalParam(_Spec):
    """One of `choices`: scalars, or lists such as MLP layer widths."""

    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1)

    @model_validator(mode="after")
    def _choices(self) -> CategoricalParam:
        scalar = (str, int, float, bool, type(None))
        for choice in self.choices:
            items = choice if isinstance(choice, list) else [choice]
            if not all(isinstance(x, scalar) for x in items):
                raise ValueError(f"choice {choice!r} is neither a scalar nor a list of scalars")
        labels = [json.dumps(c) for c in self.choices]
        if len(set(labels)) != len(labels):
            raise ValueError("choices must be distinct")
        return self

    def edge_values(self) -> list[Any]:
        return list(self.choices)


# Bounds are monotone, so a spec whose edge values are valid settings only draws valid ones.
ParamSpec = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]
PARAM_TYPES = ("float", "int", "categorical")


def default_space() -> dict[str, FloatParam | IntParam | CategoricalParam]:
    """A space for every model: tune.py skips the keys a trial's model does not use (the
    pretraining rates for a plain GMF, train.lr for a pretrained NeuMF, ...)."""
    return {
        "model.embedding_dim": CategoricalParam(choices=[16, 32, 64, 128]),
        "model.mlp_layers": CategoricalParam(
            choices=[[64, 32, 16, 8], [128, 64, 32, 16], [256, 128, 64, 32]]
        ),
        "model.dropout": FloatParam(low=0.0, high=0.5),
        "train.lr": FloatParam(low=3e-4, high=3e-2, log=True),
        # Adam adds it to every embedding row's gradient: 1e-4 collapsed GMF on ml-100k.
        "train.weight_decay": CategoricalParam(choices=[0.0, 1e-7, 1e-6, 1e-5]),
        "train.num_negatives": IntParam(low=4, high=16, step=4),
        "train.batch_size": CategoricalParam(choices=[1024, 2048, 4096, 8192]),
        "train.pretrain.gmf.lr": FloatParam(low=1e-3, high=3e-2, log=True),
        "train.pretrain.mlp.lr": FloatParam(low=1e-3, high=3e-2, log=True),
        "train.pretrain.finetune_lr": FloatParam(low=1e-5, high=1e-3, log=True),
    }


# Settings a study holds fixed: what is optimised, and what trials never do.
NOT_TUNABLE = {
    "train.monitor": "it is the objective of the study",
    "train.refit": "trials select on validation and never refit; best.yaml keeps your setting",
    "train.progress": "it does not change training",
}
