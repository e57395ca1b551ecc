"""``curate`` command line: validate, run, stages."""

from __future__ import annotations

import sys
from typing import Annotated, Any

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
    from curate.runner import ResourceError

    if resume and overwrite:
        err.print("[bold red]error:[/] --resume and --overwrite contradict each other")
        raise typer.Exit(2)
    try:
        result = run_pipeline(pipeline, output, set_, address, num_cpus, overwrite, resume)
    except ConfigError as exc:
        _report(exc)
        raise typer.Exit(1) from None
    except (OutputExistsError, ResourceError, ResumeError) as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:
        # Ray re-raises a worker's error wrapped (RayTaskError, Ray Data's
        # UserCodeException): show ours as it is, anything else with its traceback.
        cause = _original(exc, (InputError, AccountingError, SinkError, StorageError))
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


def print_summary(manifest: dict[str, Any]) -> None:
    """The per-stage table: rows in, kept, dropped by reason, busy time."""
    seconds = manifest["run"]["stage_seconds"] | manifest["run"].get("global_stage_seconds", {})
    table = Table(title=f"pipeline {manifest['pipeline']['name']}")
    for column, justify in (
        ("stage", "left"),
        ("type", "left"),
        ("rows in", "right"),
        ("kept", "right"),
        ("dropped", "right"),
        ("drop reasons", "left"),
        ("time s", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
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


def main() -> None:
    app(args=sys.argv[1:], prog_name="curate")


if __name__ == "__main__":
    main()
