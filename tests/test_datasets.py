"""Built-in dataset fetching (no network: downloads are faked) and the synthetic generator."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recommender.data import datasets
from recommender.data.datasets import (
    BUILTIN,
    fetch,
    load_builtin,
    synthetic_interactions,
    write_synthetic,
)
from recommender.data.readers import read_interactions
from recommender.utils import ConfigError, DataError

U_DATA = "1\t10\t4\t100\n2\t20\t5\t200\n"
U_ITEM = "10|Toy Story (1995)|x||u|" + "|".join(["0", "1"] + ["0"] * 17) + "\n"
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t100\n"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tToy\t1995\tAction\n"  # noqa: E501


def make_zip(members: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in members.items():
            archive.writestr(name, text)
    return buffer.getvalue()


FAKE_ZIP = make_zip({"ml-100k/u.data": U_DATA, "ml-100k/u.item": U_ITEM})
FAKE_WHEEL = make_zip({datasets._WHEEL_INTER: INTER, datasets._WHEEL_ITEM: ITEM})


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the network: both download paths fail unless a test serves a file."""

    def no_download(url: str, dest: Path, timeout: float) -> None:
        raise OSError("network disabled in tests")

    def no_pip(requirement: str, dest: Path) -> Path:
        raise OSError("pip disabled in tests")

    monkeypatch.setattr(datasets, "_download", no_download)
    monkeypatch.setattr(datasets, "_pip_download", no_pip)


@pytest.fixture
def fake_ml100k(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin ml-100k to the fake archive's checksum, as if it were the official one."""
    spec = dataclasses.replace(BUILTIN["ml-100k"], sha256=sha(FAKE_ZIP))
    monkeypatch.setitem(BUILTIN, "ml-100k", spec)


def serve(monkeypatch: pytest.MonkeyPatch, payload: bytes, calls: list[str]) -> None:
    def download(url: str, dest: Path, timeout: float) -> None:
        calls.append(url)
        dest.write_bytes(payload)

    monkeypatch.setattr(datasets, "_download", download)


def serve_wheel(monkeypatch: pytest.MonkeyPatch, payload: bytes, seen: list[Path]) -> None:
    def pip_download(requirement: str, dest: Path) -> Path:
        assert requirement == "recbole==1.2.1"
        wheel = dest / "recbole-1.2.1-py3-none-any.whl"
        wheel.write_bytes(payload)
        seen.append(wheel)
        return wheel

    monkeypatch.setattr(datasets, "_pip_download", pip_download)


def test_builtin_specs_are_official():
    assert set(BUILTIN) == {"ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small"}
    for spec in BUILTIN.values():
        assert spec.url == f"https://files.grouplens.org/datasets/movielens/{spec.name}.zip"
        assert len(spec.sha256) == 64
        assert spec.ratings_member.startswith(f"{spec.name}/")


def test_grouplens_download_verified_extracted_and_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ml100k: None
):
    calls: list[str] = []
    serve(monkeypatch, FAKE_ZIP, calls)
    files = fetch("ml-100k", tmp_path)
    assert files.source == (
        "GroupLens https://files.grouplens.org/datasets/movielens/ml-100k.zip (sha256 verified)"
    )
    assert files.ratings == tmp_path / "raw" / "ml-100k" / "u.data"
    assert (files.ratings_format, files.items_format) == ("ml-100k", "ml-100k-item")
    assert files_under(tmp_path) == [
        "raw/ml-100k.zip", "raw/ml-100k/MANIFEST.json", "raw/ml-100k/u.data", "raw/ml-100k/u.item"
    ]  # fmt: skip

    again = fetch("ml-100k", tmp_path)
    assert len(calls) == 1
    assert again.ratings == files.ratings and "cached" in again.source

    interactions, titles, source = load_builtin("ml-100k", tmp_path)
    assert interactions["item_id"].tolist() == ["10", "20"]
    assert titles is not None and titles["genres"].tolist() == ["Action"]
    assert "GroupLens" in source


def test_checksum_mismatch_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ml100k: None
):
    serve(monkeypatch, FAKE_ZIP + b"tampered", [])
    with pytest.raises(DataError, match="does not match"):
        fetch("ml-100k", tmp_path)
    assert files_under(tmp_path) == []


def test_changed_cache_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_ml100k: None
):
    calls: list[str] = []
    serve(monkeypatch, FAKE_ZIP, calls)
    files = fetch("ml-100k", tmp_path)
    (tmp_path / "raw" / "ml-100k.zip").unlink()
    files.ratings.write_text("1\t99\t1\t1\n")
    assert fetch("ml-100k", tmp_path).ratings.read_text() == U_DATA
    assert len(calls) == 2


def test_zip_placed_by_hand_is_verified_and_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    members = {"ml-1m/ratings.dat": "1::10::4::100\n", "ml-1m/movies.dat": "10::A (1999)::Drama\n"}
    archive = make_zip(members)
    monkeypatch.setitem(
        BUILTIN, "ml-1m", dataclasses.replace(BUILTIN["ml-1m"], sha256=sha(archive))
    )
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "ml-1m.zip").write_bytes(archive)
    interactions, titles, source = load_builtin("ml-1m", tmp_path)
    assert source.startswith("local archive") and "sha256 verified" in source
    assert interactions["user_id"].tolist() == ["1"]
    assert titles is not None and titles["title"].tolist() == ["A (1999)"]

    (tmp_path / "raw" / "ml-1m.zip").write_bytes(archive + b"x")
    (tmp_path / "raw" / "ml-1m" / "MANIFEST.json").unlink()
    with pytest.raises(DataError, match=r"ml-1m\.zip: sha256 .* does not match"):
        fetch("ml-1m", tmp_path)


def test_other_datasets_have_no_fallback(tmp_path: Path):
    with pytest.raises(DataError) as error:
        fetch("ml-1m", tmp_path)
    message = str(error.value)
    assert "GroupLens unreachable" in message
    assert str(tmp_path / "raw" / "ml-1m.zip") in message


def test_ml100k_falls_back_to_the_pypi_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    wheels: list[Path] = []
    serve_wheel(monkeypatch, FAKE_WHEEL, wheels)
    monkeypatch.setattr(datasets, "_WHEEL_INTER_SHA256", sha(INTER.encode()))
    with caplog.at_level(logging.INFO, logger="recommender"):
        interactions, titles, source = load_builtin("ml-100k", tmp_path)
    assert source == "PyPI wheel recbole==1.2.1 (GroupLens unreachable)"
    assert "PyPI wheel recbole==1.2.1" in caplog.text
    assert interactions.to_dict("list") == {
        "user_id": ["1"], "item_id": ["10"], "rating": [4.0], "timestamp": [100]
    }  # fmt: skip
    assert titles is not None and titles["title"].tolist() == ["Toy"]
    assert not wheels[0].exists()
    assert files_under(tmp_path) == [
        "raw/ml-100k/MANIFEST.json", "raw/ml-100k/ml-100k.inter", "raw/ml-100k/ml-100k.item"
    ]  # fmt: skip
    assert "cached" in fetch("ml-100k", tmp_path).source


def test_wheel_checksum_mismatch_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    serve_wheel(monkeypatch, FAKE_WHEEL, [])
    with pytest.raises(DataError, match=r"ml-100k\.inter has sha256"):
        fetch("ml-100k", tmp_path)
    assert files_under(tmp_path) == []


def test_both_sources_failing_explains_both(tmp_path: Path):
    with pytest.raises(DataError) as error:
        fetch("ml-100k", tmp_path)
    message = str(error.value)
    assert "GroupLens unreachable" in message and "pip disabled" in message
    assert str(tmp_path / "raw" / "ml-100k.zip") in message


def test_unknown_dataset():
    with pytest.raises(ConfigError, match="unknown dataset 'ml-2m'"):
        fetch("ml-2m")


def test_synthetic_shape_invariants_and_determinism():
    frame = synthetic_interactions(300, 200, 9_000, seed=3)
    assert len(frame) == 9_000
    assert list(frame.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert frame["timestamp"].dtype == np.int64 and frame["rating"].dtype == np.float64
    assert not frame.duplicated(["user_id", "item_id"]).any()
    per_user = frame.groupby("user_id").size()
    assert len(per_user) == 300 and per_user.min() >= 5 and per_user.max() <= 100
    assert per_user.max() > 3 * per_user.median()  # long-tailed activity
    assert frame["rating"].between(1, 5).all() and frame["rating"].nunique() == 5
    increasing = frame.groupby("user_id", sort=False)["timestamp"].apply(
        lambda t: bool((np.diff(t.to_numpy()) > 0).all())
    )
    assert increasing.all()
    pd.testing.assert_frame_equal(frame, synthetic_interactions(300, 200, 9_000, seed=3))
    assert not frame.equals(synthetic_interactions(300, 200, 9_000, seed=4))


def test_synthetic_heavy_users_reach_the_cap():
    frame = synthetic_interactions(20, 40, 400, seed=0)  # every user needs all 20 allowed items
    assert (frame.groupby("user_id").size() == 20).all()
    assert not frame.duplicated(["user_id", "item_id"]).any()


def hit_rate(scores: np.ndarray, train: np.ndarray, held_out: np.ndarray, k: int = 10) -> float:
    scores = np.where(train > 0, -np.inf, scores)
    top = np.argsort(-scores, axis=1)[:, :k]
    return float((top == held_out[:, None]).any(axis=1).mean())


def test_synthetic_structure_rewards_collaborative_models():
    frame = synthetic_interactions(600, 300, 24_000, seed=0)
    users = frame["user_id"].astype(int).to_numpy() - 1
    items = frame["item_id"].astype(int).to_numpy() - 1
    last = frame.groupby("user_id", sort=False)["timestamp"].transform("max").to_numpy()
    test = frame["timestamp"].to_numpy() == last
    train = np.zeros((600, 300))
    train[users[~test], items[~test]] = 1.0
    held_out = np.empty(600, dtype=np.int64)
    held_out[users[test]] = items[test]

    popularity = np.broadcast_to(train.sum(axis=0), train.shape)
    norms = np.sqrt(train.sum(axis=0)) + 1e-9
    cosine = (train.T @ train) / norms[:, None] / norms[None, :]
    np.fill_diagonal(cosine, 0.0)
    knn = train @ cosine
    random_hr = float(np.mean(10 / (300 - train.sum(axis=1))))

    hr_pop, hr_knn = hit_rate(popularity, train, held_out), hit_rate(knn, train, held_out)
    assert hr_pop > 1.5 * random_hr
    assert hr_knn > 1.2 * hr_pop


def test_synthetic_argument_checks():
    with pytest.raises(ConfigError, match="n_interactions"):
        synthetic_interactions(100, 50, 100)
    with pytest.raises(ConfigError, match="n_items >= 10"):
        synthetic_interactions(10, 5, 50)


def test_write_synthetic(tmp_path: Path):
    kwargs = {"n_users": 20, "n_items": 30, "n_interactions": 200, "seed": 1}
    expected = synthetic_interactions(**kwargs)
    for name in ("s.parquet", "s.csv"):
        path = write_synthetic(tmp_path / name, **kwargs)
        pd.testing.assert_frame_equal(read_interactions(path), expected, check_dtype=False)
    with pytest.raises(ConfigError, match=r"parquet or \.csv"):
        write_synthetic(tmp_path / "s.json", **kwargs)
