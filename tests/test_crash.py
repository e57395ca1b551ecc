"""Crash isolation: a record that kills its worker process (a segfault, ``os._exit``)
makes Ray restart the actor and run the unit again; after ``execution.isolate_after``
such attempts the unit's stages run in a sandbox process, which bisects the killing
rows out and quarantines them (reason ``<type>:error``), and the run ends."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import user_files, write_jsonl

from curate.api import run
from curate.config import ConfigError, load_pipeline
from curate.io.layout import Layout
from curate.lineage.quarantine import OnError, SandboxError
from curate.registry import load_plugins, plugin_locations
from curate.runner import StageGroup, StageRef, UnitKeepsDyingError, run_stage
from curate.sandbox import Sandbox, begin_attempt, death
from curate.stage import POS, UNIT

PLUGIN = """\
import os
import signal
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curate.registry import register_stage
from curate.stage import Filter, StageConfig, Verdict


class CrashConfig(StageConfig):
    #: Kill the process on a marked row (SEGV: SIGSEGV, EXIT: os._exit(3)); else raise.
    crash: bool = True
    #: Kill the process in setup(), or raise there.
    crash_setup: bool = False
    raise_setup: bool = False


def check(text, crash):
    for marker in ("SEGV", "EXIT"):
        if marker in text:
            if crash and marker == "SEGV":
                os.kill(os.getpid(), signal.SIGSEGV)
            if crash:
                os._exit(3)
            raise ValueError(f"{marker} in {text!r}")


@register_stage("crash_filter")
class CrashFilter(Filter):
    Config: ClassVar[type[StageConfig]] = CrashConfig

    def __init__(self, config, context):
        super().__init__(config, context)
        self.seen = 0
        self.calls = 0

    def setup(self):
        if self.config.crash_setup:
            os._exit(5)
        if self.config.raise_setup:
            raise OSError("no model here")

    def reads(self):
        return ("text",)

    def decide(self, batch):
        self.calls += 1
        texts = batch["text"].to_pylist()
        for text in texts:
            self.seen += 1  # counted before the row kills the process or raises
            check(text, self.config.crash)
        keep = np.array([len(t.split()) >= 4 for t in texts], bool)
        reason = pa.array([None if k else "too_short" for k in keep], pa.string())
        return Verdict(keep, reason, None)

    def counters(self):
        return {"seen": self.seen}

    def run_counters(self):
        return {"calls": self.calls}
"""

PIPELINE = """\
name: crash
seed: 5
plugins: [crash_plugin]
sources:
  docs: {{uri: "data/*.jsonl", id_column: uid}}
stages:
  stats: {{type: text_stats}}
  crash: {{type: crash_filter, crash: {crash}, resources: {{batch_size: 5}}}}
sinks:
  out: {{input: crash}}
execution: {{unit_bytes: 1B, max_errors: 2}}
"""

#: Rows that kill the process: (file, line) -> marker.  One unit holds both: each
#: attempt at a unit that kills the actor costs a restart of it (seconds on 2 CPUs).
POISONED = {(1, 4): "SEGV", (1, 9): "EXIT"}
DEATHS = {"SEGV": "signal 11: SIGSEGV", "EXIT": "exit code 3"}


def corpus(root: Path, poisoned: bool = True) -> None:
    for f in range(4):
        rows = []
        for i in range(12):
            marker = POISONED.get((f, i))
            if marker is not None and not poisoned:
                continue
            words = " ".join(f"w{j}" for j in range(i % 6))
            rows.append({"uid": f"d{f}-{i:02d}", "text": f"Doc {f}-{i} {marker or ''} {words}"})
        write_jsonl(root / "data" / f"part-{f}.jsonl", rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The crashing corpus run twice, with the stage raising instead of crashing, and
    without the crashing rows."""
    root = tmp_path_factory.mktemp("crash")
    (root / "crash_plugin.py").write_text(PLUGIN)
    projects = {"crash": (True, True), "raised": (False, True), "clean": (True, False)}
    for name, (crash, poisoned) in projects.items():
        corpus(root / name, poisoned)
        (root / name / "p.yaml").write_text(PIPELINE.format(crash=str(crash).lower()))
    seconds = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        for out, project in (("out1", "crash"), ("out2", "crash"), ("raised_out", "raised")):
            start = time.perf_counter()
            run(str(root / project / "p.yaml"), str(root / out))
            seconds[out] = time.perf_counter() - start
        run(str(root / "clean" / "p.yaml"), str(root / "clean_out"))
        yield {"root": root, "seconds": seconds}


def manifest(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / "manifest.json").read_text()))


def rejects(out: Path) -> dict[str, dict[str, Any]]:
    """The rejects by id, without their provenance (a row's line in its file)."""
    table = pq.read_table(out / "rejects").drop_columns(["provenance"])
    return {r["id"]: r for r in table.to_pylist()}


@pytest.mark.usefixtures("ray_local")
def test_rows_that_kill_the_process_are_quarantined_and_the_run_ends(
    runs: dict[str, Any],
) -> None:
    root: Path = runs["root"]
    out, clean, raised = root / "out1", root / "clean_out", root / "raised_out"
    dropped = rejects(out)
    errors = {i: r for i, r in dropped.items() if r["reason"] == "crash_filter:error"}
    assert set(errors) == {f"d{f}-{i:02d}" for f, i in POISONED}
    for (f, i), marker in POISONED.items():
        r = errors[f"d{f}-{i:02d}"]
        assert r["stage"] == "crash"
        assert r["value"] == f"worker process died ({DEATHS[marker]}) while processing this row"

    # Every other row: what the run without the crashing rows gives.
    def rows(root: Path) -> dict[str, dict[str, Any]]:
        table = pq.read_table(root / "out").drop_columns(["provenance"])
        return {r["id"]: r for r in table.to_pylist()}

    assert rows(out) == rows(clean)
    others = {i: r for i, r in dropped.items() if i not in errors}
    assert others == rejects(clean)

    # Accounting balances; the crashed calls count nothing.
    stages = {s["name"]: s for s in manifest(out)["stages"]}
    for s in stages.values():
        assert s["rows_in"] == s["kept"] + s["dropped"] == s["kept"] + sum(s["reasons"].values())
    too_short = {s["name"]: s for s in manifest(clean)["stages"]}["crash"]["reasons"]["too_short"]
    assert stages["crash"]["reasons"] == {"crash_filter:error": 2, "too_short": too_short}
    assert stages["crash"]["counters"] == {"seen": 46}  # the 46 rows of calls that gave rows
    assert manifest(out)["rejects"]["rows"] == len(dropped)

    # Two runs: byte-identical.  A run in which the stage raises on those rows instead:
    # the same outputs, rejects but for the two values, counters and reasons.
    assert user_files(out) == user_files(root / "out2")
    same, other = user_files(out), user_files(raised)
    assert {k for k in same if same[k] != other[k]} == {
        "manifest.json",  # the rejects files' checksums
        "rejects/crash/unit-000001.parquet",
        "stats/rejects/crash/unit-000001.json",  # their statistics
        "stats/summary.json",
    }
    assert {i: {**r, "value": None} for i, r in dropped.items()} == {
        i: {**r, "value": None} for i, r in rejects(raised).items()
    }
    assert [r["value"].splitlines()[-1] for i, r in rejects(raised).items() if i in errors] == [
        "ValueError: SEGV in 'Doc 1-4 SEGV w0 w1 w2 w3'",
        "ValueError: EXIT in 'Doc 1-9 EXIT w0 w1 w2'",
    ]
    assert stages == {s["name"]: s for s in manifest(raised)["stages"]}

    # The markers of attempts are run state, cleared when the run ends.
    assert not [p for p in out.rglob("*") if "attempt" in p.name and p.is_file()]
    print("run seconds:", {k: round(v, 1) for k, v in runs["seconds"].items()})


# In-process: the sandbox itself, without Ray.


@pytest.fixture
def plugin(tmp_path: Path) -> Iterator[list[tuple[str, str | None]]]:
    (tmp_path / "crash_plugin.py").write_text(PLUGIN)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        locations = plugin_locations(["crash_plugin"])
        load_plugins(locations)
        yield locations


def unit_rows(texts: list[str]) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": texts,
            "source": ["docs"] * n,
            "provenance": [{"uri": "x.jsonl", "row": i} for i in range(n)],
            UNIT: pa.array([0] * n, pa.int64()),
            POS: pa.array(range(n), pa.int64()),
        }
    )


def test_the_sandbox_bisects_to_the_rows_that_kill_it_and_counts_as_the_stage(
    plugin: list[tuple[str, str | None]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    texts = [f"row {' w' * (i % 5)}" for i in range(16)]
    texts[5], texts[12] = "SEGV row", "EXIT row"
    outcomes = {}
    for crash in (True, False):
        ref = StageRef("crash", "crash_filter", {"crash": crash}, None)
        layout = Layout(str(tmp_path / str(crash)))
        with Sandbox(ref, 0, layout, plugin) as sandbox, caplog.at_level(logging.WARNING):
            kept, report = run_stage(
                "crash",
                ref.build(0),
                None,
                0,
                layout,
                unit_rows(texts),
                OnError("c:error", 2),
                sandbox,
            )
        outcomes[crash] = kept, report, sandbox.started
    (kept, report, started), (raised_kept, raised_report, one) = outcomes[True], outcomes[False]
    assert kept.equals(raised_kept) and kept.num_rows == 6  # i % 5 in (3, 4): 4 words
    assert report["reasons"] == raised_report["reasons"] == {"c:error": 2, "too_short": 8}
    assert report["counters"] == raised_report["counters"] == {"seen": 14}  # calls with rows
    # Each death costs a child: 16 rows, 8, 4, 2, 1 for row 5, then 8, 4, 2, 1 for row 12.
    assert (started, one) == (10, 1)
    assert raised_report["run_counters"] == {"calls": 15}  # every call made
    assert report["run_counters"] == {"calls": 6}  # a dead child's calls are lost
    rows = pq.read_table(tmp_path / "True" / "rejects" / "crash").to_pylist()
    assert {r["id"]: r["value"] for r in rows if r["reason"] == "c:error"} == {
        "r5": "worker process died (signal 11: SIGSEGV) while processing this row",
        "r12": "worker process died (exit code 3) while processing this row",
    }
    quarantined = [r.getMessage() for r in caplog.records if "quarantined" in r.getMessage()]
    assert quarantined[:2] == [
        "stage 'crash', unit 0: quarantined record r5 (c:error): "
        "worker process died (signal 11: SIGSEGV)",
        "stage 'crash', unit 0: quarantined record r12 (c:error): "
        "worker process died (exit code 3)",
    ]


@pytest.mark.parametrize(
    ("setup", "error"),
    [
        ("crash_setup", r"its sandbox process died \(exit code 5\) in setup\(\)$"),
        ("raise_setup", r"setup\(\) failed in its sandbox:\nTraceback(.|\n)*OSError: no model"),
    ],
)
def test_a_sandbox_whose_setup_fails_fails_the_run(
    plugin: list[tuple[str, str | None]], tmp_path: Path, setup: str, error: str
) -> None:
    """No row's fault: nothing is quarantined (``max_errors`` would allow the row)."""
    ref = StageRef("crash", "crash_filter", {setup: True}, None)
    layout = Layout(str(tmp_path))
    with Sandbox(ref, 0, layout, plugin) as sandbox, pytest.raises(SandboxError, match=error):
        run_stage(
            "crash", ref.build(0), None, 0, layout, unit_rows(["a"]), OnError("c", 1), sandbox
        )


def test_attempts_are_counted_per_group_and_unit(tmp_path: Path) -> None:
    layout = Layout(str(tmp_path))
    assert [begin_attempt(layout, 0, "stats", 3) for _ in range(3)] == [0, 1, 2]
    assert begin_attempt(layout, 0, "stats", 4) == begin_attempt(layout, 1, "stats", 3) == 0
    assert begin_attempt(layout, 0, "other", 3) == 0
    assert sorted(os.listdir(tmp_path / "_work" / "_attempts" / "seg-000" / "stats")) == [
        "unit-000003",
        "unit-000004",
    ]
    assert death(-11) == "signal 11: SIGSEGV" and death(-9) == "signal 9: SIGKILL"
    assert death(3) == "exit code 3"


def test_a_unit_whose_worker_dies_even_isolated_fails_the_run(
    plugin: list[tuple[str, str | None]], tmp_path: Path
) -> None:
    """Attempts 0-1 run as usual, 2-4 isolated; a sixth attempt means the worker dies
    outside the stages (its read, its writer): an error, not an endless retry."""
    layout = Layout(str(tmp_path))
    ref = StageRef("crash", "crash_filter", {}, None)
    group = StageGroup([ref], 0, layout, [], 0, plugin, isolate_after=2)
    assert [group._isolated(7) for _ in range(5)] == [False, False, True, True, True]
    with pytest.raises(UnitKeepsDyingError, match=r"unit 7: started 6 times and never fin"):
        group._isolated(7)
    assert group._isolated(8) is False  # per unit


def test_isolate_after_is_validated_with_file_and_line(
    pipeline_file: Callable[[str], Path],
) -> None:
    base = "name: t\nsources: {docs: {uri: d.jsonl}}\nsinks: {out: {input: docs}}\n"
    assert load_pipeline(pipeline_file(base)).spec.execution.isolate_after == 2
    text = base + "execution:\n"
    spec = load_pipeline(pipeline_file(text + "  isolate_after: 0\n")).spec
    assert spec.execution.isolate_after == 0
    for bad in ("-1", "true", "two", "1.5"):
        path = pipeline_file(text + f"  isolate_after: {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_pipeline(path)
        (line,) = str(info.value).splitlines()
        assert line.startswith(f"{path}:5: execution.isolate_after: expected a count"), line
