"""``curate validate``, ``run``, ``progress``, ``stages``, ``explain``: a pipeline, its
run and what the run did."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.table import Table

from curate.cli import SetOption, _original, _report, app, err, new_table, out
from curate.config.yamlpos import ConfigError


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
    from curate.runner import ResourceError, UnitKeepsDyingError

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
            exc,
            (
                InputError,
                AccountingError,
                SinkError,
                StorageError,
                QuarantineLimitError,
                UnitKeepsDyingError,
            ),
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
