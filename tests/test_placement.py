"""Placement: custom resources pin a stage to a node type; a stage that no node the
cluster has (or its autoscaler can start) can hold is refused before anything runs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from curate.api import check, run
from curate.config import ConfigError, load_pipeline
from curate.placement import NodeShape, demand, describe, shapes_from_state_api, unplaceable
from curate.runner import ResourceError, _ray_args
from curate.stage import Resources


def test_a_stage_fits_a_node_that_holds_all_it_asks_at_once() -> None:
    cpu = NodeShape("a", {"CPU": 8, "memory": 32 * 2**30, "cpu_node": 8})
    gpu = NodeShape("b", {"CPU": 3, "GPU": 1, "gpu_node": 1})
    stages = {
        "plain": Resources(num_cpus=4),
        "pinned": Resources(custom={"cpu_node": 1}, memory="16GiB"),
        "clip": Resources(num_gpus="auto", custom={"gpu_node": 0.01}),
        "big": Resources(num_cpus=4, custom={"gpu_node": 1}),  # GPU nodes have 3 CPUs
        "nowhere": Resources(custom={"tpu_node": 1}),
    }
    problems = unplaceable(stages, [cpu, gpu])
    assert len(problems) == 3
    assert problems[0] == (
        "stage 'big' asks for {CPU: 4, gpu_node: 1} per actor; no node has that much of it at once"
    )
    assert problems[1] == (
        "stage 'nowhere' asks for {CPU: 1, tpu_node: 1} per actor; "
        "no node has the resource(s) 'tpu_node'"
    )
    assert problems[2] == (
        "the cluster's nodes: 1 live node {CPU: 8, memory: 32 GiB, cpu_node: 8}, "
        "1 live node {CPU: 3, GPU: 1, gpu_node: 1}"
    )
    assert unplaceable({"p": Resources(memory="64GiB")}, [cpu, gpu])[0].startswith(
        "stage 'p' asks for {CPU: 1, memory: 64 GiB}"
    )


def test_auto_gpus_follow_what_the_cluster_has_or_its_autoscaler_can_start() -> None:
    clip = Resources(num_gpus="auto", custom={"gpu_node": 0.01})
    cpu_only = [NodeShape("a", {"CPU": 8, "cpu_node": 8})]
    assert demand(clip, 0) == {"CPU": 1.0, "gpu_node": 0.01}
    assert "'gpu_node'" in unplaceable({"clip": clip}, cpu_only)[0]
    # A KubeRay GPU group at zero replicas: no live GPU node, but the type can start one.
    gpu_type = NodeShape("gpu", {"CPU": 3, "GPU": 1, "gpu_node": 1}, origin="type")
    assert unplaceable({"clip": clip, "n": Resources(num_gpus=1)}, [*cpu_only, gpu_type]) == []
    assert describe([*cpu_only, gpu_type]) == (
        "1 live node {CPU: 8, cpu_node: 8}, type gpu {CPU: 3, GPU: 1, gpu_node: 1}"
    )


def test_state_api_nodes_become_shapes() -> None:
    nodes = [
        {"node_id": "abcdef0123", "state": "ALIVE", "resources_total": {"CPU": 2.0, "w": 1.0}},
        {"node_id": "dead", "state": "DEAD", "resources_total": {"CPU": 64.0}},
    ]
    assert shapes_from_state_api(nodes) == [NodeShape("abcdef01", {"CPU": 2.0, "w": 1.0})]


PIPE = """\
name: pinned
sources:
  docs: {{uri: "{data}/*.jsonl"}}
stages:
  stats: {{type: text_stats, resources: {{custom: {{cpu_node: 0.5}}}}}}
  length:
    type: length_filter
    min_words: 3
    resources: {{custom: {custom}}}
sinks:
  out: {{input: length}}
"""


@pytest.fixture
def pipe(tmp_path: Path) -> Callable[[str], Path]:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": " ".join(["w"] * (i % 6)) or "x", "id": f"r{i}"} for i in range(40)]
    for shard in range(2):
        lines = [json.dumps(r) for r in rows[shard::2]]
        (data / f"d{shard}.jsonl").write_text("\n".join(lines) + "\n")

    def make(custom: str) -> Path:
        path = tmp_path / "p.yaml"
        path.write_text(PIPE.format(data=data, custom=custom))
        return path

    return make


def test_custom_resources_are_checked_in_the_yaml(pipe: Callable[[str], Path]) -> None:
    for custom, problem in (
        ("{gpu_node: -1}", "custom.gpu_node: expected greater than 0, got -1"),
        ("{CPU: 2}", "custom: expected a custom resource, not 'CPU' (use num_cpus)"),
        ("{'node:1.2.3.4': 1}", "expected a resource name a stage can ask for, not 'node:1"),
    ):
        path = pipe(custom)
        with pytest.raises(ConfigError) as info:
            load_pipeline(path)
        assert f"{path}:9: stages.length.resources." in str(info.value)
        assert problem in str(info.value)
    plan = load_pipeline(pipe("{gpu_node: 1, cpu_node: 0.25}"))
    assert plan.stages["length"].resources.custom == {"cpu_node": 0.25, "gpu_node": 1.0}


def test_stages_pinned_to_different_node_types_do_not_share_actors(
    pipe: Callable[[str], Path],
) -> None:
    plan = check(str(pipe("{gpu_node: 1}")))
    assert [s.groups for s in plan.segments] == [(("stats",), ("length",))]
    same = check(str(pipe("{cpu_node: 0.5}")))
    assert [s.groups for s in same.segments] == [(("stats", "length"),)]


@pytest.fixture(scope="module")
def ray_typed() -> Iterator[None]:
    """A local Ray whose one node is a ``cpu_node`` (as infra's CPU workers are)."""
    import ray

    ray.init(
        num_cpus=2, resources={"cpu_node": 2}, include_dashboard=False, log_to_driver=False,
        configure_logging=False,
    )  # fmt: skip
    try:
        yield
    finally:
        ray.shutdown()


def test_a_pinned_stage_runs_where_its_resource_is(
    ray_typed: None, pipe: Callable[[str], Path], tmp_path: Path
) -> None:
    path = pipe("{cpu_node: 0.5}")
    plan = check(str(path))
    args = _ray_args(plan.pipeline.stages["length"].resources, n_units=2, n_groups=1)
    assert args["resources"] == {"cpu_node": 0.5}
    manifest = run(str(path), str(tmp_path / "out")).manifest
    stages = {s["name"]: s for s in manifest["stages"]}
    assert stages["length"]["rows_in"] == 40 and 0 < stages["length"]["kept"] < 40
    node = manifest["run"]["cluster"]["per_node"][0]
    assert node["resources"] == {"cpu_node": 2}


def test_a_stage_pinned_to_a_missing_node_type_fails_before_running(
    ray_typed: None, pipe: Callable[[str], Path], tmp_path: Path
) -> None:
    with pytest.raises(ResourceError) as info:
        run(str(pipe("{gpu_node: 0.01}")), str(tmp_path / "out"))
    assert str(info.value).startswith(
        "stage 'length' asks for {CPU: 1, gpu_node: 0.01} per actor; "
        "no node has the resource(s) 'gpu_node'; the cluster's nodes: 1 live node {CPU: 2, "
    )
    assert "cpu_node: 2}" in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()
