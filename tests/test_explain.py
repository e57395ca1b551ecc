"""``curate explain``: answers from the id index a run writes, for every fate of a record."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import user_files, write_jsonl
from test_s3 import BUCKET, SECRET, s3_endpoint  # noqa: F401 - the loopback S3 fixture
from typer.testing import CliRunner

from curate.api import explain, run
from curate.cli import app
from curate.io import storage
from curate.io.storage import StorageOptions
from curate.lineage import explain as explain_module
from curate.lineage.explain import ExplainError


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """S3 test credentials in the environment before Ray starts (its workers inherit it)."""
    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(
        AWS_ACCESS_KEY_ID="curate-test-key",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


pytestmark = pytest.mark.usefixtures("aws_env", "ray_local")

TEXT = """\
name: explained
seed: 3
sources:
  docs: {uri: "data/*.jsonl", id_column: uid, columns: {url: string}}
stages:
  stats: {type: text_stats, input: docs, cache: true}
  length: {type: length_filter, input: stats, min_words: 3}
  dedup: {type: exact_dedup, input: length}
sinks:
  out: {input: dedup, shard_bytes: 200B}
  tars: {input: dedup, format: webdataset, shard_samples: 2}
execution: {unit_bytes: 1B}
"""

DOCS = [
    [
        {"uid": "d0", "text": "alpha beta gamma delta", "url": "u0"},
        {"uid": "d1", "text": "too short", "url": "u1"},
        {"uid": "d2", "text": "the same text again here", "url": "u2"},
        '{"uid": "bad", "text": "truncated',
        {"uid": "d6", "text": "x " * 300 + "end", "url": "u6"},
    ],
    [
        {"uid": "d3", "text": "The same  text again here", "url": "u3"},
        {"uid": "d4", "text": "one more document with words", "url": "u4"},
        {"uid": "d5", "text": "and the very last one", "url": "u5"},
    ],
]


def _text_project(root: Path) -> Path:
    for i, rows in enumerate(DOCS):
        write_jsonl(root / "data" / f"part-{i}.jsonl", rows)
    spec = root / "p.yaml"
    spec.write_text(TEXT)
    return spec


def _user_files(out: Path) -> dict[str, Any]:
    """What a user reads (see conftest): shards, rejects, the index, and the manifest's
    ``index`` (the rest of the manifest names the code's git state, which may change
    while the test runs in a tree being edited)."""
    files = user_files(out)
    manifest = json.loads(files.pop("manifest.json"))
    return {
        k: v for k, v in files.items() if k.startswith(("_index/", "out/", "tars/", "rejects/"))
    } | {"index": manifest["index"]}


def _index_bytes(out: Path) -> dict[str, bytes]:
    files = sorted(p for p in (out / "_index").rglob("*") if p.is_file())
    return {str(p.relative_to(out)): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One run, then the same run again over it (reusing the stage cache), then a
    ``--resume`` of the finished run: each rewrites the index."""
    root = tmp_path_factory.mktemp("text")
    spec, out = _text_project(root), root / "out"
    first = run(str(spec), str(out))
    snapshots = [(_index_bytes(out), _user_files(out))]
    again = run(str(spec), str(out), overwrite=True)
    assert again.manifest["run"]["cache"]["stages"]["stats"]["reused"] is True
    snapshots.append((_index_bytes(out), _user_files(out)))
    run(str(spec), str(out), resume=True)
    snapshots.append((_index_bytes(out), _user_files(out)))
    return {"out": out, "manifest": first.manifest, "snapshots": snapshots, "root": root}


def _shard_row(out: Path, path: str, row: int) -> dict[str, Any]:
    record: dict[str, Any] = pq.read_table(out / path).slice(row, 1).to_pylist()[0]
    return record


def _tar_key(out: Path, path: str, row: int) -> str:
    with tarfile.open(out / path) as tar:
        keys = list(dict.fromkeys(m.name.split(".", 1)[0] for m in tar.getmembers()))
    return keys[row]


def test_a_landed_record_names_its_shard_row_and_scores(text_run: dict[str, Any]) -> None:
    out = text_run["out"]
    answer = explain(str(out), "d0")
    assert answer["dropped"] == [] and answer["seeded"] == [] and "seed" not in answer
    parquet, tar = answer["landed"]  # two sinks: the record landed twice
    assert (parquet["sink"], parquet["format"], tar["sink"], tar["format"]) == (
        "out",
        "parquet",
        "tars",
        "webdataset",
    )
    row = _shard_row(out, parquet["path"], parquet["row"])
    assert row["id"] == "d0" and parquet["record"]["text"] == row["text"]
    numeric = {k: v for k, v in row.items() if isinstance(v, int | float)}
    assert parquet["scores"] == numeric and numeric["n_words"] == 4
    steps = parquet["stages"]
    assert [s["name"] for s in steps] == ["docs", "stats", "length", "dedup"]
    assert steps[1]["type"] == "text_stats" and steps[1]["scores"]["n_chars"] == 22
    assert parquet["record"]["provenance"] == {"uri": "data/part-0.jsonl", "row": 0}
    # the tar sample, read by its byte range, is the one at that place
    assert _tar_key(out, tar["path"], tar["row"]) == "d0" == tar["record"]["key"]
    assert tar["record"]["text"] == "alpha beta gamma delta" and tar["size"] > 0
    assert tar["stages"] == steps and tar["scores"]["n_words"] == 4


def test_a_long_record_stays_readable(text_run: dict[str, Any]) -> None:
    (landed, _) = explain(str(text_run["out"]), "d6")["landed"]
    text = landed["record"]["text"]
    assert text.startswith("x x ") and text.endswith("… (603 chars)") and len(text) < 230


def test_a_filtered_record_says_where_why_and_its_scores(text_run: dict[str, Any]) -> None:
    answer = explain(str(text_run["out"]), "d1")
    assert answer["landed"] == []
    (drop,) = answer["dropped"]
    assert drop["stage"] == "length" and drop["type"] == "length_filter"
    assert drop["reason"] == "too_few_words" and drop["value"] == "2"
    assert drop["scores"]["n_words"] == 2 and drop["scores"]["n_chars"] == 9
    assert [s["name"] for s in drop["stages"]] == ["docs", "stats"]
    assert drop["stages"][1]["scores"]["n_words"] == 2
    assert drop["path"] == "rejects/length/unit-000000.parquet"
    assert drop["provenance"] == {"uri": "data/part-0.jsonl", "row": 1}


def test_a_duplicate_names_the_kept_record_and_where_it_landed(text_run: dict[str, Any]) -> None:
    (drop,) = explain(str(text_run["out"]), "d3")["dropped"]
    assert drop["reason"] == "exact_duplicate:d2" and drop["stage"] == "dedup"
    assert [s["name"] for s in drop["stages"]] == ["docs", "stats", "length"]
    kept = drop["kept"]
    assert kept["id"] == "d2" and kept["dropped"] == []
    assert {p["sink"] for p in kept["landed"]} == {"out", "tars"}
    where = next(p for p in kept["landed"] if p["sink"] == "out")
    assert _shard_row(text_run["out"], where["path"], where["row"])["id"] == "d2"


def test_a_quarantined_line_is_explained(text_run: dict[str, Any]) -> None:
    out = text_run["out"]
    (bad_id,) = pq.read_table(out / "rejects" / "docs").column("id").to_pylist()
    (drop,) = explain(str(out), bad_id)["dropped"]
    assert drop["quarantined"] is True and drop["stage"] == "docs" and drop["type"] == "source"
    assert drop["reason"].startswith("invalid_json:data/part-0.jsonl line 4:")
    assert drop["stages"] == [] and drop["scores"] == {}


def test_unknown_ids_and_folders_are_one_line_errors(text_run: dict[str, Any]) -> None:
    out = text_run["out"]
    with pytest.raises(ExplainError, match=r"'nope' is not in this run.*1 of 1 index partition"):
        explain(str(out), "nope")
    runner = CliRunner()
    for args, message in (
        ([str(out), "nope"], "is not in this run"),
        ([str(text_run["root"]), "d0"], "not a curate run folder"),
    ):
        result = runner.invoke(app, ["explain", *args])
        assert result.exit_code == 1 and message in result.output
        assert len(result.output.strip().splitlines()) == 1
    bare = text_run["root"] / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["explain", str(bare), "d0"])
    assert result.exit_code == 1 and "has no id index" in result.output


def test_cli_prints_a_tree_or_the_json_answer(text_run: dict[str, Any]) -> None:
    out = str(text_run["out"])
    runner = CliRunner()
    shown = runner.invoke(app, ["explain", out, "d3"])
    assert shown.exit_code == 0
    assert "dropped by dedup" in shown.output and "kept instead: d2" in shown.output
    as_json = runner.invoke(app, ["explain", out, "d0", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.output) == explain(out, "d0")


def test_the_index_is_deterministic_through_cache_reuse_and_resume(
    text_run: dict[str, Any],
) -> None:
    (index, files), *later = text_run["snapshots"]
    assert "_index/index.json" in index and "_index/ids/part-00000.parquet" in index
    for again, again_files in later:
        assert again == index and again_files == files
    manifest = text_run["manifest"]["index"]
    assert manifest["partitions"] == 1 and manifest["hash"].startswith("xxh3_64")
    # one row per landing (2 sinks x 5 kept) and per reject (d1, d3, the bad line)
    assert manifest["rows"] == 13 == manifest["files"][0]["rows"]
    assert json.loads(index["_index/index.json"]) == manifest
    table = pq.read_table(io.BytesIO(index["_index/ids/part-00000.parquet"]))
    keys = list(
        zip(*(table.column(k).to_pylist() for k in ("id", "kind", "name", "path")), strict=True)
    )
    assert keys == sorted(keys)


# --- generated rows, and a llava sink -------------------------------------------------

PLUGIN = '''\
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curate.conversations import CONVERSATION_TYPE
from curate.registry import register_stage
from curate.stage import Generated, Generator, StageConfig


class EchoConfig(StageConfig):
    copies: int = 1


@register_stage("echo_gen")
class Echo(Generator):
    """Each seed gives ``copies`` rows (text + " q<k>"); a text with 'skip' gives none."""

    Config: ClassVar[type[StageConfig]] = EchoConfig

    def writes(self):
        return {**super().writes(), "conversations": CONVERSATION_TYPE}

    def generate(self, batch):
        texts = batch.column("text").to_pylist()
        seed, made, reason = [], [], []
        for i, text in enumerate(texts):
            live = "skip" not in text
            reason.append(None if live else "echo:skipped")
            for k in range(self.config.copies if live else 0):
                seed.append(i)
                made.append(f"{text} q{k}")
        rows = batch.take(pa.array(seed, pa.int64()))
        rows = rows.set_column(rows.column_names.index("text"), "text", pa.array(made, pa.string()))
        turns = [[{"role": "user", "content": t}, {"role": "assistant", "content": "ok"}]
                 for t in made]
        if "conversations" in rows.column_names:  # a generated seed: its own are replaced
            rows = rows.drop_columns(["conversations"])
        rows = rows.append_column("conversations", pa.array(turns, CONVERSATION_TYPE))
        return Generated(rows, np.array(seed, np.int64), pa.array(reason, pa.string()))
'''

GENERATED = """\
name: generated
seed: 1
plugins: [explain_plugin]
sources:
  docs: {uri: "docs.jsonl", id_column: uid}
stages:
  ask: {type: echo_gen, input: docs, copies: 2}
  again: {type: echo_gen, input: ask}
  stats: {type: text_stats, input: again}
  short: {type: length_filter, input: stats, max_words: 6}
sinks:
  table: {input: short}
  chat: {input: short, format: llava}
"""


@pytest.fixture(scope="module")
def generated_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("generated")
    (root / "explain_plugin.py").write_text(PLUGIN)
    seeds = ["alpha beta gamma", "one two three four five", "skip me please"]
    write_jsonl(root / "docs.jsonl", [{"uid": f"s{i}", "text": t} for i, t in enumerate(seeds)])
    (root / "p.yaml").write_text(GENERATED)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(root))
        run(str(root / "p.yaml"), str(root / "out"))
        yield root / "out"


def test_a_generated_row_is_explained_with_its_seeds(generated_run: Path) -> None:
    answer = explain(str(generated_run), "s0/ask/1/again/0")
    chat, table = answer["landed"]  # in index order: by sink name
    assert table["sink"] == "table" and chat["sink"] == "chat" and chat["format"] == "llava"
    assert table["record"]["seed_id"] == "s0/ask/1"
    assert chat["record"]["conversations"][0]["value"] == "alpha beta gamma q1 q0"
    entries = json.loads((generated_run / chat["path"]).read_text())
    assert entries[chat["row"]]["id"] == "s0/ask/1/again/0"
    names = ["docs", "ask", "again", "stats", "short"]
    assert [s["name"] for s in table["stages"]] == names
    assert [s["name"] for s in chat["stages"]] == names  # a llava row has no source column
    middle = answer["seed"]  # consumed by `again`: found through its child
    assert middle["id"] == "s0/ask/1" and middle["landed"] == middle["dropped"] == []
    (made,) = middle["seeded"]
    assert made["stage"] == "again" and made["rows"] == 1
    assert made["children"][0]["id"] == "s0/ask/1/again/0"
    first = middle["seed"]
    assert first["id"] == "s0" and "seed" not in first
    (by_ask,) = first["seeded"]
    assert [s["name"] for s in by_ask["stages"]] == ["docs"]  # what it passed first
    assert by_ask["rows"] == 2 and [c["id"] for c in by_ask["children"]] == ["s0/ask/0", "s0/ask/1"]


def test_generated_rows_dropped_later_and_seeds_dropped_by_the_generator(
    generated_run: Path,
) -> None:
    answer = explain(str(generated_run), "s1/ask/0/again/0")
    (drop,) = answer["dropped"]
    assert drop["stage"] == "short" and drop["reason"] == "too_many_words"
    assert [s["name"] for s in drop["stages"]] == ["docs", "ask", "again", "stats"]
    assert answer["seed"]["seed"]["id"] == "s1"
    (ask,) = answer["seed"]["seed"]["seeded"]
    assert ask["children"][0]["at"][0]["dropped_by"] == "short"
    (skipped,) = explain(str(generated_run), "s2")["dropped"]
    assert skipped["stage"] == "ask" and skipped["reason"] == "echo:skipped"
    assert [s["name"] for s in skipped["stages"]] == ["docs"]
    shown = CliRunner().invoke(app, ["explain", str(generated_run), "s0/ask/1/again/0"])
    assert (
        shown.exit_code == 0 and "seed s0/ask/1" in shown.output and "seeded 2 row" in shown.output
    )


# --- S3 ----------------------------------------------------------------------------------

S3_PIPELINE = """\
name: on_s3
seed: 4
sources:
  docs: {{uri: "data/*.jsonl", id_column: uid, columns: {{url: string}}}}
stages:
  stats: {{type: text_stats, input: docs}}
  length: {{type: length_filter, input: stats, min_words: 3}}
sinks:
  out: {{input: length, shard_bytes: 200B}}
storage:
  s3: {{endpoint_url: "{endpoint}"}}
execution: {{unit_bytes: 1B}}
"""


@pytest.mark.s3
def test_an_s3_run_is_explained_from_several_partitions(
    s3_endpoint: str,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _text_project(tmp_path)
    spec = tmp_path / "s3.yaml"
    spec.write_text(S3_PIPELINE.format(endpoint=s3_endpoint))
    monkeypatch.setattr(explain_module, "ROWS_PER_PARTITION", 1)  # 8 rows: 8 partitions
    out = f"s3://{BUCKET}/explained"
    manifest = run(str(spec), out).manifest
    assert manifest["index"]["partitions"] == 8
    opts = StorageOptions(endpoint_url=s3_endpoint)
    assert len(manifest["index"]["files"]) == 8
    landed = explain(out, "d3", opts)["landed"][0]
    row = storage.read_bytes(f"{out}/{landed['path']}", opts)
    table = pq.read_table(io.BytesIO(row)).slice(landed["row"], 1).to_pylist()[0]
    assert table["id"] == "d3" and landed["scores"]["n_words"] == table["n_words"]
    assert explain(out, "d1", opts)["dropped"][0]["reason"] == "too_few_words"
    with pytest.raises(ExplainError, match="1 of 8 index partition"):
        explain(out, "nope", opts)
    result = CliRunner().invoke(app, ["explain", out, "d1", "--endpoint-url", s3_endpoint])
    assert result.exit_code == 0 and "too_few_words" in result.output
