"""Scale plumbing: columnar ingestion, the processed cache, cheap validation, chunked epochs, AMP.

Every fast path is checked against the general one on the same input: same rows, same order,
same vocabularies, so the choice between them never changes a result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAST, planted_frame, run_cli
from recommender.config import load_config
from recommender.data import cache, pipeline
from recommender.data.columnar import read_indexed
from recommender.data.interactions import Interactions
from recommender.data.pipeline import DataBundle, load_data
from recommender.data.sampling import NegativeSampler, epoch_batches, to_device
from recommender.train import Trainer
from recommender.utils import DataError


def messy_frame() -> pd.DataFrame:
    """Planted data plus what ingestion must handle: duplicates, ties, padded and zero-led ids."""
    frame = planted_frame(n_users=60, n_items=50, per_user=10, seed=3)
    frame["item_id"] = frame["item_id"].astype(str)
    dup = frame.iloc[::7].copy()
    dup["timestamp"] += 5  # a later repeat of the same pair: the later row wins
    frame = pd.concat([frame, dup, frame.iloc[:3]], ignore_index=True)
    frame.loc[frame.index[:4], "item_id"] = "007"
    frame.loc[frame.index[4:6], "item_id"] = " 7"
    frame.loc[frame.index[6:8], "timestamp"] = frame["timestamp"].iloc[8]  # timestamp ties
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def bundles_equal(a: DataBundle, b: DataBundle) -> None:
    assert a.users.to_list() == b.users.to_list()
    assert a.items.to_list() == b.items.to_list()
    for name in ("train", "valid", "test", "train_full"):
        x, y = getattr(a, name), getattr(b, name)
        for field in ("user_idx", "item_idx", "timestamp", "rating"):
            fx, fy = getattr(x, field), getattr(y, field)
            assert (fx is None) == (fy is None), (name, field)
            if fx is not None:
                np.testing.assert_array_equal(fx, fy, err_msg=f"{name}.{field}")
                assert fx.dtype == fy.dtype


def general_path(monkeypatch: pytest.MonkeyPatch, cfg) -> DataBundle:
    with monkeypatch.context() as m:
        m.setattr(pipeline, "read_indexed", lambda cfg: None)
        return load_data(cfg.data, cfg.seed)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
@pytest.mark.parametrize(
    "sets",
    [
        [],
        ["data.rating_threshold=3"],
        ["data.min_user_interactions=8", "data.min_item_interactions=4"],
        ["data.split=random"],
        ["data.split=temporal"],
    ],
)
def test_columnar_path_matches_the_general_path(tmp_path, monkeypatch, suffix, sets):
    path = tmp_path / f"data{suffix}"
    frame = messy_frame()
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    cfg = load_config(None, ["data.dataset=null", f"data.path={path}", "data.cache=false", *sets])
    assert read_indexed(cfg.data) is not None  # the fast path is taken ...
    bundles_equal(load_data(cfg.data, cfg.seed), general_path(monkeypatch, cfg))  # ... equally


def test_columnar_path_handles_integer_parquet_ids_and_mapped_columns(tmp_path, monkeypatch):
    frame = messy_frame().drop(columns="rating")
    frame = frame[frame["item_id"].str.strip() != "7"]
    frame = frame.rename(columns={"user_id": "uid", "item_id": "sku", "timestamp": "ts"})
    frame["sku"] = frame["sku"].astype(int) * 1000
    path = tmp_path / "ints.parquet"
    frame.to_parquet(path, index=False)
    cfg = load_config(
        None,
        [
            "data.dataset=null",
            f"data.path={path}",
            "data.cache=false",
            "data.columns={user: uid, item: sku, rating: null, timestamp: ts}",
        ],
    )
    assert read_indexed(cfg.data) is not None
    bundles_equal(load_data(cfg.data, cfg.seed), general_path(monkeypatch, cfg))


@pytest.mark.parametrize(
    ("edit", "valid"),
    [
        (lambda f: f.assign(rating=f["rating"].where(f.index != 5)), False),  # NaN rating
        (lambda f: f.assign(user_id=f["user_id"].where(f.index != 5, "  ")), False),  # blank id
        (lambda f: f.drop(columns="item_id"), False),  # missing column
        (lambda f: f.assign(timestamp=f["timestamp"] + 0.5), True),  # float timestamps
    ],
)
def test_columnar_path_leaves_unusual_input_to_the_general_path(tmp_path, edit, valid):
    path = tmp_path / "odd.parquet"
    edit(messy_frame()).to_parquet(path, index=False)
    cfg = load_config(None, ["data.dataset=null", f"data.path={path}", "data.cache=false"])
    assert read_indexed(cfg.data) is None
    if valid:
        assert len(load_data(cfg.data, cfg.seed).train) > 0
    else:
        with pytest.raises(DataError):
            load_data(cfg.data, cfg.seed)


def test_processed_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    path = tmp_path / "data.csv"
    messy_frame().to_csv(path, index=False)
    sets = ["data.dataset=null", f"data.path={path}", f"data.root={tmp_path / 'root'}"]
    cfg = load_config(None, [*sets, "data.cache=true"])
    first = load_data(cfg.data, cfg.seed)
    folders = list((tmp_path / "root" / "processed").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    assert isinstance(first.train.user_idx.base, np.memmap)  # served from the mapped files

    def no_ingestion(*args, **kwargs):
        raise AssertionError("ingested again instead of using the cache")

    monkeypatch.setattr(pipeline, "_load_file", no_ingestion)
    again = load_data(cfg.data, cfg.seed)
    bundles_equal(first, again)
    np.testing.assert_array_equal(again.train_full.csr()[1], first.train_full.csr()[1])
    monkeypatch.undo()
    bundles_equal(again, general_path(monkeypatch, load_config(None, [*sets, "data.cache=false"])))
    # A changed setting or a touched file gets a new folder; runtime knobs do not.
    assert cache.cache_dir(load_config(None, [*sets, "data.cache=true"]).data, 7) == folders[0]
    other = load_config(None, [*sets, "data.cache=true", "data.min_user_interactions=2"])
    assert cache.cache_dir(other.data, cfg.seed) != folders[0]
    path.touch()
    assert cache.cache_dir(cfg.data, cfg.seed) != folders[0]
    # auto: small files are not cached; off: never.
    assert cache.cache_dir(load_config(None, sets).data, 0) is None
    assert cache.cache_dir(load_config(None, [*sets, "data.cache=false"]).data, 0) is None


def test_a_half_written_cache_folder_is_never_used(tmp_path):
    path = tmp_path / "data.csv"
    messy_frame().to_csv(path, index=False)
    cfg = load_config(
        None,
        ["data.dataset=null", f"data.path={path}", f"data.root={tmp_path}", "data.cache=true"],
    )
    folder = cache.cache_dir(cfg.data, cfg.seed)
    assert folder is not None
    folder.mkdir(parents=True)
    (folder / "users.npy").write_bytes(b"torn")  # no meta.json: a crash mid-write
    assert cache.load(folder) is None


def test_known_unique_skips_only_the_duplicate_check():
    with pytest.raises(DataError, match="duplicate"):
        Interactions(np.array([0, 0]), np.array([1, 1]), 2, 2)
    with pytest.raises(DataError, match="outside"):
        Interactions.known_unique(np.array([0, 5]), np.array([1, 1]), 2, 2)
    a = Interactions(np.array([0, 1]), np.array([1, 0]), 2, 2)
    with pytest.raises(DataError, match="duplicate"):
        a.concat(a)  # without disjoint=True, concatenation is still checked
    both = a.subset(np.array([True, False])).concat(
        a.subset(np.array([False, True])), disjoint=True
    )
    np.testing.assert_array_equal(both.keys, a.keys)


def test_csr_lists_each_users_items_sorted(rng):
    keys = rng.choice(40 * 30, size=300, replace=False)
    data = Interactions(keys // 30, keys % 30, 40, 30)
    indptr, items = data.csr()
    for u in range(40):
        np.testing.assert_array_equal(
            items[indptr[u] : indptr[u + 1]], np.sort(keys[keys // 30 == u] % 30)
        )


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_epochs_cover_every_positive_in_full_batches(chunk, rng):
    keys = rng.choice(30 * 40, size=257, replace=False)
    data = Interactions(keys // 40, keys % 40, 30, 40)
    batches = list(
        epoch_batches(
            torch.from_numpy(data.user_idx),
            torch.from_numpy(data.item_idx),
            NegativeSampler(data),
            num_negatives=3,
            batch_size=50,
            generator=torch.Generator().manual_seed(0),
            chunk=chunk,
        )
    )
    assert all(len(b[0]) == 50 for b in batches[:-1])
    u, i, y = (torch.cat(t) for t in zip(*batches, strict=True))
    assert len(u) == 257 * 4
    pos = sorted(
        (a * 40 + b) for a, b, c in zip(u.tolist(), i.tolist(), y.tolist(), strict=True) if c
    )
    assert pos == sorted(keys.tolist())
    assert not np.isin((u * 40 + i)[y == 0].numpy(), keys).any()


def test_to_device_on_cpu_shares_nothing_it_should_not():
    array = np.arange(5)
    tensor = to_device(array, torch.device("cpu"))
    assert tensor.dtype == torch.int64 and tensor.tolist() == [0, 1, 2, 3, 4]


def test_amp_resolution_and_bf16_training_on_cpu(planted_csv: Path, tmp_path: Path, capsys):
    base = ["data.dataset=null", f"data.path={planted_csv}", "device=cpu"]
    data = load_data(load_config(None, base).data, 0)
    for value, expected in (("auto", False), ("false", False), ("true", True)):
        cfg = load_config(None, [*base, f"train.amp={value}"])
        assert Trainer(cfg, data, tmp_path / "x", torch.device("cpu")).amp is expected
    out = tmp_path / "amp"
    args = ["train", "--data", str(planted_csv), "--model", "gmf", "--out", str(out)]
    args += [f"--set={s}" for s in [*FAST, "train.epochs=6", "train.amp=true"]]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    code, text, _ = run_cli(["evaluate", "--run", str(out), "--json"], capsys)
    results = json.loads(text)["results"]
    assert results["gmf/full"]["metrics"]["hr@10"] > results["popularity/full"]["metrics"]["hr@10"]
