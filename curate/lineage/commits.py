"""The commit log that makes ``curate run --resume`` work.

The unit of work is one unit of one segment (an input shard or a group of
them, through a fused chain of stages).  When a worker has written every file
of a unit (output shards, rejects, materialized work files) it commits the
unit: one small JSON object under ``_commits/seg-<s>/`` holding the unit's
reports, among them every file it wrote with its size and sha256.  A unit is
done exactly when its commit exists; files without a commit belong to a unit
that will run again, and since every file name and byte is a function of the
inputs and the spec, the rerun writes the same files.

``--resume`` skips committed units whose files are all still there with
their recorded sizes, and refuses to resume a folder written by a different
spec or from different inputs (``_commits/run.json``).
"""

from __future__ import annotations

import json
from typing import Any

from curate.io import storage
from curate.io.layout import Layout


class ResumeError(RuntimeError):
    """The output folder cannot be resumed by this pipeline."""


def write_commit(layout: Layout, segment: int, unit: int, reports: list[dict[str, Any]]) -> None:
    body = {"segment": segment, "unit": unit, "reports": reports}
    layout.write(layout.commit(segment, unit), json.dumps(body, sort_keys=True).encode())


def files_of(reports: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Every file a unit's reports say it wrote: (absolute path, bytes)."""
    out = []
    for r in reports:
        if r["kind"] in ("output", "work", "index"):
            out.append((r["path"], int(r["bytes"])))
        elif r["kind"] == "images":  # a llava sink's images: a folder of files
            out.extend((storage.join(r["path"], name), int(size)) for name, size in r["members"])
        elif r.get("rejects_file"):
            out.append((r["rejects_file"]["path"], int(r["rejects_file"]["bytes"])))
    return out


def committed_units(
    layout: Layout, segment: int, sizes: dict[str, int]
) -> dict[int, list[dict[str, Any]]]:
    """Units of ``segment`` committed earlier whose files are all present, with their
    reports; ``sizes`` maps every existing file under the output (and cache) to its size."""
    found: dict[int, list[dict[str, Any]]] = {}
    folder = storage.join(layout.commits(), f"seg-{segment:03d}")
    for info in storage.list_prefix(folder, layout.opts):
        if not info.uri.endswith(".json"):
            continue
        body = json.loads(layout.read(info.uri))
        reports = body["reports"]
        if all(sizes.get(path) == size for path, size in files_of(reports)):
            found[int(body["unit"])] = reports
    return found


def run_identity(spec_hash: str, inputs: list[list[Any]]) -> dict[str, Any]:
    return {"format": "curate-commits/1", "spec_hash": spec_hash, "inputs": inputs}


def check_resumable(layout: Layout, identity: dict[str, Any]) -> None:
    """Refuse to resume a run of another spec or other inputs."""
    path = layout.run_state()
    if not layout.exists(path):
        raise ResumeError(
            f"{layout.root} has no commit log ({layout.relative(path)}): nothing to resume; "
            "run without --resume"
        )
    before = json.loads(layout.read(path))
    if before.get("spec_hash") != identity["spec_hash"]:
        raise ResumeError(
            f"{layout.root} was written by a different pipeline spec (hash "
            f"{str(before.get('spec_hash'))[:12]}, now {identity['spec_hash'][:12]}); "
            "--resume needs the same spec: pass --overwrite to start again"
        )
    if before.get("inputs") != identity["inputs"]:
        changed = {tuple(i) for i in identity["inputs"]} ^ {tuple(i) for i in before["inputs"]}
        example = sorted({str(c[1]) for c in changed})[:3]
        raise ResumeError(
            f"the inputs changed since {layout.root} was written ({', '.join(example)}); "
            "--resume would mix old and new data: pass --overwrite to start again"
        )


def write_identity(layout: Layout, identity: dict[str, Any]) -> None:
    layout.write(layout.run_state(), json.dumps(identity, sort_keys=True, indent=1).encode())


def global_done(layout: Layout, stage: str, work_units: list[int] | None = None) -> bool:
    """Whether ``stage`` committed its decisions and every decisions file it listed is
    still there (a missing file would read as "drop nothing"), and for a reshuffling
    stage every unit of its output (``work_units``)."""
    path = layout.global_commit(stage)
    if not layout.exists(path):
        return False
    units = json.loads(layout.read(path))["units"]
    if not all(layout.exists(layout.decisions(stage, int(u))) for u in units):
        return False
    return all(layout.exists(layout.work(stage, u)) for u in work_units or [])


def global_summary(layout: Layout, stage: str) -> dict[str, Any]:
    """The counters a committed global stage reported (for the manifest of a resumed run)."""
    summary: dict[str, Any] = json.loads(layout.read(layout.global_commit(stage))).get(
        "summary", {}
    )
    return summary


def global_reports(layout: Layout, stage: str) -> list[dict[str, Any]]:
    """The per-unit reports a committed reshuffling stage made (for a resumed run)."""
    reports: list[dict[str, Any]] = json.loads(layout.read(layout.global_commit(stage))).get(
        "reports", []
    )
    return reports


def commit_global(
    layout: Layout,
    stage: str,
    units: list[int],
    summary: dict[str, Any] | None = None,
    reports: list[dict[str, Any]] | None = None,
    work_units: list[int] | None = None,
) -> None:
    body: dict[str, Any] = {"stage": stage, "units": units, "summary": summary or {}}
    if reports is not None:
        body["reports"] = reports
        body["work_units"] = work_units or []
    layout.write(layout.global_commit(stage), json.dumps(body, sort_keys=True).encode())
