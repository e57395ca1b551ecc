"""MLM-Filter scoring prompts and a strict parser for the model's answers.

MLM-Filter (Wang et al., "Finetuned Multimodal Language Models Are High-Quality
Image-Text Data Filters", arXiv 2403.02677) fine-tunes a multimodal LM to rate one
image-caption pair on four metrics.  Open-Qwen2VL (Wang et al., arXiv 2504.00595)
keeps the DataComp-medium pairs whose *semantic understanding* score is ``>= 85``,
scored with ``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o``.

Sources (read from the repositories' git history, not from the paper):

* Prompt texts: ``Victorwz/MLM_Filter`` at commit
  ``7c4cd80fc1628278dcf09535b87269352c811961`` (2025-04-13, repository HEAD):

  - :data:`TEMPLATE_V2` is ``LLAVA_INSTRUCTION_TEMPLATE`` in
    ``mlm_filter_scoring_datacomp_batch_inference_v2.py`` (blob ``9c51aaa9``), the
    script whose default model is ``weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o`` (the model
    Open-Qwen2VL uses), with conversation mode ``qwen_instruct``.  It is the default.
  - :data:`TEMPLATE_V1` is ``LLAVA_INSTRUCTION_TEMPLATE`` in
    ``mlm_filter_scoring_single_image.py`` (blob ``ba9e6049``) and in the older
    ``mlm_filter_scoring_datacomp_batch_inference*.py`` scripts, used with the 2024
    LLaVA-1.5 / GPT-4V models (and the Llama-3 script).  It differs from V2 only in
    "round to multiples of 10.  Please" (two spaces) versus "round to multiples of 5 or
    10. Please".
  - The four criteria texts are identical in every version of every scoring script in
    the repository's history (the CTQ variable is spelt ``criteria_cation_text_quality``
    in the older scripts).  ``{aspect}`` is the metric's long name with ``_`` replaced by
    spaces, exactly as ``metric.replace("_", " ")`` upstream.

* Answer handling: ``Victorwz/Open-Qwen2VL`` at commit
  ``0d76f9f787b819fad81e821da1def24ac3aac8bc`` (2025-08-24),
  ``data_filtering/baselines/apply_filter.py::above_threshold_decision`` (unchanged since
  it was added in ``88bd35fe``).  The MLM-Filter scoring scripts themselves store the raw
  decoded text (1-2 new tokens, greedy) in ``<metric>_score`` and never parse it.

The prompt is the user turn and follows the image placeholder upstream
(``"<image>\\n" + prompt``); for the Qwen2.5 model the chat template is LLaVA-Unified's
``qwen_instruct`` with system prompt :data:`SYSTEM_PROMPT`.  Building the chat turn is
the backend's job; this module only provides the text.

Text (prompts and criteria) reproduced verbatim from MLM_Filter (MIT License) with
attribution; the code here is our own.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "METRICS",
    "METRIC_ALIASES",
    "SCORE_MAX",
    "SCORE_MIN",
    "SCORE_ONLY_REGEX",
    "SCORE_REGEX",
    "SYSTEM_PROMPT",
    "TEMPLATE_V1",
    "TEMPLATE_V2",
    "Metric",
    "ParseError",
    "ParseFailure",
    "TemplateVersion",
    "get_metric",
    "keep_above",
    "parse_score",
    "prompt",
]

_MLM_FILTER = "Victorwz/MLM_Filter@7c4cd80fc1628278dcf09535b87269352c811961"

#: System prompt of LLaVA-Unified's ``qwen_instruct`` conversation (``llava/conversation.py``,
#: ``Victorwz/LLaVA-Unified@144bc93d``), used upstream with mlm-filter-qwen2.5-1.5b-gpt4o.
#: Verbatim, with no final full stop.
SYSTEM_PROMPT: Final = "You are a helpful assistant"

TemplateVersion = Literal["v1", "v2"]

TEMPLATE_V1 = (
    "Text Caption: {caption}\n"
    "\n"
    "{criteria} A higher score indicates higher level of {aspect}. Ensure that your "
    "scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle "
    "differences. The score should be given as an integer, with each number between 0 and "
    "100 considered as a potential score, avoiding the tendency to round to multiples of "
    "10.  Please first output a single line containing the value indicating the scores. In "
    "the subsequent line, please provide a comprehensive explanation of your evaluation, "
    "avoiding any potential bias."
)
TEMPLATE_V2 = (
    "Text Caption: {caption}\n"
    "\n"
    "{criteria} A higher score indicates higher level of {aspect}. Ensure that your "
    "scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle "
    "differences. The score should be given as an integer, with each number between 0 and "
    "100 considered as a potential score, avoiding the tendency to round to multiples of 5 "
    "or 10. Please first output a single line containing the value indicating the scores. "
    "In the subsequent line, please provide a comprehensive explanation of your "
    "evaluation, avoiding any potential bias."
)
_CRITERIA_ITM = (
    "Please evaluate if the provided text caption accurately represents the main features "
    "and objects of the image. The caption doesn't need to detail every aspect of the "
    "image, but it should capture its primary theme. Rate the overall quality of the text "
    "caption's match to the image on a scale of 1-100, considering the criteria mentioned."
)
_CRITERIA_ODF = (
    "Please evaluate the text caption to determine if it provides detailed descriptions of "
    "objects that align with the image. Specifically, assess if the caption sufficiently "
    "describes the color, size, position, shape, material, etc., of the objects. "
    "Afterward, rate the caption's overall accuracy in capturing object details from the "
    "image on a scale of 1-100, based on the criteria provided."
)
_CRITERIA_CTQ = (
    "Please evaluate the text caption based on the following criteria: Grammatical "
    "Correctness, Diversity of Vocabulary (e.g., the range and uniqueness of words used), "
    "Fluency (e.g., smoothness and natural flow of sentences), Readability, Length, and "
    "Structure. Assign an overall quality score on a scale of 1-100."
)
_CRITERIA_SU = (
    "Evaluate the given text caption in relation to its corresponding image. Your goal is "
    "to determine if the text caption provides additional semantic information that isn't "
    "readily apparent just from the image itself.\n"
    "\n"
    "For example:\n"
    "\n"
    '1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or '
    'a "businessman," then the caption is enriching the semantic context.\n'
    "2. If the caption introduces concepts like the mathematical tangent function, which "
    "require in-depth knowledge to deduce, it is imparting external semantics.\n"
    "3. Captions revealing specific location addresses, festival details, or other nuanced "
    "data not easy to infer from the image also provide external semantic information.\n"
    "4. Directly identifying specific entities in the image such as buildings, people, "
    "bird species, animal breeds, car models, engines, etc., in the caption introduces "
    "additional insights.\n"
    "5. Should the image act as a contextual backdrop and the caption describes elements "
    "not explicitly showcased in the image, it has semantic depth.\n"
    "6. Lastly, if the caption depicts relationships between the subjects in the image, "
    "which need commonsense knowledge to understand, it should be considered semantically "
    "rich.\n"
    "\n"
    "Please assess and determine the extent of semantic enrichment the caption provides "
    "over the image. Rate the text caption's semantic depth on a scale from 1 to 100."
)


@dataclass(frozen=True)
class Metric:
    """One MLM-Filter metric and its prompt."""

    #: Short name: ``itm``, ``odf``, ``ctq`` or ``su``.
    name: str
    #: Upstream name (``--metric`` value, parquet column ``<long_name>_score``).
    long_name: str
    #: ``{aspect}`` in the template: ``long_name`` with ``_`` replaced by spaces.
    aspect: str
    #: ``{criteria}`` in the template, verbatim.
    criteria: str
    #: The full V2 prompt (the default) with ``criteria`` and ``aspect`` filled in and a
    #: single ``{caption}`` placeholder left.
    template: str
    #: The same with :data:`TEMPLATE_V1`.
    template_v1: str
    #: Where the text comes from.
    source: str

    def render(self, caption: str, version: TemplateVersion = "v2") -> str:
        """The prompt for ``caption``, inserted as-is (no stripping, no escaping)."""
        if version == "v2":
            template = self.template
        elif version == "v1":
            template = self.template_v1
        else:
            raise ValueError(f"unknown MLM-Filter template version {version!r}")
        # The filled template holds exactly one "{caption}" (at the top): replacing it
        # once is what str.format does upstream, and braces in the caption stay as they are.
        return template.replace("{caption}", caption, 1)


def _metric(name: str, long_name: str, criteria: str, variable: str) -> Metric:
    aspect = long_name.replace("_", " ")

    def fill(template: str) -> str:
        # Not str.format: keep "{caption}" as the only placeholder left.
        filled = template.replace("{criteria}", criteria).replace("{aspect}", aspect)
        if filled.count("{caption}") != 1 or "{" in filled.replace("{caption}", ""):
            raise ValueError(f"MLM-Filter template for {name} must keep one {{caption}} only")
        return filled

    return Metric(
        name=name,
        long_name=long_name,
        aspect=aspect,
        criteria=criteria,
        template=fill(TEMPLATE_V2),
        template_v1=fill(TEMPLATE_V1),
        source=(
            f"{_MLM_FILTER}: mlm_filter_scoring_datacomp_batch_inference_v2.py "
            f"(LLAVA_INSTRUCTION_TEMPLATE, {variable}); V1 template from "
            "mlm_filter_scoring_single_image.py"
        ),
    )


#: The four metrics, keyed by short name.
METRICS: Final[dict[str, Metric]] = {
    "itm": _metric("itm", "image_text_matching", _CRITERIA_ITM, "criteria_image_text_matching"),
    "odf": _metric(
        "odf",
        "object_detail_fulfillment",
        _CRITERIA_ODF,
        "criteria_object_detail_fulfillment",
    ),
    "ctq": _metric("ctq", "caption_text_quality", _CRITERIA_CTQ, "criteria_caption_text_quality"),
    "su": _metric("su", "semantic_understanding", _CRITERIA_SU, "criteria_semantic_understanding"),
}

#: Upstream long names accepted for the short ones.
METRIC_ALIASES: Final[dict[str, str]] = {m.long_name: m.name for m in METRICS.values()}


def get_metric(metric: str) -> Metric:
    """The metric for a short name (``su``) or an upstream long name
    (``semantic_understanding``); KeyError for anything else."""
    key = METRIC_ALIASES.get(metric, metric)
    try:
        return METRICS[key]
    except KeyError:
        known = sorted([*METRICS, *METRIC_ALIASES])
        raise KeyError(f"unknown MLM-Filter metric {metric!r}; known: {known}") from None


def prompt(metric: str, caption: str, *, version: TemplateVersion = "v2") -> str:
    """The MLM-Filter prompt for ``metric`` (short or long name) with ``caption``
    inserted verbatim; ``version`` picks :data:`TEMPLATE_V2` (default, the Qwen2.5 /
    GPT-4o model's script) or :data:`TEMPLATE_V1` (the 2024 GPT-4V models' scripts)."""
    return get_metric(metric).render(caption, version)


# --------------------------------------------------------------------------- answers

#: Scores accepted by :func:`parse_score`.  The shared template asks for "the entire
#: range from 0 to 100 ... each number between 0 and 100 considered as a potential
#: score", so 0 is a documented answer even though each criteria text says "1-100".
SCORE_MIN: Final = 0
SCORE_MAX: Final = 100

_SCORE = "(?:100|[1-9]?[0-9])"

#: Guided-decoding regex (full match) for the documented answer format: the score
#: alone on the first line (0-100, no sign, no leading zeros), then optionally a newline
#: and a one-line explanation ("Please first output a single line containing the value
#: ... In the subsequent line, please provide a comprehensive explanation").  An
#: optional single leading space is allowed because the upstream scripts append a space
#: token after the assistant header before decoding ("directly add 220 whitespace"), so
#: the fine-tuned model may want to emit it itself.  Every string it matches is accepted
#: by :func:`parse_score`.
SCORE_REGEX: Final = f"[ ]?{_SCORE}(?:\\n[^\\n]*)?"

#: The score-only form (what the upstream batch scripts decode: 1-2 new tokens).  With
#: it, allow the backend at least 4 new tokens: Qwen2 tokenizers emit one token per
#: digit, so upstream's 2-token limit cannot produce "100".
SCORE_ONLY_REGEX: Final = f"[ ]?{_SCORE}"

ParseFailure = Literal["empty", "unparseable", "out_of_range"]

#: Digits with ASCII whitespace around them; the upstream ``int()`` also takes these.
_FIRST_LINE = re.compile(r"[ \t\r\f\v]*([0-9]+)[ \t\r\f\v]*", re.ASCII)
_RAW_LIMIT = 200


@dataclass(frozen=True)
class ParseError:
    """Why an answer gives no score."""

    #: ``empty`` (blank answer), ``unparseable`` (first line is not an integer) or
    #: ``out_of_range`` (an integer outside ``SCORE_MIN..SCORE_MAX``).
    reason: ParseFailure
    #: The answer, truncated to 200 characters.
    raw: str


def parse_score(answer: str) -> int | ParseError:
    """The integer score in an MLM-Filter answer, or why there is none.

    Mirrors Open-Qwen2VL's ``above_threshold_decision`` (``apply_filter.py``), which
    does, on the stored text::

        if "\\n" in text: text = text.split("\\n")[0]   # first line only
        text = text.strip(",").strip(";")             # commas, then semicolons, at the ends
        int(text)                                     # ValueError -> sample dropped

    so the score is the first line (split on ``"\\n"`` only) with leading/trailing ``,``
    then ``;`` removed, in that order, and it must then be a whole integer with optional
    surrounding whitespace.  Like upstream this rejects decimals (``"85.5"``, ``"85.0"``),
    fractions (``"85/100"``), words (``"Score: 85"``, ``"85 points"``), an empty first
    line, and a number that appears only on a later line; it never falls back to a
    default score.

    Stricter than upstream, on purpose (every answer accepted here is accepted by
    upstream with the same value):

    * range: upstream has no range check (``"150"`` passes ``>= 85``); here a value
      outside ``SCORE_MIN..SCORE_MAX`` (0..100, see :data:`SCORE_MIN`) is
      ``out_of_range``;
    * ``int()`` leniencies that are not in the documented format are ``unparseable``:
      a sign (``"+85"``, ``"-5"``), digit-group underscores (``"8_5"``), non-ASCII
      digits (``"８５"``) and non-ASCII whitespace.  Leading zeros (``"085"``) are
      accepted, as ``int()`` does.

    A blank answer (empty or whitespace only) is ``empty``.
    """
    raw = answer[:_RAW_LIMIT]
    if not answer.strip():
        return ParseError("empty", raw)
    first = answer.split("\n", 1)[0].strip(",").strip(";")
    match = _FIRST_LINE.fullmatch(first)
    if match is None:
        return ParseError("unparseable", raw)
    digits = match.group(1).lstrip("0") or "0"
    # Length first: int() of a huge digit string is slow or refused (int_max_str_digits).
    if len(digits) > len(str(SCORE_MAX)) or not SCORE_MIN <= int(digits) <= SCORE_MAX:
        return ParseError("out_of_range", raw)
    return int(digits)


def keep_above(
    score: int,
    threshold: int,
    *,
    tie_prob: float | None = None,
    rng: random.Random | None = None,
) -> bool:
    """Open-Qwen2VL's keep decision (``above_threshold_decision``) on a parsed score.

    Without ``tie_prob`` (how Open-Qwen2VL filters SU and CTQ, and ITM/ODF given a
    ``--threshold``): keep iff ``score >= threshold``; Open-Qwen2VL keeps SU ``>= 85``.

    With ``tie_prob`` (upstream's ``prob``, computed for ITM/ODF only when a target
    ``--fraction`` is given, so that exactly that fraction is kept): keep if
    ``score > threshold``; at ``score == threshold`` keep iff ``rng.random() < tie_prob``.
    Upstream draws from the global ``random`` seeded with 42 at import; here the caller
    passes the seeded ``rng`` (required with ``tie_prob``), e.g. ``random.Random(42)``.
    Upstream tests ``if not prob``, so a ``prob`` of 0.0 keeps *every* tie; here 0.0
    keeps none (what the fraction computation means when no tie is needed).
    """
    if tie_prob is None:
        return score >= threshold
    if not 0.0 <= tie_prob <= 1.0:
        raise ValueError(f"tie_prob must be in [0, 1], got {tie_prob}")
    if rng is None:
        raise ValueError("keep_above: tie_prob needs a seeded rng (random.Random(seed))")
    if score != threshold:
        return score > threshold
    return rng.random() < tie_prob
