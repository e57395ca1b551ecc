"""MinHash signatures for a whole batch of documents at once, in numpy.

No Python code runs per document, per token or per shingle.  The steps, each a
handful of array operations over the concatenated UTF-8 bytes of the batch:

1. **Normalize** with Arrow kernels (:func:`normalize`): Unicode NFKC,
   lowercase, strip diacritics, digits to ``0``, punctuation and symbols to
   spaces, collapse whitespace.  Each step can be switched off.
2. **Tokens.**  Words are the runs between single spaces of the normalized
   text; characters are Unicode code points.  A token's value is a 64-bit
   polynomial hash of its bytes, finished by the splitmix64 mixer.
3. **Shingles.**  An n-gram of tokens hashes to ``mix(sum(t[i+k] * P**k))``
   mod 2^64, computed for every position at once from prefix sums of
   ``t[j] * P**j`` and the inverse powers of the odd constant ``P``.  A
   document with fewer than ``n`` tokens is one shingle of all its tokens; a
   document with no token has no shingle (and no band key: it can only be an
   exact duplicate, which ``exact_dedup`` finds).
4. **Permutations.**  ``h_k(x) = a_k * x + b_k`` mod 2^64 with odd ``a_k``: a
   bijection of 64-bit values, whose high bits mix all bits of ``x``.  The
   signature is ``min_x h_k(x)`` over the document's shingles, its high 32
   bits in 32-bit mode (the shift commutes with the minimum).  Constants come
   from splitmix64 of the seed, so they never depend on a library's random
   stream.
5. **Bands.**  ``bands x rows`` signature values; a band's key is a 64-bit
   hash of the band index and its values.

Hash values are not those of datasketch or datatrove (their shingle hashes
differ), so signatures are not interchangeable with theirs; what matters, the
probability that two signatures agree at a position, equals the Jaccard
similarity of the shingle sets like theirs does (the tests measure it).

The compiled kernel (:mod:`curate.dedup.kernel`, numba) does steps 2 to 4 in
one pass per document and gives identical signatures; this numpy path is its
reference and the fallback when numba is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

U64 = np.uint64
Array = np.ndarray[Any, Any]

MASK64 = (1 << 64) - 1
#: Odd multipliers of the token and shingle polynomials.
P_BYTE = 0x100000001B3  # FNV-1a 64 prime
P_TOKEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd
#: What separates words: Unicode spaces and the ASCII whitespace controls.
WHITESPACE = r"[\p{Z}\t\n\x0b\x0c\r\x{85}]+"
#: Mixed into a shingle's hash with its length in tokens.
LEN_MULT = 0xA24BAED4963EE407
#: Shingles hashed per permutation pass; bounds the (chunk x num_perm) work array.
CHUNK = 4096


def splitmix64(x: Array) -> Array:
    """The splitmix64 finalizer: a bijection of uint64 with full avalanche."""
    x = x.astype(U64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> U64(30)
        x *= U64(0xBF58476D1CE4E5B9)
        x ^= x >> U64(27)
        x *= U64(0x94D049BB133111EB)
        x ^= x >> U64(31)
    return x


def _splitmix_scalar(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)


def permutations(num_perm: int, seed: int) -> tuple[Array, Array]:
    """The ``a`` (odd) and ``b`` constants of ``num_perm`` hash permutations."""
    state = (seed * 0xD1B54A32D192ED03 + 0x632BE59BD9B4E019) & MASK64
    a, b = [], []
    for _ in range(num_perm):
        state, x = _splitmix_scalar(state)
        state, y = _splitmix_scalar(state)
        a.append(x | 1)
        b.append(y)
    return np.array(a, dtype=U64), np.array(b, dtype=U64)


@dataclass(frozen=True)
class Normalization:
    """Text normalization before shingling; every step can be switched off."""

    unicode: Literal["NFKC", "NFC", "none"] = "NFKC"
    lowercase: bool = True
    #: Strip combining marks (``é`` -> ``e``), like datatrove's ``norm_unicode_diacritics``.
    diacritics: bool = True
    #: Every run of digits becomes ``0``, like datatrove's ``norm_numbers``.
    numbers: bool = True
    #: Unicode punctuation and symbols become spaces.
    punctuation: bool = True
    #: Runs of whitespace become one space; leading and trailing space go.  Word
    #: shingles always collapse whitespace (words are what lies between spaces).
    whitespace: bool = True


def normalize(text: pa.Array | pa.ChunkedArray, norm: Normalization) -> pa.Array:
    """Normalized text, nulls as empty strings, as one contiguous ``large_string`` array."""
    out = pc.fill_null(text, "")
    if norm.diacritics:
        out = pc.utf8_normalize(out, "NFD")
        out = pc.replace_substring_regex(out, r"\p{Mn}+", "")
    if norm.unicode != "none":
        out = pc.utf8_normalize(out, norm.unicode)
    if norm.lowercase:
        out = pc.utf8_lower(out)
    if norm.numbers:
        out = pc.replace_substring_regex(out, r"\p{Nd}+", "0")
    if norm.punctuation:
        out = pc.replace_substring_regex(out, r"[\p{P}\p{S}]+", " ")
    if norm.whitespace:
        out = pc.utf8_trim(pc.replace_substring_regex(out, WHITESPACE, " "), " ")
    if isinstance(out, pa.ChunkedArray):
        out = out.combine_chunks() if out.num_chunks else pa.array([], pa.string())
    return out.cast(pa.large_string())


def _buffers(text: pa.Array) -> tuple[Array, Array]:
    """(UTF-8 bytes, offsets) of a ``large_string`` array, offsets rebased to 0."""
    offsets = np.frombuffer(text.buffers()[1], dtype=np.int64)[
        text.offset : text.offset + len(text) + 1
    ]
    data_buf = text.buffers()[2]
    data = (
        np.frombuffer(data_buf, dtype=np.uint8)
        if data_buf is not None
        else np.zeros(0, dtype=np.uint8)
    )
    data = data[offsets[0] : offsets[-1]]
    return data, offsets - offsets[0]


def _powers(base: int, n: int) -> Array:
    """``base ** i`` mod 2^64 for ``i`` in ``[0, n)``."""
    out = np.full(max(n, 1), base, dtype=U64)
    out[0] = 1
    with np.errstate(over="ignore"):
        np.cumprod(out, out=out)
    return out[:n]


def _segment_hash(values: Array, starts: Array, ends: Array, base: int) -> Array:
    """Polynomial hash ``sum(v[s+k] * base**k)`` of each segment ``[s, e)`` of ``values``.

    Segments must be non-empty, sorted and disjoint; values between them are ignored.
    """
    if len(starts) == 0:
        return np.zeros(0, dtype=U64)
    mark = np.zeros(len(values), dtype=np.int64)
    mark[starts] = 1
    seg = np.cumsum(mark) - 1  # segment of each value (-1 before the first)
    idx = np.arange(len(values), dtype=np.int64)
    seg_c = np.maximum(seg, 0)
    live = (seg >= 0) & (idx < ends[seg_c])
    rel = np.where(live, idx - starts[seg_c], 0)
    pw = _powers(base, int(rel.max()) + 1)
    with np.errstate(over="ignore"):
        weighted = values * pw[rel]
    weighted[~live] = 0
    return np.add.reduceat(weighted, starts)


@dataclass(frozen=True)
class Tokens:
    """Token values of a batch, concatenated, and where each document's tokens are."""

    values: Array  # uint64, one per token
    offsets: Array  # int64, len(docs) + 1


def word_tokens(text: pa.Array) -> Tokens:
    """Words of normalized text: maximal runs of non-space bytes."""
    data, offsets = _buffers(text)
    n_docs = len(offsets) - 1
    space = data == 32
    prev_space = np.ones(len(data), dtype=bool)
    prev_space[1:] = space[:-1]
    doc_start = np.zeros(len(data), dtype=bool)
    doc_start[offsets[:-1][offsets[:-1] < len(data)]] = True
    starts_mask = ~space & (prev_space | doc_start)
    next_space = np.ones(len(data), dtype=bool)
    next_space[:-1] = space[1:]
    doc_end = np.zeros(len(data) + 1, dtype=bool)
    doc_end[offsets[1:]] = True
    ends_mask = ~space & (next_space | doc_end[1:])
    starts = np.flatnonzero(starts_mask)
    ends = np.flatnonzero(ends_mask) + 1
    values = splitmix64(_segment_hash(data.astype(U64) + U64(1), starts, ends, P_BYTE))
    # Token offsets per document: how many word starts precede each document start.
    tok_offsets = np.searchsorted(starts, offsets, side="left").astype(np.int64)
    assert len(tok_offsets) == n_docs + 1
    return Tokens(values, tok_offsets)


def char_tokens(text: pa.Array) -> Tokens:
    """Unicode code points of normalized text (UTF-8 sequences kept whole)."""
    data, offsets = _buffers(text)
    lead = (data & 0xC0) != 0x80
    starts = np.flatnonzero(lead)
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    if len(starts):
        ends[-1] = len(data)
    values = splitmix64(_segment_hash(data.astype(U64) + U64(1), starts, ends, 257))
    tok_offsets = np.searchsorted(starts, offsets, side="left").astype(np.int64)
    return Tokens(values, tok_offsets)


@dataclass(frozen=True)
class Shingles:
    """Shingle hashes of a batch, grouped by document in document order."""

    values: Array  # uint64
    doc: Array  # int64 document index of each shingle, non-decreasing
    n_docs: int

    def counts(self) -> Array:
        return np.bincount(self.doc, minlength=self.n_docs)


def shingles(tokens: Tokens, n: int) -> Shingles:
    """Every run of ``n`` consecutive tokens of a document, hashed; short documents whole."""
    vals, offs = tokens.values, tokens.offsets
    n_docs = len(offs) - 1
    lengths = np.diff(offs)
    m = len(vals)
    pw = _powers(P_TOKEN, m + 1)
    inv = _powers(pow(P_TOKEN, -1, 1 << 64), m + 1)
    prefix = np.zeros(m + 1, dtype=U64)
    with np.errstate(over="ignore"):
        np.cumsum(vals * pw[:m], out=prefix[1:])
    doc_of_token = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
    # Full n-grams start at i with i + n <= end of its document.
    if m >= n:
        starts = np.arange(m - n + 1, dtype=np.int64)
        ok = starts + n <= offs[1:][doc_of_token[: m - n + 1]]
        starts = starts[ok]
    else:
        starts = np.zeros(0, dtype=np.int64)
    ends = starts + n
    # Documents with 1..n-1 tokens: one shingle of all of them.
    short = np.flatnonzero((lengths > 0) & (lengths < n))
    all_starts = np.concatenate([starts, offs[short]])
    all_ends = np.concatenate([ends, offs[short + 1]])
    docs = np.concatenate([doc_of_token[starts], short])
    with np.errstate(over="ignore"):
        raw = (prefix[all_ends] - prefix[all_starts]) * inv[all_starts]
        # Mix in the length so that a short document's shingle differs from a prefix.
        raw ^= (all_ends - all_starts).astype(U64) * U64(LEN_MULT)
    order = np.argsort(docs, kind="stable")
    return Shingles(splitmix64(raw[order]), docs[order], n_docs)


def minhash_numpy(sh: Shingles, a: Array, b: Array) -> Array:
    """``(n_docs, num_perm)`` uint64 minima of ``a*x + b``; all-ones for documents without
    shingles."""
    out = np.full((sh.n_docs, len(a)), np.iinfo(np.uint64).max, dtype=U64)
    if len(sh.values) == 0:
        return out
    work = np.empty((CHUNK, len(a)), dtype=U64)
    lo = 0
    total = len(sh.values)
    with np.errstate(over="ignore"):
        while lo < total:
            hi = min(lo + CHUNK, total)
            block = work[: hi - lo]
            np.multiply(sh.values[lo:hi, None], a[None, :], out=block)
            np.add(block, b[None, :], out=block)
            docs = sh.doc[lo:hi]
            first = np.flatnonzero(np.r_[True, docs[1:] != docs[:-1]])
            mins = np.minimum.reduceat(block, first, axis=0)
            rows = docs[first]
            np.minimum(out[rows], mins, out=mins)
            out[rows] = mins
            lo = hi
    return out


def band_keys(sig: Array, bands: int, rows: int) -> Array:
    """``(n_docs, bands)`` uint64 keys: a hash of the band index and its ``rows`` values."""
    n = sig.shape[0]
    keys = np.empty((n, bands), dtype=U64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            acc = np.full(n, U64(band + 1) * U64(0x9E3779B97F4A7C15), dtype=U64)
            for r in range(rows):
                acc = splitmix64(acc ^ sig[:, band * rows + r])
            keys[:, band] = acc
    return keys


@dataclass(frozen=True)
class SignatureSpec:
    """Everything that determines a signature."""

    shingle: Literal["word", "char"] = "word"
    ngram: int = 5
    num_perm: int = 112
    hash_bits: Literal[32, 64] = 64
    seed: int = 1
    norm: Normalization = Normalization()

    def normalization(self) -> Normalization:
        if self.shingle == "word" and not self.norm.whitespace:
            return Normalization(**{**vars(self.norm), "whitespace": True})
        return self.norm


#: Bytes of normalized text turned into signatures per step (bounds temporary arrays).
STEP_BYTES = 1 << 21


def signatures(text: pa.Array | pa.ChunkedArray, spec: SignatureSpec) -> tuple[Array, Array]:
    """MinHash signatures ``(n_docs, num_perm)`` (uint32 or uint64) and the number of
    shingles of each document."""
    a, b = permutations(spec.num_perm, spec.seed)
    if _use_kernel(spec):
        sig, counts = _signatures_kernel(text, spec, a, b)
    else:
        sig, counts = _signatures_numpy(normalize(text, spec.normalization()), spec, a, b)
    if spec.hash_bits == 32:
        return (sig >> U64(32)).astype(np.uint32), counts
    return sig, counts


def _prepared(text: pa.Array | pa.ChunkedArray, norm: Normalization) -> tuple[Array, Array]:
    """UTF-8 bytes and offsets for the kernel: ASCII documents raw (the kernel applies the
    ASCII rules), the others normalized by Arrow first."""
    raw = pc.fill_null(text, "")
    if isinstance(raw, pa.ChunkedArray):
        raw = raw.combine_chunks() if raw.num_chunks else pa.array([], pa.string())
    raw = raw.cast(pa.large_string())
    non_ascii = pc.invert(pc.string_is_ascii(raw))
    if pc.any(non_ascii).as_py():
        fixed = normalize(pc.filter(raw, non_ascii), norm)
        raw = pc.replace_with_mask(raw, non_ascii, fixed)
        if isinstance(raw, pa.ChunkedArray):
            raw = raw.combine_chunks()
    return _buffers(raw)


def _kernel_args(spec: SignatureSpec) -> dict[str, Any]:
    from curate.dedup import kernel

    norm = spec.normalization()
    return {
        "char": spec.shingle == "char",
        "ngram": spec.ngram,
        "tables": kernel.byte_table(norm.lowercase, norm.numbers, norm.punctuation),
        "constants": (P_BYTE, P_TOKEN, LEN_MULT),
    }


def _signatures_kernel(
    text: pa.Array | pa.ChunkedArray, spec: SignatureSpec, a: Array, b: Array
) -> tuple[Array, Array]:
    from curate.dedup import kernel

    data, offsets = _prepared(text, spec.normalization())
    return kernel.signatures(data, offsets, a=a, b=b, **_kernel_args(spec))


#: Documents signed per kernel call by :func:`lsh_keys` (bounds its work buffer).
KEY_CHUNK = 2048


def lsh_keys(
    text: pa.Array | pa.ChunkedArray, spec: SignatureSpec, bands: int, rows: int
) -> tuple[Array, Array]:
    """Band keys ``(n_docs, bands)`` and shingle counts, without keeping whole signatures:
    documents are signed ``KEY_CHUNK`` at a time into one reused buffer."""
    from curate.dedup import kernel

    if not _use_kernel(spec):
        sig, counts = signatures(text, spec)
        return band_keys(sig.astype(U64), bands, rows), counts
    a, b = permutations(spec.num_perm, spec.seed)
    data, offsets = _prepared(text, spec.normalization())
    args = _kernel_args(spec)
    n = len(offsets) - 1
    keys = np.empty((n, bands), dtype=U64)
    counts = np.zeros(n, dtype=np.int64)
    buf = np.empty((min(n, KEY_CHUNK), spec.num_perm), dtype=U64)
    for lo in range(0, n, KEY_CHUNK):
        hi = min(lo + KEY_CHUNK, n)
        sig, _ = kernel.signatures(
            data, offsets[lo : hi + 1], a=a, b=b, out=(buf[: hi - lo], counts[lo:hi]), **args
        )
        keys[lo:hi] = kernel.band_keys(sig >> U64(32) if spec.hash_bits == 32 else sig, bands, rows)
    return keys, counts


def _use_kernel(spec: SignatureSpec) -> bool:
    from curate.dedup import kernel

    return kernel.available() and (spec.shingle == "word" or spec.normalization().whitespace)


def _signatures_numpy(
    norm: pa.Array, spec: SignatureSpec, a: Array, b: Array
) -> tuple[Array, Array]:
    n = len(norm)
    sig = np.empty((n, spec.num_perm), dtype=U64)
    counts = np.zeros(n, dtype=np.int64)
    _, offsets = _buffers(norm)
    lo = 0
    while lo < n:
        # Documents [lo, hi): at least one, about STEP_BYTES of text.
        hi = int(np.searchsorted(offsets, offsets[lo] + STEP_BYTES, side="right"))
        hi = min(max(hi - 1, lo + 1), n)
        part = norm.slice(lo, hi - lo)
        toks = word_tokens(part) if spec.shingle == "word" else char_tokens(part)
        sh = shingles(toks, spec.ngram)
        sig[lo:hi] = minhash_numpy(sh, a, b)
        counts[lo:hi] = sh.counts()
        lo = hi
    return sig, counts
