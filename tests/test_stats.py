"""Per-shard statistics: exact merging, the files a run writes, ``curate stats`` and
``curate diff``, the Python API the notebooks use, plots."""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import user_files, write_jsonl
from hypothesis import given
from hypothesis import strategies as st
from test_s3 import BUCKET, s3_endpoint  # noqa: F401 - the loopback S3 fixture
from typer.testing import CliRunner

from curate import stats
from curate.api import load_run, run
from curate.cli import app
from curate.io import storage
from curate.io.layout import Layout
from curate.io.sink import write_llava_sink, write_webdataset_sink
from curate.io.storage import LOCAL, StorageOptions

# The S3 server first: it puts test credentials in the environment, which the Ray
# workers (started later by ``run_dir``) inherit.
pytestmark = pytest.mark.usefixtures("s3_endpoint")

PIPELINE = """\
name: stats_t
seed: 7
sources:
  docs:
    uri: data/*.jsonl
    columns: {lang: string, mix_component: string, n_tokens: int64, cluster_size: int64,
              score: float64}
stages:
  stats: {type: text_stats}
  length: {type: length_filter, min_words: 3}
  dedup: {type: exact_dedup}
sinks:
  out: {input: dedup, shard_bytes: 600B}
  tars: {input: dedup, format: webdataset, shard_samples: 7}
execution:
  unit_bytes: 2KiB
"""

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
]


def corpus(root: Path) -> None:
    """Three shards: texts of 1 to 12 words (short ones are dropped), cross-shard
    duplicates, one bad line; every column a record measures."""
    rng = random.Random(11)
    for s in range(3):
        rows: list[Any] = []
        for i in range(25):
            k = (s * 25 + i) % 60  # texts 0..59, some repeat across shards
            n = 1 + k % 12
            words = " ".join(WORDS[(k * 7 + j) % len(WORDS)] for j in range(n))
            rows.append(
                {
                    "text": f"doc{k} {words}",
                    "lang": ["en", "de", "fr"][k % 3],
                    "mix_component": "code" if k % 4 == 0 else "web",
                    "n_tokens": 2 * n + 1,
                    "cluster_size": 1 + k % 4,
                    "score": None if k % 10 == 0 else round(rng.uniform(-2, 40), 3) + k,
                }
            )
        if s == 2:
            rows.insert(3, '{"text": "truncated')
        write_jsonl(root / "data" / f"part-{s}.jsonl", rows)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stats_project")
    corpus(root)
    (root / "pipe.yaml").write_text(PIPELINE)
    return root / "pipe.yaml"


@pytest.fixture(scope="module")
def run_dir(ray_local: None, project: Path) -> Path:
    out = project.parent / "out"
    run(str(project), str(out))
    return out


def roundtrip(data: Any) -> Any:
    return json.loads(stats.dumps(data))


# --- bins and merging (no Ray) -------------------------------------------------------


def test_bins_truncate_to_two_significant_digits() -> None:
    values = np.array([0, 7, 99, 100, 1234, -0.0456, 0.3, 0.72, 1e-320, 2.5e300, -17])
    edges = stats.bin_edges(values).tolist()
    assert edges == [0, 7, 99, 100, 1200, -0.045, 0.3, 0.72, 0, 2.5e300, -17]
    assert stats.histogram(np.array([5, 5, 1234, 1299, -1])) == [[-1, 1], [5, 2], [1200, 2]]


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_a_value_lies_in_its_bin(x: float) -> None:
    (edge,) = stats.bin_edges(np.array([x])).tolist()
    if abs(x) < stats.TINY:
        assert edge == 0
        return
    width = stats.bin_width(edge)
    assert math.copysign(1, edge) == math.copysign(1, x)
    assert abs(edge) <= abs(x) * (1 + 1e-9) and abs(x) < (abs(edge) + width) * (1 + 1e-9)
    assert 10 <= round(abs(edge) / width) <= 99  # two significant digits


def random_table(seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    words = np.array([*WORDS, "  ", "\n", "é"], dtype=object)
    texts = [" ".join(rng.choice(words, rng.integers(0, 30))) for _ in range(n)]
    floats = rng.lognormal(0, 4, n) * rng.choice([-1, 1], n)
    floats[rng.random(n) < 0.05] = np.nan
    floats[rng.random(n) < 0.02] = np.inf
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": pa.array([None if i % 17 == 0 else t for i, t in enumerate(texts)]),
            "score": pa.array(floats, mask=rng.random(n) < 0.05),
            "n_tokens": pa.array(rng.integers(0, 5000, n), pa.int64()),
            "small": pa.array(rng.integers(-3, 3, n), pa.int32()),
            "lang": pa.array(rng.choice(["en", "de", None], n).tolist(), pa.string()),
            "cluster_size": pa.array(rng.integers(1, 5, n), pa.int64()),
            "mix_component": pa.array(rng.choice(["web", "code"], n).tolist(), pa.string()),
        }
    )


def random_cuts(n: int, pieces: int, seed: int) -> list[tuple[int, int]]:
    cuts = sorted(random.Random(seed).sample(range(1, n), pieces - 1))
    bounds = [0, *cuts, n]
    return list(itertools.pairwise(bounds))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_shard_records_is_the_record_of_all_rows(seed: int) -> None:
    table = random_table(seed, 700)
    parts = [table.slice(a, b - a) for a, b in random_cuts(700, 5, seed)]
    merged = stats.merge_all([stats.table_record(p) for p in reversed(parts)])
    whole = stats.table_record(table)
    assert roundtrip(merged) == roundtrip(whole)
    assert stats.dumps(merged) == stats.dumps(whole)  # the same bytes, whatever the order
    assert whole["tokens"] == sum(table.column("n_tokens").to_pylist())
    assert whole["columns"]["score"]["nonfinite"]["inf"] > 0
    assert sum(n for _, n in whole["columns"]["small"]["hist"]) == 700
    assert set(whole["mixture"]) == {"web", "code"}


@pytest.mark.parametrize("full", [True, False])
def test_merge_of_rejects_records_is_the_record_of_all_rows(full: bool) -> None:
    rng = np.random.default_rng(4)
    n = 400
    reasons = rng.choice(["too_few_words", "gq:word_count", "gq:symbol_ratio", "dup:x"], n)
    maps = [
        None if i % 9 == 0 else [("n_words", float(rng.integers(0, 50))), ("q", rng.random())]
        for i in range(n)
    ]
    table = pa.table(
        {
            "reason": pa.array(reasons.tolist(), pa.string()),
            "scores": pa.array(maps, pa.map_(pa.string(), pa.float64())),
        }
    )
    parts = [table.slice(a, b - a) for a, b in random_cuts(n, 4, 9)]
    merged = stats.merge_all([stats.rejects_record(p, full) for p in parts])
    whole = stats.rejects_record(table, full)
    assert stats.dumps(merged) == stats.dumps(whole)
    gq = whole["reasons"]["gq"]
    assert gq["rows"] == sum(r.startswith("gq:") for r in reasons.tolist())
    assert ("full" in gq) is full
    assert gq["scores"]["n_words"]["count"] == sum(
        1 for i, r in enumerate(reasons.tolist()) if r.startswith("gq:") and maps[i] is not None
    )


def test_quantiles_and_means_from_histograms() -> None:
    col = stats.column_stats(pa.array(list(range(1, 101)), pa.int64()))
    assert stats.quantile(col, 0.0) == 1 and stats.quantile(col, 0.5) == 50
    assert stats.mean(col) == 50.5  # exact: integer sum
    floats = stats.column_stats(pa.array([0.5, 0.25, 0.75], pa.float64()))
    assert stats.quantile(floats, 0.5) == pytest.approx(0.5, rel=0.02)
    assert stats.mean(floats) == pytest.approx(0.5, rel=0.05)


def test_tar_and_llava_files_are_measured_like_their_rows(tmp_path: Path) -> None:
    """A WebDataset tar's record (``.txt`` and ``.json`` members) equals the record of
    the rows it holds; a llava file's text is its conversation turns."""
    table = random_table(5, 60).drop(["lang"])
    table = table.set_column(2, "score", pa.array(np.arange(60) * 0.5))  # JSON has no NaN
    layout = Layout(str(tmp_path))
    (tar,), _ = write_webdataset_sink(table, layout, "tars", 0, 1 << 30, None, None)
    job = stats.FileJob("sink", "tars", tar.path, "tars/x.tar", "webdataset", "", "")
    got = stats.file_record(job, LOCAL)
    want = stats.table_record(table)
    assert roundtrip({**want, "files": 1}) == roundtrip(got)

    turns = pa.array(
        [[{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there"}]],
        pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])),
    )
    chat = pa.table({"id": ["c1"], "conversations": turns, "score": [2.5]})
    (js,), _ = write_llava_sink(chat, layout, "chat", 0, 1 << 20, None, ["score"])
    job = stats.FileJob("sink", "chat", js.path, "chat/x.json", "llava", "", "")
    record = stats.file_record(job, LOCAL)
    assert record["text"]["words"]["sum"] == 4 and record["text"]["chars"]["sum"] == 15
    assert record["columns"]["score"]["max"] == 2.5


# --- what a run writes ----------------------------------------------------------------


def test_every_shard_and_rejects_file_has_its_stats(run_dir: Path) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    files = [*[f for fs in manifest["outputs"].values() for f in fs], *manifest["rejects"]["files"]]
    assert len(manifest["outputs"]["out"]) > 3 and len(manifest["outputs"]["tars"]) > 3
    for f in files:
        stem = f["path"].rsplit(".", 1)[0]
        data = json.loads((run_dir / "stats" / f"{stem}.json").read_text())
        assert data["path"] == f["path"] and data["sha256"] == f["sha256"]
        assert data["stats"]["rows"] == f["rows"] and data["stats"]["bytes"] == f["bytes"]
    written = {p.relative_to(run_dir / "stats").as_posix() for p in (run_dir / "stats").rglob("*")}
    assert "summary.json" in written
    assert {p for p in written if p.endswith(".json")} == {
        "summary.json",
        *(f"{f['path'].rsplit('.', 1)[0]}.json" for f in files),
    }


def test_summary_is_the_merge_of_the_files_and_the_stats_of_all_rows(run_dir: Path) -> None:
    rs = load_run(str(run_dir))
    summary = json.loads((run_dir / "stats" / "summary.json").read_text())
    assert rs.summary == summary
    per_file = rs.file_stats("sink")
    for sink in ("out", "tars"):
        parts = [f["stats"] for f in per_file if f["name"] == sink]
        assert roundtrip(stats.merge_all(parts)) == summary["sinks"][sink]
    rows = pq.read_table(run_dir / "out")
    whole = stats.table_record(rows)
    got = {k: v for k, v in summary["sinks"]["out"].items() if k not in ("bytes", "files")}
    assert roundtrip(whole) == got
    assert sum(got["languages"].values()) == rows.num_rows
    assert got["tokens"] == sum(rows.column("n_tokens").to_pylist())
    # The tars hold the same rows: the same text, tokens, languages, mixture, columns.
    tars = summary["sinks"]["tars"]
    for key in ("rows", "text", "tokens", "languages", "mixture", "cluster_sizes"):
        assert tars[key] == got[key], key
    for name, col in got["columns"].items():
        assert {k: v for k, v in tars["columns"][name].items() if k != "nulls"} == {
            k: v for k, v in col.items() if k != "nulls"
        }
    rejects = pq.read_table(run_dir / "rejects" / "length")
    assert summary["rejects"]["length"]["rows"] == rejects.num_rows
    want = stats.rejects_record(rejects, full=False)
    assert roundtrip(want)["reasons"] == summary["rejects"]["length"]["reasons"]
    assert set(summary["rejects"]) == {"docs", "length", "dedup"}


def test_a_run_without_stats_is_measured_when_loaded(run_dir: Path, tmp_path: Path) -> None:
    """Measured again, in another order of task completion, the stats files come out
    byte for byte the same (the run-to-run check is conftest's ``user_files`` in the
    determinism tests of the runs, which now include stats/)."""
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "stats")
    rs = load_run(str(copy))
    first = {k: v for k, v in user_files(run_dir).items() if k.startswith("stats/")}
    again = {k: v for k, v in user_files(copy).items() if k.startswith("stats/")}
    assert first == again and len(first) > 10
    assert rs.summary["sinks"]["out"]["rows"] == rs.stage("dedup")["kept"]


# --- the Python API -------------------------------------------------------------------


def test_run_stats_api(run_dir: Path) -> None:
    rs = load_run(str(run_dir))
    shards = rs.shard_table()
    assert shards.num_rows == sum(len(f) for f in rs.manifest["outputs"].values())
    assert sum(shards.column("rows").to_pylist()) == 2 * rs.stage("dedup")["kept"]
    assert set(shards.column("name").to_pylist()) == {"out", "tars"}
    few = rs.rejects("length", "too_few_words", limit=2, columns=["id", "reason", "scores"])
    assert few.num_rows == 2 and few.column_names == ["id", "reason", "scores"]
    assert all(r.startswith("too_few_words") for r in few.column("reason").to_pylist())
    assert rs.rejects("nope").num_rows == 0
    assert rs.dropped("n_words", "length")["max"] < 3 <= rs.kept("n_words")["min"]
    assert "score" in rs.score_columns() and "n_words" in rs.score_columns()
    entries = rs.reason_entries()
    assert next(k for k, _ in entries) == ("docs", "invalid_json")
    assert rs.mix_stages() == []


def test_plots(run_dir: Path, tmp_path: Path) -> None:
    rs = load_run(str(run_dir))
    written = rs.write_plots(str(tmp_path / "plots"))
    names = sorted(Path(p).relative_to(tmp_path / "plots").as_posix() for p in written)
    assert "funnel.png" in names and "scores/n_words.png" in names
    assert "mixture.png" not in names  # no mix stage
    for path in written:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = rs.plot_scores("score")
    assert fig.axes[0].get_legend() is not None


MIX_MANIFEST = {
    "pipeline": {"name": "mixed"},
    "stages": [
        {"name": "web", "type": "source", "rows_in": 10, "kept": 10, "dropped": 0, "reasons": {}},
        {
            "name": "mix",
            "type": "mix",
            "rows_in": 10,
            "kept": 8,
            "dropped": 2,
            "reasons": {"mix": 2},
            "rows_out": 9,
            "summary": {
                "unit": "tokens",
                "budget": 1000,
                "tokenizer": {"name": "cl100k_base"},
                "components": {
                    name: {
                        "weight": w,
                        "target_share": w,
                        "target_tokens": int(1000 * w),
                        "target_rows": None,
                        "available_rows": 10,
                        "available_tokens": 900,
                        "max_epochs": 1.0,
                        "rows": 4,
                        "tokens": int(1000 * got),
                        "share_tokens": got,
                        "share_rows": 0.5,
                        "repetition": 1.0,
                        "unmet": None if got >= w else "not enough tokens",
                    }
                    for name, w, got in (("web", 0.6, 0.65), ("code", 0.4, 0.35))
                },
                "rows": 9,
                "tokens": 1000,
            },
        },
    ],
}


def test_mixture_plot_from_a_manifest() -> None:
    fig = stats.plot_mixture(MIX_MANIFEST)
    assert fig is not None
    (ax,) = fig.axes
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["web", "code"]
    heights = sorted(round(p.get_height(), 2) for p in ax.patches)
    assert heights == [0.35, 0.4, 0.6, 0.65]
    assert stats.png_bytes(fig)[:4] == b"\x89PNG"
    assert stats.plot_mixture({"stages": MIX_MANIFEST["stages"][:1]}) is None
    assert stats.png_bytes(stats.plot_funnel(MIX_MANIFEST))[:4] == b"\x89PNG"
    held = {"sinks": {"out": {"mixture": {"web": {"rows": 4, "tokens": 650}}}}, "rejects": {}}
    table = stats.RunStats("unused", MIX_MANIFEST, held).mixture_table()
    assert table.column("component").to_pylist() == ["web", "code"]
    assert table.column("share_tokens").to_pylist() == [0.65, 0.35]
    assert table.column("sink_tokens").to_pylist() == [650, None]
    assert table.column("unmet").to_pylist() == [None, "not enough tokens"]


# --- the command line -----------------------------------------------------------------


def test_curate_stats_prints_and_plots(run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["stats", str(run_dir), "--plots", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in ("stage funnel", "too_few_words", "outputs", "tars", "webdataset", "n_words"):
        assert needle in text, needle
    assert "duplicate clusters" in text and "plots:" in text
    assert (tmp_path / "p" / "funnel.png").exists()
    missing = CliRunner().invoke(app, ["stats", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "no finished run" in missing.output


def test_curate_diff(run_dir: Path, project: Path) -> None:
    other = project.parent / "stricter"
    run(str(project), str(other), overrides=["stages.length.min_words=6"])
    result = CliRunner().invoke(app, ["diff", str(run_dir), str(other), "--examples", "2"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "~ stages.length.min_words: 3 -> 6" in text
    assert "too_few_words" in text and "→" in text
    ids_a = set(pq.read_table(run_dir / "out", columns=["id"]).column("id").to_pylist())
    ids_b = set(pq.read_table(other / "out", columns=["id"]).column("id").to_pylist())
    a = (str(run_dir), json.loads((run_dir / "manifest.json").read_text()), LOCAL)
    b = (str(other), json.loads((other / "manifest.json").read_text()), LOCAL)
    found = stats.diff_records(a, b, examples=2)
    for sink in ("out", "tars"):  # the tars' ids come from their key index
        assert found[sink]["removed"] == len(ids_a - ids_b) > 0
        assert found[sink]["added"] == len(ids_b - ids_a) == 0
        assert found[sink]["common"] == len(ids_a & ids_b)
        assert found[sink]["removed_ids"] == sorted(ids_a - ids_b)[:2]
    removed = sorted(ids_a - ids_b)
    assert f"sink out: {len(removed)} removed, e.g. {removed[0]} {removed[1]}" in text
    same = stats.diff_manifests(a[1], a[1])
    assert same["spec"] == [] and all(not s["reasons"] for s in same["stages"])


def test_funnel_counts_are_the_manifests(run_dir: Path) -> None:
    rs = load_run(str(run_dir))
    fig: Callable[[], Any] = rs.plot_funnel
    assert fig().axes[0].get_title() == "stats_t: rows per stage"
    for (stage, cat), entry in rs.reason_entries():
        reasons = rs.stage(stage)["reasons"]
        assert entry["rows"] == sum(n for r, n in reasons.items() if r.split(":")[0] == cat)


@pytest.mark.s3
def test_stats_of_a_run_on_s3(run_dir: Path, s3_endpoint: str) -> None:  # noqa: F811
    """Ray tasks read shards from S3 and write the stats there; the bytes are those of
    the local run; ``curate stats`` reads and plots an s3:// run."""
    opts = StorageOptions(endpoint_url=s3_endpoint)
    root = f"s3://{BUCKET}/stats-run"
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir).as_posix()
        if path.is_file() and not rel.startswith(("stats/", "_", ".")):
            storage.write_bytes(f"{root}/{rel}", path.read_bytes(), opts)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stats.write_run_stats(root, manifest, opts)
    for path in sorted((run_dir / "stats").rglob("*.json")):
        rel = path.relative_to(run_dir).as_posix()
        assert storage.read_bytes(f"{root}/{rel}", opts) == path.read_bytes(), rel
    rs = load_run(root, opts)
    assert rs.shard_table().num_rows == len(rs.file_stats("sink"))
    assert rs.rejects("length", limit=1).num_rows == 1
    result = CliRunner().invoke(app, ["stats", root, "--endpoint-url", s3_endpoint])
    assert result.exit_code == 0, result.output
    assert storage.exists(f"{root}/stats/plots/funnel.png", opts)
    local = (str(run_dir), manifest, LOCAL)
    found = stats.diff_records(local, (root, manifest, opts))
    assert found["out"]["removed"] == found["out"]["added"] == 0
