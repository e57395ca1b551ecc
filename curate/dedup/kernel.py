"""The compiled MinHash kernel: normalization of ASCII text, tokens, shingles and
permutation minima in one pass per document (numba).

It computes exactly what the numpy path of :mod:`curate.dedup.minhash` computes
(the tests compare them on random and real text), three to five times faster,
because numpy needs a dozen full passes over temporary arrays where this needs
one.  Non-ASCII documents are normalized by the same Arrow kernels first; the
ASCII rules below are then the identity on their output, so one kernel serves
both.  ASCII rules, equal to the Unicode ones restricted to ASCII: ``A-Z`` to
lowercase, every run of digits to ``0``, punctuation and symbols (all 32 ASCII
ones) and whitespace (``\\t \\n \\v \\f \\r`` and space) separate words.

Compiled on first use and cached next to this file (or in ``NUMBA_CACHE_DIR``);
``CURATE_MINHASH_KERNEL=numpy`` switches it off.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

try:  # pragma: no cover - exercised when numba is installed, which the lock does
    import numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False

Array = np.ndarray[Any, Any]

#: Byte classes of ASCII normalization.
KEEP, DIGIT, SEP = 0, 1, 2


def byte_table(lowercase: bool, numbers: bool, punctuation: bool) -> tuple[Array, Array]:
    """(class, lowercased byte) for every byte value; non-ASCII bytes are kept as is."""
    cls = np.zeros(256, dtype=np.uint8)
    low = np.arange(256, dtype=np.uint8)
    for c in range(128):
        ch = chr(c)
        if ch in "\t\n\x0b\x0c\r ":
            cls[c] = SEP
        elif ch.isdigit() and numbers:
            cls[c] = DIGIT
        elif 32 < c < 127 and not ch.isalnum() and punctuation:
            cls[c] = SEP
        if "A" <= ch <= "Z" and lowercase:
            low[c] = c + 32
    return cls, low


def available() -> bool:
    return HAVE_NUMBA and os.environ.get("CURATE_MINHASH_KERNEL", "auto") != "numpy"


if HAVE_NUMBA:

    @numba.njit(cache=True, inline="always")
    def _mix(z: np.uint64) -> np.uint64:  # pragma: no cover - compiled
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    @numba.njit(cache=True, inline="always")
    def _permute(x: np.uint64, a: Array, b: Array, row: Array) -> None:  # pragma: no cover
        for k in range(a.shape[0]):
            v = a[k] * x + b[k]
            if v < row[k]:  # noqa: PLR1730 - measured faster than min()
                row[k] = v

    @numba.njit(cache=True)
    def _tokens(  # noqa: PLR0915  # pragma: no cover - compiled
        data: Array,
        lo: int,
        hi: int,
        char: bool,
        cls: Array,
        low: Array,
        p_byte: np.uint64,
        out: Array,
    ) -> int:
        """Token values of ``data[lo:hi]`` into ``out``; returns how many."""
        n = 0
        h = np.uint64(0)
        pw = np.uint64(1)
        in_word = False
        last_digit = False
        pending_space = False
        i = lo
        while i < hi:
            c = data[i]
            k = cls[c]
            if k == 2:  # separator
                if char:
                    if n > 0 or in_word:
                        pending_space = True
                elif in_word:
                    out[n] = _mix(h)
                    n += 1
                    h = np.uint64(0)
                    pw = np.uint64(1)
                in_word = False
                last_digit = False
                i += 1
                continue
            if k == 1:
                if last_digit:
                    i += 1
                    continue
                c = np.uint8(48)  # '0'
                last_digit = True
            else:
                last_digit = False
                c = low[c]
            if char:
                if pending_space:
                    out[n] = _mix(np.uint64(33))  # ' ' + 1
                    n += 1
                    pending_space = False
                # One code point: the lead byte and its continuation bytes.
                h = np.uint64(c) + np.uint64(1)
                pw = np.uint64(257)
                j = i + 1
                while j < hi and (data[j] & 0xC0) == 0x80:
                    h += (np.uint64(data[j]) + np.uint64(1)) * pw
                    pw *= np.uint64(257)
                    j += 1
                out[n] = _mix(h)
                n += 1
                in_word = True
                i = j
                continue
            h += (np.uint64(c) + np.uint64(1)) * pw
            pw *= p_byte
            in_word = True
            i += 1
        if in_word and not char:
            out[n] = _mix(h)
            n += 1
        return n

    @numba.njit(cache=True)
    def _signatures(  # pragma: no cover - compiled
        data: Array,
        offsets: Array,
        char: bool,
        ngram: int,
        a: Array,
        b: Array,
        cls: Array,
        low: Array,
        p_byte: np.uint64,
        p_token: np.uint64,
        len_mult: np.uint64,
        sig: Array,
        counts: Array,
    ) -> None:
        n_docs = offsets.shape[0] - 1
        longest = 1
        for d in range(n_docs):
            longest = max(longest, offsets[d + 1] - offsets[d])
        toks = np.empty(longest + 1, dtype=np.uint64)
        pw = np.empty(ngram + 1, dtype=np.uint64)
        pw[0] = 1
        for k in range(1, ngram + 1):
            pw[k] = pw[k - 1] * p_token
        for d in range(n_docs):
            row = sig[d]
            m = _tokens(data, offsets[d], offsets[d + 1], char, cls, low, p_byte, toks)
            if m == 0:
                counts[d] = 0
                continue
            if m < ngram:
                x = np.uint64(0)
                for t in range(m):
                    x += toks[t] * pw[t]
                x ^= np.uint64(m) * len_mult
                _permute(_mix(x), a, b, row)
                counts[d] = 1
                continue
            for i in range(m - ngram + 1):
                x = np.uint64(0)
                for t in range(ngram):
                    x += toks[i + t] * pw[t]
                x ^= np.uint64(ngram) * len_mult
                _permute(_mix(x), a, b, row)
            counts[d] = m - ngram + 1

    @numba.njit(cache=True)
    def _band_keys(sig: Array, bands: int, rows: int, out: Array) -> None:  # pragma: no cover
        for d in range(sig.shape[0]):
            for band in range(bands):
                acc = np.uint64(band + 1) * np.uint64(0x9E3779B97F4A7C15)
                for r in range(rows):
                    acc = _mix(acc ^ np.uint64(sig[d, band * rows + r]))
                out[d, band] = acc


def signatures(
    data: Array,
    offsets: Array,
    char: bool,
    ngram: int,
    a: Array,
    b: Array,
    tables: tuple[Array, Array],
    constants: tuple[int, int, int],
    out: tuple[Array, Array] | None = None,
) -> tuple[Array, Array]:
    """``(n_docs, num_perm)`` uint64 minima and shingle counts of a batch of documents,
    given as UTF-8 ``data`` and absolute ``offsets`` into it; into ``out`` when given."""
    n_docs = len(offsets) - 1
    if out is None:
        sig = np.empty((n_docs, len(a)), dtype=np.uint64)
        counts = np.zeros(n_docs, dtype=np.int64)
    else:
        sig, counts = out
    sig.fill(np.iinfo(np.uint64).max)
    p_byte, p_token, len_mult = (np.uint64(c) for c in constants)
    _signatures(data, offsets, char, ngram, a, b, *tables, p_byte, p_token, len_mult, sig, counts)
    return sig, counts


def band_keys(sig: Array, bands: int, rows: int) -> Array:
    """Compiled :func:`curate.dedup.minhash.band_keys` (same values)."""
    out = np.empty((sig.shape[0], bands), dtype=np.uint64)
    _band_keys(np.ascontiguousarray(sig), bands, rows, out)
    return out
