"""Character classes for the heuristic rules, one table over all of Unicode.

Every rule that asks "is this character a letter, a space, punctuation, a
sentence terminator?" reads one ``uint16`` per code point from :func:`table`,
built once per process from Python's Unicode database (and the ``regex``
module for the ``Sentence_Terminal`` property, which :mod:`unicodedata` lacks).
The definitions, and where they come from:

* ``SPACE``: ``str.isspace`` (what ``str.split`` and ``str.strip`` use).
* ``ALPHA``: ``str.isalpha``; ``UPPER`` / ``LOWER``: categories Lu, Lt / Ll.
* ``DIGIT``: ASCII ``0-9``; ``UDIGIT``: category Nd (what ``re``'s ``\\d`` matches).
* ``SYMBOL``: punctuation, symbols and control characters (categories P*, S*,
  Cc).  A *symbol word* is a word made only of these, as Gopher's "words with
  at least one non-symbol character" defines the complement.
* ``AFFIX``, ``ICON``, ``CURRENCY``, ``QUOTE``: the characters a spaCy-style
  word splitter detaches from the start or end of a word (brackets, quotes,
  commas, colons, ...; category So; category Sc; quotation marks).
* ``PUNCT``: categories P* (spaCy's ``is_punct``).
* ``LINEBREAK``: the separators of ``str.splitlines``.
* ``STERM``: Unicode ``Sentence_Terminal`` (``.``, ``!``, ``?`` and their
  equivalents in other scripts): FineWeb's "line ends in punctuation".
"""

from __future__ import annotations

import functools
import unicodedata
from typing import Any

import numpy as np

SPACE, ALPHA, UPPER, LOWER = 1, 2, 4, 8
DIGIT, SYMBOL, AFFIX, ICON = 16, 32, 64, 128
CURRENCY, LINEBREAK, STERM, UDIGIT = 256, 512, 1024, 2048
PUNCT, QUOTE = 4096, 8192

N_CODEPOINTS = 0x110000
_AFFIX_ASCII = ",:;!?()[]{}<>_#*&'\"`"
_QUOTES = "'\"”“`‘´’‚„»«"
_NOT_AFFIX = ".…/@%\\-§·"
_LINEBREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@functools.cache
def table() -> np.ndarray[Any, np.dtype[np.uint16]]:  # noqa: PLR0912
    """The class bits of every code point (about 0.5 s, once per process)."""
    import regex

    cls = np.zeros(N_CODEPOINTS, dtype=np.uint16)
    bits = {"L": ALPHA, "P": SYMBOL | PUNCT, "S": SYMBOL}
    for c in range(N_CODEPOINTS):
        ch = chr(c)
        cat = unicodedata.category(ch)
        v = bits.get(cat[0], 0)
        if cat in ("Lu", "Lt"):
            v |= UPPER
        elif cat == "Ll":
            v |= LOWER
        elif cat == "Nd":
            v |= UDIGIT
        elif cat == "Cc":
            v |= SYMBOL
        elif cat == "So" and ch != "°":
            v |= ICON
        elif cat == "Sc":
            v |= CURRENCY
        if c >= 128 and cat in ("Ps", "Pe", "Pi", "Pf", "Po") and ch not in _NOT_AFFIX:
            v |= AFFIX
        if v & ALPHA and not ch.isalpha():  # categories L* and isalpha agree; be exact
            v &= ~ALPHA
        cls[c] = v
    for ch in _AFFIX_ASCII:
        cls[ord(ch)] |= AFFIX
    for ch in _QUOTES:
        cls[ord(ch)] |= QUOTE | AFFIX
    for ch in _LINEBREAKS:
        cls[ord(ch)] |= LINEBREAK
    for c in range(ord("0"), ord("9") + 1):
        cls[c] |= DIGIT
    spaces = [c for c in range(N_CODEPOINTS) if chr(c).isspace()]
    cls[spaces] |= SPACE
    alpha = "".join(chr(c) for c in range(N_CODEPOINTS) if not 0xD800 <= c < 0xE000)
    for ch in regex.findall(r"\p{Sentence_Terminal}", alpha):
        cls[ord(ch)] |= STERM
    return cls
