"""``capability_select``: keep a budget of the pool, chosen by capability scores.

Methods (``method:``):

* ``mmssr``: mmSSR's style-balanced, score-first round robin over the
  capabilities named in ``capabilities`` (all 14 by default), on the columns
  ``capability_score`` writes (``mmssr_<capability>``, ``mmssr_styles``) and the
  sample's ``image_source``: exactly ``llava/select/mmssr.py``, with the orders
  its unstable sorts leave to chance fixed (see :mod:`curate.selection`).
  ``threshold`` (0-5, default 0) is the score a sample must exceed for a
  capability to take it.
* ``random``: a uniform sample, by a seeded hash of the id (the paper's Random).
* ``top_k``: the best rows by any score ``column`` (CLIP score, perplexity
  with ``order: ascending``); ties by pool order.

The budget is ``fraction`` of the pool (``int(n * fraction)``, as mmSSR) or
``rows``.  The pool order is the input order (unit, then row), so the result
never depends on how many CPUs ran it.  The selection runs in one Ray task
over the key columns (about 80 bytes a sample: 2.6 M samples need ~200 MB).

Kept rows get ``selected_by`` (the capability whose round took the row, the
score column, or ``random``) and, for ``mmssr``, ``selection_round`` and
``selection_bin`` (``<style>+<image_source>``).  Every other row is dropped as
``capability_select:not_selected``.  The manifest's stage row records the
budget, what was selected, and per capability and style the pool and
selected counts and score histograms; a budget that could not be met says why.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import Field, field_validator, model_validator

from curate.mllm.mmssr import CAPABILITIES, capability_key
from curate.selection import Bins, Selection, mmssr_select, random_select, style_bins, tie_order
from curate.selection import top_k as top_k_select
from curate.stage import POS, UNIT, GlobalStage, StageConfig

REASON = "capability_select:not_selected"


class CapabilitySelectConfig(StageConfig):
    method: Literal["mmssr", "random", "top_k"] = "mmssr"
    #: Budget as a share of the pool (``int(n * fraction)``) ...
    fraction: float | None = Field(None, gt=0, le=1)
    #: ... or as a number of rows.
    rows: int | None = Field(None, ge=0)
    #: mmssr: the capabilities to target (keys or full names), in this order.
    capabilities: list[str] = Field(default_factory=lambda: [k for k, _ in CAPABILITIES])
    #: mmssr: a capability takes only samples scoring above this (0-5).
    threshold: float = Field(0.0, ge=0, le=5)
    #: mmssr: score columns are ``<prefix><capability>``; styles ``<prefix>styles``.
    prefix: str = "mmssr_"
    #: mmssr: bins are ``<style>+<this column>``; None bins by style alone.
    source_column: str | None = "image_source"
    #: Score ties: pool order (a stable sort) or a seeded hash of the id.
    ties: Literal["pool", "seeded"] = "pool"
    #: top_k: the score column and which end is best.
    column: str | None = None
    order: Literal["descending", "ascending"] = "descending"

    @field_validator("capabilities")
    @classmethod
    def _known(cls, caps: list[str]) -> list[str]:
        try:
            keys = [capability_key(c) for c in caps]
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None
        if not keys:
            raise ValueError("at least one capability")
        if len(set(keys)) != len(keys):
            raise ValueError("a capability is listed twice")
        return keys

    @model_validator(mode="after")
    def _consistent(self) -> CapabilitySelectConfig:
        if (self.fraction is None) == (self.rows is None):
            raise ValueError("give exactly one of fraction and rows")
        if self.method == "top_k" and self.column is None:
            raise ValueError("method top_k needs column")
        if self.method != "top_k" and self.column is not None:
            raise ValueError(f"column is for method top_k, not {self.method}")
        return self


class CapabilitySelect(GlobalStage):
    """Keeps a budgeted selection of the pool (mmSSR, random or top-k)."""

    Config: ClassVar[type[StageConfig]] = CapabilitySelectConfig
    config: CapabilitySelectConfig
    reason_details: ClassVar[bool] = True

    def reads(self) -> Sequence[str]:
        cfg = self.config
        if cfg.method == "top_k":
            assert cfg.column is not None
            return (cfg.column,)
        if cfg.method == "random":
            return ()
        source = (cfg.source_column,) if cfg.source_column else ()
        return (*(cfg.prefix + c for c in cfg.capabilities), cfg.prefix + "styles", *source)

    def writes(self) -> Mapping[str, pa.DataType]:
        out: dict[str, pa.DataType] = {"selected_by": pa.string()}
        if self.config.method == "mmssr":
            out["selection_round"] = pa.int32()
            out["selection_bin"] = pa.string()
        return out

    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        refs = keys.select_columns([UNIT, POS, "id", *self.reads()]).to_arrow_refs()
        task = ray.remote(num_returns=2)(_select)
        decisions, summary = task.remote(self.config.model_dump(), self.context.seed, *refs)
        self.summary = ray.get(summary)
        return ray.data.from_arrow_refs([decisions])


def _select(
    params: dict[str, Any], seed: int, *blocks: pa.Table
) -> tuple[pa.Table, dict[str, Any]]:
    cfg = CapabilitySelectConfig.model_validate(params)
    pool = pa.concat_tables([b for b in blocks if b.num_rows]).combine_chunks()
    pool = pool.sort_by([(UNIT, "ascending"), (POS, "ascending")])
    n = pool.num_rows
    n_select = int(n * cfg.fraction) if cfg.fraction is not None else min(cfg.rows or 0, n)
    ids = pool.column("id").to_pylist()
    ties = tie_order(ids, seed) if cfg.ties == "seeded" else None
    summary: dict[str, Any] = {"method": cfg.method, "pool": n, "budget": n_select}
    by = np.full(n, None, dtype=object)
    rounds = np.zeros(n, np.int32)
    bins = np.full(n, None, dtype=object)
    if cfg.method == "random":
        chosen = random_select(ids, n_select, seed)
        by[chosen] = "random"
    elif cfg.method == "top_k":
        assert cfg.column is not None
        score = _floats(pool, cfg.column)
        chosen = top_k_select(score, n_select, cfg.order == "descending", ties)
        by[chosen] = cfg.column
        summary["column"] = {"name": cfg.column, "order": cfg.order, **_extent(score, chosen)}
    else:
        selection, stats = _mmssr(cfg, pool, n_select, ties)
        chosen = sorted(selection.chosen)
        for i in chosen:
            by[i] = selection.capability[i]
            rounds[i] = selection.round[i]
            bins[i] = selection.bin[i]
        summary.update(stats)
    summary["selected"] = len(chosen)
    if len(chosen) < n_select:
        summary["unmet"] = _unmet(cfg, len(chosen), n_select)
    keep = np.zeros(n, dtype=bool)
    keep[chosen] = True
    columns: dict[str, pa.Array] = {
        UNIT: pool.column(UNIT),
        POS: pool.column(POS),
        "reason": pa.array([None if k else REASON for k in keep.tolist()], pa.string()),
        "value": pa.nulls(n, pa.string()),
        "selected_by": pa.array(by, pa.string()),
    }
    if cfg.method == "mmssr":
        columns["selection_round"] = pa.array(rounds, pa.int32(), mask=~keep)
        columns["selection_bin"] = pa.array(bins, pa.string())
    return pa.table(columns), summary


def _floats(table: pa.Table, column: str) -> np.ndarray[Any, Any]:
    col = pc.cast(table.column(column), pa.float64())
    return np.asarray(col.to_numpy(zero_copy_only=False), np.float64)


def _extent(score: np.ndarray[Any, Any], chosen: list[int]) -> dict[str, Any]:
    picked = score[chosen]
    if not len(picked):
        return {"selected_min": None, "selected_max": None}
    return {"selected_min": float(picked.min()), "selected_max": float(picked.max())}


def _mmssr(
    cfg: CapabilitySelectConfig, pool: pa.Table, n_select: int, ties: np.ndarray[Any, Any] | None
) -> tuple[Selection, dict[str, Any]]:
    scores = {c: _floats(pool, cfg.prefix + c) for c in cfg.capabilities}
    styles = pool.column(cfg.prefix + "styles").to_pylist()
    sources = (
        pool.column(cfg.source_column).to_pylist() if cfg.source_column else [None] * pool.num_rows
    )
    if cfg.source_column is None:
        binned = [list(row or ()) for row in styles]
    else:
        binned = style_bins(styles, [s if s is not None else "" for s in sources])
    selection = mmssr_select(scores, Bins.of(binned), n_select, cfg.threshold, ties)
    chosen = selection.chosen
    per_cap: dict[str, Any] = {}
    for cap, score in scores.items():
        picked = [i for i in chosen if selection.capability[i] == cap]
        per_cap[cap] = {
            "selected_for": len(picked),
            "pool_histogram": _histogram(score),
            "selected_histogram": _histogram(score[sorted(chosen)]),
        }
    stats = {
        "capabilities": list(cfg.capabilities),
        "threshold": cfg.threshold,
        "ties": cfg.ties,
        "rounds": selection.rounds,
        "exhausted": selection.exhausted,
        "bins": len({b for row in binned for b in row}),
        "per_capability": per_cap,
        "styles": _counts(styles, chosen),
        "sources": _counts([[s] if s is not None else [] for s in sources], chosen),
    }
    return selection, stats


def _histogram(score: np.ndarray[Any, Any]) -> dict[str, int]:
    """Counts of each score 0-5 and of missing ones."""
    out = {str(v): int((score == v).sum()) for v in range(6)}
    out["missing"] = int(np.isnan(score).sum())
    return out


def _counts(labels: Sequence[Sequence[str] | None], chosen: Sequence[int]) -> dict[str, Any]:
    pool = Counter(label for row in labels for label in (row or ()))
    picked = Counter(label for i in chosen for label in (labels[i] or ()))
    return {k: {"pool": pool[k], "selected": picked[k]} for k in sorted(pool)}


def _unmet(cfg: CapabilitySelectConfig, got: int, wanted: int) -> str:
    if cfg.method == "mmssr":
        return (
            f"selected {got} of {wanted}: every capability ran out of samples with a style "
            f"and a score above {cfg.threshold}"
        )
    if cfg.method == "top_k":
        return f"selected {got} of {wanted}: only {got} rows have a {cfg.column!r} score"
    return f"selected {got} of {wanted}"
