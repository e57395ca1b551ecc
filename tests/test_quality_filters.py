"""Heuristic quality filters: word splitting, each rule with its reason, boundaries,
presets, and the compiled kernels against a plain-Python reference of the rules."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from curate.stages.quality_filters import (
    C4Quality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from curate.quality.heuristics import (
    fineweb_stats,
    gopher_quality_stats,
    gopher_repetition_stats,
    word_spans,
)
from curate.stage import StageContext

CTX = StageContext("q", 0)


def make(cls: Any, **cfg: Any) -> Any:
    return cls(cls.Config(**cfg), CTX)


def verdict(stage: Any, *texts: str) -> tuple[list[bool], list[str | None], list[str | None]]:
    v = stage.decide(pa.table({"id": [str(i) for i in range(len(texts))], "text": list(texts)}))
    value = v.value.to_pylist() if v.value is not None else [None] * len(texts)
    return list(v.keep), v.reason.to_pylist(), value


PROSE = (
    "The quick brown fox jumps over the lazy dog and then it runs to the river with "
    "the other animals of the forest. "
)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "Hello, world. It's John's (big) dog... don't stop!",
            "Hello|,|world|.|It|'s|John|'s|(|big|)|dog|...|do|n't|stop|!",
        ),
        (
            "well-known e.g. U.S. http://x.org/a/b foo/bar 10-20 $5 3.14 1,000 end.",
            "well|-|known|e.g.|U.S.|http://x.org/a/b|foo|/|bar|10|-|20|$|5|3.14|1,000|end|.",
        ),
        ('#tag *bold* "quoted" [1] x:y', '#|tag|*|bold|*|"|quoted|"|[|1|]|x|:|y'),
        (
            "(see https://a.org/x). cannot 10km 100% Dr. Smith",
            "(|see|https://a.org/x|)|.|can|not|10|km|100|%|Dr.|Smith",
        ),
        ("  \n\t ", ""),
        ("Ünïcödé—text «quoted» 日本語。", "Ünïcödé|—|text|«|quoted|»|日本語|。"),
    ],
)
def test_words_split_like_spacy(text: str, words: str) -> None:
    assert word_spans(text) == (words.split("|") if words else [])


def test_gopher_quality_each_rule_has_its_reason() -> None:
    stage = make(GopherQuality)
    short = "the cat and the dog"
    long_words = " ".join(["extraordinarily"] * 60) + " the and"
    hashes = PROSE * 3 + " #" * 10
    bullets = "\n".join(["- item the and of with words"] * 10) + "\n" + PROSE * 3
    symbols = PROSE + " ".join(["123 456 789"] * 20)
    no_stop = " ".join(["alpha beta gamma delta"] * 20)
    keep, reason, value = verdict(
        stage, PROSE * 3, short, long_words, hashes, bullets, symbols, no_stop
    )
    assert keep == [True, False, False, False, False, False, False]
    assert reason == [
        None,
        "gopher_quality:min_words",
        "gopher_quality:max_mean_word_length",
        "gopher_quality:hash_ratio",
        "gopher_quality:bullet_lines",
        "gopher_quality:alpha_words",
        "gopher_quality:stop_words",
    ]
    assert value[1] == "5"  # five non-symbol words
    assert value[6] == "0"


def test_gopher_quality_boundaries_are_strict_and_overridable() -> None:
    words50 = " ".join(["the"] + ["and"] + ["word"] * 48)  # exactly 50 non-symbol words
    assert verdict(make(GopherQuality), words50)[0] == [True]
    assert verdict(make(GopherQuality, min_words=51), words50)[1] == ["gopher_quality:min_words"]
    assert verdict(make(GopherQuality, min_words=None, min_stop_words=3), words50)[1] == [
        "gopher_quality:stop_words"
    ]


def test_gopher_quality_stats_by_hand() -> None:
    text = "Hello, world... the and\n- bullet #1\nend…"
    stats = gopher_quality_stats(pa.array([text]), ("the", "and", "of"))[0]
    words = word_spans(text)
    assert stats[0] == len(words)
    non_symbol = [w for w in words if any(not re.match(r"[\W_]", c) for c in w)]
    assert stats[1] == len(non_symbol)
    assert stats[2] == pytest.approx(np.mean([len(w) for w in non_symbol]))
    assert stats[3] == pytest.approx(1 / len(words))  # one '#'
    assert stats[4] == pytest.approx(2 / len(words))  # '...' and '…'
    assert stats[5] == pytest.approx(1 / 3)  # one of three lines starts with '-'
    assert stats[6] == pytest.approx(1 / 3)  # the last line ends with an ellipsis
    assert stats[8] == 2  # distinct stop words: the, and


def test_gopher_repetition_rules() -> None:
    stage = make(GopherRepetition)
    repeated = "\n\n".join(["This paragraph says the same thing again and again."] * 4)
    lines = "\n".join(["same line here"] * 3 + ["a different line entirely, with more words"])
    varied = (
        "Curation pipelines read shards, score every record and keep the good ones. "
        "Each stage adds columns or drops rows with a reason, and nothing is lost.\n\n"
        "A second paragraph talks about something different: lineage manifests."
    )
    keep, reason, _ = verdict(stage, varied, repeated, lines, "")
    assert reason == [
        None,
        "gopher_repetition:dup_para_frac",
        "gopher_repetition:dup_line_frac",
        "gopher_repetition:empty",
    ]
    assert keep == [True, False, False, False]


def test_top_ngram_counts_first_of_equally_frequent() -> None:
    # every 2-gram occurs once: the first one ("aaaaaaaa b") counts, not the longest
    text = "aaaaaaaa b c dddddddddddddddd"
    stats = gopher_repetition_stats(pa.array([text]), [2], [])[0]
    assert stats[4] == pytest.approx(len("aaaaaaaa b") / len(text))


def _py_repetition(text: str, top_n: list[int], dup_n: list[int]) -> list[float]:
    """datatrove's algorithm, written plainly, over our words."""

    def dups(xs: list[str]) -> tuple[int, int]:
        seen: set[str] = set()
        d = c = 0
        for x in xs:
            if x in seen:
                d, c = d + 1, c + len(x)
            else:
                seen.add(x)
        return d, c

    paragraphs = re.split(r"\n{2,}", text.strip())
    lines = re.split(r"\n+", text)
    words = word_spans(text)
    out = []
    d, c = dups(paragraphs)
    out += [d / len(paragraphs), c / len(text)]
    d, c = dups(lines)
    out += [d / len(lines), c / len(text)]
    for n in top_n:
        grams = [" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            out.append(0.0)
            continue
        g, k = Counter(grams).most_common(1)[0]
        out.append(len(g) * k / len(text))
    for n in dup_n:
        seen: set[str] = set()
        total = i = 0
        while i < len(words) - n + 1:
            g = "".join(words[i : i + n])
            if g in seen:
                total += len(g)
                i += n
            else:
                seen.add(g)
                i += 1
        out.append(total / len(text))
    return out


def _py_fineweb(text: str) -> list[float]:
    lines = [line for line in text.split("\n") if line.strip() != ""]
    if not lines:
        return [0.0]
    seen: set[str] = set()
    dup_chars = 0
    for line in lines:
        if line in seen:
            dup_chars += len(line)
        seen.add(line)
    return [
        len(lines),
        sum(line.endswith((".", "!", "?")) for line in lines) / len(lines),
        sum(len(line) <= 30 for line in lines) / len(lines),
        dup_chars / len(text.replace("\n", "")),
        text.count("\n") / len(word_spans(text)),
    ]


VOCAB = ["the", "cat", "sat", "on", "mat", "dog", "a", "b", "x.", "!", "...", "ünï", "-", "#"]
doc_text = st.lists(
    st.one_of(st.sampled_from(VOCAB), st.sampled_from([" ", " ", "\n", "\n\n", "  "])),
    min_size=1,
    max_size=80,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(doc_text, min_size=1, max_size=6))
def test_kernels_match_plain_python(texts: list[str]) -> None:
    texts = [t for t in texts if t.strip()] or ["the cat"]
    rep = gopher_repetition_stats(pa.array(texts), [2, 3], [5, 6])
    fw = fineweb_stats(pa.array(texts), 30)
    for i, text in enumerate(texts):
        assert rep[i] == pytest.approx(_py_repetition(text, [2, 3], [5, 6])), text
        assert fw[i] == pytest.approx(_py_fineweb(text)), text


def test_c4_rewrites_text_and_counts_sentences() -> None:
    page = (
        "Menu Home About\n"
        "This is a real sentence. And here is another one!\n"
        "Enable javascript to see this page.\n"
        "We use cookies to improve things.\n"
        "Short.\n"
        "A cited claim is here [1].\n"
        "Is this the third sentence? Yes it is. Four, five.\n"
        "No terminal punctuation here at all"
    )
    keep, reason, _ = verdict(make(C4Quality), page)
    assert keep == [True] and reason == [None]
    out = make(C4Quality).process_batch(pa.table({"text": [page]}))
    assert out.column("text").to_pylist() == [
        "This is a real sentence. And here is another one!\n"
        "A cited claim is here .\n"
        "Is this the third sentence? Yes it is. Four, five."
    ]
    # six sentences; seven required
    assert verdict(make(C4Quality, min_sentences=7), page)[1] == ["c4_quality:too_few_sentences"]


def test_c4_page_rules_apply_only_to_surviving_lines() -> None:
    body = "One sentence here. Two sentences here. Three here. Four here. Five here.\n"
    # '{' on a line without terminal punctuation is dropped with its line, not the page
    assert verdict(make(C4Quality), body + "function f() { return 1 }")[0] == [True]
    _keep, reason, _ = verdict(make(C4Quality), body + "A brace { in a sentence.")
    assert reason == ["c4_quality:curly_bracket"]
    assert verdict(make(C4Quality), body + "Lorem Ipsum dolor sit amet.")[1] == [
        "c4_quality:lorem_ipsum"
    ]
    # FineWeb's variant keeps unpunctuated lines, so their brace now counts
    assert verdict(make(C4Quality, preset="fineweb"), body + "function f() { return 1 }")[1] == [
        "c4_quality:curly_bracket"
    ]


def test_fineweb_presets_and_boundaries() -> None:
    # 25 lines, 3 end in punctuation: ratio 0.12 exactly
    lines = [f"line number {i} has a few words in it" for i in range(22)]
    lines += [f"line number {i} ends properly." for i in range(3)]
    text = "\n".join(lines)
    assert verdict(make(FineWebQuality), text)[0] == [True]  # strict: 0.12 is kept
    _keep, reason, value = verdict(make(FineWebQuality, preset="paper"), text)
    assert reason == ["fineweb_quality:line_punct_ratio"] and value == ["0.12"]
    # 2 of 25 punctuated lines repeat an earlier one: a ratio near 0.08, over 0.01, under 0.1
    said = [f"sentence number {i} is long enough." for i in range(23)]
    dup = "\n".join([*said, said[0], said[1]])
    assert verdict(make(FineWebQuality), dup)[1] == ["fineweb_quality:char_dup_ratio"]
    assert verdict(make(FineWebQuality, preset="paper"), dup)[0] == [True]
    assert verdict(make(FineWebQuality, preset="paper", char_duplicates_ratio=0.05), dup)[1] == [
        "fineweb_quality:char_dup_ratio"
    ]
    assert verdict(make(FineWebQuality), "\n \n")[1] == ["fineweb_quality:empty"]


def test_keep_stats_writes_columns() -> None:
    stage = make(GopherQuality, keep_stats=True)
    assert "gopher_mean_word_length" in stage.writes()
    out = stage.process_batch(pa.table({"text": [PROSE * 3, "x"]}))
    assert out.num_rows == 1
    assert out.column("gopher_n_words").to_pylist()[0] > 50
    rep = make(GopherRepetition, keep_stats=True)
    assert list(rep.writes())[:2] == ["gopher_dup_para_frac", "gopher_dup_para_char_frac"]
    assert "gopher_top_2_gram_frac" in rep.writes()


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValidationError):
        GopherQuality.Config(max_bullet_lines_ratio=2)
    with pytest.raises(ValidationError):
        GopherRepetition.Config(top_n_grams={0: 0.1})
    with pytest.raises(ValidationError):
        C4Quality.Config(preset="t5")


def test_c4_strips_unicode_whitespace_like_str_strip() -> None:
    body = "One sentence here. Two here. Three here. Four here. Five here."
    stage = make(C4Quality, preset="fineweb")
    out = stage.process_batch(
        pa.table({"text": [f"[2]\u00a0{body}\r\nA last line here.\u3000[1]"]})
    )
    assert out.column("text").to_pylist() == [f"{body}\nA last line here."]
