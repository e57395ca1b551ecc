"""Threshold rules: the first rule a row fails names its drop reason.

Filters that measure first and decide after (``length_filter``, the heuristic
quality filters) describe their thresholds as :class:`Rule` rows over a matrix
of measurements; :func:`decide` applies them in order.  A threshold of ``None``
switches its rule off, and a NaN measurement fails no rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

Array = np.ndarray[Any, Any]
Op = Literal["<", ">", "<=", ">="]

_OPS: dict[str, Callable[[Array, float], Array]] = {
    "<": np.less,
    ">": np.greater,
    "<=": np.less_equal,
    ">=": np.greater_equal,
}


@dataclass(frozen=True)
class Rule:
    """Drop a row when ``stats[column] <op> threshold``; the reason is ``name``."""

    name: str
    column: int
    op: Op
    threshold: float | None


def decide(
    stats: Array, rules: Sequence[Rule], prefix: str = ""
) -> tuple[Array, pa.Array, pa.Array]:
    """(keep, reason, value): the first failing rule of each row names its reason,
    ``prefix:name`` (or ``name`` without a prefix); the value is the measurement."""
    n = stats.shape[0]
    reason = np.full(n, None, dtype=object)
    value = np.full(n, None, dtype=object)
    open_ = np.ones(n, dtype=bool)
    for rule in rules:
        if rule.threshold is None:
            continue
        column = stats[:, rule.column]
        with np.errstate(invalid="ignore"):
            hit = _OPS[rule.op](column, rule.threshold) & open_
        if hit.any():
            reason[hit] = f"{prefix}:{rule.name}" if prefix else rule.name
            value[hit] = [format_value(v) for v in column[hit]]
            open_ &= ~hit
    return open_, pa.array(reason, pa.string()), pa.array(value, pa.string())


def format_value(v: float) -> str:
    """A measured value as the rejects show it: integers bare, ratios to 6 digits."""
    if np.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return f"{v:.6g}"
