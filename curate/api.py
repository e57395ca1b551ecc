"""Python entry points: validate and run a pipeline."""

from __future__ import annotations

import os
import platform
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from curate.config.load import Pipeline, load_pipeline
from curate.dag import Plan, build_plan
from curate.lineage.manifest import build_manifest, stage_seconds, write_manifest
from curate.runner import Runner, cluster_resources, node_resources, ray_version


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
        return os.path.abspath(output)
    if pipeline.spec.output is not None:
        return os.path.abspath(pipeline.base_dir / pipeline.spec.output)
    return os.path.abspath(os.path.join("out", pipeline.spec.name))


RUN_MARKER = ".curate-run"


class OutputExistsError(FileExistsError):
    """The output folder holds files; a run never mixes its shards with older ones."""


def prepare_output(out: str, overwrite: bool) -> None:
    """Refuse a non-empty output folder, or with ``overwrite`` empty one that holds a run."""
    root = Path(out)
    if not root.exists() or not any(root.iterdir()):
        return
    is_run = (root / RUN_MARKER).exists() or (root / "manifest.json").exists()
    if not overwrite and is_run:
        raise OutputExistsError(
            f"output folder {out} holds a previous run; pass --overwrite to replace it, "
            "or choose another --output"
        )
    if not is_run:
        raise OutputExistsError(
            f"output folder {out} holds files that are not a curate run "
            f"(no {RUN_MARKER} or manifest.json); choose another --output"
        )
    shutil.rmtree(root)


def mark_output(out: str) -> None:
    """First act of a run: mark the folder, so that a failed run can be replaced."""
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / RUN_MARKER).write_text("written by curate; --overwrite may replace this folder\n")


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


def run(
    path: str,
    output: str | None = None,
    overrides: list[str] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Check, then run a pipeline file end to end; write shards, rejects and the manifest."""
    plan = check(path, overrides)
    return run_plan(plan, output, address, num_cpus, overwrite)


def run_plan(
    plan: Plan,
    output: str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Run a checked plan into ``output`` (see :func:`output_dir`)."""
    out = output_dir(plan.pipeline, output)
    prepare_output(out, overwrite)
    init_ray(address, num_cpus)
    mark_output(out)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    runner = Runner(plan, out)
    runner.run()
    resources = cluster_resources()
    run_info = {
        "started_at": started.isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - t0, 3),
        "stage_seconds": stage_seconds(runner.reports),
        "global_stage_seconds": {k: round(v, 4) for k, v in runner.global_seconds.items()},
        "output": out,
        "host": platform.node(),
        "cluster": {
            "nodes": len(node_resources()),
            "cpus": resources.get("CPU", 0),
            "gpus": resources.get("GPU", 0),
            "ray": ray_version(),
        },
    }
    manifest = build_manifest(plan, runner.layout, runner.reports, run_info)
    write_manifest(manifest, runner.layout)
    return RunResult(out, manifest)
