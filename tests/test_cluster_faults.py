"""Faults on a real multi-node Ray cluster on this machine (:mod:`ray_cluster`): this
module's own cluster, a head without CPUs (where the drivers attach) and two worker nodes.

* A worker node dies mid-run (SIGKILL of its raylet and everything it started): Ray
  restarts the pool actors it held on the surviving node and runs their unfinished units
  again; the run finishes with the outputs of a clean run, nothing counted twice.
* The driver dies mid-run: Ray removes its actors from the cluster, and ``--resume``
  finishes the run, reusing the units it committed.

The output folder is a local path: every node is on this machine, so it is shared
storage to all of them.  A stage of the test's plugin holds each unit for a while until
the test opens a gate file, so that a run is observably in progress when it is hit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import user_files, write_jsonl
from ray_cluster import Cluster, ray_cluster, state_api

pytestmark = pytest.mark.cluster

#: Node death noticed in about 5 s (Ray's default is about 30 s): the GCS checks every
#: node each second and gives up on one after 5 failed checks in a row.  A live node on
#: a busy 2-core machine answers well within the 3 s each check waits.
FAST_DEATH = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "3000",
    "RAY_health_check_failure_threshold": "5",
}
WORKER_CPUS = 2.0
UNITS = 24
PAUSE_S = 2.0
TIMEOUT_S = 240

PLUGIN = '''\
import os
import time
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curate.registry import register_stage
from curate.stage import Filter, StageConfig, Verdict


class HeldConfig(StageConfig):
    seconds: float = 0.0
    gate: str = ""
    log: str = ""


@register_stage("held_pass")
class HeldPass(Filter):
    """Keeps every row.  While the ``gate`` file is missing it holds each unit for
    ``seconds``; it logs when it starts and ends a unit, and in which process."""

    Config: ClassVar[type[StageConfig]] = HeldConfig

    def _log(self, what: str, unit: int) -> None:
        with open(self.config.log, "a") as log:
            log.write(f"{what} {unit} {os.getpid()} {time.time():.3f}\\n")

    def decide(self, batch: pa.Table) -> Verdict:
        unit = batch.column("_unit")[0].as_py()
        self._log("start", unit)
        if not os.path.exists(self.config.gate):
            time.sleep(self.config.seconds)
        self._log("end", unit)
        n = batch.num_rows
        return Verdict(np.ones(n, bool), pa.nulls(n, pa.string()))
'''

PIPELINE = """\
name: cluster_faults
seed: 7
plugins: [held_plugin]
sources:
  docs: {{uri: "data/*.jsonl", columns: {{url: string}}}}
stages:
  held:
    type: held_pass
    seconds: {seconds}
    gate: "{gate}"
    log: "{log}"
    # Not 1 CPU: the reads must still run inside this pool's actors, or a read retried
    # after a node death waits forever for a CPU that the pools hold.
    resources: {{num_cpus: 0.5}}
  stats: {{type: text_stats}}
  length: {{type: length_filter, min_words: 4}}
  dedup: {{type: exact_dedup}}
sinks:
  curated: {{input: dedup, shard_bytes: 2KiB}}
execution: {{unit_bytes: 1B}}
"""


class Project:
    """The pipeline, its inputs and the plugin's gate and log, shared by the module."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gate = root / "gate"
        self.log = root / "held.log"
        (root / "held_plugin.py").write_text(PLUGIN)
        for shard in range(UNITS):
            rows = []
            for j in range(30):
                words = " ".join(f"w{(shard * 7 + j * k) % 50}" for k in range(j % 12))
                rows.append({"text": words or "x", "url": f"u{shard}-{j}"})
            rows.append({"text": "the same text in every shard here", "url": "dup"})
            write_jsonl(root / "data" / f"docs-{shard:02d}.jsonl", rows)
        self.spec = root / "faults.yaml"
        self.spec.write_text(PIPELINE.format(seconds=PAUSE_S, gate=self.gate, log=self.log))

    def hold(self, held: bool) -> None:
        """Close the gate (every unit is held) or open it."""
        if held:
            self.gate.unlink(missing_ok=True)
        else:
            self.gate.touch()

    def fresh_log(self) -> None:
        self.log.unlink(missing_ok=True)

    def calls(self) -> list[tuple[str, int, int, float]]:
        """The plugin's log: (start or end, unit, pid, time) per line."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().split("\n")[:-1]  # the last one may be unfinished
        return [(w, int(u), int(p), float(t)) for w, u, p, t in map(str.split, lines)]


def _env(cl: Cluster, project: Project) -> dict[str, str]:
    return {**cl.env, "PYTHONPATH": str(project.root), "RAY_DEDUP_LOGS": "0"}


def start_run(cl: Cluster, project: Project, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``curate run`` as a driver of the cluster, in a process group of its own."""
    argv = [sys.executable, "-m", "curate.cli", "run", str(project.spec), "-o", str(out)]
    log = open(f"{out}.log", "ab")  # noqa: SIM115 - the run's lifetime
    return subprocess.Popen(
        [*argv, "--address", cl.gcs, *extra],
        env=_env(cl, project),
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=project.root,
        start_new_session=True,
    )


def held_run(cl: Cluster, project: Project, name: str) -> tuple[Path, subprocess.Popen[bytes]]:
    """A fresh log, every unit held, and a run into ``project.root / name`` started."""
    out = project.root / name
    project.hold(True)
    project.fresh_log()
    return out, start_run(cl, project, out)


def finish(cl: Cluster, run: subprocess.Popen[bytes], out: Path) -> None:
    """Wait for a run; fail with its output and the nodes' logs if it fails."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        run.wait(timeout=TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    shown = Path(f"{out}.log").read_text(errors="replace")[-6000:]
    assert run.returncode == 0, f"{shown}\n{cl.logs()}"


def committed(out: Path) -> set[int]:
    folder = out / "_commits" / "seg-000"
    names = [p.stem for p in folder.glob("unit-*.json")] if folder.is_dir() else []
    return {int(n.split("-")[1]) for n in names}


def outputs(out: Path) -> dict[str, bytes]:
    """``conftest.user_files`` of a run, less the git commit its manifest names: the
    repository may take a commit while this module runs (its runs are minutes apart)."""
    files = user_files(out)
    manifest = json.loads(files["manifest.json"])
    manifest["software"].pop("git_commit")
    files["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return files


def balanced(out: Path) -> dict[str, Any]:
    """The run's manifest, once every stage's rows in are its rows kept and dropped."""
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    for stage in manifest["stages"]:
        assert stage["rows_in"] == stage["kept"] + stage["dropped"], stage
    assert not list(out.rglob(".*.tmp-*"))  # no temporary file of a killed writer
    return manifest


def wait_until(
    what: str, ready: Any, cl: Cluster, out: Path, run: Any = None, timeout: float = TIMEOUT_S
) -> Any:
    """Poll ``ready()`` until it returns something true; fail after ``timeout``, or at
    once when ``run`` (a process) has ended, with the run's output and the nodes' logs."""
    deadline = time.monotonic() + timeout
    while True:
        found = ready()
        if found:
            return found
        ended = run is not None and run.poll() is not None
        if ended or time.monotonic() > deadline:
            why = f"the run ended (rc {run.returncode})" if ended else "timed out"
            shown = Path(f"{out}.log").read_text(errors="replace")[-6000:]
            raise AssertionError(f"{why} waiting for {what}:\n{shown}\n{cl.logs()}")
        time.sleep(0.05)


def cpus_in_use(cl: Cluster) -> list[float] | None:
    """The cluster's CPUs (in use, in all) per its autoscaler report; None while the
    dashboard cannot say."""
    request = urllib.request.Request(
        f"{cl.address}/api/cluster_status", headers={"Authorization": f"Bearer {cl.token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            usage = json.load(response)["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
    except (OSError, KeyError, TypeError, ValueError):
        return None
    cpus: list[float] | None = usage.get("CPU")
    return cpus


def cpu_actors(cl: Cluster) -> list[dict[str, Any]] | None:
    """Actors that hold or wait for a CPU (alive, pending, restarting)."""
    actors = state_api(cl.address, cl.token, "actors?limit=10000&detail=true")
    if actors is None:
        return None
    return [a for a in actors if a["state"] != "DEAD" and a["required_resources"].get("CPU")]


def all_cpus_free(cl: Cluster) -> bool:
    return cpus_in_use(cl) == [0.0, 2 * WORKER_CPUS] and cpu_actors(cl) == []


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A head with no CPUs (the drivers attach to it, and it never dies) and two worker
    nodes with 2 CPUs each: one of them can carry a run on its own."""
    workers = {f"worker{i}": (WORKER_CPUS, {f"worker{i}": 1.0}) for i in (1, 2)}
    with ray_cluster(head_cpus=0, workers=workers, node_env=FAST_DEATH) as running:
        yield running


@pytest.fixture
def full(cluster: Cluster) -> Cluster:
    """The cluster with two live worker nodes: a worker killed by an earlier test is
    replaced by a fresh one."""
    live = [n for n in cluster.procs if n != "head" and n not in cluster.killed]
    for _ in range(2 - len(live)):
        name = f"worker{len(cluster.procs)}"
        cluster.add_worker(name, WORKER_CPUS, {name: 1.0})
    cluster.wait_for(3)
    return cluster


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    return Project(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def reference(cluster: Cluster, project: Project) -> dict[str, bytes]:
    """What a clean run of the pipeline on the cluster gives (the gate open: quick)."""
    project.hold(False)
    out = project.root / "reference"
    finish(cluster, start_run(cluster, project, out), out)
    balanced(out)
    return outputs(out)


def _node_of(cl: Cluster, pids: set[int]) -> dict[int, str]:
    """Which worker node each of ``pids`` runs on (by the process trees of the nodes)."""
    import psutil

    found = {}
    for name, proc in cl.procs.items():
        if name == "head" or name in cl.killed:
            continue
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(proc.pid).children(recursive=True):
                if child.pid in pids:
                    found[child.pid] = name
    return found


def _busy_victim(cl: Cluster, project: Project, out: Path) -> str | None:
    """Once 3 units are committed: the worker node holding most units that it started
    within the last quarter pause (so that it dies holding them)."""
    if len(committed(out)) < 3:
        return None
    calls = project.calls()
    ended = {(u, p) for w, u, p, _ in calls if w == "end"}
    now = time.time()
    held = {(u, p) for w, u, p, t in calls if w == "start" and now - t < PAUSE_S / 4} - ended
    nodes = _node_of(cl, {p for _, p in held})
    if not nodes:
        return None
    return max(sorted(set(nodes.values())), key=list(nodes.values()).count)


def _interrupted(project: Project, pids: set[int]) -> set[int]:
    """Units that processes of ``pids`` started and did not end."""
    calls = [(w, u) for w, u, p, _ in project.calls() if p in pids]
    return {u for w, u in calls if w == "start"} - {u for w, u in calls if w == "end"}


def test_a_worker_node_killed_mid_run_changes_nothing(
    full: Cluster, project: Project, reference: dict[str, bytes]
) -> None:
    out, run = held_run(full, project, "node-killed")
    try:
        t0 = time.monotonic()
        victim = wait_until(
            "a worker node holding units", lambda: _busy_victim(full, project, out), full, out, run
        )
        before = committed(out)
        full.kill_node(victim)
        killed_at = time.monotonic() - t0
        held = _interrupted(project, full.killed_pids)
        assert held  # the node died in the middle of units
        assert len(before) < UNITS and run.poll() is None  # the run was in progress
        full.wait_for(2, timeout=60)  # Ray saw the node die
        noticed = time.monotonic() - t0
        project.hold(False)
        finish(full, run, out)
    finally:
        project.hold(False)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    seconds = time.monotonic() - t0

    manifest = balanced(out)
    assert outputs(out) == reference
    assert manifest["run"]["cluster"]["nodes"] == 2  # it ended on the head and one worker
    # The units the dead node held were run again, by processes of the other node.
    calls = project.calls()
    for unit in held:
        assert {p for w, u, p, _ in calls if w == "end" and u == unit} - full.killed_pids
    jobs = state_api(full.address, full.token, "jobs") or []
    job = [j["job_id"] for j in jobs if f"-o {out} " in f"{j['entrypoint']} "]
    actors = state_api(full.address, full.token, "actors?limit=10000&detail=true") or []
    restarts = [
        int(a["num_restarts"])
        for a in actors
        if a["job_id"] in job and a["class_name"].startswith("MapWorker")
    ]
    assert max(restarts) >= 1  # Ray restarted the pool actors of the dead node
    print(
        f"killed {victim} at {killed_at:.1f} s ({len(before)}/{UNITS} units committed, "
        f"{len(held)} held), seen dead at {noticed:.1f} s, run done at {seconds:.1f} s"
    )


def test_a_killed_driver_leaves_nothing_running_and_resume_finishes(
    full: Cluster, project: Project, reference: dict[str, bytes]
) -> None:
    out, run = held_run(full, project, "driver-killed")
    try:
        t0 = time.monotonic()
        wait_until("4 committed units", lambda: len(committed(out)) >= 4, full, out, run)
        os.killpg(run.pid, signal.SIGKILL)  # the driver, with no chance to clean up
        run.wait(timeout=30)
        killed_at = time.monotonic() - t0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    # Ray ends the dead driver's job and its actors: every CPU of the cluster is free.
    wait_until("free CPUs", lambda: all_cpus_free(full), full, out, timeout=90)
    freed = time.monotonic() - t0
    done = committed(out)
    assert 4 <= len(done) < UNITS
    assert not (out / "manifest.json").exists()

    project.hold(False)
    project.fresh_log()  # the resumed run's calls only
    resumed = start_run(full, project, out, "--resume")
    finish(full, resumed, out)
    seconds = time.monotonic() - t0

    manifest = balanced(out)
    assert manifest["run"]["resumed"] is True
    assert outputs(out) == reference
    rerun = {u for w, u, _, _ in project.calls() if w == "end"}
    assert rerun and not rerun & done  # committed units were reused, not run again
    assert len(rerun) == UNITS - len(done)
    print(
        f"killed the driver at {killed_at:.1f} s ({len(done)}/{UNITS} units committed), "
        f"CPUs free at {freed:.1f} s, resumed run done at {seconds:.1f} s"
    )
