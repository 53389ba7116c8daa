"""Typed configuration: one YAML file, dotted command-line overrides, saved with every run.

Every hyperparameter and path lives here with its default and its bounds, so a typo or an
out-of-range value fails before any data is read. The `tune.space` specs and the default search
space are in search_space.py; this module checks each space against the settings it tunes.

Example:
    >>> cfg = load_config(None, ["train.epochs=5", "model.name=gmf"])
    >>> cfg.train.epochs
    5
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recommender.losses import CLOSED_FORM, loss_refusal
from recommender.search_space import NOT_TUNABLE, PARAM_TYPES, ParamSpec, default_space
from recommender.utils import ConfigError, atomic_write_text

ModelName = Literal["neumf", "gmf", "mlp", "mf", "lightgcn", "graphfilter", "popularity", "sasrec"]
LossName = Literal["bce", "softmax", "sampled_softmax", "bpr", "ccl", "gbce"]

SplitName = Literal["leave_last_out", "temporal", "random", "last_two_out"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ColumnsConfig(_Section):
    """Names of the columns in a CSV / TSV / Parquet file (rating and timestamp optional)."""

    user: str = "user_id"
    item: str = "item_id"
    rating: str | None = "rating"
    timestamp: str | None = "timestamp"


class DataConfig(_Section):
    dataset: str | None = Field("ml-100k", description="Built-in dataset name, or null.")
    path: str | None = Field(None, description="One interactions file, split here.")
    train_path: str | None = Field(
        None, description="Pre-split train file (NCF .train.rating or LightGCN train.txt)."
    )
    test_path: str | None = Field(
        None, description="Pre-split test file (NCF .test.rating or LightGCN test.txt)."
    )
    test_negatives_path: str | None = Field(None, description="NCF .test.negative file.")
    format: str = Field(
        "auto",
        description="Reader format of `path` (see readers.FORMATS), or of the pre-split files: "
        "auto, ml-100k (NCF .rating) or lightgcn (`user item item ...` lines).",
    )
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    sep: str | None = None
    root: str = Field("data", description="Cache directory for downloads and processed data.")
    rating_threshold: float | None = Field(
        None, description="Rating >= threshold is a positive; null makes every interaction one."
    )
    min_user_interactions: int = Field(0, ge=0, description="k-core filter on users (0: off).")
    min_item_interactions: int = Field(0, ge=0, description="k-core filter on items (0: off).")
    split: SplitName = "leave_last_out"
    test_ratio: float = Field(0.2, gt=0, lt=1, description="For temporal / random splits.")
    valid_ratio: float = Field(
        0.1, gt=0, lt=1, description="For temporal / random splits and valid_rule=random_ratio."
    )
    valid_rule: Literal["auto", "latest", "random_one", "random_ratio"] = Field(
        "auto",
        description="Pre-split files: how validation is carved from the train file. latest: "
        "each user's latest item; random_one: one random item per user; random_ratio: a random "
        "valid_ratio of each user's items (at least one of a user with two or more). auto: "
        "latest when every test item is at or after its user's latest training timestamp (and "
        "the timestamps are not all equal), else random_one when the test holds one item per "
        "user, else random_ratio. The rule used and why are logged.",
    )
    cache: bool | Literal["auto"] = Field(
        "auto",
        description="Save the processed data (vocabularies, splits, histories) under "
        "root/processed/ and reload it memory-mapped; auto: for input files of 64 MiB or more.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.train_path is None) != (self.test_path is None):
            raise ValueError("train_path and test_path must be given together")
        if self.train_path is not None and self.path is not None:
            raise ValueError("give either path or train_path/test_path, not both")
        if self.test_negatives_path is not None and self.train_path is None:
            raise ValueError("test_negatives_path needs train_path and test_path")
        if self.valid_rule != "auto" and self.train_path is None:
            raise ValueError(
                f"valid_rule={self.valid_rule} applies to pre-split files (train_path / "
                "test_path); a single file's validation follows data.split"
            )
        return self


class ModelConfig(_Section):
    name: ModelName = "neumf"
    embedding_dim: int = Field(
        64, ge=1, description="GMF / MF / LightGCN / SASRec factor size; graphfilter: ALS's."
    )
    mlp_layers: list[int] = Field(
        default_factory=lambda: [128, 64, 32, 16],
        description="MLP widths; the first is the concatenated user+item embedding width "
        "(NCF paper convention), so each MLP embedding has mlp_layers[0] / 2 dimensions.",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="After each hidden MLP layer.")
    context: int = Field(
        0,
        ge=0,
        description="mf only: also score how well an item follows the user's `context` latest "
        "items (a factorised Markov term, FPMC); needs timestamps. 0: off, the plain model.",
    )
    layers: int = Field(
        3,
        ge=0,
        description="lightgcn: propagation layers over the user-item graph (He et al. use 3); "
        "0 is plain MF without biases.",
    )

    rank: int = Field(256, ge=0, description="graphfilter: singular vectors of its ideal filter.")
    ideal_weight: float = Field(0.3, ge=0, description="graphfilter: the ideal filter's weight.")
    sharpen: float = Field(1.0, ge=0, description="graphfilter: sharpening step; 0: none (GF-CF).")
    degree_power: float = Field(0.1, description="graphfilter: scores x item degree ** this.")
    als_weight: float = Field(
        0.0,
        ge=0,
        description="graphfilter: weight of an implicit-feedback ALS term beside the filter "
        "(embedding_dim factors), rescaled to the filter's spread; 0: the filter alone.",
    )
    als_reg: float = Field(50.0, gt=0, description="graphfilter: ALS's L2 regularisation.")
    als_alpha: float = Field(
        10.0, ge=0, description="graphfilter: ALS's confidence, 1 + alpha for observed pairs."
    )
    als_sweeps: int = Field(15, ge=1, description="graphfilter: ALS's alternating sweeps.")

    @model_validator(mode="after")
    def _layers(self) -> ModelConfig:
        if len(self.mlp_layers) < 2 or any(w < 1 for w in self.mlp_layers):
            raise ValueError("mlp_layers needs at least two positive widths")
        if self.mlp_layers[0] % 2:
            raise ValueError("mlp_layers[0] must be even (user and item halves)")
        if self.context and self.name != "mf":
            raise ValueError(
                f"context={self.context} with name={self.name}: the Markov term over the "
                "latest items is built for mf only; set model.context=0 or model.name=mf"
            )
        return self

    max_len: int = Field(
        50, ge=1, description="sasrec only: the latest items of a user's sequence it reads."
    )
    blocks: int = Field(2, ge=1, description="sasrec only: causal self-attention blocks.")
    heads: int = Field(
        1, ge=1, description="sasrec only: attention heads; embedding_dim must divide by it."
    )

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.name == "sasrec" and self.embedding_dim % self.heads:
            raise ValueError(
                f"embedding_dim={self.embedding_dim} is not divisible by heads={self.heads}: "
                "each attention head takes an equal share of the dimensions"
            )
        return self


class StageConfig(_Section):
    """Optimisation settings of one training stage (a pretraining model or the final one)."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


# Each pretraining stage's own defaults, where they differ from StageConfig's.
_STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "gmf": {"lr": 5e-3, "weight_decay": 1e-5},
    "mlp": {"lr": 3e-3},
}


class PretrainConfig(_Section):
    """NeuMF initialised from separately trained GMF and MLP (He et al. 2017, section 3.4.1)."""

    enabled: bool = True
    gmf: StageConfig = Field(default_factory=lambda: StageConfig(**_STAGE_DEFAULTS["gmf"]))
    mlp: StageConfig = Field(default_factory=lambda: StageConfig(**_STAGE_DEFAULTS["mlp"]))
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of GMF in the fused output layer.")
    finetune_lr: float = Field(
        1e-4, gt=0, description="NeuMF's rate after pretraining (train.lr when not pretrained)."
    )

    @model_validator(mode="before")
    @classmethod
    def _partial_stages(cls, data: Any) -> Any:
        """A stage given in part (`--set train.pretrain.gmf.lr=1e-3`) keeps that stage's own
        defaults for the rest, not StageConfig's: its weight decay stays 1e-5, not 0."""
        if not isinstance(data, dict):
            return data
        merged = dict(data)
        for name, defaults in _STAGE_DEFAULTS.items():
            if isinstance(merged.get(name), dict):
                merged[name] = {**defaults, **merged[name]}
        return merged


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)
    max_epochs: int | None = Field(
        None,
        ge=1,
        description="Caps the epochs of every stage: GMF and MLP pretraining, the final model "
        "and its refit; a short run of the whole plan (1: one epoch each). null: no cap.",
    )
    batch_size: int = Field(
        4096, ge=1, description="Rows per step: pairs for bce, positives for the other losses."
    )
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    loss: LossName = Field(
        "bce",
        description="bce: pointwise binary cross-entropy on each positive and its num_negatives "
        "sampled negatives (the NCF paper; the sigmoid output is an interaction probability). "
        "The others are ranking objectives, whose sigmoid output is a score, not a calibrated "
        "probability. softmax: cross-entropy of each positive against the whole catalog (a "
        "batch x catalog score matrix per step; mf, gmf, lightgcn). sampled_softmax: against a "
        "pool of pool_size items shared by the batch, drawn as `pool` says, with the logQ "
        "correction (every model; the MLP towers score batch x pool pairs per step; sasrec draws "
        "uniformly and shares them by every position, and a pool_size of at least the catalog "
        "is its full softmax). bpr: "
        "each positive above each of its num_negatives negatives (Rendle et al. 2009). ccl: "
        "SimpleX's cosine contrastive loss over num_negatives negatives (Mao et al. 2021; mf "
        "and lightgcn, which then score by cosine). gbce (sasrec only): gSASRec's generalised "
        "BCE against num_negatives uniformly drawn items shared by a batch, for catalogs too "
        "large for a softmax at every position. sasrec defaults to softmax.",
    )
    num_negatives: int = Field(
        16,
        ge=1,
        description="Negatives drawn per positive each epoch, none a positive of its user "
        "(bce, bpr, ccl).",
    )
    sampling: Literal["uniform", "popularity"] = Field(
        "uniform", description="How num_negatives are drawn (bce, bpr, ccl)."
    )
    popularity_power: float = Field(
        0.75, ge=0, description="Exponent for popularity sampling, and for pool=popularity."
    )
    pool: Literal["uniform", "popularity", "in_batch", "mix"] = Field(
        "uniform",
        description="sampled_softmax's negatives, shared by a batch: pool_size items drawn "
        "uniformly or by count ** popularity_power; in_batch: the batch's own positives (free, "
        "but popularity-biased, no long tail); mix: uniform draws plus the batch's positives "
        "(Yang et al. 2020). A negative equal to its row's positive is dropped.",
    )
    pool_size: int = Field(
        1024,
        ge=1,
        description="Items drawn into each batch's pool (sampled_softmax, not in_batch); "
        "sasrec: at least the catalog's size trains the full softmax instead.",
    )
    logq: bool = Field(
        True,
        description="sampled_softmax: subtract from each negative's logit the log of its "
        "expected copies in the pool (Yi et al. 2019), so the sampled loss follows the full "
        "softmax; the positive's too when the pool holds the batch's positives (in_batch, mix), "
        "which are then draws from the pool themselves.",
    )
    ccl_margin: float = Field(
        0.8, ge=-1, lt=1, description="ccl: negatives with a cosine below it cost nothing."
    )
    ccl_neg_weight: float = Field(
        10.0, gt=0, description="ccl: weight of the negatives' mean term against the positive's."
    )
    embedding_l2: float = Field(
        1e-4,
        ge=0,
        description="lightgcn: L2 penalty on the layer-0 embeddings a step touches (per row: "
        "its user, its positive and the mean of its negatives; He et al. use 1e-4). Other "
        "models use weight_decay.",
    )
    confidence: Literal["none", "log", "linear"] = Field(
        "none",
        description="Weight each positive's BCE term by a confidence from its rating (a play "
        "count): log: 1 + alpha * log(1 + r / epsilon), linear: 1 + alpha * r (Hu, Koren & "
        "Volinsky 2008); negatives weigh 1. none: every positive weighs 1.",
    )
    confidence_alpha: float = Field(
        1.0, gt=0, description="Confidence scale; for linear, about 1 / the typical rating."
    )
    confidence_epsilon: float = Field(
        1.0, gt=0, description="Count unit of the log confidence: r / epsilon is what is logged."
    )
    patience: int = Field(10, ge=1, description="Epochs without validation gain before stopping.")
    patience_steps: int | None = Field(
        None,
        ge=1,
        description="Instead of patience: optimizer steps without validation gain, rounded up "
        "to whole epochs, so a small data set's short epochs get as many steps as a large one's.",
    )
    valid_users: int | None = Field(
        None,
        ge=1,
        description="Early stopping validates on a fixed random sample of this many validation "
        "users (drawn with `seed`) instead of all: a model that scores the catalog through a "
        "network (NeuMF, MLP) pays users x items tower passes a validation. None: every user.",
    )
    monitor: str = Field(
        "ndcg@10",
        pattern=r"^(ndcg|hr|recall|precision|map|map_all)@[1-9][0-9]*$",
        description="Validation metric for early stopping, e.g. ndcg@10.",
    )
    refit: bool = Field(
        True,
        description="After early stopping, retrain on train + validation for the best number "
        "of epochs, so the held-out validation interactions are not lost to the model.",
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sparse: bool = Field(False, description="Sparse embedding gradients with SparseAdam.")
    amp: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast in training; auto: on for CUDA, off on CPU."
    )
    progress: bool = True
    gbce_t: float = Field(
        0.75,
        ge=0,
        le=1,
        description="loss=gbce: calibration of the positive's term; 0 is plain BCE, 1 matches "
        "a full softmax's confidence (Petrov & Macdonald 2023 use 0.75).",
    )


class EvalConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    num_negatives: int = Field(99, ge=1, description="Sampled protocol, when none are given.")
    batch_users: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _ks(self) -> EvalConfig:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must be positive integers")
        return self


class TuneConfig(_Section):
    """`recommender tune`: the search space and how Optuna searches it.

    Not part of training: `training_digest` leaves it out, so editing it never blocks a resume.
    """

    space: dict[str, ParamSpec] = Field(
        default_factory=default_space,
        description="Dotted model.* / train.* key -> float, int or categorical spec.",
    )
    sampler_seed: int = Field(0, description="Seed of the TPE sampler.")
    n_startup_trials: int = Field(
        5, ge=0, description="Random trials before TPE models the space, and before pruning."
    )
    pruner: Literal["median", "none"] = Field(
        "median", description="median: stop a trial below the median of earlier ones."
    )
    warmup_epochs: int = Field(
        3, ge=0, description="Final-stage epochs a trial runs before it can be pruned."
    )
    repeats: int = Field(
        1,
        ge=1,
        description="Trainings per trial, at seeds seed, seed + 1, ... (same data and split): "
        "the trial's value is the mean of their best validation metrics, so a setting is not "
        "chosen for one lucky initialisation. Pruning watches the first seed's curve.",
    )


class Config(_Section):
    seed: int = 42
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)

    def _drawn(self, key: str, value: Any) -> list[Any]:
        """Every value `key` can take in a run of this config: the tune space's, else `value`."""
        space = self.tune.space
        return space[key].edge_values() if key in space else [value]

    @model_validator(mode="after")
    def _loss_fits_model(self) -> Config:
        """Each loss only for the models it can train (losses.loss_refusal), here and in every
        trial a study can draw; NeuMF's pretrained GMF and MLP train with the same loss."""
        losses = self._drawn("train.loss", self.train.loss)
        names = self._drawn("model.name", self.model.name)
        where = "tune.space can draw " if len(losses) > 1 or len(names) > 1 else ""
        for loss in losses:
            for name in names:
                reason = loss_refusal(loss, name)
                if reason:
                    raise ValueError(f"{where}train.loss={loss} with model.name={name}: {reason}")
        if "lightgcn" in names and True in self._drawn("train.sparse", self.train.sparse):
            raise ValueError(
                f"{where}train.sparse=true with model.name=lightgcn: every step propagates the "
                "whole embedding tables over the graph, so their gradients are dense; set "
                "train.sparse=false"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _sequence_loss_default(cls, data: Any) -> Any:
        """sasrec trains with the full softmax unless train.loss says otherwise: bce, the
        other models' default, does not apply to next-item targets."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            return data
        train = data.get("train") or {}
        sasrec = data["model"].get("name") == "sasrec"
        if sasrec and isinstance(train, dict) and "loss" not in train:
            return {**data, "train": {**train, "loss": "softmax"}}
        return data

    @model_validator(mode="after")
    def _sequence_training(self) -> Config:
        """The training settings that do not apply to sasrec's next-item targets (its losses
        are checked with the others' in _loss_fits_model)."""
        t = self.train
        if "sasrec" in self._drawn("model.name", self.model.name):
            if t.sparse:
                raise ValueError("train.sparse does not apply to sasrec; set train.sparse=false")
            if t.confidence != "none":
                raise ValueError(
                    f"train.confidence={t.confidence} does not apply to sasrec: its targets are "
                    "the next items of sequences; set train.confidence=none"
                )
            if t.sampling != "uniform":
                raise ValueError(
                    "sasrec's gbce negatives are drawn uniformly; set train.sampling=uniform"
                )
            if t.loss == "sampled_softmax" and t.pool != "uniform":
                raise ValueError(
                    f"train.pool={t.pool} does not apply to sasrec: its sampled_softmax draws "
                    "pool_size negatives uniformly, shared by every position of a batch; set "
                    "train.pool=uniform"
                )
        return self

    @model_validator(mode="after")
    def _tune_space(self) -> Config:
        """Every space key must be a model / train setting, and every value it can draw valid."""
        tree = self.to_dict()
        for key, spec in self.tune.space.items():
            where = f"tune.space.{key}"
            section = key.partition(".")[0]
            if section not in ("model", "train"):
                raise ValueError(
                    f"{where}: only model.* and train.* settings can be tuned "
                    "(a study loads its data once)"
                )
            if key in NOT_TUNABLE:
                raise ValueError(f"{where}: cannot be tuned: {NOT_TUNABLE[key]}")
            closed = [n for n in CLOSED_FORM if n in spec.edge_values()]
            if key == "model.name" and closed:
                raise ValueError(f"{where}: {closed[0]} is fitted in closed form, not trained")
            try:
                _set_dotted({}, key, None)
            except ConfigError as exc:
                raise ValueError(f"{where}: {exc}") from None
            if isinstance(_get_dotted(tree, key), dict):
                raise ValueError(f"{where}: a section, not a setting")
            for value in spec.edge_values():
                trial = {section: copy.deepcopy(tree[section])}
                _set_dotted(trial, key, value)
                try:
                    type(getattr(self, section)).model_validate(trial[section])
                except ValidationError as exc:
                    raise ValueError(
                        f"{where}: {value!r} is not a valid value ({_message(exc.errors()[0])})"
                    ) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Short hash of the resolved config, to tell runs and served models apart. The tuning
        section is left out: it does not change what a run trains."""
        blob = json.dumps(self.model_dump(mode="json", exclude={"tune"}), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def training_digest(self) -> str:
        """Hash of what determines the trained weights; runtime knobs (device, threads,
        progress bar, evaluation batching) and the tuning section are left out so a run can
        resume elsewhere."""
        tree = self.model_dump(mode="json", exclude={"tune"})
        for key in ("device", "threads", "eval"):
            tree.pop(key)
        tree["train"].pop("progress")
        tree["data"].pop("cache")
        # Defaults of keys added later are left out, so runs from before them still resume.
        if tree["train"]["confidence"] == "none":
            for key in ("confidence", "confidence_alpha", "confidence_epsilon"):
                tree["train"].pop(key)
        if tree["train"]["loss"] == "bce":
            tree["train"].pop("loss")
        if not tree["model"]["context"]:
            tree["model"].pop("context")
        if tree["train"]["max_epochs"] is None:
            tree["train"].pop("max_epochs")
        if tree["data"]["valid_rule"] == "auto":
            tree["data"].pop("valid_rule")
        unused: dict[str, list[str]] = {"model": [], "train": []}  # of another model, loss
        if tree["model"]["name"] != "lightgcn":
            unused["model"].append("layers")
            unused["train"].append("embedding_l2")
        if tree["train"].get("loss") != "sampled_softmax":
            unused["train"] += ["pool", "pool_size", "logq"]
        if tree["train"].get("loss") != "ccl":
            unused["train"] += ["ccl_margin", "ccl_neg_weight"]
        for section, keys in unused.items():
            for key in keys:
                tree[section].pop(key)
        if tree["model"]["name"] != "sasrec":
            for key in ("max_len", "blocks", "heads"):
                tree["model"].pop(key)
        if tree["model"]["name"] != "graphfilter":
            for key in (
                "rank",
                "ideal_weight",
                "sharpen",
                "degree_power",
                "als_weight",
                "als_reg",
                "als_alpha",
                "als_sweeps",
            ):
                tree["model"].pop(key)
        if self.train.loss != "gbce":
            tree["train"].pop("gbce_t")
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def save(self, path: Path, header: str = "") -> None:
        """Write the resolved config as YAML, after `header` (comment lines) if given."""
        atomic_write_text(path, header + yaml.safe_dump(self.to_dict(), sort_keys=False))

    def with_overrides(self, values: Mapping[str, Any], source: str = "config") -> Config:
        """A validated copy with dotted keys set, e.g. `{"train.lr": 0.01}` (a tuning trial)."""
        tree = self.to_dict()
        for key, value in values.items():
            _set_dotted(tree, key, value)
        return validate_config(tree, source)


def _get_dotted(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    model: type[BaseModel] | None = Config
    for depth, key in enumerate(keys):
        if model is None or key not in model.model_fields:
            raise ConfigError(f"unknown config key '{'.'.join(keys[: depth + 1])}'")
        annotation = model.model_fields[key].annotation
        is_last = depth == len(keys) - 1
        if is_last:
            node[key] = value
            return
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        model = annotation if is_section else None  # type: ignore[assignment]
        if model is None:
            raise ConfigError(f"config key '{'.'.join(keys[: depth + 1])}' has no sub-keys")
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"config section '{'.'.join(keys[: depth + 1])}' must be a mapping")
        node = node[key]


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=0.01` -> ("train.lr", 0.01); values are parsed as YAML scalars or lists."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults), apply dotted overrides, validate everything."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        tree = loaded or {}
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    return validate_config(tree, source=str(path) if path else "config")


def validate_config(tree: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = list(err["loc"])
        if loc[:2] == ["tune", "space"] and len(loc) > 3 and loc[3] in PARAM_TYPES:
            del loc[3]  # the spec's type tag, which pydantic puts into the path
        where = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown config key '{where}'") from None
        msg = _message(err)
        raise ConfigError(f"{source}: {where}: {msg}" if where else f"{source}: {msg}") from None


def _message(err: Any) -> str:
    """Pydantic's message; our own checks read better without its "Value error, " prefix."""
    return str(err["ctx"]["error"]) if err["type"] == "value_error" else str(err["msg"])
