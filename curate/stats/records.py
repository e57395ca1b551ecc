"""Per-file statistics records: fixed-bin histograms, column, table and rejects
records, and their exact merge.

Each stats file holds a *record* (see :func:`table_record`): row counts, text lengths,
tokens, a histogram of every numeric column, languages, mixture components,
duplicate cluster sizes and, for rejects, drop reasons with the dropped rows'
scores per reason.  Every field merges exactly: counts add, ``min``/``max``
take the min and max, histograms add bin by bin.  So the totals of any set of
shards are the merge of their records, with no second pass over the data, and
``merge(records of the shards) == record(all their rows)``.

Histograms need no range given beforehand: a value's bin is the value
truncated toward zero to two significant digits (``1234 -> 1200``,
``-0.0456 -> -0.045``, integers below 100 exactly), so every shard bins alike
and bins are stored sparsely as ``[lower edge, count]`` pairs; quantiles read
from them (:func:`quantile`, :func:`mean`) are good to two significant digits.
Polars' or Ray Data's aggregations were not used: their histograms need the bins
up front (a first pass for the range) and their approximate quantiles are sketches
that do not merge to the same bytes in every order; these files must be
byte-identical across runs (:func:`dumps`).
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.stage import reason_category

#: Values below this magnitude fall in the zero bin (10 ** -300 still has a decade below).
TINY = 1e-300
Record = dict[str, Any]
Array = np.ndarray[Any, Any]


# --- histograms with fixed, data-independent bins ------------------------------------


def bin_edges(values: Array) -> Array:
    """Each finite value's bin: the value truncated toward zero to two significant
    digits, as a float that parses back from its decimal text (``12e-3`` -> 0.012);
    magnitudes below :data:`TINY` fall in the zero bin."""
    v = np.asarray(values, dtype=np.float64)
    if not len(v):
        return v
    a = np.abs(v)
    live = a >= TINY
    exp = np.zeros(len(a), np.int64)
    exp[live] = np.floor(np.log10(a[live])).astype(np.int64)
    mant = np.zeros(len(a), np.int64)
    for _ in range(3):  # log10 and the division may be one ulp off at a decade's edge
        mant[live] = np.floor(a[live] / 10.0 ** (exp[live] - 1) * (1 + 1e-12)).astype(np.int64)
        step = (mant >= 100).astype(np.int64) - ((mant < 10) & live).astype(np.int64)
        if not step.any():
            break
        exp += step
    signed = np.where(v < 0, -mant, mant)
    keys, inverse = np.unique(signed * 2048 + (exp + 1024), return_inverse=True)
    exps = np.mod(keys, 2048) - 1024
    mants = (keys - (exps + 1024)) // 2048
    edges = np.array(
        [float(f"{m}e{e - 1}") for m, e in zip(mants.tolist(), exps.tolist(), strict=True)]
    )
    return edges[inverse.reshape(-1)]


def histogram(values: Array) -> list[list[Any]]:
    """Sparse histogram ``[[edge, count], ...]`` of finite values, sorted by edge."""
    if not len(values):
        return []
    edges, counts = np.unique(bin_edges(values), return_counts=True)
    return [[_num(e), int(c)] for e, c in zip(edges.tolist(), counts.tolist(), strict=True)]


def bin_width(edge: float) -> float:
    """Width of the bin whose lower edge (toward zero) is ``edge``."""
    if edge == 0:
        return 0.0
    return float(10.0 ** (math.floor(math.log10(abs(edge)) + 1e-9) - 1))


def _num(x: float) -> float | int:
    """Whole edges as ints (``1200`` not ``1200.0``): shorter JSON, same value."""
    return int(x) if x.is_integer() and abs(x) < 2**53 else x


# --- records -------------------------------------------------------------------------


def column_stats(column: pa.Array | pa.ChunkedArray) -> Record:
    """Count, nulls, min, max (finite values), exact sum (integer columns) and
    histogram of a numeric column; NaN and infinities are counted in ``nonfinite``."""
    values = pc.drop_null(column)
    out: Record = {"count": 0, "nulls": column.null_count}
    if pa.types.is_integer(column.type):
        ints = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64)
        finite = ints.astype(np.float64)
        if len(ints):
            out |= {"min": int(ints.min()), "max": int(ints.max()), "sum": int(ints.sum())}
    else:
        raw = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)
        finite = raw[np.isfinite(raw)]
        nonfinite = {
            "nan": int(np.isnan(raw).sum()),
            "inf": int(np.isposinf(raw).sum()),
            "-inf": int(np.isneginf(raw).sum()),
        }
        if any(nonfinite.values()):
            out["nonfinite"] = {k: n for k, n in nonfinite.items() if n}
        if len(finite):
            out |= {"min": float(finite.min()), "max": float(finite.max())}
    out["count"] = len(finite)
    out["hist"] = histogram(finite)
    return out


def _counts(column: pa.Array | pa.ChunkedArray) -> dict[str, int]:
    """Value counts of a string column; nulls count as ``(null)``."""
    counted = pc.value_counts(pc.fill_null(pc.cast(column, pa.string()), "(null)"))
    return {str(v["values"]): int(v["counts"]) for v in counted.to_pylist()}


def _text_record(text: pa.Array | pa.ChunkedArray) -> Record:
    # The text_stats stage's kernel, so that ``words`` agrees with its ``n_words``
    # (the top-level stages/ folder is installed as curate.stages: mypy sees no module).
    kernel = importlib.import_module("curate.stages.text_stats").text_stats
    present = pc.drop_null(text)
    measured = kernel(present)
    return {
        "rows": len(present),
        "chars": column_stats(measured["n_chars"]),
        "words": column_stats(measured["n_words"]),
    }


def _is_numeric(kind: pa.DataType) -> bool:
    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def _is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))


def table_record(table: pa.Table) -> Record:
    """The record of rows of an output: ``rows``; ``text`` (``rows`` with a text,
    ``chars`` and ``words`` as column stats); ``columns`` (every numeric column);
    ``tokens`` (sum of ``n_tokens``), ``languages`` (``lang`` counts),
    ``cluster_sizes`` (``[[size, rows], ...]``), ``mixture`` (rows and tokens per
    ``mix_component``): each only when its column is there."""
    schema = table.schema
    record: Record = {"rows": table.num_rows}
    if "text" in schema.names and _is_text(schema.field("text").type):
        record["text"] = _text_record(table.column("text"))
    numeric = [f.name for f in schema if _is_numeric(f.type)]
    record["columns"] = {c: column_stats(table.column(c)) for c in numeric}
    if "n_tokens" in numeric:
        record["tokens"] = int(pc.sum(table.column("n_tokens")).as_py() or 0)
    if "lang" in schema.names:
        record["languages"] = _counts(table.column("lang"))
    if "cluster_size" in numeric:
        sizes = pc.value_counts(pc.drop_null(table.column("cluster_size"))).to_pylist()
        record["cluster_sizes"] = sorted([int(s["values"]), int(s["counts"])] for s in sizes)
    if "mix_component" in schema.names:
        record["mixture"] = _mixture(table)
    return record


def _mixture(table: pa.Table) -> Record:
    comp = pc.fill_null(pc.cast(table.column("mix_component"), pa.string()), "(null)")
    names = np.asarray(comp.to_numpy(zero_copy_only=False), dtype=object)
    tokens = None
    if "n_tokens" in table.column_names:
        raw = pc.fill_null(table.column("n_tokens"), 0).to_numpy(zero_copy_only=False)
        tokens = np.asarray(raw, dtype=np.int64)
    out: Record = {}
    for name in sorted(set(names.tolist())):
        mask = names == name
        entry: Record = {"rows": int(mask.sum())}
        if tokens is not None:
            entry["tokens"] = int(tokens[mask].sum())
        out[str(name)] = entry
    return out


def rejects_record(table: pa.Table, full: bool) -> Record:
    """The record of rejects rows (columns ``reason``, ``scores``): ``rows`` and per
    reason category its ``rows``, the dropped rows' ``scores`` (column stats per
    score name) and, when ``full`` (the stage's reasons are a fixed set of rules),
    the count of every full reason.  Full reasons of other stages name records or
    lines (``exact_duplicate:<id>``) and stay in the rejects files."""
    reason = pc.cast(table.column("reason"), pa.string())
    cat = pc.list_element(pc.split_pattern(reason, ":", max_splits=1), 0)
    codes = pc.dictionary_encode(cat).combine_chunks()
    names = [str(x) for x in codes.dictionary.to_pylist()]
    row_cat = np.asarray(codes.indices.to_numpy(zero_copy_only=False), np.int64)
    counts = np.bincount(row_cat, minlength=len(names))
    by_cat: Record = {n: {"rows": int(counts[i])} for i, n in enumerate(names)}
    if full:
        for r, n in _counts(reason).items():
            by_cat[reason_category(r)].setdefault("full", {})[r] = n
    if "scores" in table.column_names:
        for (i, key), values in _scores_by(table.column("scores"), row_cat).items():
            by_cat[names[i]].setdefault("scores", {})[key] = column_stats(pa.array(values))
    return {"rows": table.num_rows, "reasons": by_cat}


def _scores_by(scores: pa.ChunkedArray, row_group: Array) -> dict[tuple[int, str], Array]:
    """The values of a ``map<string, float64>`` column per (row group, key)."""
    arr = scores.combine_chunks() if isinstance(scores, pa.ChunkedArray) else scores
    arr = pa.ListArray.from_arrays(arr.offsets, arr.values)  # list kernels take no maps
    flat = pc.list_flatten(arr)
    if not len(flat):
        return {}
    parents = np.asarray(pc.list_parent_indices(arr).to_numpy(), np.int64)
    keys = pc.dictionary_encode(flat.field("key"))
    key_names = [str(k) for k in keys.dictionary.to_pylist()]
    key_idx = np.asarray(keys.indices.to_numpy(zero_copy_only=False), np.int64)
    values = np.asarray(flat.field("value").to_numpy(zero_copy_only=False), np.float64)
    combined = row_group[parents] * len(key_names) + key_idx
    order = np.argsort(combined, kind="stable")
    groups, starts = np.unique(combined[order], return_index=True)
    bounds = [*starts.tolist(), len(order)]
    out = {}
    for g, lo, hi in zip(groups.tolist(), bounds[:-1], bounds[1:], strict=True):
        out[g // len(key_names), key_names[g % len(key_names)]] = values[order[lo:hi]]
    return out


def merge(a: Any, b: Any, key: str = "") -> Any:
    """Merge two records (or parts of records): counts add, ``min``/``max`` keep the
    extreme, sparse ``[[key, count], ...]`` lists add per key, dicts merge per key."""
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, dict):
        return {k: merge(a.get(k), b.get(k), k) for k in sorted(a.keys() | b.keys())}
    if isinstance(a, list):
        counts: dict[Any, int] = {}
        for k, n in [*a, *b]:
            counts[k] = counts.get(k, 0) + n
        return [[k, counts[k]] for k in sorted(counts)]
    if key == "min":
        return min(a, b)
    if key == "max":
        return max(a, b)
    return a + b


def merge_all(records: Sequence[Record]) -> Record:
    out: Record = {}
    for r in records:
        out = merge(out, r)
    return out


def dumps(data: Any) -> bytes:
    """Compact JSON with sorted keys: the same stats give the same bytes."""
    return (
        json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    ).encode()


# --- reading a column's values back --------------------------------------------------


def integral(col: Mapping[str, Any]) -> bool:
    """Whether a column holds whole numbers only (its small bins are exact)."""
    if isinstance(col.get("min"), int):
        return True
    ends = [col.get("min", 0.5), col.get("max", 0.5)]
    small = [e for e, _ in col.get("hist", []) if abs(e) < 100]
    return all(float(x).is_integer() for x in [*ends, *small])


def quantile(col: Mapping[str, Any], q: float) -> float | None:
    """The ``q`` quantile of a column's values to within its bin (two significant
    digits): the middle of the bin holding it (kept within min and max), exact for
    whole numbers below 100."""
    hist = col.get("hist") or []
    total = sum(n for _, n in hist)
    if not total:
        return None
    rank, seen, whole = q * (total - 1), 0, integral(col)
    found = hist[-1][0]
    for edge, n in hist:
        seen += n
        if seen > rank:
            found = edge
            break
    return _clamp(_center(found, whole), col)


def _clamp(x: float, col: Mapping[str, Any]) -> float:
    return float(min(max(x, col.get("min", x)), col.get("max", x)))


def _center(edge: float, whole: bool) -> float:
    width = bin_width(edge)
    if whole and width <= 1:
        return float(edge)
    return float(edge) + math.copysign(width / 2, edge) if edge else 0.0


def mean(col: Mapping[str, Any]) -> float | None:
    """Exact for integer columns (from ``sum``), else from the histogram's bin middles."""
    count = int(col.get("count") or 0)
    if not count:
        return None
    if "sum" in col:
        return float(col["sum"]) / count
    whole = integral(col)
    return _clamp(float(sum(_center(e, whole) * n for e, n in col["hist"])) / count, col)
