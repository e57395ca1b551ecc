"""MLM-Filter scoring through both backends: a tiny random-weight LLaVA in-process,
and the same model behind a real OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import user_files
from curate.stages.mllm_score import MllmScore, MllmScoreConfig
from pydantic import ValidationError
from wds_util import png, sample, write_tar

from curate.api import run
from curate.mllm.local import TransformersBackend
from curate.mllm.serve import BackendServer, serve
from curate.mllm.tiny import build_tiny_vlm
from curate.models import resolve
from curate.stage import StageContext

CAPTIONS = [
    "a red box on a table",
    "two dogs playing in the snow",
    "an old map of the city",
    "a blue sky over green hills",
    "a portrait of a woman in a hat",
    "fresh bread on a wooden board",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny", seed=1)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[BackendServer]:
    srv, _ = serve(TransformersBackend(str(model_dir)), model_name="tiny")
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def rows(n: int = 6) -> pa.Table:
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (120, 120, 0), (0, 90, 160), (9, 9, 9)]
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "image": [png(40 + i, 30, colors[i % 6]) for i in range(n)],
            "text": [CAPTIONS[i % 6] for i in range(n)],
        }
    )


def stage(backend: dict[str, Any], tmp: Path | None = None, **kw: Any) -> MllmScore:
    config = MllmScoreConfig.model_validate({"backend": backend, **kw})
    context = StageContext("mlm", 7, state_dir=str(tmp) if tmp else None)
    return MllmScore(config, context)


def test_config_checks_metrics_and_backend() -> None:
    cfg = MllmScoreConfig.model_validate(
        {"backend": {"kind": "transformers", "model": "m"}, "metrics": ["semantic_understanding"]}
    )
    assert cfg.metrics == ["su"]
    with pytest.raises(ValidationError, match="unknown MLM-Filter metric"):
        MllmScoreConfig.model_validate(
            {"backend": {"kind": "transformers", "model": "m"}, "metrics": ["beauty"]}
        )
    with pytest.raises(ValidationError, match="listed twice"):
        MllmScoreConfig.model_validate(
            {"backend": {"kind": "transformers", "model": "m"}, "metrics": ["su", "su"]}
        )
    with pytest.raises(ValidationError):
        MllmScoreConfig.model_validate({"backend": {"kind": "grpc", "model": "m"}})
    assert MllmScore.resources_for(cfg).num_gpus == "auto"
    http = MllmScoreConfig.model_validate(
        {"backend": {"kind": "openai", "base_url": "http://127.0.0.1:1/v1", "model": "x"}}
    )
    assert MllmScore.resources_for(http).num_gpus == 0


def test_in_process_guided_scores_every_row(model_dir: Path) -> None:
    s = stage({"kind": "transformers", "model": str(model_dir)}, guided=True, request_cache=False)
    assert set(s.writes()) == {
        f"mlm_{m}{r}" for m in ("itm", "odf", "ctq", "su") for r in ("", "_raw")
    }
    verdict = s.decide(rows())
    assert verdict.keep.all() and verdict.batch is not None
    out = verdict.batch
    for metric in ("itm", "odf", "ctq", "su"):
        scores = out.column(f"mlm_{metric}").to_pylist()
        raw = out.column(f"mlm_{metric}_raw").to_pylist()
        assert all(0 <= v <= 100 for v in scores)
        assert [int(r) for r in raw] == scores  # the integer is the raw answer's first line
    again = stage(
        {"kind": "transformers", "model": str(model_dir)}, guided=True, request_cache=False
    )
    assert again.decide(rows()).batch == out  # deterministic on CPU


def test_unparseable_answers_are_rejects_with_the_raw_answer(model_dir: Path) -> None:
    """Unconstrained, the random-weight model answers noise: every such row is dropped
    with the metric, the parse failure and the raw answer; no default score."""
    s = stage(
        {"kind": "transformers", "model": str(model_dir)}, metrics=["su"], request_cache=False
    )
    verdict = s.decide(rows())
    assert verdict.batch is not None and verdict.value is not None
    raw = verdict.batch.column("mlm_su_raw").to_pylist()
    reasons = verdict.reason.to_pylist()
    values = verdict.value.to_pylist()
    scores = verdict.batch.column("mlm_su").to_pylist()
    assert not verdict.keep.all()
    for keep, reason, value, answer, score in zip(
        verdict.keep, reasons, values, raw, scores, strict=True
    ):
        if keep:
            assert reason is None and score is not None
        else:
            assert reason in ("mllm_score:su:unparseable", "mllm_score:su:empty")
            assert value == answer[:200] and score is None


def test_missing_caption_or_image() -> None:
    s = stage(
        {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "x"}, request_cache=False
    )
    batch = pa.table({"id": ["a", "b"], "image": [None, png()], "text": ["a cat", " "]})
    verdict = s.decide(batch)
    assert verdict.reason.to_pylist() == ["mllm_score:no_image", "mllm_score:no_caption"]


def test_http_backend_errors_are_rejects_not_crashes() -> None:
    """Nothing listens on the port: after its retries every row is a backend_error."""
    backend = {
        "kind": "openai",
        "base_url": "http://127.0.0.1:9/v1",
        "model": "x",
        "retries": 1,
        "backoff_s": 0.0,
        "timeout_s": 2,
    }
    verdict = stage(backend, metrics=["itm"], request_cache=False).decide(rows(2))
    assert not verdict.keep.any()
    assert set(verdict.reason.to_pylist()) == {"mllm_score:itm:backend_error"}
    assert verdict.value is not None and all(
        v.startswith("http_error") for v in verdict.value.to_pylist()
    )


def test_http_equals_in_process_and_cache_skips_the_server(
    model_dir: Path, server: BackendServer, tmp_path: Path
) -> None:
    http = {"kind": "openai", "base_url": server.base_url, "model": "tiny", "concurrency": 4}
    local = stage(
        {"kind": "transformers", "model": str(model_dir)}, guided=True, request_cache=False
    )
    expected = local.decide(rows()).batch
    first = stage(http, tmp_path, guided=True)
    before = server.served
    got = first.decide(rows()).batch
    assert got == expected
    assert server.served - before == 6 * 4
    # a new actor (or a resumed run) over the same state folder asks nothing again
    second = stage(http, tmp_path, guided=True)
    before = server.served
    assert second.decide(rows()).batch == expected
    assert server.served == before
    assert list((tmp_path / "requests").glob("*.jsonl"))


PIPE = """
name: mlm
seed: 3
sources:
  pairs: {{uri: data/*.tar, format: webdataset, caption: txt}}
stages:
  mlm:
    type: mllm_score
    backend: {{kind: openai, base_url: "{url}", model: tiny, retries: 4, backoff_s: 0.01}}
    metrics: [su, itm]
    guided: true
    request_cache: "{cache}"
  keep:
    type: score_filter
    preset: open_qwen2vl_su
sinks:
  scored: {{input: mlm, format: parquet}}
  out: {{input: keep, format: parquet}}
"""


def read_sink(root: Path) -> pa.Table:
    parts = [pq.read_table(p) for p in sorted(root.glob("*.parquet"))]
    return pa.concat_tables(parts) if parts else pa.table({"id": pa.array([], pa.string())})


def test_pipeline_over_a_flaky_server_and_resume(
    ray_local: None, model_dir: Path, tmp_path: Path
) -> None:
    for shard in range(2):
        members = [
            m
            for i in range(6)
            for m in sample(
                f"s{shard}-{i}", CAPTIONS[(i + shard) % 6], image=png(40 + i, 32 + shard)
            )
        ]
        write_tar(tmp_path / "data" / f"shard-{shard}.tar", members)
    srv, _ = serve(TransformersBackend(str(model_dir)), model_name="tiny", fail_first=1)
    try:
        pipe = tmp_path / "pipe.yaml"
        pipe.write_text(PIPE.format(url=srv.base_url, cache=tmp_path / "requests"))
        manifest = run(str(pipe), str(tmp_path / "out"), overwrite=True).manifest
        stages = {s["name"]: s for s in manifest["stages"]}
        assert stages["mlm"]["rows_in"] == 12 and stages["mlm"]["kept"] == 12
        keep = stages["keep"]
        assert keep["kept"] + keep["dropped"] == 12
        assert srv.rejected == 24 and srv.served == 24  # every first attempt failed, then retried
        scored = read_sink(tmp_path / "out" / "scored")
        assert scored.num_rows == 12
        su = dict(
            zip(scored.column("id").to_pylist(), scored.column("mlm_su").to_pylist(), strict=True)
        )
        assert all(0 <= v <= 100 for v in su.values())
        kept = read_sink(tmp_path / "out" / "out")
        assert sorted(kept.column("id").to_pylist()) == sorted(i for i, v in su.items() if v >= 85)
        # a second run over the same request cache asks the server nothing
        served = srv.served
        run(str(pipe), str(tmp_path / "again"), overwrite=True)
        assert srv.served == served
        assert user_files(tmp_path / "out") == user_files(tmp_path / "again")
        # without request_cache: the run's own _state, which --overwrite keeps
        own = tmp_path / "own.yaml"
        own.write_text(PIPE.replace('    request_cache: "{cache}"\n', "").format(url=srv.base_url))
        run(str(own), str(tmp_path / "own"))
        served = srv.served
        run(str(own), str(tmp_path / "own"), ["stages.keep.min=50"], overwrite=True)
        assert srv.served == served
        assert list((tmp_path / "own" / "_state" / "mlm" / "requests").glob("*.jsonl"))
    finally:
        srv.shutdown()
        srv.server_close()


def test_bundled_mlm_pipeline(ray_local: None, model_dir: Path, tmp_path: Path) -> None:
    """pipelines/image_text_mlm.yaml on the bundled pairs with the tiny in-process model."""
    import shutil

    from conftest import REPO

    data = REPO / "pipelines" / "data" / "demo_image_text"
    shutil.copytree(data, tmp_path / "data" / "demo_image_text")
    shutil.copytree(model_dir, tmp_path / "models" / "tiny-vlm")
    pipe = tmp_path / "image_text_mlm.yaml"
    shutil.copy(REPO / "pipelines" / "image_text_mlm.yaml", pipe)
    manifest = run(str(pipe), str(tmp_path / "out"), overwrite=True).manifest
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["mlm"]["rows_in"] == stages["basic"]["kept"] > 0
    for s in manifest["stages"]:
        assert s["rows_in"] == s["kept"] + s["dropped"], s["name"]
    scored = read_sink(tmp_path / "out" / "scored")
    assert scored.num_rows == stages["mlm"]["kept"]
    assert {"mlm_su", "mlm_itm", "mlm_su_raw"} <= set(scored.column_names)
    models = {(m["stage"], m["role"]): m for m in manifest["models"]}
    assert models["mlm", "backend.model"]["sha256"] == resolve(str(model_dir)).sha256
    expected = sum(v >= 85 for v in scored.column("mlm_su").to_pylist())
    assert stages["keep"]["kept"] == expected
