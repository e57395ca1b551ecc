"""``decontaminate``: drop rows that share an n-gram with an evaluation set.

SPECS §8.4 ("decontaminate against evaluation benchmarks, 13-gram overlap"),
with the method of GPT-3 (Brown et al. 2020, §4 and App. C) as NeMo Curator
implements it; :mod:`curate.synth.decontam` documents the details and their
sources.  In short:

* every text is normalized the same way, evaluation items and rows alike:
  Unicode NFKC, lowercase, punctuation (Unicode category P and the ASCII symbols
  of ``string.punctuation``) deleted, split on whitespace;
* an evaluation item of ``ngram`` (13) tokens or more contributes all its
  13-grams; an item of ``min_tokens`` (8) to 12 tokens contributes itself, whole
  (GPT-3: "or that overlap with the whole example when it is shorter than
  13-grams"); shorter items are not indexed (GPT-3 App. C's minimum of 8);
* a row is dropped when one of ``columns`` (default ``text``) contains an
  indexed sequence, contiguous, after normalization.  A 12-token overlap with a
  long item does not drop a row at ``ngram: 13``.

Config::

    decon:
      type: decontaminate
      columns: [question, answer]          # default [text]
      eval_sets:
        gsm8k: {path: evals/gsm8k_test.jsonl, format: jsonl, fields: [question, answer]}
        mmlu:  {path: s3://bucket/mmlu_test.parquet, format: parquet, fields: [question]}
        lambada: {path: evals/lambada.txt, format: txt}   # one item per line

``path`` is resolved like a model file (relative to the pipeline file, absolute,
or ``s3://``), so ``curate validate`` checks that it exists and the manifest's
``models`` section records each file (role ``eval_sets.<name>.path``) with its
size and sha256 (which also keys the stage cache of downstream stages).  JSONL
and txt files may be ``.gz`` or ``.zst``.  Every listed field must be present in
every record (a list of texts gives one item per element; a null gives none).
The contents are read when the stage's actors start (``setup()``): a missing
field, a line that is not a JSON object, bad UTF-8 or an unreadable Parquet file
raises :class:`~curate.synth.decontam.EvalSetError` naming the eval set, the file
as written and the line (or row).  An eval set with no item of ``min_tokens``
words or more is an error too: it would never match anything.

The index (64-bit hashes of every indexed sequence, sorted) is built once per
actor in ``setup()``; every hash hit is verified against the item's tokens, so
only exact normalized matches drop rows.

Reads ``columns``; writes nothing; kept rows are unchanged.  Drop reason:
``contaminated:<eval set name>``, value: the first matching sequence as
normalized text.  "First" is: the first of ``columns`` that matches, then the
earliest position in it, then the longer sequence; when several eval sets hold
that sequence, the first of them in the config names the reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.models import ModelError, local_path
from curate.stage import Filter, StageConfig, Verdict
from curate.synth.decontam import EvalFormat, EvalIndex, EvalSetError, read_items

#: Eval set names become part of drop reasons: keep them to one plain word.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")


class EvalSetConfig(BaseModel):
    """One evaluation file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Local path (relative to the pipeline file) or ``s3://`` URI.
    path: str = Field(min_length=1)
    format: EvalFormat
    #: JSONL / Parquet fields whose texts are indexed; none for ``txt``.
    fields: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _fields_fit_format(self) -> EvalSetConfig:
        if self.format == "txt" and self.fields:
            raise ValueError("no fields for a txt file (it has one item per line)")
        if self.format != "txt" and not self.fields:
            raise ValueError(f"fields: the {self.format} fields to index")
        if len(set(self.fields)) != len(self.fields):
            raise ValueError("each field listed once")
        return self


class DecontaminateConfig(StageConfig):
    #: Evaluation sets by name; the name is the detail of the drop reason.
    eval_sets: dict[str, EvalSetConfig] = Field(min_length=1)
    #: Words per n-gram (GPT-3 and SPECS §8.4: 13).
    ngram: int = Field(13, ge=1)
    #: Eval items of fewer words are not indexed; items of ``min_tokens`` to
    #: ``ngram - 1`` words are matched whole (GPT-3 App. C, NeMo Curator: 8).
    min_tokens: int = Field(8, ge=1)
    #: Row columns to check, in order (the first that matches gives the value).
    columns: list[str] = Field(default_factory=lambda: ["text"], min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> DecontaminateConfig:
        bad = [n for n in self.eval_sets if not NAME.fullmatch(n)]
        if bad:
            raise ValueError(
                "eval set names of letters, digits, '_', '-' and '.' (a name becomes the "
                f"drop reason contaminated:<name>), not {bad[0]!r}"
            )
        if self.min_tokens > self.ngram:
            raise ValueError(f"min_tokens ({self.min_tokens}) <= ngram ({self.ngram})")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("each column listed once")
        return self


class Decontaminate(Filter):
    """Drops rows sharing an n-gram with an evaluation set (``contaminated:<set>``)."""

    Config: ClassVar[type[StageConfig]] = DecontaminateConfig
    config: DecontaminateConfig
    #: Reasons are ``contaminated:<name>`` with names from the config: a fixed set.
    reason_details: ClassVar[bool] = True
    index: EvalIndex | None = None

    def reads(self) -> Sequence[str]:
        return tuple(self.config.columns)

    def models(self) -> Mapping[str, str]:
        return {f"eval_sets.{name}.path": s.path for name, s in self.config.eval_sets.items()}

    def setup(self) -> None:
        if self.index is None:
            self.index = self._build()

    def _build(self) -> EvalIndex:
        cfg = self.config
        sets = []
        for name, spec in cfg.eval_sets.items():
            try:
                path = local_path(spec.path, self.context.base_dir, self.context.storage)
            except (ModelError, OSError) as exc:
                raise EvalSetError(f"eval set {name!r}: cannot open {spec.path}: {exc}") from None
            sets.append((name, read_items(name, spec.path, path, spec.format, spec.fields)))
        index = EvalIndex.build(sets, cfg.ngram, cfg.min_tokens)
        for name, stats in index.stats.items():
            if stats.long + stats.whole == 0:
                raise EvalSetError(
                    f"eval set {name!r}: none of its {stats.items} item(s) in "
                    f"{cfg.eval_sets[name].path} has {cfg.min_tokens} words or more, so "
                    "nothing would ever match; check fields (and min_tokens)"
                )
        return index

    def decide(self, batch: pa.Table) -> Verdict:
        self.setup()
        assert self.index is not None
        n = batch.num_rows
        keep = np.ones(n, dtype=bool)
        reason: list[str | None] = [None] * n
        value: list[str | None] = [None] * n
        for column in self.config.columns:
            rows = np.flatnonzero(keep)
            if not len(rows):
                break
            texts = batch.column(column)
            if len(rows) < n:
                texts = texts.take(pa.array(rows))
            for row, match in zip(rows.tolist(), self.index.match(texts), strict=True):
                if match is not None:
                    keep[row] = False
                    reason[row] = f"contaminated:{self.index.names[match.eval_set]}"
                    value[row] = match.text
        return Verdict(keep, pa.array(reason, pa.string()), pa.array(value, pa.string()))
