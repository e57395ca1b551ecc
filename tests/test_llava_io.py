"""LLaVA-style conversation data in and out: the ``llava`` source and sink."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import user_files
from PIL import Image

from curate.config import ConfigError
from curate.config.model import SourceSpec
from curate.conversations import CONVERSATION_TYPE
from curate.io import storage
from curate.io.files import list_shards, plan_units
from curate.io.layout import Layout
from curate.io.readers import read_unit
from curate.io.sink import SinkError, llava_entries, webdataset_samples, write_llava_sink
from curate.lineage.commits import files_of


def png(color: str, size: tuple[int, int] = (4, 3)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def qa(question: str = "<image>\nWhat colour is it?", answer: str = "Red.") -> list[Any]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def read(path: Path, **spec: Any) -> tuple[pa.Table, pa.Table]:
    source = SourceSpec(uri=path.name, format="llava", **spec)
    (unit,) = plan_units("llava", list_shards(path.name, path.parent), 1 << 40, 0)
    table, rejects, inputs = read_unit(unit, source)
    assert inputs[0].records == table.num_rows + rejects.num_rows  # counts balance
    return table, rejects


def reasons(rejects: pa.Table) -> list[str]:
    return [r.split(":", 1)[0] for r in rejects.column("reason").to_pylist()]


def write_json(path: Path, entries: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries), encoding="utf-8")
    return path


def write_lines(path: Path, lines: list[Any]) -> Path:
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    path.write_bytes(gzip.compress(text.encode()) if path.name.endswith(".gz") else text.encode())
    return path


# --- reading -------------------------------------------------------------------------


def test_reads_a_json_array_with_both_spellings(tmp_path: Path) -> None:
    red = png("red")
    (tmp_path / "imgs" / "coco").mkdir(parents=True)
    (tmp_path / "imgs" / "coco" / "1.png").write_bytes(red)
    path = write_json(
        tmp_path / "data.json",
        [
            {"id": "1", "image": "coco/1.png", "conversations": qa(), "data_source": "coco"},
            {
                "id": "2",
                "conversations": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"},
                ],
            },
            {"id": "3", "image": ["coco/1.png"], "conversations": qa(), "image_source": "x"},
        ],
    )
    table, rejects = read(path, id_column="id", image_root=str(tmp_path / "imgs"))
    assert rejects.num_rows == 0
    assert table.column_names == [
        "id",
        "text",
        "source",
        "provenance",
        "conversations",
        "image",
        "image_url",
        "image_source",
        "_unit",
        "_pos",
    ]
    assert table.schema.field("conversations").type.equals(CONVERSATION_TYPE)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["conversations"] == [
        {"role": "user", "content": "<image>\nWhat colour is it?"},
        {"role": "assistant", "content": "Red."},
    ]
    assert rows[0]["text"] == "What colour is it?\n\nRed."  # no <image> placeholder
    assert rows[1]["text"] == "Be brief.\n\nHi\n\nHello"
    assert rows[1]["conversations"][0] == {"role": "system", "content": "Be brief."}
    assert [r["image"] for r in rows] == [red, None, red]
    assert [r["image_url"] for r in rows] == ["coco/1.png", None, "coco/1.png"]
    assert [r["image_source"] for r in rows] == ["coco", "llava", "x"]
    assert [r["provenance"] for r in rows] == [{"uri": "data.json", "row": i} for i in range(3)]


def test_reads_jsonl_with_inline_bytes_and_derived_ids(tmp_path: Path) -> None:
    blue = png("blue")
    path = write_lines(
        tmp_path / "data.jsonl.gz",
        [
            {"idx": 7, "image": {"bytes": b64(blue)}, "conversations": qa(), "score": 0.5},
            {"conversations": qa("Hi", "Hello"), "score": 1},
        ],
    )
    table, rejects = read(path, columns={"score": "float64"})
    assert rejects.num_rows == 0
    rows = table.to_pylist()
    assert rows[0]["image"] == blue and rows[0]["image_url"] is None
    assert rows[1]["image"] is None and rows[1]["text"] == "Hi\n\nHello"
    assert [r["score"] for r in rows] == [0.5, 1.0]
    assert len({r["id"] for r in rows}) == 2 and all(len(r["id"]) == 32 for r in rows)
    again, _ = read(path, columns={"score": "float64"})
    assert again.column("id").equals(table.column("id"))  # derived ids are stable
    by_idx, _ = read(path, id_column="idx")
    assert by_idx.column("id").to_pylist() == ["7"]  # mmSSR's `idx` as the id


def test_every_bad_sample_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    (tmp_path / "ok.png").write_bytes(png("red"))
    two = [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]
    lines: list[Any] = [
        {"id": "ok", "image": "ok.png", "conversations": qa()},
        '{"id": "broken", ',
        "",
        "[1, 2]",
        {"id": "noconv"},
        {"id": "role", "conversations": [{"from": "alien", "value": "x"}]},
        {"id": "turn", "conversations": [{"from": "human"}]},
        {"id": "order", "conversations": two},
        {"id": "placeholder", "conversations": qa()},  # <image> without an image
        {"id": "multi", "image": ["ok.png", "ok.png"], "conversations": qa()},
        {"id": "b64", "image": {"bytes": "not base64!"}, "conversations": qa()},
        {"id": "ref", "image": 5, "conversations": qa()},
        {"id": "gone", "image": "sub/missing.png", "conversations": qa()},
        {"image": "ok.png", "conversations": qa()},  # no id
        '{"id": "dup", "id": "again", "conversations": []}',
        {"id": "src", "conversations": qa("Hi", "Hello"), "image_source": 3},
    ]
    path = write_lines(tmp_path / "data.jsonl", lines)
    table, rejects = read(path, id_column="id")
    assert table.column("id").to_pylist() == ["ok"]
    assert reasons(rejects) == [
        "invalid_json",
        "blank_line",
        "not_an_object",
        "bad_conversation",
        "bad_role",
        "bad_turn",
        "bad_conversation",
        "bad_conversation",
        "multi_image",
        "bad_image_bytes",
        "bad_image_ref",
        "missing_image",
        "missing_id",
        "invalid_json",
        "bad_column",
    ]
    rows = rejects.to_pylist()
    assert rows[0]["reason"].startswith("invalid_json:data.jsonl line 2: ")
    assert rows[0]["value"] == '{"id": "broken", '
    assert rows[0]["provenance"] == {"uri": "data.jsonl", "row": 1}
    missing = rows[11]["reason"]
    assert missing == "missing_image:data.jsonl line 13: no file 'sub/missing.png' under image_root"
    assert "<image> placeholder without an image" in rows[7]["reason"]
    assert rows[13]["reason"].endswith("duplicate key 'id'")
    assert len({r["id"] for r in rows}) == len(rows)


def test_a_json_file_that_does_not_parse_is_one_reject(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('[{"id": "1", "conversations": []},\n {"id": ')
    table, rejects = read(broken)
    assert table.num_rows == 0
    (row,) = rejects.to_pylist()
    assert row["reason"].startswith("invalid_json:broken.json: Expecting value (line 2 column")
    assert row["provenance"] == {"uri": "broken.json", "row": 0}
    obj = write_json(tmp_path / "obj.json", {"id": "1"})
    assert reasons(read(obj)[1]) == ["not_an_array"]
    mixed = write_json(tmp_path / "mixed.json", [{"conversations": qa("a", "b")}, "text"])
    table, rejects = read(mixed)
    assert table.num_rows == 1
    assert rejects.column("reason").to_pylist() == [
        "not_an_object:mixed.json element 1: expected a JSON object, got str"
    ]


def test_hostile_image_paths_never_read_outside_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "inside.png").write_bytes(png("green"))
    secret = png("black", (5, 5))
    (tmp_path / "secret.png").write_bytes(secret)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(tmp_path, root / "linkdir")
    hostile = [
        "../secret.png",
        str(tmp_path / "secret.png"),
        "link.png",
        "linkdir/secret.png",
        "sub/../../secret.png",
        "..\\secret.png",
    ]
    entries = [{"image": p, "conversations": qa()} for p in ["inside.png", *hostile]]
    path = write_json(tmp_path / "data.json", entries)
    opened: list[str] = []
    real_read = storage.read_bytes

    def spy(uri: str, opts: Any = storage.LOCAL) -> bytes:
        opened.append(uri)
        return real_read(uri, opts)

    monkeypatch.setattr(storage, "read_bytes", spy)
    table, rejects = read(path, image_root=str(root))
    assert table.column("image_url").to_pylist() == ["inside.png"]
    assert reasons(rejects) == ["unsafe_path"] * len(hostile)
    assert "resolves outside image_root" in rejects.column("reason")[2].as_py()
    shard = str(path.resolve())
    assert [p for p in opened if p != shard] == [str((root / "inside.png").resolve())]
    assert secret not in (table.column("image").to_pylist())


def test_load_images_false_keeps_references_and_reads_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blue = png("blue")
    path = write_json(
        tmp_path / "data.json",
        [
            {"image": "nowhere/x.jpg", "conversations": qa()},
            {"image": {"bytes": b64(blue)}, "conversations": qa()},
            {"image": "../x.jpg", "conversations": qa()},
        ],
    )
    opened: list[str] = []
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda u, o=None: opened.append(u) or real_read(u))
    table, rejects = read(path, load_images=False)
    assert opened == [str(path.resolve())]  # the file itself, no image
    assert table.column("image_url").to_pylist() == ["nowhere/x.jpg", None]
    assert table.column("image").to_pylist() == [None, blue]  # inline bytes cost no read
    assert reasons(rejects) == ["unsafe_path"]


LLAVA_SOURCE = """\
name: cfg
sources:
  chat:
    uri: data.json
    format: {fmt}
    {extra}
sinks:
  out: {{input: chat, format: {sink}}}
"""


def test_config_checks(tmp_path: Path, pipeline_file: Callable[[str], Path]) -> None:
    from curate.api import check

    write_json(tmp_path / "data.json", [{"conversations": qa("a", "b")}])
    (tmp_path / "data.jsonl").write_text('{"text": "x"}\n')
    cases = {
        ("jsonl", "image_root: imgs", "parquet"): "image_root only with 'format: llava'",
        ("llava", "columns: {conversations: string}", "parquet"): "column names not reserved",
        ("llava", "image_root: nowhere", "parquet"): "sources.chat.image_root: expected a folder",
    }
    for (fmt, extra, sink), expected in cases.items():
        with pytest.raises(ConfigError, match=expected):
            check(str(pipeline_file(LLAVA_SOURCE.format(fmt=fmt, extra=extra, sink=sink))))
    text_only = LLAVA_SOURCE.format(fmt="jsonl", extra="", sink="llava").replace(".json", ".jsonl")
    with pytest.raises(ConfigError, match=r"sinks\.out\.format: a llava sink writes the 'conv"):
        check(str(pipeline_file(text_only)))
    plan = check(str(pipeline_file(LLAVA_SOURCE.format(fmt="llava", extra="", sink="llava"))))
    assert plan.columns["chat"]["conversations"].equals(CONVERSATION_TYPE)
    assert plan.pipeline.spec.sources["chat"].base_dir == str(tmp_path.resolve())


def test_sink_refuses_rows_without_conversations(tmp_path: Path) -> None:
    table = pa.table({"id": ["a", "b"], "conversations": pa.array([[], None], CONVERSATION_TYPE)})
    with pytest.raises(SinkError, match="record a has no conversation"):
        llava_entries(table, "out", "images/part-000000", None)
    with pytest.raises(SinkError, match="no 'conversations' column"):
        write_llava_sink(
            pa.table({"id": ["a"]}), Layout(str(tmp_path)), "out", 0, 1 << 20, None, None
        )


# --- end to end ----------------------------------------------------------------------

PIPELINE = """\
name: llava_round_trip
seed: 1
sources:
  chat:
    uri: data/*.json*
    format: llava
    id_column: id
    image_root: images          # relative to this file, like uri
    columns: {score: float64}
stages:
  stats: {type: text_stats, input: chat}
  length: {type: length_filter, input: stats, min_words: 3}
sinks:
  llava: {input: length, format: llava, shard_samples: 1, columns: [score]}
  table: {input: length}
execution: {unit_bytes: 1}    # one unit per file
"""


def _corpus(root: Path) -> dict[str, bytes]:
    images = {"red": png("red"), "green": png("green", (6, 2)), "blue": png("blue", (2, 6))}
    (root / "images" / "coco").mkdir(parents=True)
    (root / "images" / "coco" / "red.png").write_bytes(images["red"])
    (root / "images" / "green.png").write_bytes(images["green"])
    write_json(
        root / "data" / "a.json",
        [
            {"id": "r1", "image": "coco/red.png", "conversations": qa(), "score": 1.5},
            {"id": "g1", "image": "green.png", "conversations": qa(answer="Green, surely.")},
            {"id": "short", "conversations": qa("Hi", "Yo")},  # dropped: too few words
            {"id": "gone", "image": "missing.png", "conversations": qa()},  # quarantined
        ],
    )
    write_lines(
        root / "data" / "b.jsonl",
        [
            {"id": "../b1", "image": {"bytes": b64(images["blue"])}, "conversations": qa()},
            {"id": "t1", "conversations": qa("Say something nice", "You are kind."), "score": 2},
        ],
    )
    return images


@pytest.mark.usefixtures("ray_local")
def test_round_trip_through_a_pipeline(tmp_path: Path, pipeline_file: Any) -> None:
    from curate.api import run

    images = _corpus(tmp_path)
    spec = pipeline_file(PIPELINE)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # image_root resolves against the pipeline file, not the cwd
    try:
        result = run(str(spec), str(tmp_path / "out1"))
    finally:
        os.chdir(cwd)
    run(str(spec), str(tmp_path / "out2"))
    out = tmp_path / "out1"
    assert user_files(out) == user_files(tmp_path / "out2")  # byte-identical, images too

    manifest = result.manifest
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["chat"]["rows_in"] == 6 and stages["chat"]["reasons"] == {"missing_image": 1}
    assert stages["length"]["kept"] == 4
    for sink in ("llava", "table"):
        assert sum(f["rows"] for f in manifest["outputs"][sink]) == 4
    assert [f["path"] for f in manifest["outputs"]["llava"]] == [
        "llava/part-000000-0000.json",
        "llava/part-000000-0001.json",
        "llava/part-000001-0000.json",
        "llava/part-000001-0001.json",
    ]
    (shown,) = [i for i in manifest["images"] if i["path"] == "llava/images/part-000001"]
    assert shown["files"] == 1 and shown["bytes"] == len(images["blue"])
    assert sum(i["files"] for i in manifest["images"]) == 3
    commits = [json.loads(p.read_text()) for p in (out / "_commits").rglob("unit-*.json")]
    reported = [f for c in commits for f in files_of(c["reports"])]
    assert all(os.path.getsize(p) == size for p, size in reported)
    assert sum("/images/" in p for p, _ in reported) == 3  # --resume checks every image

    _check_llava_files(out / "llava")
    _check_read_back(out, images)


def _check_llava_files(llava: Path) -> None:
    assert json.loads((llava / "part-000000-0000.json").read_text()) == [
        {
            "id": "r1",
            "image": "images/part-000000/r1.png",
            "conversations": qa(),
            "image_source": "chat",
            "score": 1.5,
        }
    ]
    (green,) = json.loads((llava / "part-000000-0001.json").read_text())
    assert list(green) == ["id", "image", "conversations", "image_source", "score"]
    raw = (llava / "part-000001-0000.json").read_bytes()
    assert raw.startswith(b'[\n  {\n    "id": "../b1",\n    "image": "images/part-000001/id-')
    (text_only,) = json.loads((llava / "part-000001-0001.json").read_text())
    assert "image" not in text_only
    for path in llava.rglob("*.png"):  # the id '../b1' could not climb out
        assert path.resolve().is_relative_to((llava / "images").resolve())


def _check_read_back(out: Path, images: dict[str, bytes]) -> None:
    """The llava output read back: the same conversations and byte-identical images."""
    llava = out / "llava"
    back = pa.concat_tables(
        read(p, id_column="id", columns={"score": "float64"})[0].drop_columns(["_unit", "_pos"])
        for p in sorted(llava.glob("*.json"))
    )
    before = pq.read_table(out / "table")
    assert back.column("id").to_pylist() == ["r1", "g1", "../b1", "t1"]
    assert back.column("id").to_pylist() == before.column("id").to_pylist()
    assert back.column("conversations").equals(before.column("conversations"))
    assert back.column("image").to_pylist() == before.column("image").to_pylist()
    assert back.column("image").to_pylist() == [
        images["red"],
        images["green"],
        images["blue"],
        None,
    ]
    assert back.column("score").to_pylist() == [1.5, None, None, 2.0]

    # Parquet keeps list<struct<role, content>>; a WebDataset .json member a list of objects
    assert before.schema.field("conversations").type.equals(CONVERSATION_TYPE)
    assert before.column("image_url").to_pylist() == ["coco/red.png", "green.png", None, None]
    (members,) = webdataset_samples(before.slice(0, 1), "tars")
    assert members[0][0] == "r1.json"
    meta = json.loads(members[0][1])
    assert meta["conversations"] == [
        {"role": "user", "content": "<image>\nWhat colour is it?"},
        {"role": "assistant", "content": "Red."},
    ]
    assert meta["image_url"] == "coco/red.png" and meta["image_source"] == "chat"
