"""``curate submit``/``status``/``logs``/``stop`` against a real three-node Ray cluster on
this machine (a head and two worker nodes, each its own ``ray start`` raylet, token
authentication on), with the loopback S3 server of ``test_s3`` as the shared storage.

Each node is a ``ray start --block`` process in its own process group with its own temp
dir and ports (:mod:`ray_cluster`); teardown signals exactly those groups.  ``ray stop``
is never called: it stops every Ray process of the machine, other sessions' included.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, RUN_FILES, comparable, user_files
from ray_cluster import Cluster, free_port, ray_cluster, state_api
from test_s3 import BUCKET, SECRET, s3_endpoint

from curate.io import storage
from curate.io.storage import StorageOptions

__all__ = ["s3_endpoint"]  # the module fixture of test_s3, reused here

pytestmark = [pytest.mark.cluster, pytest.mark.s3]


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str) -> Iterator[Cluster]:
    """Head (1 CPU, Jobs API on 127.0.0.1) plus two worker nodes (1 CPU and
    ``worker_node: 1`` each), token auth on; the S3 test credentials are in the
    nodes' environment (the jobs' drivers and workers inherit it)."""
    workers = {f"worker{i}": (1.0, {"worker_node": 1.0}) for i in (1, 2)}
    with ray_cluster(head_cpus=1, workers=workers) as running:
        yield running


@pytest.fixture
def opts(s3_endpoint: str) -> StorageOptions:
    return StorageOptions(endpoint_url=s3_endpoint)


def curate(cl: Cluster, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``curate ARGS`` in a fresh process, as a user runs it (the token in its env only)."""
    return subprocess.run(
        [sys.executable, "-m", "curate.cli", *args],
        env=cl.env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def jobs(cl: Cluster) -> Any:
    """This process's Jobs API client for the test cluster (the token only in the
    environment while the client reads it, as ``curate`` would)."""
    from curate.cluster import jobs_client

    saved = os.environ.get("RAY_AUTH_TOKEN")
    os.environ["RAY_AUTH_TOKEN"] = cl.token
    try:
        return jobs_client(cl.address)
    finally:
        if saved is None:
            os.environ.pop("RAY_AUTH_TOKEN")
        else:
            os.environ["RAY_AUTH_TOKEN"] = saved


def job_ids(cl: Cluster) -> set[str]:
    return {j.submission_id for j in jobs(cl).list_jobs()}


def s3_user_files(prefix: str, opts: StorageOptions) -> dict[str, bytes]:
    """``conftest.user_files`` for an ``s3://`` run: every object a user reads, and the
    manifest without its ``run`` key (which holds timings, hosts and nodes)."""
    found = {}
    for info in storage.list_prefix(prefix, opts):
        rel = storage.relative(info.uri, prefix)
        if rel.startswith(RUN_FILES):
            continue
        data = comparable(rel, storage.read_bytes(info.uri, opts))
        assert data is not None
        found[rel] = data
    return found


TEXT_PIPELINE = """\
name: cluster_text
seed: 7
sources:
  docs: {{uri: "s3://{bucket}/cl/in/*.jsonl", columns: {{url: string}}}}
stages:
  stats: {{type: text_stats}}
  length: {{type: length_filter, min_words: 4}}
  dedup: {{type: exact_dedup}}
sinks:
  curated: {{input: dedup, shard_bytes: 2KiB}}
execution: {{unit_bytes: 1B}}
storage: {{s3: {{endpoint_url: "{endpoint}"}}}}
"""


def _docs(shard: int) -> list[str]:
    rows = []
    for j in range(30):
        words = " ".join(f"w{(shard * 7 + j * k) % 50}" for k in range(j % 12))
        rows.append(json.dumps({"text": words or "x", "url": f"u{shard}-{j}"}))
    rows.append(json.dumps({"text": "the same text in every shard here", "url": "dup"}))
    return rows


def test_submit_runs_on_three_nodes_like_a_local_run(
    cluster: Cluster, opts: StorageOptions, tmp_path: Path
) -> None:
    for shard in range(6):
        body = ("\n".join(_docs(shard)) + "\n").encode()
        storage.write_bytes(f"s3://{BUCKET}/cl/in/docs-{shard}.jsonl", body, opts)
    folder = tmp_path / "pipes"
    folder.mkdir()
    spec = text_spec(folder, opts)
    remote = f"s3://{BUCKET}/cl/runs/cluster"

    # The same pipeline with an embedded Ray, in its own process (this one must not
    # start a Ray beside the cluster's), run meanwhile: its outputs must be byte-identical.
    local = f"s3://{BUCKET}/cl/runs/local"
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}
    local_run = subprocess.Popen(
        [sys.executable, "-m", "curate.cli", "run", str(spec), "-o", local, "--num-cpus", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        done = curate(cluster, "submit", str(spec), "--address", cluster.address, "-o", remote)
        seconds = time.monotonic() - t0
        shown = done.stdout + done.stderr
        assert done.returncode == 0, shown
        assert "SUCCEEDED" in shown
        assert cluster.token not in shown and SECRET not in shown

        manifest = json.loads(storage.read_bytes(f"{remote}/manifest.json", opts))
        nodes = manifest["run"]["cluster"]["per_node"]
        assert manifest["run"]["cluster"]["nodes"] == 3 and len(nodes) == 3
        assert nodes[0]["head"] and not any(n["head"] for n in nodes[1:])
        assert [n["resources"].get("worker_node", 0) for n in nodes] == [0, 1, 1]
        assert [n["cpus"] for n in nodes] == [1, 1, 1]
        for stage in manifest["stages"]:
            assert stage["rows_in"] == stage["kept"] + stage["dropped"], stage
        assert {s["name"]: s["dropped"] for s in manifest["stages"]}["dedup"] >= 5
        ran_out, ran_err = local_run.communicate(timeout=240)
    finally:
        if local_run.poll() is None:
            local_run.kill()
            local_run.communicate()
    assert local_run.returncode == 0, ran_out + ran_err
    on_cluster, at_home = s3_user_files(remote, opts), s3_user_files(local, opts)
    assert sorted(on_cluster) == sorted(at_home)
    differ = [k for k in on_cluster if on_cluster[k] != at_home[k]]
    if "manifest.json" in differ:
        a, b = (json.loads(f["manifest.json"]) for f in (on_cluster, at_home))
        assert {k: a[k] for k in a if a[k] != b[k]} == {k: b[k] for k in b if a[k] != b[k]}
    assert differ == []
    print(f"cluster job: {seconds:.1f} s")

    # Nothing secret in what Ray recorded of the job.
    recorded = json.dumps([j.dict() for j in jobs(cluster).list_jobs()], default=str)
    assert cluster.token not in recorded and SECRET not in recorded


def test_submit_runs_the_demo_as_the_readme_says(cluster: Cluster, tmp_path: Path) -> None:
    """`curate submit pipelines/demo_text.yaml` (its bundled data shipped in the job's
    working directory, a path every node of this one-machine cluster mounts as the
    output) gives the bytes a local `curate run` of the demo gives."""
    demo = REPO / "pipelines" / "demo_text.yaml"
    local, remote = tmp_path / "local", tmp_path / "cluster"
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_")}
    argv = [sys.executable, "-m", "curate.cli", "run", str(demo), "-o", str(local)]
    local_run = subprocess.Popen(
        [*argv, "--num-cpus", "2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        done = curate(
            cluster, "submit", str(demo), "--address", cluster.address, "-o", str(remote),
            "--shared-path",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        shown, _ = local_run.communicate(timeout=240)
    finally:
        if local_run.poll() is None:
            local_run.kill()
            local_run.communicate()
    assert local_run.returncode == 0, shown
    manifest = json.loads((remote / "manifest.json").read_text())
    assert manifest["run"]["cluster"]["nodes"] == 3
    assert {s["name"]: s["kept"] for s in manifest["stages"]}["fuzzy"] > 0
    assert user_files(remote) == user_files(local)


BROKEN = """\
name: broken
sources:
  docs: {uri: "s3://curate-test/cl/in/*.jsonl", colour: red}
stages:
  length: {type: length_filter, min_wrds: 4}
sinks:
  out: {input: length}
"""


def test_config_errors_and_bad_outputs_submit_nothing(cluster: Cluster, tmp_path: Path) -> None:
    before = job_ids(cluster)
    spec = tmp_path / "broken.yaml"
    spec.write_text(BROKEN)
    sent = curate(cluster, "submit", str(spec), "--address", cluster.address, "-o", "s3://b/o")
    checked = curate(cluster, "validate", str(spec))
    assert sent.returncode == 1 and checked.returncode == 1
    assert sent.stderr == checked.stderr  # the same report as `curate validate`
    assert "2 problem(s) found" in sent.stderr

    good = tmp_path / "good.yaml"
    good.write_text(
        f"name: g\nsources: {{d: {{uri: {tmp_path}/d.jsonl}}}}\nsinks: {{o: {{input: d}}}}\n"
    )
    (tmp_path / "d.jsonl").write_text('{"text": "a b c"}\n')
    local = curate(cluster, "submit", str(good), "--address", cluster.address, "-o", "out/x")
    assert local.returncode == 1
    assert "not shared storage" in local.stderr and len(local.stderr.strip().splitlines()) == 1

    wrong = dict(cluster.env, RAY_AUTH_TOKEN="not-the-token")
    denied = subprocess.run(
        [sys.executable, "-m", "curate.cli", "status", "x", "--address", cluster.address],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert denied.returncode == 1 and "token was rejected" in denied.stderr
    assert "not-the-token" not in denied.stdout + denied.stderr
    gone = curate(cluster, "status", "x", "--address", f"http://127.0.0.1:{free_port()}")
    assert gone.returncode == 1 and "cannot reach the Ray Jobs API" in gone.stderr
    unknown = curate(cluster, "status", "no-such-job", "--address", cluster.address)
    assert unknown.returncode == 1 and "no job 'no-such-job'" in unknown.stderr
    assert job_ids(cluster) == before


HANGING_PIPELINE = """\
name: cluster_hang
sources:
  docs: {{uri: "s3://{bucket}/cl/in/*.jsonl"}}
stages:
  judge:
    type: judge_score
    question_column: text
    answer_column: text
    backend: {{kind: openai, base_url: "{url}", model: judge, timeout_s: 600}}
sinks:
  out: {{input: judge}}
storage: {{s3: {{endpoint_url: "{endpoint}"}}}}
"""


def _status(cl: Cluster, job: str) -> str:
    shown = curate(cl, "status", job, "--address", cl.address)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.split(":", 1)[1].split()[0]


def test_status_logs_and_stop_of_a_running_job(
    cluster: Cluster, opts: StorageOptions, tmp_path: Path
) -> None:
    # An endpoint that accepts connections and never answers: the job runs until stopped.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        if not storage.list_prefix(f"s3://{BUCKET}/cl/in", opts):
            storage.write_bytes(f"s3://{BUCKET}/cl/in/d.jsonl", b'{"text": "a b"}\n', opts)
        spec = tmp_path / "hang.yaml"
        spec.write_text(HANGING_PIPELINE.format(bucket=BUCKET, url=url, endpoint=opts.endpoint_url))
        out = f"s3://{BUCKET}/cl/runs/hang"
        sent = curate(
            cluster, "submit", str(spec), "--address", cluster.address, "-o", out, "--no-wait"
        )
        assert sent.returncode == 0, sent.stderr
        job = sent.stdout.split("submitted job ", 1)[1].split()[0]

        deadline = time.monotonic() + 120
        client = jobs(cluster)
        while "Connected to Ray cluster" not in client.get_job_logs(job):  # the driver runs
            assert time.monotonic() < deadline, client.get_job_logs(job)
            assert str(client.get_job_status(job).value) in {"PENDING", "RUNNING"}
            time.sleep(1)
        logs = curate(cluster, "logs", job, "--address", cluster.address)
        assert logs.returncode == 0 and "Connected to Ray cluster" in logs.stdout
        assert _status(cluster, job) == "RUNNING"
        stopped = curate(cluster, "stop", job, "--address", cluster.address)
        assert stopped.returncode == 0, stopped.stderr
        assert stopped.stdout.strip() == f"{job}: STOPPED"
        assert _status(cluster, job) == "STOPPED"
        again = curate(cluster, "submit", str(spec), "--address", cluster.address, "-o", out)
        assert again.returncode == 1 and "is not empty; pass --resume" in again.stderr
    text = ["submit", str(text_spec(tmp_path, opts)), "--address", cluster.address, "-o", out]
    other = curate(cluster, *text, "--resume")
    assert other.returncode == 1 and "different pipeline spec" in other.stderr
    replaced = curate(cluster, *text, "--overwrite")
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    manifest = json.loads(storage.read_bytes(f"{out}/manifest.json", opts))
    assert manifest["pipeline"]["name"] == "cluster_text"


def text_spec(folder: Path, opts: StorageOptions, resources: str | None = None) -> Path:
    """TEXT_PIPELINE in ``folder`` (its ``length`` stage with ``resources``, if given)."""
    text = TEXT_PIPELINE.format(bucket=BUCKET, endpoint=opts.endpoint_url)
    if resources is not None:
        old = "  length: {type: length_filter, min_words: 4}"
        assert old in text
        text = text.replace(old, old[:-1] + f", resources: {resources}}}")
    path = folder / "text.yaml"
    path.write_text(text)
    return path


def _state_api(cl: Cluster, what: str) -> list[dict[str, Any]]:
    found = state_api(cl.address, cl.token, what)
    assert found is not None, f"the state API did not answer for {what}"
    return found


def test_placement_pins_a_stage_and_refuses_what_no_node_holds(
    cluster: Cluster, opts: StorageOptions, tmp_path: Path
) -> None:
    if not storage.list_prefix(f"s3://{BUCKET}/cl/in", opts):
        storage.write_bytes(f"s3://{BUCKET}/cl/in/d.jsonl", b'{"text": "a b c d e"}\n', opts)
    before = job_ids(cluster)
    spec = text_spec(tmp_path, opts, "{custom: {gpu_node: 1}}")
    out = f"s3://{BUCKET}/cl/runs/pinned-nowhere"
    refused = curate(cluster, "submit", str(spec), "--address", cluster.address, "-o", out)
    assert refused.returncode == 1
    assert "stage 'length' asks for {CPU: 1, gpu_node: 1} per actor; no node has the " in (
        refused.stderr
    )
    assert "the cluster's nodes: " in refused.stderr and "worker_node: 1}" in refused.stderr
    assert "nothing was submitted" in refused.stderr and job_ids(cluster) == before

    spec = text_spec(tmp_path, opts, "{custom: {worker_node: 0.5}}")
    out = f"s3://{BUCKET}/cl/runs/pinned"
    done = curate(cluster, "submit", str(spec), "--address", cluster.address, "-o", out)
    assert done.returncode == 0, done.stdout + done.stderr
    workers = {
        n["node_id"]
        for n in _state_api(cluster, "nodes?limit=10000")
        if "worker_node" in n["resources_total"]
    }
    pinned = [
        a
        for a in _state_api(cluster, "actors?limit=10000&detail=true")
        if "worker_node" in a["required_resources"]
    ]
    assert pinned and {a["node_id"] for a in pinned} <= workers
    assert {a["required_resources"]["worker_node"] for a in pinned} == {0.5}
