"""``instruction_synth``: synthetic instruction data made from seed rows by a model.

A generator stage: every seed row (a document, or an image with its caption)
gives zero or more new rows, each keeping ``seed_id`` (the seed's id) and the
seed's provenance, with the id ``<seed id>/<stage>/<k>``; ``curate explain``
walks back from an instruction to its seed through them.  The manifest counts
seeds (in = kept + dropped) and the rows made (``rows_out``).

``mode: text`` — Instruction Pre-Training (Cheng et al. 2024; SPECS §8.3,
:mod:`curate.synth.ipt`): the synthesizer is given ``<s> <CON> {text} </CON>``
as a raw completion (no chat template) and answers ``<QUE> q <ANS> a </END>``
pairs.  Truncated and malformed pairs (no ``<ANS>``, an empty answer, a control
character) are dropped and questions deduplicated case-insensitively (all
counted in the stage's ``counters``).  With ``rounds: M``
each batch of seeds is cut into M consecutive rounds, and seed *i* of round *m*
gets seed *i* of round *m-1* (with its own chain) as few-shot demonstrations
when the whole prompt fits ``max_model_len`` by the repo's rule.
``emit: pairs`` makes one row per pair; ``emit: augmented`` one row per seed,
its text followed by its pairs (``Question: …\\nAnswer: …``; seeds without a
valid pair stay raw, as the paper keeps them).

``mode: multimodal`` — Genixer / MM-Instruct style (SPECS §8.1-8.2): an
instruction template (``instructions``: a list, or curate's own generic set),
picked per seed and request by a seeded hash, plus Genixer's task tag, is put
to the backend with the image (``context: image``, Genixer) or with the
detailed caption as text (``context: caption``, MM-Instruct: the answering
model never sees pixels).  The answer ``Question: … Answer: …`` is parsed;
with ``answer: ask`` only the question is kept and a second request gets the
answer, grounded on the same image or caption.  ``per_seed`` requests per seed.

New rows have ``conversations`` (user: the question, with ``<image>`` when the
row has an image; assistant: the answer), ``text`` (the pair rendered),
``instruction``, ``response``, and ``synth_round`` (text) or ``synth_template``
(multimodal).  Seeds that gave no row are dropped as
``instruction_synth:<no_text|no_image|backend_error|no_valid_pairs>``.  Later
stages filter what was made: ``exact_dedup`` on the questions, a
``judge_score`` band, ``decontaminate`` against evaluation sets.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.conversations import CONVERSATION_TYPE, IMAGE_TOKEN, render_text
from curate.mllm.backend import Answer, Request
from curate.mllm.config import BackendStage, BackendStageConfig, answer_error
from curate.stage import Generated, Generator, StageConfig, set_column
from curate.synth import ipt

STAGE = "instruction_synth"

#: curate's generic instructions for "ask a question about this image" (ours; Genixer's
#: 58 are research-only, pass them as ``instructions:`` where their license allows).
GENERIC_INSTRUCTIONS: tuple[str, ...] = (
    "Look at the image and write one clear question about it, then answer it.",
    "Write a question that can be answered from the image, followed by its answer.",
    "Study the image. Ask one specific question about what it shows and answer it.",
    "Create a question-and-answer pair grounded in the content of the image.",
    "Examine the image and pose a direct question about it, with a concise answer.",
    "Give one question a person might ask about this image, and the correct answer.",
    "Write a question about a detail visible in the image and answer it accurately.",
    "Produce a short question about the image and a factual answer to it.",
)
#: Genixer's task tags (``model_genixer_eval.py``), appended on a new line.
TASK_TAGS: dict[str, str] = {
    "generic": "",
    "common_vqa": "This is the Common VQA task.",
    "multi_choice_vqa": "This is a Multi-choice VQA task.",
    "adversarial_vqa": "This is an Adversarial-based VQA task.",
}
FORMAT_HINT = "Reply in the form:\nQuestion: <question>\nAnswer: <answer>"
#: Characters no instruction or answer may hold (C0 controls but tab and newline, DEL).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
#: What guided decoding lets a question or an answer be made of: no newline, no control.
_LINE = r"[^\x00-\x1f\x7f]"
_QA = re.compile(r"^\s*Question:\s*(?P<q>.+?)\s*(?:\n\s*|\s+)Answer:\s*(?P<a>.+?)\s*$", re.S)
_Q_ONLY = re.compile(r"^\s*Question:\s*(?P<q>.+?)\s*(?:(?:\n\s*|\s+)Answer:.*)?$", re.S)


class InstructionSynthConfig(BackendStageConfig):
    mode: Literal["text", "multimodal"]
    system: str | None = None
    temperature: float = Field(0.0, ge=0)
    #: Constrain answers to the expected format (guided decoding).
    guided: bool = False
    # text: Instruction Pre-Training
    rounds: int = Field(1, ge=1)
    max_model_len: int = Field(ipt.MAX_MODEL_LEN, gt=0)
    max_tokens: int = Field(ipt.MAX_NEW_TOKENS, ge=1)
    bos: str = ipt.BOS
    emit: Literal["pairs", "augmented"] = "pairs"
    # multimodal
    context: Literal["image", "caption"] = "image"
    #: The caption column for ``context: caption`` (default: the text column).
    caption_column: str | None = None
    instructions: list[str] = Field(default_factory=lambda: list(GENERIC_INSTRUCTIONS))
    task: Literal["generic", "common_vqa", "multi_choice_vqa", "adversarial_vqa"] = "common_vqa"
    answer: Literal["inline", "ask"] = "inline"
    per_seed: int = Field(1, ge=1)
    #: Guided decoding bounds for a question and an answer, in characters.
    question_chars: int = Field(200, ge=1)
    answer_chars: int = Field(600, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> InstructionSynthConfig:
        if self.mode == "multimodal" and self.emit == "augmented":
            raise ValueError("emit: augmented is for mode: text")
        if self.mode == "multimodal" and not self.instructions:
            raise ValueError("instructions must not be empty")
        if self.max_tokens >= self.max_model_len:
            raise ValueError("max_tokens must be below max_model_len")
        return self


@dataclass(frozen=True)
class _Failure:
    reason: str
    detail: str


@dataclass
class _Made:
    """What one seed gave: (question, answer, round or template) rows, or a reason."""

    rows: list[tuple[str, str, int]]
    reason: str | None = None
    value: str | None = None
    #: For ``emit: augmented``: the seed's text followed by its pairs.
    augmented: str | None = None


class InstructionSynth(BackendStage, Generator):
    """Makes instruction-response rows from documents or images."""

    Config: ClassVar[type[StageConfig]] = InstructionSynthConfig
    config: InstructionSynthConfig

    def reads(self) -> Sequence[str]:
        cfg = self.config
        if cfg.mode == "text":
            return (self.context.text_column,)
        if cfg.context == "caption":
            return (cfg.caption_column or self.context.text_column,)
        return ("image",)

    def writes(self) -> Mapping[str, pa.DataType]:
        return {
            **super().writes(),
            "conversations": CONVERSATION_TYPE,
            "instruction": pa.string(),
            "response": pa.string(),
            "synth_round": pa.int32(),
            "synth_template": pa.int32(),
        }

    def generate(self, batch: pa.Table) -> Generated:
        made = self._text(batch) if self.config.mode == "text" else self._multimodal(batch)
        return self._rows(batch, made)

    # -- text: Instruction Pre-Training ------------------------------------------------

    def _text(self, batch: pa.Table) -> list[_Made]:
        cfg = self.config
        texts = batch.column(self.context.text_column).to_pylist()
        n = len(texts)
        made = [_Made([]) for _ in range(n)]
        live = [i for i in range(n) if texts[i] and texts[i].strip()]
        for i in set(range(n)) - set(live):
            made[i] = _Made([], f"{STAGE}:no_text")
        size = -(-len(live) // cfg.rounds) if live else 0
        rounds = [live[r * size : (r + 1) * size] for r in range(cfg.rounds)] if size else []
        #: per position in a round: the demonstration chain of the previous round
        chains: list[list[tuple[str, str]]] = []
        for r, seeds in enumerate(rounds):
            prompts, next_chains = [], []
            for slot, i in enumerate(seeds):
                demos = chains[slot] if slot < len(chains) else []
                shot = ipt.few_shot_prompt(
                    texts[i],
                    demos,
                    max_model_len=cfg.max_model_len,
                    max_new_tokens=cfg.max_tokens,
                    bos=cfg.bos,
                )
                prompts.append(shot)
                next_chains.append(demos if shot.n_demos else [])
            answers = self.ask([self._raw(p.prompt, self._ipt_regex()) for p in prompts])
            chains = []
            for slot, (i, answer) in enumerate(zip(seeds, answers, strict=True)):
                failed = answer_error(answer)
                if failed is not None:
                    made[i] = _Made([], f"{STAGE}:{failed[0]}", failed[1])
                    chains.append([])
                    continue
                assert answer.text is not None
                parsed = ipt.parse_pairs(answer.text)
                self.count("pairs", len(parsed.pairs))
                self.count("pairs_truncated", parsed.truncated)
                self.count("pairs_malformed", parsed.malformed)
                self.count("pairs_duplicate_question", parsed.duplicates)
                self.count("few_shot_prompts", int(prompts[slot].n_demos > 0))
                valid = [p for p in parsed.pairs if not _CONTROL.search(p.question + p.answer)]
                self.count("pairs_malformed", len(parsed.pairs) - len(valid))
                rows = [(p.question, p.answer, r + 1) for p in valid]
                made[i] = self._text_result(texts[i], rows, answer)
                chains.append([*next_chains[slot], (texts[i], ipt.render_pairs(parsed.pairs))])
        return made

    def _text_result(self, text: str, rows: list[tuple[str, str, int]], answer: Answer) -> _Made:
        if self.config.emit == "augmented":
            rendered = "\n\n".join(f"Question: {q}\nAnswer: {a}" for q, a, _ in rows)
            augmented = text + ("\n\n" + rendered if rows else "")
            if not rows:
                self.count("seeds_kept_raw")
            return _Made(rows, augmented=augmented)
        if not rows:
            return _Made([], f"{STAGE}:no_valid_pairs", (answer.text or "")[:200])
        return _Made(rows)

    def _ipt_regex(self) -> str | None:
        if not self.config.guided:
            return None
        q, a = self.config.question_chars, self.config.answer_chars
        text = r"[^<\x00-\x1f\x7f]"
        pair = rf"<QUE> {text}{{1,{q}}} <ANS> {text}{{1,{a}}} </END>"
        return rf"{pair}(?:\n\n{pair}){{0,7}}"

    def _raw(self, prompt: str, regex: str | None) -> Request:
        return Request(
            prompt=prompt,
            raw=True,
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
            regex=regex,
            seed=self.context.seed,
        )

    # -- multimodal: Genixer / MM-Instruct ---------------------------------------------

    def _multimodal(self, batch: pa.Table) -> list[_Made]:
        cfg = self.config
        n = batch.num_rows
        images = batch.column("image").to_pylist() if "image" in batch.column_names else [None] * n
        captions = (
            batch.column(cfg.caption_column or self.context.text_column).to_pylist()
            if cfg.context == "caption"
            else [None] * n
        )
        made = [_Made([]) for _ in range(n)]
        asked: list[tuple[int, int]] = []  # (seed, template)
        requests: list[Request] = []
        for i, seed_id in enumerate(batch.column("id").to_pylist()):
            if cfg.context == "image" and not images[i]:
                made[i] = _Made([], f"{STAGE}:no_image")
                continue
            if cfg.context == "caption" and not (captions[i] or "").strip():
                made[i] = _Made([], f"{STAGE}:no_text")
                continue
            for k in range(cfg.per_seed):
                template = self._template(seed_id, k)
                asked.append((i, template))
                prompt = self._instruction(template)
                requests.append(self._mm_request(prompt, images[i], captions[i]))
        pending: list[tuple[int, int, str]] = []  # (seed, template, question) to answer
        for (i, template), answer in zip(asked, self.ask(requests), strict=True):
            got = self._parse_mm(answer)
            if isinstance(got, _Failure):
                self._fail(made[i], got)
            elif cfg.answer == "ask":
                pending.append((i, template, got[0]))
            else:
                made[i].rows.append((got[0], got[1], template))
        if pending:
            self._answer(pending, images, captions, made)
        for m in made:
            self._settle(m)
        return made

    def _answer(
        self,
        pending: list[tuple[int, int, str]],
        images: list[bytes | None],
        captions: list[str | None],
        made: list[_Made],
    ) -> None:
        """Ask the generated questions (``answer: ask``) and keep the answers."""
        follow = [
            self._mm_request(q, images[i], captions[i], answering=True) for i, _, q in pending
        ]
        for (i, template, question), answer in zip(pending, self.ask(follow), strict=True):
            failed = answer_error(answer)
            text = (answer.text or "").strip()
            if failed is not None:
                self._fail(made[i], _Failure(*failed))
            elif not text:
                self._fail(made[i], _Failure("no_valid_pairs", ""))
            else:
                made[i].rows.append((question, text, template))

    def _settle(self, made: _Made) -> None:
        """One seed's final rows: a question asked twice keeps its first answer; a seed
        with rows has no reason, one without always has one."""
        seen: set[str] = set()
        unique = []
        for q, a, t in made.rows:
            if q.lower() not in seen:
                seen.add(q.lower())
                unique.append((q, a, t))
        self.count("pairs_duplicate_question", len(made.rows) - len(unique))
        made.rows = unique
        if unique:
            made.reason = made.value = None
        elif made.reason is None:
            made.reason = f"{STAGE}:no_valid_pairs"

    def _template(self, seed_id: str, k: int) -> int:
        key = f"{self.context.seed}:{seed_id}:{k}".encode()
        digest = hashlib.blake2b(key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % len(self.config.instructions)

    def _instruction(self, template: int) -> str:
        tag = TASK_TAGS[self.config.task]
        text = self.config.instructions[template]
        return text + ("\n" + tag if tag else "") + "\n" + FORMAT_HINT

    def _mm_request(
        self, prompt: str, image: bytes | None, caption: str | None, answering: bool = False
    ) -> Request:
        cfg = self.config
        regex = None
        if cfg.context == "caption":
            prompt = f"Image description: {caption}\n\n{prompt}"
            image = None
        if cfg.guided:
            q, a = cfg.question_chars, cfg.answer_chars
            regex = (
                rf"{_LINE}{{1,{a}}}"
                if answering
                else rf"Question: {_LINE}{{1,{q}}}\nAnswer: {_LINE}{{1,{a}}}"
            )
        return Request(
            prompt=prompt,
            image=image,
            system=cfg.system,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            regex=regex,
            seed=self.context.seed,
        )

    def _parse_mm(self, answer: Answer) -> tuple[str, str] | _Failure:
        failed = answer_error(answer)
        if failed is not None:
            return _Failure(*failed)
        assert answer.text is not None
        pattern = _Q_ONLY if self.config.answer == "ask" else _QA
        match = pattern.match(answer.text)
        if match is None or not match.group("q").strip() or _CONTROL.search(answer.text):
            self.count("pairs_malformed")
            return _Failure("no_valid_pairs", answer.text[:200])
        self.count("pairs")
        answer_text = match.group("a") if "a" in match.groupdict() and match.group("a") else ""
        return match.group("q").strip(), answer_text.strip()

    @staticmethod
    def _fail(made: _Made, failure: _Failure) -> None:
        if made.reason is None:
            made.reason = f"{STAGE}:{failure.reason}"
            made.value = failure.detail

    # -- rows --------------------------------------------------------------------------

    def _rows(self, batch: pa.Table, made: list[_Made]) -> Generated:
        cfg = self.config
        seed: list[int] = []
        questions: list[str | None] = []
        responses: list[str | None] = []
        marks: list[int | None] = []
        augmented: list[str] = []
        for i, m in enumerate(made):
            if cfg.emit == "augmented" and m.augmented is not None:
                seed.append(i)
                augmented.append(m.augmented)
                questions.append(None)
                responses.append(None)
                marks.append(None)
                continue
            for q, a, mark in m.rows:
                seed.append(i)
                questions.append(q)
                responses.append(a)
                marks.append(mark)
        has_image = (
            pc.is_valid(batch.column("image").take(pa.array(seed, pa.int64()))).to_pylist()
            if "image" in batch.column_names
            else [False] * len(seed)
        )
        conversations: list[list[dict[str, str]] | None] = []
        texts: list[str] = []
        whole = iter(augmented)
        for k, (question, response) in enumerate(zip(questions, responses, strict=True)):
            if question is None or response is None:
                conversations.append(None)
                texts.append(next(whole))
                continue
            user = f"{IMAGE_TOKEN}\n{question}" if has_image[k] else question
            turns = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
            conversations.append(turns)
            texts.append(render_text(turns))
        rows = batch.take(pa.array(seed, pa.int64()))
        text_mode = cfg.mode == "text"
        columns: dict[str, pa.Array] = {
            self.context.text_column: pa.array(texts, pa.string()),
            "conversations": pa.array(conversations, CONVERSATION_TYPE),
            "instruction": pa.array(questions, pa.string()),
            "response": pa.array(responses, pa.string()),
            "synth_round": pa.array(marks if text_mode else [None] * len(seed), pa.int32()),
            "synth_template": pa.array([None] * len(seed) if text_mode else marks, pa.int32()),
        }
        for name, values in columns.items():
            rows = set_column(rows, name, values)
        reason: list[str | None] = [
            None if (m.rows or m.augmented is not None) else m.reason for m in made
        ]
        value = [None if r is None else m.value for r, m in zip(reason, made, strict=True)]
        return Generated(
            rows=rows,
            seed=np.asarray(seed, np.int64),
            reason=pa.array(reason, pa.string()),
            value=pa.array(value, pa.string()),
        )
