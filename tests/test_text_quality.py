"""Language ID, the fastText quality classifier (train + score), score and percentile
filters with exact distributed order statistics, and a text-quality pipeline."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from conftest import write_jsonl
from curate.stages.fasttext_stages import FastTextQuality, LangFilter, LangId
from curate.stages.score_filters import PercentileFilter, ScoreFilter
from typer.testing import CliRunner

from curate import quantiles
from curate.api import run
from curate.cli import app
from curate.config.yamlpos import ConfigError
from curate.models import ModelError, resolve
from curate.quality import train as train_mod
from curate.stage import StageContext

CTX = StageContext("t", 0)

SENTENCES = {
    "en": "The committee will publish its report on the state of the river next spring.",
    "de": "Der Ausschuss wird seinen Bericht über den Zustand des Flusses im Frühjahr vorlegen.",
    "fr": "Le comité publiera son rapport sur l'état de la rivière au printemps prochain.",
    "es": "El comité publicará su informe sobre el estado del río la próxima primavera.",
    "ja": "委員会は来年の春に川の状態に関する報告書を発表する予定です。",
    "ru": "Комитет опубликует свой доклад о состоянии реки следующей весной.",
}

WORDS = [
    "river",
    "forest",
    "village",
    "council",
    "summer",
    "library",
    "museum",
    "teacher",
    "garden",
    "history",
    "music",
    "festival",
    "market",
    "harbour",
    "bridge",
    "mountain",
    "valley",
    "school",
    "hospital",
    "station",
    "painting",
]


def prose(rng: random.Random, n: int) -> list[str]:
    """Varied English sentences (fastText fails on a file of identical lines)."""
    out = []
    for _ in range(n):
        a, b, c = rng.sample(WORDS, 3)
        out.append(
            f"The {a} near the {b} was opened to visitors, and the {c} welcomed "
            f"{rng.randint(2, 900)} people who came to see it during the week."
        )
    return out


def junk(rng: random.Random, n: int) -> list[str]:
    """Log lines and code: what a web crawl's worst pages look like."""
    out = []
    for i in range(n):
        if i % 2:
            out.append(
                f"2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} ERROR "
                f"[worker-{rng.randint(1, 64)}] "
                f"timeout=0x{rng.randint(0, 1 << 20):x} retry={rng.randint(0, 9)} /var/lib/x{i}"
            )
        else:
            out.append(
                f"def f{i}(x): return {{'k{rng.randint(0, 99)}': x[{rng.randint(0, 9)}]}} "
                f"if x else None  # {rng.choice(WORDS)}_{i}"
            )
    return out


def test_packaged_language_model_resolves_and_is_fingerprinted() -> None:
    model = resolve("lid.176")
    assert model.bytes == 938_013 and len(model.sha256) == 64
    with pytest.raises(ModelError, match="no such file"):
        resolve("models/missing.bin", "/nonexistent")
    with pytest.raises(ModelError, match="download it"):
        resolve("hf://facebook/fasttext-language-identification")


def test_lang_id_and_filter() -> None:
    stage = LangId(LangId.Config(), CTX)
    stage.setup()
    texts = [*SENTENCES.values(), "", "first line\nsecond line of English text here"]
    out = stage.process_batch(pa.table({"text": texts}))
    langs = out.column("lang").to_pylist()
    assert langs[: len(SENTENCES)] == list(SENTENCES)
    scores = out.column("lang_score").to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    assert langs[-1] == "en"  # newlines are flattened, not an error
    assert langs[-2] is None and scores[-2] == 0  # no words, no language

    fineweb = LangFilter(LangFilter.Config(preset="fineweb"), CTX)
    v = fineweb.decide(out)
    assert v.keep[0] and not v.keep[1:6].any()
    assert v.reason.to_pylist()[1] == "lang_filter:language" and v.value.to_pylist()[1] == "de"
    per_lang = LangFilter(LangFilter.Config(languages=["en", "de"], min_score={"de": 1.01}), CTX)
    v = per_lang.decide(out)
    assert v.keep[0] and v.reason.to_pylist()[1] == "lang_filter:score"


def test_score_filter_bounds_inclusive_and_missing() -> None:
    stage = ScoreFilter(ScoreFilter.Config(column="s", min=0.5, max=0.9), CTX)
    v = stage.decide(pa.table({"s": [0.5, 0.9, 0.49, 0.91, None, float("nan")]}))
    assert list(v.keep) == [True, True, False, False, False, False]
    assert v.reason.to_pylist()[2:] == [
        "score_filter:below_min",
        "score_filter:above_max",
        "score_filter:missing",
        "score_filter:missing",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("quality")
    rng = random.Random(7)
    write_jsonl(root / "good.jsonl", [{"text": t} for t in prose(rng, 300)])
    write_jsonl(root / "bad.jsonl", [{"text": t} for t in junk(rng, 300)])
    spec = root / "train.yaml"
    spec.write_text(
        "name: test_quality\n"
        "output: models/quality.bin\n"
        "positive: {label: hq, sources: [{uri: good.jsonl}]}\n"
        "negative: {label: cc, sources: [{uri: bad.jsonl}]}\n"
        "holdout: 0.2\n"
        "seed: 3\n"
        "params: {epoch: 10, dim: 16, bucket: 20000}\n",
        encoding="utf-8",
    )
    return spec, train_mod.run(str(spec))


def test_train_quality_reports_holdout_and_is_deterministic(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    spec, report = trained
    assert report["train_examples"] == {"cc": 240, "hq": 240}
    assert report["holdout"]["n"] == 120 and report["holdout"]["positives"] == 60
    assert report["holdout"]["precision"] > 0.95 and report["holdout"]["recall"] > 0.95
    assert report["params"]["wordNgrams"] == 2 and report["params"]["dim"] == 16
    saved = json.loads((spec.parent / "models" / "quality.bin.json").read_text())
    assert saved["sha256"] == report["sha256"]
    # same spec, same seed: the same model bytes
    again = tmp_path / "again.yaml"
    text = spec.read_text().replace("output: models/quality.bin", f"output: {tmp_path}/q2.bin")
    again.write_text(
        text.replace("good.jsonl", f"{spec.parent}/good.jsonl").replace(
            "bad.jsonl", f"{spec.parent}/bad.jsonl"
        )
    )
    assert train_mod.run(str(again))["sha256"] == report["sha256"]


def test_train_quality_cli_and_errors(trained: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    spec, _ = trained
    result = CliRunner().invoke(app, ["train-quality", str(spec)])
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "sha256" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\noutput: m.bin\npositive: {label: hq}\nnegative: {label: hq, sources: []}\n"
    )
    with pytest.raises(ConfigError) as err:
        train_mod.load_spec(str(bad))
    rendered = "\n".join(i.render() for i in err.value.issues)
    assert "bad.yaml:3" in rendered and "positive.sources" in rendered


def test_fasttext_quality_scores_good_above_bad(trained: tuple[Path, dict[str, Any]]) -> None:
    spec, _ = trained
    ctx = StageContext("q", 0, base_dir=str(spec.parent))
    stage = FastTextQuality(FastTextQuality.Config(model="models/quality.bin"), ctx)
    stage.setup()
    rng = random.Random(99)
    out = stage.process_batch(pa.table({"text": prose(rng, 20) + junk(rng, 20)}))
    score = out.column("quality_score").to_numpy()
    assert score[:20].min() > score[20:].max()
    wrong = FastTextQuality(FastTextQuality.Config(model="models/quality.bin", label="x"), ctx)
    with pytest.raises(ValueError, match="labels"):
        wrong.setup()


# --------------------------------------------------------------------------------------
# exact order statistics on Ray


@pytest.mark.parametrize("gather", [1 << 17, 3])
def test_order_statistics_are_exact(
    ray_local: None, monkeypatch: pytest.MonkeyPatch, gather: int
) -> None:
    monkeypatch.setattr(quantiles, "GATHER", gather)  # 3: forces refinement rounds
    rng = np.random.default_rng(5)
    n = 5000
    score = np.concatenate(
        [rng.normal(0, 1, n - 700), np.full(500, 0.25), -np.logspace(-300, 300, 200)]
    )
    rng.shuffle(score)
    score[::97] = np.nan
    group = rng.choice(["en", "de", "fr"], size=n)
    table = pa.table({"s": score, "g": group})
    blocks = [ray.put(table.slice(i, 700)) for i in range(0, n, 700)]
    qs = [0.0, 0.1, 0.3, 0.5, 0.9, 1.0]
    stats = quantiles.order_statistics(blocks, "s", "g", qs)
    for g in ("en", "de", "fr"):
        values = np.sort(score[(group == g) & ~np.isnan(score)])
        assert stats[g]["n"] == len(values)
        for q in qs:
            lo, hi = quantiles.rank_pair(q, len(values))
            assert stats[g][str(q)] == {"lo": values[lo], "hi": values[hi]}
    # one value shared by every row: found from its key, nothing gathered
    same = [ray.put(pa.table({"s": np.full(1000, 2.5)})), ray.put(pa.table({}))]
    assert quantiles.order_statistics(same, "s", None, [0.3])[""]["0.3"] == {"lo": 2.5, "hi": 2.5}
    whole = quantiles.order_statistics(blocks, "s", None, [0.5])
    valid = np.sort(score[~np.isnan(score)])
    assert whole[""]["0.5"]["lo"] == valid[len(valid) // 2]


def test_rank_pair_rounding() -> None:
    assert quantiles.rank_pair(0.3, 10) == (3, 2)
    assert quantiles.rank_pair(1 - 0.9, 100) == (10, 9)
    assert quantiles.rank_pair(1.0, 5) == (4, 4)


def test_percentile_filter_config() -> None:
    assert PercentileFilter.Config(column="s", top_fraction=0.1).quantiles()[0] == pytest.approx(
        0.9
    )
    assert PercentileFilter.Config(column="s", rule="medium", fraction=0.5).quantiles() == (
        0.25,
        0.75,
    )
    assert PercentileFilter.Config(column="s", rule="low", fraction=0.5).quantiles() == (None, 0.5)
    with pytest.raises(ValueError, match="exactly one"):
        PercentileFilter.Config(column="s", top_fraction=0.1, bottom_fraction=0.2)


# --------------------------------------------------------------------------------------
# end to end

PIPE = """
name: text_quality_test
seed: 1
sources:
  docs: {{uri: docs.jsonl}}
stages:
  lid: {{type: lang_id}}
  langs: {{type: lang_filter, languages: [en, de], min_score: 0.5}}
  gopher: {{type: gopher_quality, min_words: 10, min_stop_words: null, keep_stats: true}}
  quality: {{type: fasttext_quality, model: {model}}}
  top: {{type: percentile_filter, column: quality_score, by: lang, top_fraction: 0.5}}
  bucket:
    type: percentile_bucket
    column: gopher_mean_word_length
    cuts: [0.5]
    names: [low, high]
sinks:
  out: {{input: bucket}}
execution: {{unit_bytes: 4KiB}}
"""


def test_text_quality_pipeline(
    ray_local: None, trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    spec, report = trained
    rng = random.Random(11)
    docs = [" ".join(prose(rng, 3)) for _ in range(40)]
    docs += [
        SENTENCES["de"] + " " + SENTENCES["de"].replace("Frühjahr", "Herbst") + f" Nummer {i}."
        for i in range(10)
    ]
    docs += [SENTENCES["fr"]] * 5 + ["too short"] * 5
    write_jsonl(tmp_path / "docs.jsonl", [{"id": f"d{i}", "text": t} for i, t in enumerate(docs)])
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(PIPE.format(model=spec.parent / "models" / "quality.bin"))
    manifest = run(str(pipe), str(tmp_path / "out"), overwrite=True).manifest

    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["langs"]["reasons"] == {"lang_filter:language": 5}
    assert stages["gopher"]["reasons"] == {"gopher_quality:min_words": 5}
    top = stages["top"]
    groups = top["summary"]["groups"]
    assert set(groups) == {"en", "de"} and groups["en"]["n"] == 40 and groups["de"]["n"] == 10
    assert groups["en"]["lower_quantile"] == 0.5 and groups["en"]["upper_threshold"] is None
    assert top["kept"] >= 25 and top["reasons"].get("percentile_filter:below", 0) == top["dropped"]
    models = {(m["stage"], m["role"]): m for m in manifest["models"]}
    assert models["quality", "model"]["sha256"] == report["sha256"]
    assert models["lid", "model"]["ref"] == "lid.176"

    kept = pa.concat_tables(
        pq.read_table(p) for p in sorted((tmp_path / "out" / "out").glob("*.parquet"))
    )
    assert kept.num_rows == top["kept"]
    for lang in ("en", "de"):
        rows = kept.filter(pa.compute.equal(kept.column("lang"), lang))
        threshold = groups[lang]["lower_threshold"]
        assert min(rows.column("quality_score").to_pylist()) >= threshold
    buckets = kept.column("bucket").to_pylist()
    assert set(buckets) == {"low", "high"}
    cut = stages["bucket"]["summary"]["groups"][""]["cuts"]["0.5"]
    for b, w in zip(buckets, kept.column("gopher_mean_word_length").to_pylist(), strict=True):
        assert (b == "low") == (w < cut)


# --------------------------------------------------------------------------------------
# perplexity


def test_normalization_like_ccnet() -> None:
    from curate.quality.perplexity import normalize

    got = normalize(pa.array(["Héllo, “World” 1234 — ok…\nSecond LINE\x07", None]))
    assert got.to_pylist() == ['hello, "world" 0000  -  ok...\nsecond line', ""]


def test_train_lm_and_perplexity_stage(tmp_path: Path) -> None:
    import kenlm
    from curate.stages.fasttext_stages import Perplexity

    rng = random.Random(3)
    write_jsonl(tmp_path / "lm.jsonl", [{"text": t} for t in prose(rng, 400)])
    result = CliRunner().invoke(
        app, ["train-lm", str(tmp_path / "lm.jsonl"), "-o", str(tmp_path / "lm.arpa")]
    )
    assert result.exit_code == 0, result.output
    assert "order 3" in result.output
    ctx = StageContext("ppl", 0, base_dir=str(tmp_path))
    stage = Perplexity(Perplexity.Config(model="lm.arpa"), ctx)
    texts = [*prose(rng, 10), *junk(rng, 10), "", "Two lines.\nOf text here."]
    out = stage.process_batch(pa.table({"text": texts}))
    ppl = out.column("perplexity").to_pylist()
    assert max(ppl[:10]) < min(ppl[10:20])
    assert ppl[20] is None  # no words: no perplexity
    # CCNet's formula, by hand: 10 ** (-sum log10 P(line) / sum(len(line) + 1))
    lm = kenlm.Model(str(tmp_path / "lm.arpa"))
    logs = lm.score("two lines.", bos=True, eos=True) + lm.score(
        "of text here.", bos=True, eos=True
    )
    assert ppl[21] == pytest.approx(10 ** (-logs / (2 + 1 + 3 + 1)))


def test_presets_survive_a_round_trip_to_the_workers() -> None:
    """Workers rebuild configs from their JSON dump: a preset must mean the same there."""
    from curate.stages.quality_filters import FineWebQuality

    for cls, fields in (
        (LangFilter, {"preset": "fineweb"}),
        (FineWebQuality, {"preset": "paper"}),
        (FineWebQuality, {"preset": "paper", "char_duplicates_ratio": 0.05}),
    ):
        cfg = cls.Config(**fields)
        again = cls.Config.model_validate(cfg.model_dump(mode="json"))
        assert again == cfg
    assert LangFilter.Config(preset="fineweb").languages == ["en"]
    assert FineWebQuality.Config(preset="paper").char_duplicates_ratio == 0.1
    assert FineWebQuality.Config(preset="paper", new_line_ratio=0.5).new_line_ratio == 0.5


def test_bundled_text_quality_pipeline_validates(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """pipelines/text_quality.yaml runs on fetched data; validate it against stand-ins."""
    from curate.api import check

    spec, _ = trained
    rng = random.Random(5)
    for name in ("en", "multi", "low"):
        rows = [{"text": t, "kind": name, "lang": "de"} for t in prose(rng, 3)]
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    (tmp_path / "en.arpa").write_text("stand-in: only its existence is checked\n")
    overrides = [f"sources.{n}.uri={tmp_path / n}.jsonl" for n in ("en", "multi", "low")]
    overrides += [
        f"stages.quality.model={spec.parent / 'models' / 'quality.bin'}",
        f"stages.ppl.model={tmp_path / 'en.arpa'}",
    ]
    root = Path(__file__).resolve().parents[1]
    plan = check(str(root / "pipelines" / "text_quality.yaml"), overrides)
    assert next(iter(plan.stages)) == "lid" and "top" in plan.stages
