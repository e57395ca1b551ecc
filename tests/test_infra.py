"""infra/: the KubeRay RayCluster and RayJob, the AWS cluster-launcher YAML and the
local multi-node script, checked without starting anything; and the one job entry
point (``curate.cluster.entrypoint``) that ``curate submit`` and the RayJob share."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from curate.cluster import entrypoint

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DEMO_PIPELINE = "pipelines/demo_text.yaml"
DEMO_OUTPUT = "s3://curate-output/demo_text"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = re.compile(r"^rayproject/ray:(\d+)\.(\d+)\.(\d+)-(py\d+)(-gpu)?$")


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def raycluster() -> Any:
    return load(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> Any:
    return load(KUBERAY / "rayjob.yaml")


@pytest.fixture(scope="module")
def aws() -> Any:
    return load(INFRA / "aws" / "cluster.yaml")


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (dotted path, value) in a parsed YAML document."""
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def pods(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name -> the group of a RayCluster spec (head included as 'head')."""
    groups = {"head": spec["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in spec["workerGroupSpecs"]})
    return groups


def containers(group: dict[str, Any]) -> list[dict[str, Any]]:
    return list(group["template"]["spec"]["containers"])


def custom_resources(group: dict[str, Any]) -> dict[str, float]:
    """KubeRay's ``rayStartParams.resources``: a JSON string quoted once more."""
    raw = group["rayStartParams"].get("resources")
    if raw is None:
        return {}
    inner = json.loads(raw)
    return dict(json.loads(inner) if isinstance(inner, str) else inner)


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------- entry point


def test_entrypoint_argv() -> None:
    assert entrypoint("p.yaml", "s3://b/out") == [
        "python", "-m", "curate.cli", "run", "p.yaml", "--output", "s3://b/out",
        "--address", "auto",
    ]  # fmt: skip


def test_entrypoint_overrides_in_order() -> None:
    argv = entrypoint("p.yaml", "out", ["seed=1", "stages.length.min_words=5"])
    assert argv[-4:] == ["--set", "seed=1", "--set", "stages.length.min_words=5"]
    assert entrypoint("p.yaml", "out", []) == entrypoint("p.yaml", "out")
    resumed = entrypoint("p.yaml", "out", ["seed=1"], mode="resume")
    assert resumed == [*entrypoint("p.yaml", "out", ["seed=1"]), "--resume"]
    assert entrypoint("p.yaml", "out", mode="overwrite")[-1] == "--overwrite"


def test_entrypoint_survives_the_shell() -> None:
    """The Jobs API takes one shell string: shlex.join round-trips any argument."""
    argv = entrypoint("my pipelines/a b.yaml", "/mnt/shared/out dir", ["sources.x.uri=a*b"])
    assert shlex.split(shlex.join(argv)) == argv


def test_entrypoint_refuses_a_lone_string() -> None:
    with pytest.raises(TypeError):
        entrypoint("p.yaml", "out", "seed=1")  # type: ignore[arg-type]


def test_entrypoint_options_exist_in_the_cli() -> None:
    """Every option the entry point passes is one `curate run` takes."""
    from typer.testing import CliRunner

    from curate.cli import app

    result = CliRunner().invoke(app, ["run", "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for option in ("--output", "--address", "--set"):
        assert option in result.output


# ----------------------------------------------------------------------------- all files


def test_every_yaml_in_infra_parses() -> None:
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert {p.relative_to(INFRA).as_posix() for p in files} >= {
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "aws/cluster.yaml",
    }
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_no_literal_credentials_anywhere_in_infra() -> None:
    """Keys come from Secrets or instance profiles; nothing under infra/ holds one."""
    access_key = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    secret_value = re.compile(
        r"(?i)(aws_secret_access_key|secret_key|auth_token|password)[\"']?\s*[:=]\s*[\"']?"
        r"[A-Za-z0-9/+=]{20,}"
    )
    for path in sorted(p for p in INFRA.rglob("*") if p.is_file()):
        text = path.read_text(errors="replace")
        assert not access_key.search(text), f"{path}: looks like an AWS access key id"
        assert not secret_value.search(text), f"{path}: looks like a literal secret"
    sensitive = re.compile(r"KEY|SECRET|TOKEN|PASSWORD")
    for path in sorted(INFRA.rglob("*.yaml")):
        for where, node in walk(load(path)):
            in_env = where.endswith("env") or ".env[" in where
            if in_env and isinstance(node, dict) and sensitive.search(str(node.get("name"))):
                assert "value" not in node, f"{path}: {where} {node['name']} is a literal"
                assert "valueFrom" in node, f"{path}: {where} {node['name']}"


def test_images_match_the_installed_ray_and_python(raycluster: Any, aws: Any) -> None:
    major, minor = ray.__version__.split(".")[:2]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    images = [
        (path.name, v)
        for path in (KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml")
        for k, v in walk(load(path))
        if k.endswith("image")
    ]
    images += [(k, v) for k, v in walk(aws) if k.endswith(("image", "worker_image"))]
    assert len(images) >= 6
    for where, image in images:
        m = IMAGE.match(str(image))
        assert m, f"{where}: {image} is not a pinned rayproject/ray image"
        assert (m.group(1), m.group(2)) == (major, minor), (
            f"{where}: {image} vs ray {ray.__version__}"
        )
        assert m.group(4) == py, f"{where}: {image} vs python {py}"
    assert raycluster["spec"]["rayVersion"].split(".")[:2] == [major, minor]


# ----------------------------------------------------------------------------- KubeRay


def test_raycluster_groups_and_autoscaling(raycluster: Any) -> None:
    assert raycluster["apiVersion"] == "ray.io/v1"
    assert raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = pods(spec)
    assert set(groups) == {"head", "cpu", "gpu"}
    for name in ("cpu", "gpu"):
        g = groups[name]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], name
        assert g["maxReplicas"] >= 1
        for c in containers(g):
            assert c["resources"]["requests"]["cpu"] == c["resources"]["limits"]["cpu"]
            assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]


def test_gpu_group_asks_for_gpus_and_cpu_group_does_not(raycluster: Any) -> None:
    groups = pods(raycluster["spec"])
    gpu = groups["gpu"]
    limits = containers(gpu)[0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert gpu["rayStartParams"]["num-gpus"] == str(limits["nvidia.com/gpu"])
    assert str(containers(gpu)[0]["image"]).endswith("-gpu")
    for name in ("head", "cpu"):
        for c in containers(groups[name]):
            assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), name
        assert "num-gpus" not in groups[name]["rayStartParams"]


def test_each_group_carries_its_node_type_resource(raycluster: Any) -> None:
    groups = pods(raycluster["spec"])
    assert set(custom_resources(groups["cpu"])) == {"cpu_node"}
    assert set(custom_resources(groups["gpu"])) == {"gpu_node"}
    assert custom_resources(groups["gpu"])["gpu_node"] == float(
        groups["gpu"]["rayStartParams"]["num-gpus"]
    )
    assert custom_resources(groups["cpu"])["cpu_node"] == float(
        groups["cpu"]["rayStartParams"]["num-cpus"]
    )


def test_s3_credentials_and_ray_token_come_from_secrets(raycluster: Any, rayjob: Any) -> None:
    spec = raycluster["spec"]
    for name, group in pods(spec).items():
        for c in containers(group):
            env = env_of(c)
            for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = env[key]["valueFrom"]["secretKeyRef"]
                assert ref["name"] == "curate-s3" and ref["key"] == key, (name, key)
            endpoint = env["AWS_ENDPOINT_URL"]["valueFrom"]["secretKeyRef"]
            assert endpoint["optional"] is True
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "curate-ray-auth"
    autoscaler = {e["name"]: e for e in spec["autoscalerOptions"]["env"]}
    assert autoscaler["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in autoscaler["RAY_AUTH_TOKEN"]["valueFrom"]
    submitter = env_of(rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    assert submitter["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in submitter["RAY_AUTH_TOKEN"]["valueFrom"]


def test_rayjob_runs_the_submit_entrypoint(rayjob: Any) -> None:
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    argv = entrypoint(DEMO_PIPELINE, DEMO_OUTPUT)
    assert spec["entrypoint"] == " ".join(argv)
    assert spec["entrypoint"] == shlex.join(argv)  # nothing in it needs quoting
    assert (ROOT / DEMO_PIPELINE).is_file()
    assert spec["shutdownAfterJobFinishes"] is True
    assert int(spec["ttlSecondsAfterFinished"]) > 0


def test_rayjob_runtime_env_is_valid_for_ray(rayjob: Any) -> None:
    """working_dir is the bundle job_bundle.sh builds; pip installs the lock, read from
    the ConfigMap the submitter mounts.  Ray's own RuntimeEnv accepts it (with the
    lock file of this checkout standing in for the mounted one)."""
    from ray.runtime_env import RuntimeEnv

    spec = rayjob["spec"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert env["working_dir"] == f"s3://curate-artifacts/curate-job-{VERSION}.zip"
    lock_path = Path(env["pip"]["packages"])
    pod = spec["submitterPodTemplate"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (volume,) = [n for n, p in mounts.items() if lock_path.parent == Path(p)]
    assert volumes[volume]["configMap"]["name"] == "curate-lock"
    assert lock_path.name == "lock.txt"
    lock = str(ROOT / "requirements" / "lock.txt")
    checked = RuntimeEnv(**{**env, "pip": {**env["pip"], "packages": lock}})
    packages = checked["pip"]["packages"]
    assert any(p.startswith("ray==") for p in packages)


def test_rayjob_cluster_is_the_raycluster(raycluster: Any, rayjob: Any) -> None:
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


# ----------------------------------------------------------------------------- AWS


def test_aws_yaml_passes_rays_schema(aws: Any) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(aws))


def test_aws_node_types(aws: Any, raycluster: Any) -> None:
    types = aws["available_node_types"]
    assert set(types) == {"head", "cpu_worker", "gpu_worker"}
    assert aws["head_node_type"] == "head"
    assert types["cpu_worker"]["resources"] == {"cpu_node": 32}  # m7i.8xlarge: 32 vCPUs
    assert types["cpu_worker"]["node_config"]["InstanceType"] == "m7i.8xlarge"
    assert types["gpu_worker"]["resources"] == {"gpu_node": 1}  # g6.xlarge: one L4
    assert types["gpu_worker"]["node_config"]["InstanceType"] == "g6.xlarge"
    assert types["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    for name in ("cpu_worker", "gpu_worker"):
        t = types[name]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= aws["max_workers"], name
    # The same node-type resources as the KubeRay groups, so a pinned stage runs on both.
    groups = pods(raycluster["spec"])
    assert set(types["cpu_worker"]["resources"]) == set(custom_resources(groups["cpu"]))
    assert set(types["gpu_worker"]["resources"]) == set(custom_resources(groups["gpu"]))


def test_aws_uses_instance_profiles_installs_the_lock_and_token_auth(aws: Any) -> None:
    for name, t in aws["available_node_types"].items():
        assert "Name" in t["node_config"]["IamInstanceProfile"], name
    setup = " ".join(aws["setup_commands"])
    assert "-r ~/curate/requirements/lock.txt" in setup
    assert "--no-deps -e ~/curate" in setup
    assert aws["file_mounts"]["~/curate"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(aws[key])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH" in start, key
    assert "--dashboard-host=127.0.0.1" in " ".join(aws["head_start_ray_commands"])


# ----------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["local_cluster.sh", "job_bundle.sh"])
def test_scripts_are_strict_bash(script: str) -> None:
    path = INFRA / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text


def test_local_cluster_usage_and_safety() -> None:
    path = INFRA / "local_cluster.sh"
    result = subprocess.run(["bash", str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "usage:" in result.stderr
    text = path.read_text()
    # It stops only the process groups it started: `ray stop` would stop every Ray here.
    assert not re.search(r"^\s*\"?\$ray\"? stop", text, re.MULTILINE)
    assert '--dashboard-host "$ip"' in text and "ip=127.0.0.1" in text
    assert "RAY_AUTH_MODE=token" in text
    assert text.count("--temp-dir") == 1  # in launch(): every node gets its own
