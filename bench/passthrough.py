"""Benchmark: read -> text_stats + length_filter -> write, curate vs plain pyarrow.

Both sides read the same Parquet (or JSONL) shards, compute the same four statistics
with the same Arrow kernels, drop documents outside the same word bounds and
write zstd Parquet.  Plain pyarrow does it in one process with no lineage;
curate runs on an embedded local Ray with every core and also writes ids,
provenance, the rejects table, checksums and the manifest.

Documents are realistic: random windows of 20-400 words over the sections
of the bundled Python documentation corpus (so lengths, vocabulary and
Unicode are real text, and some windows fall under the length bound).

    python bench/passthrough.py                  # 1,000,000 documents, Parquet
    python bench/passthrough.py --format jsonl   # the same as JSON lines (pyarrow.json beside us)
    python bench/passthrough.py --docs 200000
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "pipelines" / "data" / "demo_text"
WORK = ROOT / "bench" / "data"
MIN_WORDS, MAX_WORDS = 30, 2000

PIPELINE = f"""\
name: bench_passthrough
sources:
  docs: {{uri: "shards/*.{{ext}}", columns: {{url: string}}}}
stages:
  stats: {{type: text_stats}}
  length: {{type: length_filter, min_words: {MIN_WORDS}, max_words: {MAX_WORDS}}}
sinks:
  out: {{input: length}}
execution: {{unit_bytes: 16MiB, shard_bytes: 128MiB}}
"""


def make_corpus(n_docs: int, n_shards: int, fmt: str, seed: int = 0) -> Path:
    """Write ``n_docs`` documents into ``n_shards`` Parquet or JSONL files (cached)."""
    folder = WORK / f"docs-{n_docs}-{n_shards}-{fmt}"
    if (folder / "DONE").exists():
        return folder
    words: list[str] = []
    for path in sorted(CORPUS.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                words.extend(json.loads(line)["text"].split())
    vocab = np.array(words, dtype=object)
    rng = np.random.default_rng(seed)
    shard_dir = folder / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    per = n_docs // n_shards
    for s in range(n_shards):
        lengths = rng.integers(20, 400, per)
        starts = rng.integers(0, len(vocab) - 400, per)
        texts = [" ".join(vocab[a : a + n]) for a, n in zip(starts, lengths, strict=True)]
        urls = [f"https://example.org/{s}/{i}" for i in range(per)]
        table = pa.table({"text": texts, "url": urls})
        if fmt == "parquet":
            pq.write_table(table, shard_dir / f"part-{s:04d}.parquet")
        else:
            with open(shard_dir / f"part-{s:04d}.jsonl", "w", encoding="utf-8") as handle:
                for row in table.to_pylist():
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / "pipeline.yaml").write_text(PIPELINE.replace("{ext}", fmt))
    (folder / "DONE").write_text("ok")
    return folder


def plain_pyarrow(folder: Path, out: Path) -> tuple[float, int]:
    """The same work, one process, no Ray, no lineage."""
    from curate.stages.text_stats import text_stats

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    kept = 0
    for i, path in enumerate(sorted((folder / "shards").iterdir())):
        table = pq.read_table(path) if path.suffix == ".parquet" else pa_json.read_json(path)
        for name, column in text_stats(table.column("text")).items():
            table = table.append_column(name, column)
        words = table.column("n_words")
        mask = pc.and_(pc.greater_equal(words, MIN_WORDS), pc.less_equal(words, MAX_WORDS))
        table = table.filter(mask)
        kept += table.num_rows
        pq.write_table(table, out / f"part-{i:04d}.parquet", compression="zstd")
    return time.perf_counter() - start, kept


def run_cli(spec: Path, out: Path) -> tuple[float, dict[str, Any]]:
    """``curate run`` in a fresh process (embedded Ray) into an emptied ``out``: the wall
    time with start-up, and the manifest."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "curate.cli", "run", str(spec), "-o", str(out)],
        check=False,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-4000:])
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return wall, manifest


def curate_run(folder: Path, out: Path) -> tuple[float, float, int]:
    """Run the pipeline; return wall, pipeline seconds, kept."""
    wall, manifest = run_cli(folder / "pipeline.yaml", out)
    kept = next(s["kept"] for s in manifest["stages"] if s["name"] == "length")
    return wall, manifest["run"]["seconds"], kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=1_000_000)
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    args = parser.parse_args()
    t0 = time.perf_counter()
    folder = make_corpus(args.docs, args.shards, args.format)
    size = sum(p.stat().st_size for p in (folder / "shards").iterdir())
    print(
        f"corpus: {args.docs:,} docs, {args.shards} {args.format} shards, {size / 2**20:.0f} MiB "
        f"(ready in {time.perf_counter() - t0:.0f} s)"
    )
    plain_s, plain_kept = plain_pyarrow(folder, WORK.parent / "out" / "plain")
    wall, pipeline_s, kept = curate_run(folder, WORK.parent / "out" / "curate")
    assert kept == plain_kept, (kept, plain_kept)
    print(f"plain pyarrow, 1 process : {plain_s:7.1f} s  ({args.docs / plain_s:,.0f} docs/s)")
    print(
        f"curate, local Ray        : {pipeline_s:7.1f} s  ({args.docs / pipeline_s:,.0f} docs/s)"
        f"; {wall:.1f} s with Ray start-up"
    )
    print(
        f"ratio curate / plain     : {pipeline_s / plain_s:.2f}x time "
        f"({wall / plain_s:.2f}x with start-up); both kept {kept:,} docs"
    )


if __name__ == "__main__":
    main()
