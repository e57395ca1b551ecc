"""MLM-Filter prompts, answer parsing and the Open-Qwen2VL keep decision."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re

import pytest

from curate.mllm import mlm_filter as mf
from curate.mllm.mlm_filter import METRICS, ParseError, keep_above, parse_score, prompt

CAPTION = "a dog on a red sofa"

# sha256 of LLAVA_INSTRUCTION_TEMPLATE.format(caption=CAPTION, criteria=..., aspect=...)
# computed from the upstream files themselves (Victorwz/MLM_Filter@7c4cd80f,
# mlm_filter_scoring_datacomp_batch_inference_v2.py for v2 and
# mlm_filter_scoring_single_image.py for v1), not from this module.
UPSTREAM_SHA256 = {
    ("v1", "itm"): "93edadb454c0cc009d85c8df99c66fe5bd7966dd84115c61a7dc362a61040a1e",
    ("v1", "odf"): "f8975449068cc2dbc23fe9700238cd4d2f19c9fd787e1b41710642827f20b573",
    ("v1", "ctq"): "3502d21f151d9ebf74e887205cd40e47d5de922f51ded9fd8baad48db6db69b3",
    ("v1", "su"): "c6f467d374ff5fdc94d0ab6c1f2d01371b9775683a7074b46fab13e8364dbd9c",
    ("v2", "itm"): "ef57ad27f1f9ffd5f6cf76eac7a9b75351865c7ae45eee39e3b77d8151b5331d",
    ("v2", "odf"): "9ee9298b620683b90b0b4fd7eb65108e4a045b2d7317088924d9f6cd75bcec89",
    ("v2", "ctq"): "058798979b774b9fe73eeca2af99e6907531f6e6019b1b92c1499b71cadff9a7",
    ("v2", "su"): "0f9e4df5d7233aa90fdf112eda57452afab0242143b79afbe4f6fd1d79d46823",
}

LONG_NAMES = {
    "itm": "image_text_matching",
    "odf": "object_detail_fulfillment",
    "ctq": "caption_text_quality",
    "su": "semantic_understanding",
}


# ------------------------------------------------------------------------------ prompts


def test_four_metrics_with_their_long_names() -> None:
    assert set(METRICS) == {"itm", "odf", "ctq", "su"}
    for short, long_name in LONG_NAMES.items():
        metric = METRICS[short]
        assert metric.name == short
        assert metric.long_name == long_name
        assert metric.aspect == long_name.replace("_", " ")
        assert "Victorwz/MLM_Filter@7c4cd80f" in metric.source
        assert mf.METRIC_ALIASES[long_name] == short


@pytest.mark.parametrize(("version", "short"), sorted(UPSTREAM_SHA256))
def test_prompt_is_byte_identical_to_upstream(version: mf.TemplateVersion, short: str) -> None:
    text = prompt(short, CAPTION, version=version)
    assert hashlib.sha256(text.encode()).hexdigest() == UPSTREAM_SHA256[(version, short)]


def test_default_template_is_v2() -> None:
    for short in METRICS:
        assert prompt(short, CAPTION) == prompt(short, CAPTION, version="v2")
        assert prompt(short, CAPTION) != prompt(short, CAPTION, version="v1")


@pytest.mark.parametrize("short", sorted(LONG_NAMES))
def test_prompt_holds_caption_criteria_and_aspect(short: str) -> None:
    metric = METRICS[short]
    for version in ("v1", "v2"):
        text = prompt(short, CAPTION, version=version)
        assert text.startswith(f"Text Caption: {CAPTION}\n\n{metric.criteria} ")
        assert f"A higher score indicates higher level of {metric.aspect}." in text
        assert "Please first output a single line containing the value" in text
        assert "{" not in text


def test_metric_specific_wording() -> None:
    assert "primary theme" in METRICS["itm"].criteria
    assert "color, size, position, shape, material" in METRICS["odf"].criteria
    assert "Grammatical Correctness" in METRICS["ctq"].criteria
    assert "homeless man" in METRICS["su"].criteria
    assert METRICS["su"].criteria.endswith("on a scale from 1 to 100.")
    for short in ("itm", "odf", "ctq"):
        assert "on a scale of 1-100" in METRICS[short].criteria


def test_v1_and_v2_differ_only_in_the_rounding_sentence() -> None:
    assert "round to multiples of 10.  Please" in mf.TEMPLATE_V1
    assert "round to multiples of 5 or 10. Please" in mf.TEMPLATE_V2
    assert mf.TEMPLATE_V1.replace("multiples of 10.  Please", "X") == mf.TEMPLATE_V2.replace(
        "multiples of 5 or 10. Please", "X"
    )


def test_long_names_are_aliases() -> None:
    for short, long_name in LONG_NAMES.items():
        assert prompt(long_name, CAPTION) == prompt(short, CAPTION)
        assert mf.get_metric(long_name) is METRICS[short]


@pytest.mark.parametrize("name", ["all", "SU", "semantic understanding", "", "clip"])
def test_unknown_metric_raises(name: str) -> None:
    with pytest.raises(KeyError, match="unknown MLM-Filter metric"):
        prompt(name, CAPTION)


def test_unknown_version_raises() -> None:
    with pytest.raises(ValueError, match="version"):
        prompt("su", CAPTION, version="v3")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "  padded caption  ",
        "two\nlines",
        "braces {caption} {criteria} {aspect} {0} {} }{",
        "percent %s %(x)s and backslash \\n",
        "unicode: café 東京 🐕",
    ],
)
def test_caption_is_inserted_as_is(caption: str) -> None:
    for short in METRICS:
        text = prompt(short, caption)
        head = f"Text Caption: {caption}\n\n"
        assert text.startswith(head)
        # Same text as with a plain caption, apart from the caption itself.
        assert text[len(head) :] == prompt(short, CAPTION)[len(f"Text Caption: {CAPTION}\n\n") :]


def test_metric_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        METRICS["su"].template = "x"  # type: ignore[misc]


def test_system_prompt_is_qwen_instruct() -> None:
    assert mf.SYSTEM_PROMPT == "You are a helpful assistant"


# ------------------------------------------------------------------------------ parsing


def _upstream_first_line_int(text: str) -> int | None:
    """Reference for Open-Qwen2VL's above_threshold_decision: the integer it compares
    with the threshold, or None where it raises ValueError (and drops the sample)."""
    if "\n" in text:
        text = text.split("\n", maxsplit=1)[0]
    text = text.strip(",").strip(";")
    try:
        return int(text)
    except ValueError:
        return None


@pytest.mark.parametrize(
    ("answer", "score"),
    [
        ("85", 85),
        ("0", 0),
        ("1", 1),
        ("7", 7),
        ("100", 100),
        (" 85", 85),
        ("85 ", 85),
        ("\t85\t", 85),
        ("85\n", 85),
        ("85\nThe caption names the breed and the city, which the image cannot show.", 85),
        ("85\n\nExplanation over\nseveral lines, with 12 and 99 in it.", 85),
        ("85\r\nexplanation", 85),
        ("085", 85),
        ("0100", 100),
        ("85,", 85),
        ("85;", 85),
        (",85", 85),
        ("85;,", 85),
        (",;85", 85),
        ("85,\nbecause", 85),
        ("  42  \n  7", 42),
    ],
)
def test_parse_accepts_first_line_integer(answer: str, score: int) -> None:
    assert parse_score(answer) == score
    assert _upstream_first_line_int(answer) == score


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("\n\n", "empty"),
        ("\n85", "unparseable"),
        ("The score is\n85", "unparseable"),
        ("Score: 85", "unparseable"),
        ("85 points", "unparseable"),
        ("85/100", "unparseable"),
        ("85.5", "unparseable"),
        ("85.0", "unparseable"),
        ("8 5", "unparseable"),
        ("eighty-five", "unparseable"),
        ("85,;", "unparseable"),
        ("85, ", "unparseable"),
        ("85!", "unparseable"),
        ("N/A", "unparseable"),
        ("101", "out_of_range"),
        ("150\nway above", "out_of_range"),
        ("1000", "out_of_range"),
        ("9" * 5000, "out_of_range"),
    ],
)
def test_parse_rejects_garbage_like_upstream(answer: str, reason: str) -> None:
    result = parse_score(answer)
    assert isinstance(result, ParseError)
    assert result.reason == reason
    assert result.raw == answer[:200]
    if reason != "out_of_range":
        # Upstream drops these too (ValueError), apart from blank lines being blank.
        assert _upstream_first_line_int(answer) is None


@pytest.mark.parametrize("answer", ["+85", "-5", "-0", "8_5", "８５", "\u00a085", "٨٥"])
def test_parse_is_stricter_than_int(answer: str) -> None:
    # Python's int() takes all of these; the documented answer format has none of them.
    result = parse_score(answer)
    assert isinstance(result, ParseError)
    assert result.reason == "unparseable"


def test_parse_never_disagrees_with_upstream() -> None:
    rng = random.Random(0)
    alphabet = ["0", "1", "5", "8", "9", " ", "\n", ",", ";", ".", "-", "+", "a", "\t"]
    for _ in range(20000):
        answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        result = parse_score(answer)
        if isinstance(result, int):
            assert _upstream_first_line_int(answer) == result, answer
            assert mf.SCORE_MIN <= result <= mf.SCORE_MAX


def test_parse_error_truncates_raw_and_is_frozen() -> None:
    answer = "not a score " * 50
    result = parse_score(answer)
    assert isinstance(result, ParseError)
    assert result.reason == "unparseable"
    assert len(result.raw) == 200
    assert answer.startswith(result.raw)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.reason = "empty"  # type: ignore[misc]


def test_parse_returns_plain_int() -> None:
    result = parse_score("85\nok")
    assert type(result) is int


# ------------------------------------------------------------------------------ regexes


def test_score_regex_covers_every_score_and_parses() -> None:
    full = re.compile(mf.SCORE_REGEX)
    only = re.compile(mf.SCORE_ONLY_REGEX)
    for value in range(mf.SCORE_MIN, mf.SCORE_MAX + 1):
        for text in (str(value), f" {value}", f"{value}\nbecause it matches", f"{value}\n"):
            assert full.fullmatch(text), text
            assert parse_score(text) == value
        assert only.fullmatch(str(value))
        assert only.fullmatch(f" {value}")
        assert not only.fullmatch(f"{value}\nbecause")


@pytest.mark.parametrize(
    "text",
    ["", "101", "085", "00", "-1", "+1", "85.5", "85 ", "  85", "a", "85\nline\nline", "\n85"],
)
def test_score_regex_rejects_other_shapes(text: str) -> None:
    assert not re.fullmatch(mf.SCORE_REGEX, text)
    assert not re.fullmatch(mf.SCORE_ONLY_REGEX, text)


# ------------------------------------------------------------------------------ keep


@pytest.mark.parametrize(
    ("score", "threshold", "keep"),
    [(85, 85, True), (86, 85, True), (100, 85, True), (84, 85, False), (0, 85, False)],
)
def test_keep_above_is_greater_or_equal(score: int, threshold: int, keep: bool) -> None:
    assert keep_above(score, threshold) is keep


def test_keep_above_tie_break() -> None:
    rng = random.Random(42)
    # Away from the threshold the draw does not matter.
    assert keep_above(90, 85, tie_prob=0.0, rng=rng)
    assert not keep_above(80, 85, tie_prob=1.0, rng=rng)
    # At the threshold: probability 1 keeps, 0 drops (upstream's `if not prob` would keep).
    assert all(keep_above(85, 85, tie_prob=1.0, rng=rng) for _ in range(100))
    assert not any(keep_above(85, 85, tie_prob=0.0, rng=rng) for _ in range(100))


def test_keep_above_tie_break_is_seeded_like_upstream() -> None:
    ours = [keep_above(66, 66, tie_prob=0.3, rng=random.Random(42)) for _ in range(3)]
    assert len(set(ours)) == 1  # one fresh seeded rng, one draw: same answer each time
    rng = random.Random(42)
    decisions = [keep_above(66, 66, tie_prob=0.3, rng=rng) for _ in range(2000)]
    reference = random.Random(42)
    assert decisions == [reference.random() < 0.3 for _ in range(2000)]
    assert 0.25 < sum(decisions) / len(decisions) < 0.35


def test_keep_above_tie_break_arguments() -> None:
    with pytest.raises(ValueError, match="rng"):
        keep_above(85, 85, tie_prob=0.5)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="tie_prob"):
            keep_above(85, 85, tie_prob=bad, rng=random.Random(0))
