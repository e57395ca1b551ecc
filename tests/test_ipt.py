"""Instruction Pre-Training synthesizer I/O: input format, pair parsing, M-shot prompts.

Expected strings follow microsoft/LMOps@4f2a9deb instruction_pretrain/utils/read_compre.py
(cook_read, cook_compre, parse_comprehension, get_dataset), written out by hand here.
"""

from __future__ import annotations

import pytest

from curate.synth.ipt import (
    CON_PROMPT,
    MAX_MODEL_LEN,
    MAX_NEW_TOKENS,
    TEMPERATURE,
    FewShotPrompt,
    Pair,
    ParsedPairs,
    demonstration,
    few_shot_input,
    few_shot_prompt,
    fits,
    parse_pairs,
    render_pairs,
    synth_input,
    word_count,
)

# ------------------------------------------------------------------------------ input


def test_defaults() -> None:
    assert (MAX_MODEL_LEN, MAX_NEW_TOKENS, TEMPERATURE) == (4096, 400, 0.0)


def test_synth_input_exact() -> None:
    assert synth_input("Cats purr.") == "<s> <CON> Cats purr. </CON>\n\n"
    assert CON_PROMPT == "<s> <CON> {text} </CON>\n\n"
    assert CON_PROMPT.format(text="Cats purr.") == synth_input("Cats purr.")


def test_synth_input_keeps_text_verbatim() -> None:
    # no stripping, braces are not template fields
    assert synth_input(" a {context}\n") == "<s> <CON>  a {context}\n </CON>\n\n"


def test_synth_input_bos_and_empty_text() -> None:
    assert synth_input("x", bos="") == " <CON> x </CON>\n\n"
    assert synth_input("") == "<s>"  # the repo's cook_read gives BOS alone for ""


# ------------------------------------------------------------------------------ render

PAIRS = (Pair("What do cats do?", "They purr."), Pair("Why?", "Contentment."))
RENDERED = "<QUE> What do cats do? <ANS> They purr. </END>\n\n<QUE> Why? <ANS> Contentment. </END>"


def test_render_pairs_exact() -> None:
    assert render_pairs(PAIRS) == RENDERED
    assert render_pairs(PAIRS[:1]) == "<QUE> What do cats do? <ANS> They purr. </END>"
    assert render_pairs(()) == ""


def test_render_pairs_braces_are_literal() -> None:
    assert render_pairs([Pair("{answer}?", "x")]) == "<QUE> {answer}? <ANS> x </END>"


# ------------------------------------------------------------------------------ parse


def test_parse_good_output() -> None:
    first = "<QUE> What do cats do?\n<ANS>  They purr.\n</END>"
    out = first + "\n\n<QUE> Why? <ANS> Contentment. </END>"
    assert parse_pairs(out) == ParsedPairs(pairs=PAIRS, truncated=0, malformed=0, duplicates=0)


def test_parse_truncated_last_pair() -> None:
    out = RENDERED + "\n\n<QUE> And dogs? <ANS> They ba"
    assert parse_pairs(out) == ParsedPairs(pairs=PAIRS, truncated=1, malformed=0, duplicates=0)


def test_parse_trailing_whitespace_is_not_truncation() -> None:
    assert parse_pairs(RENDERED + "\n\n") == ParsedPairs(pairs=PAIRS, truncated=0)


def test_parse_truncated_before_ans() -> None:
    parsed = parse_pairs("<QUE> Only a question")
    assert parsed == ParsedPairs(pairs=(), truncated=1, malformed=0, duplicates=0)


def test_parse_malformed_pairs() -> None:
    out = (
        "<QUE> no answer tag </END>\n\n"  # no <ANS>
        "<QUE> empty answer <ANS>   </END>\n\n"  # empty answer
        "<QUE> two <ANS> tags <ANS> here </END>\n\n"  # more than one <ANS>
        "Sure! <QUE> lead-in <ANS> x </END>\n\n"  # does not start with <QUE>
        "<QUE> ok <ANS> fine </END>"
    )
    assert parse_pairs(out) == ParsedPairs(
        pairs=(Pair("ok", "fine"),), truncated=0, malformed=4, duplicates=0
    )


def test_parse_empty_question_follows_repo_by_default() -> None:
    out = "<QUE>  <ANS> a </END>"
    assert parse_pairs(out) == ParsedPairs(pairs=(Pair("", "a"),))
    assert parse_pairs(out, drop_empty_questions=True) == ParsedPairs(pairs=(), malformed=1)


def test_parse_removes_every_que_tag() -> None:
    assert parse_pairs("<QUE> a <QUE> b <ANS> c </END>").pairs == (Pair("a  b", "c"),)


def test_parse_dedup_case_insensitive_keeps_first() -> None:
    out = (
        "<QUE> What is X? <ANS> first </END>\n\n"
        "<QUE> WHAT IS x?  <ANS> second </END>\n\n"  # same after strip + lower
        "<QUE> what  is x? <ANS> third </END>\n\n"  # inner double space: different
        "<QUE> Other <ANS> fourth </END>"
    )
    parsed = parse_pairs(out)
    assert parsed.pairs == (
        Pair("What is X?", "first"),
        Pair("what  is x?", "third"),
        Pair("Other", "fourth"),
    )
    assert parsed.duplicates == 1
    assert len(parse_pairs(out, deduplicate=False).pairs) == 4


@pytest.mark.parametrize("out", ["", "\n", "I cannot help with that.", "</END>", "<ANS> x"])
def test_parse_zero_pairs(out: str) -> None:
    parsed = parse_pairs(out)
    assert parsed.pairs == ()
    assert (parsed.truncated, parsed.malformed, parsed.duplicates) == {
        "": (0, 0, 0),
        "\n": (0, 0, 0),
        "I cannot help with that.": (1, 0, 0),
        "</END>": (0, 1, 0),
        "<ANS> x": (1, 0, 0),
    }[out]


def test_round_trip() -> None:
    pairs = (Pair("Q one?", "A\nmultiline"), Pair("Q two", "b"), Pair("q", "{x}"))
    assert parse_pairs(render_pairs(pairs)) == ParsedPairs(pairs=pairs)


# ------------------------------------------------------------------------------ few-shot


def test_word_count_splits_on_single_spaces_only() -> None:
    assert word_count("a\nb  c") == 3  # "a\nb", "", "c"
    assert word_count("") == 1
    assert word_count("<s> <CON> c </CON>\n\n") == 4


def test_demonstration_exact() -> None:
    assert demonstration("T", RENDERED) == "<s> <CON> T </CON>\n\n" + RENDERED + "</s>"


def test_few_shot_chain_exact() -> None:
    demos = [("One.", "<QUE> a <ANS> b </END>"), ("Two.", "<QUE> c <ANS> d </END>")]
    assert few_shot_prompt("Three.", demos) == FewShotPrompt(
        prompt="<s> <CON> One. </CON>\n\n<QUE> a <ANS> b </END></s>"
        "<s> <CON> Two. </CON>\n\n<QUE> c <ANS> d </END></s>"
        "<s> <CON> Three. </CON>\n\n",
        n_demos=2,
    )


def test_few_shot_without_usable_demos() -> None:
    assert few_shot_input("c", []) == "<s> <CON> c </CON>\n\n"
    # the latest previous entry has no pairs: nothing is prepended
    assert few_shot_prompt("c", [("a", "<QUE> q <ANS> x </END>"), ("b", "")]) == FewShotPrompt(
        prompt="<s> <CON> c </CON>\n\n", n_demos=0
    )
    with pytest.raises(ValueError, match="latest"):
        few_shot_prompt("c", [("a", ""), ("b", "<QUE> q <ANS> x </END>")])


def _boundary_demo(n_words: int) -> tuple[str, str]:
    # demonstration: "<s> <CON> " + n words + " </CON>\n\n<QUE> q <ANS> a </END></s>"
    # has n + 6 spaces; the current input "<s> <CON> c </CON>\n\n" has 3.
    # word count = spaces + 1 = n + 10.
    return (" ".join(["w"] * n_words), "<QUE> q <ANS> a </END>")


def test_few_shot_fit_boundary_defaults() -> None:
    # (4096 - 400) / 1.5 = 2464 words fit, 2465 do not
    inside = few_shot_prompt("c", [_boundary_demo(2454)])
    assert word_count(inside.prompt) == 2464
    assert inside.n_demos == 1
    assert inside.prompt.endswith("</s><s> <CON> c </CON>\n\n")
    outside = few_shot_prompt("c", [_boundary_demo(2455)])
    assert outside == FewShotPrompt(prompt="<s> <CON> c </CON>\n\n", n_demos=0)


def test_few_shot_fit_boundary_custom_and_all_or_nothing() -> None:
    # budget 40 - 10 = 30 -> at most 20 words; two demos of 1 word each: (1+6)*2 + 3 + 1 = 18
    demos = [_boundary_demo(1), _boundary_demo(1)]
    assert few_shot_prompt("c", demos, max_model_len=40, max_new_tokens=10).n_demos == 2
    # three demos: 7*3 + 3 + 1 = 25 words > 20; none is kept, not a fitting subset
    demos3 = [*demos, _boundary_demo(1)]
    assert few_shot_prompt("c", demos3, max_model_len=40, max_new_tokens=10).n_demos == 0
    assert fits("w " * 19 + "w", max_model_len=40, max_new_tokens=10)  # 20 words
    assert not fits("w " * 20 + "w", max_model_len=40, max_new_tokens=10)  # 21 words
