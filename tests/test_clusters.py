"""The cluster files in clusters/ are valid and consistent, checked in seconds with no network, cloud or cluster.

- Launcher YAMLs (onprem, aws, gcp) pass Ray's own checks: the defaults `ray up` fills in (read from Ray's
  defaults.yaml, offline), then `validate_config` (ray-schema.json plus Ray's rules on node types and workers).
  Nothing here calls a cloud API. A copy with a bad field must be rejected, so the check can fail.
- KubeRay manifests (RayCluster, RayJob) have the fields the operator needs: apiVersion ray.io/v1, rayVersion,
  a head with rayStartParams and containers with image and resources, worker groups with groupName, replicas and
  GPU limits, and a RayJob entrypoint that runs an experiment file of this repository.
- One setup everywhere: the same image (tag = the project's version) in every file, built by clusters/Dockerfile
  with `pip install -e .` on the Ray version every file names; MLFLOW_TRACKING_URI and /shared in every cluster;
  token authentication and a dashboard that is not exposed; no literal secret in any file of clusters/.
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = REPO / "clusters"
LAUNCHERS = ["onprem.yaml", "aws.yaml", "gcp.yaml"]
KUBERAY = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"]
CLUSTER_FILES = LAUNCHERS + KUBERAY
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]
DOCKERFILE = (CLUSTERS / "Dockerfile").read_text()
SHARED_RUNS = "/shared/runs"
PROJECT_IN_IMAGE = "/home/ray/lab-orchestrator"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def ray_validate(config: dict) -> None:
    """What `ray up` checks before it talks to a provider: defaults filled in, then Ray's validator."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def dockerfile_ray_version() -> str:
    match = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE, re.MULTILINE)
    assert match, "clusters/Dockerfile must declare ARG RAY_VERSION=<version>"
    return match.group(1)


RAY_VERSION = dockerfile_ray_version()


# ---------------------------------------------------------------------------------------------------------------
# Launcher YAMLs: Ray's validator, positive and negative


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_passes_rays_validator(name: str) -> None:
    ray_validate(load(name))


def _unknown_top_level_key(config: dict) -> None:
    config["head_start_ray_command"] = ["ray start --head"]  # singular: not a cluster-launcher field


def _run_options_not_a_list(config: dict) -> None:
    config["docker"]["run_options"] = "--volume /shared:/shared"


def _max_workers_not_an_integer(config: dict) -> None:
    config["max_workers"] = "ten"


def _unknown_node_type_field(config: dict) -> None:
    worker = next(n for n in config["available_node_types"] if n != config["head_node_type"])
    config["available_node_types"][worker]["max_worker"] = 2


def _fractional_gpu_resource(config: dict) -> None:
    worker = next(n for n in config["available_node_types"] if n != config["head_node_type"])
    config["available_node_types"][worker]["resources"]["GPU"] = 0.5


def _head_type_not_declared(config: dict) -> None:
    config["head_node_type"] = "no_such_type"


def _min_workers_above_max(config: dict) -> None:
    for node_type in config["available_node_types"].values():
        node_type["min_workers"] = config["max_workers"]


COMMON_BREAKAGES = [_unknown_top_level_key, _run_options_not_a_list]
# (On-prem, Ray's own preparation step already trips over a non-integer max_workers, before the schema.)
CLOUD_BREAKAGES = [_max_workers_not_an_integer, _unknown_node_type_field, _fractional_gpu_resource,
                   _head_type_not_declared, _min_workers_above_max]


@pytest.mark.parametrize("name", LAUNCHERS)
@pytest.mark.parametrize("breakage", COMMON_BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_launcher_yaml_with_a_bad_field_is_rejected(name: str, breakage) -> None:
    config = load(name)
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        ray_validate(config)


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
@pytest.mark.parametrize("breakage", CLOUD_BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_cloud_yaml_with_a_bad_field_is_rejected(name: str, breakage) -> None:
    config = load(name)
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


# ---------------------------------------------------------------------------------------------------------------
# Launcher YAMLs: provider specifics and the shared setup


def test_onprem_lists_its_servers() -> None:
    config = load("onprem.yaml")
    provider = config["provider"]
    assert provider["type"] == "local"
    assert provider["head_ip"] and provider["worker_ips"]
    # Ray's on-prem provider refuses node types of its own; every listed server joins the cluster.
    assert "available_node_types" not in config and "head_node_type" not in config
    assert config["max_workers"] == len(provider["worker_ips"])
    assert config["auth"]["ssh_user"] and config["auth"]["ssh_private_key"].startswith("~/.ssh/")


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_yaml_has_a_cpu_head_and_spot_gpu_workers(name: str) -> None:
    config = load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head runs drivers, not GPU work"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers.values())
    for node_name, node_type in workers.items():
        assert 0 <= node_type.get("min_workers", 0) <= node_type["max_workers"] <= config["max_workers"], node_name
        # The single-GPU recipes ask 6 CPUs + 1 GPU per Train worker on one node.
        assert node_type["resources"]["CPU"] >= 6 * node_type["resources"]["GPU"], node_name
        node_config = node_type["node_config"]
        if name == "aws.yaml":
            assert node_config["InstanceMarketOptions"]["MarketType"] == "spot", node_name
        else:
            scheduling = node_config["scheduling"]
            assert isinstance(scheduling, dict), "GCE's `scheduling` is one object, not a list"
            assert scheduling["onHostMaintenance"] == "TERMINATE", node_name
            assert scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True
            assert scheduling.get("automaticRestart") is False, node_name
            accelerators = node_config["guestAccelerators"]
            assert sum(a["acceleratorCount"] for a in accelerators) == node_type["resources"]["GPU"], node_name
    if name == "aws.yaml":
        assert all("Arn" in t["node_config"]["IamInstanceProfile"] for t in types.values())
        assert head["node_config"].get("InstanceMarketOptions") is None, "the head must be on-demand"
    else:
        assert "scheduling" not in head["node_config"] or "SPOT" not in str(head["node_config"]["scheduling"])


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_uses_the_shared_setup(name: str) -> None:
    config = load(name)
    docker = config["docker"]
    assert docker["image"] and docker["container_name"]
    options = " ".join(docker["run_options"])
    assert re.search(r"--env MLFLOW_TRACKING_URI=https?://\S+", options), "MLflow server for every node"
    assert "--volume /shared:/shared" in options
    assert "--volume /shared/datasets:/datasets:ro" in options
    assert "--env RAY_AUTH_MODE=token" in options
    # The host mounts the shared storage at /shared before the container starts.
    assert any("mount" in c and "/shared" in c for c in config["initialization_commands"])
    # Every node checks that it runs this project's version and the image's Ray, and can write the runs.
    setup = " ".join(config["setup_commands"])
    assert re.search(r"m\.version\('lab-orchestrator'\) == '([^']+)'", setup).group(1) == PROJECT_VERSION
    assert re.search(r"ray\.__version__ == '([^']+)'", setup).group(1) == RAY_VERSION
    assert f"test -w {SHARED_RUNS}" in setup


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_yaml_uses_token_auth_and_hides_the_dashboard(name: str) -> None:
    config = load(name)
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    head = " ".join(config["head_start_ray_commands"])
    workers = " ".join(config["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


# ---------------------------------------------------------------------------------------------------------------
# KubeRay manifests


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def cluster_spec_problems(spec: dict) -> list[str]:
    """What a RayCluster spec (a RayCluster's spec or a RayJob's rayClusterSpec) lacks; empty when complete."""
    problems = []
    if str(spec.get("rayVersion")) != RAY_VERSION:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} is not the image's Ray {RAY_VERSION}")
    if spec.get("authOptions", {}).get("mode") != "token":
        problems.append("authOptions.mode is not token")
    head = spec.get("headGroupSpec") or {}
    if not isinstance(head.get("rayStartParams"), dict):
        problems.append("headGroupSpec.rayStartParams missing")
    if head.get("serviceType", "ClusterIP") != "ClusterIP":
        problems.append("the head Service must stay ClusterIP (port 8265 runs arbitrary code)")
    templates = {"head": head.get("template")}
    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append("no workerGroupSpecs")
    for i, group in enumerate(groups):
        where = f"workerGroupSpecs[{i}]"
        if not group.get("groupName"):
            problems.append(f"{where}.groupName missing")
        counts = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(c, int) for c in counts) or not counts[0] <= counts[1] <= counts[2]:
            problems.append(f"{where}: need integer minReplicas <= replicas <= maxReplicas, got {counts}")
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{where}.rayStartParams missing")
        templates[where] = group.get("template")
        ray_container = (group.get("template") or {}).get("spec", {}).get("containers", [{}])[0]
        gpus = ray_container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
        if not (isinstance(gpus, int) and gpus >= 1):
            problems.append(f"{where}: the Ray container has no nvidia.com/gpu limit")
    for where, template in templates.items():
        if not template or not template.get("spec", {}).get("containers"):
            problems.append(f"{where}: template.spec.containers missing")
            continue
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                  for v in template["spec"].get("volumes", [])}
        for container in _containers(template):
            name = f"{where}/{container.get('name')}"
            if not container.get("image"):
                problems.append(f"{name}: no image")
            limits = container.get("resources", {}).get("limits", {})
            if not {"cpu", "memory"} <= set(limits):
                problems.append(f"{name}: resources.limits need cpu and memory")
            env = {e["name"]: e for e in container.get("env", [])}
            if not str(env.get("MLFLOW_TRACKING_URI", {}).get("value", "")).startswith("http"):
                problems.append(f"{name}: no MLFLOW_TRACKING_URI server")
            if "value" in env.get("RAY_AUTH_TOKEN", {}):
                problems.append(f"{name}: RAY_AUTH_TOKEN must come from a Secret (valueFrom), never a value")
            mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
            if claims.get(mounts.get("/shared", {}).get("name")) != "lab-shared":
                problems.append(f"{name}: the lab-shared PVC is not mounted at /shared")
    return problems


@pytest.mark.parametrize("name", KUBERAY)
def test_kuberay_manifest_is_complete(name: str) -> None:
    manifest = load(name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob"}[Path(name).name]
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    if manifest["kind"] == "RayJob":
        assert spec.get("rayClusterSpec") or spec.get("clusterSelector"), "a RayJob needs a cluster"
        spec = spec.get("rayClusterSpec")
        if spec is None:
            return
    assert cluster_spec_problems(spec) == []


def _drop_gpu_limits(manifest: dict) -> None:
    for group in manifest["spec"]["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            container["resources"]["limits"].pop("nvidia.com/gpu")


def _drop_head_rayStartParams(manifest: dict) -> None:
    del manifest["spec"]["headGroupSpec"]["rayStartParams"]


def _replicas_above_max(manifest: dict) -> None:
    manifest["spec"]["workerGroupSpecs"][0]["replicas"] = 99


def _literal_token(manifest: dict) -> None:
    env = manifest["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "RAY_AUTH_TOKEN", "value": "x" * 32})


def _no_shared_volume(manifest: dict) -> None:
    manifest["spec"]["headGroupSpec"]["template"]["spec"]["volumes"] = []


def _public_dashboard(manifest: dict) -> None:
    manifest["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"


@pytest.mark.parametrize("breakage", [_drop_gpu_limits, _drop_head_rayStartParams, _replicas_above_max,
                                      _literal_token, _no_shared_volume, _public_dashboard],
                         ids=lambda f: f.__name__.strip("_"))
def test_kuberay_check_catches_a_broken_raycluster(breakage) -> None:
    manifest = load("kuberay/raycluster.yaml")
    breakage(manifest)
    assert cluster_spec_problems(manifest["spec"])


def test_rayjob_runs_an_experiment_of_this_repository() -> None:
    spec = load("kuberay/rayjob.yaml")["spec"]
    entrypoint = spec["entrypoint"]
    words = entrypoint.split()
    assert words[:2] == ["orchestrator", "run"], entrypoint
    # KubeRay pastes the entrypoint into the submitter's shell command: one plain command only.
    assert not re.search(r"&&|\|\||[;|`]|\$\(", entrypoint), entrypoint
    experiment = words[2]
    assert experiment.startswith(f"{PROJECT_IN_IMAGE}/experiments/"), experiment
    assert (REPO / Path(experiment).relative_to(PROJECT_IN_IMAGE)).is_file(), experiment
    assert words[3:] == ["--set", f"storage_path={SHARED_RUNS}"], entrypoint
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["MLFLOW_TRACKING_URI"].startswith("http")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode")
    assert isinstance(spec.get("backoffLimit", 0), int)


def test_shared_pvc_is_read_write_many() -> None:
    pvc = load("kuberay/shared-pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["metadata"]["name"] == "lab-shared"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------------------------------------------------------
# One image, one project version, one Ray version, one MLflow server, /shared everywhere


def images_of(name: str) -> list[str]:
    manifest = load(name)
    if name in LAUNCHERS:
        docker = manifest["docker"]
        return [docker[k] for k in ("image", "head_image", "worker_image") if k in docker]
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return [c["image"] for t in templates for c in _containers(t)]


def test_every_cluster_runs_the_same_image_of_this_project_version() -> None:
    images = {name: set(images_of(name)) for name in CLUSTER_FILES}
    everywhere = set().union(*images.values())
    assert len(everywhere) == 1, f"one image for every node of every cluster, found {images}"
    (image,) = everywhere
    assert image.rsplit(":", 1)[1] == PROJECT_VERSION, f"{image}: its tag must be the project's version"
    assert f"-t {image} ." in DOCKERFILE, "the Dockerfile's build command builds the image the clusters run"


def test_the_dockerfile_installs_this_project_on_the_ray_every_file_names() -> None:
    assert re.search(r"^FROM rayproject/ray:\$\{RAY_VERSION\}-py311-gpu$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"pip install [^\n]*-e \.", DOCKERFILE), "the project is installed with pip install -e ."
    assert f"WORKDIR {PROJECT_IN_IMAGE}" in DOCKERFILE
    ray_requirement = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("ray"))
    assert ray_requirement.specifier.contains(RAY_VERSION), f"Ray {RAY_VERSION} vs pyproject {ray_requirement}"
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains("3.11"), "the image's Python is 3.11"
    for name in KUBERAY:
        spec = load(name)["spec"]
        assert str(spec.get("rayClusterSpec", spec)["rayVersion"]) == RAY_VERSION, name


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_cluster_sets_mlflow_and_shared_storage(name: str) -> None:
    text = (CLUSTERS / name).read_text()
    uris = set(re.findall(r"MLFLOW_TRACKING_URI[=:]\s*(\S+)", text))
    uris |= set(re.findall(r"name: MLFLOW_TRACKING_URI\s+value: (\S+)", text))
    assert uris and all(u.startswith("http") for u in uris), uris
    assert "/shared" in text


def test_every_cluster_names_the_same_mlflow_server() -> None:
    found = set()
    for name in CLUSTER_FILES:
        text = (CLUSTERS / name).read_text()
        found |= set(re.findall(r"MLFLOW_TRACKING_URI=(\S+)", text))
        found |= set(re.findall(r"MLFLOW_TRACKING_URI: (\S+)", text))
        found |= set(re.findall(r"name: MLFLOW_TRACKING_URI\s+value: (\S+)", text))
    assert len(found) == 1, found


# ---------------------------------------------------------------------------------------------------------------
# No secrets

SECRET_PATTERNS = {
    "AWS access key id": r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    "AWS secret access key": r"(?i)aws_secret_access_key\s*[:=]",
    "private key": r"-----BEGIN [A-Z ]*PRIVATE KEY-----",
    "GCP service-account key": r"\"private_key(?:_id)?\"\s*:",
    "GitHub token": r"\bgh[pousr]_[A-Za-z0-9]{30,}",
    "GitLab token": r"\bglpat-[A-Za-z0-9_-]{20,}",
    "Slack token": r"\bxox[abprs]-[A-Za-z0-9-]{10,}",
    "OpenAI-style key": r"\bsk-[A-Za-z0-9_-]{20,}",
    "Hugging Face token": r"\bhf_[A-Za-z0-9]{30,}",
    "Google API key": r"\bAIza[0-9A-Za-z_-]{35}",
    "JWT": r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.",
    "credentials in a URL": r"://[^/\s:@]+:[^/\s@]+@",
    "literal value of a secret-named Kubernetes env var":
        r"(?i)name:\s*[\w-]*(?:token|secret|password|api_key)[\w-]*\s*\n\s*value:\s*\S{8,}",
    "literal token/password/key value":
        r"(?i)[\w-]*(?:token|secret|password|passwd|api[_-]?key)[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9+/_=-]{16,}",
}


def secrets_in(text: str) -> list[str]:
    return [kind for kind, pattern in SECRET_PATTERNS.items() if re.search(pattern, text)]


@pytest.mark.parametrize("path", sorted(p.relative_to(CLUSTERS).as_posix() for p in CLUSTERS.rglob("*")
                                        if p.is_file()))
def test_no_literal_secret_in_cluster_files(path: str) -> None:
    assert secrets_in((CLUSTERS / path).read_text()) == []


@pytest.mark.parametrize("planted", [
    "aws_access_key_id: " + "AKIA" + "IOSFODNN7EXAMPLE",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
    "- name: RAY_AUTH_TOKEN\n  value: " + "3f9a" * 8,
    "token: " + "gh" + "p_" + "a1B2" * 9,
    "MLFLOW_TRACKING_URI=http://alice:" + "hunter2pass@mlflow.internal:5000",
    "export OPENAI_API_KEY=" + "sk-" + "x9" * 16,
])
def test_the_secret_scan_catches_planted_secrets(planted: str) -> None:
    assert secrets_in(planted)
