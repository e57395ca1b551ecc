"""A small n-gram language-model trainer that writes ARPA files KenLM loads (an ``lmplz``).

The estimate is interpolated modified Kneser-Ney (Chen & Goodman 1998, "An Empirical Study of
Smoothing Techniques for Language Modeling", TR-10-98, section 3 and eq. 26) computed the way
KenLM's ``lmplz`` computes it (``lm/builder``: ``adjust_counts.cc``,
``initial_probabilities.cc``, ``interpolate.cc``), without pruning:

* each sentence is ``<s> w1 .. wn </s>``; the highest order keeps raw counts, a lower-order
  n-gram's count is its number of distinct one-word left extensions (``<s>`` counts as one),
  except that n-grams starting with ``<s>`` keep raw counts;
* each order has three discounts D1, D2, D3+ from the counts-of-counts n1..n4 of its (adjusted)
  counts: Y = n1 / (n1 + 2 n2), Dj = j - (j + 1) Y n(j+1) / nj; where some nj is 0 or a Dj falls
  outside (0, j] the order uses fallback discounts, as ``lmplz --discount_fallback``
  (default 0.5, 1, 1.5);
* the unigrams interpolate with the uniform distribution over the vocabulary with ``<unk>`` and
  ``</s>`` but without ``<s>``, so ``<unk>`` gets gamma / |V|;
* ARPA probabilities are the interpolated ones and each context's backoff is its gamma, so the
  backoff model equals the interpolated model for every n-gram, seen or not.

Unlike ``lmplz`` (which writes 0) ``<s>`` gets the conventional log10 probability -99, empty
sentences are skipped, and n-grams are written sorted by their words.
"""

from __future__ import annotations

import uuid
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

BOS = "<s>"
EOS = "</s>"
UNK = "<unk>"
SPECIALS = frozenset((BOS, EOS, UNK))
#: ``lmplz --discount_fallback`` defaults: D1, D2, D3+.
DEFAULT_FALLBACK = (0.5, 1.0, 1.5)
#: Log10 probability written for ``<s>`` (never predicted).
BOS_LOG10_PROB = -99.0
# Characters that split words in ARPA files (KenLM's kARPASpaces) and in kenlm's Python API.
_SPACES = frozenset(" \t\n\r\v\f\0")
_CHUNK = 1 << 16

IntArray = npt.NDArray[np.int64]
Ranks = npt.NDArray[np.signedinteger[Any]]
FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ArpaStats:
    """What :func:`train_arpa` wrote.

    ``counts[k-1]`` is the number of k-grams in the file; ``vocab_size`` (= ``counts[0]``) counts
    the distinct words plus ``<s>``, ``</s>`` and ``<unk>``; ``tokens`` the words read (without
    ``<s>``/``</s>``) in ``sentences`` non-empty sentences; ``discounts[k-1]`` is (D1, D2, D3+) of
    order k; ``fallback_orders`` lists the orders whose closed-form discounts were unusable.
    """

    order: int
    counts: tuple[int, ...]
    vocab_size: int
    tokens: int
    sentences: int
    discounts: tuple[tuple[float, float, float], ...]
    fallback_orders: tuple[int, ...]


@dataclass
class _Order:
    """The n-grams of one order, as arrays indexed by n-gram (sorted by words)."""

    last: Ranks  # word id of the last word
    prefix: Ranks  # index of the first k-1 words among the (k-1)-grams (k >= 2)
    suffix: Ranks  # index of the last k-1 words among the (k-1)-grams (k >= 2)
    raw: Ranks  # raw count in the text
    bos: npt.NDArray[np.bool_]  # starts with <s>


def _discounts(
    adjusted: Ranks, fallback: tuple[float, float, float]
) -> tuple[tuple[float, float, float], bool]:
    """Chen & Goodman eq. 26 from counts-of-counts, or ``fallback`` where it is unusable."""
    n = [int(np.count_nonzero(adjusted == j)) for j in range(5)]
    if n[1] == 0 or n[2] == 0 or n[3] == 0:
        return fallback, True
    y = n[1] / (n[1] + 2.0 * n[2])
    d = tuple(j - (j + 1) * y * n[j + 1] / n[j] for j in (1, 2, 3))
    # lmplz accepts 0 <= Dj <= j; Dj == 0 could leave a context no mass to back off with.
    if any(not 0.0 < dj <= j for j, dj in zip((1, 2, 3), d, strict=True)):
        return fallback, True
    return (d[0], d[1], d[2]), False


def _read(
    sentences: Iterable[Sequence[str]], skip_symbols: bool
) -> tuple[list[str], Ranks, IntArray]:
    """Vocabulary sorted by word (with the specials), word ids, and sentence lengths."""
    index: dict[str, int] = {}
    flat: array[int] = array("i")
    lengths: array[int] = array("q")
    for sentence in sentences:
        if isinstance(sentence, str):
            raise TypeError("train_arpa takes tokenized sentences (sequences of str), not str")
        if len(sentence):
            flat.extend([index.setdefault(word, len(index)) for word in sentence])
            lengths.append(len(sentence))
    seen = list(index)
    for word in seen:
        if not isinstance(word, str):
            raise TypeError(f"tokens must be str, got {type(word).__name__}: {word!r}")
        if not word or not _SPACES.isdisjoint(word):
            raise ValueError(f"token {word!r} is empty or contains whitespace")
        if word in SPECIALS and not skip_symbols:
            raise ValueError(f"token {word!r} is reserved; pass skip_symbols=True to drop it")
    vocab = sorted(SPECIALS.union(seen))
    final = {word: i for i, word in enumerate(vocab)}
    remap = np.array([-1 if w in SPECIALS else final[w] for w in seen], dtype=np.int32)
    words = remap[np.frombuffer(flat, dtype=np.intc)] if flat else np.empty(0, np.int32)
    lens = np.frombuffer(lengths, dtype=np.int64) if lengths else np.empty(0, np.int64)
    if skip_symbols and SPECIALS.intersection(seen):
        keep = words >= 0
        sentence_of = np.repeat(np.arange(lens.size), lens)
        lens = np.bincount(sentence_of[keep], minlength=lens.size).astype(np.int64)
        words, lens = words[keep], lens[lens > 0]
    return vocab, words, lens


def _group(keys: IntArray, index: type[np.signedinteger[Any]]) -> tuple[IntArray, Ranks, Ranks]:
    """Sorted distinct ``keys``, their counts, and each key's index among them: ``np.unique``
    with ``return_inverse`` and ``return_counts``, in less memory."""
    perm = np.argsort(keys)
    ordered = keys[perm]
    new = np.empty(ordered.size, dtype=np.bool_)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    firsts = np.flatnonzero(new)
    uniq = ordered[firsts]
    del ordered
    inverse = np.empty(keys.size, dtype=index)
    inverse[perm] = np.cumsum(new, dtype=index) - 1
    return uniq, np.diff(firsts, append=keys.size).astype(index), inverse


def _count(
    order: int, vocab_size: int, bos: int, eos: int, words: Ranks, lens: IntArray
) -> list[_Order]:
    """All n-grams of orders 1..``order`` in ``<s> w1 .. wn </s>`` sentences, with raw counts.

    A k-gram is a (k-1)-gram index and a word id packed in one int64, so sorting k-grams sorts
    them by their words (word ids follow the sorted vocabulary)."""
    total = int(lens.sum()) + 2 * lens.size
    if total >= 3 * 10**9:  # (k-1)-gram index * vocabulary size must stay below 2**63
        raise ValueError(f"{total} tokens with <s> and </s>: too many for one model")
    index: type[np.signedinteger[Any]] = np.int32 if total < 2**31 else np.int64
    firsts = np.zeros(lens.size, dtype=np.int64)
    np.cumsum(lens[:-1] + 2, out=firsts[1:])
    tok = np.empty(total, dtype=index)
    inner = np.ones(total, dtype=np.bool_)
    inner[firsts] = inner[firsts + lens + 1] = False
    tok[firsts], tok[firsts + lens + 1], tok[inner] = bos, eos, words
    del inner, firsts
    ids = np.arange(vocab_size, dtype=index)
    raw1 = np.bincount(tok, minlength=vocab_size).astype(index)
    raw1[bos] = 0  # <s> is context only
    empty = np.empty(0, dtype=index)
    levels = [_Order(ids, empty, empty, raw1, ids == bos)]
    ends = np.arange(total, dtype=index)  # where a (k-1)-gram ends
    ranks = tok  # at each position, the index of the (k-1)-gram ending there (or -1)
    for k in range(2, order + 1):
        ends = ends[tok[ends] != eos] + 1  # a k-gram = a (k-1)-gram and the next word
        if ends.size == 0:
            raise ValueError(f"no {k}-grams: every sentence is too short for order {order}")
        keys = ranks[ends - 1].astype(np.int64) * vocab_size + tok[ends]
        uniq, raw, inverse = _group(keys, index)
        del keys
        suffix = np.empty(uniq.size, dtype=index)
        suffix[inverse] = ranks[ends]
        prefix = (uniq // vocab_size).astype(index)
        last = (uniq % vocab_size).astype(index)
        levels.append(_Order(last, prefix, suffix, raw, levels[-1].bos[prefix]))
        if k < order:
            ranks = np.full(total, -1, dtype=index)
            ranks[ends] = inverse
        del inverse
    return levels


def _lines(
    vocab: list[str], levels: list[_Order], logp: FloatArray, backoff: FloatArray | None
) -> Iterable[str]:
    """The ARPA lines of order ``len(levels)`` in chunks, ``%.7g`` floats (never ``-0``)."""
    size = levels[-1].last.size
    for lo in range(0, size, _CHUNK):
        at = np.arange(lo, min(lo + _CHUNK, size))
        columns: list[list[str]] = []
        for level in reversed(levels[1:]):
            columns.append([vocab[w] for w in level.last[at].tolist()])
            at = level.prefix[at]
        columns.append([vocab[w] for w in at.tolist()])
        names = [" ".join(gram) for gram in zip(*reversed(columns), strict=True)]
        probs = (logp[lo : lo + _CHUNK] + 0.0).tolist()
        if backoff is None:
            yield "".join([f"{p:.7g}\t{n}\n" for p, n in zip(probs, names, strict=True)])
        else:
            bows = (backoff[lo : lo + _CHUNK] + 0.0).tolist()
            yield "".join(
                [f"{p:.7g}\t{n}\t{b:.7g}\n" for p, n, b in zip(probs, names, bows, strict=True)]
            )


def _adjust(levels: list[_Order]) -> list[Ranks]:
    """lmplz's adjusted counts: raw at the top order and for n-grams starting with ``<s>``,
    else the number of distinct left extensions (adjust_counts.cc)."""
    adjusted = [
        np.where(level.bos, level.raw, np.bincount(up.suffix, minlength=level.last.size))
        for level, up in pairwise(levels)
    ]
    return [*adjusted, levels[-1].raw]


def _estimate(
    levels: list[_Order],
    adjusted: list[Ranks],
    discounts: list[tuple[float, float, float]],
) -> tuple[list[FloatArray], list[FloatArray]]:
    """Interpolated probabilities per order and gammas (backoffs) per context order
    (initial_probabilities.cc, interpolate.cc): p(w | c) = (a(c w) - D(a)) / sum_x a(c x)
    + gamma(c) p(w | c'), gamma(c) = sum_x D(a(c x)) / sum_x a(c x), and at the bottom the
    uniform distribution over the vocabulary minus ``<s>``."""
    probs: list[FloatArray] = []
    gammas: list[FloatArray] = []  # gammas[k-1][c]: backoff of the k-gram c as a context
    for k, (level, a) in enumerate(zip(levels, adjusted, strict=True), start=1):
        cut = np.array((0.0, *discounts[k - 1]))[np.minimum(a, 3)]
        if k == 1:
            den = float(a.sum())
            uniform = 1.0 / (a.size - 1)
            probs.append((a - cut) / den + float(cut.sum()) / den * uniform)
            continue
        contexts = levels[k - 2].last.size
        den_c = np.bincount(level.prefix, weights=a, minlength=contexts)
        num_c = np.bincount(level.prefix, weights=cut, minlength=contexts)
        gamma_c = np.ones(contexts)  # a (k-1)-gram that is no context backs off with 1
        np.divide(num_c, den_c, out=gamma_c, where=den_c > 0)
        gammas.append(gamma_c)
        probs.append(
            (a - cut) / den_c[level.prefix] + gamma_c[level.prefix] * probs[-1][level.suffix]
        )
    return probs, gammas


def _write(
    path: str | Path,
    vocab: list[str],
    levels: list[_Order],
    probs: list[FloatArray],
    gammas: list[FloatArray],
) -> None:
    """Write the ARPA file through a temporary file in the same folder, then rename it."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("x", encoding="utf-8", newline="\n") as out:  # mode 0666 & ~umask
            out.write("\\data\\\n")
            out.writelines(f"ngram {k}={lv.last.size}\n" for k, lv in enumerate(levels, start=1))
            for k in range(1, len(levels) + 1):
                logp = np.minimum(np.log10(probs[k - 1]), 0.0)
                if k == 1:
                    logp[vocab.index(BOS)] = BOS_LOG10_PROB
                backoff = np.log10(gammas[k - 1]) if k < len(levels) else None
                out.write(f"\n\\{k}-grams:\n")
                out.writelines(_lines(vocab, levels[:k], logp, backoff))
            out.write("\n\\end\\\n")
        tmp.replace(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def train_arpa(
    sentences: Iterable[Sequence[str]],
    path: str | Path,
    order: int = 3,
    *,
    discount_fallback: tuple[float, float, float] = DEFAULT_FALLBACK,
    skip_symbols: bool = False,
) -> ArpaStats:
    """Train an interpolated modified Kneser-Ney model of ``order`` and write it to ``path``.

    ``sentences`` are tokenized lines (empty ones are skipped); tokens must be non-empty and free
    of ASCII whitespace. ``<s>``, ``</s>`` and ``<unk>`` in the input raise ``ValueError`` unless
    ``skip_symbols`` (then they are dropped, as ``lmplz --skip_symbols``). The file is written
    atomically and its bytes depend only on the input.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if len(discount_fallback) != 3 or not all(
        0.0 < d <= j for j, d in zip((1, 2, 3), discount_fallback, strict=True)
    ):
        raise ValueError(
            f"discount_fallback must be (D1, D2, D3+) with 0 < Dj <= j: {discount_fallback}"
        )
    vocab, words, lens = _read(sentences, skip_symbols)
    if words.size == 0:
        raise ValueError("no tokens to train on: every sentence is empty")
    levels = _count(order, len(vocab), vocab.index(BOS), vocab.index(EOS), words, lens)

    adjusted = _adjust(levels)
    found = [_discounts(a, discount_fallback) for a in adjusted]
    discounts = [d for d, _ in found]
    probs, gammas = _estimate(levels, adjusted, discounts)
    _write(path, vocab, levels, probs, gammas)
    return ArpaStats(
        order=order,
        counts=tuple(lv.last.size for lv in levels),
        vocab_size=len(vocab),
        tokens=int(words.size),
        sentences=int(lens.size),
        discounts=tuple(discounts),
        fallback_orders=tuple(k for k, (_, fell) in enumerate(found, start=1) if fell),
    )


class ArpaModel:
    """A plain-Python reader of small ARPA files, scoring with standard ARPA backoff.

    ``log10 p(w | h) = log10 p(h w)`` if the n-gram is listed, else ``bo(h) + log10 p(w | h')``
    with ``h'`` the history without its first word and a missing ``bo`` counting as 0. Words not
    in the unigrams are read as ``<unk>``. For tests and small models: everything is in dicts.
    """

    def __init__(self, path: str | Path) -> None:
        self.counts: list[int] = []
        self.probs: dict[tuple[str, ...], float] = {}
        self.backoffs: dict[tuple[str, ...], float] = {}
        section = 0
        for raw in Path(path).read_bytes().split(b"\n"):
            fields = [f.decode("utf-8") for f in raw.split()]  # ASCII whitespace, as KenLM
            if not fields or fields in (["\\data\\"], ["\\end\\"]):
                continue
            head = fields[0]
            if section == 0 and head == "ngram":
                self.counts.append(int(fields[1].split("=")[1]))
            elif head.startswith("\\") and head.endswith("-grams:"):
                section = int(head[1 : -len("-grams:")])
            elif section:
                gram = tuple(fields[1 : 1 + section])
                self.probs[gram] = float(head)
                if len(fields) > 1 + section:
                    self.backoffs[gram] = float(fields[1 + section])
        self.order = len(self.counts)
        found = [sum(len(g) == k for g in self.probs) for k in range(1, self.order + 1)]
        if not self.order or found != self.counts or (UNK,) not in self.probs:
            raise ValueError(
                f"{path}: not an ARPA file with <unk> (header {self.counts}, read {found})"
            )

    def _known(self, word: str) -> str:
        return word if (word,) in self.probs else UNK

    def log10_prob(self, word: str, context: Sequence[str] = ()) -> float:
        """log10 p(word | context); ``context`` is oldest word first, e.g. ``["<s>", "a"]``."""
        history = tuple(self._known(w) for w in context[max(0, len(context) - self.order + 1) :])
        word = self._known(word)
        backoff = 0.0
        for start in range(len(history) + 1):
            prob = self.probs.get((*history[start:], word))
            if prob is not None:
                return backoff + prob
            backoff += self.backoffs.get(history[start:], 0.0)
        raise AssertionError("unreachable: every word has a unigram")

    def score(self, tokens: Sequence[str], bos: bool = True, eos: bool = True) -> float:
        """log10 probability of a sentence, like ``kenlm.Model.score``."""
        context: list[str] = [BOS] if bos else []
        total = 0.0
        for word in [*tokens, EOS] if eos else tokens:
            total += self.log10_prob(word, context)
            context.append(word)
        return total
