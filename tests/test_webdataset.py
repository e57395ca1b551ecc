"""WebDataset source and sink: grouping, bad and hostile input, round trip, determinism."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from wds_util import Member, bomb_png, png, sample, tar_bytes, write_tar

from curate.config.model import SourceSpec
from curate.io.files import list_shards, plan_units
from curate.io.readers import read_unit
from curate.io.sink import SinkError, webdataset_samples
from curate.io.storage import expand_braces
from curate.io.webdataset import WEBDATASET_COLUMNS, split_name

pytestmark = pytest.mark.usefixtures("ray_local")


def read(path: Path, **spec: Any) -> tuple[pa.Table, pa.Table]:
    source = SourceSpec(uri=str(path), format="webdataset", **spec)
    shards = list_shards(source.uri, path.parent)
    (unit,) = plan_units("imgs", shards, 1 << 40, 0)
    expected = {**WEBDATASET_COLUMNS, **{c: pa.string() for c in source.columns or {}}}
    table, rejects, inputs = read_unit(unit, source, expected)
    assert inputs[0].records == table.num_rows + rejects.num_rows  # counts balance
    return table, rejects


def reasons(rejects: pa.Table) -> list[str]:
    return [r.split(":", 1)[0] for r in rejects.column("reason").to_pylist()]


def test_samples_become_rows_with_key_image_caption_metadata_and_provenance(
    tmp_path: Path,
) -> None:
    members = [
        *sample("a/001", "first", {"title": "one"}),
        *sample("a/002", "second", {"title": "two"}, image=png(30, 90), ext="PNG"),
    ]
    table, rejects = read(write_tar(tmp_path / "s.tar", members), columns={"title": "string"})
    assert rejects.num_rows == 0
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a/001", "a/002"]
    assert [r["text"] for r in rows] == ["first", "second"]
    assert [r["title"] for r in rows] == ["one", "two"]
    assert [(r["width"], r["height"]) for r in rows] == [(80, 60), (30, 90)]
    assert rows[1]["image_ext"] == "png"  # extensions compare lower-case, as in webdataset
    assert rows[1]["image"] == png(30, 90)
    assert [r["provenance"]["row"] for r in rows] == [0, 3]  # member index of the sample
    assert len({r["id"] for r in rows}) == 2


def test_caption_from_a_json_field(tmp_path: Path) -> None:
    members = [*sample("k1", None, {"caption": "from json"}), *sample("k2", None, {"x": 1})]
    table, rejects = read(write_tar(tmp_path / "s.tar", members), caption="json:caption")
    assert table.column("text").to_pylist() == ["from json"]
    assert reasons(rejects) == ["missing_caption"]


def test_member_without_caption_is_quarantined_naming_shard_and_member(tmp_path: Path) -> None:
    members = [*sample("k1"), *sample("k2", caption=None), *sample("k3")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("key").to_pylist() == ["k1", "k3"]
    (reject,) = rejects.to_pylist()
    assert reject["reason"].startswith("missing_caption:")
    assert "s.tar member 2 (key 'k2')" in reject["reason"]
    assert reject["provenance"]["row"] == 2


def test_image_that_does_not_decode_is_quarantined(tmp_path: Path) -> None:
    members = [*sample("k1", image=b"\x89PNG not really a png"), *sample("k2")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("key").to_pylist() == ["k2"]
    assert reasons(rejects) == ["bad_image"]


def test_zero_byte_member_is_quarantined(tmp_path: Path) -> None:
    members: list[Member] = [("k1.png", png()), ("k1.txt", b""), *sample("k2")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("key").to_pylist() == ["k2"]
    assert reasons(rejects) == ["empty_member"]
    assert "'k1.txt' has zero bytes" in rejects.column("reason")[0].as_py()


def test_duplicate_keys_keep_the_first_sample(tmp_path: Path) -> None:
    members = [*sample("k1", "first"), *sample("k2"), *sample("k1", "again")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("text").to_pylist() == ["first", "a red box"]
    assert reasons(rejects) == ["duplicate_key"]


def test_duplicate_member_inside_one_sample(tmp_path: Path) -> None:
    members: list[Member] = [("k1.png", png()), ("k1.txt", b"a"), ("k1.txt", b"b")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.num_rows == 0
    assert reasons(rejects) == ["duplicate_member"]


def test_truncated_tar_keeps_what_precedes_the_damage(tmp_path: Path) -> None:
    data = tar_bytes([*sample("k1"), *sample("k2"), *sample("k3")])
    path = tmp_path / "s.tar"
    path.write_bytes(data[: len(data) // 2])
    table, rejects = read(path)
    assert table.num_rows >= 1
    assert table.column("key").to_pylist()[0] == "k1"
    found = reasons(rejects)
    # the cut may leave the last sample without its caption; the truncation itself is
    # always reported, even when the cut falls exactly between two members
    assert "corrupt_tar" in found or "truncated_member" in found
    assert set(found) <= {"truncated_member", "corrupt_tar", "missing_caption"}


@pytest.mark.parametrize("cut", [512, 1024, 1536, 2048, 2560, 3072])
def test_a_cut_at_any_member_boundary_is_detected(tmp_path: Path, cut: int) -> None:
    data = tar_bytes([*sample("k1"), *sample("k2"), *sample("k3")])
    path = tmp_path / "s.tar"
    path.write_bytes(data[:cut])
    _, rejects = read(path)
    assert "corrupt_tar" in reasons(rejects) or "truncated_member" in reasons(rejects)


def test_garbage_in_the_middle_of_a_tar_is_reported_not_skipped(tmp_path: Path) -> None:
    first = tar_bytes(sample("k1"))
    first = first.rstrip(b"\x00")  # drop the end-of-archive blocks
    first += b"\x00" * (-len(first) % 512)
    path = tmp_path / "s.tar"
    path.write_bytes(first + b"this is no tar header" * 40 + tar_bytes(sample("k2")))
    table, rejects = read(path)
    assert table.column("key").to_pylist() == ["k1"]
    (reject,) = rejects.to_pylist()
    assert reject["reason"].startswith("corrupt_tar:")
    assert "bytes not read" in reject["reason"] or "header" in reject["reason"]


def test_a_file_that_is_not_a_tar_is_one_quarantined_row(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(b"definitely not a tar archive" * 30)
    table, rejects = read(path)
    assert table.num_rows == 0
    assert reasons(rejects) == ["corrupt_tar"]


def test_hostile_member_names_and_links_never_become_rows(tmp_path: Path) -> None:
    members: list[Member] = [
        ("../evil.png", png()),
        ("../evil.txt", b"climb out"),
        ("/etc/abs.png", png()),
        ("/etc/abs.txt", b"absolute"),
        ("ln.png", b"", tarfile.SYMTYPE),
        ("ln.txt", b"symlink"),
        *sample("ok"),
    ]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("key").to_pylist() == ["ok"]
    assert sorted(reasons(rejects)) == ["unsafe_member", "unsafe_member_name", "unsafe_member_name"]


def test_decompression_bomb_is_rejected_from_its_header(tmp_path: Path) -> None:
    members = [*sample("bomb", image=bomb_png()), *sample("ok")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("key").to_pylist() == ["ok"]
    assert reasons(rejects) == ["image_too_large"]


def test_max_image_pixels_is_configurable(tmp_path: Path) -> None:
    members = [*sample("big", image=png(200, 200)), *sample("ok", image=png(10, 10))]
    table, rejects = read(write_tar(tmp_path / "s.tar", members), max_image_pixels=1000)
    assert table.column("key").to_pylist() == ["ok"]
    assert reasons(rejects) == ["image_too_large"]


def test_brace_ranges_and_key_splitting_follow_webdataset() -> None:
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{1..2}") == ["a/1", "a/2", "b/1", "b/2"]
    assert expand_braces("lit{}eral") == ["lit{}eral"]
    assert split_name("dir.x/abc.seg.PNG") == ("dir.x/abc", "seg.png")


def test_brace_range_lists_shards_in_order(tmp_path: Path) -> None:
    for i in (2, 0, 1):
        write_tar(tmp_path / f"shard-{i:06d}.tar", sample(f"k{i}"))
    shards = list_shards("shard-{000000..000002}.tar", tmp_path)
    assert [Path(s.path).name for s in shards] == [f"shard-{i:06d}.tar" for i in range(3)]


def test_sink_refuses_keys_that_could_escape_or_collide() -> None:
    def table(keys: list[str]) -> pa.Table:
        return pa.table({"id": [f"id{i}" for i in range(len(keys))], "key": keys})

    for bad in ("../x", "/abs", "a/b.c"):
        with pytest.raises(SinkError, match="cannot name a tar member"):
            webdataset_samples(table([bad]), "out")
    with pytest.raises(SinkError, match="repeats"):
        webdataset_samples(table(["k", "k"]), "out")


PIPELINE = """\
name: wds
seed: 3
sources:
  imgs:
    uri: data/shard-{000000..000002}.tar
    columns: {title: string}
stages:
  images: {type: image_filter, input: imgs, min_side: 32, max_aspect: 2.0, decode: full}
sinks:
  out: {input: images, format: webdataset, shard_samples: 2, columns: [title, width]}
execution:
  unit_bytes: 1B
"""


def _build_corpus(root: Path) -> None:
    for s in range(3):
        members: list[Member] = []
        for i in range(4):
            key = f"s{s}k{i}"
            size = [(64, 48), (16, 16), (200, 40), (50, 60)][(s + i) % 4]
            members += sample(key, f"caption {key}", {"title": key.upper()}, png(*size))
        if s == 1:
            members += sample("broken", "x", {"title": "B"}, png()[:60])
        write_tar(root / "data" / f"shard-{s:06d}.tar", members)


def test_webdataset_pipeline_round_trip_index_and_determinism(
    tmp_path: Path, pipeline_file: Any
) -> None:
    from curate.api import run

    _build_corpus(tmp_path)
    spec = pipeline_file(PIPELINE)
    result = run(str(spec), str(tmp_path / "out1"))
    run(str(spec), str(tmp_path / "out2"))
    stages = {s["name"]: s for s in result.manifest["stages"]}
    assert stages["imgs"]["rows_in"] == 13
    assert stages["images"]["reasons"] == {"bad_aspect": 3, "bad_image": 1, "too_small": 3}
    tars = sorted((tmp_path / "out1" / "out").glob("*.tar"))
    assert [t.name for t in tars] == [
        "part-000000-0000.tar",
        "part-000001-0000.tar",
        "part-000002-0000.tar",
    ]
    for a in tars:  # byte-identical across runs
        b = tmp_path / "out2" / "out" / a.name
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    # read back with curate's own source: same keys, images and captions
    again, rejects = read(tars[0])
    assert rejects.num_rows == 0 and again.column("key").to_pylist() == ["s0k0", "s0k3"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert names[:3] == ["s0k0.json", "s0k0.png", "s0k0.txt"]
        assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    # the index points at each sample's first header
    index = pq.read_table(tmp_path / "out1" / "out" / "index" / "part-000000.parquet")
    data = tars[0].read_bytes()
    for row in index.to_pylist():
        header = tarfile.TarInfo.frombuf(
            data[row["offset"] : row["offset"] + 512], "utf-8", "strict"
        )
        assert header.name == f"{row['key']}.json"
    assert result.manifest["indexes"][0]["path"] == "out/index/part-000000.parquet"
    assert sum(f["rows"] for f in result.manifest["outputs"]["out"]) == stages["images"]["kept"]
    assert io  # (module used by helpers)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_fast_header_scan_agrees_with_tarfile(fmt: int) -> None:
    from curate.io.webdataset import _fast_members, _tarfile_members

    members = [*sample("a/x1"), *sample("b" * 40 + "/" + "y" * 80), *sample("k3", "ünï")]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in (m[:2] for m in members):
            info = tarfile.TarInfo(str(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    slow, slow_end, damage = _tarfile_members(data)
    assert damage is None and [m.name for m in slow] == [m[0] for m in members]
    fast = _fast_members(data)
    if fast is not None:  # long names need PAX/GNU headers: those take the tarfile path
        assert fast == (slow, slow_end)
    if fmt == tarfile.USTAR_FORMAT:
        assert fast is not None  # the common case is the fast one


def test_png_size_from_ihdr_matches_pillow_and_checks_the_crc() -> None:
    from curate.io.webdataset import _png_size

    assert _png_size(png(123, 45)) == (123, 45)
    damaged = bytearray(png(123, 45))
    damaged[18] ^= 0xFF  # the width, without fixing the CRC
    assert _png_size(bytes(damaged)) is None  # falls back to Pillow, which then decides


def _raw_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with a valid checksum and an arbitrary size field."""
    header = bytearray(512)
    header[: len(name)] = name
    header[100:108] = b"0000644\x00"
    header[124:136] = size_field.ljust(11, b" ") + b"\x00"
    header[136:148] = b"00000000000\x00"
    header[156:157] = kind
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    return bytes(header)


def test_a_negative_size_field_is_damage_not_an_endless_loop(tmp_path: Path) -> None:
    good = tar_bytes(sample("k1")).rstrip(b"\x00")
    good += b"\x00" * (-len(good) % 512)
    path = tmp_path / "s.tar"
    path.write_bytes(good + _raw_header(b"k2.png", b"-0002000") + bytes(2048))
    table, rejects = read(path)
    assert table.column("key").to_pylist() == ["k1"]
    assert "corrupt_tar" in reasons(rejects)


def _raw_member(name: bytes, payload: bytes) -> bytes:
    return _raw_header(name, f"{len(payload):o}".encode()) + payload + bytes(-len(payload) % 512)


def test_member_names_that_are_not_utf8_are_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    bad = _raw_member(b"b\xe9ad.png", png()) + _raw_member(b"b\xe9ad.txt", b"latin-1 name")
    path.write_bytes(bad + tar_bytes(sample("k2")))
    table, rejects = read(path)
    assert table.column("key").to_pylist() == ["k2"]
    assert reasons(rejects) == ["bad_member_name"]


def test_json_members_with_lone_surrogates_or_duplicate_keys_are_quarantined(
    tmp_path: Path,
) -> None:
    members: list[Member] = [
        ("k1.json", b'{"title": "\\ud800"}'),
        ("k1.png", png()),
        ("k1.txt", b"a"),
        ("k2.json", b'{"title": "a", "title": "b"}'),
        ("k2.png", png()),
        ("k2.txt", b"b"),
        *sample("k3", meta={"title": "fine"}),
    ]
    table, rejects = read(write_tar(tmp_path / "t.tar", members), columns={"title": "string"})
    assert table.column("key").to_pylist() == ["k3"]
    assert sorted(reasons(rejects)) == ["bad_unicode", "invalid_json"]


@pytest.mark.skipif(not shutil.which("tar"), reason="GNU tar makes the sparse member")
def test_sparse_members_are_refused_not_misread(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "k1.txt", "wb") as handle:
        handle.write(b"A")
        handle.seek(1 << 16)
        handle.write(b"B")
    (src / "k1.png").write_bytes(png())
    for name, data in sample("k2"):
        (src / str(name)).write_bytes(bytes(data))
    path = tmp_path / "s.tar"
    subprocess.run(
        [
            "tar",
            "--sparse",
            "--format=gnu",
            "-cf",
            str(path),
            "-C",
            str(src),
            "k1.png",
            "k1.txt",
            "k2.png",
            "k2.txt",
        ],
        check=True,
    )
    table, rejects = read(path)
    assert table.column("key").to_pylist() == ["k2"]
    assert reasons(rejects) == ["unsupported_member"]


def test_png_with_only_a_plausible_ihdr_goes_to_pillow(tmp_path: Path) -> None:
    header_only = png(1, 1)[:33]  # signature + IHDR, nothing after
    members = [*sample("k1", image=header_only), *sample("k2")]
    table, rejects = read(write_tar(tmp_path / "s.tar", members))
    assert table.column("key").to_pylist() == ["k2"]
    assert reasons(rejects) == ["bad_image"]


def test_sink_writes_dates_and_refuses_nan_and_unsafe_extensions() -> None:
    import datetime

    when = datetime.datetime(2026, 11, 23, 12, 0)
    ok = pa.table({"id": ["a"], "key": ["k"], "when": [when]})
    ((name, member),) = webdataset_samples(ok, "out")[0][:1]
    assert name == "k.json" and b'"when":"2026-11-23T12:00:00"' in member
    with pytest.raises(SinkError, match=r"cannot be written as k\.json"):
        webdataset_samples(pa.table({"id": ["a"], "key": ["k"], "x": [float("nan")]}), "out")
    evil = pa.table({"id": ["a"], "key": ["k"], "image": [png()], "image_ext": ["png/../../x"]})
    with pytest.raises(SinkError, match="image_ext"):
        webdataset_samples(evil, "out")
