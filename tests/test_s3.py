"""S3 against a real S3 HTTP server (moto's server mode) on 127.0.0.1, started here."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl
from wds_util import sample, tar_bytes

from curate.io import storage
from curate.io.files import InputError, list_shards
from curate.io.storage import StorageError, StorageOptions
from curate.mllm.backend import Answer, Backend, Request
from curate.mllm.cache import CachedBackend, RequestCache

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("ray_s3")]

SECRET = "curate-test-secret-7f3a9c"  # must never show up in a log, a manifest or an object
BUCKET = "curate-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A real S3 HTTP endpoint in a separate process, with test credentials in the env."""
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(
        AWS_ACCESS_KEY_ID="curate-test-key",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
    )
    port = _free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise RuntimeError("moto_server did not start")
        storage.client(StorageOptions(endpoint_url=url)).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def ray_s3(s3_endpoint: str) -> Iterator[None]:
    """Local Ray started after the credentials are in the environment (workers inherit it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def opts(s3_endpoint: str) -> StorageOptions:
    return StorageOptions(endpoint_url=s3_endpoint, multipart_threshold=5 << 20, part_size=5 << 20)


def keys(opts: StorageOptions, prefix: str) -> list[str]:
    return [f.uri for f in storage.list_prefix(f"s3://{BUCKET}/{prefix}", opts)]


def test_write_read_list_glob_and_braces(opts: StorageOptions) -> None:
    for name in ("a/x-000.jsonl", "a/x-001.jsonl", "a/x-002.jsonl", "a/sub/y.jsonl", "a/z.txt"):
        storage.write_bytes(f"s3://{BUCKET}/t1/{name}", name.encode(), opts)
    assert storage.read_bytes(f"s3://{BUCKET}/t1/a/x-001.jsonl", opts) == b"a/x-001.jsonl"
    base = f"s3://{BUCKET}/t1/a"
    shards = list_shards(f"{base}/x-{{000..001}}.jsonl", Path("."), opts)
    assert [s.uri for s in shards] == [f"{base}/x-000.jsonl", f"{base}/x-001.jsonl"]
    assert shards[0].version.startswith("etag:")
    assert len(list_shards(f"{base}/*.jsonl", Path("."), opts)) == 3  # '*' stays in a folder
    assert len(list_shards(f"{base}/**/*.jsonl", Path("."), opts)) == 4
    assert len(list_shards(base, Path("."), opts)) == 4  # a prefix is a folder; z.txt is no shard
    with pytest.raises(InputError, match="no file matches"):
        list_shards(f"{base}/nothing-*.jsonl", Path("."), opts)


def test_large_objects_use_multipart_and_a_failed_upload_leaves_nothing(
    opts: StorageOptions,
) -> None:
    uri = f"s3://{BUCKET}/t2/big.bin"
    data = os.urandom(11 << 20)
    storage.write_bytes(uri, data, opts)
    assert storage.read_bytes(uri, opts) == data
    etag = storage.stat(uri, opts).version
    assert etag.endswith("-3")  # an S3 multipart ETag: three parts

    def parts() -> Iterator[bytes]:
        yield os.urandom(5 << 20)
        raise RuntimeError("writer failed half-way")

    target = f"s3://{BUCKET}/t2/never.bin"
    with pytest.raises(RuntimeError, match="half-way"):
        storage.multipart_upload(target, parts(), opts)
    assert not storage.exists(target, opts)
    assert storage.abort_stale(f"s3://{BUCKET}/t2", opts) == 0  # aborted, not left pending


def test_a_killed_writer_leaves_no_visible_object(opts: StorageOptions, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import os, signal
        from curate.io import storage
        from curate.io.storage import StorageOptions
        opts = StorageOptions(endpoint_url={opts.endpoint_url!r})
        def parts():
            yield b"x" * (5 << 20)
            os.kill(os.getpid(), signal.SIGKILL)  # dies between two parts
            yield b"never"
        storage.multipart_upload("s3://{BUCKET}/t3/killed.bin", parts(), opts)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not storage.exists(f"s3://{BUCKET}/t3/killed.bin", opts)
    assert keys(opts, "t3") == []
    assert storage.abort_stale(f"s3://{BUCKET}/t3", opts) == 1  # the pending upload, cleared


def test_credentials_in_a_uri_are_refused_without_being_echoed(opts: StorageOptions) -> None:
    with pytest.raises(InputError) as info:
        list_shards("s3://AKIAEXAMPLE:hunter2secret@bucket/x.jsonl", Path("."), opts)
    assert "hunter2secret" not in str(info.value)
    with pytest.raises(StorageError) as err:
        storage.write_bytes("s3://AKIAEXAMPLE:hunter2secret@bucket/x", b"", opts)
    assert "hunter2secret" not in str(err.value)


PIPELINE = """\
name: s3run
seed: 1
sources:
  docs:
    uri: s3://{bucket}/in/docs-{{0..1}}.jsonl
    columns: {{url: string}}
  imgs:
    uri: s3://{bucket}/in/imgs/*.tar
stages:
  stats: {{type: text_stats, input: docs}}
  length: {{type: length_filter, input: stats, min_words: 2}}
  images: {{type: image_filter, input: imgs, min_side: 8}}
sinks:
  text: {{input: length, shard_bytes: 512B}}
  pairs: {{input: images, format: webdataset}}
storage:
  s3: {{endpoint_url: "{endpoint}"}}
execution:
  unit_bytes: 1B
"""


def test_pipeline_reads_and_writes_s3_and_leaks_no_secret(
    opts: StorageOptions, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    import json

    from curate.api import run

    for i in range(2):
        local = write_jsonl(
            tmp_path / f"docs-{i}.jsonl",
            [{"text": f"doc {i} {j} " + "w " * j, "url": f"u{j}"} for j in range(6)]
            + (["{broken"] if i else []),
        )
        storage.write_bytes(f"s3://{BUCKET}/in/docs-{i}.jsonl", local.read_bytes(), opts)
    tar = tar_bytes([*sample("k1"), *sample("k2", caption=None), *sample("k3")])
    storage.write_bytes(f"s3://{BUCKET}/in/imgs/shard-0.tar", tar, opts)
    spec = tmp_path / "p.yaml"
    spec.write_text(PIPELINE.format(bucket=BUCKET, endpoint=opts.endpoint_url))
    out = f"s3://{BUCKET}/runs/one"
    result = run(str(spec), out)
    stages = {s["name"]: s for s in result.manifest["stages"]}
    assert stages["docs"] == {**stages["docs"], "rows_in": 13, "dropped": 1}
    assert stages["imgs"]["reasons"] == {"missing_caption": 1}
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json", opts))
    assert manifest["stages"] == result.manifest["stages"]
    written = keys(opts, "runs/one")
    for section in ("text", "pairs"):
        for f in manifest["outputs"][section]:
            assert f"{out}/{f['path']}" in written
    assert f"{out}/pairs/index/part-000002.parquet" in written
    assert any(k.startswith(f"{out}/rejects/docs/") for k in written)
    # the same run twice gives the same bytes
    run(str(spec), f"s3://{BUCKET}/runs/two")
    for f in manifest["outputs"]["text"] + manifest["outputs"]["pairs"]:
        a = storage.read_bytes(f"{out}/{f['path']}", opts)
        b = storage.read_bytes(f"s3://{BUCKET}/runs/two/{f['path']}", opts)
        assert a == b
    # no credential in any object written, nor in anything printed
    for uri in written:
        assert SECRET.encode() not in storage.read_bytes(uri, opts)
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err


def test_overwrite_and_resume_on_s3(opts: StorageOptions, tmp_path: Path) -> None:
    from curate.api import OutputExistsError, run

    storage.write_bytes(f"s3://{BUCKET}/in2/d.jsonl", b'{"text": "hello there world"}\n', opts)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"name: r\nsources: {{d: {{uri: 's3://{BUCKET}/in2/d.jsonl'}}}}\n"
        f"sinks: {{o: {{input: d}}}}\nstorage: {{s3: {{endpoint_url: '{opts.endpoint_url}'}}}}\n"
    )
    out = f"s3://{BUCKET}/runs/three"
    run(str(spec), out)
    with pytest.raises(OutputExistsError, match="previous run"):
        run(str(spec), out)
    storage.write_bytes(f"{out}/o/part-999999-0000.parquet", b"stale", opts)
    again: Any = run(str(spec), out, resume=True)  # everything committed: nothing to redo
    assert again.manifest["outputs"]["o"][0]["rows"] == 1
    run(str(spec), out, overwrite=True)
    assert not storage.exists(f"{out}/o/part-999999-0000.parquet", opts)


def test_bucket_root_output_is_cleared_by_overwrite(opts: StorageOptions, tmp_path: Path) -> None:
    from curate.api import run

    root_bucket = "curate-root"
    storage.client(opts).create_bucket(Bucket=root_bucket)
    for i in range(3):
        storage.write_bytes(f"s3://{BUCKET}/in3/d-{i}.jsonl", b'{"text": "a b c"}\n', opts)
    spec = tmp_path / "p.yaml"
    spec.write_text(
        f"name: r\nsources: {{d: {{uri: 's3://{BUCKET}/in3/*.jsonl'}}}}\n"
        f"sinks: {{o: {{input: d}}}}\nstorage: {{s3: {{endpoint_url: '{opts.endpoint_url}'}}}}\n"
        "execution: {unit_bytes: 1B}\n"
    )
    run(str(spec), f"s3://{root_bucket}")
    assert len(keys_in(opts, root_bucket, "o/")) == 3
    client = storage.client(opts)
    client.delete_object(Bucket=BUCKET, Key="in3/d-2.jsonl")
    result = run(str(spec), f"s3://{root_bucket}", overwrite=True)
    assert len(result.manifest["outputs"]["o"]) == 2
    assert len(keys_in(opts, root_bucket, "o/")) == 2  # the old third shard is gone


def keys_in(opts: StorageOptions, bucket: str, prefix: str) -> list[str]:
    return [f.uri for f in storage.list_prefix(f"s3://{bucket}/{prefix}", opts)]


def test_literal_brackets_in_a_key(opts: StorageOptions) -> None:
    uri = f"s3://{BUCKET}/lit/[2024]/x.jsonl"
    storage.write_bytes(uri, b'{"text": "a"}\n', opts)
    assert [s.uri for s in list_shards(uri, Path("."), opts)] == [uri]


class _Numbered(Backend):
    """An inner backend that numbers its answers: which requests reached it shows."""

    fingerprint = "numbered"

    def __init__(self) -> None:
        self.asked = 0

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.asked += len(requests)
        return [Answer(text=f"{r.prompt}:{self.asked}") for r in requests]


def test_request_cache_on_s3(opts: StorageOptions) -> None:
    """The MLLM request cache keeps its chunks on S3: a second backend over the same
    prefix answers everything from them."""
    root = f"s3://{BUCKET}/runs/llm-cache"
    first_inner = _Numbered()
    first = CachedBackend(first_inner, RequestCache(root, opts))
    answers = first.generate([Request(prompt="a"), Request(prompt="b")])
    first.close()
    inner = _Numbered()
    again = CachedBackend(inner, RequestCache(root, opts))
    got = again.generate([Request(prompt="a"), Request(prompt="b"), Request(prompt="c")])
    assert [a.text for a in got[:2]] == [a.text for a in answers]
    assert got[0].cached and not got[2].cached
    assert inner.asked == 1 and again.stats["hits"] == 2
    names = [f.uri.rsplit("/", 1)[1] for f in storage.list_prefix(root, opts)]
    assert len(names) == 1 and re.fullmatch(r"[0-9a-f]{32}-000000\.jsonl", names[0])


def test_llava_images_read_from_and_written_to_s3(opts: StorageOptions) -> None:
    import json

    from curate.config.model import SourceSpec
    from curate.io.files import plan_units
    from curate.io.layout import Layout
    from curate.io.readers import read_unit
    from curate.io.sink import write_llava_sink

    base = f"s3://{BUCKET}/llava"
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]
    samples = [
        {"id": "a", "image": "a.png", "conversations": turns},
        {"id": "b", "image": "none.png", "conversations": turns},
        {"id": "c", "image": "../in/a.png", "conversations": turns},
    ]
    storage.write_bytes(f"{base}/in/data.json", json.dumps(samples).encode(), opts)
    storage.write_bytes(f"{base}/in/imgs/a.png", b"\x89PNG not really", opts)
    spec = SourceSpec(uri=f"{base}/in/data.json", format="llava", image_root=f"{base}/in/imgs")
    (unit,) = plan_units("chat", list_shards(spec.uri, Path("."), opts), 1 << 30, 0)
    table, rejects, _ = read_unit(unit, spec, opts=opts)
    assert table.column("image").to_pylist() == [b"\x89PNG not really"]
    reasons = [r.split(":", 1)[0] for r in rejects.column("reason").to_pylist()]
    assert reasons == ["missing_image", "unsafe_path"]  # S3's NoSuchKey is a missing image
    layout = Layout(f"{base}/out", opts)
    files, images = write_llava_sink(table, layout, "chat", 0, 1 << 20, None, None)
    (entry,) = json.loads(storage.read_bytes(files[0].path, opts))
    image_id = table.column("id")[0].as_py()
    assert entry["image"] == f"images/part-000000/{image_id}.png" and images is not None
    assert storage.read_bytes(f"{base}/out/chat/{entry['image']}", opts) == b"\x89PNG not really"
