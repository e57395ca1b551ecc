"""``mix``: a training mixture of named components under a token (or row) budget.

Components are the stage's inputs, named after them (``input: [web, code]``), or
the values of one column (``component_column: bucket``, e.g. CCNet's head /
middle / tail).  Each has a ``weight`` (a share of the budget, normalized over
the components) and a ``max_epochs`` cap on repetition.  ``tokens:`` or
``rows:`` is the budget; ``weights:`` says whether the weights are shares of
tokens or of rows (rows under a token budget: the row count whose row shares fill
the budget at each component's mean document length).

A component asked for less than it has is sampled (a seeded prefix of its rows in
hash order, cut where its tokens come closest to the goal); one asked for more is
repeated whole, up to ``max_epochs`` epochs, plus a sample for the fraction left
(see :mod:`curate.mixing`).  Repeated records keep their ``id``; every copy is its
own output row.  The output is shuffled across ``shards`` output units (default:
as many as the inputs had) by a seeded hash of (id, copy), so the same inputs,
spec and seed give the same shards, byte for byte.

Token counts come from a real tokenizer that works offline (``tokenizer:``,
default ``cl100k_base``; see :mod:`curate.tokens`), or from ``tokens_column``.

Columns written: ``mix_component`` (string), ``mix_copy`` (int32, 0 for a
record's first copy), ``n_tokens`` (int64).  Rows not sampled are dropped as
``mix:not_sampled``, rows of a zero-weight component as ``mix:zero_weight``,
rows whose ``component_column`` names no component as ``mix:not_a_component``.
The manifest's stage row counts rows in, kept, dropped and ``rows_out`` (copies
made), and its ``summary`` gives, per component, the target and achieved share in
rows and tokens, the repetition factor and why a target was not met.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate import mixing
from curate.mixing import Available, Goal
from curate.stage import POS, UNIT, Reshuffle, StageConfig, StageContext
from curate.tokens import load_tokenizer

NOT_SAMPLED, ZERO_WEIGHT, NOT_A_COMPONENT = (
    "mix:not_sampled",
    "mix:zero_weight",
    "mix:not_a_component",
)
Array = np.ndarray[Any, Any]


class Component(BaseModel):
    """One component of the mixture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weight: float = Field(ge=0)
    #: Epochs a component may be repeated to meet its goal (1: never repeated).
    max_epochs: float = Field(1.0, gt=0)


class MixConfig(StageConfig):
    components: dict[str, Component]
    #: The budget: tokens ...
    tokens: int | None = Field(None, gt=0)
    #: ... or rows.
    rows: int | None = Field(None, gt=0)
    #: What the weights are shares of (default: the budget's unit).
    weights: Literal["tokens", "rows"] | None = None
    #: Components are the values of this column (one input), not the inputs.
    component_column: str | None = None
    tokenizer: str = "cl100k_base"
    #: An upstream column holding token counts (skips the tokenizer).
    tokens_column: str | None = None
    #: Output units (shards before the sink's own size cuts); None: the inputs' count.
    shards: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> MixConfig:
        if (self.tokens is None) == (self.rows is None):
            raise ValueError("give exactly one budget: tokens or rows")
        if self.rows is not None and self.weights == "tokens":
            raise ValueError("weights in tokens need a token budget (tokens:)")
        if not self.components:
            raise ValueError("at least one component")
        if not any(c.weight > 0 for c in self.components.values()):
            raise ValueError("at least one component needs a weight above 0")
        return self

    @property
    def budget_unit(self) -> str:
        return "tokens" if self.tokens is not None else "rows"

    @property
    def weights_unit(self) -> str:
        return self.weights or self.budget_unit


class Mix(Reshuffle):
    """Samples and repeats components to a weighted budget, then shuffles the output."""

    Config: ClassVar[type[StageConfig]] = MixConfig
    config: MixConfig
    reason_details: ClassVar[bool] = True

    def __init__(self, config: StageConfig, context: StageContext) -> None:
        super().__init__(config, context)
        #: Input node -> the sources its rows come from (set by the DAG check).
        self.input_sources: dict[str, list[str]] = {}

    def reads(self) -> Sequence[str]:
        cfg = self.config
        counted = (cfg.tokens_column,) if cfg.tokens_column else ("text",)
        by = (cfg.component_column,) if cfg.component_column else ("source",)
        return (*counted, *by)

    def writes(self) -> Mapping[str, pa.DataType]:
        return {"mix_component": pa.string(), "mix_copy": pa.int32(), "n_tokens": pa.int64()}

    def decision_columns(self) -> Mapping[str, pa.DataType]:
        return {"mix_component": pa.string(), "mix_copies": pa.int32(), "n_tokens": pa.int64()}

    def output_units(self, input_units: int) -> int:
        return self.config.shards or max(1, input_units)

    def bind_inputs(self, sources: Mapping[str, Sequence[str]]) -> list[str]:
        """Components named after inputs: every input is one, and nothing else is."""
        self.input_sources = {k: list(v) for k, v in sources.items()}
        cfg = self.config
        if cfg.component_column is not None:
            return []
        names, inputs = set(cfg.components), set(sources)
        if names != inputs:
            return [
                f"components must be the stage's inputs ({', '.join(sorted(inputs))}), "
                f"got {', '.join(sorted(names))}; or set component_column"
            ]
        return []

    def _source_component(self) -> dict[str, str]:
        return {s: node for node, srcs in self.input_sources.items() for s in srcs}

    # --- plan: measure, total, cut, decide -------------------------------------------

    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        cfg = self.config
        measure: Any = functools.partial(
            _measure,
            cfg=cfg.model_dump(),
            seed=self.context.seed,
            by_source=self._source_component(),
            base_dir=self.context.base_dir,
        )
        t0 = time.perf_counter()
        measured = keys.map_batches(
            measure,
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
        ).materialize()
        self.timings["measure"] = time.perf_counter() - t0
        available = _totals(measured, list(cfg.components))
        weights = {c: cfg.components[c].weight for c in cfg.components}
        epochs = {c: cfg.components[c].max_epochs for c in cfg.components}
        budget = float(cfg.tokens if cfg.tokens is not None else cfg.rows or 0)
        goals, unit = mixing.goals(
            weights, epochs, available, budget, cfg.budget_unit, cfg.weights_unit
        )
        t1 = time.perf_counter()
        cuts = _cuts(measured, goals, unit)
        self.timings["totals_and_cut"] = time.perf_counter() - t1
        t2 = time.perf_counter()
        decided: ray.data.Dataset = measured.map_batches(
            _decide,
            fn_kwargs={"plan": _plan_args(goals, cuts, unit)},
            batch_format="pyarrow",
            batch_size=None,
            zero_copy_batch=True,
        ).materialize()
        self.summary = _summary(cfg, goals, unit, decided, self.tokenizer_info())
        self.timings["decide"] = time.perf_counter() - t2
        return decided

    def tokenizer_info(self) -> dict[str, Any]:
        if self.config.tokens_column:
            return {"column": self.config.tokens_column}
        return load_tokenizer(self.config.tokenizer, self.context.base_dir).describe()

    def shuffle_key(self, ids: list[str], copies: Array) -> Array:
        """A seeded 64-bit key per output row: its place in the shuffled output."""
        seed = self.context.seed
        return np.fromiter(
            (
                xxhash.xxh3_64_intdigest(f"{i}\x00{int(c)}".encode(), seed=seed)
                for i, c in zip(ids, copies, strict=True)
            ),
            np.uint64,
            len(ids),
        )


def _row_hash(ids: list[str], components: list[str], seed: int) -> Array:
    return np.fromiter(
        (
            xxhash.xxh3_64_intdigest(f"{c}\x00{i}".encode(), seed=seed)
            for i, c in zip(ids, components, strict=True)
        ),
        np.uint64,
        len(ids),
    )


def _measure(
    block: pa.Table, cfg: dict[str, Any], seed: int, by_source: dict[str, str], base_dir: str
) -> pa.Table:
    """Per row: its component, tokens and seeded hash."""
    config = MixConfig.model_validate(cfg)
    if config.component_column is not None:
        raw = block.column(config.component_column).cast(pa.string()).to_pylist()
        component = [c if c in config.components else None for c in raw]
    else:
        component = [by_source.get(s) for s in block.column("source").to_pylist()]
    if config.tokens_column is not None:
        col = pc.fill_null(block.column(config.tokens_column), 0)
        tokens = np.asarray(pc.cast(col, pa.int64()).to_numpy(zero_copy_only=False), np.int64)
    else:
        tokens = load_tokenizer(config.tokenizer, base_dir).count(block.column("text"))
    ids = block.column("id").to_pylist()
    hashes = _row_hash(ids, [c or "" for c in component], seed)
    return pa.table(
        {
            UNIT: block.column(UNIT),
            POS: block.column(POS),
            "id": block.column("id"),
            "component": pa.array(component, pa.string()),
            "n_tokens": pa.array(tokens, pa.int64()),
            "hash": pa.array(hashes, pa.uint64()),
        }
    )


def _per_block(ds: ray.data.Dataset, fn: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """``fn`` applied to every block in the workers; its small result rows, gathered."""
    return ds.map_batches(
        fn, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    ).take_all()


def _block_totals(table: pa.Table) -> pa.Table:
    grouped = table.group_by("component").aggregate([("n_tokens", "sum"), ("id", "count")])
    return pa.table(
        {
            "component": grouped.column("component"),
            "tokens": grouped.column("n_tokens_sum"),
            "rows": grouped.column("id_count"),
        }
    )


def _totals(measured: ray.data.Dataset, names: list[str]) -> dict[str, Available]:
    rows = dict.fromkeys(names, 0)
    tokens = dict.fromkeys(names, 0)
    for r in _per_block(measured, _block_totals):
        if r["component"] is not None:
            rows[r["component"]] += r["rows"]
            tokens[r["component"]] += r["tokens"]
    return {c: Available(rows[c], tokens[c]) for c in names}


def _weights_of(table: pa.Table, unit: str) -> Array:
    if unit == "tokens":
        return np.asarray(table.column("n_tokens").to_numpy(), np.float64)
    return np.ones(table.num_rows, np.float64)


def _block_histogram(table: pa.Table, components: list[str], unit: str) -> pa.Table:
    """Sparse weighted histograms of the hash's top bits, per sampled component."""
    parts = []
    for c in components:
        part = table.filter(pc.equal(table.column("component"), c))
        if not part.num_rows:
            continue
        bins = mixing.bins_of(part.column("hash").to_numpy())
        weight = np.bincount(bins, _weights_of(part, unit), minlength=mixing.NBINS)
        used = np.flatnonzero(weight)
        parts.append(pa.table({"component": [c] * len(used), "bin": used, "weight": weight[used]}))
    if not parts:
        return pa.table({"component": pa.array([], pa.string()), "bin": pa.array([], pa.int64()),
                         "weight": pa.array([], pa.float64())})  # fmt: skip
    return pa.concat_tables(parts)


def _is(column: pa.ChunkedArray | pa.Array, value: str) -> Array:
    """Where ``column`` equals ``value`` (null: no), as a numpy mask."""
    return np.asarray(pc.fill_null(pc.equal(column, value), False).to_numpy(zero_copy_only=False))


def _block_bin_rows(table: pa.Table, crossing: dict[str, int]) -> pa.Table:
    """The rows of each component's crossing bin (about 1/65536 of the component)."""
    bins = mixing.bins_of(table.column("hash").to_numpy())
    mask = np.zeros(table.num_rows, bool)
    for c, b in crossing.items():
        mask |= _is(table.column("component"), c) & (bins == b)
    return table.filter(pa.array(mask, pa.bool_())).select(["component", "id", "hash", "n_tokens"])


def _cuts(
    measured: ray.data.Dataset, goals: dict[str, Goal], unit: str
) -> dict[str, tuple[int, tuple[int, str] | None]]:
    """Per sampled component: the crossing bin and the last (hash, id) taken in it."""
    sampled = [c for c, g in goals.items() if g.rest > 0]
    if not sampled:
        return {}
    histograms = {c: np.zeros(mixing.NBINS, np.float64) for c in sampled}
    for r in _per_block(measured, _block_histogram, components=sampled, unit=unit):
        histograms[r["component"]][r["bin"]] += r["weight"]
    crossing = {c: mixing.crossing_bin(histograms[c], goals[c].rest) for c in sampled}
    rows = _per_block(measured, _block_bin_rows, crossing={c: b for c, (b, _) in crossing.items()})
    out = {}
    for c in sampled:
        mine = [r for r in rows if r["component"] == c]
        weights = np.array([r["n_tokens"] if unit == "tokens" else 1 for r in mine], np.float64)
        cut = mixing.weighted_cut(
            np.array([r["hash"] for r in mine], np.uint64),
            [r["id"] for r in mine],
            weights,
            crossing[c][1],
            goals[c].rest,
        )
        out[c] = (crossing[c][0], cut)
    return out


def _plan_args(
    goals: dict[str, Goal], cuts: dict[str, tuple[int, tuple[int, str] | None]], unit: str
) -> dict[str, Any]:
    return {
        c: {
            "epochs": g.epochs,
            "zero": g.weight == 0,
            "bin": cuts.get(c, (-1, None))[0],
            "cut": cuts.get(c, (-1, None))[1],
        }
        for c, g in goals.items()
    }


def _decide(block: pa.Table, plan: dict[str, Any]) -> pa.Table:
    """Copies of every row, or the reason it is dropped."""
    n = block.num_rows
    hashes = block.column("hash").to_numpy()
    ids = np.array(block.column("id").to_pylist(), dtype=object)
    bins = mixing.bins_of(hashes)
    copies = np.zeros(n, np.int32)
    reason = np.full(n, NOT_A_COMPONENT, dtype=object)
    for c, p in plan.items():
        rows = np.flatnonzero(_is(block.column("component"), c))
        if not len(rows):
            continue
        if p["zero"]:
            reason[rows] = ZERO_WEIGHT
            continue
        cut = (int(p["cut"][0]), str(p["cut"][1])) if p["cut"] is not None else None
        extra = mixing.in_prefix(hashes[rows], ids[rows], bins[rows], p["bin"], cut)
        copies[rows] = p["epochs"] + extra.astype(np.int32)
        reason[rows] = NOT_SAMPLED
        reason[rows[copies[rows] > 0]] = None
    return pa.table(
        {
            UNIT: block.column(UNIT),
            POS: block.column(POS),
            "reason": pa.array(reason, pa.string()),
            "value": block.column("component"),
            "mix_component": block.column("component"),
            "mix_copies": pa.array(copies, pa.int32()),
            "n_tokens": block.column("n_tokens"),
        }
    )


def _block_achieved(table: pa.Table) -> pa.Table:
    copies = pc.cast(table.column("mix_copies"), pa.int64())
    counted = pa.table(
        {
            "component": table.column("mix_component"),
            "rows": copies,
            "tokens": pc.multiply(copies, table.column("n_tokens")),
            "distinct": pc.cast(pc.greater(copies, 0), pa.int64()),
        }
    )
    grouped = counted.group_by("component").aggregate(
        [("rows", "sum"), ("tokens", "sum"), ("distinct", "sum")]
    )
    return pa.table(
        {k: grouped.column(f"{k}_sum") for k in ("rows", "tokens", "distinct")}
    ).append_column("component", grouped.column("component"))


def _achieved(decided: ray.data.Dataset) -> dict[str, tuple[int, int, int]]:
    """Per component: (rows out, tokens out, distinct records kept)."""
    out: dict[str, list[int]] = {}
    for r in _per_block(decided, _block_achieved):
        if r["component"] is not None:
            acc = out.setdefault(r["component"], [0, 0, 0])
            for i, key in enumerate(("rows", "tokens", "distinct")):
                acc[i] += int(r[key])
    return {c: (v[0], v[1], v[2]) for c, v in out.items()}


def _coarse(g: Goal, achieved: int, unit: str) -> str | None:
    """Why a sampled component ended far from its goal: its documents are large
    against it (the cut is made at a document boundary)."""
    if g.goal <= 0 or abs(achieved - g.goal) <= 0.25 * g.goal:
        return None
    return (
        f"goal {g.goal:,.0f} {unit}, got {achieved:,}: the cut falls between whole "
        f"documents, and this component's documents are large against its goal"
    )


def _summary(
    cfg: MixConfig, goals: dict[str, Goal], unit: str, decided: ray.data.Dataset,
    tokenizer: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    achieved = _achieved(decided)
    rows = sum(a[0] for a in achieved.values())
    tokens = sum(a[1] for a in achieved.values())
    share = mixing.shares({c: g.weight for c, g in goals.items()})
    components = {}
    for c, g in goals.items():
        r, t, distinct = achieved.get(c, (0, 0, 0))
        have = g.available.measure(unit)
        components[c] = {
            "weight": g.weight,
            "target_share": round(share[c], 6),
            "target_tokens": round(g.goal) if unit == "tokens" else None,
            "target_rows": round(g.goal) if unit == "rows" else None,
            "available_rows": g.available.rows,
            "available_tokens": g.available.tokens,
            "max_epochs": g.max_epochs,
            "rows": r,
            "tokens": t,
            "distinct_rows": distinct,
            "share_tokens": round(t / tokens, 6) if tokens else 0.0,
            "share_rows": round(r / rows, 6) if rows else 0.0,
            "repetition": round((t if unit == "tokens" else r) / have, 6) if have else 0.0,
            "unmet": g.unmet or _coarse(g, t if unit == "tokens" else r, unit),
        }
    return {
        "unit": unit,
        "budget": cfg.tokens if cfg.tokens is not None else cfg.rows,
        "budget_unit": cfg.budget_unit,
        "tokenizer": tokenizer,
        "components": components,
        "rows": rows,
        "tokens": tokens,
    }
