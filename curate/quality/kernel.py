"""Compiled (numba) kernels of the heuristic quality rules.

Each kernel walks a batch of UTF-8 documents once, decodes every document to
code points, classifies them through :func:`curate.quality.chars.table`, and
writes one row of measurements per document.  The rules then compare those
measurements with thresholds in numpy (:mod:`curate.quality.heuristics`).

Words are split the way spaCy's English tokenizer does it, which is the
splitter datatrove's Gopher, C4 and FineWeb filters use, so that ratios over
"words" mean the same thing in both tools:

* text is split on whitespace;
* from each piece, punctuation is detached at the start (brackets, quotes,
  ``# * & _``, currency, ``§ % =``, dashes, ellipses) and at the end (the same,
  plus ``'s``, ``n't`` and ``'ll 're 've 'm 'd`` contractions, and a period
  after a lowercase letter, a digit, punctuation, or two capitals), one piece
  at a time from both ends until nothing more comes off;
* what remains is split at infixes: ellipses, pictographs, hyphens and dashes
  between letters, ``: < > = /`` between a letter or digit and a letter, a comma
  between letters, a period between a lowercase and a capital letter, and
  ``+ - * ^`` between digits;
* URLs (``://`` or ``www.``) and dotted abbreviations (``e.g.``, ``U.S.``) stay
  whole.

It is a re-implementation, not spaCy: its exception tables (``Mr.``, emoticons,
``gonna``, ...) are not reproduced, so a word count can differ by one here and
there; the agreement benchmark measures what that does to decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from curate.quality.chars import (
    AFFIX,
    ALPHA,
    CURRENCY,
    DIGIT,
    ICON,
    LINEBREAK,
    LOWER,
    PUNCT,
    QUOTE,
    SPACE,
    STERM,
    SYMBOL,
    UDIGIT,
    UPPER,
)

Array = np.ndarray[Any, Any]

# Code points used by the rules.
_DOT, _ELLIPSIS, _PLUS, _APOS, _RSQUO = 46, 0x2026, 43, 39, 0x2019
_HASH, _BULLET, _DASH, _NL, _CR, _SPACE = 35, 0x2022, 45, 10, 13, 32
_LBRACKET, _RBRACKET, _LBRACE = 91, 93, 123
_PREFIX_EXTRA = np.array([0xA7, 37, 61, 0x2014, 0x2013], dtype=np.int64)  # § % = — –
_HYPHENS = np.array([45, 0x2013, 0x2014, 126], dtype=np.int64)  # - – — ~
_INFIX_OPS = np.array([58, 60, 62, 61, 47], dtype=np.int64)  # : < > = /
_NUM_OPS = np.array([43, 45, 42, 94], dtype=np.int64)  # + - * ^
_SMALL = np.array([0xB2, 37, 45, 43], dtype=np.int64)  # ² % - +  (before a final period)

#: Pieces kept whole, or split at a fixed place (``"cannot"`` -> ``can`` ``not``), as
#: spaCy's English exception table does for its most frequent entries.
_ABBREVIATIONS = (  # noqa: SIM905 - a word list reads better as text
    "Mr. Mrs. Ms. Dr. Prof. St. Jr. Sr. Co. Corp. Inc. Ltd. Bros. vs. Mt. Gen. Gov. Rev. Sen. "
    "Rep. Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec. e.g. E.g. i.e. I.e. "
    "a.m. p.m. Ph.D. U.S. U.K. and/or 'em '' :) :-) :( :-( ): (: ;) ;-) (= =) 8) :P :p :D <3 "
    ":/ :'( -_- ^_^ o.O O.o xD XD"
).split()
_SPLITS = {
    "cannot": 3,
    "Cannot": 3,
    "id": 1,
    "Id": 1,
    "im": 1,
    "Im": 1,
    "ive": 1,
    "Ive": 1,
    **{
        w + "nt": len(w)
        for w in (
            "do",
            "does",
            "did",
            "ca",
            "wo",
            "is",
            "are",
            "was",
            "were",
            "has",
            "have",
            "had",
            "would",
            "could",
            "should",
            "must",
            "need",
            "ai",
        )
    },
    **{
        w.capitalize() + "nt": len(w)
        for w in ("do", "does", "did", "ca", "wo", "is", "are", "was", "were", "has", "have", "had")
    },
}
_SPECIALS = {
    **{w: 0 for w in _ABBREVIATIONS},
    **{f"{c}.": 0 for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"},
    **_SPLITS,
}
#: Units detached after a number (``10km`` -> ``10`` ``km``), longest first.
_UNITS = sorted(
    (  # noqa: SIM905
        "km m dm cm mm ha µm nm yd in ft kg g mg µg t lb oz m/s km/h kmh mph hPa Pa mbar mb "
        "MB kb KB gb GB tb TB T G M K % km² m² dm² cm² mm² km³ m³ dm³ cm³ mm³"
    ).split(),
    key=lambda u: (-len(u), u),
)


def word_table(words: Sequence[str]) -> tuple[Array, Array]:
    """Words as a zero-padded 2-D array of code points (at least 1 x 1) and their lengths,
    the form the kernels take word lists in."""
    width = max((len(w) for w in words), default=1)
    out = np.zeros((max(len(words), 1), max(width, 1)), dtype=np.int64)
    lens = np.array([len(w) for w in words], dtype=np.int64)
    for i, w in enumerate(words):
        out[i, : len(w)] = [ord(c) for c in w]
    return out, lens


def _py_hash(word: str) -> int:
    """:func:`_span_hash` in Python, to key the exception table."""
    mask = (1 << 64) - 1
    h = 1469598103934665603
    for ch in word:
        h = ((h ^ ord(ch)) * 1099511628211) & mask
    h ^= len(word)
    h ^= h >> 31
    h = (h * 0x9E3779B97F4A7C15) & mask
    h ^= h >> 29
    return h


_SP_KEYS = sorted((_py_hash(w), split) for w, split in _SPECIALS.items())
_SP_HASH = np.array([k for k, _ in _SP_KEYS], dtype=np.uint64)
_SP_SPLIT = np.array([v for _, v in _SP_KEYS], dtype=np.int64)
_SP_MAXLEN = max(len(w) for w in _SPECIALS)
_UNIT_CP, _UNIT_LEN = word_table(_UNITS)


@numba.njit(cache=True, inline="always")
def _has(cls: Array, c: np.int64, bit: int) -> bool:  # pragma: no cover - compiled
    return bool((cls[c] & bit) != 0)


@numba.njit(cache=True, inline="always")
def _isin(c: np.int64, values: Array) -> bool:  # pragma: no cover - compiled
    for v in values:
        if c == v:
            return True
    return False


@numba.njit(cache=True)
def _char_at(buf: Array, i: int) -> tuple[np.int64, int]:  # pragma: no cover - compiled
    """The code point of the valid UTF-8 character starting at ``buf[i]``, its length."""
    b0 = np.int64(buf[i])
    if b0 < 0x80:
        return b0, 1
    if b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(buf[i + 1]) & 0x3F), 2
    if b0 < 0xF0:
        c = ((b0 & 0x0F) << 12) | ((np.int64(buf[i + 1]) & 0x3F) << 6)
        return c | (np.int64(buf[i + 2]) & 0x3F), 3
    c = ((b0 & 0x07) << 18) | ((np.int64(buf[i + 1]) & 0x3F) << 12)
    c |= ((np.int64(buf[i + 2]) & 0x3F) << 6) | (np.int64(buf[i + 3]) & 0x3F)
    return c, 4


@numba.njit(cache=True)
def decode(data: Array, lo: int, hi: int, out: Array) -> int:  # pragma: no cover - compiled
    """UTF-8 bytes ``data[lo:hi]`` (valid, as Arrow guarantees) to code points in ``out``."""
    n = 0
    i = lo
    while i < hi:
        out[n], size = _char_at(data, i)
        i += size
        n += 1
    return n


@numba.njit(cache=True)
def _max_width(offsets: Array) -> int:  # pragma: no cover - compiled
    """The longest document in bytes: a bound on its code points, words and lines."""
    width = 0
    for d in range(offsets.size - 1):
        width = max(width, offsets[d + 1] - offsets[d])
    return width


# --------------------------------------------------------------------------------------
# Hashing of spans: FNV-1a over code points, then a length mix and a bit scramble.


_FNV_START = np.uint64(1469598103934665603)


@numba.njit(cache=True, inline="always")
def _fnv(h: np.uint64, cp: Array, a: int, b: int) -> np.uint64:  # pragma: no cover
    """FNV-1a over the code points ``cp[a:b]``, continuing from ``h``."""
    for k in range(a, b):
        h = (h ^ np.uint64(cp[k])) * np.uint64(1099511628211)
    return h


@numba.njit(cache=True, inline="always")
def _finish(h: np.uint64, length: int) -> np.uint64:  # pragma: no cover - compiled
    """Mix the length in and scramble the bits (spans of different lengths differ)."""
    h ^= np.uint64(length)
    h ^= h >> np.uint64(31)
    h *= np.uint64(0x9E3779B97F4A7C15)
    h ^= h >> np.uint64(29)
    return h


@numba.njit(cache=True)
def _span_hash(cp: Array, a: int, b: int) -> np.uint64:  # pragma: no cover - compiled
    return _finish(_fnv(_FNV_START, cp, a, b), b - a)


@numba.njit(cache=True)
def _prefix_len(cp: Array, a: int, b: int, cls: Array) -> int:  # pragma: no cover
    c = cp[a]
    if c == _DOT and a + 1 < b and cp[a + 1] == _DOT:
        k = a
        while k < b and cp[k] == _DOT:
            k += 1
        return k - a
    if c == _ELLIPSIS:
        return 1
    if c == _PLUS:
        return 1 if a + 1 >= b or not _has(cls, cp[a + 1], DIGIT) else 0
    if _has(cls, c, AFFIX | ICON | CURRENCY) or _isin(c, _PREFIX_EXTRA):
        return 1
    return 0


@numba.njit(cache=True)
def _suffix_len(cp: Array, a: int, b: int, cls: Array) -> int:  # pragma: no cover
    c = cp[b - 1]
    if c == _DOT and b - 2 >= a and cp[b - 2] == _DOT:
        k = b - 1
        while k >= a and cp[k] == _DOT:
            k -= 1
        return b - 1 - k
    if b - a >= 2 and (cp[b - 2] == _APOS or cp[b - 2] == _RSQUO) and (c in {115, 83}):
        return 2  # 's 'S
    if b - a >= 4 and (c in {116, 84}) and (cp[b - 2] == _APOS or cp[b - 2] == _RSQUO):
        n = cp[b - 3]
        if (n in {110, 78}) and _has(cls, cp[b - 4], ALPHA):
            return 3  # n't
    if b - a >= 4 and (cp[b - 3] == _APOS or cp[b - 3] == _RSQUO) and _has(cls, cp[b - 4], ALPHA):
        x, y = cp[b - 2] | 32, c | 32
        if (x == 108 and y == 108) or (x == 114 and y == 101) or (x == 118 and y == 101):
            return 3  # 'll 're 've
    if b - a >= 3 and (cp[b - 2] == _APOS or cp[b - 2] == _RSQUO) and _has(cls, cp[b - 3], ALPHA):
        if (c | 32) == 109 or (c | 32) == 100:
            return 2  # 'm 'd
    if c == _ELLIPSIS or _has(cls, c, AFFIX | ICON) or c in {8212, 8211}:
        return 1
    if b - 2 < a:
        return 0
    p = cp[b - 2]
    if c == _PLUS and _has(cls, p, DIGIT):
        return 1
    if _has(cls, c, CURRENCY) and _has(cls, p, DIGIT):
        return 1
    if c == _DOT:
        if _has(cls, p, DIGIT | LOWER | AFFIX | QUOTE) or p == _ELLIPSIS or _isin(p, _SMALL):
            return 1
        if b - 3 >= a and _has(cls, p, UPPER) and _has(cls, cp[b - 3], UPPER):
            return 1
    return _unit_len(cp, a, b)


@numba.njit(cache=True)
def _infix_len(cp: Array, k: int, a: int, b: int, cls: Array) -> int:  # pragma: no cover
    """Length of an infix starting at ``k`` inside ``[a, b)``, 0 when none."""
    c = cp[k]
    if c == _DOT and k + 1 < b and cp[k + 1] == _DOT:
        j = k
        while j < b and cp[j] == _DOT:
            j += 1
        return j - k
    if c == _ELLIPSIS or _has(cls, c, ICON):
        return 1
    if k == a or k + 1 >= b:
        return 0
    p, n = cp[k - 1], cp[k + 1]
    if _isin(c, _NUM_OPS) and _has(cls, p, DIGIT) and (_has(cls, n, DIGIT) or n == _DASH):
        return 1
    if c == _DOT and _has(cls, p, LOWER | QUOTE) and _has(cls, n, UPPER | QUOTE):
        return 1
    if c == 44 and _has(cls, p, ALPHA) and _has(cls, n, ALPHA):
        return 1
    if _isin(c, _HYPHENS) and _has(cls, p, ALPHA | DIGIT):
        j = k
        while j < b and j - k < 3 and cp[j] == c:
            j += 1
        if j < b and _has(cls, cp[j], ALPHA):
            return j - k
        return 0
    if _isin(c, _INFIX_OPS) and _has(cls, p, ALPHA | DIGIT) and _has(cls, n, ALPHA):
        return 1
    return 0


@numba.njit(cache=True)
def _emit(starts: Array, ends: Array, n: int, a: int, b: int) -> int:  # pragma: no cover
    starts[n] = a
    ends[n] = b
    return n + 1


@numba.njit(cache=True)
def _special(cp: Array, a: int, b: int) -> int:  # pragma: no cover - compiled
    """-1 when ``cp[a:b]`` is no exception; else where it splits (0: kept whole)."""
    if b - a > _SP_MAXLEN or b <= a:
        return -1
    h = _span_hash(cp, a, b)
    i = np.searchsorted(_SP_HASH, h)
    if i < _SP_HASH.size and _SP_HASH[i] == h:
        return int(_SP_SPLIT[i])
    return -1


@numba.njit(cache=True)
def _unit_len(cp: Array, a: int, b: int) -> int:  # pragma: no cover - compiled
    """Length of a unit (``km``, ``%``, ``MB``) that ends the piece right after a digit."""
    for u in range(_UNIT_LEN.size):
        m = _UNIT_LEN[u]
        if b - a <= m or not (48 <= cp[b - m - 1] <= 57):
            continue
        ok = True
        for t in range(m):
            if cp[b - m + t] != _UNIT_CP[u, t]:
                ok = False
                break
        if ok:
            return int(m)
    return 0


@numba.njit(cache=True)
def _url(cp: Array, a: int, b: int, cls: Array) -> bool:  # pragma: no cover - compiled
    """``scheme://...``, ``www.``..., or ``user@host.domain``: one word."""
    k = a
    while k < b and (_has(cls, cp[k], ALPHA | DIGIT) or cp[k] == 43 or cp[k] == 45 or cp[k] == 46):
        k += 1
    if k > a and k + 2 < b and cp[k] == 58 and cp[k + 1] == 47 and cp[k + 2] == 47:
        return True
    if b - a > 4 and (cp[a] | 32) == 119 and (cp[a + 1] | 32) == 119 and (cp[a + 2] | 32) == 119:
        if cp[a + 3] == _DOT:
            return True
    at = -1
    for k in range(a + 1, b - 1):
        if cp[k] == 64:
            at = k
            break
    if at > 0:
        for k in range(at + 2, b - 1):
            if cp[k] == _DOT and _has(cls, cp[k + 1], ALPHA):
                return True
    return False


@numba.njit(cache=True)
def _split_piece(  # pragma: no cover - compiled
    cp: Array, a: int, b: int, cls: Array, starts: Array, ends: Array, n: int, stack: Array
) -> int:
    top = 0
    while a < b:
        if _special(cp, a, b) >= 0:
            break
        pre = _prefix_len(cp, a, b, cls)
        if pre > 0:
            n = _emit(starts, ends, n, a, a + pre)
            a += pre
            if a < b and _special(cp, a, b) >= 0:
                break
        suf = _suffix_len(cp, a, b, cls) if a < b else 0
        if suf > 0:
            stack[top] = b - suf
            stack[top + 1] = b
            top += 2
            b -= suf
        if pre == 0 and suf == 0:
            break
    if a < b:
        split = _special(cp, a, b)
        if split == 0 or (split < 0 and _url(cp, a, b, cls)):
            n = _emit(starts, ends, n, a, b)
        elif split > 0:
            n = _emit(starts, ends, n, a, a + split)
            n = _emit(starts, ends, n, a + split, b)
        else:
            s = a
            k = a
            while k < b:
                m = _infix_len(cp, k, a, b, cls)
                if m > 0:
                    if k > s:
                        n = _emit(starts, ends, n, s, k)
                    n = _emit(starts, ends, n, k, k + m)
                    k += m
                    s = k
                else:
                    k += 1
            if s < b:
                n = _emit(starts, ends, n, s, b)
    while top > 0:
        top -= 2
        n = _emit(starts, ends, n, stack[top], stack[top + 1])
    return n


@numba.njit(cache=True)
def _split_count(cp: Array, a: int, b: int, cls: Array) -> tuple[int, int]:  # pragma: no cover
    """``str.split()`` of ``cp[a:b]``: the number of pieces and the longest one's length."""
    n = 0
    longest = 0
    i = a
    while i < b:
        while i < b and _has(cls, cp[i], SPACE):
            i += 1
        j = i
        while j < b and not _has(cls, cp[j], SPACE):
            j += 1
        if j > i:
            n += 1
            longest = max(longest, j - i)
        i = j
    return n, longest


@numba.njit(cache=True)
def words(cp: Array, lo: int, hi: int, cls: Array, starts: Array, ends: Array) -> int:
    """Split ``cp[lo:hi]`` into words; spans go to ``starts``/``ends``; returns the count.

    ``starts`` and ``ends`` need room for ``hi - lo`` words.
    """  # pragma: no cover - compiled
    stack = np.empty(2 * (hi - lo) + 2, dtype=np.int64)
    n = 0
    i = lo
    while i < hi:
        while i < hi and _has(cls, cp[i], SPACE):
            i += 1
        j = i
        while j < hi and not _has(cls, cp[j], SPACE):
            j += 1
        if j > i:
            n = _split_piece(cp, i, j, cls, starts, ends, n, stack)
        i = j
    return n


@numba.njit(cache=True)
def _dup_spans(
    cp: Array, starts: Array, ends: Array, n: int
) -> tuple[int, int]:  # pragma: no cover - compiled
    """(number of spans equal to an earlier one, their total length), as datatrove's
    ``find_duplicates``: the first copy is not counted, every later copy is."""
    seen = set()
    seen.add(np.uint64(0))
    seen.discard(np.uint64(0))
    dups = 0
    chars = 0
    for i in range(n):
        h = _span_hash(cp, starts[i], ends[i])
        if h in seen:
            dups += 1
            chars += ends[i] - starts[i]
        else:
            seen.add(h)
    return dups, chars


# --------------------------------------------------------------------------------------
# Gopher quality


#: Columns of :func:`gopher_quality`, in order.
GOPHER_QUALITY_STATS = (
    "n_words",
    "n_non_symbol_words",
    "mean_word_length",
    "hash_ratio",
    "ellipsis_ratio",
    "bullet_lines_ratio",
    "ellipsis_lines_ratio",
    "alpha_words_ratio",
    "stop_words",
)


@numba.njit(cache=True)
def _stop_word(cp: Array, a: int, b: int, stops: Array, lens: Array) -> int:  # pragma: no cover
    """Index of the stop word equal to ``cp[a:b]``, or -1 (exact, case-sensitive)."""
    for s in range(lens.size):
        if lens[s] != b - a:
            continue
        ok = True
        for k in range(b - a):
            if stops[s, k] != cp[a + k]:
                ok = False
                break
        if ok:
            return s
    return -1


@numba.njit(cache=True)
def gopher_quality(  # pragma: no cover - compiled
    data: Array, offsets: Array, cls: Array, stops: Array, stop_lens: Array, out: Array
) -> None:
    """One row of :data:`GOPHER_QUALITY_STATS` per document."""
    width = _max_width(offsets)
    cp = np.empty(width + 1, dtype=np.int64)
    starts = np.empty(width + 1, dtype=np.int64)
    ends = np.empty(width + 1, dtype=np.int64)
    seen = np.zeros(max(stop_lens.size, 1), dtype=np.bool_)
    for d in range(offsets.size - 1):
        n = decode(data, offsets[d], offsets[d + 1], cp)
        nw = words(cp, 0, n, cls, starts, ends)
        non_symbol = 0
        non_symbol_chars = 0
        alpha_words = 0
        seen[:] = False
        for w in range(nw):
            symbol = True
            alpha = False
            for k in range(starts[w], ends[w]):
                if not _has(cls, cp[k], SYMBOL):
                    symbol = False
                if _has(cls, cp[k], ALPHA):
                    alpha = True
            if not symbol:
                non_symbol += 1
                non_symbol_chars += ends[w] - starts[w]
            if alpha:
                alpha_words += 1
            s = _stop_word(cp, starts[w], ends[w], stops, stop_lens)
            if s >= 0:
                seen[s] = True
        hashes = 0
        ellipses = 0
        k = 0
        while k < n:
            c = cp[k]
            if c == _HASH:
                hashes += 1
            elif c == _ELLIPSIS:
                ellipses += 1
            elif c == _DOT and k + 2 < n and cp[k + 1] == _DOT and cp[k + 2] == _DOT:
                ellipses += 1
                k += 2
            k += 1
        # lines as str.splitlines: a final line break ends the last line, \r\n is one break
        lines = 0
        bullets = 0
        ellipsis_lines = 0
        k = 0
        while k < n:
            e = k
            while e < n and not _has(cls, cp[e], LINEBREAK):
                e += 1
            lines += 1
            f = k
            while f < e and _has(cls, cp[f], SPACE):
                f += 1
            if f < e and (cp[f] == _BULLET or cp[f] == _DASH):
                bullets += 1
            g = e
            while g > k and _has(cls, cp[g - 1], SPACE):
                g -= 1
            dots = g - k >= 3 and cp[g - 1] == _DOT and cp[g - 2] == _DOT and cp[g - 3] == _DOT
            if dots or (g > k and cp[g - 1] == _ELLIPSIS):
                ellipsis_lines += 1
            k = e + 1
            if e + 1 < n and cp[e] == _CR and cp[e + 1] == _NL:
                k = e + 2
        out[d, 0] = nw
        out[d, 1] = non_symbol
        out[d, 2] = non_symbol_chars / non_symbol if non_symbol else np.nan
        out[d, 3] = hashes / nw if nw else 0.0
        out[d, 4] = ellipses / nw if nw else 0.0
        out[d, 5] = bullets / lines if lines else 0.0
        out[d, 6] = ellipsis_lines / lines if lines else 0.0
        out[d, 7] = alpha_words / nw if nw else 0.0
        out[d, 8] = seen.sum()


# --------------------------------------------------------------------------------------
# Gopher repetition


@numba.njit(cache=True)
def _split_runs(
    cp: Array, lo: int, hi: int, sep: int, min_run: int, starts: Array, ends: Array
) -> int:  # pragma: no cover - compiled
    """``re.split(sep{min_run,}, cp[lo:hi])``: pieces, empty ones included."""
    n = 0
    s = lo
    k = lo
    while k < hi:
        if cp[k] == sep:
            j = k
            while j < hi and cp[j] == sep:
                j += 1
            if j - k >= min_run:
                starts[n] = s
                ends[n] = k
                n += 1
                s = j
            k = j
        else:
            k += 1
    starts[n] = s
    ends[n] = hi
    return n + 1


@numba.njit(cache=True)
def _gram_hashes(
    wh: Array, wl: Array, nw: int, n: int, sep: bool, out_h: Array, out_len: Array
) -> int:  # pragma: no cover - compiled
    """Hash and character length of each ``n``-gram of words; with ``sep`` the words
    are joined by a space (``" ".join``), without it they are concatenated."""
    m = nw - n + 1
    for i in range(max(m, 0)):
        h = np.uint64(0xCBF29CE484222325)
        length = 0
        for j in range(i, i + n):
            h = (h ^ wh[j]) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(32)
            length += wl[j]
        if sep:
            length += n - 1
        out_h[i] = h
        out_len[i] = length
    return max(m, 0)


@numba.njit(cache=True)
def _concat_hashes(
    cp: Array, starts: Array, ends: Array, nw: int, n: int, out_h: Array, out_len: Array
) -> int:  # pragma: no cover - compiled
    """Hash of ``"".join(words[i:i+n])`` as a string (so ``ab|c`` equals ``a|bc``)."""
    m = nw - n + 1
    for i in range(max(m, 0)):
        h = _FNV_START
        length = 0
        for j in range(i, i + n):
            h = _fnv(h, cp, starts[j], ends[j])
            length += ends[j] - starts[j]
        out_h[i] = _finish(h, length)
        out_len[i] = length
    return max(m, 0)


@numba.njit(cache=True)
def _top_gram_chars(h: Array, lens: Array, m: int) -> int:  # pragma: no cover - compiled
    """``len(g) * count(g)`` for the most frequent n-gram ``g``; among equally frequent
    ones the first to occur (``Counter.most_common(1)``)."""
    order = np.argsort(h[:m], kind="mergesort")  # stable: ties keep text order
    best_count = 0
    best_first = m
    best_len = 0
    i = 0
    while i < m:
        j = i
        while j < m and h[order[j]] == h[order[i]]:
            j += 1
        count = j - i
        first = order[i]
        if count > best_count or (count == best_count and first < best_first):
            best_count = count
            best_first = first
            best_len = lens[first]
        i = j
    return best_len * best_count


@numba.njit(cache=True)
def _all_dup_chars(h: Array, lens: Array, m: int, n: int) -> int:  # pragma: no cover
    """datatrove's ``find_all_duplicate``: walk the n-grams, count the characters of
    each one seen before and jump past it (skipped n-grams are never remembered)."""
    seen = set()
    seen.add(np.uint64(0))
    seen.discard(np.uint64(0))
    total = 0
    i = 0
    while i < m:
        if h[i] in seen:
            total += lens[i]
            i += n
        else:
            seen.add(h[i])
            i += 1
    return total


@numba.njit(cache=True)
def gopher_repetition(  # pragma: no cover - compiled
    data: Array, offsets: Array, cls: Array, top_n: Array, dup_n: Array, out: Array
) -> None:
    """Per document: duplicate paragraph fraction and character fraction, the same for
    lines, then the top-n-gram character fraction for each n of ``top_n`` and the
    duplicated-n-gram character fraction for each n of ``dup_n``.  Fractions of
    characters are over the whole text's length, as datatrove computes them."""
    width = _max_width(offsets)
    cp = np.empty(width + 1, dtype=np.int64)
    starts = np.empty(width + 2, dtype=np.int64)
    ends = np.empty(width + 2, dtype=np.int64)
    wh = np.empty(width + 1, dtype=np.uint64)
    wl = np.empty(width + 1, dtype=np.int64)
    gh = np.empty(width + 1, dtype=np.uint64)
    gl = np.empty(width + 1, dtype=np.int64)
    for d in range(offsets.size - 1):
        n = decode(data, offsets[d], offsets[d + 1], cp)
        if n == 0:
            out[d, :] = np.nan
            continue
        a, b = 0, n
        while a < b and _has(cls, cp[a], SPACE):
            a += 1
        while b > a and _has(cls, cp[b - 1], SPACE):
            b -= 1
        m = _split_runs(cp, a, b, _NL, 2, starts, ends)
        dups, chars = _dup_spans(cp, starts, ends, m)
        out[d, 0] = dups / m
        out[d, 1] = chars / n
        m = _split_runs(cp, 0, n, _NL, 1, starts, ends)
        dups, chars = _dup_spans(cp, starts, ends, m)
        out[d, 2] = dups / m
        out[d, 3] = chars / n
        nw = words(cp, 0, n, cls, starts, ends)
        for w in range(nw):
            wh[w] = _span_hash(cp, starts[w], ends[w])
            wl[w] = ends[w] - starts[w]
        col = 4
        for g in top_n:
            m = _gram_hashes(wh, wl, nw, g, True, gh, gl)
            out[d, col] = _top_gram_chars(gh, gl, m) / n if m > 0 else 0.0
            col += 1
        for g in dup_n:
            m = _concat_hashes(cp, starts, ends, nw, g, gh, gl)
            out[d, col] = _all_dup_chars(gh, gl, m, g) / n
            col += 1


# --------------------------------------------------------------------------------------
# FineWeb


#: Columns of :func:`fineweb`, in order.
FINEWEB_STATS = ("n_lines", "line_punct_ratio", "short_line_ratio", "char_dup_ratio", "list_ratio")


@numba.njit(cache=True)
def fineweb(  # pragma: no cover - compiled
    data: Array, offsets: Array, cls: Array, short_line: int, out: Array
) -> None:
    """Per document: non-blank lines (split on ``\\n``), the fraction ending in a
    sentence terminator, the fraction of at most ``short_line`` characters, the
    characters of duplicated lines over the characters that are not ``\\n``,
    and newlines per word."""
    width = _max_width(offsets)
    cp = np.empty(width + 1, dtype=np.int64)
    starts = np.empty(width + 2, dtype=np.int64)
    ends = np.empty(width + 2, dtype=np.int64)
    for d in range(offsets.size - 1):
        n = decode(data, offsets[d], offsets[d + 1], cp)
        m = _split_runs(cp, 0, n, _NL, 1, starts, ends)
        kept = 0
        newlines = 0
        for k in range(n):
            if cp[k] == _NL:
                newlines += 1
        punct = 0
        short = 0
        for i in range(m):
            a, b = starts[i], ends[i]
            blank = True
            for k in range(a, b):
                if not _has(cls, cp[k], SPACE):
                    blank = False
                    break
            if blank:
                continue
            starts[kept] = a
            ends[kept] = b
            kept += 1
            if _has(cls, cp[b - 1], STERM):
                punct += 1
            if b - a <= short_line:
                short += 1
        out[d, 0] = kept
        if kept == 0:
            out[d, 1:] = np.nan
            continue
        out[d, 1] = punct / kept
        out[d, 2] = short / kept
        _, chars = _dup_spans(cp, starts, ends, kept)
        out[d, 3] = chars / (n - newlines)
        nw = words(cp, 0, n, cls, starts, ends)
        out[d, 4] = newlines / nw if nw else np.inf


# --------------------------------------------------------------------------------------
# C4


#: Columns of :func:`c4`, in order.
C4_STATS = ("n_lines", "kept_lines", "n_sentences", "page_rule")
#: ``page_rule`` values: the page-level rule that fired while reading the lines.
C4_PAGE_OK, C4_LOREM, C4_CURLY = 0, 1, 2

#: C4's terminal punctuation (TFDS ``c4_utils``): . ? ! " '
_C4_END = np.array([46, 63, 33, 34, 39], dtype=np.int64)
_LOREM = np.array([ord(c) for c in "lorem ipsum"], dtype=np.int64)
_JAVASCRIPT = np.array([ord(c) for c in "javascript"], dtype=np.int64)


@numba.njit(cache=True)
def _contains_lower(buf: Array, n: int, pat: Array, m: int) -> bool:  # pragma: no cover
    """Whether ``pat[:m]`` (lowercase ASCII) occurs in ``buf[:n]`` lowercased (ASCII)."""
    for i in range(n - m + 1):
        ok = True
        for j in range(m):
            c = buf[i + j]
            if 65 <= c <= 90:
                c += 32
            if c != pat[j]:
                ok = False
                break
        if ok:
            return True
    return False


@numba.njit(cache=True)
def _drop_citations(cp: Array, a: int, b: int, cls: Array, out: Array) -> int:  # pragma: no cover
    """Copy ``cp[a:b]`` to ``out`` without ``[digits]``, ``[edit]``, ``[citation needed]``."""
    n = 0
    k = a
    while k < b:
        if cp[k] == _LBRACKET:
            j = k + 1
            while j < b and _has(cls, cp[j], UDIGIT):
                j += 1
            if j < b and cp[j] == _RBRACKET:
                k = j + 1
                continue
            matched = 0
            for word in ("edit]", "citation needed]"):
                m = len(word)
                if k + 1 + m <= b:
                    ok = True
                    for t in range(m):
                        if cp[k + 1 + t] != ord(word[t]):
                            ok = False
                            break
                    if ok:
                        matched = m + 1
                        break
            if matched:
                k += matched
                continue
        out[n] = cp[k]
        n += 1
        k += 1
    return n


@numba.njit(cache=True)
def _sentences(
    buf: Array, n: int, cls: Array, starts: Array, ends: Array
) -> int:  # pragma: no cover
    """Sentences in ``buf[:n]`` as spaCy's ``sentencizer`` counts them: a sentence ends
    after a single-character terminator token, at the next token that is not punctuation."""
    nw = words(buf, 0, n, cls, starts, ends)
    if nw == 0:
        return 0
    count = 1
    seen_period = False
    for w in range(1, nw):
        a, b = starts[w], ends[w]
        terminal = b - a == 1 and _has(cls, buf[a], STERM)
        punct = True
        for k in range(a, b):
            if not _has(cls, buf[k], PUNCT):
                punct = False
                break
        if seen_period and not punct and not terminal:
            count += 1
            seen_period = False
        elif terminal:
            seen_period = True
    return count


@numba.njit(cache=True)
def _encode(buf: Array, n: int, out: Array, pos: int) -> int:  # pragma: no cover - compiled
    """UTF-8 encode ``buf[:n]`` into ``out`` at ``pos``; return the new position."""
    for i in range(n):
        c = buf[i]
        if c < 0x80:
            out[pos] = c
            pos += 1
        elif c < 0x800:
            out[pos] = 0xC0 | (c >> 6)
            out[pos + 1] = 0x80 | (c & 0x3F)
            pos += 2
        elif c < 0x10000:
            out[pos] = 0xE0 | (c >> 12)
            out[pos + 1] = 0x80 | ((c >> 6) & 0x3F)
            out[pos + 2] = 0x80 | (c & 0x3F)
            pos += 3
        else:
            out[pos] = 0xF0 | (c >> 18)
            out[pos + 1] = 0x80 | ((c >> 12) & 0x3F)
            out[pos + 2] = 0x80 | ((c >> 6) & 0x3F)
            out[pos + 3] = 0x80 | (c & 0x3F)
            pos += 4
    return pos


@numba.njit(cache=True)
def c4(  # pragma: no cover - compiled
    data: Array,
    offsets: Array,
    cls: Array,
    flags: Array,
    max_word_length: int,
    min_words_per_line: int,
    policy: Array,
    policy_lens: Array,
    out: Array,
    text: Array,
    text_offsets: Array,
) -> None:
    """C4's line filter, line by line as TFDS and datatrove apply it.

    ``flags``: remove citations, require terminal punctuation, stop at "lorem
    ipsum", drop "javascript" lines, stop at "{", drop policy lines, count
    sentences.  Writes :data:`C4_STATS` per document and the text of the kept
    lines (stripped, joined by ``\\n``) as UTF-8 into ``text``/``text_offsets``.
    """
    citations, terminal, lorem, javascript, curly, drop_policy, count = (
        flags[0],
        flags[1],
        flags[2],
        flags[3],
        flags[4],
        flags[5],
        flags[6],
    )
    width = _max_width(offsets)
    cp = np.empty(width + 1, dtype=np.int64)
    line = np.empty(width + 1, dtype=np.int64)
    starts = np.empty(width + 2, dtype=np.int64)
    ends = np.empty(width + 2, dtype=np.int64)
    pos = 0
    text_offsets[0] = 0
    for d in range(offsets.size - 1):
        n = decode(data, offsets[d], offsets[d + 1], cp)
        doc_start = pos
        n_lines = 0
        kept = 0
        sentences = 0
        rule = C4_PAGE_OK
        k = 0
        while k < n and rule == C4_PAGE_OK:
            e = k
            while e < n and not _has(cls, cp[e], LINEBREAK):
                e += 1
            nxt = e + 2 if e + 1 < n and cp[e] == _CR and cp[e + 1] == _NL else e + 1
            n_lines += 1
            a, b = k, e
            k = nxt
            while a < b and _has(cls, cp[a], SPACE):
                a += 1
            while b > a and _has(cls, cp[b - 1], SPACE):
                b -= 1
            n_words, longest = _split_count(cp, a, b, cls)
            if max_word_length != -1 and longest > max_word_length:
                continue
            if citations:
                m = _drop_citations(cp, a, b, cls, line)
            else:
                m = b - a
                line[:m] = cp[a:b]
            if terminal:
                ends_ok = m > 0 and _isin(line[m - 1], _C4_END)
                dots = (
                    m >= 3 and line[m - 1] == _DOT and line[m - 2] == _DOT and line[m - 3] == _DOT
                )
                if not ends_ok or dots:
                    continue
            if n_words < min_words_per_line:
                continue
            if lorem and _contains_lower(line, m, _LOREM, _LOREM.size):
                rule = C4_LOREM
                break
            if javascript and _contains_lower(line, m, _JAVASCRIPT, _JAVASCRIPT.size):
                continue
            if curly:
                found = False
                for i in range(m):
                    if line[i] == _LBRACE:
                        found = True
                        break
                if found:
                    rule = C4_CURLY
                    break
            if drop_policy:
                hit = False
                for p in range(policy_lens.size):
                    if _contains_lower(line, m, policy[p], policy_lens[p]):
                        hit = True
                        break
                if hit:
                    continue
            if count:
                sentences += _sentences(line, m, cls, starts, ends)
            if kept > 0:
                text[pos] = _NL
                pos += 1
            pos = _encode(line, m, text, pos)
            kept += 1
        # str.strip() of the joined text (a removed citation can leave whitespace at a
        # line's end, and a line of citations only can leave nothing but whitespace)
        s = doc_start
        while s < pos:
            c, size = _char_at(text, s)
            if not _has(cls, c, SPACE):
                break
            s += size
        t = pos
        while t > s:
            u = t - 1
            while u > s and (text[u] & 0xC0) == 0x80:
                u -= 1
            c, _ = _char_at(text, u)
            if not _has(cls, c, SPACE):
                break
            t = u
        if s > doc_start:
            text[doc_start : doc_start + t - s] = text[s:t].copy()
        pos = doc_start + t - s
        text_offsets[d + 1] = pos
        out[d, 0] = n_lines
        out[d, 1] = kept
        out[d, 2] = sentences
        out[d, 3] = rule
