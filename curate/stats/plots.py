"""Plots of a run's stats with matplotlib: the per-stage funnel, kept vs dropped
score histograms, mixture targets vs achieved shares, and writing them as PNG.

Figures are built without pyplot (no global state, any backend; PNG through Agg),
from the merged stats alone (no pass over the data), and PNGs carry no timestamp
or software version, so the same stats give the same files.  matplotlib is
imported inside the functions: importing this module does not need it.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from curate.io import storage
from curate.io.files import atomic_write_bytes
from curate.stage import reason_category
from curate.stats.records import TINY, Array, Record, _center, integral
from curate.stats.run import STATS_DIR, RunStats

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(width: float = 8.0, height: float = 4.5) -> Figure:
    """A figure not tied to pyplot (no global state, any backend; PNG through Agg)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_funnel(manifest: Mapping[str, Any]) -> Figure:
    """Rows in per stage, split into kept and dropped by reason category."""
    stages = manifest["stages"]
    fig = _figure(max(6.0, 1.1 * len(stages) + 3), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(stages))
    ax.bar(x, [s["kept"] for s in stages], color="#9aa5b1", label="kept")
    bottom = np.array([s["kept"] for s in stages], dtype=np.float64)
    cats = sorted({reason_category(r) for s in stages for r in s["reasons"]})
    colors = _palette(len(cats))
    for cat, color in zip(cats, colors, strict=True):
        heights = np.array(
            [sum(n for r, n in s["reasons"].items() if reason_category(r) == cat) for s in stages],
            dtype=np.float64,
        )
        ax.bar(x, heights, bottom=bottom, color=color, label=f"dropped: {cat}")
        bottom += heights
    for xi, top, s in zip(x, bottom, stages, strict=True):
        if s["dropped"]:
            ax.annotate(f"-{s['dropped']:,}", (xi, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [f"{s['name']}\n({s['type']})" for s in stages], fontsize=8)
    ax.set_ylim(0, max([*bottom.tolist(), 1.0]) * 1.12)
    ax.set_ylabel("rows")
    ax.set_title(f"{manifest['pipeline']['name']}: rows per stage")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _plot_bins(cols: Sequence[Record], log: bool) -> Array:
    lo = min(c["min"] for c in cols)
    hi = max(c["max"] for c in cols)
    whole = all(integral(c) for c in cols)
    if log:
        edges = np.geomspace(max(lo, TINY), hi * 1.0001, 41)
        return np.unique(np.round(edges)) - 0.5 if whole else edges
    if hi <= lo:
        return np.array([lo - 0.5, hi + 0.5])
    if whole and hi - lo <= 60:
        return np.arange(lo, hi + 2) - 0.5
    return np.linspace(lo, hi + (hi - lo) * 1e-6, 41)


def _hist_points(col: Record) -> tuple[Array, Array]:
    whole = integral(col)
    centers = np.array([_center(e, whole) for e, _ in col["hist"]], np.float64)
    counts = np.array([n for _, n in col["hist"]], np.float64)
    return np.clip(centers, col["min"], col["max"]), counts


def plot_scores(run: RunStats, column: str, log: bool | None = None) -> Figure:
    """Histogram of ``column`` for the kept rows (the sinks) and for the dropped rows
    per stage and reason category (their value when dropped).  ``log``: log x axis
    (default: when the positive values span more than three decades)."""
    groups: list[tuple[str, Record]] = []
    kept = run.kept(column)
    if kept.get("count"):
        groups.append(("kept", kept))
    for (stage, cat), entry in run.reason_entries():
        col = entry.get("scores", {}).get(column)
        if col and col.get("count"):
            groups.append((f"dropped {stage}: {cat}", col))
    fig = _figure()
    ax = fig.add_subplot()
    ax.set_title(f"{column}: kept vs dropped")
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    if not groups:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        return fig
    cols = [c for _, c in groups]
    if log is None:
        lo, hi = min(c["min"] for c in cols), max(c["max"] for c in cols)
        log = lo > 0 and hi / lo > 1000
    bins = _plot_bins(cols, log)
    colors = iter(_palette(len(groups)))
    for label, col in groups:
        x, w = _hist_points(col)
        filled = label == "kept"
        ax.hist(
            x,
            bins=bins.tolist(),
            weights=w,
            label=f"{label} ({int(w.sum()):,})",
            histtype="stepfilled" if filled else "step",
            color="#9aa5b1" if filled else next(colors),
            alpha=0.6 if filled else 1.0,
            linewidth=1.5,
        )
    if log:
        ax.set_xscale("log")
    totals = [c["count"] for c in cols]
    if max(totals) > 50 * min(totals):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    return fig


def plot_mixture(manifest: Mapping[str, Any]) -> Figure | None:
    """Target vs achieved share of every mixture component (in the budget's unit),
    with each component's repetition and an unmet target marked; None when the run
    has no mixing stage."""
    mixes = [s for s in manifest["stages"] if "components" in s.get("summary", {})]
    if not mixes:
        return None
    fig = _figure(8.0, 3.5 * len(mixes))
    for i, stage in enumerate(mixes):
        _mixture_axes(fig.add_subplot(len(mixes), 1, i + 1), stage)
    return fig


def _mixture_axes(ax: Any, stage: Mapping[str, Any]) -> None:
    summary = stage["summary"]
    unit = summary.get("unit", "tokens")
    names = list(summary["components"])
    comps = [summary["components"][n] for n in names]
    x = np.arange(len(names))
    target = [c.get("target_share") or 0.0 for c in comps]
    achieved = [c.get(f"share_{unit}") or 0.0 for c in comps]
    ax.bar(x - 0.2, target, 0.4, label="target", color="#9aa5b1")
    ax.bar(x + 0.2, achieved, 0.4, label=f"achieved ({unit})", color="#4c72b0")
    for xi, c, got in zip(x, comps, achieved, strict=True):
        note = f"{got:.1%}" + ("\nunmet" if c.get("unmet") else "")
        color = "#c0392b" if c.get("unmet") else "black"
        ax.annotate(note, (xi + 0.2, got), ha="center", va="bottom", color=color, fontsize=7)
    labels = [
        f"{n}\n{c.get('repetition') or 0:.2f} epochs" for n, c in zip(names, comps, strict=True)
    ]
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, max([*target, *achieved, 0.01]) * 1.25)
    ax.set_ylabel(f"share of {unit}")
    budget = summary.get("budget")
    budget_text = f"{budget:,}" if isinstance(budget, int) else str(budget)
    ax.set_title(f"mix stage {stage['name']}: target vs achieved, budget {budget_text} {unit}")
    ax.legend(fontsize=8)


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG, without a timestamp or software version in its metadata."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def write_plots(run: RunStats, folder: str | None = None) -> list[str]:
    """Write ``funnel.png``, ``scores/<column>.png`` for every numeric column and
    ``mixture.png`` (when the run mixes) to ``folder`` (default ``OUT/stats/plots``)."""
    folder = folder or storage.join(run.root, STATS_DIR, "plots")
    figures: list[tuple[str, Figure | None]] = [("funnel.png", plot_funnel(run.manifest))]
    figures += [(f"scores/{_safe(c)}.png", plot_scores(run, c)) for c in run.score_columns()]
    figures.append(("mixture.png", plot_mixture(run.manifest)))
    written = []
    for name, fig in figures:
        if fig is None:
            continue
        path = storage.join(folder, *name.split("/"))
        atomic_write_bytes(path, png_bytes(fig), run.opts)
        written.append(path)
    return written


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
