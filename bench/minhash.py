"""Benchmark: MinHash near-dedup, curate against datasketch, rensa and datatrove.

Same data (64,563 Debian package descriptions, ``bench/debian.py``), same run,
same parameters (word 5-grams, 112 permutations, 14 bands x 8 rows, seed 1):

``signatures``
    raw text -> signatures on one core, shingling included: curate's compiled
    kernel and its numpy path; datasketch per document and ``MinHash.bulk``;
    rensa with Python shingling in front (and pre-shingled); datatrove's
    ``MinhashDedupSignature`` shingling and signing in-process.
``e2e``
    raw JSONL -> deduplicated output: ``curate run`` with ``minhash_dedup``
    (embedded Ray on every core, Parquet out, full lineage) against datatrove's
    four-step local pipeline (signatures, buckets, cluster, filter; JSONL out)
    with as many workers as cores, and with one.
``quality``
    every pair with word 5-gram Jaccard >= 0.8 (exact, ``bench/jaccard_truth.py``)
    against: curate's LSH candidate pairs (14 x 8), the same after exact
    Jaccard verification at 0.8, the stage's clusters, and datasketch's
    ``MinHashLSH(0.8)`` given the same normalized text.

The peers run in their own virtual environment (``bench/requirements-peers.txt``,
created in ``bench/data/peers-venv`` on first use) through ``bench/minhash_peers.py``.

    python bench/minhash.py                       # all three
    python bench/minhash.py --parts signatures --docs 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

import debian
import jaccard_truth

from curate.dedup import kernel
from curate.dedup.minhash import SignatureSpec, band_keys, lsh_keys, normalize, signatures

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "data" / "minhash"
PEERS = ROOT / "bench" / "data" / "peers-venv"
SPEC = SignatureSpec(shingle="word", ngram=5, num_perm=112, hash_bits=64, seed=1)
BANDS, ROWS = 14, 8

PIPELINE = """\
name: bench_minhash
sources:
  docs: {{uri: docs.jsonl, id_column: id}}
stages:
  dedup:
    type: minhash_dedup
    preset: fineweb
{extra}
sinks:
  out: {{input: dedup}}
execution: {{unit_bytes: 4MiB}}
"""


def ensure_peers() -> Path:
    python = PEERS / "bin" / "python"
    if not python.exists():
        print("creating the peers' environment (bench/requirements-peers.txt) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEERS)], check=True)
        reqs = ROOT / "bench" / "requirements-peers.txt"
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(reqs)], check=True)
    return python


def run_peers(data: Path, n: int, parts: str, **extra: Any) -> dict[str, Any]:
    cmd = [str(ensure_peers()), str(ROOT / "bench" / "minhash_peers.py"), "--data", str(data)]
    cmd += ["--n", str(n), "--out", str(WORK / "peers"), "--parts", parts]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def corpus(n: int) -> tuple[Path, list[str]]:
    docs = debian.load()[:n]
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"docs-{len(docs)}.jsonl"
    if not path.exists():
        with path.open("w", encoding="utf-8") as handle:
            for d in docs:
                handle.write(
                    json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n"
                )
    return path, [d["text"] for d in docs]


def one_core() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


def time_signatures(texts: list[str], numpy_path: bool, keys: bool = False) -> float:
    """Seconds for one call on all texts (after a warm-up call that compiles the kernel)."""
    arr = pa.array(texts)
    if numpy_path:
        os.environ["CURATE_MINHASH_KERNEL"] = "numpy"
    try:
        signatures(arr[:100], SPEC)  # compile / warm up
        lsh_keys(arr[:100], SPEC, BANDS, ROWS)
        start = time.perf_counter()
        if keys:
            lsh_keys(arr, SPEC, BANDS, ROWS)
        else:
            signatures(arr, SPEC)
        return time.perf_counter() - start
    finally:
        os.environ.pop("CURATE_MINHASH_KERNEL", None)


def part_signatures(data: Path, texts: list[str]) -> list[tuple[str, float]]:
    n = len(texts)
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    one_core()
    try:
        fast = time_signatures(texts, numpy_path=False) if kernel.HAVE_NUMBA else float("nan")
        keyed = time_signatures(texts, numpy_path=False, keys=True)
        slow = time_signatures(texts, numpy_path=True)
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
    peers = run_peers(data, n, "signatures")
    rows = [
        ("curate, compiled kernel (raw text, normalized)", n / fast),
        ("curate, compiled kernel -> band keys (the stage's step)", n / keyed),
        ("curate, numpy path", n / slow),
        ("python shingling alone (lower + split)", peers["python_shingling"]["docs_per_s"]),
        (
            "datasketch MinHash.update_batch",
            peers["datasketch"]["per_doc_update_batch"]["docs_per_s"],
        ),
        ("datasketch MinHash.bulk", peers["datasketch"]["bulk"]["docs_per_s"]),
        ("rensa RMinHash + python shingling", peers["rensa"]["with_shingling"]["docs_per_s"]),
        ("rensa RMinHash, pre-shingled", peers["rensa"]["pre_shingled"]["docs_per_s"]),
        (
            "rensa digest_matrix_from_token_sets, pre-shingled",
            peers["rensa"]["batch_digest_matrix_pre_shingled"]["docs_per_s"],
        ),
        (
            "datatrove MinhashDedupSignature (in-process)",
            peers["datatrove_signature_inprocess"]["docs_per_s"],
        ),
    ]
    print(f"\nsignatures from raw text, one core, {n} documents")
    print(f"{'':56s} {'docs/s':>10s} {'curate x':>9s}")
    for name, rate in rows:
        print(f"{name:56s} {rate:10.0f} {rows[0][1] / rate:9.2f}")
    return rows


def run_curate(data: Path, name: str, extra: str = "") -> tuple[float, Path]:
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").unlink(missing_ok=True)
    (folder / "docs.jsonl").symlink_to(data)
    (folder / "pipe.yaml").write_text(PIPELINE.format(extra=extra), encoding="utf-8")
    start = time.perf_counter()
    subprocess.run(
        [
            str(Path(sys.executable).parent / "curate"),
            "run",
            str(folder / "pipe.yaml"),
            "--output",
            str(folder / "out"),
            "--overwrite",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - start, folder / "out"


def part_e2e(data: Path, n: int) -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    wall, out = run_curate(data, "e2e")
    manifest = json.loads((out / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["name"] == "dedup")
    dedup_s = manifest["run"]["global_stage_seconds"]["dedup"]
    inside = manifest["run"]["seconds"]
    many = run_peers(data, n, "datatrove", datatrove_workers=cores)["datatrove_pipeline"]
    one = run_peers(data, n, "datatrove", datatrove_workers=1)["datatrove_pipeline"]
    print(f"\nend to end, {n} documents, {cores} cores")
    print(
        f"curate run (Ray start, read, dedup, Parquet, lineage): {wall:7.1f} s, "
        f"removed {stage['dropped']}; {inside:.1f} s after Ray start-up, "
        f"dedup stage {dedup_s:.1f} s"
    )
    for label, dt in ((f"{cores} workers", many), ("1 worker", one)):
        total = dt["total"]["seconds"]
        steps = ", ".join(
            f"{k} {dt[k]['seconds']:.1f}"
            for k in ("1_signature", "2_buckets", "3_cluster", "4_filter")
        )
        print(
            f"datatrove, {label}: {total:7.1f} s ({steps}), removed {dt['docs_removed']}"
            f"  -> curate {total / wall:.1f}x faster ({total / inside:.1f}x after start-up)"
        )
    return {"curate_s": wall, "datatrove_s": many["total"]["seconds"], "removed": stage["dropped"]}


def bucket_pairs(keys: np.ndarray[Any, Any], has: np.ndarray[Any, Any]) -> set[tuple[int, int]]:
    """Every pair of documents sharing a key in some band."""
    pairs: set[tuple[int, int]] = set()
    idx = np.flatnonzero(has)
    for band in range(keys.shape[1]):
        groups: dict[int, list[int]] = defaultdict(list)
        for i, k in zip(idx.tolist(), keys[idx, band].tolist(), strict=True):
            groups[k].append(i)
        for members in groups.values():
            if len(members) > 1:
                pairs.update(combinations(members, 2))
    return pairs


def scores(found: set[tuple[int, int]], truth: set[tuple[int, int]]) -> tuple[float, float, int]:
    hit = len(found & truth)
    return hit / max(len(found), 1), hit / max(len(truth), 1), len(found)


def part_quality(data: Path, texts: list[str], ids: list[str]) -> None:
    n = len(texts)
    sets = jaccard_truth.shingle_sets(texts, SPEC)
    truth_pairs = jaccard_truth.true_pairs(sets, 0.8)
    truth = set(truth_pairs)
    sig, counts = signatures(pa.array(texts), SPEC)
    lsh = bucket_pairs(band_keys(sig, BANDS, ROWS), counts > 0)
    verified = set()
    for i, j in lsh:
        inter = len(np.intersect1d(sets[i], sets[j], assume_unique=True))
        if inter / (len(sets[i]) + len(sets[j]) - inter) >= 0.8:
            verified.add((i, j))
    # The stage end to end (verification on): which pairs end in one cluster.
    _, out = run_curate(data, "quality", "    jaccard_threshold: 0.8")
    cluster = {}
    for path in sorted((out / "out").glob("*.parquet")):
        for row in pq.read_table(path, columns=["id", "cluster_id"]).to_pylist():
            cluster[row["id"]] = row["cluster_id"]
    for path in sorted((out / "rejects" / "dedup").glob("*.parquet")):
        for row in pq.read_table(path, columns=["id", "value"]).to_pylist():
            cluster[row["id"]] = row["value"]
    members: dict[str, list[int]] = defaultdict(list)
    for i, doc in enumerate(ids):
        members[cluster[doc]].append(i)
    clustered = {p for m in members.values() if len(m) > 1 for p in combinations(sorted(m), 2)}
    recalled = sum(1 for i, j in truth if cluster[ids[i]] == cluster[ids[j]])
    # datasketch on the same normalized text (so the same word 5-gram sets).
    norm_path = WORK / f"normalized-{n}.jsonl"
    with norm_path.open("w", encoding="utf-8") as handle:
        for text in normalize(pa.array(texts), SPEC.normalization()).to_pylist():
            handle.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    peers = run_peers(data, n, "lsh", lsh_data=norm_path)
    ds_pairs = np.load(WORK / "peers" / "datasketch_lsh_pairs.npy")
    ds = {(int(a), int(b)) for a, b in ds_pairs}
    info = peers["datasketch_lsh"]
    print(f"\nquality, {n} documents: {len(truth)} pairs with word 5-gram Jaccard >= 0.8")
    print(f"{'':58s} {'pairs':>8s} {'precision':>9s} {'recall':>7s}")
    for name, found in (
        ("curate LSH 14x8, candidate pairs", lsh),
        ("curate LSH 14x8 + exact Jaccard >= 0.8", verified),
        (f"datasketch MinHashLSH(0.8) ({info['bands_b']}x{info['rows_r']})", ds),
    ):
        p, r, k = scores(found, truth)
        print(f"{name:58s} {k:8d} {p:9.3f} {r:7.3f}")
    p = len(clustered & truth) / max(len(clustered), 1)
    print(
        f"{'curate stage (verified): pairs placed in one cluster':58s} {len(clustered):8d} "
        f"{p:9.3f} {recalled / len(truth):7.3f}"
    )
    removed = sum(1 for doc in ids if cluster[doc] != doc)
    print(f"curate stage removed {removed} of {n} documents")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, default=None, help="first N descriptions (default all)")
    parser.add_argument("--parts", default="signatures,e2e,quality")
    args = parser.parse_args()
    all_docs = debian.load()
    n = args.docs or len(all_docs)
    data, texts = corpus(n)
    parts = set(args.parts.split(","))
    if "signatures" in parts:
        part_signatures(data, texts)
    if "e2e" in parts:
        part_e2e(data, n)
    if "quality" in parts:
        part_quality(data, texts, [d["id"] for d in all_docs[:n]])


if __name__ == "__main__":
    main()
