"""Typed pipeline spec: sources -> stages -> sinks.

Stage parameters sit beside ``type`` and ``input`` in the YAML and are
validated against the stage class's own ``Config`` model in a second pass, so
every error in the file — top level and every stage — is reported at once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator

from curate.stage import POS, RESERVED_COLUMNS, UNIT, Resources, StageConfig

RESERVED_NAMES = {*RESERVED_COLUMNS, UNIT, POS}
#: Column types a JSONL source may declare for its extra fields.
ColumnType = Literal["string", "int64", "float64", "bool", "json"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """An input collection of shards."""

    uri: str | list[str] = Field(description="file, directory, glob, or a list of them")
    format: Literal["jsonl", "parquet"] | None = Field(
        None, description="inferred from the file extension when absent"
    )
    text_column: str = "text"
    id_column: str | None = None
    #: Extra fields to keep, with their types; for Parquet, None keeps all columns.
    columns: dict[str, ColumnType] | None = None

    @field_validator("columns")
    @classmethod
    def _not_reserved(cls, value: dict[str, ColumnType] | None) -> dict[str, ColumnType] | None:
        taken = sorted(set(value or {}) & RESERVED_NAMES)
        if taken:
            raise ValueError(f"column names not reserved by curate ({', '.join(taken)} are)")
        return value


class StageSpec(BaseModel):
    """A stage node; unknown keys are the stage's own parameters (checked later)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    input: str | list[str] | None = Field(
        None, description="upstream source or stage; defaults to the previous stage"
    )
    resources: Resources | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SinkSpec(_Strict):
    """Where the output of one node is written."""

    input: str
    format: Literal["parquet"] = "parquet"
    shard_bytes: ByteSize | None = Field(None, description="defaults to execution.shard_bytes")
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    #: Columns to write (reserved columns are always written); None writes all.
    columns: list[str] | None = None


class ExecutionSpec(_Strict):
    """How the work is cut and run."""

    #: Consecutive input shards are grouped into units of work up to this size.
    unit_bytes: ByteSize = ByteSize(64 * 2**20)
    #: Output Parquet shards are cut at about this size.
    shard_bytes: ByteSize = ByteSize(256 * 2**20)


class PipelineSpec(_Strict):
    """A whole pipeline file."""

    name: str
    description: str = ""
    seed: int = 0
    plugins: list[str] = Field(default_factory=list)
    sources: dict[str, SourceSpec]
    stages: dict[str, StageSpec] = Field(default_factory=dict)
    sinks: dict[str, SinkSpec]
    execution: ExecutionSpec = ExecutionSpec()
    output: str | None = None

    @field_validator("sources", "sinks")
    @classmethod
    def _not_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("at least one entry is required")
        return value


class BoundStage(_Strict):
    """A stage node after its parameters were validated against its class."""

    name: str
    type: str
    inputs: tuple[str, ...]
    config: StageConfig
    resources: Resources
