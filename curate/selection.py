"""Budgeted selection of a pool: mmSSR's style-balanced round robin and baselines.

:func:`mmssr_select` reproduces ``llava/select/mmssr.py`` of
``lyumengyao/mmssr`` (3a7e662; SPECS §1.3), vectorized:

1. ``n = int(|pool| * ratio)`` (or a row count).
2. Each sample's bins are its styles suffixed with ``+<image_source>``.
3. Until ``n`` samples are chosen: ``per_cap = max((n - chosen) // |caps|, 1)``;
   for each capability in turn, ``per_cap = min(per_cap, n - chosen)``, the
   remaining candidates with ``score > threshold`` are sorted by that score,
   descending, and one style-balanced round (below) picks up to ``per_cap`` of
   them; a capability whose round picks nothing leaves the loop.
4. A round: the sorted candidates are "melted" into (bin, sample) entries, all
   first styles in score order, then all second styles, and so on (pandas'
   ``melt`` over ``sty_1, sty_2, …``); entries are grouped by bin keeping that
   order; bins are walked from the smallest to the largest, each with a quota
   ``q = max(per_cap // n_bins, 1)`` plus the debt (unused quota) of the
   smaller bins before it, taking the first samples of the bin not already
   taken in this round, until the round has ``per_cap``.

Where the original depends on chance we fix an order, and say so:

* Ties in score keep pool order (``ties: pool``), which is what a stable sort
  gives; the original's ``sort_values`` uses quicksort, whose tie order is
  numpy's business (insertion sort below 17 elements, introsort or SIMD sort
  above).  ``ties: seeded`` orders ties by a seeded hash of the id instead.
* Bins of equal size are walked in key order (pandas' ``groupby`` sorts keys,
  a stable sort by size keeps that).
* After a capability drops out the original continues with
  ``list(set(caps) - set(dropped))``, whose order depends on Python's string
  hash seed; we keep the given order minus the dropped ones.
* The original asserts when a capability has no candidate left above the
  threshold, and loops forever once every capability dropped out; we drop the
  capability, and stop with fewer than ``n`` samples (reported as unmet).

The baselines of the paper's table that need no extra model: :func:`random_select`
(a seeded hash of the id, so the choice never depends on sharding) and
:func:`top_k` by any score column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]


@dataclass
class Selection:
    """Which samples were chosen (pool indices, in selection order), and why."""

    chosen: list[int] = field(default_factory=list)
    #: Per chosen sample: the capability whose round took it, the round (1-based)
    #: and the bin it was taken from.
    capability: dict[int, str] = field(default_factory=dict)
    round: dict[int, int] = field(default_factory=dict)
    bin: dict[int, str] = field(default_factory=dict)
    rounds: int = 0
    #: Capabilities that ran out of candidates, in the order they did.
    exhausted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Bins:
    """Each sample's bins as flat (sample, position, bin code) entries; codes are
    ranks of the bin keys in sorted order."""

    keys: list[str]
    sample: Array
    position: Array
    code: Array

    @classmethod
    def of(cls, bins: Sequence[Sequence[str]]) -> Bins:
        keys = sorted({b for row in bins for b in row})
        index = {k: i for i, k in enumerate(keys)}
        sample, position, code = [], [], []
        for i, row in enumerate(bins):
            seen: set[str] = set()
            p = 0
            for b in row:
                if b in seen:
                    continue
                seen.add(b)
                sample.append(i)
                position.append(p)
                code.append(index[b])
                p += 1
        as_int = np.asarray
        return cls(
            keys,
            as_int(sample, np.int64),
            as_int(position, np.int64),
            as_int(code, np.int64),
        )


def style_bins(
    styles: Sequence[Sequence[str] | None], sources: Sequence[str | None]
) -> list[list[str]]:
    """mmSSR's bins: each style suffixed with ``+<image_source>`` (``parse_sty``)."""
    out = []
    for row, source in zip(styles, sources, strict=True):
        out.append([f"{s}+{source if source is not None else ''}" for s in row or ()])
    return out


def tie_order(ids: Sequence[str], seed: int) -> Array:
    """A seeded rank of every sample (ties in a sort are broken by it)."""
    keys = np.array(
        [
            int.from_bytes(hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=8).digest(), "big")
            for i in ids
        ],
        dtype=np.uint64,
    )
    order = np.argsort(keys, kind="stable")
    rank = np.empty(len(ids), np.int64)
    rank[order] = np.arange(len(ids))
    return rank


def mmssr_select(
    scores: Mapping[str, Array],
    bins: Bins,
    n_select: int,
    threshold: float = 0.0,
    tie_rank: Array | None = None,
) -> Selection:
    """Choose ``n_select`` pool indices; ``scores``: capability -> float scores in
    pool order (NaN: no score), iterated in the order given."""
    caps = list(scores)
    n = len(next(iter(scores.values()))) if caps else 0
    tie = np.arange(n, dtype=np.int64) if tie_rank is None else np.asarray(tie_rank, np.int64)
    remaining = np.ones(n, dtype=bool)
    taken = np.zeros(n, dtype=bool)
    out = Selection()
    while len(out.chosen) < n_select and caps:
        out.rounds += 1
        per_cap = max((n_select - len(out.chosen)) // len(caps), 1)
        dropped = []
        for cap in caps:
            per_cap = min(per_cap, n_select - len(out.chosen))
            score = np.asarray(scores[cap], np.float64)
            with np.errstate(invalid="ignore"):
                candidate = remaining & (score > threshold)
            new = _round(score, candidate, tie, bins, per_cap, taken)
            if not new:
                dropped.append(cap)
            for i, key in new:
                remaining[i] = False
                out.chosen.append(i)
                out.capability[i] = cap
                out.round[i] = out.rounds
                out.bin[i] = bins.keys[key]
            if len(out.chosen) >= n_select:
                break
        out.exhausted.extend(dropped)
        caps = [c for c in caps if c not in dropped]
    return out


def _round(
    score: Array, candidate: Array, tie: Array, bins: Bins, per_cap: int, taken: Array
) -> list[tuple[int, int]]:
    """One style-balanced round over the candidates: (sample, bin code) taken."""
    live = candidate[bins.sample]
    sample, position, code = bins.sample[live], bins.position[live], bins.code[live]
    if sample.size == 0:
        return []
    # rank of each candidate in the descending score sort (ties by ``tie``)
    rank = np.empty(len(score), np.int64)
    cands = np.flatnonzero(candidate)
    order = cands[np.lexsort((tie[cands], -score[cands]))]
    rank[order] = np.arange(order.size)
    # entries by bin, then melt order: style position, then score rank
    entries = np.lexsort((rank[sample], position, code))
    sample, code = sample[entries], code[entries]
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    stops = np.r_[starts[1:], code.size]
    sizes = stops - starts
    walk = np.lexsort((code[starts], sizes))  # smallest bins first, then by key
    quota = max(per_cap // len(starts), 1)
    debt = 0
    got: list[tuple[int, int]] = []
    for b in walk:
        if len(got) >= per_cap:
            break
        members = sample[starts[b] : stops[b]]
        free = members[~taken[members]]
        take = min(quota + debt, free.size)
        debt = max(quota + debt - free.size, 0)
        for i in free[:take].tolist():
            taken[i] = True
            got.append((i, int(code[starts[b]])))
    for i, _ in got:
        taken[i] = False  # ``taken`` marks this round's picks only
    return got


def random_select(ids: Sequence[str], n_select: int, seed: int) -> list[int]:
    """``n_select`` pool indices chosen uniformly by a seeded hash of the id."""
    rank = tie_order(ids, seed)
    return np.flatnonzero(rank < n_select).tolist()


def top_k(
    score: Array, n_select: int, descending: bool = True, tie_rank: Array | None = None
) -> list[int]:
    """The ``n_select`` best pool indices by ``score`` (NaN never chosen); ties by
    ``tie_rank`` (default pool order)."""
    score = np.asarray(score, np.float64)
    tie = np.arange(score.size) if tie_rank is None else np.asarray(tie_rank)
    valid = np.flatnonzero(~np.isnan(score))
    key = -score[valid] if descending else score[valid]
    order = valid[np.lexsort((tie[valid], key))]
    return sorted(order[:n_select].tolist())
