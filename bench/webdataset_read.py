"""Benchmark: read WebDataset tar shards of image-caption pairs, curate vs webdataset.

Both sides read the same tar shards in the same run.  The webdataset library
streams each tar and groups members into samples (raw bytes, nothing decoded);
curate's WebDataset source also checks every member, reads each image's size
from its header, derives a stable id, checksums the shard and builds an Arrow
table with provenance.  Measured, best of ``--repeat``:

* ``webdataset``: a plain ``for sample in wds.WebDataset(urls)`` loop, one process;
* ``curate``: ``read_unit`` over one unit per shard, one process;
* ``curate, Ray Data``: the runner's ``UnitDatasource`` on a local Ray (start-up excluded);
* ``curate, S3``: ``read_unit`` from ``s3://`` served by ``moto_server`` on loopback.

Images are real: PNGs of Open Clip Art (Debian ``openclipart-png``, public domain)
with their titles (the PNG ``tEXt`` chunk ``Title``) as captions; without that
package, the bundled demo tars in pipelines/data/demo_image_text/ are copied instead.

    python bench/webdataset_read.py                   # 8 shards x 1,000 samples
    python bench/webdataset_read.py --shards 16 --samples 2000 --no-ray --no-s3
    python bench/webdataset_read.py --profile         # also cProfile curate on one shard
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import shutil
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from curate.config.model import SourceSpec
from curate.io.files import list_shards, plan_units
from curate.io.readers import read_unit
from curate.io.storage import LOCAL, StorageOptions
from curate.io.webdataset import WEBDATASET_COLUMNS, split_name

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "data"
OUT = ROOT / "bench" / "out"
SHARD_DIR = WORK / "wds"
CLIPART = Path("/usr/share/openclipart/png")
DEMO = ROOT / "pipelines" / "data" / "demo_image_text"
BUCKET = "bench-wds"
MAX_PIXELS = 89_478_485  # curate's default max_image_pixels (Pillow's bomb limit)


# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    """One real image: where its bytes come from, and its caption."""

    title: str
    path: Path | None = None
    payload: bytes | None = None

    def read(self) -> bytes:
        if self.payload is not None:
            return self.payload
        assert self.path is not None
        return self.path.read_bytes()


def readable_size(payload: bytes | Path) -> bool:
    """Whether Pillow reads the image header and the image is under curate's pixel limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = io.BytesIO(payload) if isinstance(payload, bytes) else payload
            with Image.open(source) as img:
                width, height = img.size
    except Exception:
        return False
    return 0 < width * height <= MAX_PIXELS


def clipart_pictures(needed: int) -> list[Picture]:
    """Up to ``needed`` real PNG files (symlinks skipped, sorted), titled from tEXt 'Title'."""
    out: list[Picture] = []
    for path in sorted(CLIPART.rglob("*.png")):
        if path.is_symlink() or not path.is_file() or not readable_size(path):
            continue
        with Image.open(path) as img:
            title = getattr(img, "text", {}).get("Title")
        out.append(Picture(title if title and title.strip() else path.stem, path=path))
        if len(out) == needed:
            break
    return out


def demo_pictures() -> list[Picture]:
    """The bundled demo samples that have a readable PNG and a non-empty caption."""
    out: list[Picture] = []
    for tar_path in sorted(DEMO.glob("shard-*.tar")):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for member in tar:
                handle = tar.extractfile(member) if member.isfile() else None
                if handle is not None:
                    key, ext = split_name(member.name)
                    samples.setdefault(key, {})[ext] = handle.read()
        for members in samples.values():
            png, txt = members.get("png"), members.get("txt")
            if png and txt and readable_size(png):
                out.append(Picture(txt.decode("utf-8"), payload=png))
    return out


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    tar.addfile(info, io.BytesIO(payload))


def build_shards(n_shards: int, per_shard: int) -> tuple[list[Path], str]:
    """Write (or reuse) ``n_shards`` tars of ``per_shard`` samples; return paths and origin."""
    origin = "openclipart" if CLIPART.is_dir() else "demo"
    params = {"origin": origin, "shards": n_shards, "samples": per_shard, "version": 1}
    paths = [SHARD_DIR / f"shard-{s:06d}.tar" for s in range(n_shards)]
    stamp = SHARD_DIR / "PARAMS.json"
    built = stamp.exists() and json.loads(stamp.read_text()) == params
    if built and all(p.exists() for p in paths):
        return paths, origin
    shutil.rmtree(SHARD_DIR, ignore_errors=True)
    SHARD_DIR.mkdir(parents=True)
    total = n_shards * per_shard
    pictures = clipart_pictures(total) if origin == "openclipart" else demo_pictures()
    if not pictures:
        raise SystemExit(f"no readable images found for {origin}")
    n = 0
    for path in paths:
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for _ in range(per_shard):
                picture = pictures[n % len(pictures)]  # reused cyclically if too few
                key = f"s{n:06d}"
                _add(tar, f"{key}.png", picture.read())
                _add(tar, f"{key}.txt", picture.title.encode("utf-8"))
                meta = {"title": picture.title, "n": n}
                _add(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))
                n += 1
    stamp.write_text(json.dumps(params))
    return paths, origin


# --- readers ---------------------------------------------------------------------------


@dataclass
class Result:
    reader: str
    samples: int
    seconds: float
    note: str = ""


def best_of(repeat: int, fn: Callable[[], int]) -> tuple[float, int]:
    """Fastest of ``repeat`` timed calls, and the count the calls returned (all equal)."""
    times, counts = [], set()
    for _ in range(repeat):
        start = time.perf_counter()
        counts.add(fn())
        times.append(time.perf_counter() - start)
    assert len(counts) == 1, counts
    return min(times), counts.pop()


def webdataset_count(urls: list[str]) -> int:
    import webdataset as wds

    n = 0
    touched = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        touched += len(sample["png"]) + len(sample["txt"])
        n += 1
    assert touched > 0
    return n


def curate_spec(uri: str) -> SourceSpec:
    return SourceSpec(uri=uri, format="webdataset")


def curate_count(uri: str, opts: StorageOptions) -> int:
    """List, plan and read every unit (one shard each) in this process; count rows."""
    spec = curate_spec(uri)
    expected = dict(WEBDATASET_COLUMNS)
    units = plan_units("bench", list_shards(spec.uri, ROOT, opts), unit_bytes=1, first_index=0)
    n = 0
    for unit in units:
        table, rejects, _ = read_unit(unit, spec, expected, opts)
        assert rejects.num_rows == 0, rejects.column("reason").to_pylist()[:3]
        n += table.num_rows
    return n


def check_same_samples(urls: list[str], uri: str) -> None:
    """Outside the timings: keys and captions of the first shard agree between readers."""
    import webdataset as wds

    spec = curate_spec(uri)
    unit = plan_units("bench", list_shards(spec.uri, ROOT), 1, 0)[0]
    table, _, _ = read_unit(unit, spec, dict(WEBDATASET_COLUMNS))
    theirs = [
        (s["__key__"], s["txt"].decode("utf-8"), s["png"])
        for s in wds.WebDataset(urls[:1], shardshuffle=False)
    ]
    ours = list(zip(*(table.column(c).to_pylist() for c in ("key", "text", "image")), strict=True))
    assert ours == theirs, "curate and webdataset disagree on the first shard"


def ray_read(uri: str, repeat: int, num_cpus: int) -> tuple[Result, float]:
    """Read every unit through the runner's datasource on a local Ray; start-up apart."""
    import ray
    import ray.data

    from curate.io.layout import Layout
    from curate.runner import UnitDatasource, UnitRead

    start = time.perf_counter()
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        logging_level=logging.WARNING,
    )
    startup = time.perf_counter() - start
    try:
        context = ray.data.DataContext.get_current()
        context.target_max_block_size = None  # as the runner: one block per unit
        context.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "disabled"
        spec = curate_spec(uri)
        layout = Layout(str(OUT / "webdataset_read" / "ray"))

        def count() -> int:
            units = plan_units("bench", list_shards(spec.uri, ROOT), 1, 0)
            expected = dict(WEBDATASET_COLUMNS)
            reads = [UnitRead(u, source_spec=spec, expected=expected) for u in units]
            ds = ray.data.read_datasource(
                UnitDatasource(reads, layout), override_num_blocks=len(reads)
            )
            return int(ds.count()) - len(reads)  # each unit block ends with a trailer row

        seconds, n = best_of(repeat, count)
    finally:
        ray.shutdown()
    return Result(f"curate, Ray Data ({num_cpus} CPUs)", n, seconds), startup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def moto_server(log: Path) -> Iterator[StorageOptions]:
    """An S3 server on loopback (moto), stopped on exit, errors included."""
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    port = free_port()
    exe = ROOT / ".venv" / "bin" / "moto_server"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [str(exe), "-H", "127.0.0.1", "-p", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=dict(os.environ),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"moto_server exited with {proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(url, timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"moto_server did not answer on {url}; see {log}") from None
                time.sleep(0.2)
        yield StorageOptions(endpoint_url=url, region="us-east-1")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def s3_read(paths: list[Path], brace: str, repeat: int) -> Result:
    from curate.io import storage

    with moto_server(OUT / "webdataset_read" / "moto_server.log") as opts:
        storage.client(opts).create_bucket(Bucket=BUCKET)
        for path in paths:
            storage.write_bytes(f"s3://{BUCKET}/wds/{path.name}", path.read_bytes(), opts)
        seconds, n = best_of(repeat, lambda: curate_count(f"s3://{BUCKET}/wds/{brace}", opts))
    return Result("curate, S3 on loopback (1 process)", n, seconds, "moto_server")


def profile_one_shard(uri: str, top: int = 10) -> None:
    spec = curate_spec(uri)
    unit = plan_units("bench", list_shards(spec.uri, ROOT), 1, 0)[0]
    expected = dict(WEBDATASET_COLUMNS)
    read_unit(unit, spec, expected, LOCAL)  # warm the page cache
    profiler = cProfile.Profile()
    profiler.enable()
    read_unit(unit, spec, expected, LOCAL)
    profiler.disable()
    print(f"\ncProfile, curate read_unit on {unit.shards[0].uri}: top {top} by cumulative time")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(top)


# --- main ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--samples", type=int, default=1000, help="samples per shard")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    parser.add_argument("--ray-cpus", type=int, default=2)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data reading")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) reading")
    parser.add_argument("--profile", action="store_true", help="cProfile curate on one shard")
    args = parser.parse_args()

    t0 = time.perf_counter()
    paths, origin = build_shards(args.shards, args.samples)
    size = sum(p.stat().st_size for p in paths)
    brace = f"shard-{{000000..{args.shards - 1:06d}}}.tar"
    local_uri = os.path.relpath(SHARD_DIR, ROOT) + "/" + brace
    urls = [str(p) for p in paths]
    print(
        f"data: {args.shards} shards x {args.samples:,} samples ({origin}), "
        f"{size / 2**20:.0f} MiB, in {SHARD_DIR.relative_to(ROOT)} "
        f"(ready in {time.perf_counter() - t0:.1f} s)"
    )
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"machine: {os.cpu_count()} CPUs ({affinity} usable by this process)")

    check_same_samples(urls, local_uri)
    results: list[Result] = []
    seconds, n = best_of(args.repeat, lambda: webdataset_count(urls))
    results.append(Result("webdataset 1 process", n, seconds))
    seconds, n = best_of(args.repeat, lambda: curate_count(local_uri, LOCAL))
    results.append(Result("curate, local (1 process)", n, seconds))
    startup = None
    if not args.no_ray:
        ray_result, startup = ray_read(local_uri, args.repeat, args.ray_cpus)
        results.append(ray_result)
    if not args.no_s3:
        results.append(s3_read(paths, brace, args.repeat))
    for result in results:
        assert result.samples == results[0].samples, (result.reader, result.samples)

    base = results[0].samples / results[0].seconds
    print(f"\nbest of {args.repeat}; MB/s counts tar bytes ({size / 1e6:.1f} MB per pass)")
    header = (
        f"{'reader':<38} {'samples':>8} {'seconds':>8} {'samples/s':>10} {'MB/s':>8} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        rate = r.samples / r.seconds
        print(
            f"{r.reader:<38} {r.samples:>8,} {r.seconds:>8.3f} {rate:>10,.0f} "
            f"{size / 1e6 / r.seconds:>8.1f} {rate / base:>5.2f}x"
        )
    print("ratio: samples/s over webdataset's (goal for curate, local: >= 0.80x)")
    if startup is not None:
        print(f"Ray start-up (ray.init, excluded above): {startup:.1f} s")
    local = next(r for r in results if r.reader.startswith("curate, local"))
    s3 = next((r for r in results if r.reader.startswith("curate, S3")), None)
    if s3 is not None:
        print(f"curate S3 / local: {local.seconds / s3.seconds:.2f}x samples/s")
    if args.profile:
        profile_one_shard(local_uri)


if __name__ == "__main__":
    main()
