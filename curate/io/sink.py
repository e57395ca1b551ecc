"""Sinks: a unit's kept rows, cut into Parquet shards, WebDataset tars or LLaVA JSON
files of about ``shard_bytes``.

Cut points come from a deterministic per-row size estimate (byte length of
string and binary columns, 8 bytes for any other column), so the same rows
always give the same shards, whatever the Arrow chunking was.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.conversations import LLAVA_ROLES, to_llava
from curate.io import storage
from curate.io.files import WrittenFile, write_parquet_atomic
from curate.io.layout import Layout
from curate.io.llava import image_name, llava_json
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
_MAGIC = (
    (b"\x89PNG", "png"),
    (b"\xff\xd8", "jpg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)


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
    sizes = [sum(512 + (len(p) + 511) // 512 * 512 for _, p in members) for members in samples]
    return _ranges(sizes, shard_bytes, shard_samples)


def _ranges(sizes: list[int], shard_bytes: int, shard_samples: int | None) -> list[tuple[int, int]]:
    """Row ranges: a shard ends once it reaches ``shard_bytes`` or ``shard_samples``."""
    ranges, start, size = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and (size >= shard_bytes or (shard_samples and i - start >= shard_samples)):
            ranges.append((start, i))
            start, size = i, 0
        size += n
    if sizes:
        ranges.append((start, len(sizes)))
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


#: The columns a llava sink writes whatever ``columns`` says (``image`` and ``image_url``
#: both become the entry's ``image``).
LLAVA_KEPT = ("id", "image", "image_url", "conversations", "image_source")


def _column(table: pa.Table, name: str) -> list[Any]:
    if name in table.column_names:
        values: list[Any] = table.column(name).to_pylist()
        return values
    return [None] * table.num_rows


def _llava_turns(turns: Any, rid: str, sink: str) -> list[dict[str, str]]:
    if not turns:
        raise SinkError(
            f"sink {sink!r}: record {rid} has no conversation; a llava sink writes "
            "conversation rows only (drop the others upstream)"
        )
    for i, turn in enumerate(turns):
        if turn["role"] not in LLAVA_ROLES or not isinstance(turn["content"], str):
            raise SinkError(
                f"sink {sink!r}: record {rid}: turn {i} has role {turn['role']!r} and "
                f"{type(turn['content']).__name__} content; expected a role of "
                f"{', '.join(LLAVA_ROLES)} and a string"
            )
    return to_llava(turns)


def llava_entries(
    table: pa.Table, sink: str, folder: str, columns: list[str] | None
) -> tuple[list[dict[str, Any]], list[tuple[str, bytes]]]:
    """One LLaVA entry per row, keys in this order: ``id``, ``image`` (a written image's
    path, else ``image_url`` as it was read; absent for text-only rows),
    ``conversations`` (LLaVA's ``from``/``value`` turns), ``image_source`` (when set),
    then the requested ``columns``; and the images to write, as (path under the sink,
    bytes): ``<folder>/<name from the id>.<extension from the magic bytes>``."""
    if "conversations" not in table.column_names:
        raise SinkError(f"sink {sink!r}: its input has no 'conversations' column")
    extras = [c for c in columns or [] if c not in LLAVA_KEPT]
    absent = [c for c in extras if c not in table.column_names]
    if absent:
        raise SinkError(f"sink {sink!r}: its input has no column {absent[0]!r}")
    ids = table.column("id").to_pylist()
    turns = table.column("conversations").to_pylist()
    images, urls = _column(table, "image"), _column(table, "image_url")
    sources = _column(table, "image_source")
    values = {c: table.column(c).to_pylist() for c in extras}
    used: set[str] = set()
    entries, files = [], []
    for i, rid in enumerate(ids):
        entry: dict[str, Any] = {"id": rid}
        if images[i] is not None:
            path = f"{folder}/{image_name(rid, used, i)}.{_image_ext(images[i])}"
            files.append((path, images[i]))
            entry["image"] = path
        elif urls[i] is not None:
            entry["image"] = urls[i]
        entry["conversations"] = _llava_turns(turns[i], rid, sink)
        if sources[i] is not None:
            entry["image_source"] = sources[i]
        for column in extras:
            entry[column] = _jsonable(values[column][i])
        entries.append(entry)
    return entries, files


def write_llava_sink(
    table: pa.Table,
    layout: Layout,
    sink: str,
    unit: int,
    shard_bytes: int,
    shard_samples: int | None,
    columns: list[str] | None,
) -> tuple[list[WrittenFile], dict[str, Any] | None]:
    """LLaVA JSON files ``part-<unit>-<k>.json`` and the unit's images in
    ``images/part-<unit>/``, referenced relative to the JSON files.

    Images are written first, so a JSON file never names an image that is not
    there.  Returns the JSON files (their rows are the unit's rows) and one
    ``images`` report (none without images): the folder, how many files, their
    bytes, a sha256 over the sorted ``name<TAB>size<TAB>sha256`` lines, and every
    file with its size (what ``--resume`` checks).
    """
    entries, files = llava_entries(table, sink, f"images/part-{unit:06d}", columns)
    if not entries:
        return [], None
    sizes = [len(json.dumps(e, ensure_ascii=False, default=str)) for e in entries]
    if "image" in table.column_names:
        lengths = pc.fill_null(pc.binary_length(table.column("image")), 0)
        sizes = [a + b for a, b in zip(sizes, lengths.to_pylist(), strict=True)]
    parts = []
    for part, (start, stop) in enumerate(_ranges(sizes, shard_bytes, shard_samples)):
        try:
            data = llava_json(entries[start:stop])
        except (TypeError, ValueError) as exc:
            raise SinkError(
                f"sink {sink!r}: rows {start}-{stop - 1} of unit {unit}: {exc}"
            ) from None
        parts.append((layout.shard(sink, unit, part, "json"), stop - start, data))
    root = storage.join(layout.root, sink)

    def write_image(item: tuple[str, bytes]) -> str:
        layout.write(storage.join(root, *item[0].split("/")), item[1])
        return hashlib.sha256(item[1]).hexdigest()

    digests: list[str] = []
    if files:
        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:  # overlap fsyncs
            digests = list(pool.map(write_image, files))
    written = []
    for path, rows, data in parts:
        layout.write(path, data)
        written.append(WrittenFile(path, rows, len(data), hashlib.sha256(data).hexdigest()))
    if not files:
        return written, None
    names = sorted(
        (path.rsplit("/", 1)[1], len(data), digest)
        for (path, data), digest in zip(files, digests, strict=True)
    )
    listing = "".join(f"{n}\t{size}\t{d}\n" for n, size, d in names).encode()
    images = {
        "kind": "images",
        "sink": sink,
        "unit": unit,
        "path": storage.join(root, "images", f"part-{unit:06d}"),
        "files": len(names),
        "bytes": sum(size for _, size, _ in names),
        "sha256": hashlib.sha256(listing).hexdigest(),
        "members": [[n, size] for n, size, _ in names],
    }
    return written, images
