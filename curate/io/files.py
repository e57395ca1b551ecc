"""Input listing, units of work, and atomic, checksummed file writes (local disk).

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
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")
PARQUET_SUFFIXES = (".parquet", ".pq")


class InputError(ValueError):
    """An input that cannot be listed or read; the message names the file."""


@dataclass(frozen=True)
class Shard:
    """One input file: ``uri`` as the user wrote it (for provenance), ``path`` to open."""

    uri: str
    path: str
    size: int


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
    return None


def _display(path: Path, base_dir: Path, written: str) -> str:
    """Provenance URI: relative to the pipeline file when the user wrote a relative path."""
    if os.path.isabs(written):
        return str(path)
    return os.path.relpath(path, base_dir)


def list_shards(uris: str | list[str], base_dir: Path) -> list[Shard]:
    """Expand files, directories and globs, sorted by path; raise if nothing matches."""
    shards: dict[str, Shard] = {}
    for written in [uris] if isinstance(uris, str) else uris:
        if "://" in written:
            raise InputError(f"{written}: remote storage is not supported yet (local paths only)")
        matches = _expand(written, base_dir)
        if not matches:
            where = written if os.path.isabs(written) else f"{written} under {base_dir}"
            raise InputError(f"{written}: no file matches (looked for {where})")
        for match in matches:
            for path in _files_under(Path(match)):
                shards[str(path)] = Shard(
                    _display(path, base_dir, written), str(path), path.stat().st_size
                )
    return [shards[k] for k in sorted(shards)]


def _expand(written: str, base_dir: Path) -> list[str]:
    """An existing path as it is (even with glob characters in its name), else a glob;
    a relative pattern is matched inside ``base_dir`` (whose own name may hold ``[``)."""
    path = Path(written) if os.path.isabs(written) else base_dir / written
    if path.exists():
        return [str(path)]
    if os.path.isabs(written):
        return sorted(glob.glob(written, recursive=True))
    found = glob.glob(written, root_dir=base_dir, recursive=True)
    return sorted(str(base_dir / f) for f in found)


def _files_under(path: Path) -> list[Path]:
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if p.is_file() and infer_format(p.name)]
        if not found:
            raise InputError(f"{path}: directory holds no .jsonl/.json/.parquet files")
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


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a hidden temporary name in the same folder, fsync, then rename.

    A crash leaves at worst a ``.*.tmp-*`` file, never a half-written file under
    the final name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, target)


def write_parquet_atomic(table: pa.Table, path: str, compression: str = "zstd") -> WrittenFile:
    data = parquet_bytes(table, compression)
    atomic_write_bytes(path, data)
    return WrittenFile(path, table.num_rows, len(data), hashlib.sha256(data).hexdigest())


def read_bytes(shard: Shard) -> bytes:
    try:
        with open(shard.path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise InputError(f"{shard.uri}: cannot read input file: {exc}") from exc
