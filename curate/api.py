"""Python entry points: validate and run a pipeline."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from curate.config.load import Pipeline, load_pipeline
from curate.dag import Plan, build_plan
from curate.io import storage
from curate.io.storage import LOCAL, StorageOptions
from curate.lineage import commits
from curate.lineage.explain import build_index
from curate.lineage.manifest import (
    build_manifest,
    stage_run_counters,
    stage_seconds,
    write_manifest,
)
from curate.progress import Listener
from curate.runner import Runner, cluster_resources, live_nodes, node_resources, ray_version
from curate.stats import RunStats, write_run_stats


@dataclass(frozen=True)
class RunResult:
    """Where a run wrote its outputs, and its manifest."""

    output: str
    manifest: dict[str, Any]


def check(path: str, overrides: list[str] | None = None) -> Plan:
    """Load and check a pipeline without starting Ray; raise ConfigError with every issue."""
    return build_plan(load_pipeline(path, overrides))


def output_dir(pipeline: Pipeline, output: str | None) -> str:
    if output is not None:
        return output if storage.is_s3(output) else os.path.abspath(output)
    if pipeline.spec.output is not None:
        if storage.is_s3(pipeline.spec.output):
            return pipeline.spec.output
        return os.path.abspath(pipeline.base_dir / pipeline.spec.output)
    return os.path.abspath(os.path.join("out", pipeline.spec.name))


def cache_dir(pipeline: Pipeline, out: str) -> str:
    """``execution.cache_dir`` (relative to the pipeline file), else ``<output>/_cache``."""
    given = pipeline.spec.execution.cache_dir
    if given is None:
        return storage.join(out, "_cache")
    return given if storage.is_s3(given) else os.path.abspath(pipeline.base_dir / given)


RUN_MARKER = ".curate-run"
#: What ``--overwrite`` keeps: the stage cache outlives the runs that filled it.
KEPT_ON_OVERWRITE = ("_cache", "_state")


class OutputExistsError(FileExistsError):
    """The output folder holds files; a run never mixes its shards with older ones."""


def output_state(out: str, opts: StorageOptions = LOCAL) -> Literal["empty", "run", "foreign"]:
    """``empty`` (or only a kept stage cache), ``run`` (a curate run, finished or not),
    or ``foreign`` (files that are not a curate run's)."""
    entries = {
        storage.relative(f.uri, out).split("/", 1)[0] for f in storage.list_prefix(out, opts)
    }
    if not entries or entries <= set(KEPT_ON_OVERWRITE):
        return "empty"
    return "run" if RUN_MARKER in entries or "manifest.json" in entries else "foreign"


def prepare_output(
    out: str, overwrite: bool, resume: bool = False, opts: StorageOptions = LOCAL
) -> None:
    """Refuse a non-empty output folder, or with ``overwrite`` empty one that holds a run
    (keeping its stage cache); with ``resume`` keep it and clear what killed writers left."""
    state = output_state(out, opts)
    if state == "empty":
        return
    if state == "foreign":
        raise OutputExistsError(
            f"output folder {out} holds files that are not a curate run "
            f"(no {RUN_MARKER} or manifest.json); choose another --output"
        )
    if resume:
        storage.abort_stale(out, opts)
        return
    if not overwrite:
        raise OutputExistsError(
            f"output folder {out} holds a previous run; pass --resume to finish it, "
            "--overwrite to replace it, or choose another --output"
        )
    storage.remove_tree(out, opts, keep=KEPT_ON_OVERWRITE)
    storage.abort_stale(out, opts)


def mark_output(out: str, opts: StorageOptions = LOCAL) -> None:
    """First act of a run: mark the folder, so that a failed run can be replaced."""
    text = b"written by curate; --overwrite may replace this folder\n"
    storage.write_bytes(storage.join(out, RUN_MARKER), text, opts)


def run_identity(plan: Plan) -> dict[str, Any]:
    inputs = [
        [name, s.uri, s.size, s.version] for name, shards in plan.shards.items() for s in shards
    ]
    return commits.run_identity(plan.pipeline.output_hash(), inputs)


def init_ray(address: str | None, num_cpus: int | None) -> None:
    """Connect to ``address``, or start an embedded local Ray sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            log_to_driver=True,
            configure_logging=False,
        )


#: Resources every node has or that name the node itself: not worth a column each.
_BUILTIN_RESOURCES = {"CPU", "GPU", "memory", "object_store_memory"}


def cluster_nodes() -> list[dict[str, Any]]:
    """Every live node of the connected cluster: head or not, CPUs, GPUs, memory and
    custom resources, plus its id and address.  Sorted (head first, then by address
    and id) so that manifests of runs on one cluster list nodes in the same order; it
    lives under ``run`` because ids and addresses change from cluster to cluster."""
    nodes = [_node_row(n) for n in live_nodes()]
    return sorted(nodes, key=lambda n: (not n["head"], n["address"], n["node_id"]))


def _node_row(node: dict[str, Any]) -> dict[str, Any]:
    res: dict[str, float] = node.get("Resources", {})
    custom = {k: v for k, v in sorted(res.items()) if k not in _BUILTIN_RESOURCES and ":" not in k}
    accelerators = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
    return {
        "head": "node:__internal_head__" in res,
        "cpus": res.get("CPU", 0),
        "gpus": res.get("GPU", 0),
        "accelerators": accelerators,
        "memory_bytes": int(res.get("memory", 0)),
        "resources": custom,
        "node_id": node.get("NodeID", ""),
        "address": node.get("NodeManagerAddress", ""),
    }


def run(
    path: str,
    output: str | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    listener: Listener | None = None,
) -> RunResult:
    """Check, then run a pipeline file end to end; write shards, rejects and the manifest.
    ``listener`` receives the run's progress as it goes (see :mod:`curate.progress`)."""
    plan = check(path, overrides)
    return run_plan(plan, output, address, num_cpus, overwrite, resume, listener)


def run_plan(
    plan: Plan,
    output: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    listener: Listener | None = None,
) -> RunResult:
    """Run a checked plan into ``output`` (see :func:`output_dir`).

    ``resume`` finishes an interrupted run: committed units are skipped, and the
    outputs are byte-identical to those of an uninterrupted run.
    """
    out = output_dir(plan.pipeline, output)
    opts = plan.pipeline.spec.storage.options()
    prepare_output(out, overwrite, resume, opts)
    identity = run_identity(plan)
    runner = Runner(plan, out, resume, cache_dir(plan.pipeline, out), listener)
    if resume:
        commits.check_resumable(runner.layout, identity)
    init_ray(address, num_cpus)
    mark_output(out, opts)
    if not resume:
        commits.write_identity(runner.layout, identity)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    runner.run()
    index = build_index(plan, runner.layout, runner.reports)
    resources = cluster_resources()
    run_info = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "stage_seconds": stage_seconds(runner.reports),
        "stage_counters": stage_run_counters(runner.reports),
        "global_stage_seconds": {k: round(v, 4) for k, v in runner.global_seconds.items()},
        "global_stage_phases": runner.global_phases,
        "output": out,
        "resumed": resume,
        "cache": runner.cache_info(),
        "host": platform.node(),
        "cluster": {
            "nodes": len(node_resources()),
            "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0),
            "ray": ray_version(),
            "per_node": cluster_nodes(),
        },
    }
    manifest = build_manifest(
        plan, runner.layout, runner.reports, run_info, runner.global_summaries, index
    )
    write_manifest(manifest, runner.layout)
    write_run_stats(out, manifest, opts)
    return RunResult(out, manifest)


def load_run(out: str, opts: StorageOptions | None = None) -> RunStats:
    """A finished run for analysis (notebooks, ``curate stats``): its manifest, merged
    and per-shard statistics, rejects and plots (see :class:`curate.stats.RunStats`)."""
    return RunStats.load(out, opts)


def explain(out: str, record_id: str, opts: StorageOptions = LOCAL) -> dict[str, Any]:
    """What happened to record ``record_id`` in the finished run in ``out`` (a folder
    or ``s3://`` prefix), answered from the run's id index: see
    :func:`curate.lineage.explain.explain`.  Raises ``ExplainError`` with a one-line
    message for an unknown id or a folder that holds no finished, indexed run."""
    from curate.lineage.explain import explain as explain_record

    return explain_record(out, record_id, opts)
