"""``basic_filter``: DataComp's "basic filtering" baseline for image-text pairs.

The rules of ``load_uids_with_basic_filter_helper`` in ``mlfoundations/datacomp``
(``baselines.py``), SPECS §3.1, checked in this order; the first that fails is
the drop reason (``basic_filter:<rule>``, the measured value in the rejects):

* ``not_english``: fastText ``lid.176``'s top language for the caption (newlines
  replaced by spaces) is not ``language`` (``en``); the value is the language found;
* ``bad_image`` / ``image_too_large``: the image header cannot be read, or it
  promises more than ``max_pixels`` pixels;
* ``few_words``: fewer than ``min_words`` (3: DataComp keeps "> 2") whitespace words;
* ``few_chars``: fewer than ``min_chars`` (6: "> 5") characters;
* ``too_small``: the image's shorter side is below ``min_side`` (200 px);
* ``bad_aspect``: longer side / shorter side above ``max_aspect`` (3).

Image sizes come from the header (no pixel is decoded), as DataComp uses the
original width and height from its metadata.  Any rule is switched off with
``null``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
from pydantic import Field

from curate.io.webdataset import image_size
from curate.models import local_path
from curate.quality import fasttext_models as ft
from curate.rules import Rule, decide
from curate.stage import Filter, Requirement, StageConfig, Verdict


class BasicFilterConfig(StageConfig):
    #: ``lid.176`` (packaged) or the path of a fastText language-ID model.
    model: str = "lid.176"
    language: str | None = "en"
    min_words: int | None = Field(3, ge=0)
    min_chars: int | None = Field(6, ge=0)
    min_side: int | None = Field(200, ge=1)
    max_aspect: float | None = Field(3.0, ge=1.0)
    max_pixels: int = Field(89_478_485, gt=0)


class BasicFilter(Filter):
    """DataComp's basic filter: English caption of some length, image of sane shape."""

    Config: ClassVar[type[StageConfig]] = BasicFilterConfig
    config: BasicFilterConfig
    requires = (Requirement("fasttext", "fasttext-numpy2-wheel"),)
    reason_details: ClassVar[bool] = True
    lid: Any = None

    def reads(self) -> Sequence[str]:
        return ("image", self.context.text_column)

    def models(self) -> Mapping[str, str]:
        return {"model": self.config.model} if self.config.language else {}

    def setup(self) -> None:
        if self.config.language and self.lid is None:
            self.lid = ft.load(local_path(self.config.model, self.context.base_dir))

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n = batch.num_rows
        captions = batch.column(self.context.text_column)
        texts = [t or "" for t in captions.to_pylist()]
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        if cfg.language:
            self.setup()
            langs, _ = ft.predict_top(self.lid, ft.flatten(captions))
            for i, lang in enumerate(langs):
                if lang != cfg.language:
                    reason[i] = "basic_filter:not_english"
                    value[i] = lang or "none"
        stats = np.full((n, 4), np.nan)
        stats[:, 0] = [len(t.split()) for t in texts]
        stats[:, 1] = [len(t) for t in texts]
        for i, payload in enumerate(batch.column("image").to_pylist()):
            if reason[i] is not None:
                continue
            got = image_size(payload, cfg.max_pixels) if payload else ("bad_image", "no bytes")
            if isinstance(got[0], str):
                reason[i], value[i] = f"basic_filter:{got[0]}", got[1]
                continue
            short, long = min(got), max(got)
            stats[i, 2] = short
            stats[i, 3] = long / short
        rules = [
            Rule("few_words", 0, "<", cfg.min_words),
            Rule("few_chars", 1, "<", cfg.min_chars),
            Rule("too_small", 2, "<", cfg.min_side),
            Rule("bad_aspect", 3, ">", cfg.max_aspect),
        ]
        open_ = reason == None  # noqa: E711 - elementwise
        keep, rule_reason, rule_value = decide(stats, rules, "basic_filter")
        keep &= open_
        for j in np.flatnonzero(open_ & ~keep).tolist():
            reason[j], value[j] = rule_reason[j].as_py(), rule_value[j].as_py()
        return Verdict(
            keep=np.asarray(keep, dtype=bool),
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
        )
