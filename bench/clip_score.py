"""Benchmark: CLIP scoring of image-caption pairs, curate's ``clip_score`` against a plain loop.

Both contestants score the same WebDataset tars (real Open Clip Art PNGs with their
titles as captions) with the same randomly initialized open_clip model, in the same
run, and must agree on every pair's score:

``plain``
    the loop a user writes in one process: for each tar, read the members with
    ``tarfile``, ``preprocess(to_rgb(Image.open(...)))`` with the transform from
    ``open_clip.create_model_and_transforms``, tokenize the captions, then
    ``encode_image`` / ``encode_text`` (``normalize=True``) in batches under
    ``torch.inference_mode()`` and take the cosine.  Torch uses every core.  Each
    batch size of ``--batch-sizes`` is one full pass (model loading included); the
    best is reported, as a user tuning the loop would.
``curate``
    ``curate.api.run`` on a pipeline written here: WebDataset source ->
    ``image_filter`` (``decode: full``, ``preprocess: {arch}``: decode and crop in
    CPU actors ahead of the scorer) -> ``clip_score`` -> Parquet sink (key, image
    size and score), on an embedded local Ray with every core, one unit per tar,
    with the stages' default resources and batch sizes (``clip_score`` is cached
    by default: its output, images included, goes to the stage cache, then a
    second pass writes the sink; ``--no-cache`` turns that off).  The time is the
    whole ``run`` call: Ray start-up, actors, model loading, the stage cache and
    lineage included; each run starts a fresh Ray and an empty output.  The manifest's
    run time (Ray start-up excluded) and per-stage busy seconds (the workers' time
    summed over units) are reported beside it.
``curate, inline``
    the same without ``image_filter``: ``clip_score`` decodes and crops itself.
``curate, fused`` (``--variants``, CPU only)
    as ``curate`` with ``resources: {num_gpus: 0}`` on ``clip_score``: with the same
    resources as ``image_filter`` the two stages fuse into one pool of actors, where
    by default (``num_gpus: auto``) each gets its own pool (on 2 CPUs: one actor each).

Each Ray actor takes ``num_cpus: 1`` and Ray sets ``OMP_NUM_THREADS=1`` in it, so
torch there uses one thread per actor, where the plain loop uses every core.

Agreement: the largest difference between the two scores of a key must stay
within 1e-5 (fp32): curate's crops are open_clip's transform of ``to_rgb(img)``, bit
for bit, except for images longer than ``curate.clip.WINDOW_ASPECT`` (4:1), which
curate first cuts to a centred 4:1 window (a guard against huge intermediates):
those are reported apart, with how many scored differently and by how much.  A
key scored by one side only fails the check too.

Steady state: for plain, the loop without the model load; for curate, the slowest
actor pool's busy seconds (the manifest's per-stage seconds, summed over units)
divided by its actors (the pool sizes follow ``curate.runner._ray_args``).  The
difference to the whole run is start-up: ``ray.init``, actors importing torch and
loading the model, the stage cache's second pass to the sink.

Models: ``curate-tiny-clip`` (shipped with curate, 64 px) and ``ViT-B-32``
(open_clip's real architecture), random weights from ``curate.clip.build_checkpoint``
(random weights give honest speed), cached in bench/data/clip/models/.

Data: a deterministic sample of the titled PNGs of Debian's ``openclipart-png``
(public domain), chosen with ``pipelines/data/make_demo_image_text.py``'s
catalogue; images over curate's pixel limit (Pillow's bomb limit) are left out.
Without that package the bundled demo tars are replicated under distinct keys.

    python bench/clip_score.py                                # both archs, CPU
    python bench/clip_score.py --arch curate-tiny-clip --pairs 2000
    python bench/clip_score.py --arch ViT-B-32 --pairs 500 --batch-sizes 32,64
    python bench/clip_score.py --variants preprocess,inline,fused
    python bench/clip_score.py --repeat 2 --no-cache --json bench/out/clip_nocache.json
    python bench/clip_score.py --device cuda --pairs 20000 --shards 40   # on a GPU machine
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import sys
import tarfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from curate import clip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines" / "data"))

import make_demo_image_text as demo

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "data" / "clip"
MODELS = WORK / "models"
OUT = ROOT / "bench" / "out"
RUNS = OUT / "clip_score"
DEMO = ROOT / "pipelines" / "data" / "demo_image_text"
MAX_PIXELS = 89_478_485  # curate's default max_image_pixels (Pillow's bomb limit)
SEED = 20261124
ARCHS = ("curate-tiny-clip", "ViT-B-32")
#: Pairs per arch when --pairs does not say (sized for a few minutes on 2 CPU cores).
DEFAULT_PAIRS = {"cpu": {"curate-tiny-clip": 2000, "ViT-B-32": 500}, "cuda": {}}
FALLBACK_PAIRS = {"cpu": 1000, "cuda": 20_000}
VARIANTS = ("preprocess", "inline", "fused")

# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    key: str
    caption: str
    image: Path | bytes
    meta: dict[str, Any]

    def payload(self) -> bytes:
        return self.image if isinstance(self.image, bytes) else self.image.read_bytes()


def clipart_pairs(n: int) -> list[Pair]:
    """``n`` titled Open Clip Art PNGs under the pixel limit (a seeded sample, reused
    cyclically under new keys if there are fewer)."""
    pool = [
        c for c in demo.catalogue() if c.title is not None and 0 < c.width * c.height <= MAX_PIXELS
    ]
    chosen = sorted(random.Random(SEED).sample(pool, min(n, len(pool))), key=lambda c: c.index)
    out = []
    for i in range(n):
        c = chosen[i % len(chosen)]
        key = c.key if i < len(chosen) else f"{c.key}-r{i // len(chosen)}"
        meta = {"category": c.rel.split("/")[0], "keywords": demo.keywords(c.rel)}
        assert c.title is not None
        out.append(Pair(key, c.title, demo.SOURCE / c.rel, meta))
    return out


def demo_pairs(n: int) -> list[Pair]:
    """The bundled demo samples with an image and a caption, replicated to ``n``."""
    base: list[tuple[str, bytes]] = []
    for tar_path in sorted(DEMO.glob("shard-*.tar")):
        for members in tar_samples(tar_path).values():
            png, txt = members.get("png"), members.get("txt")
            if png and txt and txt.strip() and decodes(png):
                base.append((txt.decode("utf-8"), png))
    if not base:
        raise SystemExit(f"no usable samples in {DEMO}")
    return [Pair(f"demo-{i:06d}", *base[i % len(base)], meta={}) for i in range(n)]


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """A WebDataset tar's members grouped by sample key: ``{key: {ext: bytes}}``."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is not None:
                key, _, ext = member.name.partition(".")
                samples[key][ext] = handle.read()
    return samples


def decodes(png: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(png)) as img:
            img.load()
    except Exception:
        return False
    return True


def build_shards(n: int, n_shards: int) -> tuple[list[Path], str]:
    """Write (or reuse) ``n`` pairs in ``n_shards`` tars; return their paths and origin."""
    origin = "openclipart" if demo.SOURCE.is_dir() else "demo-replicated"
    folder = WORK / f"pairs-{n}-{n_shards}"
    params = {"origin": origin, "pairs": n, "shards": n_shards, "seed": SEED, "version": 1}
    paths = [folder / f"shard-{s:06d}.tar" for s in range(n_shards)]
    stamp = folder / "PARAMS.json"
    built = stamp.exists() and json.loads(stamp.read_text()) == params
    if built and all(p.exists() for p in paths):
        return paths, origin
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    pairs = clipart_pairs(n) if origin == "openclipart" else demo_pairs(n)
    per = -(-n // n_shards)
    for s, path in enumerate(paths):
        members: list[tuple[str, bytes]] = []
        for pair in pairs[s * per : (s + 1) * per]:
            meta = json.dumps({"title": pair.caption, **pair.meta}, ensure_ascii=False)
            members.append((f"{pair.key}.json", meta.encode()))
            members.append((f"{pair.key}.png", pair.payload()))
            members.append((f"{pair.key}.txt", pair.caption.encode()))
        demo.write_shard(path, members)
    stamp.write_text(json.dumps(params))
    return paths, origin


def checkpoint(arch: str) -> Path:
    path = MODELS / f"{arch}-seed0.pt"
    if not path.exists():
        clip.build_checkpoint(arch, path, seed=0)
    return path


# --- contestants ---------------------------------------------------------------------


@dataclass
class Result:
    contestant: str
    pairs: int
    seconds: float
    scores: dict[str, float] = field(repr=False)
    detail: dict[str, Any] = field(default_factory=dict)
    #: curate only: each key's image (width, height)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)


def plain_pass(
    shards: list[Path], arch: str, ckpt: Path, batch: int, device: str, precision: str
) -> Result:
    """One pass of the plain loop; the time includes creating the model."""
    import open_clip
    import torch

    start = time.perf_counter()
    clip.register(arch)  # makes curate-tiny-clip known to open_clip; nothing for ViT-B-32
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(ckpt), device=device, precision=precision
    )
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    loaded = time.perf_counter() - start
    scores: dict[str, float] = {}
    keys: list[str] = []
    images: list[Any] = []
    captions: list[str] = []

    def flush() -> None:
        with torch.inference_mode():
            pixels = torch.stack(images).to(device, dtype)
            image = model.encode_image(pixels, normalize=True)
            text = model.encode_text(tokenizer(captions).to(device), normalize=True)
            cosine = (image.float() * text.float()).sum(dim=-1).cpu().tolist()
        scores.update(zip(keys, cosine, strict=True))
        keys.clear()
        images.clear()
        captions.clear()

    for path in shards:
        for key, members in tar_samples(path).items():
            png, txt = members.get("png"), members.get("txt")
            if not png or not txt or not txt.strip():
                continue
            with Image.open(io.BytesIO(png)) as img:
                images.append(preprocess(clip.to_rgb(img)))
            captions.append(txt.decode("utf-8"))
            keys.append(key)
            if len(keys) == batch:
                flush()
    if keys:
        flush()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    detail = {
        "batch_size": batch,
        "model_load_s": round(loaded, 3),
        "steady_s": round(seconds - loaded, 3),
    }
    detail["torch_threads"] = torch.get_num_threads()
    return Result("plain", len(scores), seconds, scores, detail)


PIPELINE = """\
name: bench_clip_score_{variant}
sources:
  pairs:
    uri: {uri}
    format: webdataset
    caption: txt
stages:
{crop}  clip:
    type: clip_score
    input: {clip_input}
    arch: {arch}
    checkpoint: {checkpoint}
    precision: {precision}
{clip_extra}sinks:
  scored: {{input: clip, format: parquet, columns: [key, width, height, clip_score]}}
execution: {{unit_bytes: 1B}}  # one unit per tar: units are what actors share out
"""

CROP = """\
  crop:
    type: image_filter
    input: pairs
    decode: full
    preprocess: {{arch: {arch}}}
"""


def pipeline_yaml(
    variant: str,
    shards: list[Path],
    arch: str,
    ckpt: Path,
    device: str,
    precision: str,
    cache: bool = True,
) -> Path:
    folder = shards[0].parent
    uri = f"{folder}/shard-{{000000..{len(shards) - 1:06d}}}.tar"
    clip_extra = "" if cache else "    cache: false\n"
    if device == "cpu":
        clip_extra += "    device: cpu\n"
        import torch

        # ``fused``: num_gpus 0 (not ``auto``) gives clip_score image_filter's resources,
        # so the two run fused in one pool of actors; on a GPU machine it also keeps the
        # actors off the GPU
        if variant == "fused" or torch.cuda.is_available():
            clip_extra += "    resources: {num_gpus: 0}\n"
    crop = variant in ("preprocess", "fused")
    text = PIPELINE.format(
        variant=variant,
        uri=uri,
        crop=CROP.format(arch=arch) if crop else "",
        clip_input="crop" if crop else "pairs",
        arch=arch,
        checkpoint=ckpt,
        precision=precision,
        clip_extra=clip_extra,
    )
    path = RUNS / f"{arch}-{variant}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def quiet_ray() -> None:
    """Ray Data's progress reports off (they go to the log, not the table)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def curate_run(
    variant: str,
    shards: list[Path],
    arch: str,
    ckpt: Path,
    device: str,
    precision: str,
    cache: bool = True,
) -> Result:
    """One ``curate.api.run`` on a fresh output folder and a fresh embedded Ray."""
    import ray

    from curate import api

    path = pipeline_yaml(variant, shards, arch, ckpt, device, precision, cache)
    pools = pool_sizes(api.check(str(path)), len(shards), device)
    out = RUNS / f"{arch}-{variant}"
    shutil.rmtree(out, ignore_errors=True)  # no stage cache from an earlier run
    if ray.is_initialized():
        ray.shutdown()
    start = time.perf_counter()
    result = api.run(str(path), str(out), num_cpus=os.cpu_count(), overwrite=True)
    seconds = time.perf_counter() - start
    ray.shutdown()
    manifest = result.manifest
    columns = ["key", "width", "height", "clip_score"]
    table = pq.read_table(sorted((out / "scored").glob("*.parquet")), columns=columns)
    key, width, height, score = (table.column(c).to_pylist() for c in columns)
    run = manifest["run"]
    busy: dict[str, float] = run["stage_seconds"]
    pool_s = {"+".join(g): sum(busy.get(s, 0.0) for s in g) / n for g, n in pools}
    detail = {
        "run_s": run["seconds"],
        "startup_s": round(seconds - run["seconds"], 3),
        "stage_busy_s": busy,
        "pools": {"+".join(g): n for g, n in pools},
        "steady_s": round(max(pool_s.values()), 3),
        "cluster": run["cluster"],
        "dropped": {s["name"]: s["reasons"] for s in manifest["stages"] if s["dropped"]},
        "pipeline": str(path.relative_to(ROOT)),
    }
    name = "curate" if variant == "preprocess" else f"curate, {variant}"
    scores = dict(zip(key, score, strict=True))
    sizes = {k: (w, h) for k, w, h in zip(key, width, height, strict=True)}
    return Result(name, len(scores), seconds, scores, detail, sizes)


def pool_sizes(plan: Any, n_units: int, device: str) -> list[tuple[tuple[str, ...], int]]:
    """Each fused group of stages (its first group with the source read fused in) and
    the most actors curate gives it: the rule of ``curate.runner._ray_args``."""
    cpus = float(os.cpu_count() or 1)
    gpus_total = 0.0
    if device == "cuda":
        import torch

        gpus_total = float(torch.cuda.device_count())
    out = []
    for segment in plan.segments:
        for i, group in enumerate(segment.groups):
            res = plan.pipeline.stages[group[0]].resources
            if isinstance(res.concurrency, int):
                size = res.concurrency
            elif res.concurrency is not None:
                size = res.concurrency[1]
            else:
                size = max(1, int(cpus / max(res.num_cpus, 0.01) / len(segment.groups)))
                gpus = res.gpus(gpus_total)
                if gpus:
                    size = min(size, max(1, int(gpus_total / gpus)))
                size = max(1, min(size, n_units))
            sources = tuple(n for n in segment.inputs if n in plan.pipeline.spec.sources)
            out.append(((*sources, *group) if i == 0 else group, size))
    return out


def agreement(
    plain: dict[str, float], curate: dict[str, float], sizes: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    """Score differences per key; images beyond ``curate.clip.WINDOW_ASPECT`` apart
    (curate cuts them to a centred window before open_clip's resize and crop)."""
    common = plain.keys() & curate.keys()
    diffs = {k: abs(plain[k] - curate[k]) for k in common}

    def beyond(key: str) -> bool:
        w, h = sizes[key]
        return max(w, h) > clip.WINDOW_ASPECT * min(w, h)

    inside = [d for k, d in diffs.items() if not beyond(k)]
    outside = {k: d for k, d in diffs.items() if beyond(k)}
    return {
        "common": len(common),
        "only_plain": len(plain.keys() - curate.keys()),
        "only_curate": len(curate.keys() - plain.keys()),
        "max_abs_diff": max(diffs.values(), default=float("nan")),
        "worst_key": max(diffs, key=lambda k: diffs[k]) if diffs else None,
        "max_abs_diff_within_window": max(inside, default=float("nan")),
        "beyond_window": len(outside),
        "beyond_window_differing": sum(d > 1e-5 for d in outside.values()),
        "max_abs_diff_beyond_window": max(outside.values(), default=0.0),
    }


# --- main ----------------------------------------------------------------------------


def parse_pairs(values: list[str], device: str) -> Callable[[str], int]:
    """``--pairs 2000`` (every arch) and ``--pairs ViT-B-32=500`` (one arch)."""
    every: int | None = None
    per: dict[str, int] = {}
    for value in values:
        arch, sep, count = value.rpartition("=")
        if sep:
            per[arch] = int(count)
        else:
            every = int(count)

    def pairs(arch: str) -> int:
        if arch in per:
            return per[arch]
        if every is not None:
            return every
        return DEFAULT_PAIRS[device].get(arch, FALLBACK_PAIRS[device])

    return pairs


@dataclass
class ArchRun:
    """Every contestant on one arch's data."""

    arch: str
    info: dict[str, Any]
    results: list[Result]
    agree: dict[str, dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        plain = self.results[0]
        return {
            **self.info,
            "contestants": [
                {
                    **{k: v for k, v in asdict(r).items() if k not in ("scores", "sizes")},
                    "pairs_per_s": r.pairs / r.seconds,
                    "ratio_vs_plain": plain.seconds / r.seconds,
                    "agreement": self.agree.get(r.contestant),
                }
                for r in self.results
            ],
        }


def bench_arch(arch: str, n: int, args: argparse.Namespace, variants: list[str]) -> ArchRun:
    t0 = time.perf_counter()
    shards, origin = build_shards(n, args.shards)
    ckpt = checkpoint(arch)
    size = sum(p.stat().st_size for p in shards)
    print(
        f"\n{arch}: {n:,} pairs ({origin}) in {len(shards)} tars, {size / 2**20:.1f} MiB, "
        f"{shards[0].parent.relative_to(ROOT)}; checkpoint {ckpt.relative_to(ROOT)} "
        f"(ready in {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    if origin != "openclipart":
        print("  NOTE: openclipart-png is not installed: the demo tars are replicated")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    best: dict[str, Result] = {}
    times: dict[str, list[float]] = defaultdict(list)

    def keep(result: Result, label: str) -> None:
        times[label].append(round(result.seconds, 3))
        if result.contestant not in best or result.seconds < best[result.contestant].seconds:
            best[result.contestant] = result
        run_s = f" (run {result.detail['run_s']:.1f} s)" if "run_s" in result.detail else ""
        print(f"  {label}: {result.seconds:.1f} s{run_s}", flush=True)

    # the repeats interleave the contestants, so that a busy spell hits all of them
    for _ in range(args.repeat):
        for batch in batches:
            keep(
                plain_pass(shards, arch, ckpt, batch, args.device, args.precision), f"plain {batch}"
            )
        for variant in variants:
            result = curate_run(
                variant, shards, arch, ckpt, args.device, args.precision, not args.no_cache
            )
            keep(result, result.contestant)
    plain = best["plain"]
    plain.detail["seconds_by_batch_size"] = {b: times[f"plain {b}"] for b in batches}
    results = list(best.values())
    for result in results[1:]:
        result.detail["seconds_all"] = times[result.contestant]
    agree = {r.contestant: agreement(plain.scores, r.scores, r.sizes) for r in results[1:]}
    info = {"pairs": n, "origin": origin, "shards": len(shards), "bytes": size}
    return ArchRun(arch, info, results, agree)


def print_table(run: ArchRun, args: argparse.Namespace, tolerance: float) -> list[str]:
    """Print one arch's table; return its disagreements."""
    plain = run.results[0]
    print(
        f"\n{run.arch}: {run.info['pairs']:,} pairs ({run.info['origin']}), {args.precision}, "
        f"device {args.device}; plain: batch {plain.detail['batch_size']} is the fastest "
        f"(seconds by batch size: {plain.detail['seconds_by_batch_size']})"
    )
    header = (
        f"{'contestant':<16} {'pairs':>6} {'seconds':>8} {'pairs/s':>8} {'ratio':>6}  "
        f"{'steady s':>8} {'pairs/s':>8} {'ratio':>6}  {'max |diff|':>10}"
    )
    print(header)
    print("-" * len(header))
    failures, notes = [], []
    for r in run.results:
        a = run.agree.get(r.contestant)
        diff = f"{a['max_abs_diff_within_window']:.1e}" if a else ""
        steady = r.detail["steady_s"]
        print(
            f"{r.contestant:<16} {r.pairs:>6,} {r.seconds:>8.1f} {r.pairs / r.seconds:>8.1f} "
            f"{plain.seconds / r.seconds:>5.2f}x  {steady:>8.1f} {r.pairs / steady:>8.1f} "
            f"{plain.detail['steady_s'] / steady:>5.2f}x  {diff:>10}"
        )
        if a is None:
            notes.append(f"{r.contestant}: model load {r.detail['model_load_s']:.1f} s")
            continue
        if a["only_plain"] or a["only_curate"] or not a["max_abs_diff_within_window"] <= tolerance:
            failures.append(f"{run.arch} {r.contestant}: {a}")
        busy = ", ".join(f"{k} {v:.1f}" for k, v in r.detail["stage_busy_s"].items())
        pools = ", ".join(f"{k} x{v}" for k, v in r.detail["pools"].items())
        notes.append(
            f"{r.contestant}: api.run {r.seconds:.1f} s = start-up {r.detail['startup_s']:.1f} s "
            f"+ run {r.detail['run_s']:.1f} s; busy s: {busy}; actor pools: {pools}"
        )
        if a["beyond_window"]:
            notes.append(
                f"{'':<{len(r.contestant)}}  images beyond {clip.WINDOW_ASPECT:g}:1: "
                f"{a['beyond_window']}, {a['beyond_window_differing']} scored differently "
                f"(max |diff| {a['max_abs_diff_beyond_window']:.1e}, {a['worst_key']})"
            )
        if r.detail.get("dropped"):
            notes.append(f"{'':<{len(r.contestant)}}  dropped: {r.detail['dropped']}")
    print("\n".join(notes))
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--arch", action="append", help=f"repeatable; default {', '.join(ARCHS)}")
    parser.add_argument(
        "--pairs",
        action="append",
        default=[],
        help="pairs of data: N for every arch, or ARCH=N (repeatable); "
        "default on cpu: curate-tiny-clip=2000, ViT-B-32=500",
    )
    parser.add_argument("--shards", type=int, default=10, help="tars the pairs are split into")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="both contestants (open_clip's precision=)",
    )
    parser.add_argument("--batch-sizes", default="32,64,128", help="tried by the plain loop")
    parser.add_argument(
        "--variants",
        default="preprocess,inline",
        help=f"curate variants to run, of {', '.join(VARIANTS)} (fused: CPU only)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="best of this many runs of every contestant"
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="clip_score with cache: false (by default it is cached: its output, images "
        "included, goes to the stage cache and a second pass writes the sink)",
    )
    parser.add_argument("--json", default=str(OUT / "clip_score.json"), help="results file")
    parser.add_argument("--verbose", action="store_true", help="keep Ray Data's progress logs")
    args = parser.parse_args()
    if not args.verbose:
        quiet_ray()
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    pairs_of = parse_pairs(args.pairs, device)
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(set(variants) - set(VARIANTS))}")
    if device == "cuda" and "fused" in variants:
        parser.error("the fused variant runs clip_score on the CPU: not with --device cuda")
    tolerance = 1e-5 if args.precision == "fp32" else 2e-2

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    machine: dict[str, Any] = {"cpus": os.cpu_count(), "usable_cpus": affinity}
    if device == "cuda":
        import torch

        machine["gpu"] = torch.cuda.get_device_name(0)
    machine["load_before"] = os.getloadavg()
    print(
        f"machine: {os.cpu_count()} CPUs ({affinity} usable), device {args.device}; "
        f"load average {machine['load_before'][0]:.2f}"
    )
    if machine["load_before"][0] > 0.5 * (os.cpu_count() or 1):
        print("  WARNING: the machine is busy; the timings will be noisy (see --repeat)")

    runs = [bench_arch(arch, pairs_of(arch), args, variants) for arch in args.arch or ARCHS]
    machine["load_after"] = os.getloadavg()
    failures = [f for run in runs for f in print_table(run, args, tolerance)]
    print(
        "\nratio: plain's seconds / the contestant's (>1: faster than plain).  seconds: whole "
        "runs (plain: model load + loop;\ncurate: api.run with Ray start-up, actors, model "
        "loads, stage cache, sink).  steady s: plain's loop without the model load;\ncurate's "
        "slowest actor pool: its stages' busy seconds (the manifest's, summed over units) over "
        "its actors.\nmax |diff|: largest score difference of a pair (images up to "
        f"{clip.WINDOW_ASPECT:g}:1; curate crops longer ones from a centred window)"
    )
    report = {
        "machine": machine,
        "command": sys.argv[1:],
        "stage_cache": not args.no_cache,
        "device": args.device,
        "precision": args.precision,
        "tolerance": tolerance,
        "results": {run.arch: run.to_json() for run in runs},
        "disagreements": failures,
    }
    target = Path(args.json).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {os.path.relpath(target, ROOT)}")
    if failures:
        print(f"DISAGREEMENT (tolerance {tolerance:g}):\n  " + "\n  ".join(failures))
        raise SystemExit(1)


if __name__ == "__main__":
    main()
