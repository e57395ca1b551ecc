"""Live progress: per-stage counts while a run goes, in a listener and in
``OUT/_progress.json``; the CLI's ``curate progress``."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl
from typer.testing import CliRunner

from curate.api import run
from curate.cli import app
from curate.cli.run import progress_table
from curate.progress import PROGRESS_FILE, Progress, read_progress

pytestmark = pytest.mark.usefixtures("ray_local")

PIPE = """
name: progress
sources:
  docs: {uri: "docs/*.jsonl"}
stages:
  stats: {type: text_stats, input: docs}
  length: {type: length_filter, input: stats, min_words: 4}
  dedup: {type: exact_dedup, input: length}
sinks:
  out: {input: dedup}
execution:
  unit_bytes: 1KiB
"""


def _docs(root: Path) -> None:
    for shard in range(6):
        rows = [{"text": f"document {shard} {i} " + "word " * (i % 7)} for i in range(30)]
        rows.append({"text": "the same text in every shard of this corpus"})
        write_jsonl(root / "docs" / f"part-{shard}.jsonl", rows)


def test_listener_and_file_follow_the_run(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    _docs(tmp_path)
    out = tmp_path / "out"
    seen: list[dict[str, Any]] = []
    on_disk: list[dict[str, Any]] = []

    def listen(snapshot: dict[str, Any]) -> None:
        seen.append(snapshot)
        if (out / PROGRESS_FILE).exists():  # what another process could read mid-run
            on_disk.append(json.loads((out / PROGRESS_FILE).read_text()))

    m = run(str(pipeline_file(PIPE)), str(out), listener=listen).manifest
    assert seen[-1]["state"] == "finished"
    assert any(s["state"] == "running" and s["units"]["done"] > 0 for s in on_disk)
    final = read_progress(str(out))
    assert final["state"] == "finished"
    for row in m["stages"]:  # the last numbers are the manifest's
        got = final["stages"][row["name"]]
        assert (got["rows_in"], got["kept"], got["dropped"]) == (
            row["rows_in"],
            row["kept"],
            row["dropped"],
        )
    # counts only grow, and some snapshot saw a stage partly done
    docs = [s["stages"].get("docs", {}).get("rows_in", 0) for s in seen]
    assert docs == sorted(docs) and 0 < min(d for d in docs if d) < docs[-1]
    assert final["passes"]["done"] == final["passes"]["total"] >= 1


def test_failed_run_says_so(tmp_path: Path, pipeline_file: Callable[[str], Path]) -> None:
    progress = Progress(str(tmp_path))
    progress.plan(2)
    progress.begin_pass(0, ["a"], 3)
    progress.add([{"kind": "stage", "stage": "a", "rows_in": 5, "kept": 4, "dropped": 1}])
    progress.finish(ok=False)
    snap = read_progress(str(tmp_path))
    assert snap["state"] == "failed" and snap["stages"]["a"]["dropped"] == 1
    assert snap["units"] == {"done": 1, "total": 3}
    assert "a" in str(progress_table(snap).columns[0]._cells)


def test_progress_command(tmp_path: Path) -> None:
    progress = Progress(str(tmp_path))
    progress.add([{"kind": "source", "stage": "docs", "rows_in": 7, "kept": 7, "dropped": 0}])
    progress.finish()
    result = CliRunner().invoke(app, ["progress", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "docs" in result.output and "state: finished" in result.output
    missing = CliRunner().invoke(app, ["progress", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "no _progress.json" in missing.output
