"""A real multi-node Ray cluster on this machine, for the ``cluster`` tests.

Every node is a ``ray start --block`` process in its own process group (its own session)
with its own temp dir and ports, token authentication on.  A node is stopped (or killed,
to test faults) by signalling exactly its process group, then any process still naming
its temp dir (Ray's workers run in process groups of their own).  ``ray stop`` is never
called: it stops every Ray process of the machine, other sessions' included.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def state_api(address: str, token: str, what: str) -> list[dict[str, Any]] | None:
    """Rows of the dashboard's state API ``/api/v0/<what>`` (None while it is not up)."""
    request = urllib.request.Request(
        f"{address}/api/v0/{what}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = json.load(response)
    except OSError:
        return None
    rows: list[dict[str, Any]] = body.get("data", {}).get("result", {}).get("result", [])
    return rows


def alive_nodes(address: str, token: str) -> int:
    """Live nodes per the dashboard's state API (0 while the dashboard is not up)."""
    nodes = state_api(address, token, "nodes?limit=100") or []
    return sum(1 for n in nodes if n.get("state") == "ALIVE")


def _descendants(pid: int) -> list[Any]:
    import psutil

    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return []


def _processes_naming(text: str) -> list[Any]:
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if text in " ".join(p.info["cmdline"] or []):
                found.append(p)
    return found


class Cluster:
    """A running test cluster: a head and worker nodes, each ``ray start --block``.

    ``address`` is the Jobs API / dashboard URL, ``gcs`` the address a driver connects
    to (``ray.init(address=...)``, ``curate run --address``); ``env`` is the client
    environment (the token in it, no other ``RAY_`` variable).
    """

    def __init__(
        self,
        root: Path,
        token: str,
        env: dict[str, str],
        node_env: Mapping[str, str] | None = None,
        object_store_bytes: int = 128 << 20,
    ) -> None:
        self.root = root
        self.object_store_bytes = object_store_bytes
        self.token = token
        self.env = env
        self.node_env = {**env, **(node_env or {})}
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: Nodes killed on purpose (:meth:`kill_node`): not a failed start.
        self.killed: set[str] = set()
        #: The processes that died with them.
        self.killed_pids: set[int] = set()

    def launch(self, name: str, num_cpus: float, *args: str) -> None:
        """Start node ``name`` (its temp dir and log under ``root``), not waiting for it."""
        (self.root / name).mkdir()
        argv = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats"]
        argv += ["--node-ip-address", "127.0.0.1", "--num-cpus", f"{num_cpus:g}"]
        argv += [
            "--temp-dir",
            str(self.root / name),
            "--object-store-memory",
            str(self.object_store_bytes),
        ]
        argv += ["--dashboard-agent-listen-port", str(free_port()), *args]
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the node's lifetime
        self.procs[name] = subprocess.Popen(
            argv, env=self.node_env, stdout=log, stderr=log, start_new_session=True
        )

    def start_head(self, num_cpus: float = 1) -> None:
        self.launch(
            "head",
            num_cpus,
            "--head",
            "--port",
            str(self.gcs_port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard_port),
            "--ray-client-server-port",
            str(free_port()),
        )
        self.wait_for(1)

    def add_worker(
        self, name: str, num_cpus: float = 1, resources: Mapping[str, float] | None = None
    ) -> None:
        """Start a worker node (not waiting for it: see :meth:`wait_for`)."""
        extra = ["--resources", json.dumps(dict(resources))] if resources else []
        self.launch(name, num_cpus, "--address", self.gcs, *extra)

    def alive(self) -> int:
        return alive_nodes(self.address, self.token)

    def wait_for(self, nodes: int, timeout: float = START_TIMEOUT_S) -> None:
        """Wait until exactly ``nodes`` nodes are alive (a killed one must be seen dead)."""
        deadline = time.monotonic() + timeout
        while self.alive() != nodes:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            dead = [n for n in dead if n not in self.killed]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"cluster did not reach {nodes} node(s):\n{self.logs()}")
            time.sleep(0.5)

    def kill_node(self, name: str) -> None:
        """SIGKILL node ``name`` at once, as a machine that dies: its process group (its
        raylet and the processes it started) and every process descending from it (Ray
        starts its workers in process groups of their own)."""
        self.killed.add(name)
        proc = self.procs[name]
        family = _descendants(proc.pid)
        self.killed_pids |= {proc.pid, *(p.pid for p in family)}
        with_group(proc.pid, signal.SIGKILL)
        for p in family:
            with contextlib.suppress(Exception):
                p.kill()
        proc.wait(timeout=30)

    def logs(self, tail: int = 800) -> str:
        """The tail of every node's log (for failure messages)."""
        parts = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace")[-tail:]
            parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts)

    def stop(self) -> None:
        """SIGTERM each node's process group, SIGKILL what is left after a short grace (a
        node drains for up to 30 s on SIGTERM), then any process that descended from a
        node or still names our temp dir."""
        procs = list(self.procs.values())
        family = [p for proc in procs for p in _descendants(proc.pid)]
        for proc in reversed(procs):
            with_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for proc in procs:
            with_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for p in [*family, *_processes_naming(str(self.root))]:
            with contextlib.suppress(Exception):
                p.kill()


@contextlib.contextmanager
def ray_cluster(
    head_cpus: float = 1,
    workers: Mapping[str, tuple[float, Mapping[str, float]]] | None = None,
    extra_env: Mapping[str, str] | None = None,
    node_env: Mapping[str, str] | None = None,
    object_store_bytes: int = 128 << 20,
) -> Iterator[Cluster]:
    """A head with ``head_cpus`` CPUs and the ``workers`` (name: CPUs, custom resources),
    all alive; torn down on exit.  ``extra_env`` joins the client environment and the
    nodes' (their jobs' drivers and workers inherit it), ``node_env`` the nodes' only
    (Ray's system config, such as ``RAY_health_check_period_ms``); each node has an
    object store of ``object_store_bytes``."""
    root = Path(tempfile.mkdtemp(prefix="curate-cl-", dir="/tmp"))  # short: socket paths
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env['PATH']}")
    env.update(extra_env or {})
    cluster = Cluster(root, token, env, node_env, object_store_bytes)
    try:
        cluster.start_head(head_cpus)
        for name, (cpus, resources) in (workers or {}).items():
            cluster.add_worker(name, cpus, resources)
        cluster.wait_for(1 + len(workers or {}))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
