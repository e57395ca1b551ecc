"""``curate`` command line: the typer ``app``, its consoles and shared helpers; the
commands are in ``run``, ``models``, ``cluster`` and ``stats``."""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
from typing import Annotated

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


def new_table(title: str, columns: Sequence[str], left: Collection[str] = ()) -> Table:
    """A titled table: numbers right-aligned, the ``left`` columns (names, reasons) left."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    return table


def main() -> None:
    app(args=sys.argv[1:], prog_name="curate")


# The modules of the commands, which register them on `app`: last, as they import the
# names above, and in the order `curate --help` lists their commands.
from curate.cli import run, models, cluster, stats  # noqa: E402, F401, I001
