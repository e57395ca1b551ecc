"""Typed pipeline spec: sources -> stages -> sinks.

Stage parameters sit beside ``type`` and ``input`` in the YAML and are
validated against the stage class's own ``Config`` model in a second pass, so
every error in the file — top level and every stage — is reported at once.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from curate.io.storage import StorageOptions
from curate.stage import POS, RESERVED_COLUMNS, UNIT, Resources, StageConfig

RESERVED_NAMES = {*RESERVED_COLUMNS, UNIT, POS}
#: Columns a WebDataset source adds (see ``curate.io.webdataset``).
WEBDATASET_NAMES = {"key", "image", "image_ext", "width", "height"}
#: Columns a LLaVA source adds (see ``curate.io.llava``).
LLAVA_NAMES = {"conversations", "image", "image_url", "image_source"}
#: Column types a JSONL source may declare for its extra fields.
ColumnType = Literal["string", "int64", "float64", "bool", "json"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(_Strict):
    """An input collection of shards."""

    uri: str | list[str] = Field(
        description="file, directory, glob, brace range, s3:// URI, or a list of them"
    )
    format: Literal["jsonl", "parquet", "webdataset", "llava"] | None = Field(
        None, description="inferred from the file extension when absent (never llava)"
    )
    text_column: str = "text"
    #: For WebDataset: a field of the ``.json`` member, else an id is derived.
    id_column: str | None = None
    #: WebDataset: the member extension holding the caption (``txt``), or ``json:<field>``.
    caption: str = Field("txt", pattern=r"^(json:.+|[a-z0-9_]+(\.[a-z0-9_]+)*)$")
    #: WebDataset: member extensions tried, in order, for the image.
    image_extensions: list[str] = Field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"]
    )
    #: WebDataset: images with more pixels than this are rejected from their header
    #: (never decoded).  The default is Pillow's own decompression-bomb limit.
    max_image_pixels: int = Field(89_478_485, gt=0)
    #: Extra fields to keep, with their types; for Parquet, None keeps all columns.
    columns: dict[str, ColumnType] | None = None
    #: llava: the folder or ``s3://`` prefix image paths are relative to (a relative
    #: one is relative to the pipeline file, like ``uri``); default: each file's folder.
    image_root: str | None = None
    #: llava: read the image files (else ``image`` stays null, ``image_url`` keeps the path).
    load_images: bool = True
    #: Folder relative paths of the spec resolve against (the pipeline file's folder;
    #: set by the planner, never part of the spec or its hash).
    _base_dir: str = PrivateAttr(".")

    @field_validator("columns")
    @classmethod
    def _not_reserved(cls, value: dict[str, ColumnType] | None) -> dict[str, ColumnType] | None:
        taken = sorted(set(value or {}) & (RESERVED_NAMES | WEBDATASET_NAMES | LLAVA_NAMES))
        if taken:
            raise ValueError(f"column names not reserved by curate ({', '.join(taken)} are)")
        return value

    @field_validator("image_root", "load_images")
    @classmethod
    def _llava_only(cls, value: Any, info: ValidationInfo) -> Any:
        if "format" in info.data and info.data["format"] != "llava":
            raise ValueError(f"{info.field_name} only with 'format: llava'")
        return value

    @property
    def base_dir(self) -> str:
        return self._base_dir

    def bind_base_dir(self, base_dir: str) -> None:
        """Say which folder the spec's relative paths (``image_root``) resolve against."""
        self._base_dir = base_dir


class StageSpec(BaseModel):
    """A stage node; unknown keys are the stage's own parameters (checked later)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: str
    input: str | list[str] | None = Field(
        None, description="upstream source or stage; defaults to the previous stage"
    )
    resources: Resources | None = None
    #: Keep this stage's output in the stage cache and reuse it while its inputs,
    #: its spec and upstream specs and the code are unchanged (None: the stage's default).
    cache: bool | None = None

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SinkSpec(_Strict):
    """Where the output of one node is written."""

    input: str
    #: ``llava``: JSON arrays of ``{id, image, conversations, ...}`` plus an ``images/`` folder.
    format: Literal["parquet", "webdataset", "llava"] = "parquet"
    shard_bytes: ByteSize | None = Field(None, description="defaults to execution.shard_bytes")
    #: WebDataset, llava: also cut a tar (a JSON file) after this many samples.
    shard_samples: int | None = Field(None, gt=0)
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    #: Columns to write (reserved columns are always written); None writes all.
    columns: list[str] | None = None


class S3Spec(_Strict):
    """How to reach S3 or an S3-compatible store; credentials come from the AWS chain."""

    endpoint_url: str | None = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO")
    region: str | None = None
    multipart_threshold: ByteSize = Field(ByteSize(64 * 2**20), ge=5 * 2**20)
    part_size: ByteSize = Field(ByteSize(16 * 2**20), ge=5 * 2**20)
    #: Attempts per S3 request, the first included, while S3 throttles (503 SlowDown),
    #: fails with a 5xx, drops the connection or cuts a body short; then the run fails.
    max_attempts: int = Field(8, ge=1, le=100)
    #: Back-off before the first retry (seconds), doubled for each further one up to
    #: max_backoff_s; each wait is drawn between half and all of it.
    backoff_s: float = Field(0.1, ge=0, le=60)
    max_backoff_s: float = Field(10.0, ge=0, le=600)

    @field_validator("endpoint_url", mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        """An http(s) URL with no user info, query or fragment; the value is never echoed
        back (it might hold a credential)."""
        if value is None:
            return None
        parts = urlsplit(str(value))
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or "@" in parts.netloc
            or parts.query
            or parts.fragment
        ):
            raise PydanticCustomError(
                "redacted",
                "an http:// or https:// URL without user:password@, query or fragment "
                "(credentials come from the AWS credential chain); the value is not shown",
            )
        return value


class StorageSpec(_Strict):
    s3: S3Spec = S3Spec()

    def options(self) -> StorageOptions:
        return StorageOptions(
            endpoint_url=self.s3.endpoint_url,
            region=self.s3.region,
            multipart_threshold=int(self.s3.multipart_threshold),
            part_size=int(self.s3.part_size),
            max_attempts=self.s3.max_attempts,
            backoff_s=self.s3.backoff_s,
            max_backoff_s=self.s3.max_backoff_s,
        )


#: ``execution.max_errors`` unless the pipeline says otherwise.
DEFAULT_MAX_ERRORS = "10%"
#: ``execution.isolate_after`` unless the pipeline says otherwise.
DEFAULT_ISOLATE_AFTER = 2


class ExecutionSpec(_Strict):
    """How the work is cut and run."""

    #: Consecutive input shards are grouped into units of work up to this size.
    unit_bytes: ByteSize = ByteSize(64 * 2**20)
    #: Output Parquet shards are cut at about this size.
    shard_bytes: ByteSize = ByteSize(256 * 2**20)
    #: Where cached stage outputs live (``cache: true`` stages); default ``<output>/_cache``.
    cache_dir: str | None = None
    #: Rows of a unit a map stage may quarantine for raising on them (``<type>:error``),
    #: per stage: a count, or a percentage of the unit's rows (at least 1 row unless 0%).
    #: One more fails the run: a stage that raises on that many rows is broken.
    max_errors: int | str = DEFAULT_MAX_ERRORS
    #: Attempts of a unit by a group of map stages that never finished (their process
    #: died: a segfault, the OOM killer) before the unit runs in isolation, each stage in
    #: a sandbox process that bisects out the rows killing it (``curate.sandbox``).
    isolate_after: int = DEFAULT_ISOLATE_AFTER

    @field_validator("max_errors", mode="before")
    @classmethod
    def _max_errors(cls, value: Any) -> int | str:
        return check_max_errors(value)

    @field_validator("isolate_after", mode="before")
    @classmethod
    def _isolate_after(cls, value: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        raise ValueError("a count of attempts (0 or more; 0 isolates every unit)")


_PERCENT = re.compile(r"(\d+(?:\.\d+)?)\s*%")


def check_max_errors(value: Any) -> int | str:
    """``execution.max_errors`` as the spec keeps it: a row count, or ``'<p>%'``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    found = _PERCENT.fullmatch(value.strip()) if isinstance(value, str) else None
    if found is not None and float(found.group(1)) <= 100:
        return f"{found.group(1)}%"
    raise ValueError("a row count (0 or more) or a percentage of a unit's rows, like 10%")


def error_limit(max_errors: int | str, rows: int) -> int:
    """How many of a unit's ``rows`` a stage may quarantine for raising on them."""
    if isinstance(max_errors, int):
        return max_errors
    percent = float(max_errors.rstrip("%"))
    return max(1, math.floor(rows * percent / 100)) if percent else 0


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
    storage: StorageSpec = StorageSpec()
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
    cache: bool = False
