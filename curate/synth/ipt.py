"""Instruction Pre-Training (Cheng et al., arXiv 2406.14491): the synthesizer's I/O format.

Source read (behaviour only, not copied): ``microsoft/LMOps`` at commit
``4f2a9deb5f08e459fd44c2e4792344d78ca89fc3``, files
``instruction_pretrain/utils/read_compre.py`` (``cook_read``, ``cook_compre``,
``parse_comprehension``, ``deduplicate_questions``, ``process_syn_raw_text``,
``get_dataset``) and ``instruction_pretrain/README.md`` (the M-shot inference
example). The ``instruction_pretrain/`` folder was last changed in LMOps commit
``45c209c53347a02ca491671f808b4d11e6eafe2e``.

Exact formats (``read_compre.py`` lines 7-15 and 18-25)::

    synthesizer input   "<s>" + " <CON> " + text + " </CON>" + "\\n\\n"
                        i.e. "<s> <CON> {text} </CON>\\n\\n"; for text == "" just "<s>"
    one pair            "<QUE> {question} <ANS> {answer} </END>"
    pairs               the pairs joined by "\\n\\n" (no trailing delimiter)
    one demonstration   synthesizer input + pairs + "</s>"
    M-shot prompt       demonstration_1 + ... + demonstration_k + synthesizer input

``<s>`` is part of the prompt *text*: the repo's ``cook_read`` prepends the
literal string ``'<s>'`` and hands the whole string to ``vllm.LLM.generate``.
We keep it in the text (``bos=BOS`` by default), so the string is byte-for-byte
what the repo sends. With a Llama/Mistral tokenizer the literal ``<s>`` is
parsed as the BOS special token, so tokenise with ``add_special_tokens=False``
(or pass ``bos=""`` and let the tokenizer add BOS) to get exactly one BOS.
Likewise ``</s>`` after each demonstration is meant as the EOS token.

Parsing (``parse_comprehension``, lines 43-67, with ``deduplicate=True`` as
``process_syn_raw_text`` calls it, line 129):

1. Split the output on ``</END>``. The piece after the last ``</END>`` is never
   a complete pair: the repo drops it when the output does not end in
   ``</END>`` and otherwise it is the empty string, which fails to parse and is
   skipped. We count it as ``truncated`` when it has non-whitespace text.
2. Every other piece must split on ``<ANS>`` into exactly two parts (no
   ``<ANS>``, or more than one, is malformed); the stripped first part must
   start with ``<QUE>``; the stripped second part (the answer) must be
   non-empty. The question is the first part with *every* ``<QUE>`` removed,
   then stripped. An empty question is accepted by the repo; we follow it
   unless ``drop_empty_questions=True``.
3. Questions are deduplicated keeping the first: two questions are equal when
   ``q.lower()`` is equal, with ``q`` already stripped of outer whitespace.
   There is no whitespace normalisation inside the question (``"a  b"`` and
   ``"A b"`` are different) and no Unicode case folding beyond ``str.lower``.

Fit rule for M-shot prompts (``get_dataset``, lines 184-199): with the
demonstrations prepended, the whole prompt ``p`` (demonstrations and the
current input, tags and ``<s>``/``</s>`` included) is used only if
``len(p.split(" ")) * 1.5 <= max_model_len - max_new_tokens``. "Word count" is
the number of pieces when splitting on the single space character: the number
of ``" "`` characters plus one (newlines and tabs do not separate words, runs
of spaces count every space). Otherwise the current input is used alone; the
repo never drops only some of the demonstrations. No length check is made on
an input used alone.

Demonstrations are the inheritance chain that ``get_dataset`` accumulates
(lines 167-182): the latest previous (text, pairs) and, before it, every
earlier one that was itself synthesized with its predecessor prepended. If the
latest one has no pairs, nothing is prepended. The pairs of a demonstration
are re-rendered from the *parsed* pairs (``cook_compre(QA_list)``), not the raw
synthesizer output: pass ``render_pairs(parse_pairs(output).pairs)``.

Decoding: greedy (``SamplingParams(temperature=0, max_tokens=400)``) with
``max_model_len=4096`` (README lines 48-55).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "ANS",
    "BOS",
    "CON_PROMPT",
    "DELIMITER",
    "END",
    "EOS",
    "MAX_MODEL_LEN",
    "MAX_NEW_TOKENS",
    "PAIR_TEMPLATE",
    "QUE",
    "TEMPERATURE",
    "FewShotPrompt",
    "Pair",
    "ParsedPairs",
    "demonstration",
    "few_shot_input",
    "few_shot_prompt",
    "fits",
    "parse_pairs",
    "render_pairs",
    "synth_input",
    "word_count",
]

MAX_MODEL_LEN = 4096
MAX_NEW_TOKENS = 400
TEMPERATURE = 0.0

BOS = "<s>"
EOS = "</s>"
CON_OPEN = " <CON> "
CON_CLOSE = " </CON>"
QUE = "<QUE>"
ANS = "<ANS>"
END = "</END>"
DELIMITER = "\n\n"

#: The synthesizer input for one raw text, with the default BOS (``str.format`` with ``text=``).
CON_PROMPT = BOS + CON_OPEN + "{text}" + CON_CLOSE + DELIMITER
#: One rendered pair (``str.format`` with ``question=`` and ``answer=``).
PAIR_TEMPLATE = QUE + " {question} " + ANS + " {answer} " + END

#: The repo estimates tokens as 1.5 per space-separated word; kept as the exact ratio 3/2.
_TOKENS_PER_WORD_NUM = 3
_TOKENS_PER_WORD_DEN = 2


@dataclass(frozen=True, slots=True)
class Pair:
    """One instruction-response pair."""

    question: str
    answer: str


@dataclass(frozen=True, slots=True)
class ParsedPairs:
    """The valid pairs of one synthesizer output and what was dropped.

    ``truncated`` is 0 or 1 (text after the last ``</END>``), ``malformed``
    counts ``</END>``-terminated pieces that do not parse, ``duplicates``
    counts valid pairs dropped because an earlier question was equal.
    """

    pairs: tuple[Pair, ...]
    truncated: int = 0
    malformed: int = 0
    duplicates: int = 0


@dataclass(frozen=True, slots=True)
class FewShotPrompt:
    """An M-shot prompt and how many demonstrations it carries (0: the input alone)."""

    prompt: str
    n_demos: int


def synth_input(text: str, *, bos: str = BOS) -> str:
    """The synthesizer input for one raw text: ``"<s> <CON> {text} </CON>\\n\\n"``.

    An empty text gives ``bos`` alone, as in the repo.
    """
    if not text:
        return bos
    return bos + CON_OPEN + text + CON_CLOSE + DELIMITER


def _render_pair(pair: Pair) -> str:
    return QUE + " " + pair.question + " " + ANS + " " + pair.answer + " " + END


def render_pairs(pairs: Iterable[Pair]) -> str:
    """``<QUE> q <ANS> a </END>`` for each pair, joined by ``"\\n\\n"`` ("" for no pairs)."""
    return DELIMITER.join(_render_pair(p) for p in pairs)


def _parse_piece(piece: str) -> Pair | None:
    parts = piece.split(ANS)
    if len(parts) != 2:
        return None
    head, answer = parts[0].strip(), parts[1].strip()
    if not head.startswith(QUE) or not answer:
        return None
    return Pair(question=head.replace(QUE, "").strip(), answer=answer)


def parse_pairs(
    output: str, *, deduplicate: bool = True, drop_empty_questions: bool = False
) -> ParsedPairs:
    """Parse a synthesizer output into its valid pairs, in order.

    ``deduplicate`` drops a pair whose ``question.lower()`` equals an earlier
    kept one's. ``drop_empty_questions`` counts ``<QUE> <ANS> a </END>`` as
    malformed; the repo keeps such a pair, and so does the default.
    """
    pieces = output.split(END)
    truncated = 1 if pieces[-1].strip() else 0
    kept: list[Pair] = []
    seen: set[str] = set()
    malformed = duplicates = 0
    for piece in pieces[:-1]:
        pair = _parse_piece(piece)
        if pair is None or (drop_empty_questions and not pair.question):
            malformed += 1
            continue
        if deduplicate:
            key = pair.question.lower()
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
        kept.append(pair)
    return ParsedPairs(
        pairs=tuple(kept), truncated=truncated, malformed=malformed, duplicates=duplicates
    )


def demonstration(text: str, rendered_pairs: str, *, bos: str = BOS, eos: str = EOS) -> str:
    """One few-shot demonstration: the input for ``text``, its pairs, then ``</s>``."""
    return synth_input(text, bos=bos) + rendered_pairs + eos


def word_count(prompt: str) -> int:
    """The repo's length estimate: ``len(prompt.split(" "))``, spaces plus one."""
    return prompt.count(" ") + 1


def fits(
    prompt: str, *, max_model_len: int = MAX_MODEL_LEN, max_new_tokens: int = MAX_NEW_TOKENS
) -> bool:
    """``word_count(prompt) * 1.5 <= max_model_len - max_new_tokens`` (in exact arithmetic)."""
    budget = max_model_len - max_new_tokens
    return word_count(prompt) * _TOKENS_PER_WORD_NUM <= budget * _TOKENS_PER_WORD_DEN


def few_shot_prompt(
    text: str,
    demos: Sequence[tuple[str, str]],
    *,
    max_model_len: int = MAX_MODEL_LEN,
    max_new_tokens: int = MAX_NEW_TOKENS,
    bos: str = BOS,
    eos: str = EOS,
) -> FewShotPrompt:
    """The M-shot prompt for ``text`` given the demonstration chain, oldest first.

    ``demos`` holds ``(raw text, render_pairs(pairs))`` for the chain the repo
    accumulates: the latest previous-round entry and, before it, each earlier
    entry that was synthesized with its predecessor prepended. All of them are
    prepended if the whole prompt fits (:func:`fits`), else none. If the latest
    demonstration has no pairs nothing is prepended; an earlier one without
    pairs cannot be part of a chain and raises ``ValueError``.
    """
    current = synth_input(text, bos=bos)
    if not demos or not demos[-1][1]:
        return FewShotPrompt(prompt=current, n_demos=0)
    if any(not rendered for _, rendered in demos[:-1]):
        raise ValueError("only the latest demonstration may have no pairs")
    prompt = "".join(demonstration(t, r, bos=bos, eos=eos) for t, r in demos) + current
    if fits(prompt, max_model_len=max_model_len, max_new_tokens=max_new_tokens):
        return FewShotPrompt(prompt=prompt, n_demos=len(demos))
    return FewShotPrompt(prompt=current, n_demos=0)


def few_shot_input(
    text: str,
    demos: Sequence[tuple[str, str]],
    *,
    max_model_len: int = MAX_MODEL_LEN,
    max_new_tokens: int = MAX_NEW_TOKENS,
    bos: str = BOS,
    eos: str = EOS,
) -> str:
    """The prompt string of :func:`few_shot_prompt`."""
    return few_shot_prompt(
        text,
        demos,
        max_model_len=max_model_len,
        max_new_tokens=max_new_tokens,
        bos=bos,
        eos=eos,
    ).prompt
