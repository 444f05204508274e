"""`cmevlm submit`: the chart rendered for one run (the pipeline or a stage), KubeRay CRD
validation, no secret in anything sent, and creation against a fake Kubernetes API server on
127.0.0.1."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cmevlm import k8s
from cmevlm.config import load_config
from cmevlm.stages import NAMES
from fake_k8s import FakeK8s
from kuberay_crds import validate_crd

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not any(Path(p, "helm").exists() for p in (Path(sys.executable).parent,)), reason="no helm in .venv/bin")


@pytest.mark.parametrize("target", ["pipeline", *NAMES])
def test_every_target_renders_one_valid_rayjob_and_no_secret(target):
    cfg = load_config(overrides=["storage.secret_access_key=hunter2-secret", "storage.access_key_id=AKIA-id", "serve.api_keys=[k-123]"])
    docs = k8s.render(target, cfg, "ml")
    job = k8s.rayjob(docs)
    assert [d["kind"] for d in docs].count("RayJob") == 1 and docs[-1] is job
    validate_crd(job)
    assert job["spec"]["entrypoint"] == f"python jobs/run.py {target} --config /etc/cmevlm/run.yaml"
    assert job["metadata"]["name"] == f"{k8s.release_name(target, cfg)}-cmevlm-{target}"
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    text = yaml.safe_dump_all(docs)
    assert "hunter2-secret" not in text and "AKIA-id" not in text and "k-123" not in text


def test_the_same_run_gets_the_same_names_and_another_run_others():
    a, b = load_config(), load_config(overrides=["sft.lr=0.1"])
    assert k8s.release_name("sft", a) == k8s.release_name("sft", load_config()) != k8s.release_name("sft", b)
    assert k8s.release_name("sft", a) != k8s.release_name("pipeline", a)
    with pytest.raises(ValueError, match="unknown target"):
        k8s.run_values("serve", a)


def test_site_values_shape_the_cluster(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text(yaml.safe_dump({"image": {"repository": "registry.hospital/cmevlm", "tag": "7"}, "workers": {"h100": {"maxReplicas": 3}}}))
    job = k8s.rayjob(k8s.render("pipeline", load_config(), "ml", (str(site),)))
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.hospital/cmevlm:7"
    assert {g["groupName"]: g["maxReplicas"] for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}["h100"] == 3


def test_submit_dry_run_prints_the_pipeline_rayjob():
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "submit", "pipeline", "--config", "configs/demo.yaml", "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    job = k8s.rayjob(docs)
    assert job["spec"]["entrypoint"] == "python jobs/run.py pipeline --config /etc/cmevlm/run.yaml"
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"][0]["configMap"]["name"] == cm["metadata"]["name"]
    assert load_config().model_validate(yaml.safe_load(cm["data"]["run.yaml"]))


@pytest.fixture
def api():
    srv = FakeK8s()
    yield srv
    srv.close()


def test_submit_creates_every_object_then_409_then_waits_until_succeeded(api):
    cfg = load_config()
    job = k8s.submit("teach", cfg, "ml", host=api.url)
    name = job["metadata"]["name"]
    posted = {path for method, path in api.requests if method == "POST"}
    assert posted == {"/api/v1/namespaces/ml/configmaps", "/api/v1/namespaces/ml/serviceaccounts",
                      "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/roles", "/apis/rbac.authorization.k8s.io/v1/namespaces/ml/rolebindings",
                      "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies", "/apis/ray.io/v1/namespaces/ml/rayjobs"}
    assert api.requests[-1] == ("POST", "/apis/ray.io/v1/namespaces/ml/rayjobs")  # the RayJob once what it needs exists
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
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "submit", "pipeline", "-n", "ml", "--api-server", api.url, "--wait", "--poll", "0.01"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "created RayJob run-" in r.stdout and "-cmevlm-pipeline" in r.stdout and "SUCCEEDED" in r.stdout
