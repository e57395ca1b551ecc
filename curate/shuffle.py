"""Hash-partitioned shuffles as two waves of plain Ray tasks.

Ray Data's ``groupby`` starts hash-shuffle actors, which costs seconds even on
tiny data; a global stage that only needs "every row with the same partition
number in one task" gets it here from two waves of tasks over object
references: each input block is split into ``n`` pieces (``num_returns=n``),
and task ``p`` of the second wave receives piece ``p`` of every block.
Nothing passes through the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import ray

Array = np.ndarray[Any, Any]


def split(table: pa.Table, part: Array, n: int) -> list[pa.Table]:
    """``table`` cut into ``n`` tables by ``part`` (values in ``[0, n)``), order kept."""
    if n == 1:
        return [table]
    order = np.argsort(part, kind="stable")
    ordered = table.take(pa.array(order)) if len(order) else table
    bounds = np.searchsorted(part[order], np.arange(n + 1))
    return [ordered.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i])) for i in range(n)]


def concat(pieces: Sequence[pa.Table]) -> pa.Table:
    """The pieces' rows in order; an empty piece (perhaps without columns, as Ray Data
    makes them) adds nothing."""
    live = [p for p in pieces if p.num_rows]
    if not live:
        return next((p for p in pieces if p.num_columns), pieces[0]).slice(0, 0)
    return pa.concat_tables(live)


def group_starts(keys: Array) -> Array:
    """Index of the first row of every run of equal values of sorted ``keys``."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])


@ray.remote
def _scatter(block: pa.Table, column: str, n: int) -> Any:
    if block.num_rows == 0:  # possibly schemaless: nothing to place
        pieces = [block] * n
    elif column not in block.column_names:
        raise ValueError(f"rows to shuffle have no column {column!r}")
    else:
        pieces = split(block, block.column(column).to_numpy().astype(np.int64) % n, n)
    return pieces[0] if n == 1 else tuple(pieces)


@ray.remote
def _reduce(fn: Callable[[pa.Table], Any], *pieces: pa.Table) -> Any:
    return fn(concat(pieces))


def hash_shuffle(
    blocks: Sequence[Any], column: str, n: int, fn: Callable[[pa.Table], Any]
) -> list[Any]:
    """Group the rows of ``blocks`` (object refs of tables) by the non-negative integer
    ``column`` modulo ``n`` and apply ``fn`` to each group; refs of the ``n`` results."""
    scattered: list[Any] = [_scatter.options(num_returns=n).remote(b, column, n) for b in blocks]
    parts = [scattered] if n == 1 else [[s[p] for s in scattered] for p in range(n)]
    return [_reduce.remote(fn, *parts[p]) for p in range(n)]
