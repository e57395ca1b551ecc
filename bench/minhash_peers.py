"""The MinHash peers, run in their own virtual environment by ``bench/minhash.py``.

datasketch 2.0.0, rensa 0.5.0 and datatrove 0.10.1 (with spaCy's rule-based
blank English tokenizer, which needs no download) are pinned in
``bench/requirements-peers.txt``; they do not fit curate's lock (datatrove's
``processing`` extra wants ``xxhash<4``), so ``bench/minhash.py`` installs them
into ``bench/data/peers-venv`` and calls this script on the same files in the
same run.  datatrove uses FineWeb's ``hash_fc="sha1"``: its default xxhash
function fails under xxhash 4 (it hashes ``str``).

Every timed region starts from ``gc.collect(); gc.freeze()`` and the process is
pinned to one CPU (rensa's batch API would use more).  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from itertools import combinations
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DATATROVE_COLORIZE_LOGS", "0")
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import numpy as np

NUM_PERM = 112
N_GRAM = 5
SEED = 1


def load_docs(path: str, n: int | None = None) -> list[dict[str, Any]]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if n is not None and len(docs) >= n:
                break
    return docs


def _quiesce() -> None:
    gc.collect()
    gc.freeze()


def _rate(n: int, secs: float) -> dict[str, Any]:
    return {"seconds": round(secs, 3), "docs_per_s": round(n / secs, 1) if secs > 0 else None}


# --------------------------------------------------------------------------- a. shingling
def shingle(text: str, n_gram: int = N_GRAM) -> list[str]:
    """lowercase + str.split() on whitespace, word n-grams joined with one space.

    Documents with 1..n_gram-1 words give a single shingle (all their words);
    empty documents give no shingle.
    """
    w = text.lower().split()
    if len(w) < n_gram:
        return [" ".join(w)] if w else []
    return [" ".join(w[i : i + n_gram]) for i in range(len(w) - n_gram + 1)]


def bench_shingling(texts: list[str], n_gram: int = N_GRAM) -> dict:
    _quiesce()
    t0 = time.perf_counter()
    out = [shingle(t, n_gram) for t in texts]
    dt = time.perf_counter() - t0
    r = _rate(len(texts), dt)
    r["total_shingles"] = sum(len(s) for s in out)
    r["_shingles"] = out
    return r


# --------------------------------------------------------------------------- b. datasketch
def bench_datasketch(
    texts: list[str],
    num_perm: int = NUM_PERM,
    n_gram: int = N_GRAM,
    seed: int = SEED,
    per_doc_only: bool = False,
) -> dict:
    """Per-document MinHash(num_perm, seed).update_batch(bytes shingles), and MinHash.bulk.

    Default datasketch 2.0.0 settings: scheme="affine32", hashfunc=sha1_hash32.
    Shingling and str->bytes encoding are inside the timed region.
    """
    from datasketch import MinHash

    res = {}
    _quiesce()
    t0 = time.perf_counter()
    per_doc = []
    for t in texts:
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch([s.encode("utf-8") for s in shingle(t, n_gram)])
        per_doc.append(m)
    dt = time.perf_counter() - t0
    res["per_doc_update_batch"] = _rate(len(texts), dt)
    if per_doc_only:
        res["_minhashes"] = per_doc
        return res

    _quiesce()

    t0 = time.perf_counter()
    bulk = MinHash.bulk(
        ([s.encode("utf-8") for s in shingle(t, n_gram)] for t in texts),
        num_perm=num_perm,
        seed=seed,
    )
    dt = time.perf_counter() - t0
    res["bulk"] = _rate(len(texts), dt)
    res["bulk_equals_per_doc"] = all(
        np.array_equal(a.hashvalues, b.hashvalues) for a, b in zip(per_doc, bulk, strict=True)
    )
    res["scheme"] = per_doc[0].scheme if per_doc else None
    res["_minhashes"] = per_doc
    return res


# --------------------------------------------------------------------------- c. rensa
def bench_rensa(
    texts: list[str],
    num_perm: int = NUM_PERM,
    n_gram: int = N_GRAM,
    seed: int = SEED,
    shingles=None,
) -> dict:
    """RMinHash(num_perm, seed).update(list_of_shingle_strings); .digest().

    'with_shingling' includes shingle(); 'pre_shingled' times only update+digest on
    shingles computed beforehand (passed in or computed untimed here).
    """
    from rensa import RMinHash

    res = {}
    _quiesce()
    t0 = time.perf_counter()
    digests = []
    for t in texts:
        m = RMinHash(num_perm=num_perm, seed=seed)
        m.update(shingle(t, n_gram))
        digests.append(m.digest())
    dt = time.perf_counter() - t0
    res["with_shingling"] = _rate(len(texts), dt)

    if shingles is None:
        shingles = [shingle(t, n_gram) for t in texts]
    _quiesce()
    t0 = time.perf_counter()
    digests2 = []
    for sh in shingles:
        m = RMinHash(num_perm=num_perm, seed=seed)
        m.update(sh)
        digests2.append(m.digest())
    dt = time.perf_counter() - t0
    res["pre_shingled"] = _rate(len(texts), dt)
    res["same_digests"] = digests == digests2

    # extra: rensa's batch API (one call, RAYON_NUM_THREADS=1), pre-shingled
    if hasattr(RMinHash, "digest_matrix_from_token_sets"):
        _quiesce()
        t0 = time.perf_counter()
        mat = RMinHash.digest_matrix_from_token_sets(shingles, num_perm=num_perm, seed=seed)
        dt = time.perf_counter() - t0
        res["batch_digest_matrix_pre_shingled"] = _rate(len(texts), dt)
        # RMinHashDigestMatrix.to_rows() -> list of per-document digests (conversion not timed)
        res["batch_equals_per_doc"] = [list(r) for r in mat.to_rows()] == digests2
    res["_digests"] = digests
    return res


# --------------------------------------------------------------------------- d. datatrove
def fineweb_config(hash_fc: str = "sha1"):
    """FineWeb's MinHash config (datatrove examples/fineweb.py): 14 x 8, 5-grams, 64-bit.

    FineWeb's example uses hash_fc="sha1"; datatrove 0.10.1's HashConfig default is "xxhash", which
    calls xxhash.xxh64_intdigest(str) and raises TypeError under the project's pinned xxhash==4.1.0
    (xxhash>=4 refuses str; datatrove[processing] itself pins xxhash<4).
    """
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.utils.hashing import HashConfig

    return MinhashConfig(
        hash_config=HashConfig(hash_fc=hash_fc, precision=64),
        num_buckets=14,
        hashes_per_bucket=8,
        n_grams=5,
    )


def write_jsonl_copy(docs: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"id": d["id"], "text": d["text"]}, ensure_ascii=False) + "\n")


def _count_jsonl(folder: str) -> int:
    n = 0
    if not os.path.isdir(folder):
        return 0
    for root, _, files in os.walk(folder):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                n += sum(1 for _ in f)
    return n


def bench_datatrove_sig_inprocess(texts: list[str], hash_fc: str = "sha1") -> dict:
    """Reference: MinhashDedupSignature.get_shingles + get_signature called directly (no executor,
    no JSON reading, no file writing/sorting)."""
    from datatrove.pipeline.dedup.minhash import MinhashDedupSignature

    tmp = tempfile.mkdtemp(prefix="dt_inproc_")
    try:
        step = MinhashDedupSignature(output_folder=tmp, config=fineweb_config(hash_fc))
        step.word_tokenizer.word_tokenize("warm up spacy")  # lazy spacy.blank("en") load, untimed
        _quiesce()
        t0 = time.perf_counter()
        empty = 0
        for t in texts:
            sh = step.get_shingles(t)
            if sh.size:
                step.get_signature(sh)
            else:
                empty += 1
        dt = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r = _rate(len(texts), dt)
    r["docs_without_shingles"] = empty
    return r


def bench_datatrove(
    docs: list[dict], workdir: str, workers: int = 1, hash_fc: str = "sha1"
) -> dict:
    """datatrove's four-step local MinHash pipeline (FineWeb config) on a JSONL copy split
    into ``workers`` files: signatures and filter with one task per file, buckets with one
    task per band, clustering in one task; each step timed."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    if os.path.exists(workdir):
        shutil.rmtree(workdir)  # executors skip completed tasks recorded in logging dirs
    inp = os.path.join(workdir, "input")
    for w in range(workers):  # one input file per worker, in order
        lo, hi = len(docs) * w // workers, len(docs) * (w + 1) // workers
        write_jsonl_copy(docs[lo:hi], os.path.join(inp, f"{w:05d}.jsonl"))
    cfg = fineweb_config(hash_fc)
    n = len(docs)
    res = {"config": str(cfg)}

    def run(name, pipeline, tasks):
        ex = LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=workers,
            logging_dir=os.path.join(workdir, "logs", name),
        )
        _quiesce()
        t0 = time.perf_counter()
        ex.run()
        return time.perf_counter() - t0

    t_sig = run(
        "1_signatures",
        [
            JsonlReader(inp),
            MinhashDedupSignature(output_folder=os.path.join(workdir, "signatures"), config=cfg),
        ],
        workers,
    )
    res["1_signature"] = _rate(n, t_sig)

    t_b = run(
        "2_buckets",
        [
            MinhashDedupBuckets(
                input_folder=os.path.join(workdir, "signatures"),
                output_folder=os.path.join(workdir, "buckets"),
                config=cfg,
            )
        ],
        cfg.num_buckets,
    )
    t_c = run(
        "3_cluster",
        [
            MinhashDedupCluster(
                input_folder=os.path.join(workdir, "buckets"),
                output_folder=os.path.join(workdir, "remove_ids"),
                config=cfg,
            )
        ],
        1,
    )
    t_f = run(
        "4_filter",
        [
            JsonlReader(inp),
            MinhashDedupFilter(
                input_folder=os.path.join(workdir, "remove_ids"),
                exclusion_writer=JsonlWriter(os.path.join(workdir, "removed"), compression=None),
            ),
            JsonlWriter(os.path.join(workdir, "deduplicated_output"), compression=None),
        ],
        workers,
    )
    res["2_buckets"] = {"seconds": round(t_b, 3)}
    res["3_cluster"] = {"seconds": round(t_c, 3)}
    res["4_filter"] = _rate(n, t_f)
    tot = t_sig + t_b + t_c + t_f
    res["total"] = _rate(n, tot)
    res["docs_removed"] = _count_jsonl(os.path.join(workdir, "removed"))
    res["docs_kept"] = _count_jsonl(os.path.join(workdir, "deduplicated_output"))
    return res


# --------------------------------------------------------------------------- e. datasketch LSH
def bench_datasketch_lsh(minhashes, threshold: float = 0.8, num_perm: int = NUM_PERM) -> dict:
    """MinHashLSH(threshold, num_perm) over datasketch signatures; candidate pairs = every pair of
    doc indices sharing at least one band bucket.  Empty signatures (docs with no shingle) are not
    inserted: they would all share every bucket."""
    from datasketch import MinHashLSH

    _quiesce()

    t0 = time.perf_counter()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    skipped = 0
    with lsh.insertion_session() as sess:
        for i, m in enumerate(minhashes):
            if m.is_empty():
                skipped += 1
                continue
            sess.insert(i, m, check_duplication=False)
    t_ins = time.perf_counter() - t0

    _quiesce()

    t0 = time.perf_counter()
    pairs: set[tuple[int, int]] = set()
    for table in lsh.hashtables:
        for key in table.keys():  # noqa: SIM118 - a datasketch storage, not a dict
            members = table.get(key)
            if len(members) > 1:
                pairs.update(combinations(sorted(members), 2))
    t_pairs = time.perf_counter() - t0
    n = len(minhashes)
    return {
        "bands_b": lsh.b,
        "rows_r": lsh.r,
        "insert": _rate(n, t_ins),
        "pair_extraction_seconds": round(t_pairs, 3),
        "n_candidate_pairs": len(pairs),
        "docs_in_some_pair": len({i for p in pairs for i in p}),
        "empty_signatures_skipped": skipped,
        "_pairs": pairs,
    }


def _public(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _public(v) for k, v in d.items() if not k.startswith("_")}
    return d


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True, help="JSON lines with a text field")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="signatures,datatrove,lsh")
    ap.add_argument("--lsh-data", help="normalized texts for the LSH quality run")
    ap.add_argument("--datatrove-workers", type=int, default=1)
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    if hasattr(os, "sched_setaffinity") and a.datatrove_workers == 1:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    docs = load_docs(a.data, a.n)
    texts = [d["text"] for d in docs]
    os.makedirs(a.out, exist_ok=True)
    results: dict[str, Any] = {"n_docs": len(texts)}
    if "signatures" in parts:
        sh = bench_shingling(texts)
        results["python_shingling"] = _public(sh)
        results["datasketch"] = _public(bench_datasketch(texts))
        results["rensa"] = _public(bench_rensa(texts, shingles=sh["_shingles"]))
        results["datatrove_signature_inprocess"] = bench_datatrove_sig_inprocess(texts)
    if "datatrove" in parts:
        dt = bench_datatrove(docs, os.path.join(a.out, "datatrove_work"), a.datatrove_workers)
        results["datatrove_pipeline"] = _public(dt)
    if "lsh" in parts and a.lsh_data:
        norm = [d["text"] for d in load_docs(a.lsh_data, a.n)]
        ds = bench_datasketch(norm, per_doc_only=True)
        lsh = bench_datasketch_lsh(ds["_minhashes"])
        results["datasketch_lsh"] = _public(lsh)
        np.save(
            os.path.join(a.out, "datasketch_lsh_pairs.npy"),
            np.array(sorted(lsh["_pairs"]), dtype=np.int64).reshape(-1, 2),
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
