"""``curate submit``, ``status``, ``logs``, ``stop``: runs on a Ray cluster, through its
Jobs API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer

from curate.cli import SetOption, _report, app, err, out
from curate.cli.run import print_summary
from curate.config.yamlpos import ConfigError

AddressOption = Annotated[
    str,
    typer.Option(
        "--address",
        envvar="RAY_API_SERVER_ADDRESS",
        help="The cluster's Jobs API, http://HEAD:8265 (or RAY_API_SERVER_ADDRESS). The token "
        "(RAY_AUTH_MODE=token clusters) is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
        "or ~/.ray/auth_token and sent as a header, never printed.",
    ),
]


def _cluster_error(exc: Exception) -> typer.Exit:
    err.print("[bold red]error:[/]", end=" ")
    err.print(str(exc), highlight=False, markup=False)
    return typer.Exit(1)


@app.command("submit")
def submit_command(
    pipeline: str,
    address: AddressOption,
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="s3://bucket/prefix (default: the file's output:)"),
    ] = None,
    set_: SetOption = None,
    shared_path: Annotated[
        bool, typer.Option(help="The output is a local path that every node mounts")
    ] = False,
    pip_lock: Annotated[
        str | None,
        typer.Option(help="Install this pip lock file in the job (requirements/lock.txt)"),
    ] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return")] = False,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Stream the job's logs until it ends")
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Finish the partial run in the output (a stopped or failed job)")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the run in the output (its stage cache is kept)")
    ] = False,
    placement_check: Annotated[
        bool,
        typer.Option(
            help="Refuse a stage that no live node can hold (turn off for an autoscaling "
            "cluster whose node type for it is not up yet: the job checks again against "
            "the autoscaler's node types)"
        ),
    ] = True,
) -> None:
    """Run a pipeline on a Ray cluster through the Jobs API.

    Checks the pipeline here first (nothing is sent when it has a problem), then ships
    the pipeline's folder as the job's working directory and this curate package as a
    py_module, and runs `python -m curate.cli run ... --address auto` on the head.
    The cluster's image must already have curate's dependencies (the same versions as
    requirements/lock.txt), unless --pip-lock installs them in the job. Relative paths
    in --set are taken from the pipeline's folder, as the job sees them. The output
    must be storage every node sees: an s3:// URI, or a mounted path with --shared-path.
    Waits for the job and exits 0 only when it succeeds (Ctrl-C leaves it running).
    """
    import contextlib as ctx
    from pathlib import Path

    from curate import cluster
    from curate.api import check

    for a, b, name_a, name_b in (
        (no_wait, follow, "no-wait", "follow"),
        (resume, overwrite, "resume", "overwrite"),
    ):
        if a and b:
            err.print(f"[bold red]error:[/] --{name_a} and --{name_b} contradict each other")
            raise typer.Exit(2)
    mode: Literal["resume", "overwrite"] | None = (
        "resume" if resume else "overwrite" if overwrite else None
    )
    path = Path(pipeline).resolve()
    try:
        with ctx.chdir(path.parent):  # --set paths resolve as they will in the job
            plan = check(str(path), set_)
    except ConfigError as exc:
        _report(exc)
        raise typer.Exit(1) from None
    try:
        target = _submit_output(plan, output, shared_path, mode)
        if placement_check:
            stages = {name: b.resources for name, b in plan.pipeline.stages.items()}
            problems = cluster.placement_problems(address, stages)
            if problems:
                raise cluster.ClusterError(
                    "; ".join(problems) + " (nothing was submitted; --no-placement-check "
                    "submits anyway, for an autoscaling cluster)"
                )
        lock = Path(pip_lock).resolve() if pip_lock else None
        job_id = cluster.submit(address, path, target, set_, lock, mode)
    except (cluster.ClusterError, OSError) as exc:
        raise _cluster_error(exc) from None
    out.print(f"submitted job {job_id} to {address}: output {target}", highlight=False)
    if no_wait:
        out.print(f"follow it with: curate logs {job_id} --address {address} --follow")
        return
    _await_job(address, job_id, follow)
    if not follow:  # the followed logs already showed the job's own table
        _print_remote_summary(target, plan.pipeline.spec.storage.options())


def _print_remote_summary(target: str, opts: Any) -> None:
    """The stage table of a finished job, from the manifest it wrote (when this machine
    can read the output: it may lack the cluster's storage credentials)."""
    import json

    from curate.io import storage
    from curate.io.storage import StorageError

    try:
        manifest = json.loads(storage.read_bytes(storage.join(target, "manifest.json"), opts))
    except (OSError, StorageError, ValueError) as exc:
        err.print(f"(cannot read {target}/manifest.json here: {exc})", highlight=False)
        return
    print_summary(manifest)
    out.print(f"output: {target}", highlight=False)


def _submit_output(plan: Any, output: str | None, shared_path: bool, mode: str | None) -> str:
    """The output a submitted job writes: ``--output`` or the file's ``output:``, shared
    storage only; empty, or with ``mode`` a curate run (``resume``: a partial run of
    this spec and these inputs). Checked here when this machine can read the output,
    so that the job does not fail on it after its start-up."""
    from curate import cluster
    from curate.api import output_state, run_identity
    from curate.io import storage
    from curate.io.layout import Layout
    from curate.io.storage import StorageError
    from curate.lineage.commits import ResumeError, check_resumable

    given = output or plan.pipeline.spec.output
    if given is None:
        raise cluster.ClusterError("submit needs --output s3://bucket/prefix")
    if output is None and not storage.is_s3(given):
        given = str(plan.pipeline.base_dir / given)
    target = cluster.shared_output(given, shared_path)
    opts = plan.pipeline.spec.storage.options()
    try:
        state = output_state(target, opts)
    except StorageError as exc:  # no credentials here, say: the job finds out
        err.print(f"(cannot check {target} from here: {exc})", highlight=False)
        return target
    if state == "foreign":
        raise cluster.ClusterError(
            f"output {target} holds files that are not a curate run; choose another --output"
        )
    if mode is None and state != "empty":
        raise cluster.ClusterError(
            f"output {target} is not empty; pass --resume to finish the run in it, "
            "--overwrite to replace it, or choose another --output"
        )
    if mode == "resume":
        try:
            check_resumable(Layout(target, opts), run_identity(plan))
        except ResumeError as exc:
            raise cluster.ClusterError(str(exc)) from None
    return target


def _await_job(address: str, job_id: str, follow: bool) -> None:
    """Wait for a submitted job (streaming its logs with ``follow``); exit 1 unless it
    succeeded.  Ctrl-C stops waiting, not the job."""
    from curate import cluster

    try:
        if follow:
            cluster.follow_logs(address, job_id, lambda chunk: print(chunk, end="", flush=True))
        status = cluster.wait(address, job_id, lambda s: err.print(f"job {job_id}: {s}"))
    except cluster.ClusterError as exc:
        raise _cluster_error(exc) from None
    except KeyboardInterrupt:
        err.print(f"\nstopped waiting; job {job_id} keeps running (curate stop {job_id})")
        raise typer.Exit(130) from None
    if status != "SUCCEEDED":
        err.print(
            f"[bold red]job {job_id} {status}[/]: see curate logs {job_id} --address {address}"
        )
        raise typer.Exit(1)


@app.command("status")
def status_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id from curate submit")],
    address: AddressOption,
) -> None:
    """Show a submitted job's status, entry point and timing."""
    from curate import cluster

    try:
        client = cluster.jobs_client(address)
        info = cluster.job_call(address, job_id, lambda: client.get_job_info(job_id))
    except cluster.ClusterError as exc:
        raise _cluster_error(exc) from None
    status = getattr(info.status, "value", info.status)
    out.print(f"{job_id}: {status}", highlight=False)
    if info.message:
        out.print(f"  {info.message}", highlight=False, markup=False)
    out.print(f"  entrypoint: {info.entrypoint}", highlight=False, markup=False)
    if info.start_time:
        import time

        end = info.end_time or int(time.time() * 1000)
        out.print(f"  running time: {(end - info.start_time) / 1000:.1f} s")


@app.command("logs")
def logs_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id from curate submit")],
    address: AddressOption,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends")
    ] = False,
) -> None:
    """Print a submitted job's logs (the driver's output: curate's table, errors)."""
    from curate import cluster

    try:
        if follow:
            cluster.follow_logs(address, job_id, lambda chunk: print(chunk, end="", flush=True))
            return
        client = cluster.jobs_client(address)
        text = cluster.job_call(address, job_id, lambda: client.get_job_logs(job_id))
    except cluster.ClusterError as exc:
        raise _cluster_error(exc) from None
    print(text, end="")


@app.command("stop")
def stop_command(
    job_id: Annotated[str, typer.Argument(metavar="JOB", help="A job id from curate submit")],
    address: AddressOption,
    wait: Annotated[bool, typer.Option(help="Wait until the job has stopped")] = True,
) -> None:
    """Stop a submitted job (its output then holds a partial run: --resume finishes it)."""
    from curate import cluster

    try:
        client = cluster.jobs_client(address)
        asked = cluster.job_call(address, job_id, lambda: client.stop_job(job_id))
        if not asked:
            status = cluster.wait(address, job_id, lambda s: None)
            out.print(f"{job_id}: already {status}", highlight=False)
            return
        status = cluster.wait(address, job_id, lambda s: None) if wait else "stopping"
    except cluster.ClusterError as exc:
        raise _cluster_error(exc) from None
    out.print(f"{job_id}: {status}", highlight=False)
