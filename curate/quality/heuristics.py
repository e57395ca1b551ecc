"""Heuristic quality rules: measure every document once, then compare with thresholds.

The measurements come from the compiled kernels of :mod:`curate.quality.kernel`
(one pass over a batch's UTF-8 buffer); the decisions are numpy comparisons,
rule by rule in a fixed order, and the first rule a document fails is its drop
reason.  A threshold of ``None`` switches its rule off.

Comparisons follow datatrove's filters (the code FineWeb was produced with):
a maximum drops values strictly above it and a minimum drops values strictly
below it, except where a rule says otherwise (FineWeb's ``inclusive`` mode
uses the paper's ``<=`` / ``>=``).  A measurement that is undefined (the mean
word length of a document without words) fails no threshold, as in datatrove.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.quality import kernel
from curate.quality.chars import table

Array = np.ndarray[Any, Any]


def buffers(text: pa.Array | pa.ChunkedArray) -> tuple[Array, Array]:
    """The UTF-8 bytes and int64 offsets of a string column (nulls as empty strings)."""
    arr = pc.cast(pc.fill_null(text, ""), pa.large_string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks else pa.array([], pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    buf = arr.buffers()[2]
    data = np.frombuffer(buf, dtype=np.uint8) if buf is not None else np.zeros(1, np.uint8)
    return data, np.ascontiguousarray(offsets)


def gopher_quality_stats(text: pa.Array | pa.ChunkedArray, stop_words: Sequence[str]) -> Array:
    """Rows of :data:`kernel.GOPHER_QUALITY_STATS`."""
    data, offsets = buffers(text)
    out = np.zeros((offsets.size - 1, len(kernel.GOPHER_QUALITY_STATS)), dtype=np.float64)
    stops, lens = kernel.word_table(sorted(set(stop_words)))
    kernel.gopher_quality(data, offsets, table(), stops, lens, out)
    return out


def gopher_repetition_stats(
    text: pa.Array | pa.ChunkedArray, top_n: Sequence[int], dup_n: Sequence[int]
) -> Array:
    """Per row: duplicate paragraph fraction and char fraction, the same for lines, the
    top-n-gram char fraction per ``top_n``, the duplicated-n-gram char fraction per
    ``dup_n``; NaN everywhere for an empty text."""
    data, offsets = buffers(text)
    out = np.zeros((offsets.size - 1, 4 + len(top_n) + len(dup_n)), dtype=np.float64)
    kernel.gopher_repetition(
        data,
        offsets,
        table(),
        np.asarray(top_n, dtype=np.int64),
        np.asarray(dup_n, dtype=np.int64),
        out,
    )
    return out


def fineweb_stats(text: pa.Array | pa.ChunkedArray, short_line_length: int) -> Array:
    """Rows of :data:`kernel.FINEWEB_STATS`."""
    data, offsets = buffers(text)
    out = np.zeros((offsets.size - 1, len(kernel.FINEWEB_STATS)), dtype=np.float64)
    kernel.fineweb(data, offsets, table(), short_line_length, out)
    return out


@dataclass(frozen=True)
class C4Options:
    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    count_sentences: bool = True
    max_word_length: int | None = 1000
    min_words_per_line: int = 3
    policy_substrings: tuple[str, ...] = ()


def c4_stats(text: pa.Array | pa.ChunkedArray, opts: C4Options) -> tuple[Array, pa.Array]:
    """Rows of :data:`kernel.C4_STATS` and the text of the kept lines."""
    data, offsets = buffers(text)
    n = offsets.size - 1
    out = np.zeros((n, len(kernel.C4_STATS)), dtype=np.float64)
    flags = np.array(
        [
            opts.remove_citations,
            opts.filter_no_terminal_punct,
            opts.filter_lorem_ipsum,
            opts.filter_javascript,
            opts.filter_curly_bracket,
            opts.filter_policy,
            opts.count_sentences,
        ],
        dtype=np.bool_,
    )
    policy, policy_lens = kernel.word_table([p.lower() for p in opts.policy_substrings])
    size = int(offsets[-1] - offsets[0]) if n else 0
    text_out = np.zeros(size + 1, dtype=np.uint8)
    text_offsets = np.zeros(n + 1, dtype=np.int64)
    kernel.c4(
        data,
        offsets,
        table(),
        flags,
        -1 if opts.max_word_length is None else opts.max_word_length,
        opts.min_words_per_line,
        policy,
        policy_lens,
        out,
        text_out,
        text_offsets,
    )
    kept = pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(text_offsets), pa.py_buffer(text_out[: max(int(text_offsets[-1]), 0)])
    )
    return out, kept


def word_spans(text: str) -> list[str]:
    """The words of one text as the kernels split them (for tests and debugging)."""
    data, offsets = buffers(pa.array([text], pa.large_string()))
    cp = np.zeros(len(text) + 1, dtype=np.int64)
    n = kernel.decode(data, offsets[0], offsets[1], cp)
    starts = np.zeros(n + 1, dtype=np.int64)
    ends = np.zeros(n + 1, dtype=np.int64)
    k = kernel.words(cp, 0, n, table(), starts, ends)
    return [text[int(a) : int(b)] for a, b in zip(starts[:k], ends[:k], strict=True)]
