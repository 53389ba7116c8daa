"""Readers that turn interaction and item files into one canonical pandas frame.

Besides generic csv / tsv / parquet, the readers know the files of the built-in datasets: the
MovieLens formats (u.data, ratings.dat, ratings.csv and their item files, LF or CRLF) and
Last.fm HetRec 2011's `user_artists.dat` (`hetrec-lastfm`: the play count, `weight`, becomes the
rating column) and `artists.dat` (`hetrec-lastfm-artists`: artist names as titles), and the
adjacency lists of NGCF / LightGCN (`lightgcn`, data/adjacency.py: `user item item ...`), and the
SASRec format (`sasrec`: `user item` lines in time order, read by data/sequences.py).

The canonical interactions frame has columns `user_id` and `item_id` (raw ids, always strings, so
"0012" keeps its zeros) and, when the file has them, `rating` (float64) and `timestamp` (int64).
Every reader validates as it reads and raises `DataError` naming the file, the 1-based line (the
header counts as line 1) and the column, so a bad row in a 20M-line file can be found and fixed.

Reading goes through pandas' C parser with the numeric columns typed up front; only when that fast
path fails is the file re-read as text to locate the first bad value, so valid files pay nothing
for the diagnostics.

Example:
    >>> frame = read_interactions("ml-100k/u.data")  # format from the file name
    >>> frame = read_interactions("log.csv", columns={"user": "uid", "item": "sku"})
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recommender.data.adjacency import looks_like_adjacency, read_adjacency
from recommender.data.sequences import read_sasrec
from recommender.utils import ConfigError, DataError

FORMATS = ("auto", "csv", "tsv", "parquet", "ml-100k", "ml-dat", "ml-csv", "recbole",
           "hetrec-lastfm", "lightgcn", "sasrec")  # fmt: skip
ITEM_FORMATS = ("ml-100k-item", "ml-dat-movies", "ml-csv-movies", "recbole-item",
                "hetrec-lastfm-artists")  # fmt: skip

CANONICAL = ("user_id", "item_id", "rating", "timestamp")
_OPTIONAL = ("rating", "timestamp")
_HEADERLESS = ("ml-100k", "ml-dat", "lightgcn", "sasrec")  # formats that fix their own columns
_KEYS = {"user": "user_id", "item": "item_id", "rating": "rating", "timestamp": "timestamp"}
_ML_CSV_COLUMNS = {"user_id": "userId", "item_id": "movieId", "rating": "rating",
                   "timestamp": "timestamp"}  # fmt: skip
# user_artists.dat has no timestamps; its weight is a play count, kept as the rating.
_HETREC_COLUMNS = {"user_id": "userID", "item_id": "artistID", "rating": "weight"}

# Genre flags of u.item, in column order (MovieLens 100K README).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

# '::' is rewritten to a byte MovieLens never uses so the C parser splits ratings.dat in one pass;
# a regex separator would push every line through pandas' Python engine (~10x slower).
_UNIT_SEP = "\x1f"
_PARSER_FIELDS = re.compile(r"Expected (\d+) fields in line (\d+), saw (\d+)")
_NCF_HEAD = r"^\(\s*([^,()\s]+)\s*,\s*([^,()\s]+)\s*\)$"


@dataclass(frozen=True)
class _Layout:
    """How one delimited text format is laid out on disk."""

    sep: str  # as written in the file, e.g. '::'
    header: bool
    names: tuple[str, ...] | None = None  # fixed column names of a headerless format
    encoding: str = "utf-8"
    quoting: int = csv.QUOTE_MINIMAL


_ML100K = _Layout("\t", header=False, names=CANONICAL, quoting=csv.QUOTE_NONE)
_MLDAT = _Layout("::", header=False, names=CANONICAL, quoting=csv.QUOTE_NONE)
_RECBOLE = _Layout("\t", header=True, quoting=csv.QUOTE_NONE)
# HetRec quotes nothing: artist names such as `"Weird Al" Yankovic` keep their quote characters.
_HETREC = _Layout("\t", header=True, quoting=csv.QUOTE_NONE)


def _fail(path: Path, where: str | None, message: str) -> DataError:
    return DataError(f"{path} {where}: {message}" if where else f"{path}: {message}")


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "file not found"
        raise DataError(f"{path}: {what}")
    return path


class _TextSource:
    """A delimited text file, plus what is needed to map a frame row back to its line."""

    def __init__(self, path: Path, layout: _Layout) -> None:
        self.path = path
        self.layout = layout
        self.columns: list[str] = list(layout.names or ())

    def line_of(self, row: int) -> int:
        return int(row) + (2 if self.layout.header else 1)

    def where(self, row: int) -> str:
        return f"line {self.line_of(row)}"

    def read(self, numeric: tuple[str, ...] = ()) -> pd.DataFrame:
        """Read every column as text except `numeric` (float64); blank lines are dropped.

        The frame's index is the row's position among all physical data lines, so `where(index)`
        names the right line even when blank lines were skipped.
        """
        layout = self.layout
        if layout.names is not None:
            self._check_first_line()
        options: dict[str, Any] = {
            "sep": _UNIT_SEP if layout.sep == "::" else layout.sep,
            "header": 0 if layout.header else None,
            "names": layout.names,
            "keep_default_na": False,
            "na_values": [""],
            "skip_blank_lines": False,
            "quoting": layout.quoting,
            "encoding": layout.encoding,
            "index_col": False,
        }
        try:
            frame = self._parse({c: "float64" for c in numeric} if numeric else {}, options)
        except ValueError as exc:
            if isinstance(exc, pd.errors.ParserError) or not numeric:
                raise
            # A non-numeric value in a numeric column: re-read as text so validation can point
            # at the exact line and show the value.
            frame = self._parse({}, options)
        self.columns = [str(c) for c in frame.columns]
        blank = frame.isna().all(axis=1).to_numpy()
        if blank.any():
            frame = frame[~blank]
        if frame.empty:
            raise _fail(self.path, None, "file is empty (no data rows)")
        return frame

    def _source(self) -> Path | io.BytesIO:
        if self.layout.sep == "::":
            return io.BytesIO(self.path.read_bytes().replace(b"::", _UNIT_SEP.encode()))
        return self.path

    def _parse(self, numeric_dtypes: dict[str, str], options: dict[str, Any]) -> pd.DataFrame:
        """pd.read_csv with str as the default dtype and parser errors turned into DataError."""
        # Text columns are typed explicitly (a defaultdict dtype is ignored for headerless files).
        try:
            if self.layout.names is not None:
                dtype: object = {c: numeric_dtypes.get(c, str) for c in self.layout.names}
            elif self.layout.header and numeric_dtypes:
                dtype = {c: numeric_dtypes.get(c, str) for c in self.header_columns()}
            else:
                dtype = str
            return pd.read_csv(self._source(), dtype=dtype, **options)  # type: ignore[call-overload]
        except pd.errors.EmptyDataError:
            raise _fail(self.path, None, "file is empty (no data rows)") from None
        except pd.errors.ParserError as exc:
            match = _PARSER_FIELDS.search(str(exc))
            if match is None:
                raise _fail(self.path, None, f"cannot parse: {exc}") from None
            expected, line, found = match.groups()
            message = _fields_message(expected, found, self.layout)
            raise _fail(self.path, f"line {line}", message) from None
        except UnicodeDecodeError as exc:
            raise _fail(
                self.path, None, f"not {self.layout.encoding} text ({exc.reason})"
            ) from None

    def header_columns(self) -> list[str]:
        """Column names on the header line, read without parsing the body."""
        line = self.line_text(1)
        return self.split(line) if line else []

    def _check_first_line(self) -> None:
        """The C parser silently drops extra fields on the first line when names are given."""
        with open(self.path, encoding=self.layout.encoding, errors="replace", newline="") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    found = len(self.split(line.rstrip("\r\n")))
                    if found != len(self.columns):
                        raise _fail(
                            self.path,
                            f"line {number}",
                            _fields_message(len(self.columns), found, self.layout),
                        )
                    return

    def split(self, line: str) -> list[str]:
        if self.layout.quoting == csv.QUOTE_NONE or len(self.layout.sep) > 1:
            return line.split(self.layout.sep)
        return next(csv.reader([line], delimiter=self.layout.sep))

    def line_text(self, line_no: int) -> str:
        """One physical line; used on the error path and for headers, so a scan is fine."""
        with open(self.path, encoding=self.layout.encoding, errors="replace", newline="") as f:
            for number, line in enumerate(f, start=1):
                if number == line_no:
                    return line.rstrip("\r\n")
        return ""

    def bad_value(self, row: int, column: str, kind: str) -> DataError:
        """Explain the first bad value from its raw line, so the message shows the text."""
        where = self.where(row)
        fields = self.split(self.line_text(self.line_of(row)))
        if len(fields) != len(self.columns):
            return _fail(self.path, where, _fields_message(len(self.columns), len(fields),
                                                           self.layout))  # fmt: skip
        raw = fields[self.columns.index(column)].strip()
        return _fail(self.path, where, _value_message(column, raw, kind))


class _ParquetSource:
    """A parquet file: no lines, so errors name the 1-based data row."""

    def __init__(self, path: Path, frame: pd.DataFrame) -> None:
        self.path = path
        self.frame = frame

    def where(self, row: int) -> str:
        return f"row {int(row) + 1}"

    def bad_value(self, row: int, column: str, kind: str) -> DataError:
        value = self.frame[column].iloc[int(row)]
        raw = "" if pd.isna(value) else str(value).strip()
        return _fail(self.path, self.where(row), _value_message(column, raw, kind))


def _fields_message(expected: int | str, found: int | str, layout: _Layout) -> str:
    return f"expected {expected} fields separated by {layout.sep!r}, found {found}"


def _value_message(column: str, raw: str, kind: str) -> str:
    return f"column {column!r} is empty" if raw == "" else f"column {column!r} {kind} {raw!r}"


@dataclass(frozen=True)
class FileFormat:
    """How an interactions file is read: its format and which of its columns are which.

    The one format detection and the one set of column-name rules, shared by the general
    reader here and the columnar fast path (columnar.py), so both read the same columns.
    """

    name: str  # one of FORMATS, never "auto"
    columns: dict[str, str]  # canonical name -> column in the file
    required: frozenset[str]  # optional canonical columns that must be present
    sep: str | None  # field separator of csv, tsv and ml-csv (the others fix their own)

    def wanted(self, found: list[str]) -> dict[str, str]:
        """The canonical columns to read from a file whose columns are `found`: the ids, and
        each optional column that is required or present."""
        return {
            c: name
            for c, name in self.columns.items()
            if c not in _OPTIONAL or c in self.required or name in found
        }


def detect_format(
    path: Path,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    sep: str | None = None,
) -> FileFormat:
    """Resolve `format` (auto: from the file name, and a .csv or .dat file's header; else a
    first line of space-separated integers is `lightgcn`) and the column mapping (see
    read_interactions); raises DataError or ConfigError."""
    fmt = _resolve_format(path, format)
    if sep is not None and fmt not in ("csv", "tsv"):
        raise ConfigError(f"sep applies to csv and tsv only, not to format {fmt!r}")
    # Dataset formats fix their own column names; the generic default mapping means "as is".
    if columns is not None and fmt in (*_HEADERLESS, "ml-csv", "hetrec-lastfm"):
        if all(_KEYS.get(key) == name for key, name in columns.items()):
            columns = None
        elif fmt in _HEADERLESS:
            raise ConfigError(f"columns does not apply to the headerless format {fmt!r}")
    default = {"ml-csv": _ML_CSV_COLUMNS, "hetrec-lastfm": _HETREC_COLUMNS}.get(
        fmt, {c: c for c in CANONICAL}
    )
    mapping = _column_mapping(columns, default)
    required = {c for c in _OPTIONAL if columns is not None and c in mapping}
    if fmt == "hetrec-lastfm":
        # A user_artists.dat without its weight column is the wrong file: do not drop it quietly.
        required |= {"rating"} & set(mapping)
    sep = sep or {"csv": ",", "tsv": "\t", "ml-csv": ","}.get(fmt)
    return FileFormat(fmt, mapping, frozenset(required), sep)


def requested_columns(columns: Mapping[str, str | None]) -> dict[str, str] | None:
    """A `data.columns` config (key -> column, None: absent) as read_interactions takes it:
    None for the default names, whose rating and timestamp are read when the file has them;
    otherwise the mapping the user wrote, whose columns must be there."""
    named = {key: name for key, name in columns.items() if name}
    return None if named == _KEYS else named


def header_columns(path: Path, sep: str) -> list[str]:
    """Column names on a delimited file's header line, read without parsing the body."""
    return _TextSource(path, _Layout(sep, header=True)).header_columns()


def _resolve_format(path: Path, format: str) -> str:
    if format not in FORMATS:
        raise DataError(f"{path}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if format != "auto":
        return format
    name = path.name.lower()
    suffix = path.suffix.lower()
    by_suffix = {".data": "ml-100k", ".rating": "ml-100k", ".dat": "ml-dat", ".inter": "recbole",
                 ".parquet": "parquet", ".pq": "parquet", ".tsv": "tsv"}  # fmt: skip
    if suffix == ".dat":
        # HetRec and MovieLens both use .dat; only HetRec's files have a tab-separated header.
        header = _TextSource(path, _HETREC).header_columns()
        hetrec = [_HETREC_COLUMNS["user_id"], _HETREC_COLUMNS["item_id"]]
        return "hetrec-lastfm" if header[:2] == hetrec else "ml-dat"
    if name == "u.data" or suffix in by_suffix:
        return by_suffix.get(suffix, "ml-100k")
    if suffix == ".csv":
        header = header_columns(path, ",")
        ml_csv = [_ML_CSV_COLUMNS["user_id"], _ML_CSV_COLUMNS["item_id"]]
        return "ml-csv" if header[:2] == ml_csv else "csv"
    if looks_like_adjacency(path):
        return "lightgcn"
    raise DataError(
        f"{path}: cannot tell the format from the file name; pass format= one of "
        f"{', '.join(FORMATS)}"
    )


def _column_mapping(columns: Mapping[str, str] | None, default: dict[str, str]) -> dict[str, str]:
    """Canonical name -> file column; a None mapping keeps the defaults."""
    if columns is None:
        return dict(default)
    unknown = sorted(set(columns) - set(_KEYS))
    if unknown:
        raise ConfigError(f"columns: unknown key(s) {unknown}; allowed: {', '.join(_KEYS)}")
    missing = [key for key in ("user", "item") if key not in columns]
    if missing:
        raise ConfigError(f"columns: the mapping must name the {' and '.join(missing)} column")
    return {_KEYS[key]: name for key, name in columns.items()}


def read_interactions(
    path: str | Path,
    *,
    format: str = "auto",
    columns: Mapping[str, str] | None = None,
    sep: str | None = None,
) -> pd.DataFrame:
    """Read an interactions file into the canonical frame, validating every row.

    Args:
        path: the file.
        format: one of FORMATS; `auto` decides from the file name (and a .csv file's header);
            a name it does not know whose first line is integers separated by spaces
            (`train.txt`) is `lightgcn`.
        columns: canonical key (user, item, rating, timestamp) -> column name in the file, for
            csv, tsv, parquet, ml-csv, hetrec-lastfm and recbole. Without it the columns
            user_id, item_id and, when present, rating and timestamp are used (ml-csv:
            userId, movieId, rating, timestamp; hetrec-lastfm: userID, artistID, weight).
        sep: separator override for csv and tsv.

    Returns:
        Frame with user_id, item_id (str) and, when available, rating (float64) and
        timestamp (int64), in file order. `hetrec-lastfm` gives the play count as the rating
        and no timestamp; `lightgcn` neither rating nor timestamp.

    Raises:
        DataError: missing or empty file, missing column, empty id, non-numeric rating or
            timestamp, a play count that is not a positive whole number, wrong number of fields;
            the message names the file, line and column.
    """
    path = _existing(path)
    file = detect_format(path, format, columns, sep)
    fmt, mapping = file.name, file.columns
    if fmt == "lightgcn":
        return read_adjacency(path)[0]
    if fmt == "sasrec":
        return read_sasrec(path)
    numeric = tuple(mapping[c] for c in _OPTIONAL if c in mapping)

    source: _TextSource | _ParquetSource
    if fmt == "parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise _fail(path, None, f"cannot read parquet: {exc}") from None
        if frame.empty:
            raise _fail(path, None, "file is empty (no data rows)")
        source = _ParquetSource(path, frame)
    else:
        layout = {
            "ml-100k": _ML100K,
            "ml-dat": _MLDAT,
            "recbole": _RECBOLE,
            "hetrec-lastfm": _HETREC,
        }.get(fmt) or _Layout(file.sep or ",", header=True)
        source = _TextSource(path, layout)
        if fmt == "recbole":
            # RecBole headers carry a type, `rating:float`; the numeric dtypes key on full names.
            typed = {c.split(":")[0]: c for c in source.header_columns()}
            frame = source.read(tuple(typed.get(c, c) for c in numeric))
            source.columns = [c.split(":")[0] for c in source.columns]
            frame.columns = source.columns
        else:
            frame = source.read(numeric)
    return _canonical(frame, file, source)


def _canonical(
    frame: pd.DataFrame, file: FileFormat, source: _TextSource | _ParquetSource
) -> pd.DataFrame:
    """Select, validate and type the canonical columns; the first bad value raises.

    For hetrec-lastfm the rating is a play count and must be a positive whole number.
    """
    found = [str(c) for c in frame.columns]
    mapping = file.columns
    wanted = file.wanted(found)
    missing = [name for name in wanted.values() if name not in found]
    if missing:
        raise _fail(
            source.path, None, f"missing column(s) {', '.join(map(repr, missing))}; found {found}"
        )
    counts = file.name == "hetrec-lastfm"
    out: dict[str, object] = {}
    for canonical in ("user_id", "item_id"):
        column = frame[mapping[canonical]]
        ids = column.astype(str).str.strip()
        bad = (column.isna() | (ids == "")).to_numpy()
        if bad.any():
            raise source.bad_value(frame.index[int(np.argmax(bad))], mapping[canonical], "is")
        out[canonical] = ids
    for canonical in _OPTIONAL:
        if canonical not in wanted:
            continue
        column = frame[mapping[canonical]]
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(values)
        if bad.any():
            raise source.bad_value(
                frame.index[int(np.argmax(bad))], mapping[canonical], "has non-numeric value"
            )
        if counts and canonical == "rating":
            bad = (values <= 0) | (values != np.floor(values))
            if bad.any():
                raise source.bad_value(
                    frame.index[int(np.argmax(bad))],
                    mapping[canonical],
                    "must be a positive whole number (a play count), got",
                )
        out[canonical] = values if canonical == "rating" else values.astype(np.int64)
    # Series keep their string dtype; arrays align by position with the frame's index.
    return pd.DataFrame(out, index=frame.index).reset_index(drop=True)


def read_negatives(path: str | Path) -> tuple[pd.DataFrame, np.ndarray]:
    """Read the NCF paper's NAME.test.negative: each line `(user,item)<TAB>neg1<TAB>neg2...`,
    with the same number of negatives on every line.

    Returns:
        The (user_id, item_id) test pair of each line, and the (n_lines, n_neg) negative item
        ids (str), row r holding the negatives of line r's pair.
    """
    path = _existing(path)
    source = _TextSource(path, _Layout("\t", header=False, quoting=csv.QUOTE_NONE))
    frame = source.read()
    # A trailing tab on every line adds an all-empty last column; it is not a negative.
    while frame.shape[1] > 1 and frame.iloc[:, -1].isna().all():
        frame = frame.iloc[:, :-1]
    source.columns = source.columns[: frame.shape[1]]
    if frame.shape[1] < 2:
        raise _fail(path, source.where(frame.index[0]), "no negatives after the (user,item) pair")
    ragged = frame.isna().any(axis=1).to_numpy()
    if ragged.any():
        row = frame.index[int(np.argmax(ragged))]
        found = len(source.split(source.line_text(source.line_of(row))))
        raise _fail(
            path,
            source.where(row),
            f"expected {frame.shape[1] - 1} negatives like the first line, found {found - 1}",
        )
    head = frame.iloc[:, 0].astype(str).str.extract(_NCF_HEAD)
    malformed = head[0].isna().to_numpy()
    if malformed.any():
        row = frame.index[int(np.argmax(malformed))]
        raise _fail(
            path,
            source.where(row),
            f"expected '(user,item)' as the first field, found {frame.iloc[:, 0].loc[row]!r}",
        )
    heads = pd.DataFrame({"user_id": head[0].to_numpy(), "item_id": head[1].to_numpy()})
    items = frame.iloc[:, 1:].to_numpy(dtype=object)
    return heads.astype(str), items


def read_item_titles(path: str | Path, format: str) -> pd.DataFrame:
    """Read item metadata into item_id (str), title (str), genres (str, '|'-separated, may be "").

    Formats: `ml-100k-item` (u.item), `ml-dat-movies` (movies.dat), `ml-csv-movies`
    (movies.csv), `recbole-item` (RecBole's ml-100k.item) and `hetrec-lastfm-artists`
    (Last.fm's artists.dat: the artist name is the title; genres are empty, as HetRec's tags
    live in separate files).
    """
    path = _existing(path)
    if format not in ITEM_FORMATS:
        raise DataError(
            f"{path}: unknown item format {format!r}; expected one of {', '.join(ITEM_FORMATS)}"
        )
    if format == "ml-100k-item":
        names = ("item_id", "title", "release_date", "video_date", "url", *ML100K_GENRES)
        layout = _Layout("|", header=False, names=names, encoding="latin-1",
                         quoting=csv.QUOTE_NONE)  # fmt: skip
        source = _TextSource(path, layout)
        frame = source.read()
        flags = frame[list(ML100K_GENRES)].fillna("0").to_numpy(dtype=object) == "1"
        # Boolean x str is the str or "", so this matrix product joins each row's genres.
        labels = np.array([f"{g}|" for g in ML100K_GENRES], dtype=object)
        genres = pd.Series(flags @ labels, index=frame.index).str.rstrip("|")
        item, title = "item_id", "title"
    elif format == "ml-dat-movies":
        layout = _Layout("::", header=False, names=("item_id", "title", "genres"),
                         encoding="latin-1", quoting=csv.QUOTE_NONE)  # fmt: skip
        source = _TextSource(path, layout)
        frame = source.read()
        genres, item, title = frame["genres"], "item_id", "title"
    elif format == "ml-csv-movies":
        source = _TextSource(path, _Layout(",", header=True))
        frame = source.read()
        _require(source, frame, ("movieId", "title", "genres"))
        genres, item, title = frame["genres"], "movieId", "title"
    elif format == "hetrec-lastfm-artists":
        source = _TextSource(path, _HETREC)
        frame = source.read()
        _require(source, frame, ("id", "name"))
        genres, item, title = pd.Series("", index=frame.index), "id", "name"
    else:
        source = _TextSource(path, _RECBOLE)
        frame = source.read()
        source.columns = [c.split(":")[0] for c in source.columns]
        frame.columns = source.columns
        _require(source, frame, ("item_id", "movie_title"))
        genres = (
            frame["class"].str.replace(" ", "|")
            if "class" in frame
            else pd.Series("", index=frame.index)
        )
        item, title = "item_id", "movie_title"

    ids = frame[item].astype(str).str.strip()
    bad = (frame[item].isna() | (ids == "")).to_numpy()
    if bad.any():
        raise source.bad_value(frame.index[int(np.argmax(bad))], item, "is")
    # MovieLens marks a movie without genres with this literal instead of an empty field.
    genre_text = genres.fillna("").replace("(no genres listed)", "")
    result = pd.DataFrame(
        {
            "item_id": ids.to_numpy(),
            "title": frame[title].fillna("").astype(str).str.strip().to_numpy(),
            "genres": genre_text.astype(str).to_numpy(),
        }
    )
    return result.astype(str)


def _require(source: _TextSource, frame: pd.DataFrame, names: tuple[str, ...]) -> None:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        found = [str(c) for c in frame.columns]
        raise _fail(
            source.path, None, f"missing column(s) {', '.join(map(repr, missing))}; found {found}"
        )
