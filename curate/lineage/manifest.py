"""The run manifest: spec, software, inputs, per-stage counts, outputs.

Everything outside the ``run`` key is deterministic: the same inputs, spec and
seed give the same bytes.  ``run`` holds what legitimately varies (timings,
cluster size, clock, output location).
"""

from __future__ import annotations

import json
import platform
import subprocess
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from curate.dag import Plan
from curate.io.files import atomic_write_bytes
from curate.io.layout import Layout
from curate.lineage.accounting import AccountingError

TRACKED_PACKAGES = (
    "curate",
    "ray",
    "pyarrow",
    "numpy",
    "pydantic",
    "torch",
    "torchvision",
    "open_clip_torch",
    "fasttext-numpy2-wheel",
    "kenlm",
    "transformers",
)


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    """Commit of the curate source tree, with ``-dirty`` for local changes."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return _shipped_commit()
    return head + ("-dirty" if dirty.strip() else "")


def _shipped_commit() -> str:
    """The commit a package shipped by ``curate submit`` was copied from (the copy on
    the cluster has no ``.git``), so that a job's manifest names the same commit as a
    local run of the same tree; ``unknown`` for any other install without git."""
    from curate.cluster import SOURCE_COMMIT_FILE

    path = Path(__file__).resolve().parents[1] / SOURCE_COMMIT_FILE
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def stage_table(
    plan: Plan, reports: list[dict[str, Any]], summaries: dict[str, dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Per-stage totals in pipeline order: sources first, then stages, with the counters
    global stages reported (``summary``)."""
    totals: dict[str, dict[str, Any]] = {}
    for r in reports:
        if r["kind"] not in ("stage", "source"):
            continue
        t = totals.setdefault(
            r["stage"], {"rows_in": 0, "kept": 0, "dropped": 0, "reasons": defaultdict(int)}
        )
        for key in ("rows_in", "kept", "dropped"):
            t[key] += r[key]
        for reason, n in r["reasons"].items():
            t["reasons"][reason] += n
        if r.get("rows_out") is not None:
            t["rows_out"] = t.get("rows_out", 0) + r["rows_out"]
        for counter, n in r.get("counters", {}).items():
            t.setdefault("counters", defaultdict(int))[counter] += n
    rows = []
    spec = plan.pipeline
    for name in [*spec.spec.sources, *spec.stages]:
        t = totals.get(name, {"rows_in": 0, "kept": 0, "dropped": 0, "reasons": {}})
        kind = "source" if name in spec.spec.sources else plan.stages[name].kind
        stype = "source" if name in spec.spec.sources else spec.stages[name].type
        row = {
            "name": name,
            "kind": kind,
            "type": stype,
            "rows_in": t["rows_in"],
            "kept": t["kept"],
            "dropped": t["dropped"],
            "reasons": dict(sorted(t["reasons"].items())),
        }
        if row["rows_in"] != row["kept"] + row["dropped"]:
            raise AccountingError(f"stage {name!r}: counts do not balance: {row}")
        if kind == "generator" or "rows_out" in t:
            row["rows_out"] = t.get("rows_out", 0)
        if t.get("counters"):
            row["counters"] = dict(sorted(t["counters"].items()))
        if summaries and name in summaries:
            row["summary"] = summaries[name]
        rows.append(row)
    return rows


def _check_flow(
    plan: Plan, stages: list[dict[str, Any]], outputs: dict[str, list[dict[str, Any]]]
) -> None:
    """Each stage gets exactly what its inputs kept; each sink holds what its input kept."""
    kept = {s["name"]: s.get("rows_out", s["kept"]) for s in stages}
    for name, bound in plan.pipeline.stages.items():
        expected = sum(kept[p] for p in bound.inputs)
        got = next(s["rows_in"] for s in stages if s["name"] == name)
        if got != expected:
            raise AccountingError(f"stage {name!r} received {got} rows, its inputs kept {expected}")
    for sink, spec in plan.pipeline.spec.sinks.items():
        rows = sum(f["rows"] for f in outputs.get(sink, []))
        if rows != kept[spec.input]:
            raise AccountingError(
                f"sink {sink!r} wrote {rows} rows, {spec.input!r} kept {kept[spec.input]}"
            )


def build_manifest(
    plan: Plan,
    layout: Layout,
    reports: list[dict[str, Any]],
    run_info: dict[str, Any],
    summaries: dict[str, dict[str, Any]] | None = None,
    index: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest; ``index`` is what the run's id index recorded
    (:func:`curate.lineage.explain.build_index`), kept under ``index``."""
    inputs = sorted(
        (
            {k: r[k] for k in ("source", "uri", "bytes", "sha256", "records")}
            for r in reports
            if r["kind"] == "input"
        ),
        key=lambda r: (r["source"], r["uri"]),
    )
    outputs: dict[str, list[dict[str, Any]]] = {s: [] for s in plan.pipeline.spec.sinks}
    for r in sorted((r for r in reports if r["kind"] == "output"), key=lambda r: r["path"]):
        outputs[r["sink"]].append(
            {"path": layout.relative(r["path"]), **{k: r[k] for k in ("rows", "bytes", "sha256")}}
        )
    indexes = sorted(
        (
            {"sink": r["sink"], "path": layout.relative(r["path"]), "rows": r["rows"]}
            for r in reports
            if r["kind"] == "index"
        ),
        key=lambda r: r["path"],
    )
    images = sorted(
        (
            {
                "sink": r["sink"],
                "path": layout.relative(r["path"]),
                **{k: r[k] for k in ("files", "bytes", "sha256")},
            }
            for r in reports
            if r["kind"] == "images"
        ),
        key=lambda r: r["path"],
    )
    rejects = sorted(
        (
            {**r["rejects_file"], "path": layout.relative(r["rejects_file"]["path"])}
            for r in reports
            if r.get("rejects_file")
        ),
        key=lambda f: f["path"],
    )
    stages = stage_table(plan, reports, summaries)
    _check_flow(plan, stages, outputs)
    return {
        "format": "curate-manifest/1",
        "pipeline": {
            "name": plan.pipeline.spec.name,
            "spec": plan.pipeline.normalized(),
            "spec_hash": plan.pipeline.spec_hash(),
        },
        "seed": plan.pipeline.spec.seed,
        "software": {
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "packages": package_versions(),
        },
        "inputs": inputs,
        "models": [
            {"stage": stage, "role": role, **model.describe()}
            for (stage, role), model in sorted(plan.models.items())
        ],
        "stages": stages,
        "outputs": outputs,
        "indexes": indexes,
        "images": images,
        "rejects": {"rows": sum(f["rows"] for f in rejects), "files": rejects},
        "index": index,
        "run": run_info,
    }


def stage_run_counters(reports: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per stage, the run-dependent counters (requests, cache hits...) summed over units."""
    out: dict[str, dict[str, int]] = {}
    for r in reports:
        for name, n in r.get("run_counters", {}).items():
            stage = out.setdefault(r["stage"], {})
            stage[name] = stage.get(name, 0) + n
    return {k: dict(sorted(v.items())) for k, v in sorted(out.items())}


def stage_seconds(reports: list[dict[str, Any]]) -> dict[str, float]:
    """Busy seconds per stage, summed over units (the workers' time, not wall time)."""
    out: dict[str, float] = defaultdict(float)
    for r in reports:
        if r["kind"] in ("stage", "source"):
            out[r["stage"]] += r["seconds"]
    return {k: round(v, 4) for k, v in sorted(out.items())}


def write_manifest(manifest: dict[str, Any], layout: Layout) -> None:
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(layout.manifest(), text.encode(), layout.opts)
