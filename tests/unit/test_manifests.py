"""The cluster manifests: valid against their schemas, token auth everywhere, room for the run.

KubeRay manifests are checked against cluster/schemas/kuberay-v1.schema.yaml (trimmed from the
KubeRay CRDs), the launcher YAML against Ray's own ray/autoscaler/ray-schema.json and checks.
"""

import copy
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import validate_config

from rayrlhf.jobs.cli import build_parser
from rayrlhf.jobs.config.run import load_config
from rayrlhf.jobs.run.roles import resource_demands
from rayrlhf.jobs.submit import check_command

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
SCHEMA = yaml.safe_load((CLUSTER / "schemas" / "kuberay-v1.schema.yaml").read_text())


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def kuberay_errors(doc: dict) -> list[str]:
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


def ray_containers(doc: dict) -> list[dict]:
    spec = cluster_spec(doc)
    templates = [spec["headGroupSpec"]["template"], *[g["template"] for g in spec["workerGroupSpecs"]]]
    if doc["kind"] == "RayJob":
        templates.append(doc["spec"]["submitterPodTemplate"])
    return [c for t in templates for c in t["spec"]["containers"]]


def quantity(value) -> float:
    """A CPU count as Kubernetes writes it: 16, "16", "500m"."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def capacity(spec: dict) -> dict[str, float]:
    """The Ray resources the cluster offers: the head's num-cpus plus replicas x limits of each group."""
    total = {"CPU": float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"]), "GPU": 0.0}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        total["CPU"] += group["replicas"] * quantity(limits["cpu"])
        total["GPU"] += group["replicas"] * quantity(limits.get("nvidia.com/gpu", 0))
    return total


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
def test_kuberay_manifest_is_valid_and_authenticated(name):
    doc = load(name)
    assert kuberay_errors(doc) == []
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # never a LoadBalancer / NodePort
    assert not spec["headGroupSpec"].get("enableIngress")
    for container in ray_containers(doc):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        token = env["RAY_AUTH_TOKEN"]
        assert "value" not in token and token["valueFrom"]["secretKeyRef"]["name"] == "rayrlhf-ray-auth"
    groups = {g["groupName"]: g["template"]["spec"]["containers"][0]["resources"] for g in spec["workerGroupSpecs"]}
    assert "nvidia.com/gpu" in groups["gpu"]["limits"] and "nvidia.com/gpu" not in groups["cpu"]["limits"]


def test_rayjob_runs_the_raycluster_spec_and_a_valid_command_that_fits_it():
    job, cluster = load("kuberay/rayjob.yaml"), load("kuberay/raycluster.yaml")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    python, dash_m, module, *command = shlex.split(job["spec"]["entrypoint"])
    assert (python, dash_m, module) == ("python", "-m", "rayrlhf.jobs.cli")
    assert check_command(command, build_parser()) == command  # parses as `rayrlhf ...` would, config included
    cfg = load_config(command[command.index("--config") + 1])
    need, have = resource_demands(cfg), capacity(cluster["spec"])
    # gpu_zero2: 2 rollout x 4 + 4 learner x 4 + reward 2 + reference 0.25 = 26.25 CPU,
    # 2 + 4 + reward 0.5 + reference 0.5 = 7 GPU; the cluster: head 2 + cpu 2 x 8 + gpu 2 x 16 = 50 CPU, 2 x 4 = 8 GPU
    assert need == {"CPU": 26.25, "GPU": 7.0} and have == {"CPU": 50.0, "GPU": 8.0}


def test_the_schema_is_not_vacuous():
    doc = load("kuberay/raycluster.yaml")
    missing = copy.deepcopy(doc)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    typo = copy.deepcopy(doc)
    typo["spec"]["headGroupSpec"]["rayStartParam"] = typo["spec"]["headGroupSpec"].pop("rayStartParams")
    bad_quantity = copy.deepcopy(doc)
    bad_quantity["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = "16 cores"
    assert any("'groupName' is a required property" in e for e in kuberay_errors(missing))
    assert any("rayStartParam" in e for e in kuberay_errors(typo))
    assert any(e.startswith("spec/workerGroupSpecs/1/template") for e in kuberay_errors(bad_quantity))


def test_launcher_config_passes_rays_validation_with_a_private_authenticated_dashboard():
    config = load("launcher/aws.yaml")
    validate_config(config)  # ray-schema.json plus Ray's own consistency checks
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token ray start" in c for c in starts)
    assert config["file_mounts"]["/home/ray/.ray/auth_token"] == "~/.ray/auth_token"
    image_version = re.search(r"ray:(\d+\.\d+\.\d+)", config["docker"]["image"]).group(1)
    dockerfile_version = re.search(r"FROM rayproject/ray:(\d+\.\d+\.\d+)", (CLUSTER / "Dockerfile").read_text()).group(1)
    assert image_version == dockerfile_version == ray.__version__

    broken = copy.deepcopy(config)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(broken)
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu"]["resources"] = {"GPU": 0.5}
    with pytest.raises(jsonschema.ValidationError):
        validate_config(broken)
