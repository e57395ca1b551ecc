"""What a pipeline run on a Ray cluster executes: the one entry point shared by
``curate submit`` (Ray Jobs API) and the KubeRay ``RayJob`` in ``infra/kuberay/``.

Keeping the command in one place means a job submitted from the command line
and one started by the KubeRay operator run the same thing; ``tests/test_infra.py``
checks that ``infra/kuberay/rayjob.yaml`` spells exactly this command.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def entrypoint(
    pipeline: str,
    output: str,
    overrides: list[str] | None = None,
    *,
    mode: Literal["resume", "overwrite"] | None = None,
) -> list[str]:
    """The argv a Ray job runs for ``pipeline`` writing to ``output``.

    ``python -m curate.cli run PIPELINE --output OUTPUT --address auto``, then one
    ``--set OVERRIDE`` pair per override, in order, then ``--resume`` or
    ``--overwrite`` when ``mode`` says so. ``--address auto`` makes the
    driver join the cluster the job runs on instead of starting its own Ray.
    ``pipeline`` is a path inside the job's working directory (the runtime
    environment carries the pipeline folder); ``output`` must be storage every node
    sees (``s3://...`` or a shared mount).

    Ray's Jobs API takes the entry point as one shell string: join the list with
    ``shlex.join`` (for plain paths and URIs that equals ``" ".join``).

    >>> entrypoint("p.yaml", "s3://b/o", ["seed=1"])[-4:]
    ['--address', 'auto', '--set', 'seed=1']
    """
    if isinstance(overrides, str):  # a lone string would be split into characters
        raise TypeError("overrides must be a list of 'path=value' strings, not one string")
    argv = ["python", "-m", "curate.cli", "run", pipeline, "--output", output]
    argv += ["--address", "auto"]
    for override in overrides or []:
        argv += ["--set", override]
    if mode is not None:
        argv.append(f"--{mode}")
    return argv


# --- Submitting through the Ray Jobs API (``curate submit``/``status``/``logs``/``stop``) ---

#: Folders of the pipeline's folder never shipped as the job's working directory:
#: environments, run outputs and benchmark data are large and no pipeline reads them.
WORKING_DIR_EXCLUDES = [
    ".venv",
    "venv",
    ".git",
    "out",
    "bench/data",
    "bench/out",
    "__pycache__",
    "*.pyc",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
]


class ClusterError(Exception):
    """A problem talking to the cluster, as one line for the user (no traceback)."""


def auth_token() -> str | None:
    """The Ray token for the Jobs API, found where Ray itself looks: ``RAY_AUTH_TOKEN``,
    the file ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.  Read here (not left to
    Ray's SDK) so that it is sent whatever ``RAY_AUTH_MODE`` this shell has."""
    import os
    from pathlib import Path

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _auth_failed(address: str, problem: str) -> ClusterError:
    return ClusterError(
        f"{address}: authentication failed: {problem} (set RAY_AUTH_TOKEN or "
        "RAY_AUTH_TOKEN_PATH, or put the cluster's token in ~/.ray/auth_token)"
    )


def _unreachable(address: str) -> ClusterError:
    return ClusterError(f"cannot reach the Ray Jobs API at {address} (is the dashboard up?)")


def _auth_headers() -> dict[str, str]:
    """The token (:func:`auth_token`) as a bearer header; none without one."""
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _one_line(address: str, exc: Exception) -> ClusterError:
    """Ray's connection and authentication errors, as one line that names no secret."""
    from ray.exceptions import AuthenticationError

    if isinstance(exc, AuthenticationError):
        problem = (
            "the token was rejected"
            if "invalid" in str(exc).lower()
            else "it needs a token and none was found"
        )
        return _auth_failed(address, problem)
    if isinstance(exc, ConnectionError):
        return _unreachable(address)
    return ClusterError(
        f"{address}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    )


def jobs_client(address: str) -> Any:
    """A ``JobSubmissionClient`` for ``address`` (``http://HEAD:8265``), with the token
    as a bearer header when one is found; errors become :class:`ClusterError`."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_auth_headers() or None)
    except Exception as exc:
        raise _one_line(address, exc) from None


def job_call(address: str, job_id: str, call: Callable[[], T]) -> T:
    """Run one Jobs API call; an unknown job id and server errors become one line."""
    try:
        return call()
    except Exception as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            raise ClusterError(f"no job '{job_id}' on {address}") from None
        raise _one_line(address, exc) from None


def shared_output(output: str, shared_path: bool) -> str:
    """``output`` as the job will see it: an ``s3://`` URI, or an absolute local path
    only when the user said every node mounts it (a node-local folder would scatter
    the run's shards over the nodes' disks)."""
    import os

    from curate.io import storage

    if storage.is_s3(output):
        return output
    if not shared_path:
        raise ClusterError(
            f"output {output} is not shared storage: use an s3:// URI, or pass --shared-path "
            "if every node of the cluster mounts this path"
        )
    return os.path.abspath(output)


def staged_package(into: Path) -> Path:
    """A copy of the curate package as pip lays it out (``curate/`` with ``stages/`` as
    ``curate/stages/``) under ``into``, for ``py_modules``: an editable install keeps
    ``stages/`` beside the package, which a shipped ``curate/`` alone would lose."""
    import importlib
    import shutil

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = Path(importlib.import_module("curate").__path__[0])
    stages = Path(importlib.import_module("curate.stages").__path__[0])
    target = into / "curate"
    shutil.copytree(package, target, ignore=ignore)
    if not (target / "stages" / "__init__.py").exists():
        shutil.copytree(stages, target / "stages", ignore=ignore, dirs_exist_ok=True)
    from curate.lineage.manifest import git_commit

    (target / SOURCE_COMMIT_FILE).write_text(git_commit() + "\n", encoding="utf-8")
    return target


#: Written into a shipped package: the commit it was copied from, for the manifest of
#: the job's run (the copy has no ``.git`` to ask; see ``curate.api.source_commit``).
SOURCE_COMMIT_FILE = "_source_commit.txt"


def pip_packages(lock: Path) -> list[str]:
    """The requirement lines of a pip lock file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in lock.read_text().splitlines())
    return [line for line in lines if line]


def runtime_env(pipeline_dir: Path, package: Path, pip_lock: Path | None) -> dict[str, Any]:
    """What a job carries: the pipeline's folder as ``working_dir`` (its relative data
    and model paths keep working), the curate package as ``py_modules`` and, only when
    asked, the pinned dependencies.  No environment variables: credentials stay in the
    cluster's own environment and never enter the job's recorded runtime env."""
    env: dict[str, Any] = {
        "working_dir": str(pipeline_dir),
        "py_modules": [str(package)],
        "excludes": list(WORKING_DIR_EXCLUDES),
    }
    if pip_lock is not None:
        env["pip"] = {"packages": pip_packages(pip_lock), "pip_check": False}
    return env


def live_nodes(address: str) -> list[dict[str, Any]]:
    """The live nodes of the cluster behind the Jobs API at ``address``, as the
    dashboard's state API (``GET /api/v0/nodes``) describes them."""
    import json
    import urllib.error
    import urllib.request

    url = f"{address.rstrip('/')}/api/v0/nodes?limit=10000"
    request = urllib.request.Request(url, headers=_auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise _auth_failed(address, "the token was rejected") from None
        raise ClusterError(
            f"{address}: cannot list the cluster's nodes (HTTP {exc.code})"
        ) from None
    except (OSError, ValueError):
        raise _unreachable(address) from None
    nodes: list[dict[str, Any]] = body.get("data", {}).get("result", {}).get("result", [])
    return nodes


def placement_problems(address: str, stages: dict[str, Any]) -> list[str]:
    """Stages (name -> :class:`curate.stage.Resources`) whose actor fits no live node of
    the cluster at ``address``: :func:`curate.placement.unplaceable` on its nodes."""
    from curate.placement import shapes_from_state_api, unplaceable

    return unplaceable(stages, shapes_from_state_api(live_nodes(address)))


def submit(
    address: str,
    pipeline: Path,
    output: str,
    overrides: list[str] | None,
    pip_lock: Path | None = None,
    mode: Literal["resume", "overwrite"] | None = None,
) -> str:
    """Submit ``pipeline`` (already checked) as a Ray job writing to ``output``; return
    the job id.  The entry point is :func:`entrypoint`, run in the pipeline's folder."""
    import shlex
    import tempfile
    import uuid

    client = jobs_client(address)
    name = pipeline.stem.replace("_", "-")
    job_id = f"curate-{name}-{uuid.uuid4().hex[:8]}"
    argv = entrypoint(pipeline.name, output, overrides, mode=mode)
    with tempfile.TemporaryDirectory(prefix="curate-submit-") as tmp:
        env = runtime_env(pipeline.parent, staged_package(Path(tmp)), pip_lock)
        metadata = {"curate_pipeline": pipeline.name, "curate_output": output}

        def send() -> str:
            return str(
                client.submit_job(
                    entrypoint=shlex.join(argv),
                    submission_id=job_id,
                    runtime_env=env,
                    metadata=metadata,
                )
            )

        return job_call(address, job_id, send)


async def _tail(client: Any, job_id: str, write: Callable[[str], None]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def follow_logs(address: str, job_id: str, write: Callable[[str], None]) -> None:
    """Stream a job's logs to ``write`` until the job ends (Ray's tail is async)."""
    import asyncio

    client = jobs_client(address)
    job_call(address, job_id, lambda: client.get_job_status(job_id))  # unknown id: one line
    job_call(address, job_id, lambda: asyncio.run(_tail(client, job_id, write)))


def wait(address: str, job_id: str, on_change: Callable[[str], None], poll_s: float = 1.0) -> str:
    """Poll a job until it ends; call ``on_change`` with each new status; return the last."""
    import time

    client = jobs_client(address)
    last = ""
    while True:
        found = job_call(address, job_id, lambda: client.get_job_status(job_id))
        status = str(getattr(found, "value", found))
        if status != last:
            on_change(status)
            last = status
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


#: Ray's terminal job statuses (``JobStatus.is_terminal``).
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
