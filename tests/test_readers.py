"""Readers: every format, every error message, the NCF split and item titles, on tiny files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recommender.data.presplit import read_presplit
from recommender.data.readers import FORMATS, read_interactions, read_item_titles
from recommender.utils import ConfigError, DataError

EXPECTED = pd.DataFrame(
    {
        "user_id": ["0012", "7"],
        "item_id": ["5", "0099"],
        "rating": [4.0, 3.5],
        "timestamp": np.array([100, 200], dtype=np.int64),
    }
)


def write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def assert_canonical(frame: pd.DataFrame, expected: pd.DataFrame = EXPECTED) -> None:
    assert list(frame.columns) == list(expected.columns)
    assert frame["user_id"].tolist() == expected["user_id"].tolist()
    assert frame["item_id"].tolist() == expected["item_id"].tolist()
    if "rating" in expected:
        assert frame["rating"].dtype == np.float64
        assert frame["rating"].tolist() == expected["rating"].tolist()
    if "timestamp" in expected:
        assert frame["timestamp"].dtype == np.int64
        assert frame["timestamp"].tolist() == expected["timestamp"].tolist()


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("a.csv", "user_id,item_id,rating,timestamp\n0012,5,4,100\n7,0099,3.5,200\n", "csv"),
        ("a.tsv", "user_id\titem_id\trating\ttimestamp\n0012\t5\t4\t100\n7\t0099\t3.5\t200\n",
         "tsv"),
        ("u.data", "0012\t5\t4\t100\n7\t0099\t3.5\t200\n", "ml-100k"),
        ("ratings.dat", "0012::5::4::100\n7::0099::3.5::200\n", "ml-dat"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n0012,5,4,100\n7,0099,3.5,200\n",
         "ml-csv"),
        ("x.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
         "0012\t5\t4\t100.0\n7\t0099\t3.5\t200\n", "recbole"),
    ],
)  # fmt: skip
def test_every_text_format_explicit_and_auto(tmp_path: Path, name: str, text: str, fmt: str):
    path = write(tmp_path, name, text)
    assert_canonical(read_interactions(path, format=fmt))
    assert_canonical(read_interactions(path))


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("u.data", "0012\t5\t4\t100\n7\t0099\t3.5\t200\n"),
        ("ratings.dat", "0012::5::4::100\n7::0099::3.5::200\n"),
        ("a.csv", "user_id,item_id,rating,timestamp\n0012,5,4,100\n7,0099,3.5,200\n"),
    ],
)
def test_crlf_line_endings(tmp_path: Path, name: str, text: str):
    assert_canonical(read_interactions(write(tmp_path, name, text.replace("\n", "\r\n"))))


def test_parquet_int_ids_become_strings(tmp_path: Path):
    path = tmp_path / "a.parquet"
    pd.DataFrame({"user_id": [12, 7], "item_id": ["5", " 0099 "], "rating": [4, 3.5],
                  "timestamp": [100, 200]}).to_parquet(path)  # fmt: skip
    frame = read_interactions(path)
    assert_canonical(frame, EXPECTED.assign(user_id=["12", "7"]))


def test_column_mapping_and_optional_columns(tmp_path: Path):
    path = write(tmp_path, "log.csv", "uid;sku;when\n a ;x;5\nb; y ;6\n")
    frame = read_interactions(path, sep=";", columns={"user": "uid", "item": "sku",
                                                      "timestamp": "when"})  # fmt: skip
    assert list(frame.columns) == ["user_id", "item_id", "timestamp"]
    assert frame["user_id"].tolist() == ["a", "b"]
    assert frame["item_id"].tolist() == ["x", "y"]
    # Without a mapping, rating and timestamp are used only when present.
    bare = read_interactions(write(tmp_path, "b.csv", "user_id,item_id\n1,2\n"))
    assert list(bare.columns) == ["user_id", "item_id"]


def test_default_mapping_is_accepted_for_movielens_formats(tmp_path: Path):
    path = write(tmp_path, "u.data", "0012\t5\t4\t100\n7\t0099\t3.5\t200\n")
    default = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
    assert_canonical(read_interactions(path, columns=default))
    with pytest.raises(ConfigError, match="headerless"):
        read_interactions(path, columns={"user": "u", "item": "i"})


def test_blank_lines_are_skipped_but_line_numbers_stay_exact(tmp_path: Path):
    path = write(tmp_path, "a.csv", "user_id,item_id,rating\n1,2,3\n\n1,3,abc\n")
    with pytest.raises(DataError, match=r"a\.csv line 4: column 'rating' has non-numeric"):
        read_interactions(path)
    ok = write(tmp_path, "b.csv", "user_id,item_id\n1,2\n\n3,4\n\n")
    assert read_interactions(ok)["user_id"].tolist() == ["1", "3"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("ratings.csv", "userId,movieId,rating,timestamp\n" + "1,2,3,4\n" * 5 + "1,2,abc,4\n",
         r"ratings\.csv line 7: column 'rating' has non-numeric value 'abc'"),
        ("a.csv", "user_id,item_id,rating\n1,2,nan\n", r"a\.csv line 2: column 'rating' has "
         "non-numeric value 'nan'"),
        ("a.csv", "user_id,item_id,timestamp\n1,2,5\n1,3,\n", r"a\.csv line 3: column 'timestamp' "
         "is empty"),
        ("a.csv", "user_id,item_id\n1,2\n ,3\n", r"a\.csv line 3: column 'user_id' is empty"),
        ("a.csv", "user_id,item_id\n1,2\n3,\n", r"a\.csv line 3: column 'item_id' is empty"),
        ("a.csv", "user_id,item_id\n1,2\n3,4,5\n", r"a\.csv line 3: expected 2 fields"),
        ("a.csv", "user,item\n1,2\n", r"a\.csv: missing column\(s\) 'user_id', 'item_id'; "
         r"found \['user', 'item'\]"),
        ("a.csv", "", r"a\.csv: file is empty"),
        ("a.csv", "user_id,item_id\n", r"a\.csv: file is empty"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\n", r"u\.data line 2: expected 4 fields separated by "
         r"'\\t', found 3"),
        ("u.data", "1\t2\t3\t4\n1\t2\t3\t4\t5\n", r"u\.data line 2: expected 4 fields"),
        ("u.data", "1\t2\t3\t4\t5\n", r"u\.data line 1: expected 4 fields.*found 5"),
        ("u.data", "1\t2\tx\t4\n", r"u\.data line 1: column 'rating' has non-numeric value 'x'"),
        ("ratings.dat", "1::2::3::4\n1::2::3\n", r"ratings\.dat line 2: expected 4 fields "
         r"separated by '::', found 3"),
        ("ratings.dat", "1::2::3::4\n1::::3::4\n", r"ratings\.dat line 2: column 'item_id' is "
         "empty"),
        ("ratings.dat", "1::2::3::4\n1::2::3::4::9\n", r"ratings\.dat line 2: expected 4 fields"),
        ("x.inter", "user_id:token\titem_id:token\trating:float\n1\t2\tbad\n",
         r"x\.inter line 2: column 'rating' has non-numeric value 'bad'"),
    ],
)  # fmt: skip
def test_errors_name_file_line_and_column(tmp_path: Path, name: str, text: str, message: str):
    with pytest.raises(DataError, match=message):
        read_interactions(write(tmp_path, name, text))


def test_file_level_errors(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_interactions(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="cannot tell the format.*" + ", ".join(FORMATS)):
        read_interactions(write(tmp_path, "a.txt", "1;2\n"))
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_interactions(write(tmp_path, "a.csv", "user_id,item_id\n1,2\n"), format="xml")
    with pytest.raises(DataError, match="missing column\\(s\\) 'stars'"):
        read_interactions(
            write(tmp_path, "b.csv", "user_id,item_id\n1,2\n"),
            columns={"user": "user_id", "item": "item_id", "rating": "stars"},
        )
    with pytest.raises(ConfigError, match="unknown key"):
        read_interactions(tmp_path / "b.csv", columns={"user": "a", "item": "b", "score": "c"})
    with pytest.raises(ConfigError, match="item"):
        read_interactions(tmp_path / "b.csv", columns={"user": "a"})
    with pytest.raises(ConfigError, match="sep"):
        read_interactions(write(tmp_path, "u.data", "1\t2\t3\t4\n"), sep=",")


def test_parquet_errors_name_the_row(tmp_path: Path):
    path = tmp_path / "a.parquet"
    pd.DataFrame({"user_id": ["1", "2"], "item_id": ["1", "2"],
                  "rating": ["4", "x"]}).to_parquet(path)  # fmt: skip
    with pytest.raises(DataError, match=r"a\.parquet row 2: column 'rating' has non-numeric"):
        read_interactions(path)
    bad = write(tmp_path, "b.parquet", "not parquet")
    with pytest.raises(DataError, match=r"b\.parquet: cannot read parquet"):
        read_interactions(bad)


def ncf_files(tmp_path: Path, negatives: str) -> tuple[Path, Path, Path]:
    train = write(tmp_path, "t.train.rating", "0\t1\t5\t100\n0\t2\t3\t101\n1\t2\t4\t102\n")
    test = write(tmp_path, "t.test.rating", "0\t3\t4\t200\n1\t0\t1\t201\n")
    return train, test, write(tmp_path, "t.test.negative", negatives)


def test_ncf_split_exact_values(tmp_path: Path):
    split = read_presplit(*ncf_files(tmp_path, "(0,3)\t4\t5\t6\n(1,0)\t3\t5\t6\n"))
    assert split.train["item_id"].tolist() == ["1", "2", "2"]
    assert split.train["timestamp"].tolist() == [100, 101, 102]
    assert split.test["user_id"].tolist() == ["0", "1"]
    assert split.test["rating"].tolist() == [4.0, 1.0]
    assert split.negatives is not None and split.negative_items is not None
    assert split.negatives.to_dict("list") == {"user_id": ["0", "1"], "item_id": ["3", "0"]}
    assert split.negative_items.shape == (2, 3)
    assert split.negative_items.tolist() == [["4", "5", "6"], ["3", "5", "6"]]
    assert read_presplit(*ncf_files(tmp_path, "")[:2]).negatives is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("(0,3)\t4\t5\n(1,0)\t3\n", r"t\.test\.negative line 2: expected 2 negatives .*found 1"),
        ("(0,3)\t4\t5\n(1,0)\t3\t5\t6\n", r"t\.test\.negative line 2: expected 3 fields"),
        ("(0,3)\t4\t5\n1,0\t3\t5\n", r"t\.test\.negative line 2: expected '\(user,item\)'"),
        ("(0,3)\t4\t5\n(1,)\t3\t5\n", r"t\.test\.negative line 2: expected '\(user,item\)'"),
        ("(0,3)\n", r"t\.test\.negative line 1: no negatives"),
        ("", r"t\.test\.negative: file is empty"),
    ],
)
def test_ncf_negatives_errors(tmp_path: Path, text: str, message: str):
    with pytest.raises(DataError, match=message):
        read_presplit(*ncf_files(tmp_path, text))


def test_ncf_negatives_tolerate_trailing_tab_and_crlf(tmp_path: Path):
    split = read_presplit(*ncf_files(tmp_path, "(0,3)\t4\t5\t\r\n(1,0)\t3\t5\t\r\n"))
    assert split.negative_items is not None
    assert split.negative_items.tolist() == [["4", "5"], ["3", "5"]]


def test_item_titles_every_format(tmp_path: Path):
    flags = ["0"] * 19
    flags[1], flags[5] = "1", "1"  # Action, Comedy
    u_item = (
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{'|'.join(flags)}\n"
        f"2|Café (1996)|01-Jan-1996||http://y|{'|'.join(['0'] * 19)}\n"
    )
    frame = read_item_titles(write(tmp_path, "u.item", u_item, "latin-1"), "ml-100k-item")
    assert frame.to_dict("list") == {
        "item_id": ["1", "2"], "title": ["Toy Story (1995)", "Café (1996)"],
        "genres": ["Action|Comedy", ""],
    }  # fmt: skip

    dat = '1::Toy Story (1995)::Animation|Comedy\n2::Café "x" (1996)::Drama\n'
    frame = read_item_titles(write(tmp_path, "movies.dat", dat, "latin-1"), "ml-dat-movies")
    assert frame["title"].tolist() == ["Toy Story (1995)", 'Café "x" (1996)']
    assert frame["genres"].tolist() == ["Animation|Comedy", "Drama"]

    csv_text = 'movieId,title,genres\n1,"American President, The (1995)",(no genres listed)\n'
    frame = read_item_titles(write(tmp_path, "movies.csv", csv_text), "ml-csv-movies")
    assert frame.to_dict("list") == {
        "item_id": ["1"],
        "title": ["American President, The (1995)"],
        "genres": [""],
    }

    inter = ("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
             "1\tToy Story\t1995\tAnimation Children's Comedy\n2\tX\t\t\n")  # fmt: skip
    frame = read_item_titles(write(tmp_path, "ml-100k.item", inter), "recbole-item")
    assert frame["genres"].tolist() == ["Animation|Children's|Comedy", ""]
    assert frame["title"].tolist() == ["Toy Story", "X"]


def test_item_titles_errors(tmp_path: Path):
    with pytest.raises(DataError, match="unknown item format"):
        read_item_titles(write(tmp_path, "m.csv", "movieId,title,genres\n"), "json")
    with pytest.raises(DataError, match=r"m\.csv: file is empty"):
        read_item_titles(tmp_path / "m.csv", "ml-csv-movies")
    with pytest.raises(DataError, match=r"u\.item line 1: expected 24 fields"):
        read_item_titles(write(tmp_path, "u.item", "1|x|y\n"), "ml-100k-item")
    with pytest.raises(DataError, match=r"movies\.dat line 2: column 'item_id' is empty"):
        read_item_titles(write(tmp_path, "movies.dat", "1::a::b\n::c::d\n"), "ml-dat-movies")
    with pytest.raises(DataError, match=r"missing column\(s\) 'genres'"):
        read_item_titles(write(tmp_path, "n.csv", "movieId,title\n1,a\n"), "ml-csv-movies")


# ml-latest-small as GroupLens ships it: CRLF line endings, half-star ratings, quoted titles.
ML_LATEST_RATINGS = "userId,movieId,rating,timestamp\r\n1,1,4.0,964982703\r\n1,3,0.5,964981247\r\n"
ML_LATEST_MOVIES = (
    "movieId,title,genres\r\n"
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\r\n"
    '11,"American President, The (1995)",Comedy|Drama|Romance\r\n'
    '29,"City of Lost Children, The (Cité des enfants perdus, La) (1995)",Adventure|Drama\r\n'
    "114335,La cravate (1957),(no genres listed)\r\n"
)
# Last.fm HetRec 2011: tab-separated with a header; user_artists.dat is CRLF, artists.dat LF.
USER_ARTISTS = "userID\tartistID\tweight\r\n2\t51\t13883\r\n2\t52\t11690\r\n3\t51\t7\r\n"
ARTISTS = (
    "id\tname\turl\tpictureURL\n"
    "51\tDuran Duran\thttp://www.last.fm/music/Duran+Duran\thttp://u.last.fm/serve/252/1.jpg\n"
    '1686\t"Weird Al" Yankovic\thttp://www.last.fm/music/%22Weird+Al%22+Yankovic\t\n'
    "2906\tRoyce da 5'9\"\thttp://www.last.fm/music/Royce+da+5%279%22\thttp://u/2.jpg\n"
    '5282\tHopsin, Ak\'sent & Donte "Burger" Winston\thttp://x\thttp://y\n'
    "374\t宇多田ヒカル\thttp://www.last.fm/music/%E5%AE%87\thttp://u/3.png\n"
    "90\tSigur Rós\thttp://www.last.fm/music/Sigur+R%C3%B3s\thttp://u/4.jpg\n"
)


def test_ml_latest_small_crlf_ratings_and_movies(tmp_path: Path):
    ratings = write(tmp_path, "ratings.csv", ML_LATEST_RATINGS)
    frame = read_interactions(ratings)
    assert frame.to_dict("list") == {
        "user_id": ["1", "1"], "item_id": ["1", "3"], "rating": [4.0, 0.5],
        "timestamp": [964982703, 964981247],
    }  # fmt: skip
    movies = read_item_titles(write(tmp_path, "movies.csv", ML_LATEST_MOVIES), "ml-csv-movies")
    assert movies.to_dict("list") == {
        "item_id": ["1", "11", "29", "114335"],
        "title": [
            "Toy Story (1995)",
            "American President, The (1995)",
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "La cravate (1957)",
        ],
        "genres": [
            "Adventure|Animation|Children|Comedy|Fantasy", "Comedy|Drama|Romance",
            "Adventure|Drama", "",
        ],
    }  # fmt: skip
    bad = write(tmp_path, "bad.csv", ML_LATEST_RATINGS + "1,6,four,964982224\r\n")
    with pytest.raises(DataError, match=r"bad\.csv line 4: column 'rating' has non-numeric "
                                        r"value 'four'$"):  # fmt: skip
        read_interactions(bad)


def test_hetrec_lastfm_play_counts_become_ratings(tmp_path: Path):
    path = write(tmp_path, "user_artists.dat", USER_ARTISTS)
    for fmt in ("hetrec-lastfm", "auto"):  # auto: a .dat with HetRec's header is not ml-dat
        frame = read_interactions(path, format=fmt)
        assert frame.to_dict("list") == {
            "user_id": ["2", "2", "3"], "item_id": ["51", "52", "51"],
            "rating": [13883.0, 11690.0, 7.0],
        }  # fmt: skip
        assert frame["rating"].dtype == np.float64
    renamed = write(tmp_path, "ua.dat", USER_ARTISTS.replace("userID", "uid"))
    frame = read_interactions(
        renamed, format="hetrec-lastfm", columns={"user": "uid", "item": "artistID"}
    )
    assert list(frame.columns) == ["user_id", "item_id"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2\t51\tmany\r\n", r"line 3: column 'weight' has non-numeric value 'many'"),
        ("2\t51\t0\r\n", r"line 3: column 'weight' must be a positive whole number \(a play "
         r"count\), got '0'"),
        ("2\t51\t1.5\r\n", r"line 3: column 'weight' must be a positive whole number"),
        ("2\t51\t-4\r\n", r"line 3: column 'weight' must be a positive whole number.*'-4'"),
        ("2\t\t4\r\n", r"line 3: column 'artistID' is empty"),
        ("2\t51\t4\t9\r\n", r"line 3: expected 3 fields separated by '\\t', found 4"),
    ],
)  # fmt: skip
def test_hetrec_lastfm_bad_rows_name_file_and_line(tmp_path: Path, text: str, message: str):
    lines = USER_ARTISTS.splitlines(keepends=True)
    path = write(tmp_path, "user_artists.dat", lines[0] + lines[1] + text + lines[2])
    with pytest.raises(DataError, match=r"user_artists\.dat " + message):
        read_interactions(path, format="hetrec-lastfm")


def test_hetrec_lastfm_without_weight_is_the_wrong_file(tmp_path: Path):
    path = write(tmp_path, "user_friends.dat", "userID\tartistID\r\n2\t275\r\n")
    with pytest.raises(DataError, match=r"user_friends\.dat: missing column\(s\) 'weight'"):
        read_interactions(path, format="hetrec-lastfm")


def test_hetrec_artists_keep_quotes_commas_and_unicode(tmp_path: Path):
    frame = read_item_titles(write(tmp_path, "artists.dat", ARTISTS), "hetrec-lastfm-artists")
    assert frame.to_dict("list") == {
        "item_id": ["51", "1686", "2906", "5282", "374", "90"],
        "title": [
            "Duran Duran", '"Weird Al" Yankovic', "Royce da 5'9\"",
            "Hopsin, Ak'sent & Donte \"Burger\" Winston", "宇多田ヒカル", "Sigur Rós",
        ],
        "genres": [""] * 6,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (ARTISTS + "7\tA\tB\tC\tD\n", r"artists\.dat line 8: expected 4 fields"),
        (ARTISTS + "\tNameless\thttp://x\t\n", r"artists\.dat line 8: column 'id' is empty"),
        ("id\turl\n1\thttp://x\n", r"artists\.dat: missing column\(s\) 'name'"),
    ],
)
def test_hetrec_artists_errors(tmp_path: Path, text: str, message: str):
    with pytest.raises(DataError, match=message):
        read_item_titles(write(tmp_path, "artists.dat", text), "hetrec-lastfm-artists")


def test_hetrec_artists_must_be_utf8(tmp_path: Path):
    path = write(
        tmp_path, "artists.dat", "id\tname\turl\tpictureURL\n90\tSigur Rós\tx\ty\n", "latin-1"
    )
    with pytest.raises(DataError, match=r"artists\.dat: not utf-8 text"):
        read_item_titles(path, "hetrec-lastfm-artists")
