"""checkov, a scanner nobody here wrote, on every ci/ scenario render: its Kubernetes checks on
the built-in objects and on the pods inside RayJobs and RayServices (written out as Pods, since
checkov does not read KubeRay's kinds). The checks skipped are listed once, with their reasons,
in helm/cmevlm/checkov.yaml. `make test` installs checkov in .venv-checkov (its pins conflict
with the lock)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "cmevlm"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"
HELM = shutil.which("helm", path=str(Path(sys.prefix) / "bin")) or shutil.which("helm")
pytestmark = pytest.mark.skipif(not CHECKOV.exists() or HELM is None, reason="make test installs checkov (.venv-checkov) and helm")


def ray_pods(obj: dict) -> list[dict]:
    """The pod templates of a RayJob / RayService (head, each worker group, the submitter) as Pods."""
    spec = obj["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    templates = [("head", cluster["headGroupSpec"]["template"])]
    templates += [(g["groupName"], g["template"]) for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        templates.append(("submitter", spec["submitterPodTemplate"]))
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{obj['metadata']['name']}-{name}", **t.get("metadata", {})},
             "spec": t["spec"]} for name, t in templates]


def test_checkov_passes_every_scenario_render(tmp_path):
    scenarios = sorted((CHART / "ci").glob("*-values.yaml"))
    for f in scenarios:
        r = subprocess.run([HELM, "template", "rel", str(CHART), "-f", str(f)], capture_output=True, text=True, timeout=120, check=True)
        docs = [d for d in yaml.safe_load_all(r.stdout) if d]
        pods = [p for d in docs if d["apiVersion"].startswith("ray.io/") for p in ray_pods(d)]
        (tmp_path / f.name).write_text(yaml.safe_dump_all(docs + pods))
    r = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--config-file", str(CHART / "checkov.yaml"), "--quiet", "--compact",
                        "-o", "json"], capture_output=True, text=True, timeout=600)
    report = json.loads(r.stdout)
    report = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["resource"]) for x in report for c in x["results"]["failed_checks"]]
    assert failed == [], failed
    summary = report[0]["summary"]
    assert summary["passed"] > 1000 and summary["parsing_errors"] == 0 and summary["resource_count"] >= 10 * len(scenarios)
