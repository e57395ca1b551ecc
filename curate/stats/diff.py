"""Comparing two runs: what changed in their manifests (spec fields, seed,
software, per-stage counts and reasons, mixture shares, outputs) and which records
(ids) one run has and the other lacks.

The record diff never holds every id in one process: Ray tasks read the id
columns and hash-partition them, and one task per partition compares its two sets.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.io import storage
from curate.io.files import read_parquet
from curate.io.storage import StorageOptions
from curate.stats.records import Record, merge_all


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out |= flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: data}


def spec_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The fields that differ between two normalized specs, one line each:
    ``~ path: old -> new``, ``+ path: new``, ``- path: old``."""
    fa, fb = flatten(dict(a)), flatten(dict(b))
    lines = []
    for key in sorted(fa.keys() | fb.keys()):
        if key not in fb:
            lines.append(f"- {key}: {_short(fa[key])}")
        elif key not in fa:
            lines.append(f"+ {key}: {_short(fb[key])}")
        elif fa[key] != fb[key]:
            lines.append(f"~ {key}: {_short(fa[key])} -> {_short(fb[key])}")
    return lines


def spec_unified_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """A unified diff of the two specs as indented, key-sorted JSON."""
    ta = json.dumps(a, indent=2, sort_keys=True).splitlines()
    tb = json.dumps(b, indent=2, sort_keys=True).splitlines()
    return list(difflib.unified_diff(ta, tb, "A", "B", lineterm="", n=2))


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _changed(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def diff_manifests(a: Mapping[str, Any], b: Mapping[str, Any]) -> Record:
    """What changed between two runs' manifests: spec (hash and changed fields),
    seed, software, per-stage counts and reasons, mixture shares, outputs."""
    return {
        "spec_hash": [a["pipeline"]["spec_hash"], b["pipeline"]["spec_hash"]],
        "spec": spec_changes(a["pipeline"]["spec"], b["pipeline"]["spec"]),
        "seed": [a.get("seed"), b.get("seed")],
        "software": {
            "git_commit": [a["software"]["git_commit"], b["software"]["git_commit"]],
            "python": [a["software"]["python"], b["software"]["python"]],
            "packages": _changed(a["software"]["packages"], b["software"]["packages"]),
        },
        "stages": _stage_deltas(a["stages"], b["stages"]),
        "mixture": _mix_deltas(a["stages"], b["stages"]),
        "outputs": _output_deltas(a["outputs"], b["outputs"]),
    }


def _stage_deltas(a: Sequence[Record], b: Sequence[Record]) -> list[Record]:
    sa, sb = {s["name"]: s for s in a}, {s["name"]: s for s in b}
    names = [s["name"] for s in a] + [s["name"] for s in b if s["name"] not in sa]
    out = []
    for name in names:
        x, y = sa.get(name, {}), sb.get(name, {})
        row: Record = {"name": name, "type": (x or y).get("type")}
        for key in ("rows_in", "kept", "dropped"):
            row[key] = [x.get(key), y.get(key)]
        ra, rb = x.get("reasons", {}), y.get("reasons", {})
        row["reasons"] = {
            r: [ra.get(r, 0), rb.get(r, 0)]
            for r in sorted(ra.keys() | rb.keys())
            if ra.get(r, 0) != rb.get(r, 0)
        }
        out.append(row)
    return out


def _mix_deltas(a: Sequence[Record], b: Sequence[Record]) -> dict[str, Record]:
    def comps(stages: Sequence[Record]) -> dict[str, Record]:
        return {
            f"{s['name']}.{c}": v
            for s in stages
            for c, v in s.get("summary", {}).get("components", {}).items()
        }

    ca, cb = comps(a), comps(b)
    keys = ("target_share", "share_tokens", "share_rows", "rows", "tokens")
    return {
        name: {k: [ca.get(name, {}).get(k), cb.get(name, {}).get(k)] for k in keys}
        for name in sorted(ca.keys() | cb.keys())
    }


def _output_deltas(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Record]:
    out = {}
    for sink in sorted(a.keys() | b.keys()):
        fa, fb = a.get(sink, []), b.get(sink, [])
        out[sink] = {
            "shards": [len(fa), len(fb)],
            "rows": [sum(f["rows"] for f in fa), sum(f["rows"] for f in fb)],
            "bytes": [sum(f["bytes"] for f in fa), sum(f["bytes"] for f in fb)],
        }
    return out


def id_files(root: str, manifest: Mapping[str, Any], sink: str) -> list[tuple[str, str]]:
    """``(uri, format)`` of the files holding a sink's record ids: Parquet shards, the
    index of a WebDataset sink, the JSON files of a llava sink."""
    fmt = manifest["pipeline"]["spec"]["sinks"][sink].get("format", "parquet")
    if fmt == "webdataset":
        paths = [i["path"] for i in manifest.get("indexes", []) if i["sink"] == sink]
        fmt = "parquet"
    else:
        paths = [f["path"] for f in manifest["outputs"].get(sink, [])]
    return [(storage.join(root, *p.split("/")), fmt) for p in paths]


def read_ids(uri: str, fmt: str, side: int, parts: int, opts: StorageOptions) -> pa.Table:
    """One file's distinct ids with their run (``side``) and hash partition."""
    import xxhash

    if fmt == "llava":
        ids = pa.array([e["id"] for e in json.loads(storage.read_bytes(uri, opts))], pa.string())
    else:
        ids = read_parquet(uri, opts, ["id"]).column("id").combine_chunks()
    ids = pc.unique(pc.drop_null(ids))
    part = [xxhash.xxh3_64_intdigest(i.encode()) % parts for i in ids.to_pylist()]
    n = len(ids)
    return pa.table(
        {"id": ids, "side": pa.array([side] * n, pa.int8()), "part": pa.array(part, pa.int64())}
    )


def compare_ids(examples: int, table: pa.Table) -> Record:
    """In one partition: how many ids only run A has, only run B, both; the smallest
    ``examples`` of each one-sided set."""
    if not table.num_rows:
        return {"removed": 0, "added": 0, "common": 0, "removed_ids": [], "added_ids": []}
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    side = table.column("side").to_numpy()
    a, b = set(ids[side == 0].tolist()), set(ids[side == 1].tolist())
    removed, added = sorted(a - b), sorted(b - a)
    return {
        "removed": len(removed),
        "added": len(added),
        "common": len(a & b),
        "removed_ids": removed[:examples],
        "added_ids": added[:examples],
    }


def diff_records(
    a: tuple[str, Mapping[str, Any], StorageOptions],
    b: tuple[str, Mapping[str, Any], StorageOptions],
    examples: int = 5,
) -> dict[str, Record]:
    """Per sink both runs have: records (ids) only in run A (``removed``), only in run B
    (``added``) and in both, with a few examples.  Ray tasks read the id columns and
    hash-partition them; one task per partition compares its two sets, so no process
    holds every id.  Ray must be initialized."""
    import ray

    from curate.shuffle import hash_shuffle

    read = ray.remote(num_cpus=1)(read_ids)
    out = {}
    for sink in sorted(a[1]["outputs"].keys() & b[1]["outputs"].keys()):
        rows = sum(f["rows"] for m in (a[1], b[1]) for f in m["outputs"][sink])
        parts = max(1, min(256, rows // 2_000_000 + 1))
        blocks = [
            read.remote(uri, fmt, side, parts, opts)
            for side, (root, manifest, opts) in enumerate((a, b))
            for uri, fmt in id_files(root, manifest, sink)
        ]
        if not blocks:
            continue
        compare = functools.partial(compare_ids, examples)
        results = ray.get(hash_shuffle(blocks, "part", parts, compare))
        total = merge_all([{k: r[k] for k in ("removed", "added", "common")} for r in results])
        for key in ("removed_ids", "added_ids"):
            total[key] = sorted(i for r in results for i in r[key])[:examples]
        out[sink] = total
    return out
