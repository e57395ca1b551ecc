"""Input listing, units of work, and atomic, checksummed file writes (local or S3).

A *shard* is one input file.  A *unit* is a run of consecutive shards of one
source, grouped up to ``execution.unit_bytes``: the unit is the block Ray
processes, the granularity of output shard names, and (later) of resume.
Unit boundaries depend only on the file list and the spec, never on how many
workers run, which is what makes outputs byte-identical across cluster sizes.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate.io import storage
from curate.io.storage import LOCAL, StorageError, StorageOptions

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")
WEBDATASET_SUFFIXES = (".tar",)


class InputError(ValueError):
    """An input that cannot be listed or read; the message names the file."""


@dataclass(frozen=True)
class Shard:
    """One input file: ``uri`` as the user wrote it (for provenance), ``path`` to open,
    and ``version`` (mtime or ETag), which fingerprints it for the stage cache."""

    uri: str
    path: str
    size: int
    version: str = ""


@dataclass(frozen=True)
class Unit:
    """A unit of work: consecutive shards of one source."""

    index: int
    source: str
    shards: tuple[Shard, ...]

    @property
    def name(self) -> str:
        return f"unit-{self.index:06d}"


def infer_format(path: str) -> str | None:
    lower = path.lower()
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(WEBDATASET_SUFFIXES):
        return "webdataset"
    return None


def _display(path: Path, base_dir: Path, written: str) -> str:
    """Provenance URI: relative to the pipeline file when the user wrote a relative path."""
    if os.path.isabs(written):
        return str(path)
    return os.path.relpath(path, base_dir)


def list_shards(uris: str | list[str], base_dir: Path, opts: StorageOptions = LOCAL) -> list[Shard]:
    """Expand files, directories, globs and brace ranges (``shard-{000..099}.tar``),
    locally or on S3, sorted by path; raise if a pattern matches nothing."""
    shards: dict[str, Shard] = {}
    for written in [uris] if isinstance(uris, str) else uris:
        try:
            storage.check_uri(written)
            found = (
                _expand_s3(written, opts) if storage.is_s3(written) else _expand(written, base_dir)
            )
        except StorageError as exc:
            raise InputError(str(exc)) from None
        if not found:
            where = (
                written
                if "://" in written or os.path.isabs(written)
                else f"{written} under {base_dir}"
            )
            raise InputError(f"{written}: no file matches (looked for {where})")
        for info in found:
            display = (
                info.uri if storage.is_s3(info.uri) else _display(Path(info.uri), base_dir, written)
            )
            shards[info.uri] = Shard(display, info.uri, info.size, info.version)
    return [shards[k] for k in sorted(shards)]


def _expand(written: str, base_dir: Path) -> list[storage.FileInfo]:
    """An existing path as it is (even with glob or brace characters in its name), else
    brace ranges and globs; a relative pattern is matched inside ``base_dir`` (whose own
    name may hold ``[``)."""
    path = Path(written) if os.path.isabs(written) else base_dir / written
    if path.exists():
        return [storage.stat(str(p)) for p in _files_under(path)]
    found: list[storage.FileInfo] = []
    for pattern in storage.expand_braces(written):
        one = Path(pattern) if os.path.isabs(pattern) else base_dir / pattern
        if one.exists():
            found.extend(storage.stat(str(p)) for p in _files_under(one))
            continue
        if os.path.isabs(pattern):
            matches = glob.glob(pattern, recursive=True)
        else:
            matches = [
                str(base_dir / f) for f in glob.glob(pattern, root_dir=base_dir, recursive=True)
            ]
        for match in sorted(matches):
            found.extend(storage.stat(str(p)) for p in _files_under(Path(match)))
    return found


def _expand_s3(written: str, opts: StorageOptions) -> list[storage.FileInfo]:
    found: list[storage.FileInfo] = []
    for pattern in storage.expand_braces(written):
        matches = storage.glob_files(pattern, opts)
        if matches is not None:  # as on disk: every match is a shard (unknown formats fail)
            found.extend(matches)
            continue
        if storage.exists(pattern, opts):
            found.append(storage.stat(pattern, opts))
            continue
        under = [f for f in storage.list_prefix(pattern, opts) if infer_format(f.uri)]
        if not under and storage.list_prefix(pattern, opts):
            raise InputError(f"{pattern}: folder holds no .jsonl/.json/.parquet/.tar files")
        found.extend(under)
    return found


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.is_file() and infer_format(p.name)]
        if not found:
            raise InputError(f"{path}: directory holds no .jsonl/.json/.parquet/.tar files")
        return found
    return [path.resolve()]


def plan_units(source: str, shards: list[Shard], unit_bytes: int, first_index: int) -> list[Unit]:
    """Group consecutive shards into units of at most ``unit_bytes`` (one shard at least)."""
    units: list[Unit] = []
    current: list[Shard] = []
    size = 0
    for shard in shards:
        if current and size + shard.size > unit_bytes:
            units.append(Unit(first_index + len(units), source, tuple(current)))
            current, size = [], 0
        current.append(shard)
        size += shard.size
    if current:
        units.append(Unit(first_index + len(units), source, tuple(current)))
    return units


@dataclass(frozen=True)
class WrittenFile:
    """A committed output file: where, how many rows, how big, its sha256."""

    path: str
    rows: int
    bytes: int
    sha256: str


def parquet_bytes(table: pa.Table, compression: str = "zstd") -> bytes:
    """Serialize deterministically: no schema metadata, fixed writer options."""
    table = table.replace_schema_metadata(None)
    sink = io.BytesIO()
    pq.write_table(
        table,
        sink,
        compression=None if compression == "none" else compression,
        write_statistics=True,
        store_schema=True,
    )
    return sink.getvalue()


def atomic_write_bytes(path: str, data: bytes, opts: StorageOptions = LOCAL) -> None:
    """Write atomically (see :func:`curate.io.storage.write_bytes`): a crash leaves at
    worst a hidden ``.*.tmp-*`` file or an invisible upload, never a half-written file
    under the final name."""
    storage.write_bytes(path, data, opts)


def write_parquet_atomic(
    table: pa.Table, path: str, compression: str = "zstd", opts: StorageOptions = LOCAL
) -> WrittenFile:
    data = parquet_bytes(table, compression)
    atomic_write_bytes(path, data, opts)
    return WrittenFile(path, table.num_rows, len(data), hashlib.sha256(data).hexdigest())


def read_bytes(shard: Shard, opts: StorageOptions = LOCAL) -> bytes:
    try:
        return storage.read_bytes(shard.path, opts)
    except OSError as exc:
        raise InputError(f"{shard.uri}: cannot read input file: {exc}") from exc


def read_parquet(
    path: str, opts: StorageOptions = LOCAL, columns: list[str] | None = None
) -> pa.Table:
    """A whole Parquet file (local or S3) as a table without schema metadata."""
    data = storage.read_bytes(path, opts)
    return pq.read_table(pa.BufferReader(data), columns=columns).replace_schema_metadata(None)
