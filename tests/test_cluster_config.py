"""cluster.yaml, validated offline: Ray's JSON schema plus Ray's own prepare/validate steps (what `ray up` runs
before it touches the cloud), and the properties this project relies on. No cloud credentials, no Ray started."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_validate(config: dict, schema: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_valid_for_ray(config, schema):
    prepared = _ray_validate(config, schema)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_head_schedules_no_work(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0


def test_worker_types(config):
    types = config["available_node_types"]
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu, "a GPU worker type is required for inference"
    assert all(t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "g6e") for t in gpu)
    assert cpu, "a CPU worker type is required for decode"
    for t in gpu + cpu:  # autoscaling: may scale to zero and up
        assert t.get("min_workers", 0) == 0 < t["max_workers"] <= config["max_workers"]
    assert max(t["resources"]["CPU"] for t in cpu) >= 8


def test_no_docker_and_spill_on_own_volume(config):
    assert not config.get("docker")
    for t in config["available_node_types"].values():
        devices = t["node_config"]["BlockDeviceMappings"]
        spill = [d for d in devices if d["DeviceName"] != "/dev/sda1"]
        assert spill and spill[0]["Ebs"]["VolumeSize"] >= 200 and spill[0]["Ebs"]["VolumeType"] == "gp3"
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert len(start) == 1 and "--object-spilling-directory=/mnt/spill" in start[0]
    assert any("/mnt/spill" in c and "mount" in c for c in config["setup_commands"])


def test_setup_installs_this_package_with_torch(config):
    setup = " ".join(config["setup_commands"])
    assert "torch==" in setup and "ray[default" in setup
    assert "~/cxrage-ray" in setup and config["file_mounts"]["~/cxrage-ray"] == "."


def test_shell_commands_parse(config):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(key, [])]
    assert commands
    for command in commands:
        result = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, f"{command!r}: {result.stderr}"


@pytest.mark.parametrize("mutate,error", [
    (lambda c: c.update(max_worker=3), "jsonschema"),  # typo at the top level
    (lambda c: c["available_node_types"]["gpu_infer"].update(min_worker=1), "jsonschema"),  # typo in a node type
    (lambda c: c["available_node_types"]["gpu_infer"].update(resources="GPU"), "jsonschema"),  # wrong type
    (lambda c: c.update(head_node_type="no_such_type"), "ValueError"),
    (lambda c: c["available_node_types"]["cpu_decode"].update(min_workers=100), "ValueError"),
])
def test_mistakes_are_rejected(config, schema, mutate, error):
    broken = copy.deepcopy(config)
    mutate(broken)
    expected = jsonschema.ValidationError if error == "jsonschema" else ValueError
    with pytest.raises(expected):
        _ray_validate(broken, schema)
