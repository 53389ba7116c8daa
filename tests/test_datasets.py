"""Built-in dataset fetching (no network: downloads are faked)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import zipfile
from pathlib import Path

import pytest

from recommender.config import DataConfig
from recommender.data import datasets
from recommender.data.datasets import BUILTIN, fetch, load_builtin
from recommender.data.pipeline import load_data
from recommender.data.readers import FORMATS, ITEM_FORMATS
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

# The real formats: ml-latest-small's CSVs have CRLF line endings and quoted titles; Last.fm's
# HetRec files are tab-separated with a header, user_artists.dat CRLF, artists.dat LF and UTF-8.
ML_RATINGS = (
    "userId,movieId,rating,timestamp\r\n"
    "1,1,4.0,964982703\r\n1,11,2.5,964981247\r\n2,1,5.0,1445714835\r\n"
)
ML_MOVIES = (
    "movieId,title,genres\r\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\r\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\r\n'
)
USER_ARTISTS = "userID\tartistID\tweight\r\n2\t51\t13883\r\n2\t1686\t3\r\n5\t51\t250\r\n"
ARTISTS = (
    "id\tname\turl\tpictureURL\n"
    "51\tDuran Duran\thttp://www.last.fm/music/Duran+Duran\thttp://u/1.jpg\n"
    '1686\t"Weird Al" Yankovic\thttp://www.last.fm/music/%22Weird+Al%22+Yankovic\t\n'
)
# The official Last.fm archive keeps its files at the top level (tags and friends left out).
LASTFM_ZIP = make_zip({"user_artists.dat": USER_ARTISTS, "artists.dat": ARTISTS})
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
    movielens = {"ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small"}
    assert set(BUILTIN) == movielens | {"hetrec2011-lastfm-2k"}
    for spec in BUILTIN.values():
        folder = "movielens" if spec.name in movielens else "hetrec2011"
        assert spec.url == f"https://files.grouplens.org/datasets/{folder}/{spec.name}.zip"
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        assert spec.ratings_format in FORMATS and spec.items_format in ITEM_FORMATS
        if spec.name in movielens:
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


def write_tree(root: Path, members: dict[str, str]) -> Path:
    for name, text in members.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text.encode("utf-8"))
    return root


@pytest.mark.parametrize("layout", ["extracted folder", "folder above it"])
def test_ml_latest_small_from_a_local_folder(tmp_path: Path, layout: str):
    members = {"ml-latest-small/ratings.csv": ML_RATINGS, "ml-latest-small/movies.csv": ML_MOVIES,
               "ml-latest-small/links.csv": "movieId,imdbId,tmdbId\r\n"}  # fmt: skip
    parent = write_tree(tmp_path / "download", members)
    local = parent / "ml-latest-small" if layout == "extracted folder" else parent
    root = tmp_path / "data"
    files = fetch("ml-latest-small", root, local=local)
    assert files.source.startswith(f"local folder {local} (not checksum-verified")
    assert files_under(root) == [
        "raw/ml-latest-small/MANIFEST.json", "raw/ml-latest-small/movies.csv",
        "raw/ml-latest-small/ratings.csv",
    ]  # fmt: skip

    # Later runs use the import; the network stays off (the autouse fixture).
    interactions, titles, source = load_builtin("ml-latest-small", root)
    assert "cached in" in source
    assert interactions.to_dict("list") == {
        "user_id": ["1", "1", "2"], "item_id": ["1", "11", "1"], "rating": [4.0, 2.5, 5.0],
        "timestamp": [964982703, 964981247, 1445714835],
    }  # fmt: skip
    assert titles is not None
    assert titles.to_dict("list") == {
        "item_id": ["1", "11"],
        "title": ["Toy Story (1995)", "American President, The (1995)"],
        "genres": ["Adventure|Animation|Children|Comedy|Fantasy", "Comedy|Drama|Romance"],
    }


def test_data_fetch_from_a_local_copy_on_the_command_line(tmp_path: Path, capsys):
    from recommender.cli import main

    members = {"ml-latest-small/ratings.csv": ML_RATINGS, "ml-latest-small/movies.csv": ML_MOVIES}
    local = write_tree(tmp_path / "download", members) / "ml-latest-small"
    root = tmp_path / "data"
    assert (
        main(["data", "fetch", "ml-latest-small", "--root", str(root), "--from", str(local)]) == 0
    )
    assert "not checksum-verified" in capsys.readouterr().out
    assert (root / "raw/ml-latest-small/ratings.csv").is_file()


def test_local_folder_is_parsed_before_anything_is_imported(tmp_path: Path):
    local = write_tree(tmp_path / "copy", {"ratings.csv": ML_RATINGS})
    with pytest.raises(DataError, match=r"copy: no movies\.csv"):
        fetch("ml-latest-small", tmp_path / "data", local=local)
    write_tree(local, {"movies.csv": ML_MOVIES, "ratings.csv": ML_RATINGS + "3,1,,964982224\r\n"})
    with pytest.raises(DataError, match=r"copy/ratings\.csv line 5: column 'rating' is empty"):
        fetch("ml-latest-small", tmp_path / "data", local=local)
    assert files_under(tmp_path / "data") == []
    with pytest.raises(DataError, match=r"nowhere: not found \(expected the ml-latest-small zip"):
        fetch("ml-latest-small", tmp_path / "data", local=tmp_path / "nowhere")


def test_lastfm_from_the_official_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    spec = dataclasses.replace(BUILTIN["hetrec2011-lastfm-2k"], sha256=sha(LASTFM_ZIP))
    monkeypatch.setitem(BUILTIN, "hetrec2011-lastfm-2k", spec)
    archive = tmp_path / "hetrec2011-lastfm-2k.zip"
    archive.write_bytes(LASTFM_ZIP)
    files = fetch("hetrec2011-lastfm-2k", tmp_path / "data", local=archive)
    assert files.source == f"local archive {archive} (sha256 verified)"

    interactions, titles, _ = load_builtin("hetrec2011-lastfm-2k", tmp_path / "data")
    # Play counts are the rating ("confidence"); there are no timestamps.
    assert interactions.to_dict("list") == {
        "user_id": ["2", "2", "5"], "item_id": ["51", "1686", "51"],
        "rating": [13883.0, 3.0, 250.0],
    }  # fmt: skip
    assert titles is not None and titles["title"].tolist() == ["Duran Duran", '"Weird Al" Yankovic']

    archive.write_bytes(LASTFM_ZIP + b"x")
    with pytest.raises(DataError, match=r"lastfm-2k\.zip: sha256 .* does not match the official"):
        fetch("hetrec2011-lastfm-2k", tmp_path / "data", local=archive)


def test_offline_error_says_how_to_supply_the_files(tmp_path: Path):
    with pytest.raises(DataError) as error:
        fetch("hetrec2011-lastfm-2k", tmp_path)
    message = str(error.value)
    assert "GroupLens unreachable (network disabled in tests)" in message
    assert "https://files.grouplens.org/datasets/hetrec2011/hetrec2011-lastfm-2k.zip" in message
    assert str(tmp_path / "raw" / "hetrec2011-lastfm-2k.zip") in message
    assert "recommender data fetch hetrec2011-lastfm-2k" in message and "--from PATH" in message


def test_lastfm_needs_a_random_split_and_thresholds_on_play_counts(tmp_path: Path):
    # Six users with ten artists each; user u played artist a (a + 1) * 10 times.
    rows = [f"{u}\t{a}\t{(a + 1) * 10}\r\n" for u in range(6) for a in range(10)]
    names = [f"{a}\tArtist {a}\thttp://x\thttp://y\n" for a in range(10)]
    local = write_tree(tmp_path / "copy", {
        "user_artists.dat": "userID\tartistID\tweight\r\n" + "".join(rows),
        "artists.dat": "id\tname\turl\tpictureURL\n" + "".join(names),
    })  # fmt: skip
    root = tmp_path / "data"
    fetch("hetrec2011-lastfm-2k", root, local=local)
    config = DataConfig(dataset="hetrec2011-lastfm-2k", root=str(root), cache=False)
    with pytest.raises(DataError, match=r"'leave_last_out' split needs timestamps.*split=random"):
        load_data(config, seed=0)

    config.split = "random"
    data = load_data(config, seed=0)
    assert (len(data.users), len(data.items)) == (6, 10)
    assert (len(data.train), len(data.valid), len(data.test)) == (42, 6, 12)
    assert data.train.timestamp is None and data.train.rating is not None
    assert data.item_info is not None and data.item_info["title"].iloc[0] == "Artist 0"

    config.rating_threshold = 40  # at least 40 plays: artists 3 to 9
    data = load_data(config, seed=0)
    assert sorted(data.items.ids.tolist()) == [str(a) for a in range(3, 10)]
    assert len(data.train_full) + len(data.test) == 6 * 7
    assert data.train_full.rating is not None and data.train_full.rating.min() == 40
