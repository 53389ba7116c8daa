"""Columnar ingestion: a large CSV / TSV / Parquet file to index arrays, with pyarrow.

The general path (readers.read_interactions, then pipeline's frame steps) keeps every raw id
as a string and hashes the id columns several times; at 20M rows that costs minutes and GBs.
Here pyarrow reads the columns (multi-threaded), dictionary-encodes each id column in one
hash pass, and only the distinct ids (138k users, 27k items at MovieLens-20M size) ever become
Python strings; labelling, de-duplication and the k-core filter then run on integer codes.

The result is exactly the general path's: the same rows in the same order and the same
vocabularies (tests/test_scale.py compares them); the format and the columns come from the
general reader's own detection (readers.detect_format). This path takes the clean, well-typed case
only; anything unusual (a null, an empty id, a non-numeric rating, a float timestamp, a
missing column, an unreadable file) returns None, and the general path, which owns the precise
error messages, reads the file instead.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from recommender.config import DataConfig
from recommender.data.interactions import Interactions, Vocabulary
from recommender.data.readers import FileFormat, detect_format, header_columns, requested_columns
from recommender.utils import RecommenderError

log = logging.getLogger("recommender")


def _format(path: Path, cfg: DataConfig) -> FileFormat | None:
    """The general reader's format and columns for a csv / tsv / parquet / ml-csv file; None
    for any other format, or where detection fails (the general path reports why)."""
    try:
        file = detect_format(path, cfg.format, requested_columns(cfg.columns.model_dump()), cfg.sep)
    except RecommenderError:
        return None
    return file if file.name in ("csv", "tsv", "parquet", "ml-csv") else None


def _read(path: Path, file: FileFormat) -> dict[str, pa.ChunkedArray] | None:
    """Canonical name -> column; None where the general path must decide."""
    sep = file.sep or ","
    found = pq.read_schema(path).names if file.name == "parquet" else header_columns(path, sep)
    # A missing column the file must have is the general path's to report.
    columns = file.wanted(found)
    if any(col not in found for col in columns.values()) or len(set(columns.values())) < len(
        columns
    ):
        return None
    if file.name == "parquet":
        table = pq.read_table(path, columns=list(columns.values()))
    else:
        ids = {columns["user_id"]: pa.string(), columns["item_id"]: pa.string()}
        table = pacsv.read_csv(
            path,
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(
                column_types=ids, include_columns=list(columns.values()), strings_can_be_null=False
            ),
        )
    return {key: table.column(col) for key, col in columns.items()}


def _encode_ids(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes (n,) int32, distinct ids as str) with ids stripped as the general path does."""
    is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
    if not (is_text or pa.types.is_integer(column.type)):
        return None
    encoded = pc.dictionary_encode(column).combine_chunks()
    dictionary = encoded.dictionary
    if pa.types.is_integer(column.type):
        text = dictionary.to_numpy().astype(str).astype(object)
    else:
        text = np.asarray(pc.utf8_trim_whitespace(dictionary).to_pylist(), dtype=object)
        if (text == "").any():
            return None
    # Two raw spellings that strip to the same id (" 7", "7") are one id.
    merged, distinct = pd.factorize(text)
    codes = merged.astype(np.int32)[encoded.indices.to_numpy(zero_copy_only=False)]
    return codes, np.asarray(distinct, dtype=object)


def _numeric(column: pa.ChunkedArray, integer: bool) -> np.ndarray | None:
    ok = pa.types.is_integer(column.type) or (not integer and pa.types.is_floating(column.type))
    if not ok:
        return None
    values = column.to_numpy().astype(np.int64 if integer else np.float64, copy=False)
    if not integer and not np.isfinite(values).all():
        return None
    return values


def read_indexed(cfg: DataConfig) -> tuple[Vocabulary, Vocabulary, Interactions] | None:
    """Read `cfg.path` into (users, items, interactions), as load_data's general path would.

    Returns None when the file is not a clean csv / tsv / parquet file (see the module doc).
    """
    assert cfg.path is not None
    path = Path(cfg.path)
    if not path.is_file():
        return None
    file = _format(path, cfg)
    if file is None:
        return None
    try:
        return _read_indexed(path, file, cfg)
    finally:
        # Arrow's allocator keeps freed memory for reuse; training needs it more.
        pa.default_memory_pool().release_unused()


def _read_indexed(
    path: Path, file: FileFormat, cfg: DataConfig
) -> tuple[Vocabulary, Vocabulary, Interactions] | None:
    try:
        columns = _read(path, file)
    except (pa.ArrowException, OSError, UnicodeDecodeError, csv.Error, StopIteration):
        return None
    if columns is None or len(columns["user_id"]) == 0:
        return None
    if any(col.null_count for col in columns.values()):
        return None
    # Each Arrow column is dropped once converted: at 20M rows the string columns alone
    # are 600 MB, and the peak memory of the whole train command is what counts.
    users = _encode_ids(columns.pop("user_id"))
    items = _encode_ids(columns.pop("item_id")) if users is not None else None
    if users is None or items is None:
        return None
    (u, user_ids), (i, item_ids) = users, items
    ts = rating = None
    if "timestamp" in columns and (ts := _numeric(columns.pop("timestamp"), True)) is None:
        return None
    if "rating" in columns and (rating := _numeric(columns.pop("rating"), False)) is None:
        return None

    keep = None
    if cfg.rating_threshold is not None:
        if rating is None:
            return None
        keep = rating >= cfg.rating_threshold
        if not keep.any():
            return None
    # pipeline.collapse_duplicates: stable sort by time, keep each pair's last row.
    order = np.argsort(ts, kind="stable") if ts is not None else np.arange(len(u))
    if keep is not None:
        order = order[keep[order]]
    keys = u[order].astype(np.int64) * len(item_ids) + i[order]
    order = order[~pd.Series(keys).duplicated(keep="last").to_numpy()]
    del keys
    # pipeline.k_core on codes.
    min_u, min_i = cfg.min_user_interactions, cfg.min_item_interactions
    while min_u or min_i:
        uc = np.bincount(u[order], minlength=len(user_ids))[u[order]]
        ic = np.bincount(i[order], minlength=len(item_ids))[i[order]]
        ok = (uc >= min_u) & (ic >= min_i)
        if ok.all():
            break
        order = order[ok]
    if not len(order):
        return None
    u, i = u[order].astype(np.int64), i[order].astype(np.int64)
    ts = None if ts is None else ts[order]
    rating = None if rating is None else rating[order].astype(np.float32)
    del order

    vocabs = []
    for codes, ids, name in ((u, user_ids, "user"), (i, item_ids, "item")):
        seen = pd.unique(codes)  # first-seen order, as pd.unique on the frame's column
        vocab = Vocabulary.from_values(ids[seen], name)
        position = np.full(len(ids), -1, dtype=np.int64)
        position[seen] = vocab.lookup(ids[seen])
        codes[:] = position[codes]
        vocabs.append(vocab)
    log.debug("columnar ingestion of %s: %d rows", path, len(u))
    return (
        vocabs[0],
        vocabs[1],
        Interactions.known_unique(
            u,
            i,
            len(vocabs[0]),
            len(vocabs[1]),
            ts,
            rating,
        ),
    )
