"""Check the pipeline graph before Ray starts, and cut it into segments.

Checks, all reported together: unknown inputs, cycles, a stage reading a
column no upstream writes, and missing optional dependencies (with the
``pip install`` line).

A *segment* is what one Ray Data pass runs: read units (from a source, or
from a materialized node, applying a global stage's decisions on the way),
run a chain of map stages, write.  Consecutive map stages with the same
resources are fused into one actor.  A node's output is materialized to the
work folder when a global stage consumes it, when two consumers share it,
when it feeds a multi-input stage, or into the stage cache when the stage is
cached (``cache: true``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.config.load import Pipeline, unknown_input
from curate.config.model import BoundStage
from curate.config.yamlpos import ConfigError, Issue, Loc
from curate.conversations import CONVERSATION_TYPE
from curate.io import storage
from curate.io.files import InputError, Shard, infer_format, list_shards
from curate.io.llava import LLAVA_COLUMNS, file_layout
from curate.io.llava import image_root as llava_image_root
from curate.io.readers import declared_columns
from curate.io.storage import StorageError
from curate.io.webdataset import WEBDATASET_COLUMNS
from curate.models import ModelError, ModelFile
from curate.models import resolve as resolve_model
from curate.registry import get_stage_class
from curate.stage import POS, RESERVED_COLUMNS, UNIT, Reshuffle, Stage, StageContext


@dataclass(frozen=True)
class Segment:
    """One Ray Data pass: inputs -> [apply global] -> fused map groups -> target."""

    index: int
    inputs: tuple[str, ...]
    apply: str | None
    groups: tuple[tuple[str, ...], ...]
    #: ``("materialize", node)`` or ``("sink", sink_name)``; several sinks may share.
    targets: tuple[tuple[str, str], ...]

    @property
    def stages(self) -> tuple[str, ...]:
        return tuple(s for g in self.groups for s in g)

    @property
    def output_node(self) -> str:
        return self.stages[-1] if self.stages else (self.apply or self.inputs[0])


@dataclass
class Plan:
    """A checked pipeline, cut into segments in execution order."""

    pipeline: Pipeline
    stages: dict[str, Stage]
    shards: dict[str, list[Shard]]
    columns: dict[str, dict[str, pa.DataType]]
    segments: list[Segment] = field(default_factory=list)
    #: Nodes whose output is written to the work folder.
    materialized: set[str] = field(default_factory=set)
    #: Materialized nodes already written during a run.
    materialized_done: set[str] = field(default_factory=set)
    #: Columns arriving at each stage (for a multi-input stage: the union by name).
    input_columns: dict[str, dict[str, pa.DataType]] = field(default_factory=dict)
    #: Resolved model files by (stage, role).
    models: dict[tuple[str, str], ModelFile] = field(default_factory=dict)
    #: Reshuffling global stages (mixtures): their output units are new, written by
    #: the stage itself, and read by their consumers like a source's.
    reshuffled: set[str] = field(default_factory=set)


def instantiate(bound: BoundStage, seed: int, base_dir: str = ".") -> Stage:
    cls = get_stage_class(bound.type)
    return cls(bound.config, StageContext(name=bound.name, seed=seed, base_dir=base_dir))


def _consumers(pipeline: Pipeline) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {n: [] for n in [*pipeline.spec.sources, *pipeline.stages]}
    for name, bound in pipeline.stages.items():
        for parent in bound.inputs:
            users.setdefault(parent, []).append(name)
    for name, sink in pipeline.spec.sinks.items():
        users.setdefault(sink.input, []).append(f"sink:{name}")
    return users


def _topo_order(
    pipeline: Pipeline, issues: list[Issue], line: Callable[[Loc, str], Issue]
) -> list[str]:
    """Stages in dependency order; cycles become issues."""
    order: list[str] = []
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 2 or name in pipeline.spec.sources:
            return
        if state.get(name) == 1:
            cycle = " -> ".join([*trail[trail.index(name) :], name])
            issues.append(line(("stages", name, "input"), f"cycle in the graph: {cycle}"))
            return
        state[name] = 1
        for parent in pipeline.stages[name].inputs:
            if parent in pipeline.stages:  # unknown names are reported by _check_inputs
                visit(parent, [*trail, name])
        state[name] = 2
        order.append(name)

    for name in pipeline.stages:
        visit(name, [])
    return order


def _source_columns(
    pipeline: Pipeline, name: str, shards: list[Shard], issues: list[Issue]
) -> dict[str, pa.DataType]:
    """Reserved columns plus the extras: declared, or for Parquet the schema unified
    over every shard's footer (null columns and narrower types widen)."""
    spec = pipeline.spec.sources[name]
    where: Loc = ("sources", name)
    if spec.format == "llava":  # never inferred: every shard is read as llava
        _check_llava_source(pipeline, name, shards, issues)
        return {**RESERVED_COLUMNS, **LLAVA_COLUMNS, **declared_columns(spec)}
    formats = {spec.format or infer_format(s.path) for s in shards}
    if len(formats) > 1:
        found = ", ".join(sorted(str(f) for f in formats))
        issues.append(
            pipeline.positions.issue(
                (*where, "uri"), f"one source, one format: found {found}; split it into two sources"
            )
        )
        return dict(RESERVED_COLUMNS)
    fmt = formats.pop() if formats else None
    if fmt == "webdataset":
        return {**RESERVED_COLUMNS, **WEBDATASET_COLUMNS, **declared_columns(spec)}
    if spec.columns is not None:
        if fmt == "parquet" and "json" in spec.columns.values():
            issues.append(
                pipeline.positions.issue(
                    (*where, "columns"),
                    "type 'json' is for JSONL sources; Parquet columns keep their type",
                )
            )
        return {**RESERVED_COLUMNS, **declared_columns(spec)}
    if fmt != "parquet":
        return dict(RESERVED_COLUMNS)
    schema = _unified_parquet_schema(pipeline, name, shards, issues)
    return {**RESERVED_COLUMNS, **_extra_columns(pipeline, name, schema, shards[0].uri, issues)}


def _check_llava_source(
    pipeline: Pipeline, name: str, shards: list[Shard], issues: list[Issue]
) -> None:
    """A llava source reads .json/.jsonl files, and its local ``image_root`` exists."""
    spec = pipeline.spec.sources[name]
    odd = [s.uri for s in shards if file_layout(s.path) is None]
    if odd:
        issues.append(
            pipeline.positions.issue(
                ("sources", name, "uri"),
                f"a llava source reads .json (one array) or .jsonl files, got {odd[0]}",
            )
        )
    root = spec.image_root
    if root is None or storage.is_s3(root) or not spec.load_images:
        return
    path = llava_image_root(root, spec.base_dir, "")
    if not Path(path).is_dir():
        issues.append(
            pipeline.positions.issue(
                ("sources", name, "image_root"), f"expected a folder, got {root!r} ({path})"
            )
        )


def _unified_parquet_schema(
    pipeline: Pipeline, name: str, shards: list[Shard], issues: list[Issue]
) -> pa.Schema:
    import pyarrow.parquet as pq

    opts = pipeline.spec.storage.options()
    schemas = []
    for shard in shards:
        try:
            with storage.open_input(shard.path, opts) as handle:
                schemas.append(pq.read_schema(handle))
        except (pa.ArrowException, OSError) as exc:
            issues.append(
                pipeline.positions.issue(
                    ("sources", name, "uri"), f"{shard.uri}: not a readable Parquet file: {exc}"
                )
            )
    try:
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        issues.append(
            pipeline.positions.issue(
                ("sources", name), f"the shards' schemas do not agree: {exc}; declare 'columns:'"
            )
        )
        return pa.schema([])


def _extra_columns(
    pipeline: Pipeline, name: str, schema: pa.Schema, first: str, issues: list[Issue]
) -> dict[str, pa.DataType]:
    spec = pipeline.spec.sources[name]
    extras: dict[str, pa.DataType] = {}
    for f in schema:
        if f.name in (spec.text_column, spec.id_column):
            continue
        if f.name in RESERVED_COLUMNS or f.name in (UNIT, POS):
            issues.append(
                pipeline.positions.issue(
                    ("sources", name),
                    f"its Parquet shards (first: {first}) have a column {f.name!r}, "
                    "a name curate reserves; list the columns to keep under 'columns:'",
                )
            )
            continue
        extras[f.name] = f.type
    return extras


def _check_inputs(
    pipeline: Pipeline, issues: list[Issue], line: Callable[[Loc, str], Issue]
) -> None:
    known = set(pipeline.spec.sources) | set(pipeline.stages)
    for name, bound in pipeline.stages.items():
        for parent in bound.inputs:
            if parent not in known:
                issues.append(
                    line(("stages", name, "input"), unknown_input(parent, known - {name}))
                )
    for name, sink in pipeline.spec.sinks.items():
        if sink.input not in known:
            issues.append(line(("sinks", name, "input"), unknown_input(sink.input, known)))


def _check_columns(
    plan: Plan, order: list[str], issues: list[Issue], line: Callable[[Loc, str], Issue]
) -> None:
    for name in order:
        bound = plan.pipeline.stages[name]
        parents = [plan.columns[p] for p in bound.inputs if p in plan.columns]
        if len(parents) != len(bound.inputs):
            continue
        available = _union_by_name(name, bound.inputs, parents, issues, line)
        common = [c for c in available if all(c in p for p in parents)]
        stage = plan.stages[name]
        for column in stage.reads():
            if column not in common:
                issues.append(
                    line(
                        ("stages", name),
                        f"reads column {column!r}, which no upstream stage writes "
                        f"(available: {', '.join(sorted(common))})",
                    )
                )
        for column, kind in stage.writes().items():
            if column in available and not available[column].equals(kind):
                issues.append(
                    line(
                        ("stages", name),
                        f"writes column {column!r} as {kind}, but its input already has it as "
                        f"{available[column]}; rename the upstream column",
                    )
                )
        plan.input_columns[name] = available
        dropped = set(stage.drops())
        kept = {c: kind for c, kind in available.items() if c not in dropped}
        plan.columns[name] = {**kept, **stage.writes()}


def _union_by_name(
    name: str,
    inputs: tuple[str, ...],
    parents: list[dict[str, pa.DataType]],
    issues: list[Issue],
    line: Callable[[Loc, str], Issue],
) -> dict[str, pa.DataType]:
    """Columns of a union of inputs: all of them, by name; a name must keep one type.

    Rows of an input that lacks a column get nulls there; a stage may only read
    columns that every input has.
    """
    available = dict(parents[0])
    for parent, other in zip(inputs[1:], parents[1:], strict=True):
        for column, kind in other.items():
            if column in available and not available[column].equals(kind):
                issues.append(
                    line(
                        ("stages", name, "input"),
                        f"column {column!r} is {available[column]} in {inputs[0]!r} but {kind} "
                        f"in {parent!r}; a union needs one type per column",
                    )
                )
            available.setdefault(column, kind)
    return available


def _sources_of(pipeline: Pipeline, node: str, seen: frozenset[str] = frozenset()) -> set[str]:
    if node in pipeline.spec.sources:
        return {node}
    if node not in pipeline.stages or node in seen:
        return set()
    return set().union(
        *(_sources_of(pipeline, p, seen | {node}) for p in pipeline.stages[node].inputs)
    )


def _check_unions(
    pipeline: Pipeline, issues: list[Issue], line: Callable[[Loc, str], Issue]
) -> None:
    """Inputs of one stage must come from different sources: a record reaching a
    stage twice would be counted, and written, twice."""
    for name, bound in pipeline.stages.items():
        seen: dict[str, str] = {}
        for parent in bound.inputs:
            for source in sorted(_sources_of(pipeline, parent)):
                if source in seen and seen[source] != parent:
                    issues.append(
                        line(
                            ("stages", name, "input"),
                            f"inputs {seen[source]!r} and {parent!r} both carry rows of source "
                            f"{source!r}; a stage may join different sources only",
                        )
                    )
                seen.setdefault(source, parent)


def _bind_inputs(plan: Plan, issues: list[Issue], line: Callable[[Loc, str], Issue]) -> None:
    """Tell every stage which sources reach each of its inputs; report its problems."""
    pipeline = plan.pipeline
    for name, bound in pipeline.stages.items():
        sources = {p: sorted(_sources_of(pipeline, p)) for p in bound.inputs}
        for problem in plan.stages[name].bind_inputs(sources):
            issues.append(line(("stages", name), problem))


def _check_sinks(plan: Plan, issues: list[Issue], line: Callable[[Loc, str], Issue]) -> None:
    """A llava sink writes conversations: its input must have them, and the columns it
    is asked to add."""
    for name, sink in plan.pipeline.spec.sinks.items():
        columns = plan.columns.get(sink.input)
        if sink.format != "llava" or columns is None:
            continue
        kind = columns.get("conversations")
        if kind is None or not kind.equals(CONVERSATION_TYPE):
            got = "no such column" if kind is None else f"it is {kind}"
            issues.append(
                line(
                    ("sinks", name, "format"),
                    f"a llava sink writes the 'conversations' column ({CONVERSATION_TYPE}) "
                    f"of its input {sink.input!r}: {got}",
                )
            )
        missing = [c for c in sink.columns or [] if c not in columns]
        if missing:
            issues.append(
                line(
                    ("sinks", name, "columns"),
                    f"{sink.input!r} has no column {missing[0]!r} "
                    f"(available: {', '.join(sorted(columns))})",
                )
            )


def _check_dependencies(plan: Plan, issues: list[Issue], line: Callable[[Loc, str], Issue]) -> None:
    for name, stage in plan.stages.items():
        for req in type(stage).requires:
            if req.missing():
                issues.append(
                    line(
                        ("stages", name, "type"),
                        f"needs the Python module {req.module!r}: pip install {req.pip}",
                    )
                )


def _check_unused(
    pipeline: Pipeline, issues: list[Issue], line: Callable[[Loc, str], Issue]
) -> None:
    for node, users in _consumers(pipeline).items():
        if not users:
            section = "sources" if node in pipeline.spec.sources else "stages"
            issues.append(line((section, node), "output is never used: no stage or sink reads it"))


def _check_models(plan: Plan, issues: list[Issue], line: Callable[[Loc, str], Issue]) -> None:
    """Every model reference resolves to a readable file (fingerprinted once here)."""
    opts = plan.pipeline.spec.storage.options()
    for name, stage in plan.stages.items():
        if any(d.missing() for d in stage.requires):
            continue  # reported by the dependency check
        for role, ref in stage.models().items():
            try:
                plan.models[name, role] = resolve_model(ref, plan.pipeline.base_dir, opts)
            except (ModelError, StorageError) as exc:
                issues.append(line(("stages", name, role), str(exc)))


def build_plan(pipeline: Pipeline) -> Plan:
    """Check everything and cut the graph into segments; raise ConfigError with all issues."""
    line = pipeline.positions.issue
    issues: list[Issue] = []
    shards: dict[str, list[Shard]] = {}
    for name, source in pipeline.spec.sources.items():
        source.bind_base_dir(str(Path(pipeline.base_dir).resolve()))  # as `uri` resolves
        try:
            shards[name] = list_shards(
                source.uri, pipeline.base_dir, pipeline.spec.storage.options()
            )
        except InputError as exc:
            issues.append(line(("sources", name, "uri"), str(exc)))
    base = str(Path(pipeline.base_dir).resolve())
    stages = {n: instantiate(b, pipeline.spec.seed, base) for n, b in pipeline.stages.items()}
    plan = Plan(pipeline, stages, shards, {})
    for name in pipeline.spec.sources:
        plan.columns[name] = _source_columns(pipeline, name, shards.get(name, []), issues)
    _check_inputs(pipeline, issues, line)
    _check_unused(pipeline, issues, line)
    order = _topo_order(pipeline, issues, line)
    _check_unions(pipeline, issues, line)
    _bind_inputs(plan, issues, line)
    _check_columns(plan, order, issues, line)
    _check_sinks(plan, issues, line)
    _check_dependencies(plan, issues, line)
    _check_models(plan, issues, line)
    if issues:
        raise ConfigError(issues)
    _cut_segments(plan, order)
    return plan


def _cut_segments(plan: Plan, order: list[str]) -> None:
    pipeline = plan.pipeline
    users = _consumers(pipeline)

    def must_materialize(node: str) -> bool:
        stage_users = [u for u in users[node] if not u.startswith("sink:")]
        cached = node in pipeline.stages and pipeline.stages[node].cache
        return (
            cached
            or len(users[node]) > 1
            or any(
                plan.stages[u].kind == "global" or len(pipeline.stages[u].inputs) > 1
                for u in stage_users
            )
        )

    plan.reshuffled = {n for n in order if isinstance(plan.stages[n], Reshuffle)}
    plan.materialized = {
        n for n in users if users[n] and must_materialize(n) and n not in plan.reshuffled
    }
    stored = plan.materialized | plan.reshuffled
    starts: list[tuple[tuple[str, ...], str | None, str | None]] = [
        ((s,), None, None) for s in pipeline.spec.sources if users[s]
    ]
    for name in order:
        bound = pipeline.stages[name]
        if name in plan.reshuffled:
            if _sinks_of(users, name):  # its own units go straight to its sinks
                starts.append(((name,), None, None))
        elif plan.stages[name].kind == "global":
            starts.append((bound.inputs, name, None))
        elif len(bound.inputs) > 1 or bound.inputs[0] in stored:
            starts.append((bound.inputs, None, name))
    rank = {n: i for i, n in enumerate([*pipeline.spec.sources, *order])}
    starts.sort(key=lambda s: rank[s[1] or s[2] or s[0][0]])
    for inputs, apply, first in starts:
        if inputs[0] in plan.reshuffled and first is None:
            sinks = tuple(("sink", s) for s in _sinks_of(users, inputs[0]))
            plan.segments.append(Segment(len(plan.segments), inputs, None, (), sinks))
            continue
        plan.segments.extend(_segments_from(plan, users, inputs, apply, first, len(plan.segments)))


def _segments_from(
    plan: Plan,
    users: dict[str, list[str]],
    inputs: tuple[str, ...],
    apply: str | None,
    first: str | None,
    index: int,
) -> list[Segment]:
    chain: list[str] = [first] if first else []
    node = first or apply or inputs[0]
    while node not in plan.materialized:
        nxt = [u for u in users[node] if not u.startswith("sink:")]
        if len(nxt) != 1:
            break
        node = nxt[0]
        chain.append(node)
    tail = node
    targets = [("sink", s) for s in _sinks_of(users, tail)]
    if tail in plan.materialized:
        targets = [("materialize", tail)]
        sink_segment = bool(_sinks_of(users, tail))
    else:
        sink_segment = False
    segment = Segment(index, inputs, apply, _fuse(plan, chain), tuple(targets))
    out = [segment]
    if sink_segment:
        out.append(
            Segment(
                index + 1, (tail,), None, (), tuple(("sink", s) for s in _sinks_of(users, tail))
            )
        )
    return out


def _sinks_of(users: dict[str, list[str]], node: str) -> list[str]:
    return [u.removeprefix("sink:") for u in users.get(node, []) if u.startswith("sink:")]


def _fuse(plan: Plan, chain: list[str]) -> tuple[tuple[str, ...], ...]:
    groups: list[list[str]] = []
    for name in chain:
        key = plan.pipeline.stages[name].resources.fusion_key()
        if groups and plan.pipeline.stages[groups[-1][-1]].resources.fusion_key() == key:
            groups[-1].append(name)
        else:
            groups.append([name])
    return tuple(tuple(g) for g in groups)


__all__ = ["POS", "UNIT", "ConfigError", "Plan", "Segment", "build_plan"]
