"""Typed configuration: one YAML file, dotted command-line overrides, saved with every run.

Every hyperparameter and path lives here with its default and its bounds, so a typo or an
out-of-range value fails before any data is read.

Example:
    >>> cfg = load_config(None, ["train.epochs=5", "model.name=gmf"])
    >>> cfg.train.epochs
    5
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recommender.utils import ConfigError, atomic_write_text

ModelName = Literal["neumf", "gmf", "mlp", "mf", "popularity"]
SplitName = Literal["leave_last_out", "temporal", "random"]


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
    train_path: str | None = Field(None, description="Pre-split train file (NCF format).")
    test_path: str | None = Field(None, description="Pre-split test file (NCF format).")
    test_negatives_path: str | None = Field(None, description="NCF .test.negative file.")
    format: str = Field("auto", description="Reader format of `path` (see readers.FORMATS).")
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
    valid_ratio: float = Field(0.1, gt=0, lt=1, description="For temporal / random splits.")
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
        return self


class ModelConfig(_Section):
    name: ModelName = "neumf"
    embedding_dim: int = Field(64, ge=1, description="GMF / MF factor size.")
    mlp_layers: list[int] = Field(
        default_factory=lambda: [128, 64, 32, 16],
        description="MLP widths; the first is the concatenated user+item embedding width "
        "(NCF paper convention), so each MLP embedding has mlp_layers[0] / 2 dimensions.",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="After each hidden MLP layer.")

    @model_validator(mode="after")
    def _layers(self) -> ModelConfig:
        if len(self.mlp_layers) < 2 or any(w < 1 for w in self.mlp_layers):
            raise ValueError("mlp_layers needs at least two positive widths")
        if self.mlp_layers[0] % 2:
            raise ValueError("mlp_layers[0] must be even (user and item halves)")
        return self


class StageConfig(_Section):
    """Optimisation settings of one training stage (a pretraining model or the final one)."""

    epochs: int = Field(30, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)


class PretrainConfig(_Section):
    """NeuMF initialised from separately trained GMF and MLP (He et al. 2017, section 3.4.1)."""

    enabled: bool = True
    gmf: StageConfig = Field(default_factory=lambda: StageConfig(lr=5e-3, weight_decay=1e-5))
    mlp: StageConfig = Field(default_factory=lambda: StageConfig(lr=3e-3))
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of GMF in the fused output layer.")
    finetune_lr: float = Field(
        1e-4, gt=0, description="NeuMF's rate after pretraining (train.lr when not pretrained)."
    )


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(4096, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    num_negatives: int = Field(16, ge=1, description="Negatives drawn per positive each epoch.")
    sampling: Literal["uniform", "popularity"] = "uniform"
    popularity_power: float = Field(0.75, ge=0, description="Exponent for popularity sampling.")
    patience: int = Field(10, ge=1, description="Epochs without validation gain before stopping.")
    monitor: str = Field(
        "ndcg@10",
        pattern=r"^(ndcg|hr|recall|precision|map)@[1-9][0-9]*$",
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


class EvalConfig(_Section):
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    num_negatives: int = Field(99, ge=1, description="Sampled protocol, when none are given.")
    batch_users: int = Field(512, ge=1)

    @model_validator(mode="after")
    def _ks(self) -> EvalConfig:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("ks must be positive integers")
        return self


class Config(_Section):
    seed: int = 42
    device: str = "auto"
    threads: int | None = Field(None, ge=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """Short hash of the resolved config, to tell runs and served models apart."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def training_digest(self) -> str:
        """Hash of what determines the trained weights; runtime knobs (device, threads,
        progress bar, evaluation batching) are left out so a run can resume elsewhere."""
        tree = self.to_dict()
        for key in ("device", "threads", "eval"):
            tree.pop(key)
        tree["train"].pop("progress")
        tree["data"].pop("cache")
        blob = json.dumps(tree, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def save(self, path: Path) -> None:
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


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
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown config key '{where}'") from None
        raise ConfigError(f"{source}: {where}: {err['msg']}") from None
