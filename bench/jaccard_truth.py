"""Ground truth for near-duplicate quality: every pair of documents whose word n-gram
sets have Jaccard similarity >= t, exactly.

Shingles are those of curate's FineWeb preset (normalized text, word 5-grams,
64-bit hashes), so the truth is about the same sets every tool is given.

All pairs are found with the prefix filter of Bayardo et al. ("Scaling up all
pairs similarity search", WWW 2007), which is exact: order shingles from rarest
to most common; two sets with Jaccard >= t share at least one of the first
``|A| - ceil(t |A|) + 1`` shingles of each.  Every candidate is then checked by
an exact set intersection.  ``--check`` compares it with a brute-force pass over
every pair of a sample.

    python bench/jaccard_truth.py --check 3000
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from typing import Any

import numpy as np
import pyarrow as pa

from curate.dedup.minhash import SignatureSpec, char_tokens, normalize, shingles, word_tokens

Array = np.ndarray[Any, Any]


def shingle_sets(texts: list[str], spec: SignatureSpec) -> list[Array]:
    """Sorted distinct shingle hashes of every document."""
    out: list[Array] = []
    step = 4096
    for lo in range(0, len(texts), step):
        norm = normalize(pa.array(texts[lo : lo + step], pa.string()), spec.normalization())
        toks = word_tokens(norm) if spec.shingle == "word" else char_tokens(norm)
        sh = shingles(toks, spec.ngram)
        bounds = np.searchsorted(sh.doc, np.arange(len(norm) + 1))
        out.extend(np.unique(sh.values[bounds[i] : bounds[i + 1]]) for i in range(len(norm)))
    return out


def true_pairs(sets: list[Array], t: float) -> dict[tuple[int, int], float]:
    """``{(i, j): jaccard}`` for every ``i < j`` with Jaccard >= ``t`` (non-empty sets)."""
    docs = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(sets)])
    vals = np.concatenate(sets) if sets else np.zeros(0, dtype=np.uint64)
    uniq, inverse, freq = np.unique(vals, return_inverse=True, return_counts=True)
    # Rank of every shingle: rarest first, ties by value.
    order = np.lexsort((uniq, freq))
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(len(uniq))
    r = rank[inverse]
    # Each document's prefix: its p rarest shingles.
    by = np.lexsort((r, docs))
    docs_s, r_s = docs[by], r[by]
    sizes = np.array([len(s) for s in sets], dtype=np.int64)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    prefix = sizes - np.ceil(t * sizes - 1e-9).astype(np.int64) + 1
    pos = np.arange(len(docs_s)) - np.repeat(starts, sizes)
    in_prefix = pos < np.repeat(prefix, sizes)
    pd, pr = docs_s[in_prefix], r_s[in_prefix]
    g = np.lexsort((pd, pr))
    pd, pr = pd[g], pr[g]
    bounds = np.flatnonzero(np.r_[True, pr[1:] != pr[:-1], True])
    cand: set[tuple[int, int]] = set()
    for a, b in itertools.pairwise(bounds):
        members = pd[a:b]
        if len(members) < 2:
            continue
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                i, j = int(members[x]), int(members[y])
                cand.add((i, j) if i < j else (j, i))
    out = {}
    for i, j in cand:
        small, big = sorted((sizes[i], sizes[j]))
        if small < t * big - 1e-9:
            continue
        inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
        sim = inter / (sizes[i] + sizes[j] - inter)
        if sim >= t:
            out[(i, j)] = sim
    return out


def brute_force(sets: list[Array], t: float) -> dict[tuple[int, int], float]:
    out = {}
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            if not len(sets[i]) or not len(sets[j]):
                continue
            inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
            sim = inter / (len(sets[i]) + len(sets[j]) - inter)
            if sim >= t:
                out[(i, j)] = sim
    return out


def main() -> None:
    import debian

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--check", type=int, default=0, help="brute-force this many docs too")
    args = parser.parse_args()
    texts = [d["text"] for d in debian.load()]
    spec = SignatureSpec()
    t0 = time.perf_counter()
    sets = shingle_sets(texts, spec)
    pairs = true_pairs(sets, args.threshold)
    took = time.perf_counter() - t0
    print(f"{len(texts)} docs: {len(pairs)} pairs with Jaccard >= {args.threshold} ({took:.1f} s)")
    if args.check:
        sample = sets[: args.check]
        fast = true_pairs(sample, args.threshold)
        slow = brute_force(sample, args.threshold)
        assert fast.keys() == slow.keys(), (len(fast), len(slow))
        assert all(math.isclose(fast[k], slow[k]) for k in fast)
        print(f"brute force over {args.check} docs agrees: {len(slow)} pairs")


if __name__ == "__main__":
    main()
