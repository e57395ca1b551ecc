"""Benchmark: the same runs on a Ray cluster of 1, 2 and 3 worker nodes on this machine.

Each node is its own ``ray start`` raylet (``tests/ray_cluster.py``: own temp dir and
ports, token auth); the head has no CPUs (it holds the driver and Ray's control
processes), every worker ``--cpus`` CPUs.  The driver is ``curate run PIPELINE -o OUT
--address HEAD`` in a fresh process, as on a real cluster.  Two workloads:

``text_demo``
    ``pipelines/demo_text.yaml`` on its bundled data (text_stats, length_filter,
    exact_dedup, minhash_dedup; 3,961 records, 2.8 MB): mostly fixed costs.
``minhash``
    ``minhash_dedup`` alone (FineWeb's 14 x 8 bands, Jaccard check) on the Debian
    package descriptions (``bench/debian.py``, 64,563 documents), as ``--shards``
    JSONL files and ``unit_bytes`` small enough to give every worker several units.

Printed per run: wall seconds of the driver process, documents per second, the
manifest's per-stage busy seconds (summed over units and actors: work, not wall time)
and the global stages' phase times, and whether the outputs equal those of the
1-worker run byte for byte (they must: placement never changes bytes).

What it does not say: all nodes share this machine's cores, memory bus and disk, and
the object store traffic between "nodes" is local shared memory and loopback, not a
network.  With W workers of C CPUs on a P-core host, W*C > P oversubscribes the cores,
so the 3-node figure on a 2-core host measures Ray's overhead of more nodes, not
more hardware.

    python bench/scaling.py                         # both workloads, 1/2/3 workers
    python bench/scaling.py --workloads minhash --workers 1 2 --cpus 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from ray_cluster import ray_cluster  # noqa: E402

WORK = ROOT / "bench" / "data" / "scaling"

MINHASH = """\
name: scaling_minhash
seed: 1
sources:
  docs: {{uri: "{data}/*.jsonl"}}
stages:
  fuzzy: {{type: minhash_dedup, preset: fineweb, jaccard_threshold: 0.8}}
sinks:
  curated: {{input: fuzzy, shard_bytes: 4MiB}}
execution: {{unit_bytes: {unit_bytes}}}
"""


def minhash_pipeline(shards: int) -> tuple[Path, int]:
    """The Debian corpus split into ``shards`` JSONL files and its pipeline."""
    import debian

    source = debian.descriptions()  # fetched on first use
    lines = source.read_text(encoding="utf-8").splitlines()
    data = WORK / f"debian-{shards}"
    if not data.exists():
        data.mkdir(parents=True)
        for k in range(shards):
            part = lines[k::shards]
            (data / f"part-{k:03d}.jsonl").write_text("\n".join(part) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in data.glob("*.jsonl"))
    spec = WORK / f"minhash-{shards}.yaml"
    spec.write_text(MINHASH.format(data=data, unit_bytes=max(1, size // (shards * 2))))
    return spec, len(lines)


def demo_pipeline() -> tuple[Path, int]:
    return ROOT / "pipelines" / "demo_text.yaml", 0  # records: counted by the run


def user_bytes(out: Path) -> dict[str, bytes]:
    """Every file a user reads (Parquet shards, rejects); the manifest without ``run``."""
    found = {}
    for path in sorted(out.rglob("*")):
        rel = path.relative_to(out).as_posix()
        if not path.is_file() or rel.startswith(("_", ".", "stats/")):
            continue
        data = path.read_bytes()
        if rel == "manifest.json":
            manifest = json.loads(data)
            manifest.pop("run", None)
            data = json.dumps(manifest, sort_keys=True).encode()
        found[rel] = data
    return found


def run_once(cluster: Any, spec: Path, out: Path) -> tuple[float, dict[str, Any]]:
    if out.exists():
        shutil.rmtree(out)
    argv = [sys.executable, "-m", "curate.cli", "run", str(spec), "-o", str(out)]
    argv += ["--address", cluster.gcs]
    t0 = time.perf_counter()
    done = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    return seconds, manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", nargs="+", default=["text_demo", "minhash"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs per worker node")
    parser.add_argument("--shards", type=int, default=12, help="JSONL files (minhash)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per point; the best")
    args = parser.parse_args()
    # A SIGTERM (kill, a CI timeout) tears the nodes down too, as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    workloads = {"text_demo": demo_pipeline, "minhash": lambda: minhash_pipeline(args.shards)}
    print(f"host: {os.cpu_count()} cores; worker nodes of {args.cpus:g} CPU(s); head 0 CPUs")
    rows = []
    reference: dict[str, dict[str, bytes]] = {}
    for n in args.workers:
        workers = {f"worker{i}": (args.cpus, {}) for i in range(1, n + 1)}
        with ray_cluster(head_cpus=0, workers=workers, object_store_bytes=1 << 30) as cluster:
            for name in args.workloads:
                spec, docs = workloads[name]()
                out = WORK / "out" / f"{name}-{n}"
                best: tuple[float, dict[str, Any]] | None = None
                for _ in range(args.repeat):
                    got = run_once(cluster, spec, out)
                    if best is None or got[0] < best[0]:
                        best = got
                assert best is not None
                seconds, manifest = best
                docs = docs or sum(
                    s["rows_in"] for s in manifest["stages"] if s["kind"] == "source"
                )
                files = user_bytes(out)
                same = reference.setdefault(name, files) == files
                run = manifest["run"]
                rows.append((name, n, seconds, docs / seconds, same, run))
                print(
                    f"{name:10s} {n} worker(s): {seconds:6.1f} s wall, "
                    f"{docs / seconds:8.0f} docs/s,"
                    f" outputs {'identical to' if same else 'DIFFER from'} the 1-worker run"
                )
                busy = {k: round(v, 2) for k, v in run.get("stage_seconds", {}).items()}
                print(f"    stage busy seconds: {busy}")
                for stage, phases in run.get("global_stage_phases", {}).items():
                    shown = {k: round(v, 2) for k, v in phases.items()}
                    print(f"    {stage} phases (wall s): {shown}")
    print()
    print("| workload | workers | wall s | docs/s | speed-up vs 1 | outputs |")
    print("|---|---:|---:|---:|---:|---|")
    for name, n, seconds, rate, same, _ in rows:
        base = next(r[2] for r in rows if r[0] == name and r[1] == args.workers[0])
        shown = "identical" if same else "DIFFER"
        print(f"| {name} | {n} | {seconds:.1f} | {rate:.0f} | {base / seconds:.2f}x | {shown} |")


if __name__ == "__main__":
    main()
