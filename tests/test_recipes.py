"""The published recipes (pipelines/recipes/*.yaml): each validates, names the published
models and thresholds, and runs end to end on the bundled sample data with tiny stand-in
models given by ``--set`` (tiny CLIP and LLaVA with random weights, a fastText classifier
and an ARPA LM trained here).  Runs check the manifest: the stage types in order, rows
that balance stage by stage, the reasons, and what each recipe's deciding stage kept."""

from __future__ import annotations

import gzip
import itertools
import json
import tarfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO, write_jsonl
from test_text_quality import trained  # noqa: F401 - the fastText classifier, a fixture

from curate import clip
from curate.api import check, run
from curate.config.load import load_pipeline
from curate.mllm.tiny import build_tiny_vlm
from curate.quality.perplexity import train_lm
from curate.quantiles import rank_pair

RECIPES = REPO / "pipelines" / "recipes"
DEMO_TEXT = REPO / "pipelines" / "data" / "demo_text"
SHARD = REPO / "pipelines" / "data" / "demo_image_text" / "shard-000000.tar"


def demo_docs(name: str, n: int) -> list[dict[str, Any]]:
    """The first ``n`` documents of a bundled Python-documentation file."""
    with gzip.open(DEMO_TEXT / name, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory,
    trained: tuple[Path, dict[str, Any]],  # noqa: F811 - the fixture imported above
) -> dict[str, Path]:
    """Tiny stand-ins for the published models, built once for the module."""
    root = tmp_path_factory.mktemp("recipe-models")
    spec, _ = trained
    lm = root / "en.arpa"  # "Wikipedia": another bundled file than the one scored
    train_lm((d["text"] for d in demo_docs("docs-0003.jsonl.gz", 300)), lm, order=3)
    return {
        "clip": clip.build_checkpoint("curate-tiny-clip", root / "clip.pt", seed=0),
        "vlm": build_tiny_vlm(root / "vlm", seed=0),
        "quality": spec.parent / "models" / "quality.bin",
        "lm": lm,
        "cache": root / "stage-cache",
    }


@pytest.fixture(scope="module")
def twin_docs(tmp_path_factory: pytest.TempPathFactory) -> str:
    """300 bundled documents and an exact copy of them: every survivor has a twin, so
    the dedup stages have something to remove."""
    root = tmp_path_factory.mktemp("docs")
    docs = demo_docs("docs-0000.jsonl.gz", 300)
    a = write_jsonl(root / "a.jsonl", docs)
    b = write_jsonl(root / "copy.jsonl", docs)
    return f"sources.docs.uri=[{a}, {b}]"


def tiny_clip(models: dict[str, Path], stage: str = "clip", crop: str = "crop") -> list[str]:
    """One bundled shard, scored by the tiny CLIP; the stage cache is shared by the
    module's runs, so a recipe whose scorer chain equals another's reuses its scores."""
    return [
        f"execution.cache_dir={models['cache']}",
        f"sources.pool.uri={SHARD}",
        f"stages.{crop}.preprocess.arch=curate-tiny-clip",
        f"stages.{crop}.preprocess.checkpoint=null",
        f"stages.{stage}.arch=curate-tiny-clip",
        f"stages.{stage}.checkpoint={models['clip']}",
    ]


def stand_ins(name: str, models: dict[str, Path]) -> list[str]:
    """``--set`` overrides that put the tiny models in place of the published ones."""
    return {
        "dclm_baseline": [f"stages.score.model={models['quality']}"],
        "ccnet": [f"stages.ppl.model={models['lm']}"],
        "open_qwen2vl_filter": [f"stages.dfn.checkpoint={models['clip']}"],
        "open_qwen2vl_mix": [f"stages.dfn.checkpoint={models['clip']}"],
        "mmssr_select": [f"stages.score.backend.model={models['vlm']}"],
    }.get(name, [])


def checked(manifest: dict[str, Any], types: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest's stage rows by name, after the checks every recipe shares: the
    stage types in order, each stage fed what the one before kept, rows that balance,
    and one reason counted per dropped row."""
    rows = manifest["stages"]
    assert [r["type"] for r in rows] == ["source", *types]
    for before, row in itertools.pairwise(rows):
        assert row["rows_in"] == before["kept"], row["name"]
    for row in rows:
        assert row["rows_in"] == row["kept"] + row["dropped"], row["name"]
        assert sum(row["reasons"].values()) == row["dropped"], row["name"]
    assert rows[1]["rows_in"] > 0
    return {r["name"]: r for r in rows}


def prefixed(row: dict[str, Any], *prefixes: str) -> None:
    assert all(r.startswith(prefixes) for r in row["reasons"]), row["reasons"]


def parquet(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("*.parquet")))


def webdataset_meta(folder: Path) -> list[dict[str, Any]]:
    out = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    handle = tar.extractfile(member)
                    assert handle is not None
                    out.append(json.loads(handle.read()))
    return out


def top_kept(n: int, fraction: float) -> int:
    """Rows ``percentile_filter`` keeps for ``top_fraction`` of ``n`` distinct scores."""
    return n - rank_pair(1 - fraction, n)[0]


# --------------------------------------------------------------------------------------
# every recipe: validates, is documented, names the published models


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_validates_and_is_documented(
    recipe: Path, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # hub:openai is checked, not fetched, where downloads are allowed
    monkeypatch.setenv("CURATE_ALLOW_DOWNLOADS", "1")
    plan = check(str(recipe), stand_ins(recipe.stem, models))
    assert plan.pipeline.spec.name == recipe.stem
    assert plan.stages and plan.pipeline.spec.sinks
    doc = recipe.with_suffix(".md").read_text(encoding="utf-8")
    assert f"curate run pipelines/recipes/{recipe.name}" in doc and "--set" in doc


def config(recipe: str, stage: str) -> Any:
    return load_pipeline(RECIPES / f"{recipe}.yaml").stages[stage].config


def test_recipes_name_the_published_models_and_thresholds() -> None:
    assert config("fineweb", "language").min_score == 0.65
    assert not config("fineweb", "c4").terminal_punct()
    assert config("fineweb", "dedup").resolved()["bands"] == 14
    score = config("dclm_baseline", "score")
    assert score.model.endswith("openhermes_reddit_eli5_vs_rw_v2_bigram_200k_train.bin")
    assert config("dclm_baseline", "top").top_fraction == 0.1
    assert config("ccnet", "language").min_score == 0.5
    assert config("ccnet", "buckets").cuts == [0.3, 0.6]
    for recipe in ("datacomp_clip", "datacomp_basic_clip"):
        clip_stage = config(recipe, "clip")
        assert (clip_stage.arch, clip_stage.checkpoint) == ("ViT-L-14", "hub:openai")
        assert config(recipe, "top").top_fraction == 0.3
    mlm = config("open_qwen2vl_filter", "mlm")
    assert mlm.backend.model == "weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o"
    assert mlm.metrics == ["su"]
    assert config("open_qwen2vl_filter", "dfn_top").cuts == [0.85]
    su = config("open_qwen2vl_filter", "keep").conditions()[1]
    assert (su.column, su.min) == ("mlm_su", 85.0)


# --------------------------------------------------------------------------------------
# text recipes, on 300 bundled documents twice over


def test_fineweb(ray_local: None, twin_docs: str, tmp_path: Path) -> None:
    recipe = str(RECIPES / "fineweb.yaml")
    manifest = run(recipe, str(tmp_path / "out"), [twin_docs]).manifest
    stages = checked(
        manifest,
        [
            "lang_id",
            "lang_filter",
            "gopher_repetition",
            "gopher_quality",
            "c4_quality",
            "fineweb_quality",
            "minhash_dedup",
        ],
    )
    assert stages["docs"]["kept"] == 600
    for name in ("language", "repetition", "gopher", "c4", "fineweb"):
        prefixed(stages[name], stages[name]["type"] + ":")
    assert stages["gopher"]["dropped"] > 0  # the docs' code samples
    dedup = stages["dedup"]
    assert dedup["summary"]["shingle"] == "word 5-grams"
    assert dedup["summary"]["bands_x_rows"] == "14x8"
    # every survivor came with its twin: at most one of each pair is kept
    assert dedup["rows_in"] % 2 == 0 and 0 < dedup["kept"] <= dedup["rows_in"] // 2
    assert dedup["reasons"] == {"near_duplicate": dedup["dropped"]}
    out = parquet(tmp_path / "out" / "curated")
    assert out.num_rows == dedup["kept"]
    assert set(out.column("lang").to_pylist()) == {"en"}
    assert min(out.column("lang_score").to_pylist()) >= 0.65
    assert min(out.column("cluster_size").to_pylist()) >= 2


def test_dclm_baseline(
    ray_local: None,
    twin_docs: str,
    models: dict[str, Path],
    trained: tuple[Path, dict[str, Any]],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    recipe = RECIPES / "dclm_baseline.yaml"
    overrides = [twin_docs, *stand_ins("dclm_baseline", models)]
    manifest = run(str(recipe), str(tmp_path / "out"), overrides).manifest
    stages = checked(
        manifest,
        [
            "lang_id",
            "lang_filter",
            "gopher_quality",
            "gopher_repetition",
            "exact_dedup",
            "minhash_dedup",
            "fasttext_quality",
            "percentile_filter",
        ],
    )
    prefixed(stages["quality"], "gopher_quality:")
    exact = stages["exact"]
    assert exact["reasons"] == {"exact_duplicate": exact["dropped"]}
    assert exact["rows_in"] % 2 == 0 and exact["kept"] <= exact["rows_in"] // 2
    fuzzy = stages["fuzzy"]["summary"]
    assert (fuzzy["shingle"], fuzzy["keep"], fuzzy["jaccard_threshold"]) == (
        "word 13-grams",
        "first",
        0.8,
    )
    top = stages["top"]
    group = top["summary"]["groups"][""]
    assert group["n"] == top["rows_in"] == stages["score"]["kept"] >= 10
    assert group["lower_quantile"] == pytest.approx(0.9)
    assert top["kept"] == top_kept(top["rows_in"], 0.1)
    assert top["reasons"] == {"percentile_filter:below": top["dropped"]}
    out = parquet(tmp_path / "out" / "curated")
    assert out.num_rows == top["kept"]
    assert min(out.column("quality_score").to_pylist()) >= group["lower_threshold"]
    fingerprints = {(m["stage"], m["role"]): m["sha256"] for m in manifest["models"]}
    assert fingerprints["score", "model"] == trained[1]["sha256"]


def test_ccnet(ray_local: None, twin_docs: str, models: dict[str, Path], tmp_path: Path) -> None:
    recipe = RECIPES / "ccnet.yaml"
    overrides = [twin_docs, *stand_ins("ccnet", models)]
    manifest = run(str(recipe), str(tmp_path / "out"), overrides).manifest
    stages = checked(
        manifest,
        [
            "text_stats",
            "length_filter",
            "exact_dedup",
            "lang_id",
            "lang_filter",
            "perplexity",
            "percentile_bucket",
        ],
    )
    assert stages["length"]["reasons"] == {"too_few_chars": stages["length"]["dropped"]} != {}
    dedup = stages["dedup"]
    assert dedup["kept"] <= dedup["rows_in"] // 2
    assert set(stages["language"]["reasons"]) <= {"lang_filter:score"}  # any language
    groups = stages["buckets"]["summary"]["groups"]
    out = parquet(tmp_path / "out" / "bucketed")
    assert out.num_rows == stages["buckets"]["kept"] == sum(g["n"] for g in groups.values())
    for lang, group in groups.items():
        rows = out.filter(pa.compute.equal(out.column("lang"), lang))
        ppl = rows.column("perplexity").to_pylist()
        buckets = rows.column("bucket").to_pylist()
        n = group["n"]
        assert len(ppl) == n
        head, middle = group["cuts"]["0.3"], group["cuts"]["0.6"]
        for p, b in zip(ppl, buckets, strict=True):
            assert b == ("head" if p < head else "middle" if p < middle else "tail")
        # head: below the 30th percentile, middle: below the 60th (distinct perplexities)
        assert buckets.count("head") == rank_pair(0.3, n)[0]
        assert buckets.count("head") + buckets.count("middle") == rank_pair(0.6, n)[0]
    assert groups["en"]["n"] >= 20


# --------------------------------------------------------------------------------------
# image-text recipes, on one bundled shard (95 pairs)


@pytest.fixture(scope="module")
def datacomp_clip_run(
    ray_local: None, models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("datacomp_clip") / "out"
    recipe = RECIPES / "datacomp_clip.yaml"
    return run(str(recipe), str(out), tiny_clip(models)).manifest, out


def test_datacomp_clip(
    datacomp_clip_run: tuple[dict[str, Any], Path], models: dict[str, Path]
) -> None:
    manifest, out = datacomp_clip_run
    stages = checked(manifest, ["image_filter", "clip_score", "percentile_filter"])
    top = stages["top"]
    assert top["rows_in"] == stages["pool"]["kept"] > 50  # the whole pool is ranked
    assert top["kept"] == top_kept(top["rows_in"], 0.3)
    assert top["reasons"] == {"percentile_filter:below": top["dropped"]}
    threshold = top["summary"]["groups"][""]["lower_threshold"]
    meta = webdataset_meta(out / "curated")
    assert len(meta) == top["kept"]
    assert min(m["clip_score"] for m in meta) >= threshold
    checkpoint = {(m["stage"], m["role"]): m for m in manifest["models"]}["clip", "checkpoint"]
    assert checkpoint["bytes"] == models["clip"].stat().st_size


def test_datacomp_basic_clip(
    ray_local: None,
    datacomp_clip_run: tuple[dict[str, Any], Path],
    models: dict[str, Path],
    tmp_path: Path,
) -> None:
    recipe = RECIPES / "datacomp_basic_clip.yaml"
    manifest = run(str(recipe), str(tmp_path / "out"), tiny_clip(models)).manifest
    stages = checked(manifest, ["image_filter", "clip_score", "percentile_filter", "basic_filter"])
    # the CLIP threshold is the whole pool's (as in datacomp_clip), not the basic
    # filter's survivors': the intersection of two filters each decided on the pool
    alone = {s["name"]: s for s in datacomp_clip_run[0]["stages"]}["top"]
    top = stages["top"]
    assert top["summary"] == alone["summary"] and top["kept"] == alone["kept"]
    basic = stages["basic"]
    assert basic["dropped"] > 0
    prefixed(basic, "basic_filter:")
    meta = webdataset_meta(tmp_path / "out" / "curated")
    assert len(meta) == basic["kept"] > 0
    threshold = top["summary"]["groups"][""]["lower_threshold"]
    assert min(m["clip_score"] for m in meta) >= threshold
    assert all(m["width"] >= 200 and m["height"] >= 200 for m in meta)


def test_open_qwen2vl_filter(ray_local: None, models: dict[str, Path], tmp_path: Path) -> None:
    recipe = RECIPES / "open_qwen2vl_filter.yaml"
    overrides = [
        *tiny_clip(models, stage="dfn"),
        f"stages.mlm.backend={{kind: transformers, model: {models['vlm']}, batch_size: 32}}",
    ]
    manifest = run(str(recipe), str(tmp_path / "out"), overrides).manifest
    stages = checked(
        manifest,
        ["image_filter", "clip_score", "mllm_score", "percentile_bucket", "score_filter"],
    )
    assert stages["mlm"]["dropped"] == 0  # guided answers always parse
    scored = parquet(tmp_path / "out" / "scored")
    n = scored.num_rows
    assert n == stages["dfn_top"]["kept"] == stages["pool"]["kept"]
    buckets = scored.column("dfn_bucket").to_pylist()
    su = scored.column("mlm_su").to_pylist()
    assert buckets.count("top") == top_kept(n, 0.15)
    # kept: in the DFN top 15 % OR SU >= 85; dropped: failed both
    union = sum(b == "top" or s >= 85 for b, s in zip(buckets, su, strict=True))
    keep = stages["keep"]
    assert keep["kept"] == union >= buckets.count("top")
    assert keep["reasons"] == {
        "score_filter:any:dfn_bucket.not_in+mlm_su.below_min": keep["dropped"]
    }
    assert len(webdataset_meta(tmp_path / "out" / "curated")) == keep["kept"]


def test_open_qwen2vl_mix(ray_local: None, models: dict[str, Path], tmp_path: Path) -> None:
    recipe = RECIPES / "open_qwen2vl_mix.yaml"
    overrides = [
        *tiny_clip(models, stage="dfn"),
        f"sources.ccs.uri={SHARD.with_name('shard-000001.tar')}",
        f"stages.mlm.backend={{kind: transformers, model: {models['vlm']}, batch_size: 32}}",
        "stages.mixture.rows=100",
    ]
    manifest = run(str(recipe), str(tmp_path / "out"), overrides).manifest
    rows = {r["name"]: r for r in manifest["stages"]}
    mix = rows["mixture"]
    assert mix["rows_in"] == rows["ccs"]["kept"] + rows["datacomp"]["kept"]
    comps = mix["summary"]["components"]
    # rows: 100 at 8.5 : 19.9, one epoch each: ccs sampled to its share, the filtered
    # pool (its top 15 %, the tiny model's SU never reaches 85) taken whole, short
    ccs, datacomp = comps["ccs"], comps["datacomp"]
    assert ccs["rows"] == round(100 * 8.5 / 28.4) and ccs["unmet"] is None
    assert datacomp["rows"] == datacomp["available_rows"] == rows["datacomp"]["kept"]
    assert datacomp["unmet"].startswith("needs ") and datacomp["repetition"] == 1.0
    meta = webdataset_meta(tmp_path / "out" / "pretrain")
    assert len(meta) == mix["rows_out"] == ccs["rows"] + datacomp["rows"]
    assert {m["mix_component"] for m in meta} == {"ccs", "datacomp"}
