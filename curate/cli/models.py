"""``curate train-quality``, ``train-lm``, ``build-clip``, ``build-tiny-mllm``,
``serve-mllm``: the models that stages use."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from curate.cli import _report, app, err, out
from curate.config.yamlpos import ConfigError


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
