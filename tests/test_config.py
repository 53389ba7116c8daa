"""Typed config: defaults, dotted overrides, unknown keys, cross-field checks, YAML round trip."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

from recommender.config import Config, load_config, parse_override, validate_config
from recommender.utils import ConfigError, resolve_device


def test_defaults_are_valid_and_documented_choices():
    cfg = load_config(None)
    assert cfg.to_dict() == Config().to_dict()
    assert cfg.model.name == "neumf"
    assert cfg.data.dataset == "ml-100k"
    assert cfg.data.split == "leave_last_out"
    assert cfg.train.num_negatives >= 1
    assert 10 in cfg.eval.ks
    assert cfg.train.monitor == "ndcg@10"


def test_project_config_file_is_valid_if_present():
    path = Path(__file__).parents[1] / "configs" / "config.yaml"
    if not path.is_file():
        pytest.skip("configs/config.yaml not written yet")
    cfg = load_config(path)
    # The checked-in file states every hyperparameter: nothing is left to a hidden default.
    assert flat_keys(yaml.safe_load(path.read_text())) == flat_keys(cfg.to_dict())
    # ... and equals the code's defaults, so `recommender train` without --config is the same.
    assert cfg.to_dict() == Config().to_dict()


def test_next_item_preset_is_the_benchmarked_variant(monkeypatch: pytest.MonkeyPatch):
    """configs/next-item.yaml and bench_quality's mf-context variant must not drift apart."""
    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location(
        "bench_quality", root / "benchmarks" / "bench_quality.py"
    )
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look themselves up
    monkeypatch.syspath_prepend(str(root / "benchmarks"))  # as `python benchmarks/...` has it
    spec.loader.exec_module(bench)
    name, overrides = bench.VARIANTS["mf-context"]
    preset = load_config(root / "configs" / "next-item.yaml")
    assert preset.model.context == 3
    assert preset.to_dict() == load_config(None, [f"model.name={name}", *overrides]).to_dict()


def flat_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(f"{prefix}{key}")
    return keys


@pytest.mark.parametrize(
    ("override", "getter", "expected"),
    [
        ("train.epochs=5", lambda c: c.train.epochs, 5),
        ("train.lr=0.01", lambda c: c.train.lr, 0.01),
        ("train.lr=1e-3", lambda c: c.train.lr, 1e-3),
        ("model.name=gmf", lambda c: c.model.name, "gmf"),
        ("model.mlp_layers=[64, 32, 16]", lambda c: c.model.mlp_layers, [64, 32, 16]),
        ("eval.ks=[1,5]", lambda c: c.eval.ks, [1, 5]),
        ("train.pretrain.gmf.epochs=3", lambda c: c.train.pretrain.gmf.epochs, 3),
        ("train.pretrain.enabled=false", lambda c: c.train.pretrain.enabled, False),
        ("data.columns.user=uid", lambda c: c.data.columns.user, "uid"),
        ("data.columns.timestamp=null", lambda c: c.data.columns.timestamp, None),
        ("data.rating_threshold=4", lambda c: c.data.rating_threshold, 4.0),
        ("threads=2", lambda c: c.threads, 2),
        ("train.confidence=log", lambda c: c.train.confidence, "log"),
        ("train.confidence_alpha=0.01", lambda c: c.train.confidence_alpha, 0.01),
        ("train.confidence_epsilon=10", lambda c: c.train.confidence_epsilon, 10.0),
    ],
)
def test_dotted_overrides(override, getter, expected):
    assert getter(load_config(None, [override])) == expected


def test_override_applies_on_top_of_a_file_and_later_wins(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.5\nmodel:\n  name: mf\n")
    cfg = load_config(path, ["train.epochs=2", "train.epochs=3"])
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.name) == (3, 0.5, "mf")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epoch=5", "train.epoch"),
        ("trian.epochs=5", "trian"),
        ("train.pretrain.gmf.epoch=1", "train.pretrain.gmf.epoch"),
        ("data.columns.users=x", "data.columns.users"),
    ],
)
def test_unknown_override_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"unknown config key '{key}'"):
        load_config(None, [override])


def test_unknown_key_in_file_names_the_file_and_key(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "train.learning_rate" in str(info.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed.value=1", "'seed' has no sub-keys"),
        ("train.epochs", "not of the form"),
        ("train.epochs=0", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("train.epochs=many", "train.epochs"),
        ("train.lr=-1", "train.lr"),
        ("model.name=transformer", "model.name"),
        ("data.split=kfold", "data.split"),
        ("train.sampling=hard", "train.sampling"),
        ("model.dropout=1.0", "model.dropout"),
        ("train.pretrain.alpha=1.5", "train.pretrain.alpha"),
        ("train.confidence=sqrt", "train.confidence"),
        ("train.confidence=true", "train.confidence"),
        ("train.confidence_alpha=0", "train.confidence_alpha"),
        ("train.confidence_epsilon=-1", "train.confidence_epsilon"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["data.train_path=a.rating"], "train_path and test_path must be given together"),
        (["data.test_path=b.rating"], "train_path and test_path must be given together"),
        (["data.test_negatives_path=c.negative"], "test_negatives_path needs"),
        (["model.mlp_layers=[33,16]"], "must be even"),
        (["model.mlp_layers=[32]"], "at least two"),
        (["model.mlp_layers=[32,0]"], "at least two positive"),
        (["eval.ks=[]"], "ks must be positive"),
        (["eval.ks=[0,10]"], "ks must be positive"),
    ],
)
def test_cross_field_validation(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, overrides)


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b= x ") == ("a.b", "x")
    assert parse_override("a.b=") == ("a.b", None)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=x=y") == ("a.b", "x=y")
    assert parse_override("a.b=[unclosed") == ("a.b", "[unclosed")


def test_saved_yaml_round_trips(tmp_path: Path):
    cfg = load_config(
        None,
        ["train.epochs=3", "model.mlp_layers=[16,8]", "data.path=x.csv", "eval.ks=[3]",
         "train.confidence=linear", "train.confidence_alpha=0.05"],
    )  # fmt: skip
    path = tmp_path / "run" / "config.yaml"
    cfg.save(path)
    again = load_config(path)
    assert again == cfg
    assert again.digest() == cfg.digest()
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temp file


def test_digest_tells_configs_apart():
    assert load_config(None).digest() == load_config(None).digest()
    assert load_config(None).digest() != load_config(None, ["seed=1"]).digest()


@pytest.mark.parametrize("override", ["train.confidence_alpha=2", "train.confidence_epsilon=5"])
def test_confidence_changes_what_a_run_trains(override: str):
    # --resume compares training digests: a run must not resume under another confidence.
    on = load_config(None, ["train.confidence=log"])
    assert on.training_digest() != load_config(None).training_digest()
    assert load_config(None, ["train.confidence=log", override]).training_digest() != (
        on.training_digest()
    )
    # With confidence off the keys are inert, so runs from before they existed still resume.
    assert load_config(None, [override]).training_digest() == load_config(None).training_digest()


def test_max_epochs_changes_what_a_run_trains_only_when_set():
    capped = load_config(None, ["train.max_epochs=1"])
    assert capped.training_digest() != load_config(None).training_digest()
    tree = load_config(None).model_dump(mode="json")
    del tree["train"]["max_epochs"]  # a run from before the key resumes
    assert validate_config(tree, "old run").training_digest() == load_config(None).training_digest()


def test_the_loss_changes_what_a_run_trains():
    bce = load_config(None, ["model.name=mf"])
    softmax = load_config(None, ["model.name=mf", "train.loss=softmax"])
    assert softmax.training_digest() != bce.training_digest()
    # The default is left out of the digest: runs from before the key existed still resume.
    tree = bce.model_dump(mode="json")
    del tree["train"]["loss"]
    assert validate_config(tree, "old run").training_digest() == bce.training_digest()


NEW_KEYS = {
    "model": ["layers"],
    "train": ["pool", "pool_size", "logq", "ccl_margin", "ccl_neg_weight", "embedding_l2"],
}


def test_settings_of_another_loss_or_model_leave_the_digest_alone():
    bce = load_config(None, ["model.name=mf"])
    for key in ("train.pool_size=8", "train.ccl_margin=0.1", "model.layers=1"):
        assert load_config(None, ["model.name=mf", key]).training_digest() == bce.training_digest()
    # Runs from before these keys existed still resume.
    tree = bce.model_dump(mode="json")
    for section, keys in NEW_KEYS.items():
        for key in keys:
            del tree[section][key]
    assert validate_config(tree, "old run").training_digest() == bce.training_digest()
    sampled = load_config(None, ["model.name=mf", "train.loss=sampled_softmax"])
    smaller = load_config(
        None, ["model.name=mf", "train.loss=sampled_softmax", "train.pool_size=8"]
    )
    assert smaller.training_digest() != sampled.training_digest()
    graph = load_config(None, ["model.name=lightgcn"])
    assert load_config(None, ["model.name=lightgcn", "model.layers=1"]).training_digest() != (
        graph.training_digest()
    )


@pytest.mark.parametrize(
    ("loss", "model"),
    [("ccl", "gmf"), ("ccl", "mlp"), ("ccl", "neumf"), ("softmax", "mlp"), ("softmax", "neumf")],
)
def test_a_loss_a_model_cannot_train_is_refused(loss: str, model: str, tmp_path: Path):
    with pytest.raises(ConfigError, match=f"train.loss={loss} with model.name={model}: {loss}"):
        load_config(None, [f"train.loss={loss}", f"model.name={model}"])
    path = tmp_path / "study.yaml"
    path.write_text(
        f"tune:\n  space:\n    model.name: {{type: categorical, choices: [mf, {model}]}}\n"
    )
    with pytest.raises(ConfigError, match=f"tune.space can draw train.loss={loss} with model"):
        load_config(path, [f"train.loss={loss}"])


@pytest.mark.parametrize("loss", ["bce", "softmax", "sampled_softmax", "bpr", "ccl"])
def test_lightgcn_and_mf_take_every_loss(loss: str):
    for model in ("mf", "lightgcn"):
        assert load_config(None, [f"train.loss={loss}", f"model.name={model}"]).train.loss == loss


def test_lightgcn_refuses_sparse_gradients():
    with pytest.raises(ConfigError, match=r"train\.sparse=true with model\.name=lightgcn"):
        load_config(None, ["model.name=lightgcn", "train.sparse=true"])


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("train: [1, 2\n", "invalid YAML"), ("- 1\n- 2\n", "top level must be a mapping")],
)
def test_bad_config_files(tmp_path: Path, text: str, fragment: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_config_file_means_defaults(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path) == Config()


@pytest.mark.parametrize("section", ["train:\n", "train: 5\n"])
def test_override_into_a_section_that_is_not_a_mapping_is_a_config_error(
    tmp_path: Path, section: str
):
    # A YAML section left empty (null) or given a scalar must be reported, not crash
    # `_set_dotted` with a TypeError.
    path = tmp_path / "c.yaml"
    path.write_text(section)
    try:
        cfg = load_config(path, ["train.epochs=3"])
    except ConfigError as exc:
        assert "train" in str(exc)
    else:
        assert cfg.train.epochs == 3


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("not-a-device")


def space(spec: str) -> str:
    return f"tune.space={{{spec}}}"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("data.path: {type: categorical, choices: [a.csv]}", "tune.space.data.path: only model."),
        ("seed: {type: int, low: 1, high: 3}", "tune.space.seed: only model.* and train.*"),
        ("train.lrr: {type: float, low: 0.1, high: 1}", "unknown config key 'train.lrr'"),
        ("train.lr.x: {type: float, low: 0.1, high: 1}", "'train.lr' has no sub-keys"),
        ("train.pretrain: {type: float, low: 0.1, high: 1}", "a section, not a setting"),
        ("train.monitor: {type: categorical, choices: [hr@10]}", "it is the objective"),
        ("train.lr: {type: float, low: 0.1, high: 0.01}", "low (0.1) must be below high"),
        ("train.lr: {type: float, low: 0, high: 0.1, log: true}", "log scale needs low > 0"),
        ("train.lr: {type: float, low: -1, high: 0.1}", "-1.0 is not a valid value"),
        ("train.lr: {type: float, low: 0.1, high: 1, choices: [1]}",
         "unknown config key 'tune.space.train.lr.choices'"),
        ("train.lr: {type: decimal, low: 0.1, high: 1}", "tune.space.train.lr: Input tag"),
        ("train.epochs: {type: float, low: 1.5, high: 3}", "1.5 is not a valid value"),
        ("train.epochs: {type: int, low: 1, high: 10, step: 4}", "multiple of step"),
        ("model.mlp_layers: {type: categorical, choices: [[32, 16], [33, 16]]}",
         "[33, 16] is not a valid value (mlp_layers[0] must be even"),
        ("model.name: {type: categorical, choices: [gmf, popularity]}", "popularity is fitted in"),
        ("model.name: {type: categorical, choices: [mf, graphfilter]}", "graphfilter is fitted in"),
        ("model.name: {type: categorical, choices: []}", "tune.space.model.name.choices"),
        ("model.name: {type: categorical, choices: [gmf, gmf]}", "choices must be distinct"),
    ],
)  # fmt: skip
def test_tune_space_is_checked_at_load_time(spec: str, fragment: str):
    with pytest.raises(ConfigError) as info:
        load_config(None, [space(spec)])
    assert fragment in str(info.value)


def test_tune_space_accepts_every_spec_type():
    cfg = load_config(
        None,
        [space("train.lr: {type: float, low: 0.001, high: 0.1, log: true}, "
               "train.epochs: {type: int, low: 2, high: 10, step: 4}, "
               "model.mlp_layers: {type: categorical, choices: [[32, 16], [64, 32, 16]]}")],
    )  # fmt: skip
    assert set(cfg.tune.space) == {"train.lr", "train.epochs", "model.mlp_layers"}
    assert cfg.tune.space["model.mlp_layers"].edge_values() == [[32, 16], [64, 32, 16]]


def test_with_overrides_validates_like_a_file(tmp_path: Path):
    cfg = load_config(None)
    tuned = cfg.with_overrides({"train.lr": 0.01, "model.mlp_layers": [32, 16]})
    assert (tuned.train.lr, tuned.model.mlp_layers, cfg.train.lr) == (0.01, [32, 16], 3e-3)
    with pytest.raises(ConfigError, match=r"trial 3: train\.lr"):
        cfg.with_overrides({"train.lr": -1.0}, source="trial 3")
    path = tmp_path / "best.yaml"
    tuned.save(path, header="# best trial\n")
    assert path.read_text().startswith("# best trial\nseed: 42\n")
    assert load_config(path) == tuned


def test_a_partly_given_pretraining_stage_keeps_its_own_defaults(tmp_path: Path):
    default = load_config(None).train.pretrain
    by_flag = load_config(None, ["train.pretrain.gmf.lr=1e-3", "train.pretrain.mlp.epochs=3"])
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  pretrain:\n    gmf: {lr: 0.001}\n    mlp: {epochs: 3}\n")
    for pretrain in (by_flag.train.pretrain, load_config(path).train.pretrain):
        assert pretrain.gmf.lr == 1e-3 and pretrain.mlp.epochs == 3
        # the rest is the stage's default, not StageConfig's (weight decay 0, lr 1e-3)
        assert pretrain.gmf.weight_decay == default.gmf.weight_decay == 1e-5
        assert pretrain.mlp.lr == default.mlp.lr == 3e-3
