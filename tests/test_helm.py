"""The Helm chart: lint, every ci/ scenario rendered and validated (KubeRay CRDs for ray.io
kinds, kubernetes-validate for built-in kinds), the security and egress rules, k8s/ in sync,
and the chart's RayJobs agreeing with `cmevlm submit`'s."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cmevlm import k8s
from cmevlm.config import load_config
from kuberay_crds import validate_crd

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "cmevlm"
HELM = shutil.which("helm", path=str(Path(sys.prefix) / "bin")) or shutil.which("helm")
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary (make install puts one in .venv/bin)")


def helm(*args, tmp=None) -> str:
    env = {**os.environ}
    if tmp:
        env.update(HELM_CACHE_HOME=str(tmp / "c"), HELM_CONFIG_HOME=str(tmp / "f"), HELM_DATA_HOME=str(tmp / "d"))
    r = subprocess.run([HELM, *args], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def render(values: Path | None, tmp) -> list[dict]:
    args = ["template", "rel", str(CHART), "--namespace", "ml"] + (["-f", str(values)] if values else [])
    return [d for d in yaml.safe_load_all(helm(*args, tmp=tmp)) if d]


def pod_specs(obj: dict):
    cluster = obj["spec"].get("rayClusterSpec") or obj["spec"].get("rayClusterConfig")
    yield cluster["headGroupSpec"]["template"]
    for g in cluster["workerGroupSpecs"]:
        yield g["template"]


def test_lint_strict(tmp_path):
    helm("lint", "--strict", str(CHART), tmp=tmp_path)
    for f in SCENARIOS:
        helm("lint", "--strict", str(CHART), "-f", str(f), tmp=tmp_path)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda p: p.name)
def test_scenario_renders_valid_secure_objects(scenario, tmp_path):
    docs = render(scenario, tmp_path)
    kinds = {d["kind"] for d in docs}
    assert "ConfigMap" in kinds and "NetworkPolicy" in kinds and "Secret" not in kinds
    for d in docs:
        if d["apiVersion"].startswith("ray.io/"):
            validate_crd(d)
            for tpl in pod_specs(d):
                spec = tpl["spec"]
                assert spec["securityContext"]["runAsNonRoot"] is True
                for c in spec["containers"]:
                    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
                    assert c["securityContext"]["readOnlyRootFilesystem"] is True
                    assert {m["mountPath"] for m in c["volumeMounts"]} >= {"/tmp", "/etc/cmevlm"}
                    assert c["resources"]["requests"] and c["resources"]["limits"]
                    assert all("value" not in e or e["name"] == "RAY_USAGE_STATS_ENABLED" for e in c.get("env", []))
                    assert c["envFrom"][0]["secretRef"]["name"]  # secrets by reference only
        else:
            kubernetes_validate.validate(d, "1.37.0", strict=True)
    text = yaml.safe_dump_all(docs)
    for secret_word in ("AWS_SECRET_ACCESS_KEY:", "GEMINI_API_KEY:", "secret_access_key: "):
        assert secret_word not in text


def test_gpu_stages_use_the_h100_pool_and_teacher_egress_is_limited(tmp_path):
    docs = render(None, tmp_path)
    jobs = {d["metadata"]["labels"]["cmevlm.io/stage"]: d for d in docs if d["kind"] == "RayJob"}
    assert set(jobs) == set(k8s.STAGES)
    for stage, job in jobs.items():
        worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        gpu = worker["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
        assert (gpu == "8") == (stage in k8s.GPU_STAGES)
        assert (worker["template"]["spec"].get("nodeSelector") == {"cmevlm.io/pool": "h100"}) == (stage in k8s.GPU_STAGES)
        head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
        assert "nvidia.com/gpu" not in head["spec"]["containers"][0]["resources"]["limits"]
        calls = head["metadata"]["labels"].get("cmevlm.io/calls-teacher") == "true"
        assert calls == (stage in ("teach", "prefer", "evaluate"))
        assert job["spec"]["entrypoint"] == f"python jobs/{stage}.py --config /etc/cmevlm/run.yaml"
    pols = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    egress = pols["rel-cmevlm-egress"]["spec"]
    assert egress["policyTypes"] == ["Egress"]
    allowed = [t for rule in egress["egress"] for t in rule["to"]]
    assert {"ipBlock": {"cidr": "10.96.0.10/32"}} in allowed and {"ipBlock": {"cidr": "10.96.0.0/12"}} in allowed
    assert not any(t.get("ipBlock", {}).get("cidr") == "142.250.0.0/15" for t in allowed)  # the teacher is not open to all
    teacher = pols["rel-cmevlm-teacher"]["spec"]
    assert teacher["podSelector"]["matchLabels"]["cmevlm.io/calls-teacher"] == "true"
    assert teacher["egress"][0]["to"] == [{"ipBlock": {"cidr": "142.250.0.0/15"}}]
    ingress = pols["rel-cmevlm-serve-ingress"]["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "clinical-apps"}}} in ingress
    service = next(d for d in docs if d["kind"] == "RayService")
    assert "import_path: cmevlm.serve.app:build_app" in service["spec"]["serveConfigV2"]
    assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"] == "rtx4090"


def test_chart_rayjob_agrees_with_cmevlm_submit(tmp_path):
    """The chart and `cmevlm submit` build the same RayJob for a stage, but for the names the
    release and the config hash give them."""
    chart = next(d for d in render(None, tmp_path) if d["kind"] == "RayJob" and d["metadata"]["labels"]["cmevlm.io/stage"] == "sft")
    ours = k8s.rayjob("sft", load_config(), "ml")

    def normal(job):
        spec = yaml.safe_load(yaml.safe_dump(job["spec"]))
        for tpl in pod_specs({"spec": spec}):
            tpl.pop("metadata", None)
            for v in tpl["spec"]["volumes"]:
                v.get("configMap", {}).pop("name", None)
        return spec

    assert normal(chart) == normal(ours)


def test_k8s_manifests_are_up_to_date(tmp_path):
    header = "# Generated from helm/cmevlm (default values) by make manifests; do not edit.\n"
    fresh = header + helm("template", "cmevlm", str(CHART), "--namespace", "cmevlm", tmp=tmp_path)
    assert (ROOT / "k8s" / "cmevlm.yaml").read_text() == fresh, "k8s/ is stale: run `make manifests`"


def test_values_schema_rejects_bad_values(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  sft: {enabled: maybe}\n")
    r = subprocess.run([HELM, "template", "x", str(CHART), "-f", str(bad)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HELM_CACHE_HOME": str(tmp_path / "c"), "HELM_CONFIG_HOME": str(tmp_path / "f")})
    assert r.returncode != 0 and "enabled" in r.stderr
