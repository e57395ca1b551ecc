"""Parquet sink: a unit's kept rows, cut into shards of about ``shard_bytes``.

Cut points come from a deterministic per-row size estimate (byte length of
string and binary columns, 8 bytes for any other column), so the same rows
always give the same shards, whatever the Arrow chunking was.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.files import WrittenFile, write_parquet_atomic
from curate.io.layout import Layout
from curate.stage import POS, RESERVED_COLUMNS, UNIT


def row_sizes(table: pa.Table) -> np.ndarray[Any, np.dtype[np.int64]]:
    sizes = np.zeros(table.num_rows, dtype=np.int64)
    for column in table.columns:
        kind = column.type
        if (
            pa.types.is_string(kind)
            or pa.types.is_binary(kind)
            or pa.types.is_large_string(kind)
            or pa.types.is_large_binary(kind)
        ):
            lengths = pc.fill_null(pc.binary_length(column), 0)
            sizes += lengths.to_numpy().astype(np.int64)
        else:
            sizes += 8
    return sizes


def cut(sizes: np.ndarray[Any, np.dtype[np.int64]], target: int) -> list[tuple[int, int]]:
    """Row ranges ``[start, stop)``; a new shard starts once the current one reaches ``target``."""
    if sizes.size == 0:
        return []
    before = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    part = before // max(target, 1)
    starts = np.flatnonzero(np.concatenate(([True], part[1:] != part[:-1])))
    stops = [*starts[1:].tolist(), int(sizes.size)]
    return list(zip(starts.tolist(), stops, strict=True))


def output_columns(table: pa.Table, columns: list[str] | None) -> pa.Table:
    """Drop internal columns; keep reserved ones first, then the requested extras."""
    names = [c for c in table.column_names if c not in (UNIT, POS)]
    if columns is not None:
        names = [c for c in names if c in RESERVED_COLUMNS or c in columns]
    return table.select(names)


def write_sink(
    table: pa.Table,
    layout: Layout,
    sink: str,
    unit: int,
    shard_bytes: int,
    compression: str,
    columns: list[str] | None,
) -> list[WrittenFile]:
    table = output_columns(table, columns)
    written = []
    for part, (start, stop) in enumerate(cut(row_sizes(table), shard_bytes)):
        path = layout.shard(sink, unit, part)
        written.append(write_parquet_atomic(table.slice(start, stop - start), path, compression))
    return written
