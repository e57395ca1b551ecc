"""N-gram decontamination against evaluation sets: normalization, the index, matching.

The method is GPT-3's (Brown et al. 2020, arXiv 2005.14165, §4 and App. C), as
NeMo Curator implements it (``nemo_curator/tasks/downstream_task.py``,
``DownstreamTask._update_ngrams``; its documentation says it follows GPT-3 and
Megatron-Turing NLG, Smith et al. 2022, arXiv 2201.11990), and as SPECS §8.4
asks for generated samples:

* **Normalization** (:func:`normalize`), identical for evaluation items and rows:
  Unicode NFKC, then lowercase (Arrow's ``utf8_lower``: the Unicode lowercase
  mapping, code point by code point), then every *punctuation* character is
  deleted (not replaced by a space: ``don't`` -> ``dont``, ``U.S.`` -> ``us``),
  then the text is split on runs of Unicode whitespace and empty tokens are
  dropped.  Punctuation is every character of Unicode general category P
  (``\\p{P}``) plus the ASCII symbols of Python's ``string.punctuation``
  (``$ + < = > ^ ` | ~``), so the deleted set contains lm-evaluation-harness's
  ``Janitor`` (``delete_chars=string.punctuation``, with lowercasing: its
  ``normalize_string``) and follows GPT-3's "ignoring all punctuation,
  whitespace, and casing" (App. C).  NFKC comes first so that compatibility
  forms (full-width letters, ligatures, ``…``) become their plain letters and
  punctuation before the other steps see them.  Words are whitespace tokens,
  so text written without spaces (Chinese, Japanese) is one token per run.
* **N-grams**: every run of ``n`` consecutive tokens (``n = 13`` by default:
  GPT-3's value, the one SPECS §8.4 names).
* **Short items**: an evaluation item of fewer than ``n`` tokens is indexed as
  one whole sequence ("or that overlap with the whole example when it is
  shorter than 13-grams", GPT-3 §4), and a row matches it when the item's
  tokens occur contiguously in the row.  Items of fewer than ``min_tokens``
  tokens (default 8) are not indexed at all: GPT-3 App. C: "Due to spurious
  collisions at lower values of N we use a minimum value of 8", and NeMo
  Curator skips items under 8 words and indexes items of 8 to 12 words whole.
* **Index**: 64-bit hashes of the indexed sequences, sorted, with where each
  came from.  A token's hash is xxh3-64 of its UTF-8 bytes; a sequence's hash is
  a polynomial over its token hashes (mod 2^64, seeded by its length), so it is
  the same in every process and on every machine.  A hash hit is only a
  candidate: it is verified token by token against the evaluation item's text,
  so a hash collision can cost time but never drops a row.
"""

from __future__ import annotations

import gzip
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash
import zstandard

from curate.io.files import InputError

EvalFormat = Literal["jsonl", "parquet", "txt"]

#: Deleted before splitting: Unicode punctuation plus the ASCII symbols of
#: ``string.punctuation`` (RE2 syntax, as Arrow's regex functions use).
PUNCTUATION = r"[\p{P}$+<=>^`|~]"
#: Multiplier of the polynomial sequence hash (odd, the 64-bit golden ratio).
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)

U64 = np.ndarray[Any, np.dtype[np.uint64]]
I64 = np.ndarray[Any, np.dtype[np.int64]]


class EvalSetError(InputError):
    """An evaluation file that cannot be read or indexed; the message names the eval
    set, the file and, where it applies, the line (JSONL, text) or row (Parquet)."""


# --------------------------------------------------------------------------------------
# normalization and hashing


def _as_text(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    array = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        array = pc.cast(array, pa.string())
    return array


def normalize(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """NFKC, lowercase, punctuation deleted (see the module docstring); nulls stay null."""
    out = pc.utf8_normalize(_as_text(texts), form="NFKC")
    out = pc.utf8_lower(out)
    return pc.replace_substring_regex(out, pattern=PUNCTUATION, replacement="")


@dataclass(frozen=True)
class Tokens:
    """The normalized tokens of many texts, flat: text ``i`` is
    ``flat[offsets[i]:offsets[i + 1]]``; a null text has no tokens."""

    flat: pa.Array
    offsets: I64

    @property
    def counts(self) -> I64:
        return np.diff(self.offsets)

    def owner(self) -> I64:
        """The text each token belongs to."""
        return np.repeat(np.arange(len(self.offsets) - 1, dtype=np.int64), self.counts)

    def words(self, start: int, length: int) -> list[str]:
        return [str(w) for w in self.flat.slice(start, length).to_pylist()]


def tokenize(texts: pa.Array | pa.ChunkedArray) -> Tokens:
    """Normalize, then split on Unicode whitespace, dropping empty tokens."""
    lists = pc.utf8_split_whitespace(normalize(texts))
    flat = pc.list_flatten(lists)
    owner = pc.list_parent_indices(lists)
    nonempty = pc.greater(pc.binary_length(flat), 0)
    flat = flat.filter(nonempty)
    owner_np = owner.filter(nonempty).to_numpy().astype(np.int64)
    counts = np.bincount(owner_np, minlength=len(lists)).astype(np.int64)
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return Tokens(flat, offsets)


def token_hashes(flat: pa.Array) -> U64:
    """xxh3-64 of each token's UTF-8 bytes (each distinct token hashed once)."""
    if len(flat) == 0:
        return np.zeros(0, dtype=np.uint64)
    encoded = pc.dictionary_encode(flat)
    distinct = encoded.dictionary.to_pylist()
    hashes = np.fromiter(
        (xxhash.xxh3_64_intdigest(w.encode("utf-8")) for w in distinct),
        dtype=np.uint64,
        count=len(distinct),
    )
    indices: I64 = np.asarray(encoded.indices.to_numpy(), dtype=np.int64)
    return hashes[indices]


def window_hashes(tokens: Tokens, hashes: U64, length: int) -> tuple[I64, U64]:
    """Every window of ``length`` tokens inside one text: its flat start, its hash.

    The hash of tokens with hashes ``t_0 .. t_{k-1}`` is
    ``((k * M + t_0) * M + t_1) * M + ... + t_{k-1}`` mod 2^64, ``M`` =
    :data:`_MULTIPLIER`, so windows of different lengths hash apart.
    """
    total = len(hashes)
    if total < length:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64)
    m = total - length + 1
    acc = np.full(m, length, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(length):
            acc = acc * _MULTIPLIER + hashes[j : j + m]
    owner = tokens.owner()
    inside = owner[:m] == owner[length - 1 :]
    return np.flatnonzero(inside).astype(np.int64), acc[inside]


# --------------------------------------------------------------------------------------
# reading evaluation files


def _decompress(name: str, ref: str, path: str, data: bytes) -> bytes:
    lower = path.lower()
    try:
        if lower.endswith(".gz"):
            return gzip.decompress(data)
        if lower.endswith(".zst"):
            out, rest = [], data
            while rest:
                frame = zstandard.ZstdDecompressor().decompressobj()
                out.append(frame.decompress(rest))
                if not frame.eof:
                    raise zstandard.ZstdError("truncated zstd frame")
                rest = frame.unused_data
            return b"".join(out)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as exc:
        raise EvalSetError(f"eval set {name!r}: {ref}: cannot decompress: {exc}") from None
    return data


def _texts(value: Any, where: str, fieldname: str) -> list[str]:
    """The texts of one field's value: a string, a list of strings (one item each),
    a number or boolean (its JSON text); null gives none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, bool | int | float):
        return [json.dumps(value)]
    if isinstance(value, list | tuple) and all(
        v is None or isinstance(v, str | bool | int | float) for v in value
    ):
        return [t for v in value for t in _texts(v, where, fieldname)]
    raise EvalSetError(
        f"{where}: field {fieldname!r} is {type(value).__name__} holding more than text; "
        "give fields whose values are texts (or lists of texts)"
    )


def _lines(name: str, ref: str, data: bytes) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of every line that is not blank."""
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        try:
            line = raw.rstrip(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise EvalSetError(
                f"eval set {name!r}: {ref} line {number}: invalid UTF-8 at byte {exc.start}"
            ) from None
        if line.strip():
            yield number, line


def _checked(texts: list[str], where: str) -> list[str]:
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise EvalSetError(f"{where}: a \\u escape encodes a lone UTF-16 surrogate") from None
    return texts


def _jsonl_items(name: str, ref: str, data: bytes, fields: Sequence[str]) -> list[str]:
    items: list[str] = []
    for number, line in _lines(name, ref, data):
        where = f"eval set {name!r}: {ref} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise EvalSetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for f in fields:
            if f not in obj:
                raise EvalSetError(f"{where}: no {f!r} field (fields: {', '.join(obj)})")
            texts = _texts(obj[f], where, f)
            items.extend(_checked(texts, where) if "\\u" in line else texts)
    return items


def _parquet_items(name: str, ref: str, path: str, fields: Sequence[str]) -> list[str]:
    try:
        schema = pq.read_schema(path)
        missing = [f for f in fields if f not in schema.names]
        if missing:
            raise EvalSetError(
                f"eval set {name!r}: {ref}: no column {missing[0]!r} "
                f"(columns: {', '.join(schema.names)})"
            )
        table = pq.read_table(path, columns=list(fields))
    except (pa.ArrowInvalid, OSError) as exc:
        raise EvalSetError(
            f"eval set {name!r}: {ref}: not a readable Parquet file: {exc}"
        ) from None
    items: list[str] = []
    columns = [table.column(f).to_pylist() for f in fields]
    for row in range(table.num_rows):
        for f, values in zip(fields, columns, strict=True):
            items.extend(_texts(values[row], f"eval set {name!r}: {ref} row {row}", f))
    return items


def read_items(name: str, ref: str, path: str, fmt: EvalFormat, fields: Sequence[str]) -> list[str]:
    """The texts of one evaluation file, in file order: for JSONL and Parquet every
    listed field of every record (a list value gives one item per element, a null
    none), for ``txt`` every line that is not blank.  ``ref`` (as the user wrote it)
    names the file in errors (with the 1-based line, or the 0-based Parquet row),
    ``path`` is the local file."""
    if os.path.isdir(path):
        raise EvalSetError(f"eval set {name!r}: {ref} is a folder; give one {fmt} file")
    if fmt == "parquet":
        return _parquet_items(name, ref, path, fields)
    try:
        with open(path, "rb") as handle:
            data = _decompress(name, ref, path, handle.read())
    except OSError as exc:
        raise EvalSetError(f"eval set {name!r}: {ref}: cannot read: {exc}") from None
    if fmt == "jsonl":
        return _jsonl_items(name, ref, data, fields)
    return [line for _, line in _lines(name, ref, data)]


# --------------------------------------------------------------------------------------
# the index


@dataclass(frozen=True)
class SetStats:
    """What one evaluation set put into the index."""

    items: int
    #: Items of ``n`` tokens or more (indexed by their n-grams).
    long: int
    #: Items of ``min_tokens`` to ``n - 1`` tokens (indexed whole).
    whole: int
    #: Items under ``min_tokens`` tokens (not indexed).
    skipped: int


@dataclass(frozen=True)
class Match:
    """The first verified match of a text: the eval set (index into the names) and
    the normalized matching sequence."""

    eval_set: int
    text: str


@dataclass
class EvalIndex:
    """Sorted 64-bit sequence hashes of every evaluation item, with their origin.

    Entries with equal hashes are ordered by item (items are numbered in the order
    of the eval sets, then of the files), so the first verified entry of a hash
    names the first eval set, in config order, that holds the sequence.
    """

    names: tuple[str, ...]
    ngram: int
    min_tokens: int
    tokens: Tokens
    hashes: U64
    #: For each entry: where its tokens start in ``tokens.flat``, how many, which set.
    starts: I64
    lengths: I64
    sets: np.ndarray[Any, np.dtype[np.int32]]
    stats: dict[str, SetStats] = field(default_factory=dict)
    #: Whether any entry's hash has these top bits: most windows of a clean text are
    #: rejected by one lookup here instead of a binary search over ``hashes``.
    prefilter: np.ndarray[Any, np.dtype[np.bool_]] = field(init=False, repr=False)
    _shift: np.uint64 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bits = int(min(24, max(10, np.ceil(np.log2(max(len(self.hashes), 1))) + 3)))
        self._shift = np.uint64(64 - bits)
        self.prefilter = np.zeros(1 << bits, dtype=bool)
        self.prefilter[self.hashes >> self._shift] = True

    @classmethod
    def build(cls, sets: Sequence[tuple[str, list[str]]], ngram: int, min_tokens: int) -> EvalIndex:
        names = tuple(name for name, _ in sets)
        item_set = np.repeat(
            np.arange(len(sets), dtype=np.int32), [len(items) for _, items in sets]
        )
        tokens = tokenize(pa.array([t for _, items in sets for t in items], pa.string()))
        hashes = token_hashes(tokens.flat)
        counts = tokens.counts
        item_starts = tokens.offsets[:-1]
        parts_h, parts_s, parts_k = [], [], []
        starts, h = window_hashes(tokens, hashes, ngram)
        parts_h.append(h)
        parts_s.append(starts)
        parts_k.append(np.full(len(starts), ngram, dtype=np.int64))
        short = (counts >= min_tokens) & (counts < ngram)
        for k in np.unique(counts[short]).tolist():
            starts, h = window_hashes(tokens, hashes, k)
            whole = np.isin(starts, item_starts[short & (counts == k)])
            parts_h.append(h[whole])
            parts_s.append(starts[whole])
            parts_k.append(np.full(int(whole.sum()), k, dtype=np.int64))
        all_h = np.concatenate(parts_h)
        all_s = np.concatenate(parts_s)
        all_k = np.concatenate(parts_k)
        order = np.lexsort((all_s, all_h))  # by hash, then by position (item order)
        owner = tokens.owner()
        stats = {}
        for i, name in enumerate(names):
            mine = counts[item_set == i]
            stats[name] = SetStats(
                items=len(mine),
                long=int((mine >= ngram).sum()),
                whole=int(((mine >= min_tokens) & (mine < ngram)).sum()),
                skipped=int((mine < min_tokens).sum()),
            )
        return cls(
            names,
            ngram,
            min_tokens,
            tokens,
            all_h[order],
            all_s[order],
            all_k[order],
            item_set[owner[all_s[order]]],
            stats,
        )

    @property
    def window_lengths(self) -> list[int]:
        """Sequence lengths present in the index, longest first."""
        return sorted(set(np.unique(self.lengths).tolist()), reverse=True)

    def _lookup(self, h: U64) -> tuple[I64, I64]:
        """Which of ``h`` are in the index (their indices), and the first position of
        each in ``hashes``."""
        maybe = np.flatnonzero(self.prefilter[h >> self._shift])
        wanted = h[maybe]
        pos = np.searchsorted(self.hashes, wanted)
        inside = pos < len(self.hashes)
        inside[inside] = self.hashes[pos[inside]] == wanted[inside]
        return maybe[inside].astype(np.int64), pos[inside].astype(np.int64)

    def _verify(self, position: int, words: list[str]) -> int | None:
        """The eval set of the first entry from ``position`` on with the same hash whose
        tokens equal ``words``; None when every such entry is a hash collision."""
        h = self.hashes[position]
        while position < len(self.hashes) and self.hashes[position] == h:
            length = int(self.lengths[position])
            if length == len(words):
                start = int(self.starts[position])
                if self.tokens.words(start, length) == words:
                    return int(self.sets[position])
            position += 1
        return None

    def match(self, texts: pa.Array | pa.ChunkedArray) -> list[Match | None]:
        """For each text, its first verified match: the earliest start in the text,
        the longer sequence at equal starts; None for a clean text."""
        tokens = tokenize(texts)
        found: list[tuple[int, int, Match] | None] = [None] * (len(tokens.offsets) - 1)
        if len(self.hashes) == 0:
            return [None] * len(found)
        hashes = token_hashes(tokens.flat)
        owner = tokens.owner()
        for k in self.window_lengths:
            starts, h = window_hashes(tokens, hashes, k)
            hit, pos = self._lookup(h)
            for start, p in zip(starts[hit].tolist(), pos.tolist(), strict=True):
                row = int(owner[start])
                rel = start - int(tokens.offsets[row])
                best = found[row]
                if best is not None and (best[0], best[1]) <= (rel, -k):
                    continue
                words = tokens.words(start, k)
                eval_set = self._verify(p, words)
                if eval_set is not None:
                    found[row] = (rel, -k, Match(eval_set, " ".join(words)))
        return [f[2] if f is not None else None for f in found]
