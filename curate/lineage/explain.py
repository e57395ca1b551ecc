"""``curate explain OUT ID``: what happened to one record, answered from an id index.

A run's outputs are thousands of shards; finding one id by scanning them costs
as much as the run's own write.  So every run ends by writing an *id index*:

```
OUT/_index/index.json               format, hash, partitions, files (rows, sha256),
                                    the columns each stage writes
OUT/_index/ids/part-<p>.parquet     id, kind, name, path, row, child: sorted by
                                    (id, kind, name, path, row)
```

One index row per place an id was seen: ``output`` (``name`` a sink; ``path``
the Parquet shard, tar or LLaVA JSON file, ``row`` the row, sample or array
element in it), ``reject`` (``name`` the stage that dropped it; ``path`` its
rejects file), and ``seed``: a generator's seed was consumed, not passed on, so
its id would be found nowhere; each row a generator made from it (id
``<seed id>/<stage>/<k>``, ``child``) indexes the seed too, pointing at the
child's place.  Rows are hash-partitioned by ``xxh3_64(id) & (P - 1)`` into a
power of two ``P`` of partitions (one per ~1M rows), written sorted with small
row groups: a lookup reads ``index.json``, then only the row groups of one
partition whose id range holds the id (Parquet statistics), then exactly the
rows it needs (a shard's row group, a tar sample by its byte range from the
sink's key index, a LLaVA element).

The index is built by Ray tasks that read only the ``id`` column of each file
(a WebDataset sink's key index, not its tars), and a hash shuffle
(:func:`curate.shuffle.hash_shuffle`) whose reducers sort and write one
partition each: nothing passes through the driver, and the bytes depend only on
the run's outputs, so two runs of the same inputs give the same index.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import posixpath
import re
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from curate.io import storage
from curate.io.files import atomic_write_bytes
from curate.io.storage import LOCAL, StorageOptions
from curate.lineage.quarantine import error_reason

if TYPE_CHECKING:
    from rich.tree import Tree

    from curate.dag import Plan
    from curate.io.layout import Layout

INDEX_FORMAT = "curate-index/1"
HASH = "xxh3_64(utf-8 id) & (partitions - 1)"
INDEX_DIR = "_index"
INDEX_JSON = f"{INDEX_DIR}/index.json"
#: Index rows per partition the partition count aims at.
ROWS_PER_PARTITION = 1 << 20
#: Rows per row group of a partition: a lookup reads one group, not the partition.
ROW_GROUP_ROWS = 1 << 14
#: Files whose ids one read task collects.
FILES_PER_TASK = 32
PART = "_part"
SORT_KEYS = ("id", "kind", "name", "path", "row")
INDEX_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("kind", pa.string()),
        ("name", pa.string()),
        ("path", pa.string()),
        ("row", pa.int64()),
        ("child", pa.string()),
    ]
)
#: How much of a record an answer shows.
TEXT_CHARS = 200
LIST_ITEMS = 8
CHILDREN_SHOWN = 10
#: Seeds of seeds followed at most (a generator chain is finite; this bounds a bad one).
SEED_DEPTH = 8
#: Columns shown as a size, never as values.
BULKY = ("pixels", "embedding", "image_embedding", "text_embedding")


class ExplainError(Exception):
    """A question ``explain`` cannot answer; the message says why, in one line."""


# --- building the index ------------------------------------------------------------


@dataclass(frozen=True)
class IdFile:
    """A file whose ids the index lists, and how to read them."""

    kind: str  # "output" | "reject"
    name: str  # the sink, or the stage that dropped the rows
    reader: str  # "parquet" | "tar" (a WebDataset key index) | "llava"
    uri: str
    #: The path the index records: the file relative to the run (a tar sink: its folder).
    rel: str
    rows: int
    #: Generator stages upstream: the file's ids may be ``<seed>/<generator>/<k>``.
    generators: tuple[str, ...] = ()


def partitions_for(rows: int) -> int:
    """A power of two, one partition per :data:`ROWS_PER_PARTITION` rows, at least 1."""
    need = max(1, -(-rows // ROWS_PER_PARTITION))
    return 1 << (need - 1).bit_length()


def partition_of(ids: Iterable[str], parts: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Each id's partition; xxh3 is stable across processes, versions and machines."""
    mask = parts - 1
    return np.fromiter(
        (xxhash.xxh3_64_intdigest(i.encode("utf-8", "surrogatepass")) & mask for i in ids),
        dtype=np.int64,
    )


def ancestors(inputs: Mapping[str, Sequence[str]], node: str) -> set[str]:
    """``node`` and every node upstream of it (``inputs``: each stage's inputs)."""
    seen: set[str] = set()
    todo = [node]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(inputs.get(name, ()))
    return seen


def _plan_inputs(plan: Plan) -> dict[str, list[str]]:
    return {name: list(bound.inputs) for name, bound in plan.pipeline.stages.items()}


def _generators(plan: Plan, node: str, own: bool) -> tuple[str, ...]:
    """Generators at or above ``node`` (not ``node`` itself unless ``own``: a
    generator's rejects are its seeds, not rows it made)."""
    up = ancestors(_plan_inputs(plan), node)
    return tuple(
        sorted(
            n
            for n in up
            if n in plan.stages and plan.stages[n].kind == "generator" and (own or n != node)
        )
    )


def _id_file(plan: Plan, layout: Layout, report: Mapping[str, Any]) -> IdFile | None:
    rejects = report.get("rejects_file")
    if rejects:
        stage = str(report["stage"])
        rel = layout.relative(rejects["path"]).replace(os.sep, "/")
        gens = _generators(plan, stage, own=False)
        return IdFile("reject", stage, "parquet", rejects["path"], rel, rejects["rows"], gens)
    if report["kind"] not in ("output", "index"):
        return None
    sink = plan.pipeline.spec.sinks[report["sink"]]
    reader = {"parquet": "parquet", "webdataset": "tar", "llava": "llava"}[sink.format]
    if (reader == "tar") != (report["kind"] == "index"):
        return None  # a tar sink is read through its key index
    rel = layout.relative(report["path"]).replace(os.sep, "/")
    if reader == "tar":
        rel = posixpath.dirname(posixpath.dirname(rel))  # <sink>/index/part-<u>.parquet
    gens = _generators(plan, sink.input, own=True)
    return IdFile("output", report["sink"], reader, report["path"], rel, report["rows"], gens)


def index_files(plan: Plan, layout: Layout, reports: Iterable[Mapping[str, Any]]) -> list[IdFile]:
    """Every output and rejects file of the run (each once), from the runner's reports:
    the ones a resumed run took from its commit log and a cache reuse imported included."""
    files: dict[tuple[str, str, str], IdFile] = {}
    for report in reports:
        found = _id_file(plan, layout, report)
        if found is not None:
            files.setdefault((found.kind, found.name, found.uri), found)
    return [files[k] for k in sorted(files)]


def _file_ids(f: IdFile, opts: StorageOptions) -> tuple[pa.Array, list[str], np.ndarray[Any, Any]]:
    """Ids of one file, the path each is at, and its row there."""
    if f.reader == "llava":
        entries = json.loads(storage.read_bytes(f.uri, opts))
        ids = pa.array([e.get("id") for e in entries], pa.string())
        return ids, [f.rel] * len(ids), np.arange(len(ids))
    columns = ["id", "shard"] if f.reader == "tar" else ["id"]
    with storage.open_input(f.uri, opts) as handle:
        table = pq.read_table(handle, columns=columns)
    ids = pc.cast(table.column("id"), pa.string()).combine_chunks()
    if f.reader == "parquet":
        return ids, [f.rel] * len(ids), np.arange(len(ids))
    shards = np.asarray(table.column("shard").to_pylist(), dtype=object)
    return ids, [f"{f.rel}/{s}" for s in shards], _ordinals(shards)


def _ordinals(groups: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Each row's position within its run of equal values (a sample's place in its tar)."""
    if not len(groups):
        return np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    lengths = np.diff(np.r_[starts, len(groups)])
    return np.arange(len(groups)) - np.repeat(starts, lengths)


def _seed_rows(table: pa.Table, generators: Sequence[str]) -> pa.Table:
    """Index rows for the seeds of generated ids ``<seed>/<generator>/<k>``, at every
    level of a generator chain: a seed whose rows a later generator consumed is found
    through their descendants (``child``: the seed's own row, ``path`` and ``row``:
    where the descendant is)."""
    names = "|".join(re.escape(g) for g in generators)
    pattern = rf"(?s)^(?P<seed>.*)/(?P<gen>{names})/[0-9]+$"
    levels = []
    current = table
    while current.num_rows:  # every level is a shorter id: this ends
        found = pc.extract_regex(current.column("id"), pattern)
        hit = pc.is_valid(found)
        rows, found = current.filter(hit), pc.filter(found, hit)
        current = pa.table(
            {
                "id": pc.struct_field(found, "seed"),
                "kind": pa.array(["seed"] * rows.num_rows, pa.string()),
                "name": pc.struct_field(found, "gen"),
                "path": rows.column("path"),
                "row": rows.column("row"),
                "child": rows.column("id"),
            },
            schema=INDEX_SCHEMA,
        )
        levels.append(current)
    return pa.concat_tables(levels) if levels else INDEX_SCHEMA.empty_table()


def file_entries(f: IdFile, opts: StorageOptions) -> pa.Table:
    """The index rows of one file (rows without an id cannot be asked for)."""
    ids, paths, rows = _file_ids(f, opts)
    n = len(ids)
    table = pa.table(
        {
            "id": ids,
            "kind": pa.array([f.kind] * n, pa.string()),
            "name": pa.array([f.name] * n, pa.string()),
            "path": pa.array(paths, pa.string()),
            "row": pa.array(rows, pa.int64()),
            "child": pa.nulls(n, pa.string()),
        },
        schema=INDEX_SCHEMA,
    ).filter(pc.is_valid(ids))
    if f.generators and table.num_rows:
        table = pa.concat_tables([table, _seed_rows(table, f.generators)])
    return table


def read_ids(files: Sequence[IdFile], parts: int, opts: StorageOptions) -> pa.Table:
    """A read task: the index rows of ``files``, with their partition (``_part``)."""
    tables = [file_entries(f, opts) for f in files]
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    part = partition_of(table.column("id").to_pylist(), parts)
    return table.append_column(PART, pa.array(part, pa.int64()))


def sort_entries(table: pa.Table) -> pa.Table:
    """A reducer: one partition's rows in index order (one chunk: stable bytes)."""
    if table.num_columns == 0:
        return INDEX_SCHEMA.empty_table()
    table = table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
    return table.sort_by([(k, "ascending") for k in SORT_KEYS]).combine_chunks()


def index_bytes(table: pa.Table) -> bytes:
    """Deterministic Parquet with small row groups, so that a lookup reads one."""
    sink = io.BytesIO()
    pq.write_table(
        table.replace_schema_metadata(None),
        sink,
        compression="zstd",
        write_statistics=True,
        store_schema=True,
        row_group_size=ROW_GROUP_ROWS,
    )
    return sink.getvalue()


def partition_path(p: int) -> str:
    return f"{INDEX_DIR}/ids/part-{p:05d}.parquet"


def write_partition(root: str, p: int, table: pa.Table, opts: StorageOptions) -> dict[str, Any]:
    """A write task: partition ``p`` under ``root``; its facts for the manifest."""
    data = index_bytes(sort_entries(table))
    rel = partition_path(p)
    atomic_write_bytes(storage.join(root, *rel.split("/")), data, opts)
    sha = hashlib.sha256(data).hexdigest()
    return {"path": rel, "rows": table.num_rows, "bytes": len(data), "sha256": sha}


def _chunks(files: list[IdFile]) -> list[list[IdFile]]:
    return [files[i : i + FILES_PER_TASK] for i in range(0, len(files), FILES_PER_TASK)]


def stage_columns(plan: Plan) -> dict[str, list[str]]:
    """The columns each stage writes: an answer groups a record's scores by stage."""
    return {name: sorted(stage.writes()) for name, stage in plan.stages.items()}


def build_index(plan: Plan, layout: Layout, reports: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Write the run's id index (see the module docstring) on the connected Ray cluster
    and ``_index/index.json``; return what the manifest records under ``index``."""
    import ray

    from curate.shuffle import hash_shuffle

    files = index_files(plan, layout, reports)
    parts = partitions_for(sum(f.rows for f in files))
    reader, writer = ray.remote(read_ids), ray.remote(write_partition)
    blocks = [reader.remote(chunk, parts, layout.opts) for chunk in _chunks(files)]
    empty = INDEX_SCHEMA.empty_table()
    tables = hash_shuffle(blocks, PART, parts, sort_entries) if blocks else [empty] * parts
    written = ray.get([writer.remote(layout.root, p, t, layout.opts) for p, t in enumerate(tables)])
    info = {
        "format": INDEX_FORMAT,
        "hash": HASH,
        "partitions": parts,
        "rows": sum(w["rows"] for w in written),
        "files": written,
        "columns": stage_columns(plan),
    }
    text = json.dumps(info, indent=2) + "\n"
    atomic_write_bytes(layout.absolute(INDEX_JSON), text.encode(), layout.opts)
    return info


# --- answering -----------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    """One index row: a place where an id was seen."""

    kind: str
    name: str
    path: str
    row: int
    child: str | None = None


@dataclass(frozen=True)
class RunView:
    """A finished run as ``explain`` reads it: its manifest and its index."""

    root: str
    opts: StorageOptions
    manifest: dict[str, Any]
    index: dict[str, Any]

    def uri(self, rel: str) -> str:
        return storage.join(self.root, *rel.split("/"))

    @property
    def spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = self.manifest["pipeline"]["spec"]
        return spec

    @property
    def inputs(self) -> dict[str, list[str]]:
        return {name: list(s["input"]) for name, s in self.spec["stages"].items()}

    def stage_type(self, name: str) -> str:
        if name in self.spec["sources"]:
            return "source"
        return str(self.spec["stages"][name]["type"])

    def generators(self) -> list[str]:
        return [s["name"] for s in self.manifest["stages"] if s["kind"] == "generator"]


def _read_json(uri: str, opts: StorageOptions) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(storage.read_bytes(uri, opts))
    return data


def open_run(out: str, opts: StorageOptions = LOCAL) -> RunView:
    """The run in ``out``; an :class:`ExplainError` when it is none, did not finish, or
    has no index."""
    root = out if storage.is_s3(out) else os.path.abspath(out)
    if not storage.exists(storage.join(root, "manifest.json"), opts):
        if storage.exists(storage.join(root, ".curate-run"), opts):
            raise ExplainError(
                f"{out}: the run did not finish (no manifest.json); finish it with "
                "`curate run PIPELINE -o OUT --resume`"
            )
        raise ExplainError(f"{out}: not a curate run folder (no manifest.json)")
    manifest = _read_json(storage.join(root, "manifest.json"), opts)
    index_uri = storage.join(root, *INDEX_JSON.split("/"))
    if not storage.exists(index_uri, opts):
        raise ExplainError(
            f"{out}: the run has no id index ({INDEX_JSON}); it was made before "
            "`curate explain` existed: rerun it with --overwrite"
        )
    return RunView(root, opts, manifest, _read_json(index_uri, opts))


def _row_groups(meta: Any, record_id: str) -> list[int]:
    """Row groups whose ``id`` range may hold ``record_id`` (all when unknown)."""
    groups = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(0).statistics
        known = stats is not None and stats.has_min_max
        if not known or stats.min <= record_id <= stats.max:
            groups.append(g)
    return groups


def lookup(run: RunView, record_id: str) -> tuple[list[Hit], str]:
    """The index rows of ``record_id``, and the partition file searched."""
    p = int(partition_of([record_id], int(run.index["partitions"]))[0])
    rel = partition_path(p)
    with storage.open_input(run.uri(rel), run.opts) as handle:
        parquet = pq.ParquetFile(handle)
        groups = _row_groups(parquet.metadata, record_id)
        table = parquet.read_row_groups(groups) if groups else INDEX_SCHEMA.empty_table()
    rows = table.filter(pc.equal(table.column("id"), record_id)).to_pylist()
    hits = [Hit(r["kind"], r["name"], r["path"], r["row"], r["child"]) for r in rows]
    return hits, rel


def _locate(meta: Any, row: int) -> tuple[int, int]:
    """The row group holding ``row`` of a file, and the row's offset in it."""
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row < n:
            return g, row
        row -= n
    raise ExplainError(f"row {row} is past the end of the file: the index is stale")


def parquet_row(run: RunView, rel: str, row: int) -> tuple[dict[str, Any], int]:
    """Row ``row`` of a Parquet file, reading only its row group; and the group."""
    with storage.open_input(run.uri(rel), run.opts) as handle:
        parquet = pq.ParquetFile(handle)
        group, offset = _locate(parquet.metadata, row)
        table = parquet.read_row_group(group)
    record: dict[str, Any] = table.slice(offset, 1).to_pylist()[0]
    return record, group


def _tar_place(run: RunView, path: str, row: int) -> tuple[int, int]:
    """Byte offset and size of sample ``row`` of a tar, from the sink's key index."""
    folder, name = path.rsplit("/", 1)
    unit = name.split("-")[1]  # part-<unit>-<k>.tar
    index = run.uri(f"{folder}/index/part-{unit}.parquet")
    with storage.open_input(index, run.opts) as handle:
        keys = pq.read_table(handle, columns=["shard", "offset", "size"])
    keys = keys.filter(pc.equal(keys.column("shard"), name))
    if row >= keys.num_rows:
        raise ExplainError(f"{path}: no sample {row} in its key index: the index is stale")
    return int(keys.column("offset")[row].as_py()), int(keys.column("size")[row].as_py())


def tar_sample(run: RunView, path: str, row: int) -> tuple[dict[str, Any], dict[str, int]]:
    """One tar sample, read by its byte range: ``.json`` fields, ``.txt`` as ``text``,
    the image as ``image`` bytes."""
    from curate.io.webdataset import split_name

    offset, size = _tar_place(run, path, row)
    with storage.open_input(run.uri(path), run.opts) as handle:
        handle.seek(offset)
        data = handle.read(size)
    record: dict[str, Any] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, ext = split_name(member.name)
            payload = tar.extractfile(member)
            body = payload.read() if payload is not None else b""
            record["key"] = key
            if ext == "json":
                record.update(json.loads(body))
            elif ext == "txt":
                record["text"] = body.decode("utf-8", "replace")
            else:
                record["image"], record["image_ext"] = body, ext
    return record, {"offset": offset, "size": size}


def llava_entry(run: RunView, path: str, row: int) -> dict[str, Any]:
    entries = json.loads(storage.read_bytes(run.uri(path), run.opts))
    if row >= len(entries):
        raise ExplainError(f"{path}: no element {row}: the index is stale")
    entry: dict[str, Any] = entries[row]
    return entry


def summarize(value: Any, key: str = "") -> Any:
    """A readable, JSON-safe form: long text cut, bytes and vectors as their size."""
    if isinstance(value, bytes | bytearray):
        return f"<{len(value):,} bytes>"
    if isinstance(value, str):
        if len(value) <= TEXT_CHARS:
            return value
        return value[:TEXT_CHARS] + f"… ({len(value):,} chars)"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: summarize(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return _summarize_list(list(value), key)
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)


def _summarize_list(items: list[Any], key: str) -> Any:
    numeric = all(isinstance(v, int | float | list) for v in items)
    if key in BULKY or (numeric and len(items) > LIST_ITEMS):
        return f"<{len(items):,} values>"
    shown = [summarize(v) for v in items[:LIST_ITEMS]]
    if len(items) > LIST_ITEMS:
        shown.append(f"… {len(items) - LIST_ITEMS} more")
    return shown


def _numeric(values: Mapping[str, Any]) -> dict[str, float | int]:
    return {
        k: v for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _sources_of(run: RunView, source: str | None, target: str) -> list[str]:
    """The source(s) a record at ``target`` came from: its own when known, else every
    source upstream of ``target``."""
    sources = list(run.spec["sources"])
    if source is not None and source in sources:
        return [source]
    up = ancestors(run.inputs, target)
    return [s for s in sources if s in up]


def stages_passed(
    run: RunView,
    source: str | None,
    target: str,
    values: Mapping[str, Any],
    include_target: bool = True,
) -> list[dict[str, Any]]:
    """The nodes from the record's source to ``target`` in pipeline order, each with
    its scores: the scalar values (``values``: the record, or its scores map) of the
    columns it was the last on the path to write (a later writer replaced the value)."""
    inputs = run.inputs
    up = ancestors(inputs, target)
    if not include_target:
        up.discard(target)
    starts = _sources_of(run, source, target)
    order = [*run.spec["sources"], *run.spec["stages"]]
    path = [n for n in order if n in up and any(s in ancestors(inputs, n) for s in starts)]
    written = run.index.get("columns", {})
    owner = {c: name for name in path for c in written.get(name, [])}
    out = []
    for name in path:
        step: dict[str, Any] = {"name": name, "type": run.stage_type(name)}
        scores = {c: values[c] for c, o in owner.items() if o == name and _scalar(values.get(c))}
        if scores:
            step["scores"] = {c: summarize(v, c) for c, v in sorted(scores.items())}
        out.append(step)
    return out


def _scalar(value: Any) -> bool:
    """A value that reads as a score: a number, a flag, a label (short, one word)."""
    if isinstance(value, str):
        return len(value) <= 64 and not any(c.isspace() for c in value)
    return isinstance(value, int | float | bool)


def read_landing(run: RunView, hit: Hit) -> tuple[dict[str, Any], dict[str, Any]]:
    """A record as its sink wrote it, and where in the file (row group, byte range)."""
    fmt = run.spec["sinks"][hit.name].get("format", "parquet")
    if fmt == "webdataset":
        return tar_sample(run, hit.path, hit.row)
    if fmt == "llava":
        return llava_entry(run, hit.path, hit.row), {}
    record, group = parquet_row(run, hit.path, hit.row)
    return record, {"row_group": group}


def _own_source(record: Mapping[str, Any]) -> str | None:
    source = record.get("source")
    return source if isinstance(source, str) else None


def _generator_of(run: RunView, record_id: str) -> tuple[str, str] | None:
    """(seed id, generator) of an id ``<seed>/<generator>/<k>`` of this run's generators."""
    names = "|".join(re.escape(g) for g in run.generators())
    match = re.fullmatch(rf"(?s)(.*)/({names})/[0-9]+", record_id) if names else None
    return (match.group(1), match.group(2)) if match else None


def _source_via_generator(run: RunView, record_id: str) -> str | None:
    """The one source upstream of the generator that made ``record_id``, if so."""
    made = _generator_of(run, record_id)
    if made is None:
        return None
    up = ancestors(run.inputs, made[1])
    found = [s for s in run.spec["sources"] if s in up]
    return found[0] if len(found) == 1 else None


def _landing(
    run: RunView, hit: Hit, row: tuple[dict[str, Any], dict[str, Any]], source: str | None
) -> dict[str, Any]:
    """Where a record landed in a sink, the stages it passed and the row as written."""
    record, where = row
    sink = run.spec["sinks"][hit.name]
    return {
        "sink": hit.name,
        "format": sink.get("format", "parquet"),
        "path": hit.path,
        "row": hit.row,
        **where,
        "stages": stages_passed(run, source, sink["input"], record),
        "scores": _numeric(record),
        "record": summarize(record),
    }


def _input_source(run: RunView, provenance: Mapping[str, Any] | None) -> str | None:
    uri = (provenance or {}).get("uri")
    found = {i["source"] for i in run.manifest.get("inputs", []) if i["uri"] == uri}
    return found.pop() if len(found) == 1 else None


def kept_instead(reason: str | None) -> str | None:
    """The kept record a duplicate's reason names (``exact_duplicate:<id>``)."""
    category, _, detail = (reason or "").partition(":")
    if category in ("exact_duplicate", "near_duplicate") and detail:
        return detail
    return None


def _drop(run: RunView, hit: Hit, follow: bool = True) -> dict[str, Any]:
    """Where and why a record was dropped, the stages it passed first and their scores;
    for a duplicate, where the kept record went."""
    row, _ = parquet_row(run, hit.path, hit.row)
    stage = hit.name
    scores = dict(row.get("scores") or [])
    quarantined = stage in run.spec["sources"]
    source = stage if quarantined else _input_source(run, row.get("provenance"))
    answer: dict[str, Any] = {
        "stage": stage,
        "type": run.stage_type(stage),
        "reason": row["reason"],
        "value": summarize(row["value"]),
        "path": hit.path,
        "row": hit.row,
        "provenance": row.get("provenance"),
        "stages": [] if quarantined else stages_passed(run, source, stage, scores, False),
        "scores": scores,
    }
    if quarantined:
        answer["quarantined"] = True
    if not quarantined and row["reason"] == error_reason(answer["type"]):
        answer["traceback"] = row["value"]  # the stage raised on it: its whole traceback
    kept = kept_instead(row["reason"])
    if kept is not None and follow:
        answer["kept"] = brief(run, kept)
    return answer


def _place(path: str) -> dict[str, str]:
    """Whether a file is a rejects file (and of which stage) or a sink's."""
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "rejects" and parts[2].startswith("unit-"):
        return {"dropped_by": parts[1]}
    return {"sink": parts[0]}


def _children(hits: Sequence[Hit], generator: str) -> dict[str, list[dict[str, Any]]]:
    """Each row ``generator`` made from this record, with where it (or, when a later
    generator consumed it, its descendants) can be found."""
    places: dict[str, list[dict[str, Any]]] = {}
    for h in hits:
        if h.kind == "seed" and h.name == generator and h.child is not None:
            places.setdefault(h.child, []).append({"path": h.path, "row": h.row, **_place(h.path)})
    return places


def _seeded(run: RunView, hits: Sequence[Hit]) -> list[dict[str, Any]]:
    """The rows generators made from this record, per generator, and the stages the
    record passed before it."""
    out = []
    for gen in sorted({h.name for h in hits if h.kind == "seed"}):
        places = _children(hits, gen)
        shown = list(places.items())[:CHILDREN_SHOWN]
        out.append(
            {
                "stage": gen,
                "stages": stages_passed(run, None, gen, {}, include_target=False),
                "rows": len(places),
                "children": [{"id": child, "at": at[:LIST_ITEMS]} for child, at in shown],
            }
        )
    return out


def brief(run: RunView, record_id: str) -> dict[str, Any]:
    """Where a record went, from the index and its rejects row only (for a duplicate's
    kept record)."""
    hits, _ = lookup(run, record_id)
    landed = [{"sink": h.name, "path": h.path, "row": h.row} for h in hits if h.kind == "output"]
    dropped = []
    for h in hits:
        if h.kind == "reject":
            d = _drop(run, h, follow=False)
            dropped.append({k: d[k] for k in ("stage", "reason", "path", "row")})
    return {"id": record_id, "found": bool(hits), "landed": landed, "dropped": dropped}


def _upstream_of_hits(run: RunView, hits: Sequence[Hit]) -> set[str]:
    """Every node a record passed on its way to the places the index found it."""
    passed: set[str] = set()
    for h in hits:
        if h.kind == "output":
            passed |= ancestors(run.inputs, run.spec["sinks"][h.name]["input"])
        else:  # dropped by, or seed of, ``h.name``: it passed what lies above
            passed |= ancestors(run.inputs, h.name) - {h.name}
    return passed


def _seed_id(run: RunView, record_id: str, hits: Sequence[Hit], rows: list[Any]) -> str | None:
    """The seed of a generated record: its ``seed_id`` column, else its id
    ``<seed>/<generator>/<k>`` where the record passed that generator."""
    for row in rows:
        if isinstance(row.get("seed_id"), str):
            return str(row["seed_id"])
    made = _generator_of(run, record_id)
    if made is None or made[1] not in _upstream_of_hits(run, hits):
        return None
    return made[0]


def describe(
    run: RunView, record_id: str, hits: Sequence[Hit], trail: tuple[str, ...]
) -> dict[str, Any]:
    """The answer for a record found in the index; its seed's in turn.  A sink that
    keeps no ``source`` column (llava) takes the source another sink wrote."""
    outputs = [h for h in hits if h.kind == "output"]
    rows = [read_landing(run, h) for h in outputs]
    known = next((s for s in (_own_source(r) for r, _ in rows) if s), None)
    known = known or _source_via_generator(run, record_id)
    landed = [
        _landing(run, h, row, _own_source(row[0]) or known)
        for h, row in zip(outputs, rows, strict=True)
    ]
    answer: dict[str, Any] = {
        "id": record_id,
        "landed": landed,
        "dropped": [_drop(run, h) for h in hits if h.kind == "reject"],
        "seeded": _seeded(run, hits),
    }
    seed = _seed_id(run, record_id, hits, [r for r, _ in rows])
    if seed is not None:
        answer["seed"] = _explain_seed(run, seed, (*trail, record_id))
    return answer


def _explain_seed(run: RunView, seed: str, trail: tuple[str, ...]) -> dict[str, Any]:
    if seed in trail or len(trail) >= SEED_DEPTH:
        return {"id": seed, "note": "seed chain not followed further"}
    hits, _ = lookup(run, seed)
    if not hits:
        return {"id": seed, "found": False}
    return describe(run, seed, hits, trail)


def explain(out: str, record_id: str, opts: StorageOptions = LOCAL) -> dict[str, Any]:
    """What happened to ``record_id`` in the run in ``out`` (a folder or ``s3://``
    prefix): where it landed, where and why it was dropped, the stages it passed with
    their scores, and for a generated record its seed, explained in turn."""
    run = open_run(out, opts)
    hits, searched = lookup(run, record_id)
    parts = int(run.index["partitions"])
    if not hits:
        raise ExplainError(
            f"record {record_id!r} is not in this run: searched {searched} "
            f"(1 of {parts} index partition(s); an id hashes to exactly one)"
        )
    answer = describe(run, record_id, hits, ())
    answer["index"] = {"partition": searched, "partitions": parts}
    return answer


# --- showing an answer ---------------------------------------------------------------


def _scores_text(scores: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {_short(v)}" for k, v in scores.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _path_line(stages: Sequence[Mapping[str, Any]]) -> str:
    return " → ".join(s["name"] for s in stages) or "(none)"


def _add_stages(node: Tree, stages: Sequence[Mapping[str, Any]]) -> set[str]:
    """The path and each stage's scores; returns the columns shown."""
    from rich.markup import escape

    node.add(f"path: {escape(_path_line(stages))}")
    shown: set[str] = set()
    for s in stages:
        if s.get("scores"):
            text = _scores_text(s["scores"])
            node.add(f"{escape(s['name'])} ({escape(s['type'])}): {escape(text)}")
            shown.update(s["scores"])
    return shown


def _add_landing(tree: Tree, a: Mapping[str, Any]) -> None:
    from rich.markup import escape

    where = f"{a['path']} row {a['row']}"
    node = tree.add(
        f"[green]landed[/] in sink {escape(a['sink'])} ({a['format']}): {escape(where)}"
    )
    shown = _add_stages(node, a["stages"])
    record = {k: v for k, v in a["record"].items() if k not in shown and v is not None}
    for key, value in record.items():
        node.add(f"{escape(key)}: {escape(json.dumps(value, ensure_ascii=False, default=str))}")


def _add_drop(tree: Tree, d: Mapping[str, Any]) -> None:
    from rich.markup import escape

    label = "quarantined by source" if d.get("quarantined") else "dropped by"
    node = tree.add(
        f"[red]{label}[/] {escape(d['stage'])} ({escape(d['type'])}): {escape(str(d['reason']))}"
    )
    if d.get("traceback"):
        node.add(escape(str(d["traceback"]).rstrip("\n")))
    elif d.get("value") is not None:
        node.add(f"value: {escape(str(d['value']))}")
    node.add(f"rejects: {escape(d['path'])} row {d['row']}")
    if not d.get("quarantined"):
        shown = _add_stages(node, d["stages"])
        rest = {k: v for k, v in d["scores"].items() if k not in shown}
        if rest:
            node.add(f"other scores: {escape(_scores_text(rest))}")
    kept = d.get("kept")
    if kept:
        places = [f"{p['sink']}: {p['path']} row {p['row']}" for p in kept["landed"]]
        places += [f"dropped by {p['stage']}: {p['reason']}" for p in kept["dropped"]]
        node.add(f"kept instead: {escape(kept['id'])} → {escape('; '.join(places) or 'nowhere')}")


def _where(places: Sequence[Mapping[str, Any]]) -> str:
    """Where a generated row (or its descendants) went, in a few words."""
    said = [p.get("sink") or f"dropped by {p['dropped_by']}" for p in places]
    return ", ".join(dict.fromkeys(said))


def render(answer: Mapping[str, Any], tree: Tree | None = None) -> Tree:
    """A compact tree of an answer, for the terminal."""
    from rich.markup import escape
    from rich.tree import Tree

    label = f"[bold]{escape(answer['id'])}[/]"
    node = Tree(label) if tree is None else tree.add(f"seed {label}")
    for a in answer.get("landed", []):
        _add_landing(node, a)
    for d in answer.get("dropped", []):
        _add_drop(node, d)
    for s in answer.get("seeded", []):
        kids = ", ".join(f"{c['id']} ({_where(c['at'])})" for c in s["children"])
        after = _path_line(s["stages"])
        node.add(f"seeded {s['rows']} row(s) by {escape(s['stage'])} after {escape(after)}")
        node.add(f"made: {escape(kids)}")
    seed = answer.get("seed")
    if seed is not None:
        if "landed" in seed:
            render(seed, node)
        else:
            node.add(f"seed {escape(seed['id'])}: {escape(seed.get('note', 'not in this run'))}")
    return node
