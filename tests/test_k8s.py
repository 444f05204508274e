"""RayJobs for every stage: KubeRay CRD validation, security rules, and `cmevlm submit`
against a fake Kubernetes API server on 127.0.0.1."""

import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from cmevlm import k8s
from cmevlm.config import load_config
from fake_k8s import FakeK8s
from kuberay_crds import validate_crd

ROOT = Path(__file__).resolve().parent.parent


def _pods(job: dict):
    spec = job["spec"]["rayClusterSpec"]
    yield spec["headGroupSpec"]["template"]["spec"]
    for g in spec["workerGroupSpecs"]:
        yield g["template"]["spec"]


@pytest.mark.parametrize("stage", k8s.STAGES)
def test_every_stage_rayjob_passes_the_kuberay_crd_and_the_house_rules(stage):
    cfg = load_config(overrides=["storage.secret_access_key=hunter2-secret"])
    job = k8s.rayjob(stage, cfg, "ml")
    validate_crd(job)
    with pytest.raises(jsonschema.ValidationError):  # the schema does check: a wrong type fails
        validate_crd({**job, "spec": {**job["spec"], "shutdownAfterJobFinishes": "yes"}})
    assert job["spec"]["entrypoint"] == f"python jobs/{stage}.py --config /etc/cmevlm/run.yaml"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    for pod in _pods(job):
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
            assert c["envFrom"] == [{"secretRef": {"name": "cmevlm-secrets", "optional": True}}]
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    gpu = "nvidia.com/gpu" in worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu == (stage in k8s.GPU_STAGES) and (worker["groupName"] == "h100") == gpu
    text = yaml.safe_dump_all([job, k8s.config_map(stage, cfg, "ml")])
    assert "hunter2-secret" not in text  # no secret value in anything rendered


def test_submit_dry_run_prints_a_valid_rayjob():
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "submit", "sft", "--config", "configs/demo.yaml", "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    cm, job = list(yaml.safe_load_all(r.stdout))
    assert cm["kind"] == "ConfigMap" and "run.yaml" in cm["data"] and job["kind"] == "RayJob"
    validate_crd(job)
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert load_config(overrides=[]).model_validate(yaml.safe_load(cm["data"]["run.yaml"]))


@pytest.fixture
def api():
    srv = FakeK8s()
    yield srv
    srv.close()


def test_submit_creates_then_409_then_waits_until_succeeded(api):
    cfg = load_config()
    job = k8s.submit("teach", cfg, "ml", host=api.url)
    name = job["metadata"]["name"]
    assert ("POST", "/api/v1/namespaces/ml/configmaps") in api.requests
    assert ("POST", "/apis/ray.io/v1/namespaces/ml/rayjobs") in api.requests
    with pytest.raises(k8s.SubmitError, match="already exists \\(409\\)"):
        k8s.submit("teach", cfg, "ml", host=api.url)
    lines = []
    assert k8s.wait(name, "ml", host=api.url, poll_s=0.01, echo=lines.append) == "SUCCEEDED"
    assert lines == [f"{name}: RUNNING Running", f"{name}: SUCCEEDED Complete"]


@pytest.mark.parametrize("mode, fragment", [("no-crd", "is KubeRay installed"), ("forbidden", "forbidden \\(403\\)")])
def test_submit_explains_404_and_403(api, mode, fragment):
    api.mode = mode
    with pytest.raises(k8s.SubmitError, match=fragment):
        k8s.submit("sft", load_config(), "ml", host=api.url)


def test_submit_command_with_wait(api):
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "submit", "ingest", "-n", "ml", "--api-server", api.url, "--wait", "--poll", "0.01"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "created RayJob cmevlm-ingest-" in r.stdout and "SUCCEEDED" in r.stdout
