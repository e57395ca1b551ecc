"""Thresholds on score columns: absolute, or as global percentiles.

* ``score_filter`` keeps rows whose score lies in ``[min, max]`` (or whose label
  is one of ``values``); with ``any:`` / ``all:`` it combines several such
  conditions: Open-Qwen2VL keeps a pair that passes the CLIP filter *or*
  MLM-Filter's SU >= 85.
* ``percentile_filter`` keeps the top, bottom or middle fraction of a score,
  over the whole dataset or per group (``by: lang``): DCLM's "top 10 % of
  P(hq)", Perplexed-by-Perplexity's low / medium / high 50 %.
* ``percentile_bucket`` labels every row by where its score falls among
  global (per-group) percentiles: CCNet's head / middle / tail perplexity
  buckets at the 30th and 60th percentiles.

Percentiles are exact order statistics computed on Ray
(:func:`curate.quantiles.order_statistics`, no sketch); the manifest's stage
row records, per group, the number of scores, the fractions asked and the
absolute thresholds they resolved to.  Ranks are 0-based over the ascending
scores: the top fraction ``f`` keeps scores at or above the one at rank
``floor((1-f)·n)``, the bottom fraction ``f`` scores at or below rank
``ceil(f·n)-1``; ties at a threshold are all kept, so the kept share can
exceed ``f`` by the size of the tie.  Null and NaN scores are dropped
(``percentile_filter:missing``) or get a null bucket.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from pydantic import Field, model_validator

from curate.quantiles import order_statistics
from curate.rules import format_value
from curate.stage import (
    DECISION_SCHEMA,
    POS,
    UNIT,
    Fill,
    Filter,
    GlobalStage,
    StageConfig,
    Verdict,
    decision_schema,
)

#: DataComp's CLIP-score thresholds on its pool (Gadre et al. 2023, Table 16: the
#: cosine threshold that keeps a given percentage, no English filter), SPECS §3.1.
DATACOMP_THRESHOLDS: dict[str, dict[int, float]] = {
    "b32": {1: 0.384, 3: 0.358, 10: 0.325, 20: 0.300, 30: 0.281, 40: 0.263, 50: 0.247,
            75: 0.215, 90: 0.193},
    "l14": {1: 0.364, 3: 0.334, 10: 0.295, 20: 0.266, 30: 0.243, 40: 0.222, 50: 0.203,
            75: 0.160, 90: 0.129},
}  # fmt: skip


def _score_presets() -> dict[str, tuple[str, float]]:
    presets = {
        f"datacomp_{model}_{pct}": ("clip_score", t)
        for model, table in DATACOMP_THRESHOLDS.items()
        for pct, t in table.items()
    }
    # DataComp's LAION-2B reproduction: B/32 >= 0.28 (+ English)
    presets["laion2b"] = ("clip_score", 0.28)
    # Open-Qwen2VL: MLM-Filter semantic understanding >= 85 (SPECS §2.1)
    presets["open_qwen2vl_su"] = ("mlm_su", 85.0)
    return presets


#: ``preset`` name -> (column, minimum); CLIP scores are cosines (``scale: cosine``).
SCORE_PRESETS = _score_presets()


class _ColumnTest(StageConfig):
    """The test of one column: ``min`` and/or ``max`` (inclusive) on a number, or
    ``values``, the labels that pass (a string column such as ``percentile_bucket``'s
    ``bucket``).  ``preset`` fills ``column`` and ``min`` (see :data:`SCORE_PRESETS`)."""

    min: float | None = None
    max: float | None = None
    values: list[str] | None = Field(None, min_length=1)
    preset: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("preset") is None:
            return data
        name = data["preset"]
        if name not in SCORE_PRESETS:
            raise ValueError(
                f"unknown preset {name!r}; expected one of {', '.join(sorted(SCORE_PRESETS))}"
            )
        column, low = SCORE_PRESETS[name]
        return {"column": column, "min": low, **data}

    def _check_test(self) -> None:
        bounded = self.min is not None or self.max is not None
        if self.values is not None and bounded:
            raise ValueError("give min and/or max (a score) or values (labels), not both")
        if self.values is None and not bounded:
            raise ValueError("give min and/or max, or values")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")


class ScoreCondition(_ColumnTest):
    """One condition of ``score_filter``'s ``any`` / ``all``."""

    column: str

    @model_validator(mode="after")
    def _valid(self) -> ScoreCondition:
        self._check_test()
        return self

    def failures(self, batch: pa.Table) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """Per row, why it fails (``missing``, ``below_min``, ``above_max``, ``not_in``;
        None when it passes) and the value as the rejects show it (None when missing)."""
        col = batch.column(self.column)
        n = batch.num_rows
        why = np.full(n, None, dtype=object)
        if self.values is not None:
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                col = pc.cast(col, pa.string())
            shown = np.asarray(col.to_pylist(), dtype=object).reshape(n)
            allowed = set(self.values)
            missing = np.fromiter((v is None for v in shown), dtype=bool, count=n)
            outside = np.fromiter((v is not None and v not in allowed for v in shown), bool, n)
            why[missing] = "missing"
            why[outside] = "not_in"
            return why, shown
        score = col.to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.isnan(score)
        why[missing] = "missing"
        if self.min is not None:
            why[~missing & (score < self.min)] = "below_min"
        if self.max is not None:
            why[~missing & (score > self.max)] = "above_max"
        shown = np.full(n, None, dtype=object)
        failed = (why != None) & ~missing  # noqa: E711 - elementwise
        shown[failed] = [format_value(v) for v in score[failed]]
        return why, shown


class ScoreFilterConfig(_ColumnTest):
    """Keep rows whose ``column`` lies in ``[min, max]`` (bounds inclusive, either
    optional), or with ``values:`` rows whose label is one of them (CCNet's head:
    ``{column: bucket, values: [head]}``).  A null or NaN score is dropped
    (``score_filter:missing``); the other reasons are ``score_filter:below_min``,
    ``:above_max`` and ``:not_in``.

    ``preset: datacomp_<b32|l14>_<pct>`` sets ``column: clip_score`` and ``min`` to
    the cosine threshold that kept ``pct`` % of DataComp's pool with that CLIP model
    (pct in 1, 3, 10, 20, 30, 40, 50, 75, 90); ``preset: laion2b`` is B/32 ≥ 0.28;
    ``preset: open_qwen2vl_su`` is ``mlm_su`` ≥ 85 (MLM-Filter's semantic
    understanding, as Open-Qwen2VL filters).
    On another pool the kept share differs: ``percentile_filter`` keeps an exact
    share instead.

    ``any: [condition, ...]`` keeps a row that passes at least one condition,
    ``all: [...]`` one that passes every condition; each condition is a
    ``{column, min, max, values, preset}`` mapping as above.  Open-Qwen2VL's
    "CLIP filter ∪ MLM-Filter"::

        any:
          - {column: dfn_bucket, values: [top]}
          - {preset: open_qwen2vl_su}

    A dropped row's reason names every condition it failed and how,
    ``score_filter:any:<column>.<failure>+<column>.<failure>`` (``all:`` likewise,
    only the failed ones), failures being ``missing``, ``below_min``,
    ``above_max`` and ``not_in``; its value gives ``<column>=<value>`` for each.
    A missing value fails its condition only: under ``any`` another may pass."""

    column: str | None = None
    any: list[ScoreCondition] | None = Field(None, min_length=1)
    all: list[ScoreCondition] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _bounds(self) -> ScoreFilterConfig:
        forms = [
            name
            for name, given in (
                ("column", self.column is not None),
                ("any", self.any is not None),
                ("all", self.all is not None),
            )
            if given
        ]
        if len(forms) != 1:
            raise ValueError(
                "give one of column (with min / max, values or a preset), any: [...] or "
                f"all: [...]; got {' and '.join(forms) or 'none'}"
            )
        if self.column is not None:
            self._check_test()
        elif self.min is not None or self.max is not None or self.values is not None:
            raise ValueError("with any / all, min, max and values go inside each condition")
        return self

    def mode(self) -> Literal["single", "any", "all"]:
        if self.any is not None:
            return "any"
        return "all" if self.all is not None else "single"

    def conditions(self) -> list[ScoreCondition]:
        """The conditions the filter tests (the single one without any / all)."""
        if self.any is not None:
            return list(self.any)
        if self.all is not None:
            return list(self.all)
        assert self.column is not None
        return [ScoreCondition(column=self.column, min=self.min, max=self.max, values=self.values)]


class ScoreFilter(Filter):
    """Absolute thresholds on score columns, alone or combined (``any`` / ``all``):
    reasons ``score_filter:below_min|above_max|not_in|missing``, or
    ``score_filter:<any|all>:<column>.<failure>+...``."""

    Config: ClassVar[type[StageConfig]] = ScoreFilterConfig
    config: ScoreFilterConfig
    reason_details: ClassVar[bool] = True

    def reads(self) -> Sequence[str]:
        return tuple(dict.fromkeys(c.column for c in self.config.conditions()))

    def decide(self, batch: pa.Table) -> Verdict:
        mode = self.config.mode()
        tested = [c.failures(batch) for c in self.config.conditions()]
        n = batch.num_rows
        if mode == "single":
            why, shown = tested[0]
            reason = np.full(n, None, dtype=object)
            failed = why != None  # noqa: E711 - elementwise
            reason[failed] = ["score_filter:" + w for w in why[failed]]
            value = np.full(n, None, dtype=object)
            value[failed] = shown[failed]
            keep = np.asarray(~failed, dtype=bool)
            return Verdict(keep, pa.array(reason, pa.string()), pa.array(value, pa.string()))
        fails = np.stack([why != None for why, _ in tested])  # noqa: E711 - elementwise
        passed = ~fails.all(axis=0) if mode == "any" else ~fails.any(axis=0)
        keep = np.asarray(passed, dtype=bool)
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        columns = [c.column for c in self.config.conditions()]
        for row in np.flatnonzero(~keep):
            # each failed (column, failure) once: two conditions may test one column
            parts = list(
                dict.fromkeys(
                    (column, why[row], shown[row])
                    for column, (why, shown) in zip(columns, tested, strict=True)
                    if why[row] is not None
                )
            )
            reason[row] = f"score_filter:{mode}:" + "+".join(f"{c}.{w}" for c, w, _ in parts)
            value[row] = "; ".join(f"{c}={'null' if v is None else v}" for c, _, v in parts)
        return Verdict(keep, pa.array(reason, pa.string()), pa.array(value, pa.string()))


# --------------------------------------------------------------------------------------


class PercentileFilterConfig(StageConfig):
    """Exactly one of ``top_fraction``, ``bottom_fraction``, ``middle_fraction``.
    ``rule`` is the Perplexed-by-Perplexity spelling: ``low``, ``medium`` or
    ``high`` keep the bottom, middle or top ``fraction``."""

    column: str
    by: str | None = None
    top_fraction: float | None = Field(None, gt=0, le=1)
    bottom_fraction: float | None = Field(None, gt=0, le=1)
    middle_fraction: float | None = Field(None, gt=0, le=1)
    rule: Literal["low", "medium", "high"] | None = None
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one(self) -> PercentileFilterConfig:
        given = [
            f
            for f in ("top_fraction", "bottom_fraction", "middle_fraction", "rule")
            if getattr(self, f) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of top_fraction, bottom_fraction, middle_fraction, rule; "
                f"got {given or 'none'}"
            )
        if (self.rule is None) != (self.fraction is None):
            raise ValueError("rule and fraction go together")
        return self

    def quantiles(self) -> tuple[float | None, float | None]:
        """(lower, upper) quantile of the kept range; None for an open end."""
        top, bottom, middle = self.top_fraction, self.bottom_fraction, self.middle_fraction
        if self.rule is not None:
            top = self.fraction if self.rule == "high" else None
            bottom = self.fraction if self.rule == "low" else None
            middle = self.fraction if self.rule == "medium" else None
        if top is not None:
            return (1 - top if top < 1 else None), None
        if bottom is not None:
            return None, (bottom if bottom < 1 else None)
        assert middle is not None
        return (1 - middle) / 2, (1 + middle) / 2


class _Percentiles(GlobalStage):
    """Shared: resolve thresholds with an exact distributed selection."""

    config: Any

    def reads(self) -> Sequence[str]:
        by = (self.config.by,) if self.config.by else ()
        return (self.config.column, *by)

    @abstractmethod
    def wanted(self) -> list[float]:
        """The quantiles whose values the stage needs."""

    def resolve(self, keys: ray.data.Dataset) -> tuple[list[Any], dict[str, dict[str, Any]]]:
        cols = [UNIT, POS, *self.reads()]
        refs = keys.select_columns(cols).to_arrow_refs()
        stats = order_statistics(refs, self.config.column, self.config.by, self.wanted())
        return refs, stats


def _json_float(v: float) -> float | str:
    """A threshold for the manifest: infinities as text (JSON has no Infinity)."""
    return float(v) if np.isfinite(v) else str(v)


def _scores_and_groups(
    block: pa.Table, column: str, by: str | None
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The scores as float64 (null -> NaN) and each row's group ("" without ``by``;
    a null group value is the group "")."""
    if block.num_rows == 0:
        return np.zeros(0, np.float64), np.zeros(0, dtype=object)
    scores = block.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    if not by:
        return scores, np.full(block.num_rows, "", dtype=object)
    col = pc.fill_null(pc.cast(block.column(by), pa.string()), "")
    return scores, np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)


class PercentileFilter(_Percentiles):
    """Keeps a global (per-group) fraction of rows by score."""

    Config: ClassVar[type[StageConfig]] = PercentileFilterConfig
    config: PercentileFilterConfig
    reason_details: ClassVar[bool] = True

    def wanted(self) -> list[float]:
        return [q for q in self.config.quantiles() if q is not None]

    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        refs, stats = self.resolve(keys)
        q_lo, q_hi = self.config.quantiles()
        bounds: dict[str, tuple[float, float]] = {}
        summary: dict[str, Any] = {}
        for group, s in stats.items():
            lo = s[str(q_lo)]["lo"] if q_lo is not None else -np.inf
            hi = s[str(q_hi)]["hi"] if q_hi is not None else np.inf
            bounds[group] = (lo, hi)
            summary[group] = {
                "n": s["n"],
                "lower_quantile": q_lo,
                "lower_threshold": None if q_lo is None else _json_float(lo),
                "upper_quantile": q_hi,
                "upper_threshold": None if q_hi is None else _json_float(hi),
            }
        self.summary = {"column": self.config.column, "by": self.config.by, "groups": summary}
        decide = ray.remote(_filter_block)
        parts: list[Any] = [
            decide.remote(ref, self.config.column, self.config.by, bounds) for ref in refs
        ]
        return (
            ray.data.from_arrow_refs(parts)
            if parts
            else ray.data.from_arrow(DECISION_SCHEMA.empty_table())
        )


def _filter_block(
    block: pa.Table, column: str, by: str | None, bounds: dict[str, tuple[float, float]]
) -> pa.Table:
    if block.num_rows == 0:
        return DECISION_SCHEMA.empty_table()
    scores, groups = _scores_and_groups(block, column, by)
    lo = np.array([bounds.get(g, (np.inf, -np.inf))[0] for g in groups], dtype=np.float64)
    hi = np.array([bounds.get(g, (np.inf, -np.inf))[1] for g in groups], dtype=np.float64)
    missing = np.isnan(scores)
    below = ~missing & (scores < lo)
    above = ~missing & (scores > hi)
    drop = missing | below | above
    reason = np.where(
        missing,
        "percentile_filter:missing",
        np.where(below, "percentile_filter:below", "percentile_filter:above"),
    )
    value = np.array([format_value(v) for v in scores[drop]], dtype=object)
    value[missing[drop]] = None
    take = pa.array(np.flatnonzero(drop))
    return pa.table(
        {
            UNIT: block.column(UNIT).take(take),
            POS: block.column(POS).take(take),
            "reason": pa.array(reason[drop], pa.string()),
            "value": pa.array(value, pa.string()),
        },
        schema=DECISION_SCHEMA,
    )


class PercentileBucketConfig(StageConfig):
    """``cuts``: ascending quantiles that separate the buckets, ``names``: one more
    name than cuts.  CCNet: cuts 0.3 and 0.6, names head / middle / tail, over
    perplexity per language.  A score goes to the first bucket whose cut value
    it is strictly below (CCNet's ``<``)."""

    column: str
    by: str | None = None
    cuts: list[float] = Field(default_factory=lambda: [0.3, 0.6])
    names: list[str] = Field(default_factory=lambda: ["head", "middle", "tail"])
    output: str = "bucket"

    @model_validator(mode="after")
    def _shape(self) -> PercentileBucketConfig:
        if len(self.names) != len(self.cuts) + 1:
            raise ValueError(f"{len(self.cuts)} cuts need {len(self.cuts) + 1} names")
        if any(not 0 < c < 1 for c in self.cuts) or self.cuts != sorted(set(self.cuts)):
            raise ValueError("cuts must be increasing quantiles strictly between 0 and 1")
        return self


class PercentileBucket(_Percentiles):
    """Adds ``output`` (default ``bucket``): the percentile bucket of each row's score."""

    Config: ClassVar[type[StageConfig]] = PercentileBucketConfig
    config: PercentileBucketConfig

    def writes(self) -> Mapping[str, pa.DataType]:
        return {self.config.output: pa.string()}

    def fills(self) -> Mapping[str, Fill]:
        return {self.config.output: Fill(value=None)}

    def wanted(self) -> list[float]:
        return list(self.config.cuts)

    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        refs, stats = self.resolve(keys)
        cuts: dict[str, list[float]] = {}
        summary: dict[str, Any] = {}
        for group, s in stats.items():
            cuts[group] = [s[str(q)]["lo"] for q in self.config.cuts]
            summary[group] = {
                "n": s["n"],
                "cuts": {
                    str(q): _json_float(v)
                    for q, v in zip(self.config.cuts, cuts[group], strict=True)
                },
            }
        self.summary = {"column": self.config.column, "by": self.config.by, "groups": summary}
        schema = decision_schema(self)
        label = ray.remote(_bucket_block)
        parts: list[Any] = [
            label.remote(
                ref,
                self.config.column,
                self.config.by,
                cuts,
                self.config.names,
                self.config.output,
                schema,
            )
            for ref in refs
        ]
        return (
            ray.data.from_arrow_refs(parts) if parts else ray.data.from_arrow(schema.empty_table())
        )


def _bucket_block(
    block: pa.Table,
    column: str,
    by: str | None,
    cuts: dict[str, list[float]],
    names: list[str],
    output: str,
    schema: pa.Schema,
) -> pa.Table:
    if block.num_rows == 0:
        return schema.empty_table()
    scores, groups = _scores_and_groups(block, column, by)
    labels = np.full(block.num_rows, None, dtype=object)
    for g in np.unique(groups):
        rows = (groups == g) & ~np.isnan(scores)
        edges = np.asarray(cuts.get(str(g), []), dtype=np.float64)
        index = np.searchsorted(edges, scores[rows], side="right")
        labels[rows] = np.asarray(names, dtype=object)[index]
    n = block.num_rows
    return pa.table(
        {
            UNIT: block.column(UNIT),
            POS: block.column(POS),
            "reason": pa.nulls(n, pa.string()),
            "value": pa.nulls(n, pa.string()),
            output: pa.array(labels, pa.string()),
        },
        schema=schema,
    )
