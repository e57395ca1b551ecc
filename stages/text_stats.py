"""``text_stats``: basic text statistics as columns, computed with Arrow kernels.

Columns written:

* ``n_chars`` (int64): Unicode code points in the text.
* ``n_words`` (int64): whitespace-separated words.
* ``mean_word_length`` (float64): non-whitespace characters per word; 0 when
  there are no words.  Equal to the mean of the word lengths.
* ``alpha_fraction`` (float64): alphabetic characters (Unicode letters) over
  all characters; 0 for an empty text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curate.stage import Annotator, StageConfig

COLUMNS: dict[str, pa.DataType] = {
    "n_chars": pa.int64(),
    "n_words": pa.int64(),
    "mean_word_length": pa.float64(),
    "alpha_fraction": pa.float64(),
}


class TextStatsConfig(StageConfig):
    """No parameters yet; the column to measure is the pipeline's ``text``."""


def _safe_div(num: pa.Array, den: pa.Array) -> pa.Array:
    num_f = pc.cast(num, pa.float64())
    den_f = pc.cast(den, pa.float64())
    return pc.if_else(pc.equal(den_f, 0.0), 0.0, pc.divide(num_f, den_f))


#: Whitespace as Python's ``str.split()`` sees it: ASCII controls \t-\r and \x1c-\x1f,
#: NEL, and every Unicode separator (Zs, Zl, Zp).
WHITESPACE = r"[\t\n\x0b\x0c\r\x1c-\x1f\x85\p{Z}]"
WORD = rf"[^{WHITESPACE[1:-1]}]+"


def text_stats(text: pa.ChunkedArray | pa.Array) -> dict[str, pa.Array]:
    """The four statistics of a string column, vectorized (nulls count as empty).

    A word is a maximal run of non-whitespace characters, so ``n_words`` and
    ``mean_word_length`` agree with ``len(s.split())`` and the mean length of
    ``s.split()``.
    """
    text = pc.fill_null(text, "")
    n_chars = pc.cast(pc.utf8_length(text), pa.int64())
    n_words = pc.cast(pc.count_substring_regex(text, WORD), pa.int64())
    spaces = pc.count_substring_regex(text, WHITESPACE)
    alpha = pc.count_substring_regex(text, r"\pL")
    return {
        "n_chars": n_chars,
        "n_words": n_words,
        "mean_word_length": _safe_div(pc.subtract(n_chars, spaces), n_words),
        "alpha_fraction": _safe_div(alpha, n_chars),
    }


class TextStatsAnnotator(Annotator):
    """Adds ``n_chars``, ``n_words``, ``mean_word_length``, ``alpha_fraction``."""

    Config: ClassVar[type[StageConfig]] = TextStatsConfig

    def reads(self) -> Sequence[str]:
        return ("text",)

    def writes(self) -> Mapping[str, pa.DataType]:
        return COLUMNS

    def process_batch(self, batch: pa.Table) -> pa.Table:
        for name, column in text_stats(batch.column("text")).items():
            index = batch.schema.get_field_index(name)
            array = pc.cast(column, COLUMNS[name])
            batch = (
                batch.set_column(index, name, array)
                if index >= 0
                else batch.append_column(name, array)
            )
        return batch
