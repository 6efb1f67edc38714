"""cluster/rayjob.yaml against KubeRay's RayJob CRD (its openAPIV3Schema, read from ../shared/kuberay/ beside the
project root, never copied into it), plus what the operator needs beyond the schema and what this project
promises about the manifest: a GPU worker group, the job's entrypoint, S3 credentials from a secret only."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRD = ROOT.parent / "shared" / "kuberay" / "ray.io_rayjobs.yaml"
MANIFEST = ROOT / "cluster" / "rayjob.yaml"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    if not CRD.exists():
        pytest.skip(f"KubeRay's RayJob CRD is not beside this checkout ({CRD})")
    return yaml.safe_load(CRD.read_text())


def schema_for(crd: dict[str, Any], api_version: str) -> dict[str, Any]:
    group, _, version = api_version.partition("/")
    assert group == crd["spec"]["group"], f"apiVersion {api_version} is not the CRD's group {crd['spec']['group']}"
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served"):
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"the CRD serves no version {version}")


def problems(manifest: dict[str, Any], crd: dict[str, Any]) -> list[str]:
    """Schema errors, then what the operator needs beyond it: a job to submit (``spec.entrypoint``, unless the
    job is submitted interactively) and a cluster to run it on."""
    validator = jsonschema.Draft7Validator(schema_for(crd, manifest.get("apiVersion", "")))
    found = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(manifest)]
    if manifest.get("kind") != crd["spec"]["names"]["kind"]:
        found.append(f"kind {manifest.get('kind')!r} is not {crd['spec']['names']['kind']}")
    spec = manifest.get("spec") or {}
    if spec.get("submissionMode") != "InteractiveMode" and not spec.get("entrypoint"):
        found.append("spec.entrypoint: missing (nothing to submit)")
    if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
        found.append("spec: neither rayClusterSpec nor clusterSelector")
    return found


def load() -> dict[str, Any]:
    return yaml.safe_load(MANIFEST.read_text())


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = manifest["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    return [c for pod in pods for c in pod["spec"]["containers"]]


def test_the_manifest_validates_against_the_crd(crd):
    assert problems(load(), crd) == []


@pytest.mark.parametrize("breakage", ["no entrypoint", "entrypoint not a string", "replicas not an integer",
                                      "ttl not an integer", "no cluster", "wrong kind"])
def test_broken_manifests_do_not(crd, breakage):
    manifest = copy.deepcopy(load())
    spec = manifest["spec"]
    if breakage == "no entrypoint":
        del spec["entrypoint"]
    elif breakage == "entrypoint not a string":
        spec["entrypoint"] = ["python", "jobs/process_lots.py"]
    elif breakage == "replicas not an integer":
        spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "four"
    elif breakage == "ttl not an integer":
        spec["ttlSecondsAfterFinished"] = "one hour"
    elif breakage == "no cluster":
        del spec["rayClusterSpec"]
    else:
        manifest["kind"] = "RayCluster"
    assert problems(manifest, crd), breakage


def test_gpu_worker_group_and_the_job_it_runs():
    manifest = load()
    spec = manifest["spec"]
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1" and gpu["rayStartParams"]["num-gpus"] == "1"
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "/app/jobs/process_lots.py"] and (ROOT / "jobs" / "process_lots.py").exists()
    assert argv[argv.index("--num-gpus") + 1] == "1"
    assert int(argv[argv.index("--actors") + 1]) <= gpu["replicas"] <= gpu["maxReplicas"]  # every actor has a GPU
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/app"


def test_s3_credentials_come_from_a_secret_only():
    manifest = load()
    for container in containers(manifest):
        env = {e["name"]: e for e in container["env"]}
        for name in SECRET_ENV:
            assert "value" not in env[name], f"{container['name']}: {name} given in clear"
            assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "semclip-s3"
    runtime_env = yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])
    assert not set(runtime_env.get("env_vars", {})) & set(SECRET_ENV)
