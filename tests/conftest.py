"""Shared fixtures: tiny data written by the tests, one local Ray per test module."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """One real local Ray (2 CPUs) for a whole test module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


#: Run files that legitimately differ between runs of the same inputs (state, timings).
RUN_FILES = ("_commits/", "_work/", "_cache/", "_state/", "_progress.json", ".")


def comparable(rel: str, data: bytes) -> bytes | None:
    """What of a run's file ``rel`` must be byte-identical between runs: None for run
    files, the manifest without its ``run`` key (timings, hosts), anything else whole."""
    if rel.startswith(RUN_FILES):
        return None
    if rel == "manifest.json":
        manifest = json.loads(data)
        manifest.pop("run")
        return json.dumps(manifest, sort_keys=True).encode()
    return data


def user_files(root: Path) -> dict[str, bytes]:
    """Every file a user reads in a run's output (shards, rejects, indexes), and the
    manifest without its ``run`` key: what must be byte-identical between runs
    (``_progress.json``, like the manifest's ``run``, holds timings)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if not path.is_file() or rel.startswith(RUN_FILES):
            continue
        data = comparable(rel, path.read_bytes())
        assert data is not None
        out[rel] = data
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


@pytest.fixture
def pipeline_file(tmp_path: Path) -> Callable[[str], Path]:
    """Write a pipeline YAML into the test's folder and return its path."""

    def make(text: str, name: str = "pipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return path

    return make
