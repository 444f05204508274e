"""`cmevlm submit`: the chart's own objects for one run, created through the Kubernetes API.

    cmevlm submit pipeline --config run.yaml [--values site-values.yaml] [-n ml] [--dry-run] [--wait]
    cmevlm submit sft --config run.yaml ...        (one stage's RayJob, for a rerun)

There is one source of every object: the Helm chart in helm/cmevlm. `submit` renders it with
`helm template` for this run (the run config as `runConfig`, only the pipeline or the one
stage enabled, no serving) and creates what it renders: the ConfigMap holding the run config,
the autoscaler's ServiceAccount and Role, the NetworkPolicies, and the RayJob. Secrets are
never in what is sent: the config's secret fields are dropped (the pods read them from the
Secret `existingSecret`). The release is named after a hash of the config, so submitting the
same run twice is a 409 instead of a second paid run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from cmevlm.config import RunConfig, public_dict
from cmevlm.errors import CmevlmError
from cmevlm.stages import NAMES

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TARGETS = ("pipeline", *NAMES)
CHART = Path(__file__).resolve().parent.parent / "helm" / "cmevlm"


class SubmitError(CmevlmError):
    """The cluster refused or cannot render the submission; the message says why."""


def helm_binary() -> str:
    """helm from $CMEVLM_HELM, the PATH, or beside this Python (make install puts it in .venv/bin)."""
    found = os.environ.get("CMEVLM_HELM") or shutil.which("helm") or shutil.which("helm", path=str(Path(sys.executable).parent))
    if not found:
        raise SubmitError("cmevlm submit renders the Helm chart and needs the helm binary (PATH, .venv/bin or $CMEVLM_HELM)")
    return found


def release_name(target: str, cfg: RunConfig) -> str:
    """run-<hash of the run config and the target>: the same run gets the same names."""
    digest = hashlib.sha256(json.dumps([target, public_dict(cfg)], sort_keys=True).encode()).hexdigest()[:8]
    return f"run-{digest}"


def run_values(target: str, cfg: RunConfig) -> dict:
    """The values that make the chart render exactly this run: its config, `target` enabled."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    return {"runConfig": public_dict(cfg), "pipeline": {"enabled": target == "pipeline"},
            "stages": {name: {"enabled": name == target} for name in NAMES}, "serve": {"enabled": False}}


def render(target: str, cfg: RunConfig, namespace: str = "default", values_files: tuple[str, ...] = ()) -> list[dict]:
    """The objects the chart renders for this run, in the order to create them."""
    docs = template(release_name(target, cfg), [*values_files, run_values(target, cfg)], namespace)
    return sorted(docs, key=lambda d: d["kind"] == "RayJob")  # the RayJob last, once what it needs exists


def template(release: str, values: list, namespace: str = "default") -> list[dict]:
    """`helm template` of the chart with `values` (files, or dicts written to temporary files) in order."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [helm_binary(), "template", release, str(CHART), "--namespace", namespace]
        for i, v in enumerate(values):
            if isinstance(v, dict):
                path = Path(tmp) / f"values-{i}.yaml"
                path.write_text(yaml.safe_dump(v))
                v = path
            args += ["-f", str(v)]
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SubmitError(f"helm template failed: {r.stderr.strip()}")
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    for d in docs:
        d["metadata"]["namespace"] = namespace
    return docs


def rayjob(docs: list[dict]) -> dict:
    return next(d for d in docs if d["kind"] == "RayJob")


# ---------------------------------------------------------------------------------------------
# Submission


def _api(host: str | None = None):
    """A kubernetes ApiClient: an explicit host (tests, proxies), kubeconfig, or in-cluster."""
    from kubernetes import client, config

    if host:
        c = client.Configuration()
        c.host = host
        return client.ApiClient(c)
    try:
        config.load_kube_config()
    except Exception:
        config.load_incluster_config()
    return client.ApiClient()


def _create(api, doc: dict, namespace: str):
    """Create one rendered object with the API group's client."""
    from kubernetes import client

    kind = doc["kind"]
    if kind == "RayJob":
        return client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, doc)
    create = {
        "ConfigMap": client.CoreV1Api(api).create_namespaced_config_map,
        "ServiceAccount": client.CoreV1Api(api).create_namespaced_service_account,
        "Role": client.RbacAuthorizationV1Api(api).create_namespaced_role,
        "RoleBinding": client.RbacAuthorizationV1Api(api).create_namespaced_role_binding,
        "NetworkPolicy": client.NetworkingV1Api(api).create_namespaced_network_policy,
    }[kind]
    return create(namespace, doc)


def submit(target: str, cfg: RunConfig, namespace: str = "default", host: str | None = None,
           values_files: tuple[str, ...] = ()) -> dict:
    """Create what the chart renders for this run (an identical object of the same name is
    kept); returns the RayJob."""
    from kubernetes.client.rest import ApiException

    api = _api(host)
    docs = render(target, cfg, namespace, values_files)
    for doc in docs:
        try:
            created = _create(api, doc, namespace)
        except ApiException as e:
            if e.status == 409 and doc["kind"] != "RayJob":  # the same name means the same run: keep it
                continue
            raise _explain(e, f"{doc['kind']} {doc['metadata']['name']}", namespace) from None
    return created


def _explain(e, what: str, namespace: str) -> SubmitError:
    if e.status == 404:
        return SubmitError(f"{what}: not found (404): is KubeRay installed (the RayJob CRD, ray.io/v1) and does namespace {namespace!r} exist?")
    if e.status == 409:
        return SubmitError(f"{what} already exists (409): the same stage with the same config was submitted before; "
                           f"see `kubectl get rayjobs -n {namespace}`")
    if e.status == 403:
        return SubmitError(f"{what}: forbidden (403): your account may not create it in namespace {namespace!r}")
    return SubmitError(f"{what}: the API server answered {e.status}: {e.reason}")


def wait(name: str, namespace: str = "default", host: str | None = None, poll_s: float = 10.0, echo=print) -> str:
    """Follow status.jobStatus until the job ends; returns the final status."""
    from kubernetes import client

    api = client.CustomObjectsApi(_api(host))
    last = None
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = (obj.get("status") or {})
        js, deploy = status.get("jobStatus") or "PENDING", status.get("jobDeploymentStatus") or ""
        if (js, deploy) != last:
            echo(f"{name}: {js} {deploy}".rstrip())
            last = (js, deploy)
        if js in ("SUCCEEDED", "FAILED", "STOPPED") or deploy in ("Failed", "Complete"):
            return js
        time.sleep(poll_s)
