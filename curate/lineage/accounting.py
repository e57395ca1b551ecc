"""Per-unit accounting: stage counts, input and output facts, rejects files.

Every step that touches a unit appends a report to the block's Arrow schema
metadata (key ``curate.reports``); the segment's writer returns them to the
driver as one small row per unit.  Counts are exact and checked at the
source: a stage whose ``rows_in != kept + dropped`` raises at once.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.files import write_parquet_atomic
from curate.io.readers import REJECT_SCHEMA
from curate.io.storage import LOCAL, StorageOptions
from curate.stage import POS, UNIT, reason_category

REPORTS_KEY = b"curate.reports"


class AccountingError(AssertionError):
    """Rows were lost or invented: a bug in a stage or in the runner."""


@dataclass
class StageReport:
    """What one stage did to one unit."""

    stage: str
    unit: int
    rows_in: int
    kept: int
    dropped: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    kind: str = "stage"
    #: Rows a generator made from its ``kept`` seeds (None: the stage passes ``kept`` on).
    rows_out: int | None = None

    def check(self) -> StageReport:
        if self.rows_in != self.kept + self.dropped or sum(self.reasons.values()) != self.dropped:
            raise AccountingError(
                f"stage {self.stage!r} unit {self.unit}: counts do not balance: {self}"
            )
        return self


def reports_of(table: pa.Table) -> list[dict[str, Any]]:
    raw = (table.schema.metadata or {}).get(REPORTS_KEY)
    return list(json.loads(raw)) if raw else []


def with_reports(table: pa.Table, reports: list[dict[str, Any]]) -> pa.Table:
    """Return ``table`` carrying ``reports`` after the ones it already has."""
    meta = dict(table.schema.metadata or {})
    meta[REPORTS_KEY] = json.dumps(reports_of(table) + reports).encode()
    return table.replace_schema_metadata(meta)


def stage_report(
    stage: str,
    unit: int,
    rows_in: int,
    rejects: pa.Table,
    seconds: float,
    rejects_file: dict[str, Any] | None,
    details: bool = False,
    rows_out: int | None = None,
    full: Collection[str] = (),
) -> dict[str, Any]:
    """Check and describe what ``stage`` did to ``unit``; reasons are counted by
    category, or in full when ``details`` (the stage's rule names are a fixed set);
    the reasons in ``full`` (``<type>:error``) are always counted in full."""
    raw = rejects.column("reason").to_pylist()
    if details:
        reasons = Counter(raw)
    else:
        reasons = Counter(r if r in full else reason_category(r) for r in raw)
    report = StageReport(
        stage,
        unit,
        rows_in,
        rows_in - rejects.num_rows,
        rejects.num_rows,
        dict(sorted(reasons.items())),
        seconds,
        rows_out=rows_out,
    )
    return {**asdict(report.check()), "rejects_file": rejects_file}


def numeric_scores(table: pa.Table) -> pa.Array:
    """Each row's numeric columns (integers and floats, not the internal ones) as a
    ``map<string, float64>``; NaN and null values are left out of a row's map."""
    names = [
        f.name
        for f in table.schema
        if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        and f.name not in (UNIT, POS)
    ]
    n, k = table.num_rows, len(names)
    kind = pa.map_(pa.string(), pa.float64())
    if not k or not n:
        return pa.nulls(n, kind)
    values = np.column_stack(
        [
            np.asarray(
                pc.cast(table.column(c), pa.float64()).to_numpy(zero_copy_only=False), np.float64
            )
            for c in names
        ]
    )
    present = ~np.isnan(values)
    offsets = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
    keys = np.tile(np.array(names, dtype=object), n).reshape(n, k)[present]
    return pa.MapArray.from_arrays(
        pa.array(offsets, pa.int32()),
        pa.array(keys.tolist(), pa.string()),
        pa.array(values[present], pa.float64()),
        type=kind,
    )


def build_rejects(
    stage: str, dropped: pa.Table, reason: pa.Array, value: pa.Array | None
) -> pa.Table:
    """Rejects rows (``id, stage, reason, value, provenance, scores``) for the dropped
    rows."""
    n = dropped.num_rows
    if reason.null_count:
        raise AccountingError(f"stage {stage!r} dropped {reason.null_count} rows without a reason")
    values = value if value is not None else pa.nulls(n, pa.string())
    return pa.table(
        {
            "id": dropped.column("id"),
            "stage": pa.array([stage] * n, pa.string()),
            "reason": pc.cast(reason, pa.string()),
            "value": pc.cast(values, pa.string()),
            "provenance": dropped.column("provenance"),
            "scores": numeric_scores(dropped),
        },
        schema=REJECT_SCHEMA,
    )


def write_rejects(
    path: str, rejects: pa.Table, opts: StorageOptions = LOCAL
) -> dict[str, Any] | None:
    """Write a unit's rejects of one stage (nothing when there are none); return its facts."""
    if not rejects.num_rows:
        return None
    written = write_parquet_atomic(rejects, path, "zstd", opts)
    return {
        "path": written.path,
        "rows": written.rows,
        "bytes": written.bytes,
        "sha256": written.sha256,
    }


def split_by_mask(
    table: pa.Table, keep: np.ndarray[Any, np.dtype[np.bool_]]
) -> tuple[pa.Table, pa.Table]:
    mask = pa.array(keep, pa.bool_())
    return table.filter(mask), table.filter(pc.invert(mask))
