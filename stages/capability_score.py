"""``capability_score``: mmSSR's 14 capability scores (0-5) and interaction styles.

Every row's conversation (and image) is put to an MLLM backend
(``backend:``, shared with every generative stage: an OpenAI-compatible
endpoint or an in-process model folder) with mmSSR's own prompts
(:mod:`curate.mllm.mmssr`):

* ``mode: faithful``: one request per capability and one for the styles, as
  mmSSR's scorer and styler are asked (15 per sample with every capability).
  A sample's requests are sent together and share everything but the final
  query, so an endpoint with prefix caching (vLLM's automatic prefix caching)
  computes the image and conversation tokens once.
* ``mode: fused``: one request whose answer is one JSON object with every
  score and the styles (ours, not the paper's; ``guided: true`` constrains the
  answer to exactly that object).

Columns: ``mmssr_<capability>`` (int32, 0-5) for each capability in
``capabilities`` (all 14 by default; keys such as ``spatial``, ``ocr``, or
their full names), ``mmssr_styles`` (list of style strings) with
``styles: true``, and with ``keep_raw`` the answers as given
(``mmssr_<capability>_raw`` and ``mmssr_styles_raw``, or ``mmssr_raw`` in
fused mode).  ``prefix`` changes ``mmssr_``.

An answer that does not parse (see :mod:`curate.mllm.mmssr`) drops the row
with the reason ``capability_score:<capability|styles|fused>:<empty|unparseable|
out_of_range|unknown_style|missing_key>`` and the raw answer as the value,
never a default score; the manifest counts each reason.  With
``on_parse_error: null`` the row is kept with a null score instead (mmSSR's own
behaviour: its parser gives NaN, and the selection then never picks the sample
for that capability) and the parse failure is counted in the manifest's
stage ``counters``.  A request the backend could not answer drops the row
(``…:backend_error``) in both modes, and is asked again by a later run.

Answers are cached by (model fingerprint, request): the request holds the
conversation, the image's hash and the capability's query, so a resumed run
asks only for what it lacks (``request_cache``, as ``mllm_score``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from curate.mllm import mmssr
from curate.mllm.backend import Answer, Request
from curate.mllm.config import BackendStage, BackendStageConfig, answer_error
from curate.stage import Filter, StageConfig, Verdict, set_column

STAGE = "capability_score"


class CapabilityScoreConfig(BackendStageConfig):
    mode: Literal["faithful", "fused"] = "faithful"
    #: Capabilities to score (keys or full names), in this order; all 14 by default.
    capabilities: list[str] = Field(default_factory=lambda: [k for k, _ in mmssr.CAPABILITIES])
    #: Also ask for the interaction styles (mmSSR's styler).
    styles: bool = True
    #: ``mmssr`` keeps the original's ``strip('Question: ')`` quirk; ``clean`` does not.
    prompt_format: Literal["mmssr", "clean"] = "mmssr"
    system: str | None = mmssr.SYSTEM_PROMPT
    #: New tokens for one score, for the styles, and for a fused answer.
    score_tokens: int = Field(8, ge=1)
    style_tokens: int = Field(96, ge=1)
    fused_tokens: int = Field(320, ge=1)
    #: Constrain answers to their format (guided decoding).
    guided: bool = False
    keep_raw: bool = True
    on_parse_error: Literal["reject", "null"] = "reject"
    prefix: str = "mmssr_"

    @field_validator("capabilities")
    @classmethod
    def _known(cls, caps: list[str]) -> list[str]:
        try:
            keys = [mmssr.capability_key(c) for c in caps]
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None
        if len(set(keys)) != len(keys):
            raise ValueError("a capability is listed twice")
        return keys

    @model_validator(mode="after")
    def _asks_something(self) -> CapabilityScoreConfig:
        if not self.capabilities and not self.styles:
            raise ValueError("nothing to ask: give capabilities, or styles: true")
        return self


class CapabilityScore(BackendStage, Filter):
    """Adds mmSSR capability scores and styles; unparseable answers are rejects."""

    Config: ClassVar[type[StageConfig]] = CapabilityScoreConfig
    config: CapabilityScoreConfig

    def reads(self) -> Sequence[str]:
        return ("conversations", "image")

    def writes(self) -> Mapping[str, pa.DataType]:
        cfg = self.config
        out: dict[str, pa.DataType] = {f"{cfg.prefix}{c}": pa.int32() for c in cfg.capabilities}
        if cfg.styles:
            out[f"{cfg.prefix}styles"] = pa.list_(pa.string())
        if cfg.keep_raw:
            if cfg.mode == "fused":
                out[f"{cfg.prefix}raw"] = pa.string()
            else:
                out.update({f"{cfg.prefix}{c}_raw": pa.string() for c in cfg.capabilities})
                if cfg.styles:
                    out[f"{cfg.prefix}styles_raw"] = pa.string()
        return out

    def questions(self) -> list[str]:
        """What one sample is asked: capability keys, then ``styles`` (faithful), or
        ``fused``."""
        cfg = self.config
        if cfg.mode == "fused":
            return ["fused"]
        return [*cfg.capabilities, *(["styles"] if cfg.styles else [])]

    def requests(self, turns: list[dict[str, str]], image: bytes | None) -> list[Request]:
        cfg = self.config
        conversation = mmssr.format_convs(turns, quirk=cfg.prompt_format == "mmssr")
        out = []
        for q in self.questions():
            if q == "fused":
                styles = cfg.styles
                prompt = mmssr.fused_prompt(conversation, cfg.capabilities, styles)
                regex = mmssr.fused_regex(cfg.capabilities, styles)
                tokens = cfg.fused_tokens
            elif q == "styles":
                prompt, regex, tokens = (
                    mmssr.style_prompt(conversation),
                    mmssr.STYLE_REGEX,
                    cfg.style_tokens,
                )
            else:
                prompt = mmssr.capability_prompt(conversation, q)
                regex, tokens = mmssr.SCORE_REGEX, cfg.score_tokens
            out.append(
                Request(
                    prompt=prompt,
                    image=image,
                    system=cfg.system,
                    max_tokens=tokens,
                    regex=regex if cfg.guided else None,
                    seed=self.context.seed,
                )
            )
        return out

    def decide(self, batch: pa.Table) -> Verdict:
        cfg = self.config
        n = batch.num_rows
        questions = self.questions()
        conversations = batch.column("conversations").to_pylist()
        images = batch.column("image").to_pylist()
        reason = np.full(n, None, dtype=object)
        value = np.full(n, None, dtype=object)
        asked: list[int] = []
        requests: list[Request] = []
        for i in range(n):
            if not conversations[i]:
                reason[i] = f"{STAGE}:no_conversation"
                continue
            asked.append(i)
            requests.extend(self.requests(conversations[i], images[i]))
        answers = self.ask(requests)
        scores: dict[str, list[int | None]] = {c: [None] * n for c in cfg.capabilities}
        styles: list[list[str] | None] = [None] * n
        raw: dict[str, list[str | None]] = {q: [None] * n for q in questions}
        k = len(questions)
        for slot, i in enumerate(asked):
            for j, q in enumerate(questions):
                answer = answers[slot * k + j]
                raw[q][i] = answer.text
                failure = self._take(q, answer, i, scores, styles)
                if failure is None:
                    continue
                kind, detail = failure
                if kind not in {"backend_error", "bad_image"}:
                    self.count(f"parse_errors:{q}:{kind}")
                    if cfg.on_parse_error == "null":
                        continue
                if reason[i] is None:
                    reason[i] = f"{STAGE}:{q}:{kind}"
                    value[i] = detail
        keep = np.asarray(reason == None, dtype=bool)  # noqa: E711 - elementwise
        return Verdict(
            keep=keep,
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
            batch=self._columns(batch, keep, scores, styles, raw),
        )

    def _take(
        self,
        question: str,
        answer: Answer,
        i: int,
        scores: dict[str, list[int | None]],
        styles: list[list[str] | None],
    ) -> tuple[str, str] | None:
        """Parse one answer into ``scores``/``styles``; (reason, detail) when it fails."""
        failed = answer_error(answer)
        if failed is not None:
            return failed
        assert answer.text is not None
        if question == "fused":
            got = mmssr.parse_fused(answer.text, self.config.capabilities, self.config.styles)
            if isinstance(got, mmssr.ParseError):
                return got.reason, got.raw
            for cap, score in got[0].items():
                scores[cap][i] = score
            styles[i] = got[1] if self.config.styles else None
            return None
        if question == "styles":
            parsed = mmssr.parse_styles(answer.text)
            if isinstance(parsed, mmssr.ParseError):
                return parsed.reason, parsed.raw
            styles[i] = parsed
            return None
        parsed_score = mmssr.parse_score(answer.text)
        if isinstance(parsed_score, mmssr.ParseError):
            return parsed_score.reason, parsed_score.raw
        scores[question][i] = parsed_score
        return None

    def _columns(
        self,
        batch: pa.Table,
        keep: np.ndarray[Any, np.dtype[np.bool_]],
        scores: dict[str, list[int | None]],
        styles: list[list[str] | None],
        raw: dict[str, list[str | None]],
    ) -> pa.Table:
        cfg = self.config
        out = batch
        for cap, column in scores.items():
            out = set_column(out, f"{cfg.prefix}{cap}", pa.array(column, pa.int32()))
        if cfg.styles:
            out = set_column(out, f"{cfg.prefix}styles", pa.array(styles, pa.list_(pa.string())))
        if cfg.keep_raw:
            for q, answers in raw.items():
                name = f"{cfg.prefix}raw" if q == "fused" else f"{cfg.prefix}{q}_raw"
                out = set_column(out, name, pa.array(answers, pa.string()))
        return out
