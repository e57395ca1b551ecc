"""GPU stages on a cluster that has GPUs: a Ray with a (logical) GPU resource, so the
placement path runs on machines without one; the model itself still runs on CPU."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO

from curate import clip
from curate.api import check, run
from curate.runner import _ray_args


@pytest.fixture(scope="module")
def ray_gpu() -> Iterator[None]:
    import ray

    ray.init(
        num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


PIPE = """
name: g
sources:
  s: {uri: data/*.tar, format: webdataset, caption: txt}
stages:
  crop: {type: image_filter, decode: full, preprocess: {arch: curate-tiny-clip}}
  clip: {type: clip_score, arch: curate-tiny-clip, checkpoint: tiny.pt}
sinks:
  out: {input: clip, format: parquet}
"""


def test_auto_gpu_stage_asks_for_one_gpu_and_runs(ray_gpu: None, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    shutil.copy(REPO / "pipelines/data/demo_image_text/shard-000001.tar", tmp_path / "data")
    clip.build_checkpoint("curate-tiny-clip", tmp_path / "tiny.pt")
    pipe = tmp_path / "p.yaml"
    pipe.write_text(PIPE)
    plan = check(str(pipe))
    args = _ray_args(plan.pipeline.stages["clip"].resources, n_units=4, n_groups=2)
    assert args["ray_remote_args_fn"]() == {"num_gpus": 1.0}
    assert args["compute"].max_size == 1  # one actor per GPU
    assert "ray_remote_args_fn" not in _ray_args(plan.pipeline.stages["crop"].resources, 4, 2)
    manifest = run(str(pipe), str(tmp_path / "out")).manifest
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["clip"]["rows_in"] == stages["crop"]["kept"] > 0
    assert stages["clip"]["kept"] == stages["clip"]["rows_in"]
