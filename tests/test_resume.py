"""--resume: kill the driver with SIGKILL part-way through a real run, resume, compare bytes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import user_files, write_jsonl

SLOW_PLUGIN = '''\
import os
import time
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curate.registry import register_stage
from curate.stage import Filter, StageConfig, Verdict


class SlowConfig(StageConfig):
    seconds: float = 0.2


@register_stage("slow_pass")
class SlowPass(Filter):
    """Keeps every row after a pause; logs each call (to count what a run recomputed)."""

    Config: ClassVar[type[StageConfig]] = SlowConfig

    def decide(self, batch: pa.Table) -> Verdict:
        time.sleep(self.config.seconds)
        with open(os.environ["SLOW_LOG"], "a") as log:
            log.write(f"{batch.num_rows}\\n")
        n = batch.num_rows
        return Verdict(np.ones(n, bool), pa.nulls(n, pa.string()))
'''

PIPELINE = """\
name: resumable
seed: 11
plugins: [slow_plugin]
sources:
  docs: {uri: "data/part-*.jsonl"}
stages:
  slow: {type: slow_pass, input: docs}
  stats: {type: text_stats, input: slow}
  length: {type: length_filter, input: stats, min_words: 3}
  dedup: {type: exact_dedup, input: length}
sinks:
  out: {input: dedup, shard_bytes: 2KiB}
execution:
  unit_bytes: 1B
"""

UNITS = 30


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "slow_plugin.py").write_text(SLOW_PLUGIN)
    for s in range(UNITS):
        rows = [{"text": f"doc {(s * 7 + i) % 90} " + "word " * (i % 6)} for i in range(12)]
        if s == 4:
            rows.append("{not json")
        write_jsonl(tmp_path / "data" / f"part-{s:03d}.jsonl", rows)
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    return path


def _env(tmp_path: Path, log: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "SLOW_LOG": str(tmp_path / log),
        "RAY_DEDUP_LOGS": "0",
    }


def _cli(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "curate.cli", *args]


def test_sigkill_midway_then_resume_gives_byte_identical_outputs(
    project: Path, tmp_path: Path
) -> None:
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(
        _cli(["run", str(project), "-o", str(ref), "--num-cpus", "2"]),
        env=_env(tmp_path, "ref.log"),
        check=True,
        capture_output=True,
        timeout=300,
    )
    proc = subprocess.Popen(
        _cli(["run", str(project), "-o", str(out), "--num-cpus", "2"]),
        env=_env(tmp_path, "killed.log"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    commits = out / "_commits" / "seg-000"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if commits.is_dir() and len(list(commits.glob("unit-*.json"))) >= 5:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)  # the driver, with no chance to clean up
        proc.wait(timeout=30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever Ray left in the session
    # Ray workers live in their own process groups and may finish a unit or two after
    # the driver died (they die with it soon after): count once the log is still.
    done_before, still_since = -1, time.monotonic()
    while time.monotonic() - still_since < 2.0 and time.monotonic() < deadline:
        now = len(list(commits.glob("unit-*.json")))
        if now != done_before:
            done_before, still_since = now, time.monotonic()
        time.sleep(0.1)
    assert 5 <= done_before < UNITS
    assert not (out / "manifest.json").exists()

    resumed = subprocess.run(
        _cli(["run", str(project), "-o", str(out), "--num-cpus", "2", "--resume"]),
        env=_env(tmp_path, "resumed.log"),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # committed units were not recomputed
    recomputed = len((tmp_path / "resumed.log").read_text().splitlines())
    assert recomputed <= UNITS - done_before
    assert user_files(out) == user_files(ref)
    assert not list(out.rglob(".*.tmp-*"))  # killed writers' temporary files were cleared
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["resumed"] is True


def test_resume_refuses_another_spec_or_changed_inputs(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = _env(tmp_path, "a.log")
    args = ["run", str(project), "-o", str(out), "--num-cpus", "1"]
    subprocess.run(_cli(args), env=env, check=True, capture_output=True, timeout=300)
    other = subprocess.run(
        _cli([*args, "--resume", "--set", "stages.length.min_words=4"]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert other.returncode == 1
    assert "different pipeline spec" in other.stderr
    # What no data byte depends on may change between a run and its resume.
    same = [
        "execution.max_errors=5",
        "execution.isolate_after=0",
        "stages.stats.resources.num_cpus=0.5",
        "description=x",
    ]
    resumed = subprocess.run(
        _cli([*args, "--resume", *(a for kv in same for a in ("--set", kv))]),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    write_jsonl(tmp_path / "data" / "part-000.jsonl", [{"text": "changed since"}])
    changed = subprocess.run(
        _cli([*args, "--resume"]), env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert changed.returncode == 1
    assert "inputs changed" in changed.stderr
    assert "part-000.jsonl" in changed.stderr
