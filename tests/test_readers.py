"""Bad input: each case is a quarantined row with file and line, or a clear error."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.config.model import SourceSpec
from curate.io.files import InputError, list_shards, plan_units
from curate.io.readers import read_unit

SPEC = SourceSpec(uri="*", columns={"url": "string", "n": "int64"})


def read(path: Path, spec: SourceSpec = SPEC) -> tuple[pa.Table, pa.Table]:
    shards = list_shards(path.name, path.parent)
    (unit,) = plan_units("docs", shards, 1 << 30, 0)
    table, rejects, inputs = read_unit(unit, spec)
    assert inputs[0].records == table.num_rows + rejects.num_rows
    return table, rejects


def one_reject(rejects: pa.Table) -> dict[str, object]:
    assert rejects.num_rows == 1, rejects.to_pylist()
    return rejects.to_pylist()[0]


def test_good_lines_keep_provenance_and_declared_columns(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "x", "url": "u1", "n": 3}\n{"text": "y", "other": 1}\n')
    table, rejects = read(p)
    assert rejects.num_rows == 0
    assert table.column_names == ["id", "text", "source", "provenance", "url", "n", "_unit", "_pos"]
    assert table.column("provenance").to_pylist() == [
        {"uri": "a.jsonl", "row": 0},
        {"uri": "a.jsonl", "row": 1},
    ]
    assert table.column("n").to_pylist() == [3, None]
    assert table.column("id")[0].as_py() != table.column("id")[1].as_py()


def test_invalid_json_line_is_quarantined_with_line(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "broken\n{"text": "ok2"}\n')
    table, rejects = read(p)
    assert table.column("text").to_pylist() == ["ok", "ok2"]
    r = one_reject(rejects)
    assert str(r["reason"]).startswith("invalid_json:a.jsonl line 2: Unterminated string")
    assert r["provenance"] == {"uri": "a.jsonl", "row": 1}
    assert r["value"] == '{"text": "broken'


def test_bad_utf8_is_quarantined(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"text": "caf\xe9"}\n{"text": "fine"}\n')
    table, rejects = read(p)
    assert table.num_rows == 1
    assert one_reject(rejects)["reason"] == "bad_utf8:a.jsonl line 1: invalid UTF-8 at byte 13"


def test_missing_text_is_quarantined(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"body": "no text"}\n{"text": null}\n{"text": 5}\n[1, 2]\n\n')
    table, rejects = read(p)
    assert table.num_rows == 0
    reasons = [r.split(":")[0] for r in rejects.column("reason").to_pylist()]
    assert reasons == ["missing_text", "missing_text", "bad_text", "not_an_object", "blank_line"]


def test_wrong_declared_type_is_quarantined(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "t", "n": "seven"}\n')
    _, rejects = read(p)
    assert (
        one_reject(rejects)["reason"]
        == "bad_column:a.jsonl line 1: 'n': expected a 64-bit integer, got 'seven'"
    )


def test_empty_file_reads_as_zero_rows(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"")
    table, rejects = read(p)
    assert (table.num_rows, rejects.num_rows) == (0, 0)
    assert "text" in table.column_names


def test_corrupt_gzip_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "x"}\n')[:-12])
    with pytest.raises(InputError, match=r"a.jsonl.gz: cannot decompress"):
        read(p)


def test_parquet_null_text_and_missing_column(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c"], "url": ["u", "v", "w"], "n": [1, 2, 3]}), p)
    table, rejects = read(p)
    assert table.column("text").to_pylist() == ["a", "c"]
    assert [r["provenance"]["row"] for r in table.to_pylist()] == [0, 2]
    assert one_reject(rejects)["reason"] == "missing_text:a.parquet row 1: null text"
    q = tmp_path / "b.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), q)
    table, rejects = read(q, SourceSpec(uri="*"))
    assert table.num_rows == 0
    assert set(rejects.column("reason").to_pylist()) == {
        "missing_column:b.parquet: no column 'text'"
    }


def test_unreadable_parquet_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"a.parquet: not a readable Parquet file"):
        read(p)


def test_no_matching_files_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nothing\*.jsonl: no file matches"):
        list_shards("nothing*.jsonl", tmp_path)


def test_units_group_consecutive_shards(tmp_path: Path) -> None:
    for i in range(5):
        (tmp_path / f"s{i}.jsonl").write_text('{"text": "0123456789"}\n' * 10)
    shards = list_shards("*.jsonl", tmp_path)
    units = plan_units("docs", shards, 500, 7)
    assert [u.index for u in units] == [7, 8, 9]
    assert [len(u.shards) for u in units] == [2, 2, 1]


CLEAN = (
    '{"text": "plain", "url": "u", "n": 1}\n'
    '{"text": "\\u00e9t\\u00e9 \\ud83d\\ude00 tab\\tnewline\\n", "n": 2, "extra": {"x": 1}}\r\n'
    '{"url": null, "text": "no trailing newline", "n": -9223372036854775808}'
)


def test_fast_path_reads_clean_shards_and_equals_the_strict_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from curate.io import readers

    p = tmp_path / "a.jsonl"
    p.write_text(CLEAN, encoding="utf-8")

    def refuse(*_: object) -> None:
        raise AssertionError("a clean shard must not need the strict parser")

    with monkeypatch.context() as m:
        m.setattr(readers.JsonlParser, "parse", refuse)
        fast, _ = read(p)
    monkeypatch.setattr(readers, "_fast_jsonl", lambda *_: None)
    slow, _ = read(p)
    assert fast.equals(slow)
    assert fast.column("text")[1].as_py() == "été 😀 tab\tnewline\n"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"text": "a", "text": "b"}', "invalid_json:a.jsonl line 2: duplicate key 'text'"),
        ('{"text": "x\\ud800y"}', "bad_unicode:a.jsonl line 2: a \\u escape encodes a lone"),
        ('{"text": "a", "n": 123456789012345678901234567890}', "bad_column:a.jsonl line 2: 'n'"),
        ('{"text": "a", "n": 1.5}', "bad_column:a.jsonl line 2: 'n': expected a 64-bit integer"),
        ('{"text": "a"} {"text": "b"}', "invalid_json:a.jsonl line 2: Extra data"),
    ],
    ids=["duplicate_key", "lone_surrogate", "int_overflow", "float_for_int", "two_objects"],
)
def test_strict_parser_rejects_what_json_loads_would_let_through(
    tmp_path: Path, line: str, reason: str
) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "fine", "nested": {"k": 1, "k": 2}}\n' + line + "\n")
    table, rejects = read(p)
    assert table.column("text").to_pylist() == ["fine"]  # nested duplicates are not our business
    assert str(one_reject(rejects)["reason"]).startswith(reason)


def test_numeric_source_ids_become_strings(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"doc": 17, "text": "a"}\n{"doc": "x-2", "text": "b"}\n')
    table, _ = read(p, SourceSpec(uri="*", id_column="doc"))
    assert table.column("id").to_pylist() == ["17", "x-2"]


def test_zstd_with_several_frames_reads_every_frame(tmp_path: Path) -> None:
    import zstandard

    p = tmp_path / "a.jsonl.zst"
    frames = [
        zstandard.ZstdCompressor().compress(f'{{"text": "t{i}"}}\n'.encode()) for i in range(3)
    ]
    p.write_bytes(b"".join(frames))
    table, _ = read(p)
    assert table.column("text").to_pylist() == ["t0", "t1", "t2"]


def test_truncated_zstd_is_a_clear_error(tmp_path: Path) -> None:
    import zstandard

    p = tmp_path / "a.jsonl.zst"
    body = "".join(f'{{"text": "document number {i}"}}\n' for i in range(2000)).encode()
    data = zstandard.ZstdCompressor().compress(body)
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"a.jsonl.zst: cannot decompress: truncated zstd frame"):
        read(p)


def test_parquet_values_that_do_not_cast_are_quarantined(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(
        pa.table({"text": ["a", "b", "c"], "url": ["u", "v", "w"], "n": ["1", "seven", "3"]}), p
    )
    table, rejects = read(p)
    assert table.column("n").to_pylist() == [1, 3]
    assert one_reject(rejects)["reason"] == "bad_column:a.parquet row 1: 'n' is not int64"


def test_parquet_dictionary_and_view_text_are_text(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    text = pa.array(["x y", "x y", None]).dictionary_encode()
    pq.write_table(pa.table({"text": text, "url": ["u", "v", "w"], "n": [1, 2, 3]}), p)
    table, rejects = read(p)
    assert table.column("text").to_pylist() == ["x y", "x y"]
    assert one_reject(rejects)["reason"] == "missing_text:a.parquet row 2: null text"
    view = pa.table({"text": pa.array(["v"], pa.string_view())})
    q = tmp_path / "b.parquet"
    pq.write_table(view, q)
    assert read(q, SourceSpec(uri="*"))[0].column("text").to_pylist() == ["v"]


def test_parquet_null_source_ids_are_quarantined(tmp_path: Path) -> None:
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "doc": [7, None]}), p)
    table, rejects = read(p, SourceSpec(uri="*", id_column="doc", columns={}))
    assert table.column("id").to_pylist() == ["7"]
    assert one_reject(rejects)["reason"] == "missing_id:a.parquet row 1: no usable id"


def test_later_shards_are_cast_to_the_sources_schema(tmp_path: Path) -> None:
    from curate.io.readers import read_unit

    pq.write_table(
        pa.table({"text": ["a"], "n": pa.array([1], pa.int64())}), tmp_path / "a.parquet"
    )
    pq.write_table(pa.table({"text": ["b", "c"], "n": ["2", "x"]}), tmp_path / "b.parquet")
    (unit,) = plan_units("docs", list_shards("*.parquet", tmp_path), 1 << 30, 0)
    table, rejects, _ = read_unit(unit, SourceSpec(uri="*"), {"n": pa.int64()})
    assert table.column("n").to_pylist() == [1, 2]
    assert one_reject(rejects)["reason"] == "bad_column:b.parquet row 1: 'n' is not int64"


def test_a_leading_byte_order_mark_is_not_a_bad_line(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    table, rejects = read(p)
    assert table.column("text").to_pylist() == ["a", "b"] and rejects.num_rows == 0
    p.write_bytes(b'\xef\xbb\xbf{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    table, rejects = read(p)
    assert table.column("text").to_pylist() == ["a"]
    assert str(one_reject(rejects)["reason"]).startswith("invalid_json:a.jsonl line 2")


def test_each_line_is_judged_alone_even_when_arrow_would_accept_the_file(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"} {"text": "b"}\n   \n')
    table, rejects = read(p)
    assert table.num_rows == 0
    reasons = [r.split(":")[0] for r in rejects.column("reason").to_pylist()]
    assert reasons == ["invalid_json", "blank_line"]


def test_glob_characters_in_folders_and_file_names(tmp_path: Path) -> None:
    base = tmp_path / "proj[v2]"
    (base / "data").mkdir(parents=True)
    (base / "data" / "part[1].jsonl").write_text('{"text": "a"}\n')
    (base / "data" / "b.jsonl").write_text('{"text": "b"}\n')
    assert [s.uri for s in list_shards("data/part[1].jsonl", base)] == ["data/part[1].jsonl"]
    assert [s.uri for s in list_shards("data/*.jsonl", base)] == [
        "data/b.jsonl",
        "data/part[1].jsonl",
    ]


def test_braces_in_file_names_are_just_characters(tmp_path: Path) -> None:
    p = tmp_path / "null{date}{0}.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), p)
    _, rejects = read(p, SourceSpec(uri="*"))
    assert one_reject(rejects)["reason"] == "missing_text:null{date}{0}.parquet row 1: null text"


@pytest.mark.parametrize(
    "line",
    ['{"text": "a", "meta": "\xff\xfe"}', '{"text": "a", "m": 1, "m": 2}'],
    ids=["bad_utf8_in_an_unread_field", "duplicate_unread_field"],
)
def test_a_lines_verdict_does_not_depend_on_its_neighbours(tmp_path: Path, line: str) -> None:
    raw = line.encode("latin-1")
    alone, beside_a_bad_line = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    alone.write_bytes(raw + b"\n")
    beside_a_bad_line.write_bytes(raw + b"\n{broken\n")
    kept_alone = read(alone, SourceSpec(uri="*"))[0].num_rows
    kept_beside = read(beside_a_bad_line, SourceSpec(uri="*"))[0].num_rows
    assert kept_alone == kept_beside


@pytest.mark.parametrize(
    ("data", "blank"),
    [
        (b'{"a": 1}\n', False),
        (b'{"a": 1}', False),
        (b'{"a": 1}\r\n{"b": 2}\r\n', False),
        (b'\n{"a": 1}\n', True),
        (b'  \n{"a": 1}\n', True),
        (b'{"a": 1}\n\n', True),
        (b'{"a": 1}\n \t\r\n{"b": 2}', True),
        (b'{"a": 1}\n   ', True),
        (b"   ", True),
    ],
)
def test_blank_line_detection(data: bytes, blank: bool) -> None:
    from curate.io.readers import has_blank_line

    assert has_blank_line(data) is blank
