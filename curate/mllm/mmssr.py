"""mmSSR's capability scores and interaction styles: prompts and answer parsing.

Source: Lyu et al., "Cream of the Crop" (arXiv 2503.13383), repository
``lyumengyao/mmssr`` at 3a7e662: ``config/ss.py`` (``cap_query``,
``style_candidates``, ``style_query``, ``seps``), ``llava/eval/model_ss.py``
(``format_convs``, system prompt, greedy decoding) and
``llava/select/utils.py`` (``parse_score``, ``parse_sty``).  The strings
below are theirs, character for character (a test pins them by hash).

**Faithful prompts.**  One request per capability and one for the styles: the
conversation flattened by :func:`format_convs` (``Question: … Answer: …``
turns joined by newlines, turns that start with ``Hint:`` kept as they are),
a newline, then the capability query or the style query.  The original's
``conv.strip('Question: ')`` strips any of the *characters* ``Questin:`` and
space from both ends of a question (so ``"is this a cat"`` becomes ``"is this a
ca"``); the distilled scorer was trained on prompts built that way, so
``prompt_format: mmssr`` keeps the quirk and ``clean`` removes only a literal
``Question:`` prefix.  LLaVA's ``<image>`` placeholder is taken out of the
text: every backend sends the image before the text (the original's image
token sits after the first ``Question: ``).

**Fused prompt** (ours, not the paper's): one request for all scores and
styles, answered as one JSON object ``{"<key>": <0-5>, …, "styles": [...]}``,
with a regex for guided decoding that admits exactly that object.

**Parsing.**  A score answer is what Python's ``int()`` accepts after
stripping (the original's ``parse_score``), restricted to ``[+-]?[0-9]+`` and
then to the 0-5 scale (the original keeps out-of-scale integers; we reject
them).  A style answer is split on commas, each entry stripped, empty entries
dropped and repeats removed in order (``parse_sty``); an entry that is not one
of the nine styles makes the answer unparseable (the original would open a bin
for it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import regex

from curate.conversations import IMAGE_TOKEN, Turn

#: (column key, the capability string of the mmSSR README used as ``{cap_keyword}``).
CAPABILITIES: tuple[tuple[str, str], ...] = (
    ("spatial", "object spatial understanding"),
    ("attribute", "attribute identification"),
    ("logical", "logical deduction"),
    ("scene", "scene understanding"),
    ("finegrained", "fine-grained recognition"),
    ("language", "language generation"),
    ("incontext", "in-context learning"),
    ("comparative", "comparative analysis"),
    ("activity", "activity recognition"),
    ("causal", "causal reasoning"),
    ("humanities", "humanities"),
    ("stem", "stem knowledge"),
    ("data", "data understanding"),
    ("ocr", "optical character recognition"),
)
CAPABILITY_NAMES = dict(CAPABILITIES)
#: ``style_candidates`` of ``config/ss.py``, in order.
STYLES: tuple[str, ...] = (
    "multi-choice",
    "coordinate",
    "yes/no",
    "word/short-phrase",
    "short description",
    "detailed description",
    "comparison",
    "chain-of-thought (step-by-step)",
    "specified style",
)
SEPS = (" ", "\n")
CAP_QUERY = (
    "On a scale of 0 to 5, how do you rate the helpfulness of the VQA instance in training "
    "a Multimodal Large Language Model for {cap_keyword}?"
)
STYLE_QUERY = (
    "Interaction style candidates:" + SEPS[0] + f"[{', '.join(STYLES)}]" + SEPS[1] + "Styles: "
)
SYSTEM_PROMPT = "You are a helpful assistant."
SCORE_MIN, SCORE_MAX = 0, 5

#: Guided decoding: one digit 0-5; a comma-separated list of known styles.
SCORE_REGEX = r"[0-5]"
_STYLE_ALT = "|".join(regex.escape(s) for s in STYLES)
STYLE_REGEX = rf"(?:{_STYLE_ALT})(?:, (?:{_STYLE_ALT}))*"


def capability_key(name: str) -> str:
    """The column key of a capability given by key or by its full name."""
    if name in CAPABILITY_NAMES:
        return name
    for key, full in CAPABILITIES:
        if name == full:
            return key
    keys = ", ".join(k for k, _ in CAPABILITIES)
    raise KeyError(f"unknown capability {name!r}; expected one of: {keys} (or their full names)")


def _question(content: str, quirk: bool) -> str:
    if content.startswith(IMAGE_TOKEN + "\nHint:") or content.startswith("Hint:"):
        return content
    if quirk:
        return "Question: " + content.strip("Question: ")
    return "Question: " + content.strip().removeprefix("Question:").strip()


def format_convs(turns: Sequence[Turn], quirk: bool = True) -> str:
    """mmSSR's flattening of a conversation (system turns left out), then without
    the ``<image>`` placeholder."""
    convs = [t["content"] for t in turns if t["role"] != "system"]
    items = []
    for i in range(0, len(convs), 2):
        item = _question(convs[i], quirk) + SEPS[0] + "Answer: "
        if i != len(convs) - 1:
            item += convs[i + 1]
        items.append(item)
    text = SEPS[1].join(items)
    return text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")


def capability_prompt(conversation: str, capability: str) -> str:
    """The query for one capability (key or full name) after a formatted conversation."""
    keyword = CAPABILITY_NAMES[capability_key(capability)]
    return conversation + SEPS[1] + CAP_QUERY.replace("{cap_keyword}", keyword)


def style_prompt(conversation: str) -> str:
    return conversation + SEPS[1] + STYLE_QUERY


def fused_prompt(conversation: str, capabilities: Sequence[str], styles: bool = True) -> str:
    """One query for every capability in ``capabilities`` (keys) and the styles."""
    listed = "\n".join(f"- {k}: {CAPABILITY_NAMES[k]}" for k in capabilities)
    fields = [f'"{k}": <0-5>' for k in capabilities]
    ask_styles = ""
    if styles:
        ask_styles = f"\nThen name its interaction styles, one or more of: [{', '.join(STYLES)}]."
        fields.append('"styles": ["<style>", ...]')
    return (
        conversation
        + SEPS[1]
        + "On a scale of 0 to 5, rate the helpfulness of the VQA instance in training a "
        "Multimodal Large Language Model for each of these capabilities:\n"
        + listed
        + ask_styles
        + "\nAnswer with this JSON object only: {"
        + ", ".join(fields)
        + "}"
    )


def fused_regex(capabilities: Sequence[str], styles: bool = True) -> str:
    """The fused answer exactly as :func:`fused_prompt` asks for it."""
    style = f'"(?:{_STYLE_ALT})"'
    fields = [f'"{regex.escape(k)}": [0-5]' for k in capabilities]
    if styles:
        fields.append(rf'"styles": \[{style}(?:, {style})*\]')
    return r"\{" + ", ".join(fields) + r"\}"


@dataclass(frozen=True)
class ParseError:
    """Why an answer gave no value: ``empty``, ``unparseable``, ``out_of_range``,
    ``unknown_style``, ``missing_key``; ``raw`` is the answer (truncated)."""

    reason: str
    raw: str


_INT = re.compile(r"[+-]?[0-9]+")


def parse_score(text: str) -> int | ParseError:
    """An integer 0-5, as the original's ``int(answer)``, or why not."""
    stripped = text.strip()
    if not stripped:
        return ParseError("empty", text[:200])
    if not _INT.fullmatch(stripped):
        return ParseError("unparseable", text[:200])
    value = int(stripped)
    if not SCORE_MIN <= value <= SCORE_MAX:
        return ParseError("out_of_range", text[:200])
    return value


def parse_styles(text: str) -> list[str] | ParseError:
    """The styles named, in order, without repeats, or why not."""
    styles: list[str] = []
    for entry in text.split(","):
        style = entry.strip()
        if not style or style in styles:
            continue
        if style not in STYLES:
            return ParseError("unknown_style", text[:200])
        styles.append(style)
    if not styles:
        return ParseError("empty", text[:200])
    return styles


def parse_fused(
    text: str, capabilities: Sequence[str], styles: bool = True
) -> tuple[dict[str, int], list[str]] | ParseError:
    """Scores by key and styles (empty unless ``styles``) from a fused JSON answer."""
    stripped = text.strip()
    if not stripped:
        return ParseError("empty", text[:200])
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError:
        return ParseError("unparseable", text[:200])
    if not isinstance(obj, dict):
        return ParseError("unparseable", text[:200])
    scores: dict[str, int] = {}
    for key in capabilities:
        value = obj.get(key)
        if value is None:
            return ParseError("missing_key", text[:200])
        if not isinstance(value, int) or isinstance(value, bool):
            return ParseError("unparseable", text[:200])
        if not SCORE_MIN <= value <= SCORE_MAX:
            return ParseError("out_of_range", text[:200])
        scores[key] = value
    if not styles:
        return scores, []
    raw_styles = obj.get("styles")
    if raw_styles is None:
        return ParseError("missing_key", text[:200])
    if not isinstance(raw_styles, list) or not all(isinstance(s, str) for s in raw_styles):
        return ParseError("unparseable", text[:200])
    parsed = parse_styles(",".join(raw_styles))
    if isinstance(parsed, ParseError):
        return ParseError(parsed.reason, text[:200])
    return scores, parsed
