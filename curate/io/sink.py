"""Sinks: a unit's kept rows, cut into Parquet shards or WebDataset tars of about
``shard_bytes``.

Cut points come from a deterministic per-row size estimate (byte length of
string and binary columns, 8 bytes for any other column), so the same rows
always give the same shards, whatever the Arrow chunking was.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.files import WrittenFile, write_parquet_atomic
from curate.io.layout import Layout
from curate.io.webdataset import json_member, safe_key, write_tar
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


def output_columns(
    table: pa.Table, columns: list[str] | None, always: tuple[str, ...] = ()
) -> pa.Table:
    """Drop internal columns; keep reserved ones (and ``always``), then the requested extras."""
    names = [c for c in table.column_names if c not in (UNIT, POS)]
    if columns is not None:
        names = [c for c in names if c in RESERVED_COLUMNS or c in always or c in columns]
    return table.select(names)


#: What a WebDataset sink writes whatever ``columns`` says: the sample's key and image.
WEBDATASET_KEPT = ("key", "image", "image_ext")


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
        written.append(
            write_parquet_atomic(table.slice(start, stop - start), path, compression, layout.opts)
        )
    return written


class SinkError(ValueError):
    """Rows that a sink cannot write as asked; the message says which and why."""


_SAFE_EXT = re.compile(r"^[a-z0-9]{1,16}\Z")
_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpg"), (b"GIF8", "gif"), (b"BM", "bmp"))


def _image_ext(payload: bytes) -> str:
    if payload[:4] == b"RIFF" and payload[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if payload.startswith(magic)), "bin")


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def webdataset_samples(table: pa.Table, sink: str) -> list[list[tuple[str, bytes]]]:
    """Members of each row: ``<key>.json`` (every other column), ``<key>.<image_ext>``,
    ``<key>.txt`` (the text), in that order; the key is the ``key`` column, else ``id``."""
    keys = table.column("key" if "key" in table.column_names else "id").to_pylist()
    ids = table.column("id").to_pylist()
    texts = table.column("text").to_pylist() if "text" in table.column_names else None
    images = table.column("image").to_pylist() if "image" in table.column_names else None
    exts = table.column("image_ext").to_pylist() if "image_ext" in table.column_names else None
    meta_names = [c for c in table.column_names if c not in ("image", "image_ext", "text", "key")]
    meta = table.select(meta_names).to_pylist()
    seen: set[str] = set()
    samples = []
    for i, key in enumerate(keys):
        why = "null key" if key is None else safe_key(key)
        if why is None and key in seen:
            why = "the key repeats within one output shard"
        if why:
            raise SinkError(
                f"sink {sink!r}: record {ids[i]} has key {key!r}, which cannot name a tar "
                f"member ({why}); drop or rename it upstream"
            )
        seen.add(key)
        try:
            members = [(f"{key}.json", json_member(_jsonable(meta[i])))]
        except (TypeError, ValueError) as exc:
            raise SinkError(
                f"sink {sink!r}: record {ids[i]} cannot be written as {key}.json: {exc}"
            ) from None
        if images is not None and images[i] is not None:
            ext = (exts[i] if exts is not None else None) or _image_ext(images[i])
            if not _SAFE_EXT.match(ext) or ext in ("json", "txt"):
                raise SinkError(
                    f"sink {sink!r}: record {ids[i]} has image_ext {ext!r}; expected a "
                    "lower-case extension such as png or jpg"
                )
            members.append((f"{key}.{ext}", images[i]))
        if texts is not None and texts[i] is not None:
            members.append((f"{key}.txt", texts[i].encode("utf-8")))
        samples.append(members)
    return samples


def webdataset_cut(
    samples: list[list[tuple[str, bytes]]], shard_bytes: int, shard_samples: int | None
) -> list[tuple[int, int]]:
    """Sample ranges: a tar ends once it reaches ``shard_bytes`` or ``shard_samples``."""
    ranges, start, size = [], 0, 0
    for i, members in enumerate(samples):
        if i > start and (size >= shard_bytes or (shard_samples and i - start >= shard_samples)):
            ranges.append((start, i))
            start, size = i, 0
        size += sum(512 + (len(p) + 511) // 512 * 512 for _, p in members)
    if samples:
        ranges.append((start, len(samples)))
    return ranges


def write_webdataset_sink(
    table: pa.Table,
    layout: Layout,
    sink: str,
    unit: int,
    shard_bytes: int,
    shard_samples: int | None,
    columns: list[str] | None,
) -> tuple[list[WrittenFile], WrittenFile | None]:
    """Tars ``part-<unit>-<k>.tar`` and one index ``index/part-<unit>.parquet`` mapping
    each key to its tar, the byte offset of its first member header, and its size."""
    table = output_columns(table, columns, WEBDATASET_KEPT)
    samples = webdataset_samples(table, sink)
    written, index_parts = [], []
    keys = table.column("key" if "key" in table.column_names else "id")
    for part, (start, stop) in enumerate(webdataset_cut(samples, shard_bytes, shard_samples)):
        path = layout.shard(sink, unit, part, "tar")
        tar = write_tar(samples[start:stop])
        layout.write(path, tar.data)
        digest = hashlib.sha256(tar.data).hexdigest()
        written.append(WrittenFile(path, stop - start, len(tar.data), digest))
        index_parts.append(
            pa.table(
                {
                    "key": keys.slice(start, stop - start),
                    "id": table.column("id").slice(start, stop - start),
                    "shard": pa.array([path.rsplit("/", 1)[-1]] * (stop - start), pa.string()),
                    "offset": pa.array(tar.offsets, pa.int64()),
                    "size": pa.array(tar.sizes, pa.int64()),
                }
            )
        )
    if not index_parts:
        return written, None
    index = pa.concat_tables(index_parts)
    return written, write_parquet_atomic(index, layout.index(sink, unit), "zstd", layout.opts)
