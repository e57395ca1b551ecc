"""The stage contract: what every stage declares and implements.

A stage has a typed config (a pydantic model, unknown keys rejected), declared
resources, the columns it reads and writes, a ``setup()`` that loads heavy
state once per actor, and a pure batch function.  Three kinds:

* :class:`Annotator` adds columns and never changes the rows;
* :class:`Filter` decides per row and gives every dropped row a reason;
* :class:`GlobalStage` needs the whole dataset; it turns the keys of its input
  into *decisions* (which rows to drop, and why) with Ray Data map, shuffle and
  reduce steps, and the runner applies the decisions unit by unit.

Stages know nothing of where they run; the runner knows nothing of what they do.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from curate.io.storage import LOCAL, StorageOptions

if TYPE_CHECKING:
    import ray.data

StageKind = Literal["annotator", "filter", "generator", "global"]

#: Columns every record carries from its source onwards.
RESERVED_COLUMNS: dict[str, pa.DataType] = {
    "id": pa.string(),
    "text": pa.string(),
    "source": pa.string(),
    "provenance": pa.struct([("uri", pa.string()), ("row", pa.int64())]),
}
#: Internal ordering columns: the unit of work and the position inside it.
UNIT, POS = "_unit", "_pos"


class StageConfig(BaseModel):
    """Base of every stage's config: strict, immutable, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(BaseModel):
    """What one actor of a stage asks Ray for."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0)
    #: GPUs per actor; ``auto``: one when the cluster has GPUs, else the stage runs on CPU.
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = 0.0
    memory: ByteSize | None = None
    #: Actor-pool size: a fixed size or (min, max); None sizes it to the cluster.
    concurrency: int | tuple[int, int] | None = None
    #: Rows per call of ``process_batch``; None passes a whole unit at once.
    batch_size: int | None = Field(None, gt=0)
    #: Ray custom resources per actor: ``{gpu_node: 0.01}`` runs the stage only on
    #: nodes started with that resource (the node types in ``infra/`` carry
    #: ``head_node``, ``cpu_node`` and ``gpu_node``).
    custom: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, value: dict[str, float]) -> dict[str, float]:
        own = {"CPU": "num_cpus", "GPU": "num_gpus", "memory": "memory"}
        for key in value:
            if key in own:
                raise ValueError(f"a custom resource, not {key!r} (use {own[key]})")
            internal = key.startswith(("node:", "accelerator_type:", "object_store_memory"))
            if not key or internal or key != key.strip():
                raise ValueError(f"a resource name a stage can ask for, not {key!r}")
        return dict(sorted(value.items()))

    def fusion_key(self) -> tuple[Any, ...]:
        """Consecutive stages with equal keys run in one actor."""
        custom = tuple(self.custom.items())
        return (self.num_cpus, self.num_gpus, self.memory, self.concurrency, custom)

    def gpus(self, cluster_gpus: float) -> float:
        """GPUs per actor on a cluster with ``cluster_gpus`` GPUs in all."""
        if self.num_gpus == "auto":
            return 1.0 if cluster_gpus >= 1 else 0.0
        return self.num_gpus


@dataclass(frozen=True)
class Requirement:
    """An optional dependency: the import name and the pip line that installs it."""

    module: str
    pip: str

    def missing(self) -> bool:
        return importlib.util.find_spec(self.module) is None


@dataclass(frozen=True)
class StageContext:
    """What a stage may know of the pipeline it runs in."""

    name: str
    seed: int
    text_column: str = "text"
    #: Folder relative paths in the stage's config (models) are resolved against.
    base_dir: str = "."
    #: Where the stage may keep state that outlives an actor (request caches):
    #: ``<output>/_state/<stage>`` on the run's storage; None outside a run.
    state_dir: str | None = None
    storage: StorageOptions = LOCAL


class Stage(ABC):
    """Base of all stages.  Subclasses set ``kind`` and ``Config``."""

    kind: ClassVar[StageKind]
    Config: ClassVar[type[StageConfig]] = StageConfig
    requires: ClassVar[tuple[Requirement, ...]] = ()
    default_resources: ClassVar[Resources] = Resources()
    #: Whether the manifest counts drop reasons in full (``rule:detail`` names a
    #: rule from a fixed set) rather than by category (the detail is an id).
    reason_details: ClassVar[bool] = False
    #: Whether the stage cache keeps this stage's output unless the YAML says
    #: ``cache: false`` (true for expensive scorers whose output outlives thresholds).
    cache_default: ClassVar[bool] = False

    def __init__(self, config: StageConfig, context: StageContext) -> None:
        self.config = config
        self.context = context

    def reads(self) -> Sequence[str]:
        """Columns this stage reads; the DAG check proves an upstream writes them."""
        return ()

    def writes(self) -> Mapping[str, pa.DataType]:
        """Columns this stage adds, with their types."""
        return {}

    def drops(self) -> Sequence[str]:
        """Columns this stage consumes and removes (e.g. preprocessed pixels)."""
        return ()

    def models(self) -> Mapping[str, str]:
        """Model references this stage loads, by role (``{"model": "lid.176"}``); the
        DAG check resolves them and the manifest records their fingerprints."""
        return {}

    @classmethod
    def resources_for(cls, config: StageConfig) -> Resources:
        """Default resources for this config (``default_resources`` unless overridden)."""
        return cls.default_resources

    def bind_inputs(self, sources: Mapping[str, Sequence[str]]) -> list[str]:
        """Told, at check time, the sources whose rows reach each of its inputs; returns
        problems with them (a stage whose meaning depends on its inputs, a mixture)."""
        return []

    def setup(self) -> None:  # noqa: B027 - optional hook, empty by design
        """Load heavy state (models, tables); called once per actor."""

    def counters(self) -> Mapping[str, int]:
        """Running totals of facts about the data (parse failures, pairs made) this
        actor's instance kept; the runner records each unit's increase, the
        manifest's stage row the sums.  They must not depend on the run (caches,
        retries): the stage rows of two runs of the same inputs are identical."""
        return {}

    def run_counters(self) -> Mapping[str, int]:
        """Running totals that depend on the run (requests sent, cache hits, retries,
        tokens); summed into the manifest's ``run.stage_counters``."""
        return {}


class Annotator(Stage):
    """Adds columns; the output has exactly the input's rows, in order."""

    kind: ClassVar[StageKind] = "annotator"

    @abstractmethod
    def process_batch(self, batch: pa.Table) -> pa.Table:
        """Return ``batch`` with this stage's columns added."""


@dataclass(frozen=True)
class Verdict:
    """A filter's decision for one batch.

    ``reason`` is null for kept rows.  Reasons are ``category`` or
    ``category:detail``; counts in the manifest are kept per category.
    ``value`` is the measured value that decided (as text), null when none.
    ``batch``, when set, replaces the input batch for the kept rows: the same
    rows in the same order, with the columns of :meth:`Stage.writes` added or
    (same type) rewritten, e.g. measurements kept as columns or cleaned text.
    """

    keep: np.ndarray[Any, np.dtype[np.bool_]]
    reason: pa.Array
    value: pa.Array | None = None
    batch: pa.Table | None = None


class Filter(Stage):
    """Keeps or drops rows; every dropped row has a reason."""

    kind: ClassVar[StageKind] = "filter"

    @abstractmethod
    def decide(self, batch: pa.Table) -> Verdict:
        """Decide for every row of ``batch``."""

    def process_batch(self, batch: pa.Table) -> pa.Table:
        """The kept rows (pure; the runner uses :meth:`decide` to keep the rejects)."""
        verdict = self.decide(batch)
        out = verdict.batch if verdict.batch is not None else batch
        return out.filter(pa.array(verdict.keep))


@dataclass(frozen=True)
class Generated:
    """A generator's output for one batch of seed rows.

    ``rows`` are the new rows, each made from the seed row ``seed[k]`` (an index
    into the batch, ascending): they start as a copy of that seed and carry the
    generator's :meth:`Stage.writes` columns; the runner gives them their ids,
    ``seed_id`` and positions.  A seed that gave no row is dropped with
    ``reason[i]`` (and ``value[i]``); ``reason`` is null for seeds that gave rows.
    """

    rows: pa.Table
    seed: np.ndarray[Any, np.dtype[np.int64]]
    reason: pa.Array
    value: pa.Array | None = None


class Generator(Stage):
    """Makes new rows from seed rows (synthetic instructions from documents or images).

    Row accounting counts seeds: ``rows_in`` seeds are ``kept`` (they gave at least
    one row) or ``dropped`` with a reason; ``rows_out`` counts the rows made, and
    that is what the next stage receives.  Every new row keeps ``seed_id``, the
    id of the seed it came from, and its provenance; its ``id`` is
    ``<seed id>/<stage>/<k>`` for the seed's k-th row.
    """

    kind: ClassVar[StageKind] = "generator"

    def writes(self) -> Mapping[str, pa.DataType]:
        return {"seed_id": pa.string()}

    @abstractmethod
    def generate(self, batch: pa.Table) -> Generated:
        """New rows for the seeds of ``batch``."""


#: Schema of a global stage's decisions: one row per dropped input row.
DECISION_SCHEMA = pa.schema(
    [(UNIT, pa.int64()), (POS, pa.int64()), ("reason", pa.string()), ("value", pa.string())]
)


@dataclass(frozen=True)
class Fill:
    """The value of a global stage's column for a kept row its decisions do not name:
    a copy of another column of the row, or a constant."""

    column: str | None = None
    value: Any = None


class GlobalStage(Stage):
    """Needs the whole dataset.

    ``plan`` receives a Ray dataset of the input's key columns (``_unit``,
    ``_pos``, ``id`` and :meth:`reads`) and returns a Ray dataset with
    :func:`decision_schema`: one row per dropped row (with its reason), and
    one per kept row that gets values of the stage's own columns (reason
    null).  Kept rows it does not name get :meth:`fills`.  It must use Ray
    Data or Ray tasks over object references and never pull the dataset into
    the driver.  Counters it puts in :attr:`summary` go to the manifest's stage
    row, phase times in :attr:`timings` to its run section.
    """

    kind: ClassVar[StageKind] = "global"

    def __init__(self, config: StageConfig, context: StageContext) -> None:
        super().__init__(config, context)
        #: Deterministic counters, for the manifest's stage row.
        self.summary: dict[str, Any] = {}
        #: Seconds per phase, for the manifest's run section.
        self.timings: dict[str, float] = {}

    @abstractmethod
    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        """Return the decisions for the rows of ``keys``."""

    def fills(self) -> Mapping[str, Fill]:
        """How each column of :meth:`writes` is filled for rows without a decision."""
        return {}

    def decision_columns(self) -> Mapping[str, pa.DataType]:
        """The columns of its decisions besides :data:`DECISION_SCHEMA` (its writes)."""
        return self.writes()


class Reshuffle(GlobalStage):
    """A global stage whose output is new units: kept rows are repeated and moved
    across units (a mixture).

    Its decisions name every input row, with the number of copies it gets in the
    ``<prefix>copies`` column (0 for a dropped row, which also has a reason).
    The runner expands the copies (:meth:`expand`), sorts the output rows by
    :meth:`shuffle_key` and cuts them into :meth:`output_units` units, which the
    stages after it read as they read a source's units.
    """

    #: The decisions column holding each row's number of copies.
    copies_column: ClassVar[str] = "mix_copies"
    #: The output column numbering a record's copies (0, 1, ...).
    copy_column: ClassVar[str] = "mix_copy"

    def output_units(self, input_units: int) -> int:
        """How many units the output is cut into, given the inputs' count."""
        return max(1, input_units)

    @abstractmethod
    def shuffle_key(self, ids: list[str], copies: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        """A uint64 key per output row (record id, copy number): where it goes."""


def decision_schema(stage: Stage) -> pa.Schema:
    """:data:`DECISION_SCHEMA` plus the columns of the stage's decisions."""
    columns = stage.decision_columns() if isinstance(stage, GlobalStage) else stage.writes()
    return pa.schema([*DECISION_SCHEMA, *(pa.field(c, t) for c, t in columns.items())])


def set_column(batch: pa.Table, name: str, array: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``batch`` with column ``name`` replaced in place, or appended when it is new."""
    index = batch.schema.get_field_index(name)
    if index >= 0:
        return batch.set_column(index, name, array)
    return batch.append_column(name, array)


def reason_category(reason: str) -> str:
    """``'exact_duplicate:abc'`` -> ``'exact_duplicate'``."""
    return reason.split(":", 1)[0]
