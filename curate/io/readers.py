"""Read one unit of a source into Arrow: records plus quarantined rows.

Why not ``ray.data.read_json``: pyarrow's JSON reader fails a whole file on
one bad line and reports no line numbers, and neither reader gives the row
index we need for provenance.  We read each shard ourselves inside a Ray Data
datasource read task (see ``curate.runner``), so a bad line becomes a
quarantined row naming its file and line, and everything else still flows.

Output columns of a unit: ``id``, ``text``, ``source``, ``provenance`` (struct
of shard ``uri`` and ``row``: the 0-based line of a JSONL file, the row of a
Parquet file), the declared extra columns, and the internal ``_unit``/``_pos``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zlib
from collections.abc import Iterator
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
from curate.io.files import InputError, Shard, Unit, infer_format, read_bytes
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
    lines: int = 0


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
            return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise InputError(f"{shard.uri}: cannot decompress: {exc}") from exc
    return data


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


def _first_duplicate(pairs: list[tuple[str, Any]]) -> str | None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def _encodable(obj: dict[str, Any]) -> bool:
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

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        """``object_pairs_hook``: the last call builds the top-level object, so
        ``_duplicate`` ends up naming a duplicated top-level key, if any."""
        obj = dict(pairs)
        self._duplicate = _first_duplicate(pairs) if len(obj) != len(pairs) else None
        return obj

    def parse(self, shard: Shard, data: bytes) -> ShardResult:
        out = ShardResult()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        out.lines = len(lines)
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


class ParquetParser:
    """Reads a Parquet shard; null or missing text becomes a quarantined row."""

    def __init__(self, name: str, spec: SourceSpec) -> None:
        self.name = name
        self.spec = spec

    def read(self, shard: Shard, data: bytes) -> tuple[pa.Table, pa.Table]:
        try:
            table = pq.read_table(pa.BufferReader(data))
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{shard.uri}: not a readable Parquet file: {exc}") from exc
        n = table.num_rows
        rows = pa.array(np.arange(n, dtype=np.int64))
        prov = _provenance(shard.uri, np.arange(n, dtype=np.int64))
        reason = self._reasons(table, shard.uri)
        bad = pc.is_valid(reason)
        rejects = self._rejects(table, shard.uri, reason, prov, bad)
        good = pc.invert(bad)
        if self._missing(table):
            kept = self._empty()
        else:
            kept = self._columns(table.filter(good), shard.uri, rows.filter(good))
        return kept.append_column("provenance", prov.filter(good)), rejects

    def _needed(self) -> list[str]:
        optional = [self.spec.id_column] if self.spec.id_column else []
        return [self.spec.text_column, *optional, *(self.spec.columns or {})]

    def _missing(self, table: pa.Table) -> str | None:
        return next((c for c in self._needed() if c not in table.column_names), None)

    def _empty(self) -> pa.Table:
        extras = [(c, ARROW_TYPES[k]) for c, k in (self.spec.columns or {}).items()]
        return pa.schema([("id", pa.string()), ("text", pa.string()), *extras]).empty_table()

    def _reasons(self, table: pa.Table, uri: str) -> pa.Array:
        n = table.num_rows
        missing = self._missing(table)
        if missing is not None:
            return pa.array([f"missing_column:{uri}: no column {missing!r}"] * n, pa.string())
        text = table.column(self.spec.text_column)
        if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
            return pa.array([f"bad_text:{uri}: column is {text.type}"] * n, pa.string())
        rows = np.arange(n)
        detail = pc.binary_join_element_wise(
            f"missing_text:{uri} row ", pa.array(rows.astype(str)), ": null text", ""
        )
        return pc.if_else(pc.is_null(text), detail, pa.nulls(n, pa.string()))

    def _rejects(
        self, table: pa.Table, uri: str, reason: pa.Array, prov: pa.Array, bad: pa.Array
    ) -> pa.Table:
        idx = np.flatnonzero(bad.to_numpy(zero_copy_only=False))
        ids = [record_id(self.name, uri, int(i), b"") for i in idx]
        return pa.table(
            {
                "id": pa.array(ids, pa.string()),
                "stage": pa.array([self.name] * len(idx), pa.string()),
                "reason": reason.filter(bad),
                "value": pa.nulls(len(idx), pa.string()),
                "provenance": prov.filter(bad),
            },
            schema=REJECT_SCHEMA,
        )

    def _columns(self, table: pa.Table, uri: str, rows: pa.Array) -> pa.Table:
        text = pc.cast(table.column(self.spec.text_column), pa.string())
        if self.spec.id_column:
            ids = pc.cast(table.column(self.spec.id_column), pa.string())
        else:
            texts = text.to_pylist()
            ids = pa.array(
                [
                    record_id(self.name, uri, int(r), t)
                    for r, t in zip(rows.to_pylist(), texts, strict=True)
                ],
                pa.string(),
            )
        out = {"id": ids, "text": text}
        keep: dict[str, ColumnType | None] = dict(self.spec.columns or {}) or dict.fromkeys(
            table.column_names
        )
        for column, kind in keep.items():
            if (
                column in out
                or column in RESERVED_COLUMNS
                or column in (self.spec.text_column, self.spec.id_column)
            ):
                continue
            array = table.column(column)
            out[column] = pc.cast(array, ARROW_TYPES[kind]) if kind else array
        return pa.table(out)


def read_unit(unit: Unit, spec: SourceSpec) -> tuple[pa.Table, pa.Table, list[InputInfo]]:
    """Records, quarantined rows and input facts for one unit."""
    tables: list[pa.Table] = []
    rejects: list[pa.Table] = []
    inputs: list[InputInfo] = []
    for shard in unit.shards:
        data = read_bytes(shard)
        digest = hashlib.sha256(data).hexdigest()
        table, bad = _read_shard(unit, spec, shard, data)
        tables.append(table)
        rejects.append(bad)
        inputs.append(
            InputInfo(unit.source, shard.uri, len(data), digest, table.num_rows + bad.num_rows)
        )
    merged = pa.concat_tables(tables, promote_options="permissive") if tables else pa.table({})
    merged = merged.append_column(UNIT, pa.array(np.full(merged.num_rows, unit.index, np.int64)))
    merged = merged.append_column(POS, pa.array(np.arange(merged.num_rows, dtype=np.int64)))
    return merged, pa.concat_tables(rejects), inputs


def _read_shard(
    unit: Unit, spec: SourceSpec, shard: Shard, data: bytes
) -> tuple[pa.Table, pa.Table]:
    fmt = spec.format or infer_format(shard.path)
    if fmt == "parquet":
        table, bad = ParquetParser(unit.source, spec).read(shard, data)
    elif fmt == "jsonl":
        table, bad = _jsonl_tables(unit.source, spec, shard, _decompress(shard, data))
    else:
        raise InputError(f"{shard.uri}: unknown format; set 'format: jsonl' or 'format: parquet'")
    table = _ordered(table, spec)
    return table.append_column("source", pa.array([unit.source] * table.num_rows, pa.string())), bad


def _ordered(table: pa.Table, spec: SourceSpec) -> pa.Table:
    """Reserved columns first, in a fixed order, then the declared extras."""
    names = ["id", "text", "provenance"]
    extras = [c for c in table.column_names if c not in names]
    table = table.select(names + extras)
    if spec.columns:
        for column, kind in spec.columns.items():
            i = table.schema.get_field_index(column)
            table = table.set_column(i, column, pc.cast(table.column(column), ARROW_TYPES[kind]))
    return table


def _provenance(uri: str, rows: list[int] | np.ndarray[Any, Any]) -> pa.StructArray:
    return pa.StructArray.from_arrays(
        [pa.array([uri] * len(rows), pa.string()), pa.array(rows, pa.int64())],
        fields=list(PROVENANCE),
    )


def _jsonl_tables(
    name: str, spec: SourceSpec, shard: Shard, data: bytes
) -> tuple[pa.Table, pa.Table]:
    fast = _fast_jsonl(name, spec, shard, data)
    if fast is not None:
        return fast, REJECT_SCHEMA.empty_table()
    parsed = JsonlParser(name, spec).parse(shard, data)
    extras = {c: ARROW_TYPES[k] for c, k in (spec.columns or {}).items()}
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), *extras.items()])
    table = pa.Table.from_pylist(parsed.rows, schema=schema)
    table = table.append_column("provenance", _provenance(shard.uri, parsed.rows_pos))
    return table, pa.Table.from_pylist(parsed.rejects, schema=REJECT_SCHEMA)


def _fast_jsonl(name: str, spec: SourceSpec, shard: Shard, data: bytes) -> pa.Table | None:
    """Arrow's JSON reader, for shards where every line is a clean record.

    Any anomaly (a parse error, a blank line, invalid UTF-8, a null text or id,
    a type mismatch) returns None and the shard goes to the strict line parser,
    which quarantines the bad lines; so both paths give the same table.  Ids
    given as JSON numbers also take the strict path (they are str()-ed there).
    """
    columns = spec.columns or {}
    if not data or "json" in columns.values():
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
        )
        table.validate(full=True)  # Arrow's JSON reader does not check UTF-8
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


def iter_unit_files(units: list[Unit]) -> Iterator[Shard]:
    for unit in units:
        yield from unit.shards
