"""Exact order statistics of a score column over a whole dataset, on Ray.

"Keep the top 10 %" needs the value at a rank among all scores.  Nothing here
collects the scores in one place: a radix selection over the 64-bit keys of
the values runs as waves of Ray tasks over the blocks (object references).

* Each float64 is mapped to a ``uint64`` key that sorts like the float.
* Wave 1: every block returns, per group, a sparse histogram of the top
  16 bits of its keys.  The driver sums them (at most 65,536 bins per group),
  learns each group's count, and finds for each wanted rank the bin that holds
  it and the rank inside that bin.
* Further waves refine the next 16 bits inside that bin, only while the bin
  still holds more than :data:`GATHER` values; then one wave returns the
  values of the bin, which the driver sorts to read the exact value.

The answer is exact (no sketch, no error bound to state), and the driver
holds at most a few histograms and ``GATHER`` values per wanted rank.  Most
columns need two waves.  NaN and null scores are not ranked.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

Array = np.ndarray[Any, Any]
BITS = 16
#: Values a final bin may hold before it is gathered to the driver.
GATHER = 1 << 17
SIGN = np.uint64(1 << 63)


def sort_keys(values: Array) -> Array:
    """uint64 keys that sort like the float64 ``values`` (NaN excluded beforehand)."""
    bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    return np.where(bits & SIGN, ~bits, bits | SIGN)


def _from_key(key: int) -> float:
    k = np.uint64(key)
    bits = k & ~SIGN if k & SIGN else ~k
    return float(np.array([bits], dtype=np.uint64).view(np.float64)[0])


def _group_keys(block: pa.Table, column: str, by: str | None) -> dict[str, Array]:
    """The sort keys of the valid scores of ``block``, per group value."""
    if block.num_rows == 0 or column not in block.column_names:
        return {}  # Ray Data's empty blocks may have no columns at all
    scores = block.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    valid = ~np.isnan(scores)
    if by is None:
        return {"": sort_keys(scores[valid])}
    groups = pc.fill_null(pc.cast(block.column(by), pa.string()), "").to_numpy(zero_copy_only=False)
    out: dict[str, Array] = {}
    for g in np.unique(groups[valid]):
        out[str(g)] = sort_keys(scores[valid & (groups == g)])
    return out


@ray.remote
def _histogram(
    block: pa.Table, column: str, by: str | None, probes: list[tuple[str, int, int]]
) -> dict[tuple[str, int, int], tuple[Array, Array]]:
    """For each probe ``(group, prefix, shift)``: the sparse histogram (bins, counts)
    of the next 16 bits of the keys whose top ``shift`` bits equal ``prefix``; a probe
    with ``shift`` 0 and prefix -1 asks for every group of the block."""
    keys = _group_keys(block, column, by)
    out = {}
    wanted = probes
    if probes and probes[0][1] == -1:
        wanted = [(g, 0, 0) for g in keys]
    for group, prefix, shift in wanted:
        k = keys.get(group)
        if k is None or not len(k):
            continue
        if shift:
            k = k[(k >> np.uint64(64 - shift)) == np.uint64(prefix)]
        digits = (k >> np.uint64(64 - shift - BITS)) & np.uint64((1 << BITS) - 1)
        bins, counts = np.unique(digits, return_counts=True)
        out[group, prefix, shift] = (bins.astype(np.int64), counts.astype(np.int64))
    return out


@ray.remote
def _gather(
    block: pa.Table, column: str, by: str | None, probes: list[tuple[str, int, int]]
) -> dict[tuple[str, int, int], Array]:
    """The keys under each probe's prefix."""
    keys = _group_keys(block, column, by)
    out = {}
    for group, prefix, shift in probes:
        k = keys.get(group)
        if k is None:
            continue
        if shift:
            k = k[(k >> np.uint64(64 - shift)) == np.uint64(prefix)]
        out[group, prefix, shift] = k
    return out


@dataclass
class _Search:
    rank: int  # rank inside the current prefix
    prefix: int = 0
    shift: int = 0
    size: int = 0  # values under the prefix


def _merge_hist(results: Sequence[dict[Any, tuple[Array, Array]]]) -> dict[Any, Array]:
    merged: dict[Any, Array] = {}
    for res in results:
        for probe, (bins, counts) in res.items():
            acc = merged.setdefault(probe, np.zeros(1 << BITS, dtype=np.int64))
            np.add.at(acc, bins, counts)
    return merged


def _descend(search: _Search, hist: Array) -> None:
    cum = np.cumsum(hist)
    b = int(np.searchsorted(cum, search.rank, side="right"))
    before = int(cum[b - 1]) if b else 0
    search.rank -= before
    search.prefix = (search.prefix << BITS) | b
    search.shift += BITS
    search.size = int(hist[b])


def order_statistics(  # noqa: PLR0912 - three phases, kept together for reading
    blocks: Sequence[Any], column: str, by: str | None, quantiles: Sequence[float]
) -> dict[str, dict[str, Any]]:
    """Per group: ``n`` (valid scores) and, for each quantile ``q``, the values at
    0-based ascending ranks ``floor(q*n)`` (``lo``) and ``ceil(q*n)-1`` (``hi``),
    clipped to ``[0, n-1]``.  ``blocks``: object references of Arrow tables."""
    first = _merge_hist(ray.get([_histogram.remote(b, column, by, [("", -1, 0)]) for b in blocks]))
    counts = {probe[0]: int(h.sum()) for probe, h in first.items()}
    searches: dict[tuple[str, int], _Search] = {}
    for group, n in counts.items():
        for r in sorted({r for q in quantiles for r in rank_pair(q, n)}):
            searches[group, r] = _Search(rank=r)
    for (group, _), search in searches.items():
        _descend(search, first[group, 0, 0])
    while True:
        pending = [s for s in searches.values() if s.size > GATHER and s.shift < 64]
        if not pending:
            break
        groups = {(g, s.prefix, s.shift) for (g, _), s in searches.items() if s in pending}
        probes = sorted(groups)
        hists = _merge_hist(ray.get([_histogram.remote(b, column, by, probes) for b in blocks]))
        for (g, _), s in searches.items():
            if s.size > GATHER and s.shift < 64:
                _descend(s, hists[g, s.prefix, s.shift])
    # a search that consumed all 64 bits has found its key: its bin is one value,
    # however many rows share it, and nothing needs to be gathered
    probes = sorted({(g, s.prefix, s.shift) for (g, _), s in searches.items() if s.shift < 64})
    gathered: dict[Any, list[Array]] = defaultdict(list)
    for res in ray.get([_gather.remote(b, column, by, probes) for b in blocks]):
        for probe, keys in res.items():
            gathered[probe].append(keys)
    values: dict[tuple[str, int], float] = {}
    for (g, r), s in searches.items():
        if s.shift == 64:
            values[g, r] = _from_key(s.prefix)
            continue
        keys = np.sort(np.concatenate(gathered[g, s.prefix, s.shift]))
        values[g, r] = _from_key(int(keys[s.rank]))
    out: dict[str, dict[str, Any]] = {}
    for group, n in sorted(counts.items()):
        out[group] = {"n": n}
        for q in quantiles:
            lo, hi = rank_pair(q, n)
            out[group][str(q)] = {"lo": values[group, lo], "hi": values[group, hi]}
    return out


def rank_pair(q: float, n: int) -> tuple[int, int]:
    """0-based ascending ranks ``floor(q*n)`` and ``ceil(q*n) - 1``, inside ``[0, n-1]``
    (``q*n`` rounded to 9 decimals first, so 0.3 * 10 is 3, not 3.0000000000000004)."""
    x = round(q * n, 9)
    return min(max(math.floor(x), 0), n - 1), min(max(math.ceil(x) - 1, 0), n - 1)
