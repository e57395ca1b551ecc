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

import functools
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io.sink import cut
from curate.stage import Annotator, StageConfig, set_column

COLUMNS: dict[str, pa.DataType] = {
    "n_chars": pa.int64(),
    "n_words": pa.int64(),
    "mean_word_length": pa.float64(),
    "alpha_fraction": pa.float64(),
}


class TextStatsConfig(StageConfig):
    """No parameters yet; the column to measure is the pipeline's ``text``."""


#: Rows per kernel call: bounds the temporary arrays to a few hundred MB.
CHUNK_BYTES = 16 * 2**20


@functools.cache
def char_classes() -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Per code point: bit 0 = whitespace (``str.isspace``), bit 1 = letter (``str.isalpha``).

    Built once per process from Python's own Unicode database (about 0.15 s), so
    the statistics agree with ``str.split`` and ``str.isalpha`` on every input.
    """
    n = 0x110000
    ws = np.fromiter((chr(c).isspace() for c in range(n)), dtype=np.uint8, count=n)
    alpha = np.fromiter((chr(c).isalpha() for c in range(n)), dtype=np.uint8, count=n)
    return (ws | (alpha << 1)).astype(np.uint8)


WS, ALPHA = np.uint8(1), np.uint8(2)


def _classify_bytes(data: np.ndarray[Any, np.dtype[np.uint8]]) -> tuple[Any, Any]:
    """Per byte of valid UTF-8: its character's class, and whether it starts a character.

    ASCII bytes are classified by table lookup.  Only non-ASCII bytes (rare in
    most corpora) are decoded to code points; a continuation byte takes its
    lead byte's class, so a multi-byte space separates words correctly.
    """
    table = char_classes()
    cls = table[:128][np.minimum(data, 127)]
    starts = np.ones(data.size, dtype=bool)
    high = np.flatnonzero(data >= 0x80)
    if high.size == 0:
        return cls, starts
    b = data[high].astype(np.int32)
    lead = (b & 0xC0) != 0x80
    starts[high[~lead]] = False
    padded = np.concatenate([data, np.zeros(3, np.uint8)])
    at = high[lead]
    b0 = b[lead]
    b1, b2, b3 = (padded[at + k].astype(np.int32) & 0x3F for k in (1, 2, 3))
    cp = np.where(
        b0 < 0xE0,
        ((b0 & 0x1F) << 6) | b1,
        np.where(
            b0 < 0xF0,
            ((b0 & 0x0F) << 12) | (b1 << 6) | b2,
            ((b0 & 0x07) << 18) | (b1 << 12) | (b2 << 6) | b3,
        ),
    )
    lead_cls = table[np.minimum(cp, 0x10FFFF)]
    rank = np.cumsum(lead) - 1  # for each high byte: index of its lead among the leads
    cls[high] = lead_cls[rank]
    return cls, starts


def _per_row(flags: np.ndarray[Any, Any], bounds: np.ndarray[Any, Any]) -> Any:
    """Sum boolean ``flags`` over each row's byte range ``bounds[i]:bounds[i+1]``."""
    out = np.zeros(bounds.size - 1, dtype=np.int64)
    nonempty = bounds[1:] > bounds[:-1]
    if nonempty.any():
        out[nonempty] = np.add.reduceat(flags, bounds[:-1][nonempty], dtype=np.int64)
    return out


def _count_chunk(text: pa.LargeStringArray) -> tuple[Any, Any, Any]:
    """Words, whitespace characters and letters per row of one chunk."""
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[
        text.offset : text.offset + len(text) + 1
    ]
    buffer = text.buffers()[2]
    data = (
        np.frombuffer(buffer, dtype=np.uint8)[offsets[0] : offsets[-1]]
        if buffer is not None
        else np.zeros(0, np.uint8)
    )
    bounds = offsets - offsets[0]
    cls, starts = _classify_bytes(data)
    ws = (cls & WS).astype(bool)
    prev_ws = np.ones_like(ws)
    prev_ws[1:] = ws[:-1]
    prev_ws[bounds[:-1][bounds[1:] > bounds[:-1]]] = True  # a row's first byte may start a word
    word_start = starts & ~ws & prev_ws
    letters = ((cls & ALPHA) > 0) & starts
    return _per_row(word_start, bounds), _per_row(ws & starts, bounds), _per_row(letters, bounds)


def text_stats(text: pa.ChunkedArray | pa.Array) -> dict[str, pa.Array]:
    """The four statistics of a string column (nulls count as empty).

    A word is a maximal run of non-whitespace characters, so ``n_words`` and
    ``mean_word_length`` agree with ``len(s.split())`` and the mean length of
    ``s.split()``; ``alpha_fraction`` counts ``str.isalpha`` characters.
    Vectorized: UTF-8 is decoded with numpy and classified by table lookup,
    about ten times faster than Arrow's regex counting of character classes.
    """
    text = pc.cast(pc.fill_null(text, ""), pa.large_string())
    arr = text.combine_chunks() if isinstance(text, pa.ChunkedArray) else text
    n_chars = pc.utf8_length(arr).to_numpy().astype(np.int64)
    byte_len = pc.binary_length(arr).to_numpy().astype(np.int64)
    parts = [_count_chunk(arr.slice(a, b - a)) for a, b in cut(byte_len, CHUNK_BYTES)]
    if not parts:
        parts = [_count_chunk(arr)]
    n_words, spaces, letters = (np.concatenate(p) for p in zip(*parts, strict=True))
    nonspace = n_chars - spaces
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(n_words > 0, nonspace / np.maximum(n_words, 1), 0.0)
        frac = np.where(n_chars > 0, letters / np.maximum(n_chars, 1), 0.0)
    return {
        "n_chars": pa.array(n_chars, pa.int64()),
        "n_words": pa.array(n_words, pa.int64()),
        "mean_word_length": pa.array(mean, pa.float64()),
        "alpha_fraction": pa.array(frac, pa.float64()),
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
            batch = set_column(batch, name, pc.cast(column, COLUMNS[name]))
        return batch
