"""A run's stats: measuring its files in Ray tasks, writing them, reading them back.

Every run writes, next to its outputs (after ``manifest.json``)::

    OUT/stats/<sink>/<shard stem>.json          one output shard of a sink
    OUT/stats/rejects/<stage>/unit-<u>.json     one rejects file
    OUT/stats/summary.json                      the merged totals per sink and per stage

Files are read by Ray tasks, one per file, reading only the columns needed
(Parquet row groups stream through); the driver only merges records.  What is
covered per output format: Parquet shards and rejects files, everything;
WebDataset tars, everything too (the ``.txt`` member is the text, scalar
fields of the ``.json`` member are the columns), but a tar is read whole,
images included, as its members interleave; llava JSON files, the text of
every conversation turn and the scalar extra fields, never the images.

:class:`RunStats` loads a finished run (measuring it first when it predates
stats) for analysis; its plot methods import :mod:`curate.stats.plots` lazily,
so that matplotlib is only needed by whoever plots.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.io import storage
from curate.io.files import atomic_write_bytes, read_parquet
from curate.io.storage import LOCAL, StorageOptions
from curate.stats.records import (
    Record,
    _is_numeric,
    _is_text,
    dumps,
    mean,
    merge,
    merge_all,
    rejects_record,
    table_record,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMAT = "curate-stats/1"
STATS_DIR = "stats"
#: Rows read at a time from a Parquet file (memory stays bounded on big shards).
BATCH_ROWS = 65_536


# --- reading one file ----------------------------------------------------------------


@dataclass(frozen=True)
class FileJob:
    """One file to measure: what it is (``sink`` or ``rejects``), whose (sink or stage
    name), its format, and where its record goes."""

    kind: str
    name: str
    uri: str
    relpath: str
    shard_format: str
    target: str
    sha256: str
    facts: tuple[tuple[str, Any], ...] = ()
    full_reasons: bool = False


def _parquet_batches(uri: str, opts: StorageOptions, wanted: Sequence[str]) -> Iterator[pa.Table]:
    with storage.open_input(uri, opts) as handle:
        parquet = pq.ParquetFile(handle)
        names = [n for n in wanted if n in parquet.schema_arrow.names]
        if not names:
            yield _rows_only(parquet.metadata.num_rows)
            return
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=names):
            yield pa.Table.from_batches([batch])


def _sink_columns(uri: str, opts: StorageOptions) -> list[str]:
    """What a Parquet shard's record reads: text, numeric columns, lang, mix_component."""
    with storage.open_input(uri, opts) as handle:
        schema = pq.ParquetFile(handle).schema_arrow
    return [
        f.name
        for f in schema
        if _is_numeric(f.type) or (f.name in ("text", "lang", "mix_component") and _is_text(f.type))
    ]


def _scalar_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The scalar fields (numbers, strings) of JSON rows as a table; a field whose
    values do not share one type is left out."""
    names = sorted({k for r in rows for k, v in r.items() if _scalar(v)})
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        if not all(v is None or _scalar(v) for v in values):
            continue
        try:
            columns[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            continue
    return pa.table(columns) if columns else _rows_only(len(rows))


def _rows_only(n: int) -> pa.Table:
    """A table of ``n`` rows and no column a record measures (a null-typed one)."""
    return pa.table({"\0": pa.nulls(n)})


def _scalar(v: Any) -> bool:
    return isinstance(v, int | float | str) and not isinstance(v, bool)


def _tar_table(uri: str, opts: StorageOptions) -> pa.Table:
    """A tar written by a WebDataset sink as rows: the ``.json`` member's fields and
    the ``.txt`` member as ``text`` (an empty caption is a zero-byte member, which
    the source reader's scan would flag, so members are listed with ``tarfile``)."""
    import tarfile

    rows: dict[str, dict[str, Any]] = {}
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri, opts)), mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.rpartition("/")[2].partition(".")
            if not member.isfile() or ext not in ("json", "txt"):
                continue
            handle = tar.extractfile(member)
            data = handle.read() if handle is not None else b""
            row = rows.setdefault(key, {})
            if ext == "txt":
                row["text"] = data.decode("utf-8", "replace")
            else:
                row.update((k, v) for k, v in json.loads(data).items() if k != "text")
    return _scalar_table(list(rows.values()))


def _llava_table(uri: str, opts: StorageOptions) -> pa.Table:
    entries = json.loads(storage.read_bytes(uri, opts))
    rows = []
    for entry in entries:
        row = {k: v for k, v in entry.items() if k not in ("conversations", "image", "text")}
        row["text"] = "\n".join(str(t.get("value", "")) for t in entry.get("conversations") or [])
        rows.append(row)
    return _scalar_table(rows)


def file_record(job: FileJob, opts: StorageOptions) -> Record:
    """Measure one file; streams Parquet row groups and merges their records."""
    if job.kind == "rejects":
        batches = _parquet_batches(job.uri, opts, ["reason", "scores"])
        record = merge_all([rejects_record(b, job.full_reasons) for b in batches])
    elif job.shard_format == "webdataset":
        record = table_record(_tar_table(job.uri, opts))
    elif job.shard_format == "llava":
        record = table_record(_llava_table(job.uri, opts))
    else:
        wanted = _sink_columns(job.uri, opts)
        record = merge_all([table_record(b) for b in _parquet_batches(job.uri, opts, wanted)])
    return {**merge({"rows": 0}, record), **dict(job.facts), "files": 1}


def measure_file(job: FileJob, opts: StorageOptions) -> Record:
    """Measure one file and write its stats file (in a Ray task); return its record."""
    record = file_record(job, opts)
    head = {"format": FORMAT, "kind": job.kind, "name": job.name, "path": job.relpath}
    head["sha256"] = job.sha256
    atomic_write_bytes(job.target, dumps({**head, "stats": record}), opts)
    return record


# --- a run's stats -------------------------------------------------------------------


def _full_reasons(stage: Mapping[str, Any]) -> bool:
    """Whether a stage counts reasons in full (its manifest reasons carry rule names)."""
    return any(":" in r for r in stage.get("reasons", {}))


def stats_path(root: str, relpath: str) -> str:
    """``<sink>/part-1-0.parquet`` -> ``ROOT/stats/<sink>/part-1-0.json``."""
    stem = relpath.rsplit(".", 1)[0]
    return storage.join(root, STATS_DIR, *f"{stem}.json".split("/"))


def file_jobs(root: str, manifest: Mapping[str, Any]) -> list[FileJob]:
    """Every output shard and rejects file the manifest lists, as jobs."""
    sinks = manifest["pipeline"]["spec"]["sinks"]
    jobs = []
    for sink, files in manifest["outputs"].items():
        for f in files:
            jobs.append(_job("sink", sink, root, f, sinks[sink].get("format", "parquet")))
    full = {s["name"]: _full_reasons(s) for s in manifest["stages"]}
    for f in manifest["rejects"]["files"]:
        stage = f["path"].split("/")[1]
        jobs.append(_job("rejects", stage, root, f, "parquet", full.get(stage, False)))
    return jobs


def _job(
    kind: str, name: str, root: str, f: Mapping[str, Any], fmt: str, full: bool = False
) -> FileJob:
    facts = (("bytes", f["bytes"]),)
    uri = storage.join(root, *f["path"].split("/"))
    target = stats_path(root, f["path"])
    return FileJob(kind, name, uri, f["path"], fmt, target, f["sha256"], facts, full)


def write_run_stats(
    root: str, manifest: Mapping[str, Any], opts: StorageOptions = LOCAL, window: int = 0
) -> Record:
    """Measure every file of a finished run in Ray tasks, write the per-file stats and
    ``stats/summary.json``; return the summary.  Ray must be initialized.  At most
    ``window`` tasks (default: twice the cluster's CPUs) are in flight, and records
    are merged as they arrive: merging is exact, so the order does not matter."""
    import ray

    from curate.runner import cluster_resources

    task = ray.remote(num_cpus=1, max_retries=3)(measure_file)
    window = window or max(2, 2 * int(cluster_resources().get("CPU", 1)))
    totals: dict[tuple[str, str], Record] = {}
    pending: dict[Any, FileJob] = {}
    todo = iter(file_jobs(root, manifest))
    while True:
        for job in itertools.islice(todo, window - len(pending)):
            pending[task.remote(job, opts)] = job
        if not pending:
            break
        (ref,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ref)
        key = (job.kind, job.name)
        totals[key] = merge(totals.get(key, {}), ray.get(ref))
    summary = _summary(manifest, totals)
    atomic_write_bytes(storage.join(root, STATS_DIR, "summary.json"), dumps(summary), opts)
    return summary


def _summary(manifest: Mapping[str, Any], totals: Mapping[tuple[str, str], Record]) -> Record:
    """Per sink and per rejecting stage, the merged record (every sink, even empty)."""
    sinks = {s: totals.get(("sink", s), {"rows": 0, "files": 0}) for s in manifest["outputs"]}
    rejects = {name: r for (kind, name), r in sorted(totals.items()) if kind == "rejects"}
    return {"format": FORMAT, "sinks": sinks, "rejects": rejects}


# --- reading a run back --------------------------------------------------------------


def _read_json(uri: str, opts: StorageOptions) -> Any:
    return json.loads(storage.read_bytes(uri, opts))


def run_options(manifest: Mapping[str, Any], fallback: StorageOptions = LOCAL) -> StorageOptions:
    """The storage options the run was written with (its spec's ``storage.s3``)."""
    s3 = manifest["pipeline"]["spec"].get("storage", {}).get("s3")
    if not s3:
        return fallback
    from curate.config.model import StorageSpec

    return StorageSpec(s3=s3).options()


@dataclass(frozen=True)
class RunStats:
    """A finished run for analysis: its manifest, merged stats, per-file stats,
    rejects and plots.  Load with :meth:`load` (or :func:`curate.api.load_run`)."""

    root: str
    manifest: dict[str, Any]
    summary: dict[str, Any]
    opts: StorageOptions = LOCAL

    @classmethod
    def load(cls, root: str, opts: StorageOptions | None = None) -> RunStats:
        """Read ``root``'s manifest and ``stats/summary.json``; a run written before
        stats existed (no summary) is measured now, on the current or a local Ray."""
        root = root if storage.is_s3(root) else os.path.abspath(root)
        manifest = _read_json(storage.join(root, "manifest.json"), opts or LOCAL)
        opts = opts or run_options(manifest)
        path = storage.join(root, STATS_DIR, "summary.json")
        if storage.exists(path, opts):
            summary = _read_json(path, opts)
        else:
            from curate.api import init_ray

            init_ray(None, None)
            summary = write_run_stats(root, manifest, opts)
        return cls(root, manifest, summary, opts)

    # -- counts and stats --------------------------------------------------------------

    def stage(self, name: str) -> dict[str, Any]:
        """The manifest's row of one stage (rows in, kept, dropped, reasons, summary)."""
        return next(s for s in self.manifest["stages"] if s["name"] == name)

    def mix_stages(self) -> list[dict[str, Any]]:
        """Manifest rows of the mixing stages (their ``summary`` has ``components``)."""
        return [s for s in self.manifest["stages"] if "components" in s.get("summary", {})]

    def mixture_table(self) -> pa.Table:
        """Per mixing stage and component: its weight, target and achieved shares,
        rows, tokens, repetition and why a target was unmet (the manifest), and the
        rows and tokens of that component the sinks hold (``sink_rows``, ``sink_tokens``:
        the stats of the ``mix_component`` column)."""
        held = merge_all([r.get("mixture") or {} for r in self._sinks()])
        rows = []
        for stage in self.mix_stages():
            for name, comp in stage["summary"]["components"].items():
                row = {"stage": stage["name"], "component": name}
                row |= {f.name: comp.get(f.name) for f in MIX_SCHEMA if f.name in comp}
                row["sink_rows"] = held.get(name, {}).get("rows")
                row["sink_tokens"] = held.get(name, {}).get("tokens")
                rows.append(row)
        return pa.Table.from_pylist(rows, schema=MIX_SCHEMA)

    def kept(self, column: str) -> Record:
        """Column stats of ``column`` over every sink's rows (empty when absent)."""
        return merge_all([r.get("columns", {}).get(column) or {} for r in self._sinks()])

    def dropped(self, column: str, stage: str | None = None, reason: str | None = None) -> Record:
        """Column stats of ``column`` over dropped rows (its value when dropped), of one
        stage and one reason category or all."""
        parts = [
            entry.get("scores", {}).get(column) or {}
            for (_, _), entry in self.reason_entries(stage, reason)
        ]
        return merge_all(parts)

    def reason_entries(
        self, stage: str | None = None, reason: str | None = None
    ) -> list[tuple[tuple[str, str], Record]]:
        """``((stage, reason category), entry)`` of the rejects stats, in pipeline order."""
        order = [s["name"] for s in self.manifest["stages"]]
        out = []
        for name, record in sorted(
            self.summary["rejects"].items(), key=lambda kv: order.index(kv[0])
        ):
            if stage is not None and name != stage:
                continue
            for cat, entry in record.get("reasons", {}).items():
                if reason is None or cat == reason:
                    out.append(((name, cat), entry))
        return out

    def score_columns(self) -> list[str]:
        """Numeric columns seen in the outputs or in dropped rows' scores."""
        names = {c for r in self._sinks() for c in r.get("columns", {})}
        names |= {c for _, e in self.reason_entries() for c in e.get("scores", {})}
        return sorted(names)

    def _sinks(self) -> list[Record]:
        return list(self.summary["sinks"].values())

    # -- per-file stats and rejects ----------------------------------------------------

    def file_stats(self, kind: str | None = None) -> list[Record]:
        """Every per-file stats file (``kind``: ``sink`` or ``rejects``), in path order."""
        jobs = [j for j in file_jobs(self.root, self.manifest) if kind in (None, j.kind)]
        read = functools.partial(_read_json, opts=self.opts)
        with ThreadPoolExecutor(max_workers=16) as pool:
            return list(pool.map(read, [j.target for j in jobs]))

    def shard_table(self, kind: str | None = "sink") -> pa.Table:
        """One row per file: kind, name, path, rows, bytes, tokens, text rows, chars
        and words (sums), and the mean text length in characters."""
        rows = []
        for f in self.file_stats(kind):
            s, text = f["stats"], f["stats"].get("text", {})
            chars = text.get("chars", {})
            rows.append(
                {
                    "kind": f["kind"],
                    "name": f["name"],
                    "path": f["path"],
                    "rows": s["rows"],
                    "bytes": s.get("bytes"),
                    "tokens": s.get("tokens"),
                    "text_rows": text.get("rows"),
                    "chars": chars.get("sum"),
                    "words": text.get("words", {}).get("sum"),
                    "mean_chars": mean(chars) if chars else None,
                }
            )
        return pa.Table.from_pylist(rows, schema=SHARD_SCHEMA)

    def rejects(
        self,
        stage: str | None = None,
        reason: str | None = None,
        limit: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """Rejected rows of one stage (or all) and one reason category (or all), up to
        ``limit`` rows: files are read one at a time until enough are found."""
        tables, found = [], 0
        for f in self.manifest["rejects"]["files"]:
            if stage is not None and f["path"].split("/")[1] != stage:
                continue
            uri = storage.join(self.root, *f["path"].split("/"))
            table = read_parquet(uri, self.opts, list(columns) if columns else None)
            if reason is not None:
                split = pc.split_pattern(table.column("reason"), ":", max_splits=1)
                table = table.filter(pc.equal(pc.list_element(split, 0), reason))
            tables.append(table)
            found += table.num_rows
            if limit is not None and found >= limit:
                break
        if not tables:
            return _empty_rejects(columns)
        out = pa.concat_tables(tables)
        return out.slice(0, limit) if limit is not None else out

    # -- plots -------------------------------------------------------------------------

    def plot_funnel(self) -> Figure:
        from curate.stats.plots import plot_funnel

        return plot_funnel(self.manifest)

    def plot_scores(self, column: str, log: bool | None = None) -> Figure:
        from curate.stats.plots import plot_scores

        return plot_scores(self, column, log)

    def plot_mixture(self) -> Figure | None:
        from curate.stats.plots import plot_mixture

        return plot_mixture(self.manifest)

    def write_plots(self, folder: str | None = None) -> list[str]:
        from curate.stats.plots import write_plots

        return write_plots(self, folder)


SHARD_SCHEMA = pa.schema(
    [
        ("kind", pa.string()),
        ("name", pa.string()),
        ("path", pa.string()),
        ("rows", pa.int64()),
        ("bytes", pa.int64()),
        ("tokens", pa.int64()),
        ("text_rows", pa.int64()),
        ("chars", pa.int64()),
        ("words", pa.int64()),
        ("mean_chars", pa.float64()),
    ]
)


MIX_SCHEMA = pa.schema(
    [
        ("stage", pa.string()),
        ("component", pa.string()),
        ("weight", pa.float64()),
        ("target_share", pa.float64()),
        ("share_tokens", pa.float64()),
        ("share_rows", pa.float64()),
        ("target_tokens", pa.int64()),
        ("target_rows", pa.int64()),
        ("available_rows", pa.int64()),
        ("available_tokens", pa.int64()),
        ("max_epochs", pa.float64()),
        ("rows", pa.int64()),
        ("tokens", pa.int64()),
        ("repetition", pa.float64()),
        ("unmet", pa.string()),
        ("sink_rows", pa.int64()),
        ("sink_tokens", pa.int64()),
    ]
)


def _empty_rejects(columns: Sequence[str] | None) -> pa.Table:
    from curate.io.readers import REJECT_SCHEMA

    table = REJECT_SCHEMA.empty_table()
    return table.select(list(columns)) if columns else table
