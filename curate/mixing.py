"""The arithmetic of a weighted mixture under a budget (the ``mix`` stage's plan).

Each component has what is available (rows, tokens), a weight and a cap on
repetition (epochs).  Its *goal* is its weight's share of the budget, in the
measure the weights are given in (tokens or rows).  A goal is met by whole
epochs of the component plus a seeded sample for the rest: every row gets
``epochs`` copies, and the rows whose seeded hash comes first, up to the rest of
the goal, one more.  A goal beyond ``max_epochs`` times what is available is
capped, and the manifest says so.

The sample is the prefix of the component's rows in the order of a hash of
(seed, component, id), weighted by the measure, cut where its running total is
closest to the rest (the row that crosses the goal is taken when that lands
closer).  :func:`weighted_cut` finds that cut without sorting the component in
one place: a histogram of the hash's top 16 bits, summed over blocks, finds the
bin where the goal is crossed, and only that bin's rows are sorted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
#: Bits of the row hash that index the histogram of :func:`weighted_cut`.
BIN_BITS = 16
NBINS = 1 << BIN_BITS


@dataclass(frozen=True)
class Available:
    """What a component has."""

    rows: int
    tokens: int

    def measure(self, unit: str) -> int:
        return self.tokens if unit == "tokens" else self.rows


@dataclass
class Goal:
    """What a component is asked for, and how it is met."""

    weight: float
    max_epochs: float
    available: Available
    #: The goal in the sampling measure (tokens or rows).
    goal: float = 0.0
    #: Whole copies every row gets, and the rest sampled by hash order.
    epochs: int = 0
    rest: float = 0.0
    #: Why the goal is not met (None when it is).
    unmet: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def shares(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights normalized to sum to 1 (all zero: all zero)."""
    total = sum(weights.values())
    return {k: (w / total if total > 0 else 0.0) for k, w in weights.items()}


def goals(
    weights: Mapping[str, float],
    max_epochs: Mapping[str, float],
    available: Mapping[str, Available],
    budget: float,
    budget_unit: str,
    weights_unit: str,
) -> tuple[dict[str, Goal], str]:
    """Each component's goal and how it is met; returns the goals and the sampling
    measure (``tokens`` or ``rows``).

    Weights in rows under a token budget: the total number of rows ``R`` is the one
    whose row shares fill the budget at each component's mean document length,
    ``sum_c share_c * R * tokens_c / rows_c = budget``.
    """
    share = shares(weights)
    out = {c: Goal(weights[c], max_epochs[c], available[c]) for c in weights}
    total = float(budget)
    if weights_unit != budget_unit:  # weights in rows, budget in tokens
        per_row = sum(
            share[c] * available[c].tokens / available[c].rows for c in out if available[c].rows
        )
        total = budget / per_row if per_row > 0 else 0.0
    for c, g in out.items():
        g.goal = total * share[c]
    _meet(out, weights_unit)
    return out, weights_unit


def _meet(out: dict[str, Goal], unit: str) -> None:
    for g in out.values():
        have = g.available.measure(unit)
        cap = g.max_epochs * have
        reachable = min(g.goal, cap)
        if have > 0 and reachable > 0:
            g.epochs = math.floor(reachable / have + 1e-12)
            g.rest = max(reachable - g.epochs * have, 0.0)
        if g.goal > cap * (1 + 1e-9) and g.goal > 0:
            g.unmet = _why(g, unit, have)


def _why(g: Goal, unit: str, have: int) -> str:
    if have == 0:
        return f"no {unit} available: the component is empty"
    needed = g.goal / have
    return (
        f"needs {needed:.3f} epochs of its {have:,} {unit} to reach {g.goal:,.0f}; "
        f"capped at max_epochs {g.max_epochs:g}"
    )


def bins_of(hashes: Array) -> Array:
    """Histogram bin of each row hash (its top bits)."""
    return (np.asarray(hashes, np.uint64) >> np.uint64(64 - BIN_BITS)).astype(np.int64)


def crossing_bin(histogram: Array, rest: float) -> tuple[int, float]:
    """The bin in which the running total of ``histogram`` reaches ``rest``, and the
    total of the bins before it (``(-1, 0)`` when nothing is to be sampled)."""
    if rest <= 0:
        return -1, 0.0
    cumulative = np.cumsum(histogram)
    b = int(np.searchsorted(cumulative, rest, side="left"))
    b = min(b, len(histogram) - 1)
    return b, float(cumulative[b] - histogram[b])


def weighted_cut(
    hashes: Array, ids: list[str], weights: Array, before: float, rest: float
) -> tuple[int, str] | None:
    """The last (hash, id) of the sampled prefix among the crossing bin's rows: rows in
    (hash, id) order are taken while the running total (from ``before``) gets closer
    to ``rest``.  None: no row of this bin is taken."""
    order = sorted(range(len(ids)), key=lambda i: (int(hashes[i]), ids[i]))
    total = before
    last: tuple[int, str] | None = None
    for i in order:
        after = total + float(weights[i])
        if after > rest and abs(after - rest) > abs(total - rest):
            break
        total = after
        last = (int(hashes[i]), ids[i])
        if total >= rest:
            break
    return last


def in_prefix(
    hashes: Array, ids: Sequence[str] | Array, bins: Array, cut_bin: int,
    cut: tuple[int, str] | None,
) -> Array:  # fmt: skip
    """Whether each row is in the sampled prefix: a bin before the crossing one, or in
    it at or before the cut."""
    inside = bins < cut_bin
    if cut is not None:
        same = np.flatnonzero(bins == cut_bin)
        for i in same.tolist():
            inside[i] = (int(hashes[i]), str(ids[i])) <= cut
    return np.asarray(inside, bool)
