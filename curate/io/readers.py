"""Read one unit of a source into Arrow: records plus quarantined rows.

Why not ``ray.data.read_json``: pyarrow's JSON reader fails a whole file on
one bad line and reports no line numbers, and neither reader gives the row
index we need for provenance.  We read each shard ourselves inside a Ray Data
datasource read task (see ``curate.runner``), so a bad line becomes a
quarantined row naming its file and line, and everything else still flows.

Output columns of a unit: ``id``, ``text``, ``source``, ``provenance`` (struct
of shard ``uri`` and ``row``: the 0-based line of a JSONL file, the row of a
Parquet file), the format's own columns (WebDataset, LLaVA), the declared extra
columns, and the internal ``_unit``/``_pos``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import gzip
import hashlib
import io
import json
import os
import re
import stat
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import xxhash
import zstandard

from curate.config.model import ColumnType, SourceSpec
from curate.conversations import ConversationError, normalize, render_text
from curate.io import storage
from curate.io.files import InputError, Shard, Unit, infer_format, read_bytes
from curate.io.llava import (
    LLAVA_COLUMNS,
    SAMPLE_KEYS,
    TURN_KEYS,
    file_layout,
    image_reference,
    image_root,
    resolve_image,
    unsafe_path,
)
from curate.io.storage import LOCAL, StorageOptions
from curate.io.webdataset import WEBDATASET_COLUMNS, image_size, scan_tar
from curate.stage import POS, RESERVED_COLUMNS, UNIT

ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "int64": pa.int64(),
    "float64": pa.float64(),
    "bool": pa.bool_(),
    "json": pa.string(),
}
PROVENANCE = RESERVED_COLUMNS["provenance"]
REJECT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("value", pa.string()),
        ("provenance", PROVENANCE),
        # The row's numeric columns when it was dropped (scores of the stages it passed,
        # lengths): what `curate explain` and the drop-reason histograms read.  Null for
        # rows quarantined by a reader, which have no columns yet.
        ("scores", pa.map_(pa.string(), pa.float64())),
    ]
)


def record_id(source: str, uri: str, row: int, payload: str | bytes) -> str:
    """Stable id: 128-bit xxh3 of the source, the shard URI, the row and the content.

    Position is part of the key so that two exact copies keep distinct ids and
    a dedup reject can name which copy was kept.
    """
    h = xxhash.xxh3_128()
    h.update(f"{source}\x00{uri}\x00{row}\x00".encode())
    h.update(payload.encode() if isinstance(payload, str) else payload)
    return h.hexdigest()


@dataclass
class ShardResult:
    """What reading one shard produced."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rows_pos: list[int] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class InputInfo:
    """One input file as the manifest records it."""

    source: str
    uri: str
    bytes: int
    sha256: str
    records: int


def _decompress(shard: Shard, data: bytes) -> bytes:
    lower = shard.path.lower()
    try:
        if lower.endswith(".gz"):
            return gzip.decompress(data)
        if lower.endswith(".zst"):
            return _zstd_frames(shard, data)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise InputError(f"{shard.uri}: cannot decompress: {exc}") from exc
    return data


def _zstd_frames(shard: Shard, data: bytes) -> bytes:
    """Every frame of a zstd file; a truncated frame is an error, not a short read."""
    out, rest = [], data
    while rest:
        frame = zstandard.ZstdDecompressor().decompressobj()
        out.append(frame.decompress(rest))
        if not frame.eof:
            raise InputError(f"{shard.uri}: cannot decompress: truncated zstd frame")
        rest = frame.unused_data
    return b"".join(out)


def _cast(value: Any, kind: ColumnType) -> Any:
    if value is None:
        return None
    if kind == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    if kind == "string":
        if isinstance(value, str):
            return value
        raise TypeError(f"expected a string, got {type(value).__name__}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise TypeError(f"expected true/false, got {value!r}")
    if isinstance(value, bool):
        raise TypeError(f"expected a number, got {value!r}")
    if kind == "int64":
        if isinstance(value, int) and -(2**63) <= value < 2**63:
            return value
        raise TypeError(f"expected a 64-bit integer, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def _first_duplicate(pairs: list[tuple[str, Any]], keys: set[str]) -> str | None:
    """The first key of ``keys`` that ``pairs`` gives twice (other fields are not read)."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen and key in keys:
            return key
        seen.add(key)
    return None


def _encodable(obj: Any) -> bool:
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class JsonlParser:
    """Parses JSON lines strictly; every line is a record or a quarantined row."""

    def __init__(self, name: str, spec: SourceSpec) -> None:
        self.name = name
        self.spec = spec
        self.columns = spec.columns or {}
        self._duplicate: str | None = None
        self._read_keys = {
            spec.text_column,
            *([spec.id_column] if spec.id_column else []),
            *self.columns,
        }

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """``object_pairs_hook``: the last call builds the top-level object, so
        ``_duplicate`` ends up naming a duplicated top-level key that we read, if any."""
        obj = dict(pairs)
        dup = len(obj) != len(pairs)
        self._duplicate = _first_duplicate(pairs, self._read_keys) if dup else None
        return obj

    def parse(self, shard: Shard, data: bytes) -> ShardResult:
        out = ShardResult()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for row, raw in enumerate(lines):
            record, error = self._record(raw.rstrip(b"\r"), shard.uri, row)
            if error is not None:
                reason, detail = error
                out.rejects.append(self._reject(shard.uri, row, raw, reason, detail))
            else:
                out.rows.append(record)
                out.rows_pos.append(row)
        return out

    def _reject(self, uri: str, row: int, raw: bytes, reason: str, detail: str) -> dict[str, Any]:
        shown = raw[:200].decode("utf-8", errors="backslashreplace")
        return {
            "id": record_id(self.name, uri, row, raw),
            "stage": self.name,
            "reason": f"{reason}:{uri} line {row + 1}: {detail}",
            "value": shown,
            "provenance": {"uri": uri, "row": row},
        }

    def _record(
        self, raw: bytes, uri: str, row: int
    ) -> tuple[dict[str, Any], tuple[str, str] | None]:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return {}, ("bad_utf8", f"invalid UTF-8 at byte {exc.start}")
        if not line.strip():
            return {}, ("blank_line", "empty line")
        try:
            obj = json.loads(line, object_pairs_hook=self._pairs)
        except json.JSONDecodeError as exc:
            return {}, ("invalid_json", f"{exc.msg} (column {exc.colno})")
        if not isinstance(obj, dict):
            return {}, ("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
        if self._duplicate is not None:
            return {}, ("invalid_json", f"duplicate key {self._duplicate!r}")
        if b"\\u" in raw and not _encodable(obj):
            return {}, ("bad_unicode", "a \\u escape encodes a lone UTF-16 surrogate")
        return self._fields(obj, uri, row)

    def _fields(
        self, obj: dict[str, Any], uri: str, row: int
    ) -> tuple[dict[str, Any], tuple[str, str] | None]:
        text = obj.get(self.spec.text_column)
        if text is None:
            return {}, ("missing_text", f"no {self.spec.text_column!r} field")
        if not isinstance(text, str):
            return {}, ("bad_text", f"{self.spec.text_column!r} is {type(text).__name__}")
        record: dict[str, Any] = {"text": text}
        if self.spec.id_column is not None:
            rid = obj.get(self.spec.id_column)
            if rid is None or isinstance(rid, dict | list):
                return {}, ("missing_id", f"no scalar {self.spec.id_column!r} field")
            record["id"] = str(rid)
        else:
            record["id"] = record_id(self.name, uri, row, text)
        for column, kind in self.columns.items():
            try:
                record[column] = _cast(obj.get(column), kind)
            except TypeError as exc:
                return {}, ("bad_column", f"{column!r}: {exc}")
        return record, None


def as_string(array: pa.ChunkedArray) -> pa.ChunkedArray | None:
    """A text-like column (string, large/view string, dictionary of strings) as string."""
    kind = array.type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pc.cast(array, pa.string())
    return None


def cast_or_flag(
    array: pa.ChunkedArray, kind: pa.DataType
) -> tuple[pa.Array, np.ndarray[Any, np.dtype[np.bool_]]]:
    """Cast a column; values that do not cast become null and are flagged.

    The whole-column cast is tried first; only a column that fails is cast
    value by value to find the rows at fault.
    """
    try:
        return pc.cast(array, kind), np.zeros(len(array), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    values, bad = [], np.zeros(len(array), dtype=bool)
    for i, scalar in enumerate(array):
        try:
            values.append(scalar.cast(kind))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            values.append(pa.scalar(None, kind))
            bad[i] = True
    return pa.array([v.as_py() for v in values], kind), bad


class ParquetParser:
    """Reads a Parquet shard into the source's columns, row by row accountable.

    A null text or id, or a value that does not cast to its column's type, is a
    quarantined row; a missing column quarantines every row of the shard.
    ``expected`` gives the extra columns and their types (declared, or the schema
    unified over all the source's shards when it keeps every column).
    """

    def __init__(self, name: str, spec: SourceSpec, expected: dict[str, pa.DataType]) -> None:
        self.name = name
        self.spec = spec
        self.expected = expected

    def read(self, shard: Shard, data: bytes) -> tuple[pa.Table, pa.Table]:
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{shard.uri}: not a readable Parquet file: {exc}") from exc
        n = table.num_rows
        rows = np.arange(n, dtype=np.int64)
        reason = np.full(n, None, dtype=object)
        columns = self._columns(table, shard.uri, reason)
        bad = reason != None  # noqa: E711 - elementwise
        prov = _provenance(shard.uri, rows)
        keep = pa.array(~bad)
        ids = [record_id(self.name, shard.uri, int(i), b"") for i in np.flatnonzero(bad)]
        rejects = pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "stage": pa.array([self.name] * len(ids), pa.string()),
                "reason": pa.array(reason[bad], pa.string()),
                "value": pa.nulls(len(ids), pa.string()),
                "provenance": prov.filter(pa.array(bad)),
                "scores": pa.nulls(len(ids), REJECT_SCHEMA.field("scores").type),
            },
            schema=REJECT_SCHEMA,
        )
        kept = pa.table({k: v.filter(keep) for k, v in columns.items()})
        kept = self._with_ids(kept, shard.uri, rows[~bad])
        return kept.append_column("provenance", prov.filter(keep)), rejects

    def _flag(self, reason: Any, mask: Any, text: str) -> None:
        """Give rows in ``mask`` that have no reason yet the reason ``text`` (row appended)."""
        for i in np.flatnonzero(mask & (reason == None)):  # noqa: E711 - elementwise
            reason[i] = text.replace("{row}", str(i))

    def _columns(self, table: pa.Table, uri: str, reason: Any) -> dict[str, pa.Array]:
        n = table.num_rows
        spec = self.spec
        wanted = [spec.text_column, *([spec.id_column] if spec.id_column else [])]
        missing = [c for c in wanted if c not in table.column_names]
        if missing:
            self._flag(reason, np.ones(n, bool), f"missing_column:{uri}: no column {missing[0]!r}")
            return {
                "id": pa.nulls(n, pa.string()),
                "text": pa.nulls(n, pa.string()),
                **{c: pa.nulls(n, t) for c, t in self.expected.items()},
            }
        text = as_string(table.column(spec.text_column))
        if text is None:
            kind = table.column(spec.text_column).type
            self._flag(reason, np.ones(n, bool), f"bad_text:{uri}: text column is {kind}")
            text = pa.chunked_array([pa.nulls(n, pa.string())])
        self._flag(
            reason,
            pc.is_null(text).to_numpy(zero_copy_only=False),
            f"missing_text:{uri} row " + "{row}: null text",
        )
        out: dict[str, pa.Array | pa.ChunkedArray] = {"text": text}
        if spec.id_column:
            ids, bad_ids = cast_or_flag(table.column(spec.id_column), pa.string())
            nulls = pc.is_null(ids).to_numpy(zero_copy_only=False)
            self._flag(reason, nulls | bad_ids, f"missing_id:{uri} row " + "{row}: no usable id")
            out["id"] = ids
        for column, kind in self.expected.items():
            if column not in table.column_names:
                out[column] = pa.nulls(n, kind)
                continue
            values, bad = cast_or_flag(table.column(column), kind)
            self._flag(reason, bad, f"bad_column:{uri} row " + f"{{row}}: {column!r} is not {kind}")
            out[column] = values
        return out

    def _with_ids(self, kept: pa.Table, uri: str, rows: np.ndarray[Any, Any]) -> pa.Table:
        if "id" in kept.column_names:
            return kept.select(["id", *[c for c in kept.column_names if c != "id"]])
        texts = kept.column("text").to_pylist()
        ids = [record_id(self.name, uri, int(r), t) for r, t in zip(rows, texts, strict=True)]
        return kept.add_column(0, "id", pa.array(ids, pa.string()))


def declared_columns(spec: SourceSpec) -> dict[str, pa.DataType]:
    return {c: ARROW_TYPES[k] for c, k in (spec.columns or {}).items()}


def format_columns(spec: SourceSpec) -> dict[str, pa.DataType]:
    """The columns a source's format adds (LLaVA's; none for JSONL and Parquet)."""
    return dict(LLAVA_COLUMNS) if spec.format == "llava" else {}


def read_unit(
    unit: Unit,
    spec: SourceSpec,
    expected: dict[str, pa.DataType] | None = None,
    opts: StorageOptions = LOCAL,
) -> tuple[pa.Table, pa.Table, list[InputInfo]]:
    """Records, quarantined rows and input facts for one unit.

    ``expected``: the extra columns every shard is cast to (default: the format's
    own columns and the declared ``columns``), so all units of a source share one schema.
    """
    if expected is None:
        expected = {**format_columns(spec), **declared_columns(spec)}
    tables: list[pa.Table] = []
    rejects: list[pa.Table] = []
    inputs: list[InputInfo] = []
    with ThreadPoolExecutor(max_workers=1) as hasher:  # hashlib frees the GIL
        for shard in unit.shards:
            data = read_bytes(shard, opts)
            pending = hasher.submit(_sha256, data)  # hash while parsing
            table, bad = _read_shard(unit, spec, shard, data, expected, opts)
            digest = pending.result()
            tables.append(table)
            rejects.append(bad)
            records = table.num_rows + bad.num_rows
            inputs.append(InputInfo(unit.source, shard.uri, len(data), digest, records))
    merged = pa.concat_tables(tables)
    merged = merged.append_column(UNIT, pa.array(np.full(merged.num_rows, unit.index, np.int64)))
    merged = merged.append_column(POS, pa.array(np.arange(merged.num_rows, dtype=np.int64)))
    return merged, pa.concat_tables(rejects), inputs


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_shard(
    unit: Unit,
    spec: SourceSpec,
    shard: Shard,
    data: bytes,
    expected: dict[str, pa.DataType],
    opts: StorageOptions = LOCAL,
) -> tuple[pa.Table, pa.Table]:
    fmt = spec.format or infer_format(shard.path)
    if fmt == "llava":
        table, bad = LlavaParser(unit.source, spec, opts).read(shard, data)
    elif fmt == "parquet":
        table, bad = ParquetParser(unit.source, spec, expected).read(shard, data)
    elif fmt == "jsonl":
        table, bad = _jsonl_tables(unit.source, spec, shard, _decompress(shard, data))
    elif fmt == "webdataset":
        table, bad = WebDatasetParser(unit.source, spec, expected).read(shard, data)
    else:
        raise InputError(
            f"{shard.uri}: unknown format; set 'format:' to jsonl, parquet, webdataset or llava"
        )
    source = pa.array([unit.source] * table.num_rows, pa.string())
    table = table.add_column(2, "source", source)
    return table.select(["id", "text", "source", "provenance", *expected]), bad


def _provenance(uri: str, rows: list[int] | np.ndarray[Any, Any]) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [pa.array([uri] * len(rows), pa.string()), pa.array(rows, pa.int64())],
        fields=list(PROVENANCE),
    )


def _tables(
    uri: str,
    rows: list[dict[str, Any]],
    rows_pos: list[int],
    rejects: list[dict[str, Any]],
    columns: dict[str, pa.DataType],
    declared: dict[str, ColumnType],
) -> tuple[pa.Table, pa.Table]:
    """A shard's records (``id``, ``text``, the format's ``columns``, the declared
    extras, ``provenance``) and its quarantined rows, as tables."""
    schema = pa.schema(
        [("id", pa.string()), ("text", pa.string()), *columns.items()]
        + [(c, ARROW_TYPES[k]) for c, k in declared.items()]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    table = table.append_column("provenance", _provenance(uri, rows_pos))
    return table, pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA)


def _jsonl_tables(
    name: str, spec: SourceSpec, shard: Shard, data: bytes
) -> tuple[pa.Table, pa.Table]:
    data = data.removeprefix(BOM)
    fast = _fast_jsonl(name, spec, shard, data)
    if fast is not None:
        return fast, REJECT_SCHEMA.empty_table()
    parsed = JsonlParser(name, spec).parse(shard, data)
    extras = declared_columns(spec)
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), *extras.items()])
    table = pa.Table.from_pylist(parsed.rows, schema=schema)
    table = table.append_column("provenance", _provenance(shard.uri, parsed.rows_pos))
    return table, pa.Table.from_pylist(parsed.rejects, schema=REJECT_SCHEMA)


BOM = b"\xef\xbb\xbf"
#: A blank or whitespace-only line between two newlines.  The literal first byte
#: lets ``re`` scan with a fast literal search (30x faster than ``(?:^|\n)...``).
_INNER_BLANK = re.compile(rb"\n[ \t\r]*\n")
_FIRST_BLANK = re.compile(rb"[ \t\r]*(?:\n|$)")


def has_blank_line(data: bytes) -> bool:
    """Whether any line of ``data`` is empty or whitespace-only (Arrow skips such
    lines; the strict parser reports them)."""
    last = data[data.rfind(b"\n") + 1 :]
    return bool(
        _FIRST_BLANK.match(data) or _INNER_BLANK.search(data) or (last and not last.strip(b" \t\r"))
    )


def _fast_jsonl(name: str, spec: SourceSpec, shard: Shard, data: bytes) -> pa.Table | None:
    """Arrow's JSON reader, for shards where every line is a clean record.

    Any anomaly (a parse error, a blank line, invalid UTF-8, a null text or id,
    a type mismatch) returns None and the shard goes to the strict line parser,
    which quarantines the bad lines; so both paths give the same table.  Ids
    given as JSON numbers also take the strict path (they are str()-ed there).
    """
    columns = spec.columns or {}
    if not data or "json" in columns.values() or BOM in data or has_blank_line(data):
        return None
    try:  # whole lines must be UTF-8, read fields or not: the strict parser decodes lines
        data.isascii() or data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    fields = [(spec.text_column, pa.string())]
    if spec.id_column:
        fields.append((spec.id_column, pa.string()))
    fields += [(c, ARROW_TYPES[k]) for c, k in columns.items() if c not in dict(fields)]
    try:
        table = pa_json.read_json(
            io.BytesIO(data),
            read_options=pa_json.ReadOptions(use_threads=False, block_size=max(1 << 20, len(data))),
            parse_options=pa_json.ParseOptions(
                explicit_schema=pa.schema(fields), unexpected_field_behavior="ignore"
            ),
        )  # Arrow's JSON reader does not check UTF-8: the decode above did
    except (pa.ArrowException, ValueError):
        return None
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    key_columns = [spec.text_column, *([spec.id_column] if spec.id_column else [])]
    if table.num_rows != lines or any(table.column(c).null_count for c in key_columns):
        return None
    text = table.column(spec.text_column)
    if spec.id_column:
        ids = table.column(spec.id_column)
    else:
        ids = pa.array(
            [record_id(name, shard.uri, r, t) for r, t in enumerate(text.to_pylist())], pa.string()
        )
    out = {"id": ids, "text": text, **{c: table.column(c) for c in columns}}
    rows = np.arange(table.num_rows, dtype=np.int64)
    return pa.table(out).append_column("provenance", _provenance(shard.uri, rows))


def _printable(text: str) -> str:
    """``text`` with undecodable bytes of a tar member name (surrogate escapes) shown as
    ``\\xNN``: valid UTF-8 for the rejects table."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"duplicate key {dup!r}")
    return obj


class WebDatasetParser:
    """Reads a WebDataset tar into rows (see :mod:`curate.io.webdataset`).

    ``expected`` holds the WebDataset columns and the declared ``.json`` fields.
    """

    def __init__(self, name: str, spec: SourceSpec, expected: dict[str, pa.DataType]) -> None:
        self.name = name
        self.spec = spec
        self.fields = {c: k for c, k in (spec.columns or {}).items()}
        self.caption_field = spec.caption[5:] if spec.caption.startswith("json:") else None
        self.expected = expected

    def read(self, shard: Shard, data: bytes) -> tuple[pa.Table, pa.Table]:
        scan = scan_tar(data)
        rows: list[dict[str, Any]] = []
        rows_pos: list[int] = []
        rejects: list[dict[str, Any]] = []
        for sample in scan.samples:
            record = None if sample.problem else self._record(sample, shard.uri)
            if record is None or isinstance(record, tuple):
                reason, detail = sample.problem or record or ("bad_sample", "")
                rejects.append(self._reject(shard.uri, sample.first, sample.key, reason, detail))
                continue
            rows.append(record)
            rows_pos.append(sample.first)
        if scan.damage is not None:
            member, reason, detail = scan.damage
            rejects.append(self._reject(shard.uri, member, "", reason, detail))
        return _tables(shard.uri, rows, rows_pos, rejects, WEBDATASET_COLUMNS, self.fields)

    def _reject(self, uri: str, member: int, key: str, reason: str, detail: str) -> dict[str, Any]:
        where = f"{uri} member {member}" + (f" (key {key!r})" if key else "")
        return {
            "id": record_id(self.name, uri, member, _printable(key)),
            "stage": self.name,
            "reason": _printable(f"{reason}:{where}: {detail}"),
            "value": _printable(key) or None,
            "provenance": {"uri": uri, "row": member},
        }

    def _record(self, sample: Any, uri: str) -> dict[str, Any] | tuple[str, str]:
        members: dict[str, bytes] = sample.members
        ext = next((e for e in self.spec.image_extensions if e in members), None)
        if ext is None:
            return (
                "missing_image",
                f"no member with extension {'/'.join(self.spec.image_extensions)}",
            )
        if not _encodable(sample.key):
            return "bad_member_name", f"key {sample.key!r} is not valid UTF-8"
        meta = self._meta(members, sample.key)
        if isinstance(meta, tuple):
            return meta
        caption = self._caption(members, meta, sample.key)
        if isinstance(caption, tuple):
            return caption
        size = image_size(members[ext], self.spec.max_image_pixels)
        if isinstance(size[0], str):
            return str(size[0]), str(size[1])
        record: dict[str, Any] = {
            "text": caption,
            "key": sample.key,
            "image": members[ext],
            "image_ext": ext,
            "width": size[0],
            "height": size[1],
        }
        if self.spec.id_column is not None:
            rid = meta.get(self.spec.id_column)
            if rid is None or isinstance(rid, dict | list):
                return "missing_id", f"no scalar {self.spec.id_column!r} in {sample.key}.json"
            record["id"] = str(rid)
        else:
            record["id"] = record_id(
                self.name, uri, sample.first, sample.key.encode() + b"\x00" + members[ext]
            )
        for column, kind in self.fields.items():
            try:
                record[column] = _cast(meta.get(column), kind)
            except TypeError as exc:
                return "bad_column", f"{column!r}: {exc}"
        return record

    def _meta(self, members: dict[str, bytes], key: str) -> dict[str, Any] | tuple[str, str]:
        """The ``.json`` member as an object (strict: UTF-8, no duplicate keys, no lone
        surrogates), ``{}`` when there is none and none is needed, else (reason, detail)."""
        raw = members.get("json")
        if raw is None:
            if self.fields or self.caption_field or self.spec.id_column:
                return "missing_json", f"no {key}.json member"
            return {}
        try:
            meta = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
            return "invalid_json", f"{key}.json: {exc}"
        if not isinstance(meta, dict):
            return "not_an_object", f"{key}.json holds a {type(meta).__name__}"
        if b"\\u" in raw and not _encodable(meta):
            return "bad_unicode", f"{key}.json: a \\u escape encodes a lone surrogate"
        return meta

    def _caption(
        self, members: dict[str, bytes], meta: dict[str, Any], key: str
    ) -> str | tuple[str, str]:
        if self.caption_field is not None:
            value = meta.get(self.caption_field)
            if not isinstance(value, str):
                return "missing_caption", f"no string {self.caption_field!r} in {key}.json"
            return value
        raw = members.get(self.spec.caption)
        if raw is None:
            return "missing_caption", f"no {key}.{self.spec.caption} member"
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return "bad_utf8", f"{key}.{self.spec.caption}: invalid UTF-8 at byte {exc.start}"


# --- LLaVA conversations ---------------------------------------------------------------


class _Repeated(dict[str, Any]):
    """A JSON object that gave some keys more than once (the last value won)."""

    repeated: frozenset[str] = frozenset()


def _note_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook``: a plain dict, or a :class:`_Repeated` naming repeated keys."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    repeated: set[str] = set()
    for key, _ in pairs:
        (repeated if key in seen else seen).add(key)
    out = _Repeated(obj)
    out.repeated = frozenset(repeated)
    return out


def _excerpt(value: Any) -> str:
    """The first 200 characters of ``value`` as JSON, valid UTF-8 whatever it holds."""
    text = json.dumps(value, ensure_ascii=False)[:200]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bytes_excerpt(raw: bytes) -> str:
    return raw[:200].decode("utf-8", errors="backslashreplace")


@dataclass
class _Sample:
    """A parsed sample, waiting for its image when ``target`` is set."""

    row: int
    record: dict[str, Any]
    obj: Any
    shown: str | None  # the raw line of a JSONL file (an element's excerpt is made on demand)
    path: str = ""  # the image path as written
    target: str | None = None  # where to read it
    problem: tuple[str, str] | None = None  # what reading the image found

    def excerpt(self) -> str:
        return self.shown if self.shown is not None else _excerpt(self.obj)


#: Reading an image fails with these errors because of the sample, not the machine.
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP)


class LlavaParser:
    """Reads LLaVA-style conversation files (see :mod:`curate.io.llava`) into rows.

    Columns: ``id`` (``id_column``'s field, else derived as for JSONL), ``text``
    (:func:`curate.conversations.render_text` of the turns), ``source``,
    ``provenance`` (the file, and the 0-based element of a ``.json`` array or line of
    a ``.jsonl`` file), ``conversations`` (``list<struct<role, content>>``),
    ``image`` (the bytes; null for a text-only sample, and with ``load_images:
    false`` for an image given by path; inline base64 bytes are kept either way),
    ``image_url`` (the path as written; null for inline bytes), ``image_source``
    (the sample's ``image_source``, else its ``data_source``, else the source's
    name), then the declared ``columns``.

    Quarantined, naming the file and element (or line): invalid UTF-8 or JSON (a
    ``.json`` file that does not parse, or is not an array, is one rejected row for
    the whole file, as a corrupt tar is: nothing in it can be trusted), a repeated
    key, a lone surrogate, an element that is not an object, a malformed
    conversation (the reasons of :class:`curate.conversations.ConversationError`),
    a missing id, a bad declared column, ``multi_image`` (more than one image),
    ``bad_image_ref`` (an ``image`` that is neither a path nor ``{"bytes": ...}``),
    ``bad_image_bytes`` (not base64, or empty), ``unsafe_path`` (an image path that
    is absolute, holds ``..``, or leads out of ``image_root`` through a symlink:
    nothing outside the root is opened) and ``missing_image`` (no such file).

    Image bytes are not decoded or even sniffed here: an undecodable image is
    found by a later ``image_filter``.  Images are read through
    :mod:`curate.io.storage` (so an ``s3://`` root works), 16 at a time.
    """

    def __init__(self, name: str, spec: SourceSpec, opts: StorageOptions = LOCAL) -> None:
        self.name = name
        self.spec = spec
        self.opts = opts
        self.columns = spec.columns or {}
        self._read_keys = {
            *SAMPLE_KEYS,
            *([spec.id_column] if spec.id_column else []),
            *self.columns,
        }

    def read(self, shard: Shard, data: bytes) -> tuple[pa.Table, pa.Table]:
        kind = file_layout(shard.path)
        if kind is None:
            raise InputError(f"{shard.uri}: a llava source reads .json (one array) or .jsonl files")
        data = _decompress(shard, data).removeprefix(BOM)
        parsed = self._array(data) if kind == "array" else self._lines(data)
        root = image_root(self.spec.image_root, self.spec.base_dir, shard.path)
        real_root = None if storage.is_s3(root) else os.path.realpath(root)
        escapes = b"\\u" in data
        items: list[_Sample | tuple[int, str | None, Any, tuple[str, str]]] = []
        for row, obj, shown in parsed:
            found = (
                obj
                if isinstance(obj, tuple)
                else self._sample(obj, shard.uri, row, shown, escapes, root, real_root)
            )
            items.append(found if isinstance(found, _Sample) else (row, shown, obj, found))
        self._load_images([i for i in items if isinstance(i, _Sample) and i.target])
        rows, rows_pos, rejects = [], [], []
        for item in items:
            if isinstance(item, _Sample):
                if item.problem is None:
                    rows.append(item.record)
                    rows_pos.append(item.row)
                    continue
                row, problem, excerpt = item.row, item.problem, item.excerpt()
            else:
                row, shown, obj, problem = item
                excerpt = shown if shown is not None else _excerpt(obj)
            rejects.append(self._reject(shard.uri, kind, row, excerpt, problem))
        return _tables(shard.uri, rows, rows_pos, rejects, LLAVA_COLUMNS, self.columns)

    def _array(self, data: bytes) -> list[tuple[int, Any, str | None]]:
        """(element, object or (reason, detail), excerpt or None); element -1 stands for
        the whole file."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            shown = _bytes_excerpt(data[max(0, exc.start - 100) : exc.start + 100])
            return [(-1, ("bad_utf8", f"invalid UTF-8 at byte {exc.start}"), shown)]
        try:
            value = json.loads(text, object_pairs_hook=_note_repeats)
        except json.JSONDecodeError as exc:
            detail = f"{exc.msg} (line {exc.lineno} column {exc.colno})"
            return [(-1, ("invalid_json", detail), text[max(0, exc.pos - 100) : exc.pos + 100])]
        if not isinstance(value, list):
            got = type(value).__name__
            return [(-1, ("not_an_array", f"expected a JSON array, got {got}"), _excerpt(value))]
        return [(row, obj, None) for row, obj in enumerate(value)]

    def _lines(self, data: bytes) -> list[tuple[int, Any, str | None]]:
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        out: list[tuple[int, Any, str | None]] = []
        for row, raw in enumerate(lines):
            shown = _bytes_excerpt(raw)
            try:
                line = raw.rstrip(b"\r").decode("utf-8")
            except UnicodeDecodeError as exc:
                out.append((row, ("bad_utf8", f"invalid UTF-8 at byte {exc.start}"), shown))
                continue
            if not line.strip():
                out.append((row, ("blank_line", "empty line"), shown))
                continue
            try:
                out.append((row, json.loads(line, object_pairs_hook=_note_repeats), shown))
            except json.JSONDecodeError as exc:
                out.append((row, ("invalid_json", f"{exc.msg} (column {exc.colno})"), shown))
        return out

    def _reject(
        self, uri: str, kind: str, row: int, excerpt: str, problem: tuple[str, str]
    ) -> dict[str, Any]:
        """A quarantined sample (``row`` -1: the whole file, which counts as row 0)."""
        if row < 0:
            where, row = uri, 0
        else:
            where = f"{uri} line {row + 1}" if kind == "lines" else f"{uri} element {row}"
        return {
            "id": record_id(self.name, uri, row, excerpt),
            "stage": self.name,
            "reason": f"{problem[0]}:{where}: {problem[1]}",
            "value": excerpt,
            "provenance": {"uri": uri, "row": row},
        }

    def _sample(
        self,
        obj: Any,
        uri: str,
        row: int,
        shown: str | None,
        escapes: bool,
        root: str,
        real_root: str | None,
    ) -> _Sample | tuple[str, str]:
        if not isinstance(obj, dict):
            return "not_an_object", f"expected a JSON object, got {type(obj).__name__}"
        if isinstance(obj, _Repeated) and obj.repeated & self._read_keys:
            return "invalid_json", f"duplicate key {min(obj.repeated & self._read_keys)!r}"
        if escapes and not _encodable(obj):
            return "bad_unicode", "a \\u escape encodes a lone UTF-16 surrogate"
        ref = image_reference(obj.get("image"))
        if ref is not None and ref[0] == "error":
            reason, detail = ref[1]
            return str(reason), str(detail)
        turns = self._turns(obj, ref is not None)
        if isinstance(turns, tuple):
            return turns
        text = render_text(turns)
        record = self._fields(obj, uri, row, text + "\x00" + (ref[1] if ref is not None else ""))
        if isinstance(record, tuple):
            return record
        record.update(text=text, conversations=turns, image=None, image_url=None)
        sample = _Sample(row, record, obj, shown)
        problem = None if ref is None else self._image(sample, ref, root, real_root)
        return sample if problem is None else problem

    def _fields(
        self, obj: dict[str, Any], uri: str, row: int, payload: str
    ) -> dict[str, Any] | tuple[str, str]:
        """``id``, ``image_source`` and the declared columns of a sample."""
        record: dict[str, Any] = {}
        if self.spec.id_column is not None:
            rid = obj.get(self.spec.id_column)
            if rid is None or isinstance(rid, dict | list):
                return "missing_id", f"no scalar {self.spec.id_column!r} field"
            record["id"] = str(rid)
        else:
            record["id"] = record_id(self.name, uri, row, payload)
        field = next((f for f in ("image_source", "data_source") if obj.get(f) is not None), None)
        image_source = self.name if field is None else obj[field]
        if not isinstance(image_source, str):
            return "bad_column", f"{field!r}: expected a string, got {type(image_source).__name__}"
        record["image_source"] = image_source
        for column, kind in self.columns.items():
            try:
                record[column] = _cast(obj.get(column), kind)
            except TypeError as exc:
                return "bad_column", f"{column!r}: {exc}"
        return record

    def _image(
        self, sample: _Sample, ref: tuple[str, Any], root: str, real_root: str | None
    ) -> tuple[str, str] | None:
        """Decode inline bytes into the record, or check the path and say where to read it."""
        if ref[0] == "bytes":
            try:
                image = base64.b64decode(ref[1], validate=True)
            except (binascii.Error, ValueError) as exc:
                return "bad_image_bytes", f"not base64: {exc}"
            if not image:
                return "bad_image_bytes", "no bytes"
            sample.record["image"] = image
            return None
        sample.record["image_url"] = sample.path = ref[1]
        if not self.spec.load_images:
            return unsafe_path(ref[1])  # the path's text alone: no file is touched
        target = resolve_image(root, ref[1], real_root)
        if isinstance(target, tuple):
            return target
        sample.target = target
        return None

    def _turns(
        self, obj: dict[str, Any], has_image: bool
    ) -> list[dict[str, str]] | tuple[str, str]:
        if "conversations" not in obj:
            return "bad_conversation", "no 'conversations' field"
        raw = obj["conversations"]
        for i, turn in enumerate(raw if isinstance(raw, list) else []):
            if isinstance(turn, _Repeated) and turn.repeated & TURN_KEYS:
                return "invalid_json", f"turn {i}: duplicate key {min(turn.repeated)!r}"
        try:
            return normalize(raw, has_image)
        except ConversationError as exc:
            return exc.reason, exc.detail

    def _load_images(self, samples: list[_Sample]) -> None:
        """Read every sample's image, in threads (S3 reads overlap); a missing file is the
        sample's ``problem``."""
        if not samples:
            return
        with ThreadPoolExecutor(max_workers=min(16, len(samples))) as pool:
            loaded = list(pool.map(self._load_image, samples))
        for sample, value in zip(samples, loaded, strict=True):
            if isinstance(value, tuple):
                sample.problem = value
            else:
                sample.record["image"] = value

    def _load_image(self, sample: _Sample) -> bytes | tuple[str, str]:
        assert sample.target is not None
        shown = repr(sample.path[:200])
        try:
            local = not storage.is_s3(sample.target)
            if local and not stat.S_ISREG(os.stat(sample.target).st_mode):
                return "missing_image", f"{shown} under image_root is not a regular file"
            return storage.read_bytes(sample.target, self.opts)
        except FileNotFoundError:
            return "missing_image", f"no file {shown} under image_root"
        except PermissionError:
            return "missing_image", f"{shown} under image_root: permission denied"
        except OSError as exc:
            if exc.errno in _MISSING:
                return "missing_image", f"{shown} under image_root: {os.strerror(exc.errno)}"
            raise InputError(f"{sample.target}: cannot read image: {exc}") from exc
