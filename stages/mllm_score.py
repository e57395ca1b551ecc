"""``mllm_score``: MLM-Filter's four quality scores of image-text pairs from an MLLM.

For every row and every metric (``itm`` image-text matching, ``odf`` object
detail fulfillment, ``ctq`` caption text quality, ``su`` semantic
understanding) the stage asks the model MLM-Filter's prompt
(:mod:`curate.mllm.mlm_filter`, verbatim, with the image) and parses the first
line of the answer strictly: an integer 0-100.  Columns ``mlm_<metric>`` (int32)
and, with ``keep_raw``, ``mlm_<metric>_raw`` (the answer as given).

A row with any answer that does not parse is dropped, never given a default
score: the reason is ``mllm_score:<metric>:<empty|unparseable|out_of_range>``
and the rejects' ``value`` is the raw answer.  A request that failed in the
backend (after its retries) drops the row as ``mllm_score:<metric>:backend_error``
with the error as the value; it is not cached, so a later run asks again.
Thresholds are a later ``score_filter`` (Open-Qwen2VL: ``preset: open_qwen2vl_su``,
SU ≥ 85), so changing one needs no new inference.

Backends (``backend.kind``), shared with every generative stage:

* ``openai``: an OpenAI-compatible chat-completions endpoint (vLLM, SGLang,
  TGI), with bounded concurrency, timeouts and retries with back-off;
* ``transformers``: a model folder loaded in the actor (``num_gpus: auto``).

With ``guided: true`` the answer is constrained to the score format (vLLM's
``structured_outputs`` regex; the in-process backend's own constrained
decoding).  MLM-Filter's models need no constraint, so it is off by default.

Answers are cached by (model fingerprint, request) under the run's
``_state/<stage>/requests`` (or the ``request_cache:`` folder or ``s3://`` prefix;
``--overwrite`` keeps ``_state``), so a resumed or repeated run does not ask again
for what it already has, and asks again for what failed.  The stage cache is off
by default for this stage (``cache: true`` would keep failed rows failed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curate.mllm import mlm_filter
from curate.mllm.backend import Answer, Request
from curate.mllm.config import BackendStage, BackendStageConfig, answer_error
from curate.stage import (
    Filter,
    StageConfig,
    Verdict,
    set_column,
)


class MllmScoreConfig(BackendStageConfig):
    #: Short (``itm``, ``odf``, ``ctq``, ``su``) or long metric names.
    metrics: list[str] = Field(default_factory=lambda: ["itm", "odf", "ctq", "su"], min_length=1)
    #: MLM-Filter's prompt template: ``v2`` (Qwen2.5 / GPT-4o models), ``v1`` (2024 models).
    template: Literal["v1", "v2"] = "v2"
    system: str | None = mlm_filter.SYSTEM_PROMPT
    #: New tokens per answer; the score is on the first line (4 fits "100" plus a newline).
    max_tokens: int = Field(4, ge=1)
    #: Constrain answers to the score format (guided decoding).
    guided: bool = False
    keep_raw: bool = True
    prefix: str = "mlm_"

    @field_validator("metrics")
    @classmethod
    def _known(cls, metrics: list[str]) -> list[str]:
        names = []
        for m in metrics:
            try:
                names.append(mlm_filter.get_metric(m).name)
            except KeyError as exc:
                raise ValueError(str(exc.args[0])) from None
        if len(set(names)) != len(names):
            raise ValueError("a metric is listed twice")
        return names


class MllmScore(BackendStage, Filter):
    """Adds ``mlm_<metric>`` scores (and raw answers); unparseable answers are rejects."""

    Config: ClassVar[type[StageConfig]] = MllmScoreConfig
    config: MllmScoreConfig

    def reads(self) -> Sequence[str]:
        return ("image", self.context.text_column)

    def writes(self) -> Mapping[str, pa.DataType]:
        out: dict[str, pa.DataType] = {}
        for metric in self.config.metrics:
            out[f"{self.config.prefix}{metric}"] = pa.int32()
            if self.config.keep_raw:
                out[f"{self.config.prefix}{metric}_raw"] = pa.string()
        return out

    def requests(self, caption: str, image: bytes) -> list[Request]:
        cfg = self.config
        regex = mlm_filter.SCORE_ONLY_REGEX if cfg.guided else None
        return [
            Request(
                prompt=mlm_filter.prompt(metric, caption, version=cfg.template),
                image=image,
                system=cfg.system,
                max_tokens=cfg.max_tokens,
                regex=regex,
                seed=self.context.seed,
            )
            for metric in cfg.metrics
        ]

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n, k = batch.num_rows, len(cfg.metrics)
        captions = batch.column(self.context.text_column).to_pylist()
        images = batch.column("image").to_pylist()
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        asked: list[int] = []
        requests: list[Request] = []
        for i in range(n):
            if not captions[i] or not captions[i].strip():
                reason[i] = "mllm_score:no_caption"
            elif not images[i]:
                reason[i] = "mllm_score:no_image"
            else:
                asked.append(i)
                requests.extend(self.requests(captions[i], images[i]))
        answers = self.ask(requests)
        scores = np.zeros((n, k), dtype=np.int32)
        raw = np.full((n, k), None, dtype=object)
        for slot, i in enumerate(asked):
            for j, metric in enumerate(cfg.metrics):
                answer: Answer = answers[slot * k + j]
                raw[i, j] = answer.text
                got = self._parse(answer)
                if isinstance(got, int):
                    scores[i, j] = got
                elif reason[i] is None:
                    reason[i] = f"mllm_score:{metric}:{got[0]}"
                    value[i] = got[1]
        keep = np.asarray(reason == None, dtype=bool)  # noqa: E711 - elementwise
        out = batch
        for j, metric in enumerate(cfg.metrics):
            column = np.where(keep, scores[:, j], 0)
            out = set_column(out, f"{cfg.prefix}{metric}", pa.array(column, pa.int32(), mask=~keep))
            if cfg.keep_raw:
                out = set_column(out, f"{cfg.prefix}{metric}_raw", pa.array(raw[:, j], pa.string()))
        return Verdict(
            keep=keep,
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
            batch=out,
        )

    @staticmethod
    def _parse(answer: Answer) -> int | tuple[str, str]:
        failed = answer_error(answer)
        if failed is not None:
            return failed
        assert answer.text is not None
        got = mlm_filter.parse_score(answer.text)
        if isinstance(got, int):
            return got
        return got.reason, got.raw
