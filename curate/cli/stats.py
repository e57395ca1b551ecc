"""``curate stats`` and ``diff``: what a finished run holds, what changed between two."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from curate.cli import app, err, new_table, out


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
