"""Scale benchmark: ``minhash_dedup`` on millions of documents on this machine, with the
peak memory of every process of the run.

Documents are built from the Debian descriptions (``bench/debian.py``): each one
is a description with 1-5 % of its words replaced and, one time in two, a
random cut; so every description has many near-copies and the clusters are
real work for LSH and the components.  They are written as zstd Parquet shards
(cached in ``bench/data``).

While ``curate run`` works, a sampler reads ``/proc/<pid>/status`` of every
process of the run (the driver and everything Ray starts: raylet, GCS, workers)
ten times a second and keeps each one's peak *private* resident memory
(``RssAnon``).  Ray's object store is shared memory: a worker that writes or
reads an object maps its pages, which would count in its plain RSS although
they belong to the store, whose size is capped (30 % of RAM by default) and
which spills to disk beyond.  Run at several sizes to see whether the largest
process grows with the document count.

    python bench/minhash_scale.py --docs 250000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

import debian

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "data"
#: Documents per shard (so one unit of work): the same at every size, so that a
#: larger run has more units, not larger ones.
PER_SHARD = 62_500

PIPELINE = """\
name: bench_minhash_scale
sources:
  docs: {uri: "shards/*.parquet"}
stages:
  dedup: {type: minhash_dedup, preset: fineweb}
sinks:
  out: {input: dedup}
execution: {unit_bytes: 16MiB, shard_bytes: 256MiB}
"""


def make_corpus(n_docs: int, seed: int = 0) -> Path:
    folder = WORK / f"minhash-scale-{n_docs}"
    if (folder / "DONE").exists():
        return folder
    rng = random.Random(seed)
    bases = [d["text"].split() for d in debian.load()]
    vocab = sorted({w for words in bases[:5000] for w in words})
    shards = folder / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    for s in range(-(-n_docs // PER_SHARD)):
        texts = []
        for _ in range(min(PER_SHARD, n_docs - s * PER_SHARD)):
            words = list(rng.choice(bases))
            for _ in range(max(1, int(len(words) * rng.uniform(0.01, 0.05)))):
                words[rng.randrange(len(words))] = rng.choice(vocab)
            if rng.random() < 0.5:
                words = words[: max(5, int(len(words) * rng.uniform(0.5, 1.0)))]
            texts.append(" ".join(words))
        pq.write_table(
            pa.table({"text": texts}), shards / f"part-{s:03d}.parquet", compression="zstd"
        )
    (folder / "pipe.yaml").write_text(PIPELINE, encoding="utf-8")
    (folder / "DONE").write_text("ok")
    return folder


def _children(root: int) -> set[int]:
    """``root`` and every process whose ancestry reaches it."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                parent[int(entry)] = int(fields[1])
            except OSError:
                continue
    out = {root}
    changed = True
    while changed:
        changed = False
        for pid, ppid in parent.items():
            if ppid in out and pid not in out:
                out.add(pid)
                changed = True
    return out


def _rss_and_name(pid: int) -> tuple[int, str]:
    """Private resident memory (``RssAnon``: the process's own heap, not the object
    store's shared pages it has mapped) and the process name."""
    rss, name = 0, "?"
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Name:"):
                name = line.split(None, 1)[1].strip()
    return rss, name


class Sampler(threading.Thread):
    def __init__(self, root: int) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak: dict[int, tuple[int, str]] = {}
        self.total_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for pid in _children(self.root):
                try:
                    rss, name = _rss_and_name(pid)
                except OSError:
                    continue
                total += rss
                if rss > self.peak.get(pid, (0, ""))[0]:
                    self.peak[pid] = (rss, name)
            self.total_peak = max(self.total_peak, total)
            time.sleep(0.1)


def run(folder: Path) -> dict[str, object]:
    out = folder / "out"
    cmd = [str(Path(sys.executable).parent / "curate"), "run", str(folder / "pipe.yaml")]
    cmd += ["--output", str(out), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = Sampler(proc.pid)
    sampler.start()
    code = proc.wait()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if code:
        raise SystemExit(f"curate run failed with exit code {code}")
    manifest = json.loads((out / "manifest.json").read_text())
    stage = next(s for s in manifest["stages"] if s["name"] == "dedup")
    top = sorted(sampler.peak.values(), reverse=True)[:4]
    return {
        "wall_s": round(wall, 1),
        "dedup_s": round(manifest["run"]["global_stage_seconds"]["dedup"], 1),
        "rows_in": stage["rows_in"],
        "dropped": stage["dropped"],
        "partitions": stage["summary"]["partitions"],
        "rounds": stage["summary"]["rounds"],
        "largest": [(name, round(rss / 2**20)) for rss, name in top],
        "all_processes_peak_mib": round(sampler.total_peak / 2**20),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--docs", type=int, nargs="+", default=[250_000, 1_000_000])
    args = parser.parse_args()
    results = {}
    for n in args.docs:
        folder = make_corpus(n)
        results[n] = run(folder)
        print(f"{n} docs: {json.dumps(results[n])}", flush=True)
    print("\nprivate memory (RssAnon), MiB")
    print("docs       wall s  dedup s  removed   largest process         all processes")
    for n, r in results.items():
        name, mib = r["largest"][0]  # type: ignore[index]
        print(
            f"{n:<10d} {r['wall_s']:6.1f}  {r['dedup_s']:7.1f}  {r['dropped']:7d}   "
            f"{mib:6d} ({name})        {r['all_processes_peak_mib']:6d}"
        )


if __name__ == "__main__":
    main()
