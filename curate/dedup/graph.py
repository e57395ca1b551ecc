"""LSH buckets, candidate pairs, Jaccard verification, connected components and the keep
rule, as waves of Ray tasks over hash partitions.

Every step is a *wave*: ``P`` tasks (one per hash partition), each receiving one
piece from every task of the wave before and returning ``P`` pieces, one for
each task of the wave after (``num_returns``).  No task ever holds more than
its partition: signatures, edges and documents are all split by a hash, so
memory per task is bounded by the partition size, which the caller chooses
from the dataset size.  The driver only sees object references and a few
counters per task.

Nodes are 64-bit hashes of each record's id and provenance, so everything
below (buckets, stars, components, keepers) is a function of the records, not
of how they were cut into blocks or how many CPUs ran them.

Connected components use the alternating large-star / small-star algorithm of
Kiveris et al. ("Connected Components in MapReduce and Beyond", SoCC 2014):
each round links every node to the smallest node of its neighbourhood, and
the fixed point is one star per component centred on its smallest node.  A
round that leaves the edge set unchanged (same count and same 64-bit
fingerprint) ends it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import xxhash

from curate.dedup.minhash import (
    SignatureSpec,
    char_tokens,
    normalize,
    shingles,
    splitmix64,
    word_tokens,
)
from curate.shuffle import concat, group_starts, split
from curate.stage import POS, UNIT

U64 = np.uint64
Array = np.ndarray[Any, Any]
Ref = Any  # ray.ObjectRef

#: Column holding a document's node (uint64) and, in band tables, its band key.
NODE, KEY = "node", "key"
MAX_ROUNDS = 64
#: With verification: buckets up to this size give all their pairs, larger ones
#: a star from each of their ``ANCHORS`` smallest members.
ALL_PAIRS, ANCHORS = 8, 2
#: Candidate pairs whose Jaccard similarity is computed at once.
PAIR_CHUNK = 2048

Keep = Literal["smallest_id", "first", "score", "random"]


@dataclass(frozen=True)
class ClusterSpec:
    """How candidate pairs become clusters and which member each cluster keeps."""

    partitions: int
    #: Exact Jaccard threshold for candidate pairs; None keeps every LSH pair.
    threshold: float | None
    keep: Keep = "smallest_id"
    score_column: str | None = None
    seed: int = 0
    sign: SignatureSpec = field(default_factory=SignatureSpec)
    reason: str = "near_duplicate"


# ----------------------------------------------------------------------------- helpers


def node_ids(table: pa.Table) -> Array:
    """64-bit node of every record: xxh3 of its id, source and provenance."""
    ids = table.column("id").to_pylist()
    sources = table.column("source").to_pylist()
    prov = table.column("provenance").to_pylist()
    return np.fromiter(
        (
            xxhash.xxh3_64_intdigest(f"{i}\0{s}\0{p['uri']}\0{p['row']}".encode())
            for i, s, p in zip(ids, sources, prov, strict=True)
        ),
        dtype=U64,
        count=len(ids),
    )


def part_of(values: Array, n: int) -> Array:
    """Partition of 64-bit values; mixed first so that nodes and keys spread evenly."""
    return (splitmix64(values ^ U64(0x5851F42D4C957F2D)) % U64(n)).astype(np.int64)


def edge_table(u: Array, v: Array) -> pa.Table:
    return pa.table({"u": pa.array(u, pa.uint64()), "v": pa.array(v, pa.uint64())})


def uv(table: pa.Table) -> tuple[Array, Array]:
    return (
        table.column("u").to_numpy().astype(U64, copy=False),
        table.column("v").to_numpy().astype(U64, copy=False),
    )


def unique_pairs(u: Array, v: Array) -> tuple[Array, Array]:
    """Distinct ``(u, v)`` pairs sorted by ``u`` then ``v``."""
    if len(u) == 0:
        return u, v
    order = np.lexsort((v, u))
    u, v = u[order], v[order]
    keep = np.ones(len(u), dtype=bool)
    keep[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    return u[keep], v[keep]


def both_ways(u: Array, v: Array, n: int) -> list[pa.Table]:
    """Every undirected edge as ``(a, b)`` in ``a``'s partition and ``(b, a)`` in ``b``'s."""
    a = np.concatenate([u, v])
    b = np.concatenate([v, u])
    return split(edge_table(a, b), part_of(a, n), n)


def fingerprint(u: Array, v: Array) -> tuple[int, int]:
    """Count and order-free 64-bit sum of a set of distinct edges."""
    with np.errstate(over="ignore"):
        h = splitmix64(splitmix64(u) ^ v)
        return len(u), int(h.sum(dtype=U64))


def _outputs(pieces: list[pa.Table], stats: dict[str, Any]) -> tuple[Any, ...]:
    return (*pieces, stats)


# ----------------------------------------------------------------------------- waves


@ray.remote
def scatter_block(
    block: pa.Table, n: int, bands: int, doc_columns: list[str], texts: bool
) -> tuple[Any, ...]:
    """One signed block -> ``n`` band-key pieces (by key), ``n`` document pieces (by node)
    and, for verification, ``n`` text pieces (by node)."""
    node = block.column(NODE).to_numpy().astype(U64, copy=False)
    has = block.column("n_shingles").to_numpy() > 0
    keys = np.stack(
        [block.column(f"band_{i}").to_numpy().astype(U64, copy=False) for i in range(bands)],
        axis=1,
    )[has]
    key = keys.ravel()
    nodes = np.repeat(node[has], bands)
    band_pieces = split(
        pa.table({KEY: pa.array(key, pa.uint64()), NODE: pa.array(nodes, pa.uint64())}),
        part_of(key, n),
        n,
    )
    part = part_of(node, n)
    doc_pieces = split(block.select([NODE, *doc_columns]), part, n)
    text_pieces = split(block.select([NODE, "text"]), part, n) if texts else []
    return (*band_pieces, *doc_pieces, *text_pieces)


@ray.remote
def bucket_pairs(n: int, verify: bool, *pieces: pa.Table) -> tuple[Any, ...]:
    """Band rows of one partition -> candidate edges ``(u, v)``, ``u < v``.

    Without verification a star from each bucket's smallest node is enough (every
    member ends in one component anyway), and the edges go straight to the first
    large-star step.  With verification a rejected star edge would cut true pairs
    between the other members apart, so buckets of up to :data:`ALL_PAIRS` members
    give all their pairs and larger ones a star from each of their
    :data:`ANCHORS` smallest nodes (NeMo Curator's anchors); the edges go to the
    partition of ``u`` to fetch its text.
    """
    table = concat(pieces)
    key = table.column(KEY).to_numpy().astype(U64, copy=False)
    node = table.column(NODE).to_numpy().astype(U64, copy=False)
    order = np.lexsort((node, key))
    key, node = key[order], node[order]
    starts = group_starts(key)
    sizes = np.diff(np.r_[starts, len(key)])
    group = np.repeat(np.arange(len(starts)), sizes)
    rank = np.arange(len(key)) - np.repeat(starts, sizes)
    size = np.repeat(sizes, sizes)
    us, vs = [np.repeat(node[starts], sizes)[rank > 0]], [node[rank > 0]]
    if verify:
        small = size <= ALL_PAIRS
        for d in range(1, ALL_PAIRS):  # all pairs (i, i + d) inside small buckets
            same = small[:-d] & (group[:-d] == group[d:])
            us.append(node[:-d][same])
            vs.append(node[d:][same])
        for a in range(1, ANCHORS):  # more anchors in large buckets
            big = (size > ALL_PAIRS) & (rank > a)
            us.append(node[np.flatnonzero(big) - rank[big] + a])
            vs.append(node[big])
    u, v = unique_pairs(np.concatenate(us), np.concatenate(vs))
    stats = {"buckets": int((sizes > 1).sum()), "bucket_rows": len(key)}
    if verify:
        return _outputs(split(edge_table(u, v), part_of(u, n), n), stats)
    return _outputs(both_ways(u, v, n), stats)


def _lookup(docs: pa.Table, wanted: Array) -> Array:
    """Row of ``docs`` holding each node of ``wanted`` (which must all be there)."""
    nodes = docs.column(NODE).to_numpy().astype(U64, copy=False)
    order = np.argsort(nodes, kind="stable")
    found = np.searchsorted(nodes[order], wanted)
    found = np.minimum(found, max(len(nodes) - 1, 0))
    if len(wanted) and (len(nodes) == 0 or (nodes[order][found] != wanted).any()):
        raise RuntimeError("an edge names a document that no partition holds")
    return order[found]


def _check_unique(docs: pa.Table) -> None:
    nodes = np.sort(docs.column(NODE).to_numpy().astype(U64, copy=False))
    dup = np.flatnonzero(nodes[1:] == nodes[:-1])
    if len(dup):
        raise ValueError(
            "two records have the same 64-bit node (a hash of id, source and provenance): "
            "the same source file is read twice, or a hash collision; "
            "minhash_dedup needs every record once"
        )


@ray.remote
def attach_left(n: int, n_docs: int, *pieces: pa.Table) -> tuple[Any, ...]:
    """Verification, first half: give every edge the text of ``u``; send it to ``v``'s part."""
    docs, edges = concat(pieces[:n_docs]), concat(pieces[n_docs:])
    u, v = unique_pairs(*uv(edges))
    text_u = docs.column("text").take(pa.array(_lookup(docs, u)))
    out = pa.table({"u": pa.array(u, pa.uint64()), "v": pa.array(v, pa.uint64()), "text_u": text_u})
    return _outputs(split(out, part_of(v, n), n), {"candidates": len(u)})


@ray.remote
def verify_pairs(
    n: int, n_docs: int, threshold: float, sign: SignatureSpec, *pieces: pa.Table
) -> tuple[Any, ...]:
    """Verification, second half: exact Jaccard of the two shingle sets; keep the edges at
    or above ``threshold``, both ways, for the first large-star step."""
    docs, edges = concat(pieces[:n_docs]), concat(pieces[n_docs:])
    u, v = uv(edges)
    text_v = docs.column("text").take(pa.array(_lookup(docs, v)))
    sim = jaccard(edges.column("text_u"), text_v, sign)
    ok = sim >= threshold
    stats = {"verified": int(ok.sum()), "rejected_pairs": int((~ok).sum())}
    return _outputs(both_ways(u[ok], v[ok], n), stats)


def _shingle_sets(text: pa.Array | pa.ChunkedArray, sign: SignatureSpec) -> tuple[Array, Array]:
    """(document, shingle) pairs, distinct, sorted."""
    norm = normalize(text, sign.normalization())
    toks = word_tokens(norm) if sign.shingle == "word" else char_tokens(norm)
    sh = shingles(toks, sign.ngram)
    return unique_pairs(sh.doc, sh.values)


def jaccard(left: Any, right: Any, sign: SignatureSpec) -> Array:
    """Exact Jaccard similarity of the shingle sets of ``left[i]`` and ``right[i]``
    (shingles compared by their 64-bit hashes), :data:`PAIR_CHUNK` pairs at a time."""
    n = len(left)
    parts = [
        _jaccard(left.slice(lo, PAIR_CHUNK), right.slice(lo, PAIR_CHUNK), sign)
        for lo in range(0, n, PAIR_CHUNK)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def _jaccard(left: Any, right: Any, sign: SignatureSpec) -> Array:
    n = len(left)
    d1, s1 = _shingle_sets(left, sign)
    d2, s2 = _shingle_sets(right, sign)
    size1 = np.bincount(d1, minlength=n)
    size2 = np.bincount(d2, minlength=n)
    doc = np.concatenate([d1, d2])
    val = np.concatenate([s1, s2])
    order = np.lexsort((val, doc))
    doc, val = doc[order], val[order]
    same = (doc[1:] == doc[:-1]) & (val[1:] == val[:-1])
    inter = np.bincount(doc[1:][same], minlength=n)
    union = size1 + size2 - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


@ray.remote
def large_star(n: int, *pieces: pa.Table) -> tuple[Any, ...]:
    """Edges of one partition (``(a, b)`` with ``a`` here) -> for every node ``u``, link
    its larger neighbours to ``m(u)``, the smallest of ``u`` and its neighbours.

    Returns ``n`` pieces for small-star (by the larger end), the labels ``(u, m(u))``
    of this partition's nodes, and the fingerprint of the input edge set.
    """
    u, v = unique_pairs(*uv(concat(pieces)))
    starts = group_starts(u)
    sizes = np.diff(np.r_[starts, len(u)])
    smallest = np.minimum(u[starts], v[starts])  # v sorted within u: v[starts] is min
    m = np.repeat(smallest, sizes)
    up = v > u
    out_u, out_v = v[up], m[up]
    pieces_out = split(edge_table(out_u, out_v), part_of(out_u, n), n)
    labels = edge_table(u[starts], smallest)
    lower = u < v
    count, fp = fingerprint(u[lower], v[lower])
    return (*pieces_out, labels, {"edges": count, "fingerprint": fp})


@ray.remote
def small_star(n: int, *pieces: pa.Table) -> tuple[Any, ...]:
    """Edges ``(u, w)`` with ``u > w`` -> link ``u`` and its smaller neighbours to the
    smallest of them; out both ways for the next large-star."""
    u, w = unique_pairs(*uv(concat(pieces)))
    starts = group_starts(u)
    sizes = np.diff(np.r_[starts, len(u)])
    m = np.repeat(w[starts], sizes)
    others = w != m
    a = np.concatenate([u[starts], w[others]])
    b = np.concatenate([w[starts], m[others]])
    return _outputs(both_ways(a, b, n), {})


@ray.remote
def join_labels(n: int, n_docs: int, keep_columns: list[str], *pieces: pa.Table) -> tuple[Any, ...]:
    """Documents of one partition + their component labels -> members by component."""
    docs, labels = concat(pieces[:n_docs]), concat(pieces[n_docs:])
    _check_unique(docs)
    node = labels.column("u").to_numpy().astype(U64, copy=False)
    comp = labels.column("v").to_numpy().astype(U64, copy=False)
    rows = docs.select([NODE, UNIT, POS, *keep_columns]).take(pa.array(_lookup(docs, node)))
    members = rows.append_column("component", pa.array(comp, pa.uint64()))
    return _outputs(split(members, part_of(comp, n), n), {})


def keep_order(spec: ClusterSpec) -> list[tuple[str, str]]:
    """Sort keys that put each component's kept member first; the node (a hash of id
    and provenance) breaks ties between equal ids, whatever the partitioning."""
    if spec.keep == "first":
        keys = [(UNIT, "ascending"), (POS, "ascending")]
    elif spec.keep == "score":
        keys = [("_neg_score", "ascending"), ("id", "ascending")]
    elif spec.keep == "random":
        keys = [("_draw", "ascending"), ("id", "ascending")]
    else:
        keys = [("id", "ascending")]
    return [*keys, (NODE, "ascending")]


@ray.remote
def choose_keepers(spec: ClusterSpec, schema: pa.Schema, *pieces: pa.Table) -> tuple[Any, ...]:
    """Members of the components of one partition -> one decision row per member."""
    members = concat(pieces)
    if spec.keep == "score":
        score = pc.cast(members.column(spec.score_column), pa.float64())
        score = pc.if_else(pc.is_nan(score), pa.scalar(None, pa.float64()), score)
        neg = pc.fill_null(pc.negate(score), float("inf"))  # null and NaN rank last
        members = members.append_column("_neg_score", neg)
    if spec.keep == "random":
        seed = spec.seed
        draws = [
            xxhash.xxh3_64_intdigest(i.encode(), seed) for i in members.column("id").to_pylist()
        ]
        members = members.append_column("_draw", pa.array(draws, pa.uint64()))
    members = members.sort_by([("component", "ascending"), *keep_order(spec)])
    comp = members.column("component").to_numpy().astype(U64, copy=False)
    starts = group_starts(comp)
    sizes = np.diff(np.r_[starts, len(comp)])
    first = np.zeros(len(comp), dtype=bool)
    first[starts] = True
    kept_id = pc.take(members.column("id"), pa.array(np.repeat(starts, sizes)))
    dropped = pa.array(~first)
    null = pa.nulls(len(comp), pa.string())
    decisions = pa.table(
        {
            UNIT: members.column(UNIT),
            POS: members.column(POS),
            "reason": pc.if_else(
                dropped, pc.binary_join_element_wise(f"{spec.reason}:", kept_id, ""), null
            ),
            "value": pc.if_else(dropped, kept_id, null),
            "cluster_id": kept_id,
            "cluster_size": pa.array(np.repeat(sizes, sizes), pa.int64()),
        }
    ).cast(schema)
    hist = np.bincount(sizes) if len(sizes) else np.zeros(0, dtype=np.int64)
    stats = {
        "clusters": len(starts),
        "dropped": int((~first).sum()),
        "sizes": {int(s): int(c) for s, c in enumerate(hist) if c},
    }
    return decisions, stats


# ----------------------------------------------------------------------------- driver


def _wave(fn: Any, n_out: int, calls: Sequence[Sequence[Any]]) -> tuple[list[list[Ref]], list[Any]]:
    """One task of ``fn`` per argument list in ``calls``, each returning ``n_out`` pieces
    and then its extras.  Returns the pieces as ``out[target][source]`` and the extras."""
    pieces: list[list[Ref]] = [[] for _ in range(n_out)]
    extras = []
    for args in calls:
        refs: Any = fn.remote(*args)
        refs = list(refs) if isinstance(refs, list | tuple) else [refs]
        for i in range(n_out):
            pieces[i].append(refs[i])
        extras.append(refs[n_out:])
    return pieces, extras


def _stats(extras: list[Any], slot: int = -1) -> list[dict[str, Any]]:
    return list(ray.get([e[slot] for e in extras]))


def cluster(
    blocks: list[Ref], spec: ClusterSpec, bands: int, doc_columns: list[str], schema: pa.Schema
) -> tuple[list[Ref], dict[str, Any]]:
    """Signed blocks -> decision tables (one per partition) and run statistics."""
    n = spec.partitions
    verify = spec.threshold is not None
    kinds = 3 if verify else 2
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    scattered, _ = _wave(
        scatter_block.options(num_returns=kinds * n),
        kinds * n,
        [(b, n, bands, doc_columns, verify) for b in blocks],
    )
    band_parts, doc_parts, text_parts = (
        scattered[:n],
        scattered[n : 2 * n],
        scattered[2 * n :],
    )
    edges, extras = _wave(
        bucket_pairs.options(num_returns=n + 1), n, [(n, verify, *band_parts[p]) for p in range(n)]
    )
    stats: dict[str, Any] = {"partitions": n}
    stats["buckets"] = sum(s["buckets"] for s in _stats(extras))
    del band_parts, scattered  # free the band keys in the object store
    lap("buckets")
    if verify:
        with_text, extras = _wave(
            attach_left.options(num_returns=n + 1),
            n,
            [(n, len(text_parts[p]), *text_parts[p], *edges[p]) for p in range(n)],
        )
        stats["candidate_pairs"] = sum(s["candidates"] for s in _stats(extras))
        edges, extras = _wave(
            verify_pairs.options(num_returns=n + 1),
            n,
            [
                (n, len(text_parts[p]), spec.threshold, spec.sign, *text_parts[p], *with_text[p])
                for p in range(n)
            ],
        )
        verified = _stats(extras)
        stats["verified_pairs"] = sum(s["verified"] for s in verified)
        stats["rejected_pairs"] = sum(s["rejected_pairs"] for s in verified)
        lap("verify")
    labels = _components(edges, n, stats, count_candidates=not verify)
    lap("components")
    keep_columns = ["id"] + (
        [spec.score_column] if spec.keep == "score" and spec.score_column else []
    )
    members, _ = _wave(
        join_labels.options(num_returns=n + 1),
        n,
        [(n, len(doc_parts[p]), keep_columns, *doc_parts[p], labels[p]) for p in range(n)],
    )
    decided, extras = _wave(
        choose_keepers.options(num_returns=2), 1, [(spec, schema, *members[p]) for p in range(n)]
    )
    keep_stats = _stats(extras)
    lap("keep")
    stats["seconds"] = seconds
    stats["clusters"] = sum(s["clusters"] for s in keep_stats)
    stats["dropped"] = sum(s["dropped"] for s in keep_stats)
    sizes: dict[int, int] = {}
    for s in keep_stats:
        for k, c in s["sizes"].items():
            sizes[k] = sizes.get(k, 0) + c
    stats["cluster_sizes"] = {str(k): sizes[k] for k in sorted(sizes)}
    return decided[0], stats


def _components(
    edges: list[list[Ref]], n: int, stats: dict[str, Any], count_candidates: bool
) -> list[Ref]:
    """Alternate large-star and small-star until a round changes nothing; return the
    label pieces ``(node, smallest node of its component)`` by partition."""
    previous: tuple[int, int] | None = None
    for rounds in range(1, MAX_ROUNDS + 1):
        to_small, extras = _wave(
            large_star.options(num_returns=n + 2), n, [(n, *edges[p]) for p in range(n)]
        )
        ls = _stats(extras)
        current = (sum(s["edges"] for s in ls), sum(s["fingerprint"] for s in ls) % (1 << 64))
        if rounds == 1 and count_candidates:
            stats["candidate_pairs"] = current[0]
        if current == previous:
            stats["rounds"] = rounds - 1
            stats["component_edges"] = current[0]
            return [e[0] for e in extras]
        previous = current
        edges, _ = _wave(
            small_star.options(num_returns=n + 1), n, [(n, *to_small[p]) for p in range(n)]
        )
    raise RuntimeError(f"connected components did not converge in {MAX_ROUNDS} rounds")
