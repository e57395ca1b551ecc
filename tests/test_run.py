"""End-to-end runs on a real local Ray: lineage, accounting, determinism, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

from curate.api import run

pytestmark = pytest.mark.usefixtures("ray_local")

PIPELINE = """\
name: t
seed: 5
sources:
  docs:
    uri: data/*.jsonl
    columns: {url: string}
stages:
  stats: {type: text_stats}
  length: {type: length_filter, min_words: 3}
  dedup: {type: exact_dedup}
sinks:
  out: {input: dedup, shard_bytes: 1KiB}
execution:
  unit_bytes: 3KiB
"""


def corpus(root: Path) -> None:
    """Three shards with cross-shard duplicates, short texts and one bad line."""
    for s in range(3):
        rows: list[Any] = []
        for i in range(40):
            k = (s * 40 + i) % 55  # texts 0..54 repeat across shards
            words = " ".join(f"w{k}x{j}" for j in range(k % 9))
            rows.append({"text": f"Document {k}: {words}", "url": f"u{s}-{i}"})
        if s == 1:
            rows.insert(7, '{"text": "truncated')
        write_jsonl(root / "data" / f"part-{s}.jsonl", rows)


@pytest.fixture
def project(tmp_path: Path, pipeline_file: Callable[[str], Path]) -> Path:
    corpus(tmp_path)
    return pipeline_file(PIPELINE)


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*.parquet"))
        if "_work" not in p.parts
    }


def test_counts_balance_and_lineage_is_complete(project: Path, tmp_path: Path) -> None:
    result = run(str(project), str(tmp_path / "out"))
    m = result.manifest
    stages = {s["name"]: s for s in m["stages"]}
    for s in m["stages"]:
        assert s["rows_in"] == s["kept"] + s["dropped"] == s["kept"] + sum(s["reasons"].values())
    assert stages["docs"]["rows_in"] == 121 and stages["docs"]["reasons"] == {"invalid_json": 1}
    assert stages["length"]["reasons"]["too_few_words"] > 0
    assert (
        stages["dedup"]["reasons"]["exact_duplicate"] == 120 - 55 - 0
        or stages["dedup"]["dropped"] > 0
    )

    out = pq.read_table(tmp_path / "out" / "out")
    rejects = pq.read_table(tmp_path / "out" / "rejects")
    assert out.num_rows == stages["dedup"]["kept"]
    assert rejects.num_rows == sum(s["dropped"] for s in m["stages"]) == m["rejects"]["rows"]
    assert rejects.column_names == ["id", "stage", "reason", "value", "provenance", "scores"]
    # Every input row is either in the output or in the rejects, exactly once.
    seen = {(r["uri"], r["row"]) for r in out.column("provenance").to_pylist()}
    dropped = {(r["uri"], r["row"]) for r in rejects.column("provenance").to_pylist()}
    assert not seen & dropped and len(seen | dropped) == 121
    # Duplicates name a kept record that is in the output.
    kept_ids = set(out.column("id").to_pylist())
    dups = [r for r in rejects.to_pylist() if r["stage"] == "dedup"]
    assert dups and all(
        r["reason"] == f"exact_duplicate:{r['value']}" and r["value"] in kept_ids for r in dups
    )
    bad = [r for r in rejects.to_pylist() if r["stage"] == "docs"]
    assert bad[0]["reason"].startswith("invalid_json:data/part-1.jsonl line 8:")


def test_manifest_records_inputs_outputs_and_checksums(project: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    m = run(str(project), str(out_dir)).manifest
    assert m["pipeline"]["spec"]["stages"]["length"]["min_words"] == 3
    assert len(m["pipeline"]["spec_hash"]) == 64 and m["seed"] == 5
    assert m["software"]["packages"]["ray"].startswith("2.")
    for item in m["inputs"]:
        data = (project.parent / item["uri"]).read_bytes()
        assert item["sha256"] == hashlib.sha256(data).hexdigest() and item["bytes"] == len(data)
    shards = m["outputs"]["out"]
    assert len(shards) > 3  # three units, cut at 1 KiB
    for shard in shards:
        data = (out_dir / shard["path"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
        assert pq.ParquetFile(out_dir / shard["path"]).metadata.num_rows == shard["rows"]
    assert not list(out_dir.rglob(".*.tmp-*"))
    names = sorted(p.name for p in (out_dir / "out").iterdir())
    assert names == [Path(s["path"]).name for s in shards]


def test_same_output_bytes_with_one_or_two_cpus(project: Path, tmp_path: Path) -> None:
    two = tmp_path / "two"
    one = tmp_path / "one"
    m2 = run(str(project), str(two)).manifest
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "curate.cli",
            "run",
            str(project),
            "--output",
            str(one),
            "--num-cpus",
            "1",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact_duplicate" in proc.stdout and "rows in" in proc.stdout
    m1 = json.loads((one / "manifest.json").read_text())
    assert m1["run"]["cluster"]["cpus"] == 1 and m2["run"]["cluster"]["cpus"] == 2
    assert files_under(one) == files_under(two)
    del m1["run"], m2["run"]
    assert m1 == m2


def test_branches_union_and_several_sinks(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    corpus(tmp_path)
    write_jsonl(tmp_path / "books" / "b.jsonl", [{"text": f"book {i} " * 5} for i in range(10)])
    path = pipeline_file("""\
name: branchy
sources:
  web: {uri: data/*.jsonl}
  books: {uri: books/*.jsonl}
stages:
  stats: {type: text_stats, input: web}
  length: {type: length_filter, input: stats, min_words: 3}
  dedup: {type: exact_dedup, input: length}
  both: {type: text_stats, input: [dedup, books]}
sinks:
  main: {input: both}
  filtered: {input: length}
""")
    m = run(str(path), str(tmp_path / "out")).manifest
    stages = {s["name"]: s for s in m["stages"]}
    assert stages["both"]["rows_in"] == stages["dedup"]["kept"] + 10
    main = pq.read_table(tmp_path / "out" / "main")
    assert main.num_rows == stages["both"]["kept"]
    assert set(main.column("source").to_pylist()) == {"web", "books"}
    assert pq.read_table(tmp_path / "out" / "filtered").num_rows == stages["length"]["kept"]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b'{"text": "broken\n', "invalid_json:data/bad.jsonl line 2: Unterminated string"),
        (b'{"text": "caf\xe9 au lait"}\n', "bad_utf8:data/bad.jsonl line 2: invalid UTF-8"),
        (b'{"title": "no text here"}\n', "missing_text:data/bad.jsonl line 2: no 'text' field"),
    ],
    ids=["invalid_json", "bad_utf8", "missing_text"],
)
def test_bad_rows_are_quarantined_in_a_real_run(
    tmp_path: Path, pipeline_file: Callable[[str], Path], content: bytes, reason: str
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.jsonl").write_bytes(b'{"text": "a good line of words"}\n' + content)
    path = pipeline_file(PIPELINE)
    m = run(str(path), str(tmp_path / "out")).manifest
    docs = m["stages"][0]
    assert (docs["rows_in"], docs["kept"], docs["dropped"]) == (2, 1, 1)
    rejects = pq.read_table(tmp_path / "out" / "rejects" / "docs").to_pylist()
    assert len(rejects) == 1 and rejects[0]["reason"].startswith(reason)


def test_empty_input_file_runs_with_zero_rows(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.jsonl").write_bytes(b"")
    write_jsonl(tmp_path / "data" / "full.jsonl", [{"text": "one two three four"}])
    m = run(str(pipeline_file(PIPELINE)), str(tmp_path / "out")).manifest
    assert [s["rows_in"] for s in m["stages"]] == [1, 1, 1, 1]
    empty = next(i for i in m["inputs"] if i["uri"].endswith("empty.jsonl"))
    assert (empty["bytes"], empty["records"]) == (0, 0)


def test_output_folder_is_never_mixed_with_an_older_run(project: Path, tmp_path: Path) -> None:
    from curate.api import OutputExistsError

    out = tmp_path / "out"
    run(str(project), str(out))
    with pytest.raises(OutputExistsError, match="holds a previous run; pass --resume"):
        run(str(project), str(out))
    stale = out / "out" / "part-999999-0000.parquet"
    stale.write_bytes(b"old")
    run(str(project), str(out), overwrite=True)
    assert not stale.exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"not a curate run.*choose another --output"):
            run(str(project), str(foreign), overwrite=overwrite)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_a_stage_no_node_can_hold_fails_before_running(project: Path, tmp_path: Path) -> None:
    from curate.runner import ResourceError

    with pytest.raises(ResourceError, match=r"stage 'stats' asks for \{CPU: 1, GPU: 1\}"):
        run(str(project), str(tmp_path / "out"), ["stages.stats.resources.num_gpus=1"])
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize(
    "layout",
    ["first_unit_all_quarantined", "all_filtered_before_dedup", "zero_rows_overall"],
)
def test_global_stage_with_empty_units(
    tmp_path: Path, pipeline_file: Callable[[str], Path], layout: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    good = [{"text": f"words {i % 3} one two three"} for i in range(6)]
    if layout == "first_unit_all_quarantined":
        (data / "a.jsonl").write_text("not json\n{broken\n")
        write_jsonl(data / "b.jsonl", good)
    elif layout == "all_filtered_before_dedup":
        write_jsonl(data / "a.jsonl", [{"text": "x"}] * 3)
        write_jsonl(data / "b.jsonl", good)
    else:
        (data / "a.jsonl").write_text("not json\n")
    path = pipeline_file(PIPELINE.replace("unit_bytes: 3KiB", "unit_bytes: 10"))
    m = run(str(path), str(tmp_path / "out")).manifest
    for s in m["stages"]:
        assert s["rows_in"] == s["kept"] + s["dropped"]
    dedup = next(s for s in m["stages"] if s["name"] == "dedup")
    expected = {"zero_rows_overall": 0}.get(layout, 3)
    assert dedup["kept"] == expected


def test_a_failed_run_can_be_replaced(tmp_path: Path, pipeline_file: Callable[[str], Path]) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"text": "one two three four"}])
    (data / "b.jsonl.gz").write_bytes(b"\x1f\x8b not gzip at all")
    path = pipeline_file(PIPELINE.replace("uri: data/*.jsonl", "uri: data/*.jsonl*"))
    with pytest.raises(Exception, match=r"b.jsonl.gz: cannot decompress"):
        run(str(path), str(tmp_path / "out"))
    (data / "b.jsonl.gz").unlink()
    m = run(str(path), str(tmp_path / "out"), overwrite=True).manifest
    assert m["stages"][0]["rows_in"] == 1


def test_union_of_sources_has_one_schema(
    tmp_path: Path, pipeline_file: Callable[[str], Path]
) -> None:
    write_jsonl(
        tmp_path / "web" / "w.jsonl", [{"text": f"web page {i}", "url": f"u{i}"} for i in range(3)]
    )
    (tmp_path / "books").mkdir()
    pq.write_table(
        pa.table({"text": [f"book {i} text" for i in range(2)], "year": [1999, 2001]}),
        tmp_path / "books" / "b.parquet",
    )
    path = pipeline_file("""\
name: union
sources:
  web: {uri: web/*.jsonl, columns: {url: string}}
  books: {uri: books/*.parquet}
stages:
  both: {type: text_stats, input: [web, books]}
sinks:
  out: {input: both}
""")
    run(str(path), str(tmp_path / "out"))
    shards = sorted((tmp_path / "out" / "out").glob("*.parquet"))
    schemas = {pq.read_schema(s).remove_metadata() for s in shards}
    assert len(shards) == 2 and len(schemas) == 1
    table = pq.read_table(tmp_path / "out" / "out")
    assert table.column_names[:6] == ["id", "text", "source", "provenance", "url", "year"]
    rows = {r["text"]: r for r in table.to_pylist()}
    assert rows["web page 1"]["url"] == "u1" and rows["web page 1"]["year"] is None
    assert rows["book 1 text"]["year"] == 2001 and rows["book 1 text"]["n_words"] == 3

    conflict = pipeline_file(
        path.read_text().replace("columns: {url: string}", "columns: {url: string, year: string}"),
        "conflict.yaml",
    )
    from curate.config import ConfigError

    with pytest.raises(ConfigError, match=r"column 'year' is string in 'web' but int64 in 'books'"):
        run(str(conflict), str(tmp_path / "out2"))
