"""Runs against an S3 that throttles, fails and drops connections: the fault-injecting
proxy of ``s3_faults`` in front of the loopback moto server of ``test_s3``.

A run whose reads, listings and writes hit 503s, 500s, dropped connections, cut
request bodies, truncated answers and lost replies must retry its way to outputs
byte-identical to a run against a healthy S3, balance its row accounting, never show
a partial object, and log its retries without a credential.  A key refused for good
fails the run with one clear line naming the URI, and ``--resume`` once the fault has
cleared finishes it identically.
"""

from __future__ import annotations

import io
import json
import logging
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import comparable
from s3_faults import KINDS, FaultProxy, Plan
from test_s3 import BUCKET, SECRET, ray_s3, s3_endpoint
from typer.testing import CliRunner

from curate.io import storage
from curate.io.storage import StorageError, StorageOptions

__all__ = ["ray_s3", "s3_endpoint"]  # the module fixtures of test_s3, reused here

pytestmark = [pytest.mark.s3, pytest.mark.usefixtures("ray_s3")]

ACCESS_KEY = "curate-test-key"  # test_s3's; not secret, but never worth logging either
ROOT = f"s3://{BUCKET}/faults"

PIPELINE = """\
name: faulty_text
seed: 7
sources:
  docs: {{uri: "{root}/in/*.jsonl", columns: {{url: string}}}}
stages:
  stats: {{type: text_stats}}
  length: {{type: length_filter, min_words: 4}}
  dedup: {{type: exact_dedup}}
sinks:
  curated: {{input: dedup, shard_bytes: 2KiB}}
execution: {{unit_bytes: 1B}}
storage:
  s3: {{endpoint_url: "{endpoint}", max_attempts: 6, backoff_s: 0.01, max_backoff_s: 0.1}}
"""

#: About one request in three fails, up to twice in a row, and every listing (there are
#: few) fails twice: every operation is hit, by every kind of fault.
FAULTS = Plan(every=3, seed=5, streak=2, rates=(("list", 1),))


def _docs(shard: int) -> bytes:
    rows = []
    for j in range(30):
        words = " ".join(f"w{(shard * 7 + j * k) % 50}" for k in range(j % 12))
        rows.append(json.dumps({"text": words or "x", "url": f"u{shard}-{j}"}))
    rows.append(json.dumps({"text": "the same text in every shard here", "url": "dup"}))
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture(scope="module")
def direct(s3_endpoint: str) -> StorageOptions:
    """The healthy server itself: how the tests look at what a run left."""
    return StorageOptions(endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:
    faulty = FaultProxy(s3_endpoint)
    try:
        yield faulty
    finally:
        faulty.close()


@pytest.fixture(scope="module")
def spec(
    proxy: FaultProxy, direct: StorageOptions, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The pipeline, every run of it through the proxy (one spec, so one spec hash and
    the same manifest whether or not the proxy injects faults)."""
    for shard in range(6):
        storage.write_bytes(f"{ROOT}/in/docs-{shard}.jsonl", _docs(shard), direct)
    path = tmp_path_factory.mktemp("faults") / "p.yaml"
    path.write_text(PIPELINE.format(root=ROOT, endpoint=proxy.url))
    return str(path)


@pytest.fixture(scope="module")
def clean(spec: str, proxy: FaultProxy, direct: StorageOptions) -> dict[str, bytes]:
    """The user files of a run through the proxy while it injects nothing."""
    from curate.api import run

    proxy.reset(Plan())
    run(spec, f"{ROOT}/runs/clean")
    assert proxy.count() == 0 and proxy.requests["put"] > 0
    return user_files(f"{ROOT}/runs/clean", direct)


def user_files(prefix: str, opts: StorageOptions) -> dict[str, bytes]:
    """``conftest.user_files`` for an ``s3://`` run, read straight from the server."""
    found = {}
    for info in storage.list_prefix(prefix, opts):
        rel = storage.relative(info.uri, prefix)
        data = comparable(rel, storage.read_bytes(info.uri, opts))
        if data is not None:
            found[rel] = data
    return found


class Watcher(threading.Thread):
    """Lists the run's output prefix on the healthy server over and over while the run
    goes, and reads every Parquet object it has not seen: each must be whole."""

    def __init__(self, prefix: str, opts: StorageOptions) -> None:
        super().__init__(daemon=True)
        self.prefix, self.opts = prefix, opts
        self.stop = threading.Event()
        self.keys: set[str] = set()
        self.checked: dict[str, bytes] = {}
        self.broken: list[str] = []

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for info in storage.list_prefix(self.prefix, self.opts):
                self.keys.add(info.uri)
                if info.uri.endswith(".parquet") and info.uri not in self.checked:
                    try:
                        data = storage.read_bytes(info.uri, self.opts)
                    except storage.MissingObjectError:
                        continue  # removed since it was listed (_work, cleared at the end)
                    self.checked[info.uri] = data
                    if not _whole_parquet(data) or len(data) != info.size:
                        self.broken.append(info.uri)


def _whole_parquet(data: bytes) -> bool:
    if not (data[:4] == data[-4:] == b"PAR1"):
        return False
    pq.read_table(io.BytesIO(data))
    return True


def _final_name(uri: str) -> bool:
    """No temporary, partial or hidden name (but the run marker)."""
    name = uri.rsplit("/", 1)[1]
    return not re.search(r"tmp|partial|\.part$|^\.(?!curate-run$)", name)


def _shown_whole(proxy: FaultProxy, final: dict[str, int], watcher: Watcher | None) -> None:
    """Every Parquet object the run was shown through the proxy, listed or read, had
    its final size (or the size the watcher read it with) and read whole, parses."""
    checked = watcher.checked if watcher else {}
    for key, size in proxy.seen.listed:
        uri = f"s3://{BUCKET}/{key}"
        assert _final_name(uri), uri
        if uri.endswith(".parquet") and uri in final:
            assert final[uri] == size, uri
    for key, data, ranged in proxy.seen.read:
        uri = f"s3://{BUCKET}/{key}"
        size = int(ranged.rsplit("/", 1)[1]) if ranged else len(data)
        known = final.get(uri, len(checked[uri]) if uri in checked else None)
        assert known in (None, size), (uri, known, size)
        if uri.endswith(".parquet") and not ranged:
            assert _whole_parquet(data), uri


def _ray_logs() -> str:
    """Every log file of this module's Ray session (its workers' stderr included)."""
    import ray

    session = Path(ray._private.worker._global_node.get_session_dir_path())
    return "\n".join(
        p.read_text(errors="replace") for p in (session / "logs").rglob("*") if p.is_file()
    )


def test_runs_through_faults_on_every_path_byte_identical(
    spec: str,
    proxy: FaultProxy,
    direct: StorageOptions,
    clean: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    from curate.api import run

    out = f"{ROOT}/runs/faulty"
    watcher = Watcher(out, direct)
    caplog.set_level(logging.DEBUG, logger="curate.io.storage")
    watcher.start()
    try:
        with proxy.faults(FAULTS, watch="faults/runs/faulty/"):
            result = run(spec, out)
    finally:
        watcher.stop.set()
        watcher.join(timeout=30)

    # Faults really happened, on every kind of request and of every kind.
    injected = dict(proxy.injected)
    for op in ("get", "head", "list", "put"):
        assert proxy.count(op) > 0, (op, injected)
    assert proxy.count("list") == 2 * proxy.requests["list"] / 3  # each: 2 faults, 1 answer
    for kind in KINDS:
        assert proxy.count(kind=kind) > 0, (kind, injected)
    assert proxy.count("get", "truncate") > 0 and proxy.count("put", "cut_request") > 0

    # Nothing lost, nothing changed.
    for stage in result.manifest["stages"]:
        assert stage["rows_in"] == stage["kept"] + stage["dropped"], stage
    faulty = user_files(out, direct)
    assert sorted(faulty) == sorted(clean)
    assert [k for k in clean if faulty[k] != clean[k]] == []

    # No partial object was ever shown: what the watcher saw, and what the run was shown.
    final = {f.uri: f.size for f in storage.list_prefix(out, direct)}
    assert watcher.checked and not watcher.broken, watcher.broken
    for uri, data in watcher.checked.items():
        assert uri not in final or final[uri] == len(data)
    assert proxy.seen.read, "the run read nothing back from its output"
    _shown_whole(proxy, final, watcher)
    for uri in watcher.keys:
        assert _final_name(uri), uri

    # Retries were logged (warnings from the second failure on), without credentials.
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries, "no retry was logged"
    shown = capfd.readouterr()
    logged = "\n".join(retries) + shown.out + shown.err + _ray_logs()
    assert "attempt 2 of 6; retrying" in logged
    for secret in (SECRET, ACCESS_KEY, "Signature=", "X-Amz-Signature", "Credential="):
        assert secret not in logged, secret
    for uri in final:
        assert SECRET.encode() not in storage.read_bytes(uri, direct)
    print("\nrequests:", dict(proxy.requests), "\nfaults:", injected)


def test_a_key_refused_for_good_fails_clearly_and_resume_finishes_it(
    spec: str,
    proxy: FaultProxy,
    direct: StorageOptions,
    clean: dict[str, bytes],
    capfd: pytest.CaptureFixture[str],
) -> None:
    from curate.cli import app

    out = f"{ROOT}/runs/refused"
    shard = sorted(k for k in clean if k.startswith("curated/part-"))[1]
    target = f"{out}/{shard}"
    runner = CliRunner()
    with proxy.faults(Plan(refuse=re.escape(target.split("/", 3)[3]) + "$")):
        failed = runner.invoke(app, ["run", spec, "-o", out])
        assert proxy.count(kind="refused") == 6  # every attempt of the one PUT, then no more
    shown = failed.output
    assert failed.exit_code == 1, shown
    errors = [line for line in shown.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {target}: cannot write (SlowDown after 6 attempts)"], shown
    captured = capfd.readouterr()
    assert SECRET not in shown + captured.out + captured.err
    assert not storage.exists(target, direct)
    assert storage.abort_stale(out, direct) == 0

    # The fault clears (and S3 goes on failing now and then): --resume finishes the run.
    with proxy.faults(Plan(every=4, seed=9, streak=1), watch=out.split("/", 3)[3] + "/"):
        resumed = runner.invoke(app, ["run", spec, "-o", out, "--resume"])
        assert proxy.count() > 0
    assert resumed.exit_code == 0, resumed.output
    assert user_files(out, direct) == clean
    assert proxy.seen.listed, "resume listed nothing (its commits, the output)"
    _shown_whole(proxy, {f.uri: f.size for f in storage.list_prefix(out, direct)}, None)


def test_a_permanent_error_is_not_retried_and_names_the_uri(
    proxy: FaultProxy, direct: StorageOptions
) -> None:
    """404 and 403 fail at once; 503s stop after max_attempts; a missing object is
    absent for ``exists`` but a server that keeps failing is an error, not absence."""
    opts = StorageOptions(endpoint_url=proxy.url, max_attempts=3, backoff_s=0.001)
    uri = f"{ROOT}/unit/one.txt"
    storage.write_bytes(uri, b"x", direct)
    proxy.reset(Plan())
    with pytest.raises(
        storage.MissingObjectError, match=r"/unit/none.txt: cannot read \(NoSuchKey\)$"
    ):
        storage.read_bytes(f"{ROOT}/unit/none.txt", opts)
    assert proxy.requests["get"] == 1
    assert not storage.exists(f"{ROOT}/unit/none.txt", opts)
    with proxy.faults(Plan(refuse="unit/one.txt")):
        with pytest.raises(StorageError) as info:
            storage.read_bytes(uri, opts)
        assert str(info.value) == f"{uri}: cannot read (SlowDown after 3 attempts)"
        assert info.value.code == "SlowDown" and proxy.count(kind="refused") == 3
        with pytest.raises(StorageError, match=r"cannot stat \(503 after 3 attempts\)"):
            storage.exists(uri, opts)


def test_multipart_upload_survives_faults_and_lost_replies(
    proxy: FaultProxy, direct: StorageOptions
) -> None:
    """Each part, the start and the completion retried; a completion whose answer was
    lost is recognized by its ETag; a start whose answer was lost leaves only an
    invisible pending upload, which ``abort_stale`` clears."""
    import os

    opts = StorageOptions(
        endpoint_url=proxy.url,
        multipart_threshold=5 << 20,
        part_size=5 << 20,
        backoff_s=0.001,
        max_backoff_s=0.01,
    )
    data = os.urandom(11 << 20)
    lost = Plan(every=1, streak=1, kinds=("lost_reply",), ops=frozenset({"create", "complete"}))
    with proxy.faults(lost):
        storage.write_bytes(f"{ROOT}/mp/lost.bin", data, opts)
        assert proxy.count("create", "lost_reply") == proxy.count("complete", "lost_reply") == 1
    with proxy.faults(Plan(every=2, seed=3, ops=frozenset({"create", "part", "complete"}))):
        storage.write_bytes(f"{ROOT}/mp/faulty.bin", data, opts)
        assert proxy.count("part") > 0
    for name in ("lost", "faulty"):
        assert storage.read_bytes(f"{ROOT}/mp/{name}.bin", direct) == data
        assert storage.stat(f"{ROOT}/mp/{name}.bin", direct).version.endswith("-3")
    assert storage.abort_stale(f"{ROOT}/mp", direct) == 1  # the start whose answer was lost
    assert storage.abort_stale(f"{ROOT}/mp", direct) == 0


def test_copy_and_remove_tree_retry(proxy: FaultProxy, direct: StorageOptions) -> None:
    """Every request of a copy and of a removal fails twice, then succeeds."""
    opts = StorageOptions(endpoint_url=proxy.url, backoff_s=0.001, max_backoff_s=0.01)
    base = f"{ROOT}/tree"
    for i in range(5):
        storage.write_bytes(f"{base}/d/{i}.txt", str(i).encode(), direct)
    storage.write_bytes(f"{base}/_cache/kept.txt", b"k", direct)
    ops = frozenset({"copy", "delete", "head", "list"})
    with proxy.faults(Plan(every=1, streak=2, ops=ops)):
        storage.copy(f"{base}/d/3.txt", f"{ROOT}/copied.txt", opts)
        storage.remove_tree(base, opts, keep=("_cache",))
        assert proxy.count("copy") == proxy.count("delete") == proxy.count("list") == 2
    assert storage.read_bytes(f"{ROOT}/copied.txt", direct) == b"3"
    assert [f.uri for f in storage.list_prefix(base, direct)] == [f"{base}/_cache/kept.txt"]
