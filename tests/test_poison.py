"""Poisoned records: a map stage that raises on a few rows quarantines them (reason
``<type>:error``, the traceback as the reject's value) and the run goes on."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import user_files, write_jsonl
from typer.testing import CliRunner

from curate.api import run
from curate.cli import _original, app
from curate.config import ConfigError, load_pipeline
from curate.config.model import error_limit
from curate.io.layout import Layout
from curate.lineage.accounting import AccountingError
from curate.lineage.explain import explain
from curate.lineage.quarantine import OnError, QuarantineLimitError, format_error
from curate.runner import run_stage
from curate.stage import POS, UNIT, Annotator, Generated, Generator, StageContext

PLUGIN = """\
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curate.registry import register_stage
from curate.stage import Annotator, Filter, Generated, Generator, StageConfig, Verdict


class PoisonConfig(StageConfig):
    marker: str = "POISON"
    #: Return one row too few for a row with the marker (a broken contract).
    short: bool = False


def shout(text, marker):
    if marker in text:
        raise ValueError("poisoned")
    return sum(c.isupper() for c in text)


@register_stage("poison_annotator")
class PoisonAnnotator(Annotator):
    Config: ClassVar[type[StageConfig]] = PoisonConfig

    def __init__(self, config, context):
        super().__init__(config, context)
        self.scored = 0

    def reads(self):
        return ("text",)

    def writes(self):
        return {"n_upper": pa.int64()}

    def process_batch(self, batch):
        texts = batch.column("text").to_pylist()
        if self.config.short and any(self.config.marker in t for t in texts):
            batch = batch.slice(1)
            texts = texts[1:]
        out = []
        for text in texts:
            self.scored += 1  # counted before the row raises: a half-done call
            out.append(shout(text, self.config.marker))
        return batch.append_column("n_upper", pa.array(out, pa.int64()))

    def counters(self):
        return {"scored": self.scored}


@register_stage("poison_filter")
class PoisonFilter(Filter):
    Config: ClassVar[type[StageConfig]] = PoisonConfig

    def reads(self):
        return ("text",)

    def decide(self, batch):
        texts = batch["text"].to_pylist()
        words = [len(t.split()) + 0 * shout(t, self.config.marker) for t in texts]
        keep = np.array([w >= 4 for w in words], bool)
        reason = pa.array([None if k else "too_short" for k in keep], pa.string())
        value = pa.array([None if k else str(w) for k, w in zip(keep, words)], pa.string())
        return Verdict(keep, reason, value)


@register_stage("poison_gen")
class PoisonGen(Generator):
    Config: ClassVar[type[StageConfig]] = PoisonConfig

    def reads(self):
        return ("text",)

    def generate(self, batch):
        seed, made = [], []
        for i, text in enumerate(batch["text"].to_pylist()):
            shout(text, self.config.marker)
            for k in range(1 + i % 2):  # rows per seed depend on its place in the batch
                seed.append(i)
                made.append(f"{text} #{k}")
        rows = batch.take(pa.array(seed, pa.int64()))
        rows = rows.set_column(rows.column_names.index("text"), "text", pa.array(made))
        reason = pa.nulls(batch.num_rows, pa.string())
        return Generated(rows, np.array(seed, np.int64), reason)
"""

PIPELINE = """\
name: poison
seed: 3
plugins: [poison_plugin]
sources:
  docs: {uri: "data/*.jsonl", id_column: uid}
stages:
  annotate: {type: poison_annotator, resources: {batch_size: 4}}
  keep: {type: poison_filter, marker: TOXIC}
  stats: {type: text_stats}
sinks:
  out: {input: stats}
execution: {unit_bytes: 1B}
"""

#: Poisoned rows: (file, line) -> marker; at most one per stage and unit (10 % of 15 rows).
POISONED = {(0, 3): "POISON", (2, 14): "POISON", (1, 7): "TOXIC", (3, 0): "TOXIC"}


def corpus(root: Path, poisoned: bool = True) -> None:
    for f in range(4):
        rows = []
        for i in range(15):
            words = " ".join(f"Word{j}" if j % 3 else f"w{j}" for j in range(i % 7))
            marker = POISONED.get((f, i))
            if marker is not None and not poisoned:
                continue
            text = f"Doc {f}-{i} {marker or ''} {words}".strip()
            rows.append({"uid": f"d{f}-{i:02d}", "text": text})
        write_jsonl(root / "data" / f"part-{f}.jsonl", rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """The poisoned corpus run twice, once with every unit isolated (each stage in a
    sandbox process, ``isolate_after: 0``), and the corpus without the poisoned rows."""
    root = tmp_path_factory.mktemp("poison")
    (root / "poison_plugin.py").write_text(PLUGIN)
    clean, isolated = root / "clean", root / "isolated"
    for where, poisoned in ((root, True), (clean, False), (isolated, True)):
        corpus(where, poisoned)
        (where / "p.yaml").write_text(PIPELINE)
    (isolated / "p.yaml").write_text(PIPELINE.replace("1B}", "1B, isolate_after: 0}"))
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        run(str(root / "p.yaml"), str(root / "out1"))
        run(str(root / "p.yaml"), str(root / "out2"))
        run(str(clean / "p.yaml"), str(root / "out_clean"))
        run(str(isolated / "p.yaml"), str(root / "out_isolated"))
        yield {
            "root": root,
            "out": root / "out1",
            "again": root / "out2",
            "clean": root / "out_clean",
            "isolated": root / "out_isolated",
        }


@pytest.mark.usefixtures("ray_local")
def test_poisoned_rows_are_quarantined_and_the_rest_is_the_clean_run(
    runs: dict[str, Path],
) -> None:
    out, clean = runs["out"], runs["clean"]
    rejects = pq.read_table(out / "rejects").to_pylist()
    errors = {r["id"]: r for r in rejects if r["reason"].endswith(":error")}
    assert set(errors) == {f"d{f}-{i:02d}" for f, i in POISONED}
    for (f, i), marker in POISONED.items():
        r = errors[f"d{f}-{i:02d}"]
        stage, kind = (
            ("annotate", "poison_annotator") if marker == "POISON" else ("keep", "poison_filter")
        )
        assert (r["stage"], r["reason"]) == (stage, f"{kind}:error")
        trace = r["value"]
        assert trace.startswith("Traceback (most recent call last):")
        assert trace.rstrip().endswith("ValueError: poisoned")
        assert 'File "poison_plugin.py"' in trace and "in shout" in trace  # the plugin's frame
        assert 'File "curate/runner.py"' in trace  # relative to sys.path: no machine paths
        assert " at 0x" not in trace and str(runs["root"]) not in trace
        assert "During handling" not in trace  # the search chains no contexts

    # Every other row: the same outcome as in the run without the poisoned rows.
    def rows(root: Path) -> dict[str, dict[str, Any]]:
        table = pq.read_table(root / "out").drop_columns(["provenance"])
        return {r["id"]: r for r in table.to_pylist()}

    assert rows(out) == rows(clean)
    others = {
        (r["id"], r["stage"], r["reason"], r["value"]) for r in rejects if r["id"] not in errors
    }
    assert others == {
        (r["id"], r["stage"], r["reason"], r["value"])
        for r in pq.read_table(clean / "rejects").to_pylist()
    }

    # Accounting: balanced, the errors counted in full, the counters of good calls only.
    manifest = runs_manifest(out)
    stages = {s["name"]: s for s in manifest["stages"]}
    for s in manifest["stages"]:
        assert s["rows_in"] == s["kept"] + s["dropped"] == s["kept"] + sum(s["reasons"].values())
    clean_stages = {s["name"]: s for s in runs_manifest(clean)["stages"]}
    assert stages["annotate"]["reasons"] == {"poison_annotator:error": 2}
    too_short = clean_stages["keep"]["reasons"]["too_short"]
    assert too_short > 0
    assert stages["keep"]["reasons"] == {"poison_filter:error": 2, "too_short": too_short}
    assert stages["annotate"]["counters"] == {"scored": 58}  # not the rows of calls that raised
    assert clean_stages["annotate"]["counters"] == {"scored": 56}
    assert manifest["rejects"]["rows"] == len(rejects)

    # Two runs: byte-identical outputs, rejects (tracebacks) and manifests.
    assert user_files(out) == user_files(runs["again"])


@pytest.mark.usefixtures("ray_local")
def test_a_unit_in_a_sandbox_gives_the_same_bytes(runs: dict[str, Path]) -> None:
    """Isolation only costs time: the same rows, rejects, tracebacks (their outermost
    frame is the worker's) and counters as in the worker, so a unit isolated after a
    node death changes nothing."""
    out, isolated = user_files(runs["out"]), user_files(runs["isolated"])
    assert {k for k in out if out[k] != isolated[k]} == {"manifest.json"}
    one, two = runs_manifest(runs["out"]), runs_manifest(runs["isolated"])
    assert one["pipeline"]["spec"]["execution"]["isolate_after"] == 2
    assert two["pipeline"]["spec"]["execution"]["isolate_after"] == 0
    for manifest in (one, two):
        manifest.pop("run"), manifest.pop("pipeline")
    assert one == two
    assert not [p for p in runs["isolated"].rglob("*") if "attempt" in p.name]


def runs_manifest(root: Path) -> dict[str, Any]:
    import json

    return dict(json.loads((root / "manifest.json").read_text()))


@pytest.mark.usefixtures("ray_local")
def test_explain_shows_the_reason_and_the_traceback(runs: dict[str, Path]) -> None:
    answer = explain(str(runs["out"]), "d0-03")
    (drop,) = answer["dropped"]
    assert drop["stage"] == "annotate" and drop["reason"] == "poison_annotator:error"
    assert drop["traceback"].rstrip().endswith("ValueError: poisoned")
    shown = CliRunner().invoke(app, ["explain", str(runs["out"]), "d0-03"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "dropped by annotate (poison_annotator): poison_annotator:error" in shown.output
    assert "ValueError: poisoned" in shown.output and "poison_plugin.py" in shown.output
    assert "Traceback (most recent call last):" in shown.output


@pytest.fixture
def plugin_project(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    (tmp_path / "poison_plugin.py").write_text(PLUGIN)
    corpus(tmp_path)

    def make(stages: str, execution: str = "{unit_bytes: 1B}") -> Path:
        path = tmp_path / "p.yaml"
        path.write_text(
            "name: broken\nplugins: [poison_plugin]\n"
            'sources:\n  docs: {uri: "data/*.jsonl", id_column: uid}\n'
            f"stages:\n{stages}sinks:\n  out: {{input: bad}}\nexecution: {execution}\n"
        )
        return path

    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(tmp_path))
        yield make


@pytest.mark.usefixtures("ray_local")
def test_a_stage_raising_on_every_row_fails_the_run(
    plugin_project: Callable[[str], Path], tmp_path: Path
) -> None:
    path = plugin_project('  bad: {type: poison_filter, marker: "Doc"}\n')
    with pytest.raises(Exception) as info:
        run(str(path), str(tmp_path / "out"))
    cause = _original(info.value, (QuarantineLimitError,))
    assert cause is not None, info.value
    message = str(cause)
    assert "stage 'bad' raised on 2 of the 15 rows of unit" in message
    assert "execution.max_errors ('10%': 1 row(s))" in message
    assert "Traceback (most recent call last):" in message and "ValueError: poisoned" in message


@pytest.mark.usefixtures("ray_local")
def test_max_errors_zero_fails_on_the_first_error_with_the_stages_exception(
    plugin_project: Callable[[str], Path], tmp_path: Path
) -> None:
    path = plugin_project("  bad: {type: poison_annotator}\n", "{unit_bytes: 1B, max_errors: 0}")
    with pytest.raises(Exception, match="poisoned") as info:
        run(str(path), str(tmp_path / "out"))
    assert _original(info.value, (QuarantineLimitError,)) is None
    assert _original(info.value, (ValueError,)) is not None


@pytest.mark.usefixtures("ray_local")
def test_an_accounting_error_still_fails_the_run(
    plugin_project: Callable[[str], Path], tmp_path: Path
) -> None:
    path = plugin_project("  bad: {type: poison_annotator, short: true}\n")
    with pytest.raises(Exception, match=r"annotator 'bad' changed the row count") as info:
        run(str(path), str(tmp_path / "out"))
    assert _original(info.value, (AccountingError,)) is not None


def test_max_errors_is_validated_with_file_and_line(
    pipeline_file: Callable[[str], Path], tmp_path: Path
) -> None:
    base = "name: t\nsources: {docs: {uri: d.jsonl}}\nsinks: {out: {input: docs}}\n"
    assert load_pipeline(pipeline_file(base)).spec.execution.max_errors == "10%"
    text = base + "execution:\n"
    assert load_pipeline(pipeline_file(text + "  max_errors: 5\n")).spec.execution.max_errors == 5
    spec = load_pipeline(pipeline_file(text + "  max_errors: 2.5 %\n")).spec
    assert spec.execution.max_errors == "2.5%"
    for bad in ("lots", "-1", "150%", "true", "0.5"):
        path = pipeline_file(text + f"  max_errors: {bad}\n")
        with pytest.raises(ConfigError) as info:
            load_pipeline(path)
        (line,) = str(info.value).splitlines()
        assert line.startswith(f"{path}:5: execution.max_errors: expected a row count"), line


def test_error_limit() -> None:
    assert [error_limit("10%", n) for n in (1, 9, 10, 15, 20, 1000)] == [1, 1, 1, 1, 2, 100]
    assert error_limit("0%", 1000) == 0 and error_limit("100%", 7) == 7
    assert error_limit(3, 1) == 3


# In-process: run_stage itself, without Ray.


class Counting(Annotator):
    """Raises on rows whose ``text`` holds ``bad``; counts rows as it goes."""

    def __init__(self) -> None:
        super().__init__(Annotator.Config(), StageContext(name="count", seed=0))
        self.seen = 0
        self.calls: list[int] = []

    def process_batch(self, batch: pa.Table) -> pa.Table:
        self.calls.append(batch.num_rows)
        out = []
        for text in batch["text"].to_pylist():
            self.seen += 1
            if "bad" in text:
                raise KeyError(f"bad row {object()!r}")
            out.append(len(text))
        return batch.append_column("n", pa.array(out, pa.int64()))

    def counters(self) -> dict[str, int]:
        return {"seen": self.seen}

    def run_counters(self) -> dict[str, int]:
        return {"calls": len(self.calls)}


def unit_rows(texts: list[str]) -> pa.Table:
    n = len(texts)
    provenance = [{"uri": "x.jsonl", "row": i} for i in range(n)]
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": texts,
            "source": ["docs"] * n,
            "provenance": provenance,
            UNIT: pa.array([0] * n, pa.int64()),
            POS: pa.array(range(n), pa.int64()),
        }
    )


def test_bisection_finds_the_rows_and_keeps_counters_of_good_calls_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    texts = [f"row {i}" for i in range(16)]
    texts[5] = texts[12] = "bad row"
    stage = Counting()
    layout = Layout(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="curate.lineage.quarantine"):
        kept, report = run_stage(
            "count", stage, None, 0, layout, unit_rows(texts), OnError("counting:error", 2)
        )
    assert kept["id"].to_pylist() == [f"r{i}" for i in range(16) if i not in (5, 12)]
    assert kept["n"].to_pylist() == [len(t) for t in texts if t != "bad row"]
    assert report["rows_in"] == 16 and report["kept"] == 14 and report["dropped"] == 2
    assert report["reasons"] == {"counting:error": 2}  # in full, though not reason_details
    assert report["counters"] == {"seen": 14}  # rows of calls that raised are not counted
    assert report["run_counters"] == {"calls": len(stage.calls)}  # all the work done
    assert stage.calls == [16, 8, 4, 4, 2, 1, 1, 2, 8, 4, 4, 2, 1, 1, 2]
    rejects = pq.read_table(tmp_path / "rejects" / "count" / "unit-000000.parquet").to_pylist()
    assert [r["id"] for r in rejects] == ["r5", "r12"]
    for r in rejects:
        assert r["value"].startswith("Traceback (most recent call last):")
        assert r["value"].rstrip().endswith("KeyError: 'bad row <object object at 0x…>'")
        assert "During handling" not in r["value"] and len(r["value"]) < 2000
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [
        f"stage 'count', unit 0: quarantined record r{i} (counting:error): "
        "KeyError: 'bad row <object object at 0x…>'"
        for i in (5, 12)
    ]


def test_the_limit_counts_rows_of_every_batch_of_the_unit(tmp_path: Path) -> None:
    texts = ["bad", "ok", "ok", "bad", "ok", "bad"]
    stage = Counting()
    with pytest.raises(QuarantineLimitError, match=r"raised on 3 of the 6 rows of unit 0") as info:
        run_stage(
            "count", stage, 2, 0, Layout(str(tmp_path)), unit_rows(texts), OnError("c:error", 2)
        )
    assert "The first error, on record r0:\nTraceback" in str(info.value)


def test_every_row_of_a_unit_may_go_within_the_limit(tmp_path: Path) -> None:
    stage = Counting()
    kept, report = run_stage(
        "count",
        stage,
        None,
        0,
        Layout(str(tmp_path)),
        unit_rows(["bad"]),
        OnError("c:error", "10%"),
    )
    assert kept.num_rows == 0 and report["dropped"] == 1 and "counters" not in report


class Twice(Generator):
    """Two rows per seed; raises on a seed holding ``bad``."""

    def __init__(self) -> None:
        super().__init__(Generator.Config(), StageContext(name="gen", seed=0))

    def generate(self, batch: pa.Table) -> Generated:
        texts = batch["text"].to_pylist()
        if any("bad" in t for t in texts):
            raise RuntimeError("cannot make rows")
        seed = np.repeat(np.arange(len(texts)), 2)
        rows = batch.take(pa.array(seed))
        return Generated(rows, seed, pa.nulls(len(texts), pa.string()))


def test_a_generator_keeps_its_ids_through_bisection(tmp_path: Path) -> None:
    texts = [f"seed {i}" for i in range(7)]
    layout = Layout(str(tmp_path))
    whole, _ = run_stage("gen", Twice(), None, 0, layout, unit_rows(texts), OnError("t:error", 1))
    texts[3] = "bad seed"
    split, report = run_stage(
        "gen", Twice(), None, 1, layout, unit_rows(texts), OnError("t:error", 1)
    )
    expected = [f"r{i}/gen/{k}" for i in range(7) if i != 3 for k in (0, 1)]
    assert split["id"].to_pylist() == expected
    assert split["seed_id"].to_pylist() == [i.split("/")[0] for i in expected]
    assert split[POS].to_pylist() == list(range(12))  # positions in the unit: 0.. again
    assert report["rows_out"] == 12 and report["reasons"] == {"t:error": 1}
    assert [i for i in whole["id"].to_pylist() if not i.startswith("r3/")] == expected


def test_tracebacks_are_the_same_in_every_run_and_cut_at_a_line() -> None:
    def fail() -> None:
        raise ValueError(f"broken {object()!r}")

    def trace() -> str:
        try:
            fail()
        except ValueError as exc:
            return format_error(exc)
        raise AssertionError

    one, two = trace(), trace()
    assert one == two and "at 0x…" in one and 'File "test_poison.py"' in one
    assert not re.search(r"0x[0-9a-f]{4,}", one)
    try:
        try:
            fail()
        except ValueError as exc:
            raise RuntimeError("x" * 50 + "\n" + "y" * 5000) from exc
    except RuntimeError as exc:
        cut = format_error(exc, limit=300)
    assert cut.startswith("…\n") and len(cut) <= 302 and cut.endswith("y\n")
    assert sys.path  # the names above are relative to a sys.path entry
