"""``judge_score``: a model judges each generated question-answer pair; a band is kept.

The last step of the filter stack for synthetic instructions (SPECS §8.4):
after format checks and question dedup, a judge scores every pair and rows
outside ``keep`` are dropped, the score kept as a column so the band can be
moved without asking again (the request cache answers a repeated run).

``template``:

* ``genixer``: Genixer's consistency check (``GenQA_filtering_mp.py``):
  ``Here is a question and answer pair. Is 'Question: q Answer: a' true for
  this image?`` with the image; the score is 1 for an answer starting with
  "Yes", 0 for "No".  Genixer ranks by the *probability* of the answer and
  keeps the medium band (0.5-0.7); backends do not return token
  probabilities yet, so this is the yes/no decision only.
* ``rating``: an LLM judge of relevance and accuracy on 1-5 (Instruction
  Pre-Training's GPT-4 check), with the image when the row has one.
* any other string: a template with ``{question}`` and ``{answer}``, whose
  answer must be an integer (``scale``: its range).

Column ``judge_score`` (int32; ``column`` renames it) and, with ``keep_raw``,
``judge_score_raw``.  Reasons: ``judge_score:below`` / ``above`` (value: the
score), ``judge_score:<empty|unparseable|out_of_range>`` (value: the raw
answer), ``judge_score:backend_error``, ``judge_score:no_pair``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import ClassVar

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.mllm.backend import Request
from curate.mllm.config import BackendStage, BackendStageConfig, answer_error
from curate.stage import Filter, StageConfig, Verdict, set_column

STAGE = "judge_score"
GENIXER = (
    "Here is a question and answer pair. Is '{qa}' true for this image?\n"
    "Please answer this question with Yes or No.\n"
)
RATING = (
    "Rate how relevant and accurate the answer is to the question, on a scale of 1 to 5 "
    "(1: wrong or unrelated, 5: correct and complete). Reply with the number only.\n"
    "Question: {question}\nAnswer: {answer}"
)
_YES_NO = re.compile(r"^\s*(yes|no)\b", re.I)
_INT = re.compile(r"^\s*([+-]?[0-9]+)\s*(?:\n|$)")


class Band(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min: float | None = None
    max: float | None = None


class JudgeScoreConfig(BackendStageConfig):
    template: str = "rating"
    #: The range of an integer score (``rating``: 1-5; ``genixer``: 0-1).
    scale: tuple[int, int] | None = None
    question_column: str = "instruction"
    answer_column: str = "response"
    keep: Band = Band()
    column: str = "judge_score"
    system: str | None = None
    max_tokens: int = Field(4, ge=1)
    guided: bool = False
    keep_raw: bool = True

    @model_validator(mode="after")
    def _template(self) -> JudgeScoreConfig:
        custom = self.template not in ("genixer", "rating")
        if custom and ("{question}" not in self.template or "{answer}" not in self.template):
            raise ValueError("a custom template needs {question} and {answer}")
        if custom and self.scale is None:
            raise ValueError("a custom template needs scale: [min, max]")
        if self.scale is not None and self.scale[0] > self.scale[1]:
            raise ValueError("scale must be [min, max] with min <= max")
        return self

    def range(self) -> tuple[int, int]:
        if self.scale is not None:
            return self.scale
        return (0, 1) if self.template == "genixer" else (1, 5)


class JudgeScore(BackendStage, Filter):
    """Scores generated pairs with a judge model; keeps a band of the score."""

    Config: ClassVar[type[StageConfig]] = JudgeScoreConfig
    config: JudgeScoreConfig

    def reads(self) -> Sequence[str]:
        return (self.config.question_column, self.config.answer_column)

    def writes(self) -> Mapping[str, pa.DataType]:
        out: dict[str, pa.DataType] = {self.config.column: pa.int32()}
        if self.config.keep_raw:
            out[f"{self.config.column}_raw"] = pa.string()
        return out

    def prompt(self, question: str, answer: str) -> str:
        template = self.config.template
        if template == "genixer":
            return GENIXER.format(qa=f"Question: {question} Answer: {answer}")
        body = RATING if template == "rating" else template
        return body.replace("{question}", question).replace("{answer}", answer)

    def regex(self) -> str | None:
        if not self.config.guided:
            return None
        if self.config.template == "genixer":
            return "(Yes|No)"
        lo, hi = self.config.range()
        return "|".join(str(v) for v in range(lo, hi + 1))

    def parse(self, text: str) -> int | tuple[str, str]:
        if not text.strip():
            return "empty", text[:200]
        if self.config.template == "genixer":
            match = _YES_NO.match(text)
            if match is None:
                return "unparseable", text[:200]
            return int(match.group(1).lower() == "yes")
        number = _INT.match(text)
        if number is None:
            return "unparseable", text[:200]
        value = int(number.group(1))
        lo, hi = self.config.range()
        if not lo <= value <= hi:
            return "out_of_range", text[:200]
        return value

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n = batch.num_rows
        questions = batch.column(cfg.question_column).to_pylist()
        answers_in = batch.column(cfg.answer_column).to_pylist()
        images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * n
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        asked, requests = [], []
        for i in range(n):
            if not (questions[i] or "").strip() or not (answers_in[i] or "").strip():
                reason[i] = f"{STAGE}:no_pair"
                continue
            asked.append(i)
            requests.append(
                Request(
                    prompt=self.prompt(questions[i], answers_in[i]),
                    image=images[i],
                    system=cfg.system,
                    max_tokens=cfg.max_tokens,
                    regex=self.regex(),
                    seed=self.context.seed,
                )
            )
        scores: list[int | None] = [None] * n
        raw: list[str | None] = [None] * n
        for i, answer in zip(asked, self.ask(requests), strict=True):
            raw[i] = answer.text
            failed = answer_error(answer)
            got = failed if failed is not None else self.parse(answer.text or "")
            if isinstance(got, tuple):
                reason[i], value[i] = f"{STAGE}:{got[0]}", got[1]
                continue
            scores[i] = got
            if cfg.keep.min is not None and got < cfg.keep.min:
                reason[i], value[i] = f"{STAGE}:below", str(got)
            elif cfg.keep.max is not None and got > cfg.keep.max:
                reason[i], value[i] = f"{STAGE}:above", str(got)
        out = set_column(batch, cfg.column, pa.array(scores, pa.int32()))
        if cfg.keep_raw:
            out = set_column(out, f"{cfg.column}_raw", pa.array(raw, pa.string()))
        keep = np.asarray(reason == None, dtype=bool)  # noqa: E711 - elementwise
        return Verdict(
            keep=keep,
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
            batch=out,
        )
