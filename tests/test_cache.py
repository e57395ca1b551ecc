"""Stage cache: an unchanged stage chain reuses its committed output instead of recomputing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import user_files, write_jsonl

from curate.api import run

pytestmark = pytest.mark.usefixtures("ray_local")

PLUGIN = '''\
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from curate.registry import register_stage
from curate.stage import Annotator, StageConfig


class ScoreConfig(StageConfig):
    scale: float = 1.0
    log: str


@register_stage("counting_score")
class CountingScore(Annotator):
    """An 'expensive scorer': score = characters x scale; logs every call."""

    Config: ClassVar[type[StageConfig]] = ScoreConfig

    def writes(self):
        return {"score": pa.float64()}

    def process_batch(self, batch):
        with open(self.config.log, "a") as log:
            log.write(f"{batch.num_rows}\\n")
        score = pc.multiply(pc.cast(pc.utf8_length(batch.column("text")), pa.float64()),
                            self.config.scale)
        return batch.append_column("score", score)
'''

PIPELINE = """\
name: cached
seed: 2
plugins: [cache_plugin]
sources:
  docs: {{uri: "data/*.jsonl"}}
stages:
  score: {{type: counting_score, input: docs, cache: true, log: "{log}"}}
  stats: {{type: text_stats, input: score}}
  keep: {{type: length_filter, input: stats, min_words: 2}}
sinks:
  out: {{input: keep, shard_bytes: 1KiB}}
execution:
  unit_bytes: 1B
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "cache_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    for s in range(3):
        rows: list[Any] = [{"text": "w " * ((s * 5 + i) % 8) + f"doc{s}-{i}"} for i in range(9)]
        if s == 2:
            rows.append("{bad json")
        write_jsonl(tmp_path / "data" / f"part-{s}.jsonl", rows)
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.format(log=tmp_path / "calls.log"))
    return path


def calls(tmp_path: Path) -> int:
    log = tmp_path / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_threshold_change_downstream_reuses_the_cached_scorer(
    project: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = run(str(project), str(out))
    assert calls(tmp_path) == 3  # one call per unit
    assert first.manifest["run"]["cache"]["stages"]["score"]["reused"] is False

    changed = ["stages.keep.min_words=4"]
    second = run(str(project), str(out), changed, overwrite=True)
    assert calls(tmp_path) == 3  # the scorer did not run again
    assert second.manifest["run"]["cache"]["stages"]["score"]["reused"] is True
    stages = {s["name"]: s for s in second.manifest["stages"]}
    assert stages["docs"]["reasons"] == {"invalid_json": 1}  # the source's counts came along
    assert (out / "rejects" / "docs" / "unit-000002.parquet").exists()  # and its rejects

    fresh = tmp_path / "fresh"
    run(str(project), str(fresh), changed)
    assert calls(tmp_path) == 6  # a new output folder has no cache: computed again
    assert user_files(out) == user_files(fresh)  # reuse changes nothing in what the user reads


def test_an_upstream_change_or_new_input_recomputes(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(str(project), str(out))
    assert calls(tmp_path) == 3
    again = run(str(project), str(out), ["stages.score.scale=2.0"], overwrite=True)
    assert calls(tmp_path) == 6
    assert again.manifest["run"]["cache"]["stages"]["score"]["reused"] is False
    write_jsonl(tmp_path / "data" / "part-9.jsonl", [{"text": "a new shard of words"}])
    third = run(str(project), str(out), ["stages.score.scale=2.0"], overwrite=True)
    assert calls(tmp_path) == 10  # input fingerprint changed: all 4 units scored
    assert third.manifest["run"]["cache"]["stages"]["score"]["reused"] is False


def test_cache_false_turns_it_off(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run(str(project), str(out), ["stages.score.cache=false"])
    run(str(project), str(out), ["stages.score.cache=false"], overwrite=True)
    assert calls(tmp_path) == 6
    assert not (out / "_cache").exists()


TWO_SOURCES = """\
name: two
seed: 2
plugins: [cache_plugin]
sources:
  a: {{uri: "a/*.jsonl"}}
  b: {{uri: "data/*.jsonl"}}
stages:
  s1: {{type: counting_score, input: b, cache: true, log: "{log}"}}
  s2: {{type: text_stats, input: s1, cache: true}}
  keep: {{type: length_filter, input: s2, min_words: 2}}
  other: {{type: text_stats, input: a}}
sinks:
  out: {{input: keep}}
  side: {{input: other}}
execution:
  unit_bytes: 1B
"""


def test_nested_cached_stages_and_a_growing_other_source(project: Path, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a" / "a-0.jsonl", [{"text": "other source"}])
    spec = tmp_path / "two.yaml"
    spec.write_text(TWO_SOURCES.format(log=tmp_path / "calls.log"))
    out = tmp_path / "out"
    run(str(spec), str(out))
    assert calls(tmp_path) == 3
    again = run(str(spec), str(out), overwrite=True)  # both cached stages reused at once
    cache = again.manifest["run"]["cache"]["stages"]
    assert cache["s1"]["reused"] and cache["s2"]["reused"]
    assert calls(tmp_path) == 3
    # the other source gains a shard: every unit index of source b shifts by one
    write_jsonl(tmp_path / "a" / "a-1.jsonl", [{"text": "more of the other source"}])
    shifted = run(str(spec), str(out), overwrite=True)
    fresh = tmp_path / "fresh"
    run(str(spec), str(fresh))
    assert user_files(out) == user_files(fresh)
    assert shifted.manifest["stages"] == json.loads((fresh / "manifest.json").read_text())["stages"]
