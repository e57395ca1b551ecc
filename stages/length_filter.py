"""``length_filter``: drop documents outside character and word bounds.

Reads ``n_chars`` and ``n_words`` (written by ``text_stats``): the annotator
measures, the filter decides, so changing a bound needs no recompute.
Bounds are inclusive: a document is kept when ``min <= value <= max``.
Drop reasons, checked in this order (the first failing rule is the reason):
``too_few_chars``, ``too_many_chars``, ``too_few_words``, ``too_many_words``;
the rejects ``value`` is the measured count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.stage import Filter, StageConfig, Verdict


class LengthFilterConfig(StageConfig):
    min_chars: int | None = Field(None, ge=0)
    max_chars: int | None = Field(None, ge=0)
    min_words: int | None = Field(None, ge=0)
    max_words: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> LengthFilterConfig:
        for low, high in (("min_chars", "max_chars"), ("min_words", "max_words")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"{low} ({lo}) must not exceed {high} ({hi})")
        return self


class LengthFilter(Filter):
    """Keeps rows whose ``n_chars`` / ``n_words`` fall inside the bounds."""

    Config: ClassVar[type[StageConfig]] = LengthFilterConfig
    config: LengthFilterConfig

    def reads(self) -> Sequence[str]:
        cfg = self.config
        chars = ("n_chars",) if cfg.min_chars is not None or cfg.max_chars is not None else ()
        words = ("n_words",) if cfg.min_words is not None or cfg.max_words is not None else ()
        return chars + words

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n = batch.num_rows
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        rules = (
            ("n_chars", cfg.min_chars, "too_few_chars", np.less),
            ("n_chars", cfg.max_chars, "too_many_chars", np.greater),
            ("n_words", cfg.min_words, "too_few_words", np.less),
            ("n_words", cfg.max_words, "too_many_words", np.greater),
        )
        for column, bound, name, compare in rules:
            if bound is None:
                continue
            measured = batch.column(column).to_numpy(zero_copy_only=False)
            hit = compare(measured, bound) & (reason == None)  # noqa: E711 - elementwise
            reason[hit] = name
            value[hit] = measured[hit].astype(str)
        keep = reason == None  # noqa: E711 - elementwise
        return Verdict(
            keep=np.asarray(keep, dtype=bool),
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
        )
