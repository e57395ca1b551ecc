"""The stage cache: reuse a stage's committed output while nothing it depends on changed.

A stage marked ``cache: true`` (or whose class sets ``cache_default``) has its
output materialized into a cache entry ``<cache_dir>/<stage>-<key>/`` instead
of the run's work folder.  The key is a sha256 over

* the *stage chain*: the normalized spec of the stage and of every stage and
  source upstream of it (type, parameters, inputs; not resources), the seed
  and the unit size;
* the *code version*: curate's version, a hash of all of curate's source
  files, the source file of every stage class in the chain, and the versions
  of pyarrow, numpy, Pillow and xxhash;
* the *input fingerprint*: every input shard's URI, size and version (mtime,
  ctime and inode on disk, ETag on S3), and the units the shards form.

A run whose cached stage finds a complete entry with its key skips every
segment needed only to produce it (so changing a threshold downstream of a
CLIP scorer does not re-run the scorer), copies the entry's rejects into its
own output and takes the entry's per-stage reports, so the manifest's counts
are whole.  The manifest's ``run.cache`` says which stages were reused.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from curate.config.load import Pipeline
from curate.dag import Plan
from curate.io import storage
from curate.io.layout import Layout
from curate.lineage.commits import files_of
from curate.registry import get_stage_class

#: Libraries whose version can change what a stage writes.
_LIBRARIES = ("pyarrow", "numpy", "pillow", "xxhash", "torch", "open_clip_torch", "transformers")


def ancestors(pipeline: Pipeline, node: str) -> set[str]:
    """``node`` and every stage and source upstream of it."""
    seen: set[str] = set()
    todo = [node]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in pipeline.stages:
            todo.extend(pipeline.stages[name].inputs)
    return seen


def _file_hash(path: str | None) -> str:
    if path is None:
        return "unknown"
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _package_hash() -> str:
    """One hash over every source file of the curate package (built-in stages included):
    readers, accounting and the runner all shape what a cached stage wrote."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\x00")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def code_version(plan: Plan, names: set[str]) -> dict[str, str]:
    out = {"curate": _version("curate"), "curate_sources": _package_hash()}
    out.update({f"lib:{lib}": _version(lib) for lib in _LIBRARIES})
    for name in sorted(names & set(plan.pipeline.stages)):
        cls = get_stage_class(plan.pipeline.stages[name].type)
        out[f"stage:{name}"] = _file_hash(inspect.getsourcefile(cls))
    return out


def chain_key(plan: Plan, node: str, units: dict[str, list[list[Any]]]) -> str:
    """The cache key of ``node``'s output (see the module docstring); ``units`` gives
    each source's units (index and shard URIs): cached files are named by unit index."""
    pipeline = plan.pipeline
    names = ancestors(pipeline, node)
    normalized = pipeline.normalized()
    chain: dict[str, Any] = {}
    for name in sorted(names):
        if name in pipeline.spec.sources:
            chain[name] = {
                "source": normalized["sources"][name],
                "inputs": [[s.uri, s.size, s.version] for s in plan.shards[name]],
                "units": units[name],
            }
        else:
            spec = dict(normalized["stages"][name])
            spec.pop("resources", None)
            spec.pop("cache", None)
            models = {r: m.sha256 for (s, r), m in sorted(plan.models.items()) if s == name}
            chain[name] = {"stage": spec, "models": models}
    body = {
        "node": node,
        "chain": chain,
        "seed": pipeline.spec.seed,
        "unit_bytes": int(pipeline.spec.execution.unit_bytes),
        "code": code_version(plan, names),
    }
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def entry_root(cache_dir: str, node: str, key: str) -> str:
    return storage.join(cache_dir, f"{node}-{key[:20]}")


def _complete(root: str) -> str:
    return storage.join(root, "complete.json")


def _report_node(report: dict[str, Any]) -> str | None:
    if report["kind"] == "input":
        return str(report["source"])
    if report["kind"] in ("source", "stage"):
        return str(report["stage"])
    return None


def save_entry(
    layout: Layout,
    root: str,
    node: str,
    key: str,
    names: set[str],
    reports: list[dict[str, Any]],
) -> None:
    """Complete ``node``'s entry: copy the rejects of its chain in, then write
    ``complete.json`` (last: an entry without it is never reused)."""
    kept = []
    for report in reports:
        owner = _report_node(report)
        is_own_work = report["kind"] == "work" and report["sink"] == node
        if not is_own_work and (owner is None or owner not in names):
            continue
        saved = dict(report)
        rejects = saved.get("rejects_file")
        if rejects:
            rel = layout.relative(rejects["path"])
            storage.copy(rejects["path"], storage.join(root, rel), layout.opts)
            saved["rejects_file"] = {**rejects, "path": rel}
        kept.append(saved)
    body = {"format": "curate-cache/1", "node": node, "key": key, "reports": kept}
    layout.write(_complete(root), json.dumps(body, sort_keys=True).encode())


def load_entry(layout: Layout, root: str, key: str) -> list[dict[str, Any]] | None:
    """The reports of a complete entry whose files are all present, else None."""
    path = _complete(root)
    if not layout.exists(path):
        return None
    body = json.loads(layout.read(path))
    if body.get("key") != key:
        return None
    sizes = {f.uri: f.size for f in storage.list_prefix(root, layout.opts)}
    reports: list[dict[str, Any]] = body["reports"]
    for report in reports:
        rejects = report.get("rejects_file")
        if rejects and sizes.get(storage.join(root, rejects["path"])) != rejects["bytes"]:
            return None
    work = [r for r in reports if r["kind"] == "work"]
    if any(sizes.get(path) != size for path, size in files_of(work)):
        return None
    return reports


def import_entry(layout: Layout, root: str, reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy the entry's rejects into this run's output; reports with this run's paths."""
    out = []
    for report in reports:
        rejects = report.get("rejects_file")
        if rejects:
            target = layout.absolute(rejects["path"])
            storage.copy(storage.join(root, rejects["path"]), target, layout.opts)
            out.append({**report, "rejects_file": {**rejects, "path": target}})
        else:
            out.append(report)
    return out


def report_key(report: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a report unique within a run (to merge imported reports)."""
    if report["kind"] == "input":
        return ("input", report["source"], report["uri"])
    return (report["kind"], report.get("stage") or report.get("sink"), report.get("unit"))
