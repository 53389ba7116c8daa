"""The MF baseline a report compares its run against: a given MF run, checked, or one trained here.

Without `--mf`, an MF baseline is trained once with the run's data config (model.name=mf,
pretraining off, otherwise defaults, plus any `--mf-set` overrides) into RUN/baselines/mf and
reused by later builds while its config is unchanged. A given MF run must have been trained on
the same data as the run, or its metrics would not be comparable.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from recommender.checkpoint import is_run, read_config
from recommender.config import Config, load_config
from recommender.utils import RecommenderError

if TYPE_CHECKING:
    from recommender.data.pipeline import DataBundle

log = logging.getLogger("recommender")


def _data_differences(a: Config, b: Config) -> list[str]:
    """Config keys that make two runs' test data differ; where the data is cached does not."""
    da, db = a.data.model_dump(mode="json"), b.data.model_dump(mode="json")
    keys = [f"data.{k}" for k in da if k not in ("cache", "root") and da[k] != db[k]]
    return keys + (["seed"] if a.seed != b.seed else [])


def scratch_dir(target: Path) -> Path:
    """A new empty folder beside `target`, to be renamed over it once complete.

    Created with mkdir, not mkdtemp, so it gets the usual permissions rather than 0700.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
    tmp.mkdir()
    return tmp


def mf_baseline_config(cfg: Config, overrides: Sequence[str] = ()) -> Config:
    """MF on the run's data, seed, device and evaluation settings; default training otherwise."""
    keep = {
        "seed": cfg.seed,
        "device": cfg.device,
        "threads": cfg.threads,
        "data": cfg.data.model_dump(mode="json"),
        "eval": cfg.eval.model_dump(mode="json"),
    }
    # JSON is YAML, so every kept value round-trips through the override parser unchanged.
    sets = [f"{key}={json.dumps(value)}" for key, value in keep.items()]
    sets += ["model.name=mf", "train.pretrain.enabled=false", "train.progress=false"]
    return load_config(None, [*sets, *overrides])


def ensure_mf_baseline(
    run_dir: Path, cfg: Config, data: DataBundle, overrides: Sequence[str] = ()
) -> tuple[Path, bool]:
    """RUN/baselines/mf, trained now unless a baseline with the same config is there already.

    Returns (the baseline's run dir, whether it was trained now). Training goes to a temporary
    folder renamed into place at the end, so a killed build never leaves a baseline to reuse.
    """
    from recommender.train import Trainer
    from recommender.utils import resolve_device

    mf_cfg = mf_baseline_config(cfg, overrides)
    target = run_dir / "baselines" / "mf"
    if is_run(target):
        if read_config(target).training_digest() == mf_cfg.training_digest():
            log.info("report: reusing the MF baseline in %s", target)
            return target, False
        log.info("report: the MF baseline in %s has another config; training it again", target)
    tmp = scratch_dir(target)
    try:
        log.info("report: training an MF baseline into %s", target)
        Trainer(mf_cfg, data, tmp, resolve_device(mf_cfg.device)).fit()
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target, True


def mf_comparison(
    run_dir: Path,
    cfg: Config,
    data: DataBundle,
    name: str,
    mf_run: str | Path | None,
    skip_mf: bool,
    overrides: Sequence[str],
) -> tuple[Path | None, str]:
    """The MF run to compare against (None: the run is MF, or MF is skipped) and a note."""
    if name == "mf":
        return None, "the run itself is an MF model"
    if skip_mf:
        return None, "skipped (--no-mf)"
    if mf_run is None:
        mf_dir, trained = ensure_mf_baseline(run_dir, cfg, data, overrides)
        when = "trained for this report" if trained else "reused from an earlier build"
        extra = f", overrides {' '.join(overrides)}" if overrides else ""
        return mf_dir, f"{mf_dir}: {when}; the run's data, default MF settings{extra}"
    mf_dir = Path(mf_run)
    mf_cfg = read_config(mf_dir)
    if mf_cfg.model.name != "mf":
        raise RecommenderError(f"--mf {mf_dir}: a {mf_cfg.model.name} run, expected an mf run")
    differ = _data_differences(cfg, mf_cfg)
    if differ:
        raise RecommenderError(
            f"--mf {mf_dir}: trained on other data than {run_dir} ({', '.join(differ)} "
            "differ), so its metrics are not comparable"
        )
    return mf_dir, f"MF run {mf_dir}"
