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


def _pip_installs(commands: list[str]) -> list[str]:
    return [c for c in commands if "pip install" in c and "cxrage-ray" in c]


def _worker_setup(config: dict, node_type: str) -> list[str]:
    """What Ray runs on a worker of `node_type`: its own worker_setup_commands replace the global lists."""
    own = config["available_node_types"][node_type].get("worker_setup_commands")
    return own if own is not None else config["setup_commands"] + config.get("worker_setup_commands", [])


def test_setup_installs_this_package_with_torch(config):
    for node_type in config["available_node_types"]:
        commands = (config["setup_commands"] if node_type == config["head_node_type"]
                    else _worker_setup(config, node_type))
        setup = " ".join(commands)
        assert "torch==" in setup and "ray[default" in setup and "/mnt/spill" in setup
        assert len(_pip_installs(commands)) == 1
    assert config["file_mounts"]["~/cxrage-ray"] == "."


def test_gpu_nodes_install_the_gpu_extra(config):
    """A GPU node without nvImageCodec silently decodes on its CPUs (`--gpu-preprocess auto`): the GPU type
    installs the package with the extra that pyproject.toml declares for it; CPU nodes without it."""
    import tomllib

    extras = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any("nvimgcodec" in requirement for requirement in extras["gpu"])
    for name, node_type in config["available_node_types"].items():
        commands = config["setup_commands"] if name == config["head_node_type"] else _worker_setup(config, name)
        (install,) = _pip_installs(commands)
        assert ("cxrage-ray[gpu]" in install) == bool(node_type["resources"].get("GPU")), (name, install)


def test_nodes_reach_s3_by_instance_profile(config):
    """No keys on the nodes: each node type names an instance profile; workers share one that holds S3 only, the
    head's differs (it also launches the workers)."""
    profiles = {name: t["node_config"].get("IamInstanceProfile") for name, t in config["available_node_types"].items()}
    assert all(p and (p.get("Name") or p.get("Arn")) for p in profiles.values()), profiles
    head = profiles.pop(config["head_node_type"])
    assert len({json.dumps(p, sort_keys=True) for p in profiles.values()}) == 1
    assert head != next(iter(profiles.values()))
    text = CLUSTER_YAML.read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text


def test_weights_fetched_once_on_the_head_and_verified(config):
    """The driver on the head reads the weights; `cxrage weights fetch` checks size + sha256 and skips a verified
    cached copy, so it runs on every (re)start of the head without downloading twice."""
    assert any("cxrage weights fetch" in c for c in config["head_setup_commands"])
    workers = [c for name in config["available_node_types"] if name != config["head_node_type"]
               for c in _worker_setup(config, name)]
    assert not any("weights fetch" in c for c in workers)


def test_shell_commands_parse(config):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(key, [])]
    commands += [c for t in config["available_node_types"].values() for c in t.get("worker_setup_commands", [])]
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
