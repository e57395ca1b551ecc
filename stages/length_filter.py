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

from curate.rules import Rule, decide
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
        measured = np.stack(
            [
                batch.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
                if c in batch.column_names
                else np.zeros(n)
                for c in ("n_chars", "n_words")
            ],
            axis=1,
        ).reshape(n, 2)
        keep, reason, value = decide(
            measured,
            (
                Rule("too_few_chars", 0, "<", cfg.min_chars),
                Rule("too_many_chars", 0, ">", cfg.max_chars),
                Rule("too_few_words", 1, "<", cfg.min_words),
                Rule("too_many_words", 1, ">", cfg.max_words),
            ),
        )
        return Verdict(keep=keep, reason=reason, value=value)
