"""Stage kernels on tiny Arrow tables, checked against plain-Python references."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from curate.stages.exact_dedup import ExactDedup, ExactDedupConfig
from curate.stages.length_filter import LengthFilter, LengthFilterConfig
from curate.stages.text_stats import TextStatsAnnotator, TextStatsConfig
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from curate.stage import POS, UNIT, StageContext

CTX = StageContext(name="s", seed=0)


def reference_stats(text: str) -> tuple[int, int, float, float]:
    words = text.split()
    mean = sum(len(w) for w in words) / len(words) if words else 0.0
    alpha = sum(c.isalpha() for c in text) / len(text) if text else 0.0
    return len(text), len(words), mean, alpha


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",))), max_size=8)
)
def test_text_stats_match_python(texts: list[str]) -> None:
    stage = TextStatsAnnotator(TextStatsConfig(), CTX)
    out = stage.process_batch(pa.table({"text": pa.array(texts, pa.string())}))
    for i, text in enumerate(texts):
        chars, words, mean, alpha = reference_stats(text)
        row = out.slice(i, 1).to_pylist()[0]
        assert (row["n_chars"], row["n_words"]) == (chars, words)
        assert row["mean_word_length"] == pytest.approx(mean)
        assert row["alpha_fraction"] == pytest.approx(alpha)


def test_length_filter_reasons_and_values() -> None:
    stage = LengthFilter(
        LengthFilterConfig(min_chars=3, max_chars=100, min_words=2, max_words=3), CTX
    )
    batch = pa.table({"n_chars": [2, 200, 10, 10, 10], "n_words": [1, 1, 1, 5, 2]})
    verdict = stage.decide(batch)
    assert verdict.keep.tolist() == [False, False, False, False, True]
    assert verdict.reason.to_pylist() == [
        "too_few_chars",
        "too_many_chars",
        "too_few_words",
        "too_many_words",
        None,
    ]
    assert verdict.value is not None
    assert verdict.value.to_pylist() == ["2", "200", "1", "5", None]
    assert stage.process_batch(batch).num_rows == 1


def test_length_filter_bounds_are_validated() -> None:
    with pytest.raises(ValueError, match="must not exceed"):
        LengthFilterConfig(min_words=10, max_words=2)


def _keys(texts: list[str], ids: list[str] | None = None) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            UNIT: np.repeat([0, 1], [n // 2, n - n // 2]).astype(np.int64),
            POS: np.arange(n, dtype=np.int64),
            "id": ids or [f"id{i}" for i in range(n)],
            "text": texts,
        }
    )


def test_exact_dedup_keeps_first_and_names_it() -> None:
    stage = ExactDedup(ExactDedupConfig(), CTX)
    texts = ["Hello  World", "other", "hello world", "HELLO WORLD ", "other", "unique"]
    decisions = stage.reduce_partition(stage.hash_batch(_keys(texts))).to_pylist()
    dropped = {d[POS]: d for d in decisions}
    assert sorted(dropped) == [2, 3, 4]
    assert dropped[2]["reason"] == "exact_duplicate:id0"
    assert dropped[4]["value"] == "id1"


def test_exact_dedup_smallest_id_and_no_normalization() -> None:
    stage = ExactDedup(ExactDedupConfig(keep="smallest_id", lowercase=False), CTX)
    texts = ["a b", "A B", "a b"]
    decisions = stage.reduce_partition(stage.hash_batch(_keys(texts, ["z", "y", "b"]))).to_pylist()
    assert [(d[POS], d["value"]) for d in decisions] == [(0, "b")]


def test_unknown_stage_param_is_an_error() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        ExactDedupConfig.model_validate({"keep": "first", "bogus": 1})


def test_text_stats_on_nulls_slices_chunks_and_small_kernel_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from curate.stages import text_stats as module

    texts = ["", None, "  two  words ", "Grüße aus Köln — 東京 🎉\u2003ok", "x", "a\u2028b\tc"]
    monkeypatch.setattr(module, "CHUNK_BYTES", 7)
    chunked = pa.chunked_array([pa.array(["pad", *texts[:3]]).slice(1), pa.array(texts[3:])])
    stats = module.text_stats(chunked)
    for i, text in enumerate(texts):
        chars, words, mean, alpha = reference_stats(text or "")
        assert stats["n_words"][i].as_py() == words, text
        assert stats["n_chars"][i].as_py() == chars
        assert stats["mean_word_length"][i].as_py() == pytest.approx(mean)
        assert stats["alpha_fraction"][i].as_py() == pytest.approx(alpha)
