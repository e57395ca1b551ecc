"""``curate`` command line: validate, run, stages."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from curate.config.yamlpos import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Curate LLM and multimodal training data with Ray.",
)
err = Console(stderr=True, soft_wrap=True)  # one problem per line, even when piped
out = Console(width=None if Console().is_terminal else 160)

SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a field: --set sources.web.uri=data/*.jsonl (repeatable). "
        "Relative paths given here are relative to the current directory.",
    ),
]


def _original(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``'s chain of causes (Ray's ``cause``,
    ``__cause__``, ``__context__``), as it was raised; None when there is none."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        nested = [getattr(e, "cause", None), e.__cause__, e.__context__]
        if isinstance(e, kinds) and not any(isinstance(n, kinds) for n in nested):
            return e
        todo.extend(n for n in nested if isinstance(n, BaseException))
    return None


def _report(exc: ConfigError) -> None:
    err.print(f"[bold red]{len(exc.issues)} problem(s) found:[/]")
    for issue in exc.issues:
        err.print(issue.render(), markup=False, highlight=False)


@app.command()
def validate(pipeline: str, set_: SetOption = None) -> None:
    """Check a pipeline file (config, graph, columns, inputs) without running it."""
    from curate.api import check

    try:
        plan = check(pipeline, set_)
    except ConfigError as exc:
        _report(exc)
        raise typer.Exit(1) from None
    out.print(
        f"[green]ok[/]: {pipeline}: {len(plan.pipeline.spec.sources)} source(s), "
        f"{len(plan.stages)} stage(s), {len(plan.pipeline.spec.sinks)} sink(s), "
        f"{len(plan.segments)} Ray pass(es)"
    )


@app.command()
def run(
    pipeline: str,
    output: Annotated[str | None, typer.Option("--output", "-o", help="Output folder")] = None,
    set_: SetOption = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; none starts a local Ray")
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the embedded local Ray")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace the previous run in the output folder (keeps its _cache)"),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(help="Finish an interrupted run: skip the units it committed"),
    ] = False,
) -> None:
    """Run a pipeline end to end and print what every stage did."""
    from curate.api import OutputExistsError
    from curate.api import run as run_pipeline
    from curate.io.files import InputError
    from curate.io.sink import SinkError
    from curate.io.storage import StorageError
    from curate.lineage.accounting import AccountingError
    from curate.lineage.commits import ResumeError
    from curate.lineage.quarantine import QuarantineLimitError
    from curate.runner import ResourceError

    if resume and overwrite:
        err.print("[bold red]error:[/] --resume and --overwrite contradict each other")
        raise typer.Exit(2)
    try:
        with _live_progress() as listener:
            result = run_pipeline(
                pipeline, output, set_, address, num_cpus, overwrite, resume, listener
            )
    except ConfigError as exc:
        _report(exc)
        raise typer.Exit(1) from None
    except (OutputExistsError, ResourceError, ResumeError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:
        # Ray re-raises a worker's error wrapped (RayTaskError, Ray Data's
        # UserCodeException): show ours as it is, anything else with its traceback.
        cause = _original(
            exc, (InputError, AccountingError, SinkError, StorageError, QuarantineLimitError)
        )
        if cause is None:
            raise
        err.print("[bold red]error:[/]", end=" ")
        # Ray Data appends its retry advice to the message; the advice is not ours.
        message = str(cause).split("\nFailed to apply UDF transform", 1)[0]
        err.print(message, highlight=False, markup=False)
        err.print(
            "the output folder holds a partial run; fix the cause and rerun with --resume "
            "(or --overwrite to start again)"
        )
        raise typer.Exit(1) from None
    print_summary(result.manifest)
    reused = [n for n, c in result.manifest["run"]["cache"]["stages"].items() if c["reused"]]
    if reused:
        out.print(f"stage cache: reused {', '.join(reused)} (unchanged spec, code and inputs)")
    out.print(
        f"output: {result.output}  (manifest.json, rejects/, "
        f"{', '.join(result.manifest['outputs'])}/)"
    )


def new_table(title: str, columns: Sequence[str], left: Collection[str] = ()) -> Table:
    """A titled table: numbers right-aligned, the ``left`` columns (names, reasons) left."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


@contextlib.contextmanager
def _live_progress() -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """A live per-stage table on a terminal's stderr while the run goes (nothing when
    stderr is not a terminal: the same numbers are in OUT/_progress.json)."""
    if not err.is_terminal:
        yield None
        return
    from rich.live import Live

    with Live(console=err, refresh_per_second=4, transient=True) as live:
        yield lambda snapshot: live.update(progress_table(snapshot))


def progress_table(snapshot: dict[str, Any]) -> Table:
    """Per-stage rows in / kept / dropped so far, with rates, and where the run is."""
    units, passes = snapshot["units"], snapshot["passes"]
    table = new_table(
        f"{snapshot['phase']}  (pass {passes['done']}/{passes['total']}, "
        f"units {units['done']}/{units['total']}, {snapshot['elapsed_s']:.0f} s)",
        ("stage", "rows in", "kept", "dropped", "rows in/s", "dropped/s"),
        left={"stage"},
    )
    for name, s in snapshot["stages"].items():
        table.add_row(
            name,
            f"{s['rows_in']:,}",
            f"{s['kept']:,}",
            f"{s['dropped']:,}",
            f"{s['rows_in_per_s']:,.0f}",
            f"{s['dropped_per_s']:,.0f}",
        )
    return table


@app.command()
def progress(
    output: Annotated[str, typer.Argument(help="The output folder (or s3:// prefix) of a run")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Refresh until it ends")] = False,
) -> None:
    """Show the progress a run (in flight or finished) last published."""
    import time

    from curate.progress import read_progress

    while True:
        try:
            snapshot = read_progress(output)
        except FileNotFoundError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        out.print(progress_table(snapshot))
        out.print(f"state: {snapshot['state']}, updated {snapshot['updated_at']}")
        if not follow or snapshot["state"] != "running":
            return
        time.sleep(2)


def print_summary(manifest: dict[str, Any]) -> None:
    """The per-stage table: rows in, kept, dropped by reason, busy time."""
    seconds = manifest["run"]["stage_seconds"] | manifest["run"].get("global_stage_seconds", {})
    table = new_table(
        f"pipeline {manifest['pipeline']['name']}",
        ("stage", "type", "rows in", "kept", "dropped", "drop reasons", "time s"),
        left={"stage", "type", "drop reasons"},
    )
    for s in manifest["stages"]:
        reasons = "\n".join(f"{k} {v:,}" for k, v in s["reasons"].items()) or "-"
        table.add_row(
            s["name"],
            s["type"],
            f"{s['rows_in']:,}",
            f"{s['kept']:,}" + (f" → {s['rows_out']:,} made" if "rows_out" in s else ""),
            f"{s['dropped']:,}",
            reasons,
            f"{seconds.get(s['name'], 0.0):.2f}",
        )
    out.print(table)
    for sink, files in manifest["outputs"].items():
        rows = sum(f["rows"] for f in files)
        size = sum(f["bytes"] for f in files)
        line = f"sink {sink}: {rows:,} rows in {len(files)} shard(s), {size / 2**20:.2f} MiB"
        images = [i for i in manifest.get("images", []) if i["sink"] == sink]
        if images:  # a llava sink's image files
            count, isize = sum(i["files"] for i in images), sum(i["bytes"] for i in images)
            line += f"; {count:,} images, {isize / 2**20:.2f} MiB"
        out.print(line)
    rejects, wall = manifest["rejects"]["rows"], manifest["run"]["seconds"]
    out.print(f"rejects: {rejects:,} rows; wall time {wall:.1f} s")


@app.command()
def stages() -> None:
    """List the registered stage types."""
    from curate.registry import get_stage_class, known_types

    table = Table("type", "kind", "class")
    for name in known_types():
        cls = get_stage_class(name)
        table.add_row(name, cls.kind, f"{cls.__module__}.{cls.__qualname__}")
    out.print(table)


@app.command()
def explain(
    output: Annotated[str, typer.Argument(help="A finished run's output folder or s3:// prefix")],
    record_id: Annotated[str, typer.Argument(metavar="ID", help="The record's id")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the answer as JSON")] = False,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (MinIO, moto) of an s3:// output")
    ] = None,
) -> None:
    """Say what happened to one record: where it landed, where and why it was dropped
    (for a duplicate, the record kept instead), the stages it passed with their scores,
    and for a generated record its seed; answered from the run's id index."""
    import json

    from curate.api import explain as explain_record
    from curate.io.storage import StorageOptions
    from curate.lineage.explain import ExplainError, render

    try:
        answer = explain_record(output, record_id, StorageOptions(endpoint_url=endpoint_url))
    except (ExplainError, OSError) as exc:  # OSError: a missing or unreadable file (or S3)
        err.print("[bold red]error:[/]", end=" ")
        err.print(str(exc), highlight=False, markup=False)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(answer, indent=2, ensure_ascii=False, default=str))
        return
    out.print(render(answer))


@app.command("train-quality")
def train_quality(spec: str) -> None:
    """Train a fastText quality classifier (DCLM recipe by default) from a YAML spec."""
    from curate.quality.train import run as train_run

    try:
        report = train_run(spec)
    except ConfigError as exc:
        _report(exc)
        raise typer.Exit(1) from None
    except (ValueError, OSError) as exc:
        err.print(f"[bold red]error[/]: {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    held = report["holdout"]
    table = Table(title=f"{report['name']}: held-out ({held['n']} texts, threshold 0.5)")
    for col in ("precision", "recall", "accuracy"):
        table.add_column(col, justify="right")
    table.add_row(*(f"{held[c]:.4f}" for c in ("precision", "recall", "accuracy")))
    out.print(table)
    out.print(f"trained on {report['train_examples']}")
    out.print(f"model: {report['model']} ({report['bytes']:,} bytes, sha256 {report['sha256']})")


@app.command("train-lm")
def train_lm(
    uris: Annotated[list[str], typer.Argument(help="Text sources: files, globs, s3:// URIs")],
    output: Annotated[str, typer.Option("--output", "-o", help="ARPA file to write")],
    order: Annotated[int, typer.Option(help="n-gram order")] = 3,
    text_column: Annotated[str, typer.Option(help="Field holding the text")] = "text",
    max_docs: Annotated[int | None, typer.Option(help="Use at most this many texts")] = None,
) -> None:
    """Train an n-gram LM (modified Kneser-Ney, ARPA) on CCNet-normalized text, for
    the perplexity stage."""
    import itertools
    from pathlib import Path

    from curate.config.model import SourceSpec
    from curate.quality.perplexity import train_lm as train
    from curate.quality.train import read_texts

    sources = [SourceSpec(uri=u, text_column=text_column) for u in uris]
    texts = itertools.islice(read_texts(sources, Path.cwd(), "lm"), max_docs)
    try:
        stats = train(texts, output, order)
    except (ValueError, OSError) as exc:
        err.print(f"[bold red]error[/]: {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    out.print(
        f"{output}: order {stats['order']}, n-grams {stats['ngrams']}, "
        f"{stats['tokens']:,} tokens in {stats['sentences']:,} lines"
    )


@app.command("build-clip")
def build_clip(
    arch: Annotated[str, typer.Argument(help="open_clip architecture, e.g. ViT-B-32")],
    output: Annotated[str, typer.Option("--output", "-o", help="Checkpoint file to write")],
    arch_config: Annotated[
        str | None, typer.Option(help="JSON config <arch>.json of a custom architecture")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random initialization")] = 0,
) -> None:
    """Save a randomly initialized open_clip checkpoint (for tests, demos, speed runs)."""
    from curate import clip
    from curate.models import resolve

    try:
        path = clip.build_checkpoint(arch, output, seed, arch_config)
    except (clip.ClipError, OSError) as exc:
        err.print(f"[bold red]error[/]: {exc}", markup=True, highlight=False)
        raise typer.Exit(1) from None
    model = resolve(str(path))
    out.print(
        f"{path}: {arch}, random weights (seed {seed}), {model.bytes:,} bytes, "
        f"sha256 {model.sha256}"
    )


@app.command("build-tiny-mllm")
def build_tiny_mllm(
    output: Annotated[str, typer.Option("--output", "-o", help="Model folder to write")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights")] = 0,
) -> None:
    """Save a tiny LLaVA-architecture model with random weights (for tests and demos of
    the MLLM stages: its answers are noise)."""
    from curate.mllm.tiny import build_tiny_vlm
    from curate.models import resolve

    path = build_tiny_vlm(output, seed)
    model = resolve(str(path))
    out.print(
        f"{path}: tiny LLaVA, random weights (seed {seed}), {model.bytes:,} bytes, "
        f"sha256 {model.sha256}"
    )


@app.command("serve-mllm")
def serve_mllm(
    model_dir: Annotated[str, typer.Argument(help="A transformers model folder")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    model_name: Annotated[str | None, typer.Option(help="Served model name")] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Require this environment variable's key as a bearer token")
    ] = None,
) -> None:
    """Serve a local transformers model as an OpenAI-compatible endpoint (for tests and
    laptops; on GPUs, serve real models with vLLM, SGLang or TGI)."""
    from curate.mllm.serve import main as serve_main

    argv = [model_dir, "--host", host, "--port", str(port)]
    if model_name:
        argv += ["--model-name", model_name]
    if api_key_env:
        argv += ["--api-key-env", api_key_env]
    raise typer.Exit(serve_main(argv))


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


def _num(x: float | int | None) -> str:
    """An int with thousands separators, a float with 3 significant digits, or -."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _top(counts: dict[str, int], k: int = 3) -> str:
    """The ``k`` biggest counts as ``name n (share)`` lines."""
    total = sum(counts.values()) or 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"{name} {n:,} ({n / total:.0%})" for name, n in ranked[:k]]
    if len(ranked) > k:
        lines.append(f"+{len(ranked) - k} more")
    return "\n".join(lines) or "-"


def _stats_funnel(run: Any) -> Table:
    table = new_table(
        f"pipeline {run.manifest['pipeline']['name']}: stage funnel",
        ("stage", "type", "rows in", "kept", "dropped", "% dropped", "top reasons"),
        left={"stage", "type", "top reasons"},
    )
    for s in run.manifest["stages"]:
        share = s["dropped"] / s["rows_in"] if s["rows_in"] else 0.0
        table.add_row(
            s["name"],
            s["type"],
            f"{s['rows_in']:,}",
            f"{s['kept']:,}" + (f" → {s['rows_out']:,}" if "rows_out" in s else ""),
            f"{s['dropped']:,}",
            f"{share:.1%}",
            _top(s["reasons"]),
        )
    return table


def _stats_sinks(run: Any) -> Table:
    from curate.stats import quantile

    table = new_table(
        "outputs (text lengths: p10 / p50 / p90)",
        ("sink", "format", "shards", "rows", "MiB", "tokens", "chars", "words", "lang"),
        left={"sink", "format", "lang"},
    )
    sinks = run.manifest["pipeline"]["spec"]["sinks"]
    for name, rec in run.summary["sinks"].items():
        text = rec.get("text", {})

        def q3(col: dict[str, Any]) -> str:
            return " / ".join(_num(quantile(col, q)) for q in (0.1, 0.5, 0.9)) if col else "-"

        table.add_row(
            name,
            sinks[name].get("format", "parquet"),
            f"{rec.get('files', 0):,}",
            f"{rec.get('rows', 0):,}",
            f"{rec.get('bytes', 0) / 2**20:.2f}",
            _num(rec.get("tokens")),
            q3(text.get("chars", {})),
            q3(text.get("words", {})),
            _top(rec.get("languages", {})),
        )
    return table


def _stats_scores(run: Any) -> Table:
    from curate.stats import mean, quantile

    table = new_table(
        "numeric columns: kept rows (sinks) and dropped rows (value when dropped)",
        ("column", "kept", "min", "p50", "mean", "max", "dropped", "dropped p50"),
        left={"column"},
    )
    for name in run.score_columns():
        kept, dropped = run.kept(name), run.dropped(name)
        table.add_row(
            name,
            f"{kept['count']:,}" if kept else "not written",
            _num(kept.get("min")),
            _num(quantile(kept, 0.5)),
            _num(mean(kept)),
            _num(kept.get("max")),
            f"{dropped.get('count', 0):,}",
            _num(quantile(dropped, 0.5)),
        )
    return table


def _stats_mixture(run: Any, stage: dict[str, Any]) -> Table:
    """Target vs achieved per component (the manifest) and what the sinks hold of it
    (the stats of their ``mix_component`` and ``n_tokens`` columns)."""
    summary = stage["summary"]
    unit = summary.get("unit", "tokens")
    title = f"mix stage {stage['name']}: budget {_num(summary.get('budget'))} {unit}"
    names = ("component", "weight", "target", f"achieved ({unit})", "rows", "tokens")
    columns = (*names, "repetition", "unmet", "sink rows", "sink tokens")
    table = new_table(title, columns, left={"component", "unmet"})
    mine = [r for r in run.mixture_table().to_pylist() if r["stage"] == stage["name"]]
    for c in mine:
        table.add_row(
            c["component"],
            _num(c["weight"]),
            _num(c["target_share"]),
            _num(c[f"share_{unit}"]),
            _num(c["rows"]),
            _num(c["tokens"]),
            _num(c["repetition"]),
            c["unmet"] or "-",
            _num(c["sink_rows"]),
            _num(c["sink_tokens"]),
        )
    return table


def _cluster_lines(run: Any) -> list[str]:
    lines = []
    for name, rec in run.summary["sinks"].items():
        sizes = rec.get("cluster_sizes")
        if not sizes:
            continue
        dup = [(s, n) for s, n in sizes if s > 1]
        folded = sum((s - 1) * n for s, n in dup)
        lines.append(
            f"sink {name}: {sum(n for _, n in dup):,} duplicate clusters kept one record each "
            f"(largest {max((s for s, _ in dup), default=1)}), {folded:,} near-duplicates dropped"
        )
    return lines


@app.command("stats")
def stats_command(
    output: Annotated[str, typer.Argument(help="A finished run's output folder or s3:// prefix")],
    plots: Annotated[
        str | None,
        typer.Option("--plots", help="Folder for the PNG plots (default OUT/stats/plots)"),
    ] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Print only; write no plot")] = False,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (MinIO, moto) of an s3:// output")
    ] = None,
) -> None:
    """Summarize a finished run from its manifest and stats/: the stage funnel with top
    drop reasons, rows, tokens, text lengths and languages per sink, numeric columns of
    kept and dropped rows, mixture shares; write PNG plots (histograms, funnel, mixture)."""
    from curate.io.storage import StorageError, StorageOptions
    from curate.stats import RunStats

    opts = StorageOptions(endpoint_url=endpoint_url) if endpoint_url else None
    try:
        run = RunStats.load(output, opts)
    except (FileNotFoundError, StorageError) as exc:
        err.print(f"[bold red]error:[/] {output}: no finished run here ({exc})", highlight=False)
        raise typer.Exit(1) from None
    out.print(_stats_funnel(run))
    out.print(_stats_sinks(run))
    if run.score_columns():
        out.print(_stats_scores(run))
    for stage in run.mix_stages():
        out.print(_stats_mixture(run, stage))
    for line in _cluster_lines(run):
        out.print(line)
    rejected = sum(r.get("rows", 0) for r in run.summary["rejects"].values())
    out.print(f"rejects: {rejected:,} rows in {len(run.manifest['rejects']['files'])} file(s)")
    if not no_plots:
        written = run.write_plots(plots)
        out.print(f"plots: {len(written)} PNG file(s) in {plots or written[0].rsplit('/', 1)[0]}")


def _arrow(pair: list[Any]) -> str:
    """``a → b (+d)`` for numbers, ``a → b`` otherwise, ``a`` when unchanged."""
    a, b = pair
    if a == b:
        return _num(a) if isinstance(a, int | float) else str(a)
    text = f"{_num(a) if isinstance(a, int | float) else a} → "
    text += _num(b) if isinstance(b, int | float) else str(b)
    if isinstance(a, int) and isinstance(b, int):
        text += f" ({b - a:+,})"
    return text


def _diff_stages(rows: list[dict[str, Any]]) -> Table:
    table = new_table(
        "stages (A → B)",
        ("stage", "type", "rows in", "kept", "dropped", "reasons that changed"),
        left={"stage", "type", "reasons that changed"},
    )
    for s in rows:
        reasons = "\n".join(f"{r} {_arrow(v)}" for r, v in s["reasons"].items()) or "-"
        table.add_row(
            s["name"],
            str(s["type"]),
            *(_arrow(s[k]) for k in ("rows_in", "kept", "dropped")),
            reasons,
        )
    return table


def _diff_outputs(outputs: dict[str, Any], records: dict[str, Any]) -> Table:
    table = new_table(
        "outputs (A → B); records by id",
        ("sink", "shards", "rows", "bytes", "removed", "added", "in both"),
        left={"sink"},
    )
    for sink, o in outputs.items():
        r = records.get(sink, {})
        table.add_row(
            sink,
            _arrow(o["shards"]),
            _arrow(o["rows"]),
            _arrow(o["bytes"]),
            _num(r.get("removed")),
            _num(r.get("added")),
            _num(r.get("common")),
        )
    return table


def _print_spec_diff(
    a: dict[str, Any], b: dict[str, Any], diff: dict[str, Any], unified: bool
) -> None:
    from curate.stats import spec_unified_diff

    ha, hb = diff["spec_hash"]
    if ha == hb:
        out.print(f"spec: unchanged (hash {ha[:16]})")
    else:
        out.print(f"spec: hash {ha[:16]} → {hb[:16]}, {len(diff['spec'])} field(s) changed")
        lines = (
            spec_unified_diff(a["pipeline"]["spec"], b["pipeline"]["spec"])
            if unified
            else diff["spec"]
        )
        for line in lines:
            out.print("  " + line, highlight=False, markup=False)
    if diff["seed"][0] != diff["seed"][1]:
        out.print(f"seed: {_arrow(diff['seed'])}")
    soft = diff["software"]
    for key in ("git_commit", "python"):
        if soft[key][0] != soft[key][1]:
            out.print(f"{key}: {_arrow(soft[key])}", highlight=False)
    for name, pair in soft["packages"].items():
        out.print(f"package {name}: {_arrow(pair)}", highlight=False)
    if not soft["packages"] and soft["python"][0] == soft["python"][1]:
        out.print("software: same package versions")


@app.command("diff")
def diff_command(
    run_a: Annotated[str, typer.Argument(help="The first run's output folder (A)")],
    run_b: Annotated[str, typer.Argument(help="The second run's output folder (B)")],
    examples: Annotated[int, typer.Option(help="Example ids to show per side")] = 5,
    records: Annotated[
        bool, typer.Option(help="Compare the sinks' record ids (Ray tasks over the id columns)")
    ] = True,
    unified: Annotated[bool, typer.Option(help="Show the spec change as a unified diff")] = False,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address; none starts a local Ray")
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the embedded local Ray")] = None,
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (MinIO, moto) of s3:// outputs")
    ] = None,
) -> None:
    """What changed between two runs: spec, seed, software, rows per stage and reason,
    mixture shares, outputs, and which records (ids) were added or removed."""
    import json
    import os

    from curate.io import storage
    from curate.io.storage import LOCAL, StorageError, StorageOptions
    from curate.stats import diff_manifests, diff_records, run_options

    opts = StorageOptions(endpoint_url=endpoint_url) if endpoint_url else LOCAL
    runs = []
    for given in (run_a, run_b):
        root = given if storage.is_s3(given) else os.path.abspath(given)
        try:
            manifest = json.loads(storage.read_bytes(storage.join(root, "manifest.json"), opts))
        except (FileNotFoundError, StorageError) as exc:
            err.print(f"[bold red]error:[/] {root}: no finished run here ({exc})", highlight=False)
            raise typer.Exit(1) from None
        runs.append((root, manifest, run_options(manifest, opts) if not endpoint_url else opts))
    (_, a, _), (_, b, _) = runs
    diff = diff_manifests(a, b)
    out.print(f"A: {runs[0][0]}\nB: {runs[1][0]}", highlight=False)
    _print_spec_diff(a, b, diff, unified)
    out.print(_diff_stages(diff["stages"]))
    if diff["mixture"]:
        table = Table(
            "component",
            "target",
            "share tokens",
            "share rows",
            "rows",
            "tokens",
            title="mixture (A → B)",
        )
        for name, c in diff["mixture"].items():
            table.add_row(
                name,
                *(
                    _arrow(c[k])
                    for k in ("target_share", "share_tokens", "share_rows", "rows", "tokens")
                ),
            )
        out.print(table)
    found: dict[str, Any] = {}
    if records:
        from curate.api import init_ray

        init_ray(address, num_cpus)
        found = diff_records(runs[0], runs[1], examples)
    out.print(_diff_outputs(diff["outputs"], found))
    for sink, r in found.items():
        for what in ("removed", "added"):
            if r[f"{what}_ids"]:
                ids = " ".join(r[f"{what}_ids"])
                out.print(f"sink {sink}: {r[what]:,} {what}, e.g. {ids}", highlight=False)


def main() -> None:
    app(args=sys.argv[1:], prog_name="curate")


if __name__ == "__main__":
    main()
