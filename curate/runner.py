"""Run a checked plan on Ray Data.

Each segment is one Ray Data pass.  A custom datasource yields exactly one
block per unit of work (``override_num_blocks`` = number of units, block
splitting disabled), every fused group of map stages is a ``map_batches``
over an actor pool with ``batch_size=None`` (one call per unit, so the unit
stays whole), and the last step writes the unit's output and returns its
reports.  Ray Data streams blocks between operators with backpressure.

A global stage runs between segments: its ``plan`` turns the key columns of
its materialized input into decisions (Ray Data map / groupby / reduce), which
are written per unit; the next segment applies them while reading the unit.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from curate.config.model import (
    DEFAULT_ISOLATE_AFTER,
    DEFAULT_MAX_ERRORS,
    BoundStage,
    ExecutionSpec,
    SinkSpec,
    SourceSpec,
)
from curate.dag import Plan, Segment
from curate.io import storage
from curate.io.files import Unit, WrittenFile, plan_units, write_parquet_atomic
from curate.io.layout import Layout
from curate.io.readers import REJECT_SCHEMA, read_unit
from curate.io.sink import write_llava_sink, write_sink, write_webdataset_sink
from curate.io.storage import LOCAL
from curate.lineage.accounting import (
    AccountingError,
    build_rejects,
    reports_of,
    split_by_mask,
    stage_report,
    with_reports,
    write_rejects,
)
from curate.lineage.cache import (
    ancestors,
    chain_key,
    entry_root,
    import_entry,
    load_entry,
    report_key,
    save_entry,
)
from curate.lineage.commits import (
    commit_global,
    committed_units,
    global_done,
    global_reports,
    global_summary,
    write_commit,
)
from curate.lineage.quarantine import NEVER_QUARANTINED, OnError, Quarantine, error_reason
from curate.progress import Listener, Progress
from curate.registry import get_stage_class, load_plugins, plugin_locations
from curate.sandbox import Sandbox, begin_attempt, clear_attempts
from curate.shuffle import concat, group_starts, hash_shuffle, split
from curate.stage import (
    DECISION_SCHEMA,
    POS,
    RESERVED_COLUMNS,
    UNIT,
    Annotator,
    Fill,
    Filter,
    Generator,
    GlobalStage,
    Reshuffle,
    Resources,
    Stage,
    StageContext,
    decision_schema,
    set_column,
)

log = logging.getLogger(__name__)


class ResourceError(RuntimeError):
    """A stage asks for more than any node of the cluster has."""


class UnitKeepsDyingError(RuntimeError):
    """A unit's worker died on every attempt, isolated ones included."""


#: Attempts at a unit in isolation before the run fails (each one's worker died).
ISOLATED_ATTEMPTS = 3


def cluster_resources() -> dict[str, float]:
    """Total resources of the connected Ray cluster."""
    return dict(ray.cluster_resources())  # type: ignore[no-untyped-call]


def cluster_gpus() -> float:
    """GPUs the connected cluster has, or can get when it autoscales: the most of
    the live nodes' total and what its autoscaler's node types may add up to (so
    ``num_gpus: auto`` means a GPU on a cluster whose GPU nodes start on demand)."""
    live = float(cluster_resources().get("GPU", 0.0))
    try:
        from ray._private.state import state

        possible = (state.get_max_resources_from_cluster_config() or {}).get("GPU", 0)
    except Exception:  # a private API: without it, live nodes only
        possible = 0
    return max(live, float(possible))


def ray_version() -> str:
    return str(ray.__version__)


def live_nodes() -> list[dict[str, Any]]:
    """Ray's description of every live node of the connected cluster."""
    nodes = ray.nodes()  # type: ignore[no-untyped-call]
    return [n for n in nodes if n.get("Alive")]


def node_resources() -> list[dict[str, float]]:
    """Resources of every live node of the connected Ray cluster."""
    return [dict(n.get("Resources", {})) for n in live_nodes()]


@dataclass(frozen=True)
class UnitRead:
    """How to produce one unit's block: from a source, or from a materialized node."""

    unit: Unit
    source_spec: SourceSpec | None = None
    #: For a source: its extra columns and their types, the same for every unit.
    expected: dict[str, pa.DataType] | None = None
    node: str | None = None
    apply: str | None = None
    #: For ``apply``: the columns the global stage adds, their types and fills.
    annotate: tuple[tuple[str, pa.DataType, Fill], ...] = ()
    #: For ``apply``: whether its drop reasons are counted in full (``reason_details``).
    details: bool = False
    columns: tuple[str, ...] | None = None
    #: For a union of inputs: the schema every unit is conformed to.
    conform: dict[str, pa.DataType] | None = None


def load_unit(task: UnitRead, layout: Layout) -> pa.Table:
    """Read one unit, quarantining bad rows and applying a global stage's decisions.

    Key-column reads for a global stage (``task.columns``) carry no trailer.
    """
    start = time.perf_counter()
    table = _load_rows(task, layout, start)
    return table if task.columns else with_trailer(table, task.unit.index)


def _load_rows(task: UnitRead, layout: Layout, start: float) -> pa.Table:
    if task.source_spec is not None:
        table, rejects, inputs = read_unit(task.unit, task.source_spec, task.expected, layout.opts)
        written = write_rejects(
            layout.rejects(task.unit.source, task.unit.index), rejects, layout.opts
        )
        reports = [{"kind": "input", **vars(i)} for i in inputs]
        rows_in = table.num_rows + rejects.num_rows
        reports.append(
            {
                **stage_report(
                    task.unit.source,
                    task.unit.index,
                    rows_in,
                    rejects,
                    time.perf_counter() - start,
                    written,
                ),
                "kind": "source",
            }
        )
        return with_reports(table, reports)
    assert task.node is not None
    columns = list(task.columns) if task.columns else None
    table = layout.read_table(layout.work(task.node, task.unit.index), columns)
    if task.conform is not None and columns is None:
        table = conform(table, task.conform)
    if task.apply is None:
        return table
    return _apply_decisions(table, task, layout, start)


def conform(table: pa.Table, schema: dict[str, pa.DataType]) -> pa.Table:
    """``table`` with exactly the columns of ``schema`` (missing ones null), then the
    internal columns: units of different inputs of a union share one schema."""
    n = table.num_rows
    columns = {
        c: table.column(c) if c in table.column_names else pa.nulls(n, kind)
        for c, kind in schema.items()
    }
    columns[UNIT] = table.column(UNIT)
    columns[POS] = table.column(POS)
    return pa.table(columns)


def _apply_decisions(table: pa.Table, task: UnitRead, layout: Layout, start: float) -> pa.Table:
    stage, unit = task.apply, task.unit.index
    assert stage is not None
    path = layout.decisions(stage, unit)
    schema = pa.schema([*DECISION_SCHEMA, *(pa.field(c, kind) for c, kind, _ in task.annotate)])
    decisions = layout.read_table(path) if layout.exists(path) else schema.empty_table()
    drops = decisions.filter(pc.is_valid(decisions.column("reason")))
    positions = table.column(POS).to_numpy()
    keep = ~np.isin(positions, drops.column(POS).to_numpy())
    named = np.isin(decisions.column(POS).to_numpy(), positions)
    if int((~keep).sum()) != drops.num_rows or not named.all():
        raise AccountingError(f"{stage}: decisions for unit {unit} name rows that do not exist")
    kept, dropped = split_by_mask(table, keep)
    order = pc.index_in(dropped.column(POS), drops.column(POS))
    rejects = build_rejects(
        stage,
        dropped,
        pc.take(drops.column("reason"), order),
        pc.take(drops.column("value"), order),
    )
    written = write_rejects(layout.rejects(stage, unit), rejects, layout.opts)
    seconds = time.perf_counter() - start
    report = stage_report(
        stage, unit, table.num_rows, rejects, seconds, written, details=task.details
    )
    if task.annotate:
        kept = _annotate(kept, decisions, task.annotate)
    return with_reports(kept, [report])


def _annotate(
    kept: pa.Table, decisions: pa.Table, annotate: tuple[tuple[str, pa.DataType, Fill], ...]
) -> pa.Table:
    """Add a global stage's columns to the kept rows: from the decision naming the row,
    else from the stage's fill."""
    where = pc.index_in(kept.column(POS), decisions.column(POS))
    found = pc.is_valid(where)
    for name, kind, fill in annotate:
        if fill.column is not None:
            default = pc.cast(kept.column(fill.column), kind)
        else:
            default = pa.array([fill.value] * kept.num_rows, kind)
        column = default
        if decisions.num_rows:
            value = pc.take(decisions.column(name), pc.fill_null(where, 0))
            column = pc.if_else(found, value, default)
        if name in kept.column_names:
            kept = kept.set_column(kept.column_names.index(name), name, column)
        else:
            kept = kept.append_column(pa.field(name, kind), column)
    return kept


class UnitDatasource(Datasource):
    """One read task and one block per unit, in unit order."""

    def __init__(self, reads: Sequence[UnitRead], layout: Layout) -> None:
        self.reads = list(reads)
        self.layout = layout

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(
        self,
        parallelism: int,
        per_task_row_limit: int | None = None,
        data_context: ray.data.DataContext | None = None,
    ) -> list[ReadTask]:
        tasks = []
        for read in self.reads:
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(_reader(read, self.layout), meta))
        return tasks


def _reader(read: UnitRead, layout: Layout) -> Any:
    def fn() -> Iterable[pa.Table]:
        yield load_unit(read, layout)

    return fn


TRAILER_POS = -1


def with_trailer(table: pa.Table, unit: int) -> pa.Table:
    """Append the unit's trailer row: all nulls but ``_unit`` and ``_pos = -1``.

    Ray Data turns an empty block into a schemaless one and passes it by the
    later operators, which would lose a unit whose rows were all dropped, with
    its reports.  The trailer keeps every unit block non-empty; stages never
    see it (:func:`split_trailer`), and writers drop it.
    """
    columns = {f.name: pa.nulls(1, f.type) for f in table.schema if f.name not in (UNIT, POS)}
    columns[UNIT] = pa.array([unit], pa.int64())
    columns[POS] = pa.array([TRAILER_POS], pa.int64())
    trailer = pa.table(columns, schema=table.schema.remove_metadata())
    return pa.concat_tables([table.replace_schema_metadata(None), trailer]).replace_schema_metadata(
        table.schema.metadata
    )


def split_trailer(block: pa.Table) -> tuple[pa.Table, int, list[dict[str, Any]]]:
    """Live rows (without metadata), the unit, and the reports carried so far."""
    pos = block.column(POS).to_numpy()
    if block.num_rows == 0 or pos[-1] != TRAILER_POS or (pos[:-1] < 0).any():
        raise AccountingError("a unit block lost its trailer row: unit integrity broken")
    units = pc.unique(block.column(UNIT)).to_pylist()
    if len(units) != 1:
        raise AccountingError(f"a block holds rows of several units {units}: unit integrity lost")
    reports = reports_of(block)
    live = block.slice(0, block.num_rows - 1).replace_schema_metadata(None)
    return live, int(units[0]), reports


def run_stage(
    name: str,
    stage: Stage,
    batch_size: int | None,
    unit: int,
    layout: Layout,
    block: pa.Table,
    on_error: OnError,
    sandbox: Sandbox | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """Run one map stage on a unit's rows; write its rejects; return kept rows and report.

    A batch whose call raises is run again by halves, and a row that raises alone is
    quarantined with ``on_error.reason`` (:mod:`curate.lineage.quarantine`); a batch
    that does not raise costs nothing more than the call.  With a ``sandbox`` the calls
    and counters are its process's (:mod:`curate.sandbox`), where a part that kills the
    process is searched like one that raises.
    """
    call = sandbox if sandbox is not None else functools.partial(_run_one, name, stage)
    counters = sandbox.counters if sandbox is not None else stage.counters
    run_counters = sandbox.run_counters if sandbox is not None else stage.run_counters
    start = time.perf_counter()
    rows_in = block.num_rows
    slices = (
        [block]
        if not batch_size
        else [block.slice(i, batch_size) for i in range(0, max(rows_in, 1), batch_size)]
    )
    kept_parts: list[pa.Table] = []
    reject_parts: list[pa.Table] = []
    before = (dict(counters()), dict(run_counters()))
    quarantine: Quarantine | None = None
    for i, part in enumerate(slices):
        mark = dict(counters()) if i else before[0]
        try:
            kept, rejects = call(part)
        except NEVER_QUARANTINED:
            raise  # a broken contract of the stage or a broken sandbox, not a poisoned row
        except Exception as exc:
            error = exc  # searched outside the handler: no chained contexts
        else:
            kept_parts.append(kept)
            reject_parts.append(rejects)
            continue
        if quarantine is None:
            quarantine = Quarantine(
                name,
                on_error.reason,
                unit,
                rows_in,
                on_error.max_errors,
                call,
                counters,
            )
        quarantine.recover(part, error, mark, kept_parts, reject_parts)
    if quarantine is None:
        kept = pa.concat_tables(kept_parts)
        rejects = pa.concat_tables(reject_parts)
    else:  # halves may type an all-null column differently; every row may be gone
        kept = (
            pa.concat_tables(kept_parts, promote_options="default")
            if kept_parts
            else block.slice(0, 0)
        )
        rejects = pa.concat_tables(reject_parts) if reject_parts else REJECT_SCHEMA.empty_table()
    rows_out = None
    if isinstance(stage, Generator):  # new rows: positions in the unit start again at 0
        kept = set_column(kept, POS, pa.array(np.arange(kept.num_rows, dtype=np.int64)))
        rows_out = kept.num_rows
    written = write_rejects(layout.rejects(name, unit), rejects, layout.opts)
    seconds = time.perf_counter() - start
    report = stage_report(
        name,
        unit,
        rows_in,
        rejects,
        seconds,
        written,
        details=stage.reason_details,
        rows_out=rows_out,
        full=(on_error.reason,),
    )
    # Deterministic counters leave out what calls that raised counted (their rows
    # were counted again by the calls on their halves, see Quarantine.wasted);
    # run counters keep all the work done.
    wasted: dict[str, int] = dict(quarantine.wasted) if quarantine is not None else {}
    for key, now, then, less in (
        ("counters", counters(), before[0], wasted),
        ("run_counters", run_counters(), before[1], {}),
    ):
        grown = {k: v - then.get(k, 0) - less.get(k, 0) for k, v in sorted(now.items())}
        grown = {k: v for k, v in grown.items() if v}
        if grown:
            report[key] = grown
    return kept, report


def _run_one(name: str, stage: Stage, part: pa.Table) -> tuple[pa.Table, pa.Table]:
    if isinstance(stage, Annotator):
        out = stage.process_batch(part)
        if out.num_rows != part.num_rows:
            raise AccountingError(
                f"annotator {name!r} changed the row count {part.num_rows} -> {out.num_rows}"
            )
        return out, REJECT_SCHEMA.empty_table()
    if isinstance(stage, Filter):
        verdict = stage.decide(part)
        if len(verdict.keep) != part.num_rows:
            raise AccountingError(
                f"filter {name!r} decided {len(verdict.keep)} of {part.num_rows} rows"
            )
        source = part
        if verdict.batch is not None:
            if verdict.batch.num_rows != part.num_rows:
                raise AccountingError(
                    f"filter {name!r} returned {verdict.batch.num_rows} of {part.num_rows} rows"
                )
            source = verdict.batch
        kept, dropped = split_by_mask(source, verdict.keep)
        drop_mask = pa.array(~verdict.keep)
        value = verdict.value.filter(drop_mask) if verdict.value is not None else None
        return kept, build_rejects(name, dropped, verdict.reason.filter(drop_mask), value)
    if isinstance(stage, Generator):
        return _generate(name, stage, part)
    raise TypeError(f"stage {name!r} of kind {stage.kind!r} cannot run as a map stage")


def _generate(name: str, stage: Generator, part: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A generator's new rows (with ids, ``seed_id``, provenance) and dropped seeds."""
    out = stage.generate(part)
    n = part.num_rows
    seed = np.asarray(out.seed, dtype=np.int64)
    if len(out.reason) != n or out.rows.num_rows != len(seed):
        raise AccountingError(
            f"generator {name!r} answered for {len(out.reason)} of {n} seeds, "
            f"or for {len(seed)} seeds of its {out.rows.num_rows} rows"
        )
    if len(seed) and (seed[0] < 0 or seed[-1] >= n or (np.diff(seed) < 0).any()):
        raise AccountingError(f"generator {name!r}: seed indexes out of range or order")
    produced = np.bincount(seed, minlength=n) > 0
    if not np.array_equal(produced, np.asarray(pc.is_null(out.reason))):
        raise AccountingError(
            f"generator {name!r}: a seed must give rows or a reason, not both or neither"
        )
    rows = out.rows
    take = pa.array(seed)
    seed_ids = part.column("id").take(take).to_pylist()
    starts = np.searchsorted(seed, seed)  # each row's rank among its seed's rows
    ids = [f"{s}/{name}/{k}" for s, k in zip(seed_ids, np.arange(len(seed)) - starts, strict=True)]
    for column, values in (
        ("id", pa.array(ids, pa.string())),
        ("seed_id", pa.array(seed_ids, pa.string())),
        ("source", part.column("source").take(take)),
        ("provenance", part.column("provenance").take(take)),
        (UNIT, part.column(UNIT).take(take)),
        (POS, part.column(POS).take(take)),
    ):
        rows = set_column(rows, column, values)
    dropped = pa.array(~produced)
    value = out.value.filter(dropped) if out.value is not None else None
    rejects = build_rejects(name, part.filter(dropped), out.reason.filter(dropped), value)
    return rows, rejects


@dataclass(frozen=True)
class Target:
    """Where a segment's rows go: a sink, or the work folder (materialize)."""

    kind: str
    name: str
    sink: SinkSpec | None
    shard_bytes: int
    #: For ``materialize``: the node's planned columns, given to an emptied unit.
    columns: dict[str, pa.DataType] | None = None


def write_targets(
    block: pa.Table,
    unit: int,
    targets: Sequence[Target],
    layout: Layout,
    reports: list[dict[str, Any]],
    segment: int,
) -> pa.Table:
    """Write a unit to every target, then commit it; return its reports as one row."""
    block = block.replace_schema_metadata(None)
    for target in targets:
        if target.kind == "materialize":
            # An emptied unit skipped its later stages: give its file the node's full schema.
            table = block if block.num_rows else conform(block, target.columns or {})
            f = write_parquet_atomic(table, layout.work(target.name, unit), "zstd", layout.opts)
            reports.append(_file_report("work", target.name, unit, f))
            continue
        assert target.sink is not None
        sink = target.sink
        if sink.format in ("webdataset", "llava"):
            writer = write_webdataset_sink if sink.format == "webdataset" else write_llava_sink
            files, extra = writer(
                block,
                layout,
                target.name,
                unit,
                target.shard_bytes,
                sink.shard_samples,
                sink.columns,
            )
            if isinstance(extra, WrittenFile):  # a WebDataset sink's key index
                reports.append(_file_report("index", target.name, unit, extra))
            elif extra is not None:  # a llava sink's images: files, not rows
                reports.append(extra)
        else:
            files = write_sink(
                block, layout, target.name, unit, target.shard_bytes, sink.compression, sink.columns
            )
        reports.extend(_file_report("output", target.name, unit, f) for f in files)
    write_commit(layout, segment, unit, reports)
    return pa.table({"unit": [unit], "reports": [json.dumps(reports)]})


def _file_report(kind: str, name: str, unit: int, f: WrittenFile) -> dict[str, Any]:
    return {
        "kind": kind,
        "sink": name,
        "unit": unit,
        "path": f.path,
        "rows": f.rows,
        "bytes": f.bytes,
        "sha256": f.sha256,
    }


@dataclass(frozen=True)
class StageRef:
    """A bound stage as plain data: type name and JSON parameters."""

    name: str
    type: str
    params: dict[str, Any]
    batch_size: int | None
    #: Absolute folder the stage's relative paths (models) are resolved against.
    base_dir: str = "."
    #: ``execution.max_errors``: rows of a unit the stage may quarantine for raising.
    max_errors: int | str = DEFAULT_MAX_ERRORS

    @classmethod
    def of(
        cls, bound: BoundStage, base_dir: str = ".", max_errors: int | str = DEFAULT_MAX_ERRORS
    ) -> StageRef:
        params = bound.config.model_dump(mode="json", by_alias=True)
        return cls(bound.name, bound.type, params, bound.resources.batch_size, base_dir, max_errors)

    def on_error(self) -> OnError:
        """What the stage's exception on a row makes of the row (a ``<type>:error``
        reject) and how many such rows of a unit the run tolerates."""
        return OnError(error_reason(self.type), self.max_errors)

    def build(self, seed: int, layout: Layout | None = None) -> Stage:
        stage_cls = get_stage_class(self.type)
        config = stage_cls.Config.model_validate(self.params)
        context = StageContext(
            name=self.name,
            seed=seed,
            base_dir=self.base_dir,
            state_dir=layout.state(self.name) if layout is not None else None,
            storage=layout.opts if layout is not None else LOCAL,
        )
        return stage_cls(config, context)


class StageGroup:
    """A fused chain of map stages in one actor; the last group also writes."""

    def __init__(
        self,
        stages: list[StageRef],
        seed: int,
        layout: Layout,
        targets: list[Target],
        segment: int,
        plugins: list[tuple[str, str | None]],
        isolate_after: int = DEFAULT_ISOLATE_AFTER,
    ) -> None:
        # Plugin classes cannot travel pickled (a fresh worker may not import their
        # module before unpickling), so stages travel as plain data and are rebuilt here.
        load_plugins(plugins)
        self.stages = [
            (ref.name, ref.build(seed, layout), ref.batch_size, ref.on_error()) for ref in stages
        ]
        self.refs = stages
        self.seed = seed
        self.plugins = plugins
        self.layout = layout
        self.targets = targets
        self.segment = segment
        #: Earlier attempts at a unit that put it in isolation (``execution.isolate_after``).
        self.isolate_after = isolate_after
        #: A stage's setup error (a bad model or eval file), raised by the first call:
        #: Ray reports a failed actor constructor as a bare ActorDiedError, a failed
        #: call as the original exception, which the CLI can show as it is.
        self.setup_error: Exception | None = None
        try:
            for _, stage, _, _ in self.stages:
                stage.setup()
        except Exception as exc:
            self.setup_error = exc

    def __call__(self, block: pa.Table) -> pa.Table:
        if self.setup_error is not None:
            raise self.setup_error
        live, unit, reports = split_trailer(block)
        isolated = self._isolated(unit)
        for (name, stage, batch_size, on_error), ref in zip(self.stages, self.refs, strict=True):
            if live.num_rows == 0:
                break  # nothing left to do; the writer gives the unit its full schema
            sandbox = Sandbox(ref, self.seed, self.layout, self.plugins) if isolated else None
            try:
                live, report = run_stage(
                    name, stage, batch_size, unit, self.layout, live, on_error, sandbox
                )
            finally:
                if sandbox is not None:
                    sandbox.close()
            reports.append(report)
        if self.targets:
            return write_targets(live, unit, self.targets, self.layout, reports, self.segment)
        return with_reports(with_trailer(live, unit), reports)

    def _isolated(self, unit: int) -> bool:
        """Record this attempt at ``unit``; whether the attempts before it (which never
        finished: their process or node died) send it to isolation (:mod:`curate.sandbox`)."""
        group = self.stages[0][0]
        earlier = begin_attempt(self.layout, self.segment, group, unit)
        if earlier < self.isolate_after:
            return False
        if earlier >= self.isolate_after + ISOLATED_ATTEMPTS:
            # Even isolated, the unit's worker died each time (its read or writer, Ray's
            # memory monitor, a node lost again and again): fail, rather than loop forever.
            raise UnitKeepsDyingError(
                f"stage group {'+'.join(n for n, *_ in self.stages)}, unit {unit}: started "
                f"{earlier + 1} times and never finished, {ISOLATED_ATTEMPTS} of them with "
                "its stages in a sandbox process; its worker dies outside the stages (the "
                "read, the writer, out of memory): see the nodes' logs, then --resume"
            )
        log.log(
            logging.WARNING if earlier else logging.INFO,
            "stage group %s, unit %d: %d earlier attempt(s) never finished; running its "
            "stages in a sandbox process, where rows that kill the process are quarantined",
            "+".join(name for name, *_ in self.stages),
            unit,
            earlier,
        )
        return True


def unit_rows(batches: Iterable[pa.Table], units: Sequence[int]) -> Iterator[list[dict[str, Any]]]:
    """Each of ``units``' reports exactly once, from the rows (one per finished unit)
    that a segment's dataset yields.

    Ray runs a unit again when the node of its actor or task dies (the rerun rewrites
    the same files with the same bytes), and hands a task's output over once, so no unit
    should come twice; should one still, its first row counts (another attempt's differs
    in timings only), so that nothing is counted twice.  A unit that never comes is an
    error, not a silently short run."""
    wanted, seen = set(units), set()
    for batch in batches:
        for row in batch.select(["unit", "reports"]).to_pylist():
            unit = row["unit"]
            if unit not in wanted:
                raise AccountingError(f"a finished unit {unit} that this pass did not run")
            if unit not in seen:
                seen.add(unit)
                yield json.loads(row["reports"])
    if seen != wanted:
        missing = sorted(wanted - seen)
        raise AccountingError(f"{len(missing)} unit(s) never finished, e.g. {missing[:5]}")


def _write_only(block: pa.Table, targets: list[Target], layout: Layout, segment: int) -> pa.Table:
    live, unit, reports = split_trailer(block)
    return write_targets(live, unit, targets, layout, reports, segment)


class Runner:
    """Executes a :class:`Plan` into an output folder on the current Ray cluster."""

    def __init__(
        self,
        plan: Plan,
        output: str,
        resume: bool = False,
        cache_dir: str | None = None,
        listener: Listener | None = None,
    ) -> None:
        self.plan = plan
        self.execution: ExecutionSpec = plan.pipeline.spec.execution
        opts = plan.pipeline.spec.storage.options()
        root = output if storage.is_s3(output) else os.path.abspath(output)
        self.cache_dir = cache_dir or storage.join(root, "_cache")
        #: Cached nodes: their key and their entry in the stage cache.
        self.units = self._plan_units()
        self._plan_reshuffled_units()
        layout = {
            name: [[u.index, [s.uri for s in u.shards]] for u in units]
            for name, units in self.units.items()
        }
        self.cached = {
            node: chain_key(plan, node, layout)
            for node in sorted(plan.materialized)
            if node in plan.pipeline.stages and plan.pipeline.stages[node].cache
        }
        entries = {n: entry_root(self.cache_dir, n, k) for n, k in self.cached.items()}
        self.layout = Layout(root, opts, entries)
        self.resume = resume
        self.progress = Progress(root, opts, listener)
        self.reports: list[dict[str, Any]] = []
        self.imported: list[dict[str, Any]] = []
        self.reused: list[str] = []
        self.global_seconds: dict[str, float] = {}
        self.global_summaries: dict[str, dict[str, Any]] = {}
        self.global_phases: dict[str, dict[str, float]] = {}
        self._sizes: dict[str, int] | None = None

    def _plan_units(self) -> dict[str, list[Unit]]:
        units: dict[str, list[Unit]] = {}
        first = 0
        for name in self.plan.pipeline.spec.sources:
            units[name] = plan_units(
                name, self.plan.shards[name], int(self.execution.unit_bytes), first
            )
            first += len(units[name])
        return units

    def _plan_reshuffled_units(self) -> None:
        """Units of every reshuffling stage's output, numbered after the sources' (and
        earlier reshufflers') units, in pipeline order."""
        first = sum(len(u) for u in self.units.values())
        rank = {n: i for i, n in enumerate(self.plan.pipeline.stages)}
        for name in sorted(self.plan.reshuffled, key=lambda n: rank[n]):
            for parent in self._reshuffled_ancestors(name):
                first = self._plan_reshuffle(parent, first)
            first = self._plan_reshuffle(name, first)

    def _reshuffled_ancestors(self, name: str) -> list[str]:
        found: list[str] = []
        for parent in self.plan.pipeline.stages[name].inputs:
            if parent in self.plan.pipeline.stages:
                found.extend(self._reshuffled_ancestors(parent))
                if parent in self.plan.reshuffled:
                    found.append(parent)
        return found

    def _plan_reshuffle(self, name: str, first: int) -> int:
        if name in self.units:
            return first
        stage = self.plan.stages[name]
        assert isinstance(stage, Reshuffle)
        inputs = self.plan.pipeline.stages[name].inputs
        n_in = len({u.index for p in inputs for u in self.node_units(p)})
        n_out = stage.output_units(n_in)
        self.units[name] = [Unit(first + k, name, ()) for k in range(n_out)]
        return first + n_out

    def node_units(self, node: str) -> list[Unit]:
        if node in self.units:
            return self.units[node]
        found = {
            u.index: u
            for parent in self.plan.pipeline.stages[node].inputs
            for u in self.node_units(parent)
        }
        return [found[i] for i in sorted(found)]

    def check_resources(self) -> None:
        """Fail now, not hang later, when no node the cluster has or can start (its
        autoscaler's node types) can hold one actor of a stage."""
        from curate.placement import shapes_from_ray, unplaceable

        stages = {name: b.resources for name, b in self.plan.pipeline.stages.items()}
        problems = unplaceable(stages, shapes_from_ray())
        if problems:
            raise ResourceError("; ".join(problems))

    def run(self) -> None:
        self.check_resources()
        context = ray.data.DataContext.get_current()
        context.target_max_block_size = None
        # A stage's own error (a bad eval file, a broken row the stage cannot take)
        # reaches the driver as itself, not as Ray Data's UserCodeException.
        context.raise_original_map_exception = True
        # Attempts of an earlier driver (stopped or killed: --resume) are no crashes.
        clear_attempts(self.layout)
        self._reuse_cached()
        needed = self._needed_segments()
        self.progress.plan(len(needed))
        try:
            for segment in self.plan.segments:
                if segment.index in needed:
                    self._run_needed(segment)
        except BaseException:
            self.progress.finish(ok=False)
            raise
        self._clear_stale()
        self.reports = self._all_reports()
        self.progress.finish()

    def _clear_stale(self) -> None:
        """Clear what attempts killed with their node left in the output: hidden
        temporary files on disk, pending multipart uploads on S3.  Ray ran those units
        again and every unit is committed now, so no writer of this run is left.  The
        markers of attempts at units (:func:`curate.sandbox.begin_attempt`) go too."""
        storage.abort_stale(self.layout.root, self.layout.opts)
        clear_attempts(self.layout)

    def _run_needed(self, segment: Segment) -> None:
        for node in segment.inputs:
            if node in self.plan.reshuffled:
                self._run_reshuffle(node)
        if segment.apply is not None:
            self._run_global(segment.apply)
        self._run_segment(segment)
        self._save_cached(segment)

    def _all_reports(self) -> list[dict[str, Any]]:
        """This run's reports and the imported ones, each (stage, unit) once."""
        produced = {report_key(r) for r in self.reports}
        return [*self.reports, *(r for r in self.imported if report_key(r) not in produced)]

    def cache_info(self) -> dict[str, Any]:
        """For the manifest: each cached stage, its key, and whether this run reused it."""
        return {
            "dir": self.cache_dir,
            "stages": {n: {"key": k, "reused": n in self.reused} for n, k in self.cached.items()},
        }

    def _reuse_cached(self) -> None:
        for node, key in self.cached.items():
            root = self.layout.work_roots[node]
            reports = load_entry(self.layout, root, key)
            if reports is None:
                continue
            known = {report_key(r) for r in self.imported}
            fresh = [r for r in reports if report_key(r) not in known]
            self.imported.extend(import_entry(self.layout, root, fresh))
            self.reused.append(node)
            self.plan.materialized_done.add(node)

    def _needed_segments(self) -> set[int]:
        """Segments to run: those writing a sink, and those producing a materialized node
        that a needed segment reads, unless the stage cache already holds it."""
        needed: set[int] = set()
        demand: set[str] = set()
        for segment in reversed(self.plan.segments):
            targets = segment.targets
            if all(k == "materialize" and n in self.reused for k, n in targets):
                continue
            if not any(k == "sink" or n in demand for k, n in targets):
                continue
            needed.add(segment.index)
            demand.update(segment.inputs)
            for node in segment.inputs:
                if node in self.plan.reshuffled:
                    demand.update(self.plan.pipeline.stages[node].inputs)
            if segment.apply is not None:
                demand.update(self.plan.pipeline.stages[segment.apply].inputs)
        return needed

    def _save_cached(self, segment: Segment) -> None:
        for kind, node in segment.targets:
            if kind == "materialize" and node in self.cached:
                names = ancestors(self.plan.pipeline, node)
                root = self.layout.work_roots[node]
                reports = self._all_reports()
                save_entry(self.layout, root, node, self.cached[node], names, reports)

    def _existing_sizes(self) -> dict[str, int]:
        """Size of every file under the output and the cache entries (for --resume)."""
        if self._sizes is None:
            roots = [self.layout.root, *self.layout.work_roots.values()]
            self._sizes = {
                f.uri: f.size for root in roots for f in storage.list_prefix(root, self.layout.opts)
            }
        return self._sizes

    def _reads(self, segment: Segment, columns: tuple[str, ...] | None = None) -> list[UnitRead]:
        reads = []
        specs = self.plan.pipeline.spec.sources
        first = segment.apply or (segment.stages[0] if segment.stages else None)
        union = self.plan.input_columns.get(first) if first and len(segment.inputs) > 1 else None
        for node in segment.inputs:
            for unit in self.node_units(node):
                if node in specs and node not in self.plan.materialized_done:
                    extras = {
                        c: t
                        for c, t in self.plan.columns[node].items()
                        if c not in RESERVED_COLUMNS
                    }
                    reads.append(UnitRead(unit, source_spec=specs[node], expected=extras))
                else:
                    reads.append(
                        UnitRead(
                            unit,
                            node=node,
                            apply=segment.apply,
                            annotate=self._annotations(segment.apply),
                            details=self._details(segment.apply),
                            columns=columns,
                            conform=union,
                        )
                    )
        return sorted(reads, key=lambda r: r.unit.index)

    def _details(self, name: str | None) -> bool:
        return name is not None and self.plan.stages[name].reason_details

    def _annotations(self, name: str | None) -> tuple[tuple[str, pa.DataType, Fill], ...]:
        """The columns global stage ``name`` adds to the rows it keeps, with their fills."""
        if name is None:
            return ()
        stage = self.plan.stages[name]
        assert isinstance(stage, GlobalStage)
        fills = stage.fills()
        columns = stage.decision_columns().items()
        return tuple((c, kind, fills.get(c, Fill())) for c, kind in columns)

    def _targets(self, segment: Segment) -> list[Target]:
        out = []
        for kind, name in segment.targets:
            sink = self.plan.pipeline.spec.sinks.get(name) if kind == "sink" else None
            size = int(sink.shard_bytes or self.execution.shard_bytes) if sink else 0
            columns = self.plan.columns[name] if kind == "materialize" else None
            out.append(Target(kind, name, sink, size, columns))
        return out

    def _dataset(self, reads: list[UnitRead], first: Resources | None = None) -> ray.data.Dataset:
        """The units as a dataset, one block each.  The read tasks ask for what the
        first pool's actors ask (``first``, a CPU pool), so that Ray Data fuses the
        reads into those actors: a separate read task would need a CPU of its own,
        which the pools may hold (after a node dies, Ray Data does not shrink them and
        a retried read would wait forever).  A GPU pool's request (a remote-args
        function) never fuses; its reads stay 1-CPU tasks."""
        args = _read_args(first) if first is not None and not first.num_gpus else {}
        ds: ray.data.Dataset = ray.data.read_datasource(
            UnitDatasource(reads, self.layout),
            override_num_blocks=max(len(reads), 1),
            ray_remote_args=args,
        )
        return ds

    def _groups(self, segment: Segment) -> list[tuple[list[BoundStage], Resources]]:
        """The segment's actor groups as this cluster runs them, with their resources.

        ``num_gpus: auto`` is resolved first, so that on a cluster without GPUs an
        ``auto`` stage fuses with its CPU neighbours.  Ray Data starts one actor of
        every pool up front, and runs the reads inside the first pool's actors when
        that pool uses no GPU (:meth:`_dataset`); if the first actors and a separate
        1-CPU read would not fit the cluster (2 CPUs, a GPU pool and a CPU pool), every
        group is fused into one pool of actors of at least 1 CPU (the largest request
        of each kind), rather than waiting forever for a CPU.
        """
        total_gpus = cluster_gpus()
        groups: list[tuple[list[BoundStage], Resources]] = []
        for names in segment.groups:
            bound = [self.plan.pipeline.stages[n] for n in names]
            res = bound[0].resources
            res = res.model_copy(update={"num_gpus": res.gpus(total_gpus)})
            if groups and groups[-1][1].fusion_key() == res.fusion_key():
                groups[-1][0].extend(bound)
            else:
                groups.append((bound, res))
        cpus = cluster_resources().get("CPU", 1.0)
        first = groups[0][1] if groups else None
        read = 0.0 if first is not None and not first.num_gpus else 1.0
        pinned = {tuple(r.custom.items()) for _, r in groups}
        if (
            len(groups) > 1
            and len(pinned) == 1  # pools pinned to different node types stay apart
            and sum(_pinned_cpus(r) for _, r in groups) + read > cpus
        ):
            merged = [b for group, _ in groups for b in group]
            biggest = Resources(
                num_cpus=max(1.0, *(r.num_cpus for _, r in groups)),
                num_gpus=max(float(r.num_gpus) for _, r in groups),
                custom=groups[0][1].custom,
            )
            groups = [(merged, biggest)]
        return groups

    def _run_segment(self, segment: Segment) -> None:
        reads = self._reads(segment)
        self.progress.begin_pass(segment.index, list(segment.stages), len(reads))
        if self.resume:
            done = committed_units(self.layout, segment.index, self._existing_sizes())
            for unit in sorted(done):
                self.reports.extend(done[unit])
                self.progress.add(done[unit])
            reads = [r for r in reads if r.unit.index not in done]
        if not reads:
            self._mark_done(segment)
            self.progress.end_pass()
            return
        groups = self._groups(segment)
        ds = self._dataset(reads, groups[0][1] if groups else None)
        targets = self._targets(segment)
        for i, (bound, resources) in enumerate(groups):
            last = i == len(groups) - 1
            with warnings.catch_warnings():
                # GPU requests go through ray_remote_args_fn (see _ray_args), which Ray
                # 2.60 marks deprecated from 2.64; Ray is pinned to 2.60 here.
                warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
                ds = self._map_group(
                    ds, bound, resources, len(reads), len(groups), targets, segment, last
                )
        if not groups:
            ds = ds.map_batches(
                functools.partial(
                    _write_only, targets=targets, layout=self.layout, segment=segment.index
                ),
                batch_size=None,
                batch_format="pyarrow",
                zero_copy_batch=True,
            )
        finished = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        for unit_reports in unit_rows(finished, [r.unit.index for r in reads]):
            self.reports.extend(unit_reports)
            self.progress.add(unit_reports)
        self._mark_done(segment)
        self.progress.end_pass()

    def _map_group(
        self,
        ds: ray.data.Dataset,
        bound: list[BoundStage],
        resources: Resources,
        n_units: int,
        n_groups: int,
        targets: list[Target],
        segment: Segment,
        last: bool,
    ) -> ray.data.Dataset:
        """One fused group of map stages as a ``map_batches`` over an actor pool."""
        return ds.map_batches(
            StageGroup,
            fn_constructor_args=(
                [self._stage_ref(b) for b in bound],
                self.plan.pipeline.spec.seed,
                self.layout,
                targets if last else [],
                segment.index,
                plugin_locations(self.plan.pipeline.spec.plugins),
                self.execution.isolate_after,
            ),
            batch_size=None,
            batch_format="pyarrow",
            zero_copy_batch=True,
            **_ray_args(resources, n_units, n_groups),
        )

    def _stage_ref(self, bound: BoundStage) -> StageRef:
        """A stage as data for its workers, relative paths against the pipeline folder."""
        base_dir = str(Path(self.plan.pipeline.base_dir).resolve())
        return StageRef.of(bound, base_dir, self.execution.max_errors)

    def _mark_done(self, segment: Segment) -> None:
        for kind, name in segment.targets:
            if kind == "materialize":
                self.plan.materialized_done.add(name)

    def _run_reshuffle(self, name: str) -> None:
        """Decide (the stage's plan), then expand and shuffle its kept rows into its
        own units; commit both at once, with the stage's reports (for --resume)."""
        if name in self.plan.materialized_done:
            return
        work = [u.index for u in self.units[name]]
        if self.resume and global_done(self.layout, name, work):
            self.global_summaries[name] = global_summary(self.layout, name)
            self.reports.extend(global_reports(self.layout, name))
            self.progress.add(global_reports(self.layout, name), unit_done=False)
            self.plan.materialized_done.add(name)
            return
        start = time.perf_counter()
        units = self._run_global(name, commit=False)
        self.progress.global_stage(name, "expanding and shuffling")
        stage = self.plan.stages[name]
        assert isinstance(stage, Reshuffle)
        inputs = self.plan.pipeline.stages[name].inputs
        reads = self._reads(Segment(-1, inputs, name, (), ()))
        shuffled = time.perf_counter()
        reports = reshuffle(
            reads,
            self._stage_ref(self.plan.pipeline.stages[name]),
            self.plan.pipeline.spec.seed,
            self.layout,
            self.units[name],
            self.plan.columns[name],
            plugin_locations(self.plan.pipeline.spec.plugins),
        )
        self.global_phases.setdefault(name, {})["reshuffle"] = time.perf_counter() - shuffled
        self.reports.extend(reports)
        self.progress.add(reports, unit_done=False)
        commit_global(self.layout, name, units, stage.summary, reports, work)
        self.global_seconds[name] = time.perf_counter() - start
        self.plan.materialized_done.add(name)

    def _run_global(self, name: str, commit: bool = True) -> list[int]:
        """Write a global stage's decisions (committed unless ``commit`` is false);
        returns the units they name."""
        if self.resume and global_done(self.layout, name):
            self.global_summaries[name] = global_summary(self.layout, name)
            return []
        start = time.perf_counter()
        self.progress.global_stage(name, "deciding")
        stage = self.plan.stages[name]
        assert isinstance(stage, GlobalStage)
        stage.setup()
        columns = (UNIT, POS, "id", *stage.reads())
        inputs = self.plan.pipeline.stages[name].inputs
        reads = [
            r
            for r in self._reads(Segment(-1, inputs, None, (), ()), columns)
            if r.node is not None and _num_rows(self.layout, self.layout.work(r.node, r.unit.index))
        ]
        if not reads:  # every unit is empty: nothing to decide
            self.global_seconds[name] = time.perf_counter() - start
            self.global_summaries[name] = {}
            if commit:
                commit_global(self.layout, name, [])
            return []
        # Ray turns an empty block into a schemaless one, which its shuffles reject,
        # so units without rows are left out of the key dataset (they need no decision).
        decisions = stage.plan(self._dataset(reads))
        writers = max(1, min(len(reads), int(cluster_resources().get("CPU", 1)) * 2))
        units = write_decisions(
            decisions.to_arrow_refs(), name, decision_schema(stage), self.layout, writers
        )
        if commit:
            commit_global(self.layout, name, units, stage.summary)
        self.global_summaries[name] = stage.summary
        self.global_phases[name] = stage.timings
        self.global_seconds[name] = time.perf_counter() - start
        return units


def _num_rows(layout: Layout, path: str) -> int:
    with storage.open_input(path, layout.opts) as handle:
        return int(pq.ParquetFile(handle).metadata.num_rows)


def write_decisions(
    blocks: list[Any], stage: str, schema: pa.Schema, layout: Layout, writers: int
) -> list[int]:
    """Write a global stage's decisions, one file per unit: a shuffle by unit over
    ``writers`` tasks (:func:`curate.shuffle.hash_shuffle`); returns the units."""
    write = functools.partial(_write_unit_decisions, stage, schema, layout)
    written = hash_shuffle(blocks, UNIT, writers, write)
    return sorted(u for units in ray.get(written) for u in units)


def _write_unit_decisions(
    stage: str, schema: pa.Schema, layout: Layout, table: pa.Table
) -> list[int]:
    if table.num_rows == 0:
        return []
    table = table.select(schema.names).cast(schema)
    table = table.sort_by([(UNIT, "ascending"), (POS, "ascending")])
    units = table.column(UNIT).to_numpy()
    bounds = [*group_starts(units).tolist(), len(units)]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        unit = int(units[lo])
        write_parquet_atomic(
            table.slice(lo, hi - lo), layout.decisions(stage, unit), "zstd", layout.opts
        )
        out.append(unit)
    return out


SHUFFLE_KEY = "_shuffle_key"


def reshuffle(
    reads: list[UnitRead],
    ref: StageRef,
    seed: int,
    layout: Layout,
    out_units: list[Unit],
    columns: dict[str, pa.DataType],
    plugins: list[tuple[str, str | None]],
) -> list[dict[str, Any]]:
    """A reshuffling stage's output: every input unit's kept rows (its decisions
    applied, rejects written) repeated by their copies and scattered by shuffle key
    over ``out_units``; each output unit sorted by key and written to the work folder.
    Returns the stage's per-unit reports and the work files' reports."""
    n = len(out_units)
    scattered: list[Any] = [
        _scatter_copies.options(num_returns=n + 1).remote(r, ref, seed, layout, n, plugins)
        for r in reads
    ]
    pieces = [[s[p] for s in scattered] for p in range(n)]
    written = [
        _gather_unit.remote(layout, ref.name, unit.index, columns, *pieces[p])
        for p, unit in enumerate(out_units)
    ]
    reports = [r for s in ray.get([s[n] for s in scattered]) for r in s]
    return reports + list(ray.get(written))


@ray.remote
def _scatter_copies(
    read: UnitRead,
    ref: StageRef,
    seed: int,
    layout: Layout,
    n: int,
    plugins: list[tuple[str, str | None]],
) -> tuple[Any, ...]:
    load_plugins(plugins)
    stage = ref.build(seed, layout)
    assert isinstance(stage, Reshuffle)
    block = load_unit(read, layout)
    live, _, reports = split_trailer(block)
    copies = live.column(stage.copies_column).to_numpy(zero_copy_only=False).astype(np.int64)
    take = np.repeat(np.arange(live.num_rows), copies)
    starts = np.repeat(np.cumsum(copies) - copies, copies)
    copy = (np.arange(len(take)) - starts).astype(np.int32)
    rows = live.take(pa.array(take, pa.int64())).drop_columns([stage.copies_column])
    rows = set_column(rows, stage.copy_column, pa.array(copy, pa.int32()))
    key = stage.shuffle_key(rows.column("id").to_pylist(), copy)
    rows = rows.append_column(SHUFFLE_KEY, pa.array(key, pa.uint64()))
    for report in reports:
        if report.get("stage") == ref.name and report.get("kind") == "stage":
            report["rows_out"] = len(take)
    parts = split(rows, (key % np.uint64(n)).astype(np.int64), n)
    return (*parts, reports)


@ray.remote
def _gather_unit(
    layout: Layout, name: str, unit: int, columns: dict[str, pa.DataType], *pieces: pa.Table
) -> dict[str, Any]:
    rows = concat(pieces)
    if rows.num_rows:
        rows = rows.sort_by([(SHUFFLE_KEY, "ascending"), ("id", "ascending")])
    n = rows.num_rows
    rows = rows.drop_columns([c for c in (SHUFFLE_KEY, UNIT, POS) if c in rows.column_names])
    rows = rows.append_column(UNIT, pa.array(np.full(n, unit, np.int64)))
    rows = rows.append_column(POS, pa.array(np.arange(n, dtype=np.int64)))
    table = conform(rows, columns)
    f = write_parquet_atomic(table, layout.work(name, unit), "zstd", layout.opts)
    return _file_report("work", name, unit, f)


def _gpu_args(gpus: float) -> dict[str, Any]:
    return {"num_gpus": gpus}


def _pinned_cpus(res: Resources) -> float:
    """CPUs the first actors of a pool with ``res`` hold for the whole segment."""
    if isinstance(res.concurrency, int):
        return float(res.num_cpus * res.concurrency)
    if isinstance(res.concurrency, tuple):
        return float(res.num_cpus * res.concurrency[0])
    return float(res.num_cpus)


def _read_args(res: Resources) -> dict[str, Any]:
    """What an actor of a pool with ``res`` asks for, less GPUs and pool size: the
    remote arguments of read tasks that Ray Data fuses into that pool, and the start
    of :func:`_ray_args`."""
    args: dict[str, Any] = {"num_cpus": res.num_cpus}
    if res.memory:
        args["memory"] = int(res.memory)
    if res.custom:
        args["resources"] = dict(res.custom)
    return args


def _ray_args(res: Resources, n_units: int, n_groups: int) -> dict[str, Any]:
    """Ray resources and pool size of a group's actors.

    Fault tolerance is Ray Data's default for actor pools (2.60): ``max_restarts=-1``
    and ``max_task_retries=-1``, so a pool actor whose node dies is restarted (on
    another node if need be) and its unfinished units run again; a unit rewrites the
    same files with the same bytes and the driver takes one row of reports per unit
    (:func:`unit_rows`).  They are not passed here: any extra remote argument keeps Ray
    Data from fusing the reads into the first pool's actors (see ``_groups``).  A
    stage's own exception is not retried (``actor_task_retry_on_errors`` stays off).
    """
    args = _read_args(res)
    total_gpus = cluster_gpus()
    gpus = res.gpus(total_gpus)
    if gpus:
        # Ray Data refuses ``num_gpus`` without a ``batch_size``; a unit is one batch
        # here, so the GPU request goes through the per-actor remote args instead.
        args["ray_remote_args_fn"] = functools.partial(_gpu_args, gpus)
    if isinstance(res.concurrency, int):
        args["compute"] = ray.data.ActorPoolStrategy(size=res.concurrency)
    elif res.concurrency is not None:
        low, high = res.concurrency
        args["compute"] = ray.data.ActorPoolStrategy(min_size=low, max_size=high)
    else:
        cpus = cluster_resources().get("CPU", 1.0)
        per_group = max(1, int(cpus / max(res.num_cpus, 0.01) / n_groups))
        if gpus:
            per_group = min(per_group, max(1, int(total_gpus / gpus)))
        args["compute"] = ray.data.ActorPoolStrategy(
            min_size=1, max_size=max(1, min(per_group, n_units))
        )
    return args
