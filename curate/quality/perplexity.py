"""CCNet-style perplexity: normalization, document perplexity with KenLM, LM training.

Normalization (CCNet ``text_normalizer.normalize``, per line): strip, lowercase,
strip accents (NFD, then combining marks dropped), every digit to ``0``,
typographic punctuation to its ASCII form, non-printing characters removed.
CCNet then splits lines with a SentencePiece model; here the LM's tokens are
the normalized line's whitespace words (the model is trained on the same
normalization, so query and training agree).

Document perplexity (CCNet ``perplexity.pp``)::

    10 ** (-sum(log10 P(line)) / sum(tokens(line) + 1))

over the document's non-empty lines, each scored with ``<s>`` and ``</s>``
(the ``+ 1`` is the end-of-line token).  A document without words gets null.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Typographic punctuation -> ASCII (our table; CCNet maps the same characters).
PUNCT = {
    "，": ",", "。": ". ", "、": ",", "”": '"', "“": '"', "„": '"', "«": '"', "»": '"',
    "∶": ":", "：": ":", "？": "?", "《": '"', "》": '"', "）": ")", "！": "!", "（": "(",
    "；": ";", "」": '"', "「": '"', "『": '"', "』": '"', "’": "'", "‘": "'", "´": "'",
    "–": "-", "—": " - ", "…": "...", "【": "[", "】": "]", "％": "%", "．": ".",
}  # fmt: skip


def normalize(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """CCNet's normalization of every string (lines are kept apart by ``\\n``)."""
    out = pc.utf8_lower(pc.fill_null(text, ""))
    out = pc.utf8_normalize(out, "NFD")
    out = pc.replace_substring_regex(out, r"\p{Mn}+", "")
    out = pc.replace_substring_regex(out, r"\p{Nd}", "0")
    for src, dst in PUNCT.items():
        out = pc.replace_substring(out, src, dst)
    # non-printing characters (Unicode C*), except the line break that separates lines
    out = pc.replace_substring_regex(out, r"[^\P{C}\n]+", "")
    return out


def doc_perplexity(model: Any, texts: Iterable[str]) -> tuple[np.ndarray[Any, Any], int]:
    """Perplexity per normalized document (NaN without words), and the words scored."""
    scores = []
    words = 0
    for text in texts:
        log_sum = 0.0
        length = 0
        for line in text.split("\n"):
            n = len(line.split())
            if not n:
                continue
            log_sum += model.score(line, bos=True, eos=True)  # KenLM splits on whitespace
            length += n + 1
        words += length
        scores.append(10.0 ** (-log_sum / length) if length else math.nan)
    return np.asarray(scores, dtype=np.float64), words


def lm_sentences(texts: Iterable[str], batch: int = 8192) -> Iterator[list[str]]:
    """Training sentences: the non-empty normalized lines of each text."""
    pending: list[str] = []
    for text in [*texts, None]:
        if text is not None:
            pending.append(text)
        if len(pending) >= batch or (text is None and pending):
            for normed in normalize(pa.array(pending, pa.string())).to_pylist():
                for line in normed.split("\n"):
                    tokens = line.split()
                    if tokens:
                        yield tokens
            pending = []


def train_lm(texts: Iterable[str], output: str | Path, order: int) -> dict[str, Any]:
    """Normalize ``texts`` and train an ARPA model (interpolated modified Kneser-Ney)."""
    from curate.quality.arpa import train_arpa

    stats = train_arpa(lm_sentences(texts), output, order=order)
    return {
        "order": stats.order,
        "ngrams": list(stats.counts),
        "vocab": stats.vocab_size,
        "tokens": stats.tokens,
        "sentences": stats.sentences,
    }
