"""RayJob objects for each stage, and their submission through the Kubernetes API.

    cmevlm submit sft --config run.yaml [--namespace ml] [--dry-run] [--wait]

A stage's RayJob runs `python jobs/<stage>.py --config /etc/cmevlm/run.yaml` on a Ray cluster
that KubeRay creates for it and deletes after it (shutdownAfterJobFinishes): a head without
GPUs, and a worker group that is the H100 pool for the GPU stages (sft, dpo, sample, evaluate)
and CPU workers otherwise. The run config travels in a ConfigMap mounted at /etc/cmevlm; secrets
(GEMINI_API_KEY, AWS_*, serve keys) come from a Secret referenced by name, never by value.
Pods run as non-root on a read-only root filesystem (Ray writes to /tmp and ~/.cache
emptyDirs) with dropped capabilities and resource requests and limits.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from cmevlm.config import RunConfig, dump_config

GPU_STAGES = ("sft", "dpo", "sample", "evaluate")
STAGES = ("ingest", "teach", "sft", "sample", "prefer", "dpo", "evaluate")
GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"


@dataclass(frozen=True)
class ClusterSpec:
    """What the cluster offers; the defaults suit a KubeRay cluster with an H100 node pool."""

    image: str = "ghcr.io/cmevlm/cmevlm:0.1.0"
    ray_version: str = "2.60.0"
    secret: str = "cmevlm-secrets"
    service_account: str | None = None
    gpu_workers: int = 1
    cpu_workers: int = 1
    gpus_per_worker: int = 8
    gpu_node_selector: tuple = (("cmevlm.io/pool", "h100"),)
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 7 * 24 * 3600
    backoff_limit: int = 0


def _security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": 1000, "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _container(name: str, spec: ClusterSpec, cpu: str, memory: str, gpus: int = 0) -> dict:
    limits = {"cpu": cpu, "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {
        "name": name, "image": spec.image, "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": cpu, "memory": memory, **({"nvidia.com/gpu": str(gpus)} if gpus else {})}, "limits": limits},
        "securityContext": _security(),
        "envFrom": [{"secretRef": {"name": spec.secret, "optional": True}}],
        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
        "volumeMounts": [{"name": "run-config", "mountPath": "/etc/cmevlm", "readOnly": True}, {"name": "tmp", "mountPath": "/tmp"},
                         {"name": "cache", "mountPath": "/home/ray/.cache"}],
    }


def _pod(container: dict, config_map: str, spec: ClusterSpec, node_selector: dict | None = None, gpu: bool = False) -> dict:
    pod = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        "containers": [container],
        "volumes": [{"name": "run-config", "configMap": {"name": config_map}}, {"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}],
    }
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    if node_selector:
        pod["nodeSelector"] = node_selector
    if gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return pod


def job_name(stage: str, cfg: RunConfig) -> str:
    """cmevlm-<stage>-<hash of the run config>: the same config gives the same name (a 409
    on resubmission instead of a second paid run)."""
    return f"cmevlm-{stage}-{hashlib.sha256(dump_config(cfg).encode()).hexdigest()[:8]}"


def config_map(stage: str, cfg: RunConfig, namespace: str) -> dict:
    """The run config (secrets masked by dump_config) as a ConfigMap."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": job_name(stage, cfg) + "-config", "namespace": namespace, "labels": {"app.kubernetes.io/name": "cmevlm"}},
            "data": {"run.yaml": f"# python jobs/{stage}.py --config /etc/cmevlm/run.yaml\n" + dump_config(cfg)}}


def rayjob(stage: str, cfg: RunConfig, namespace: str = "default", spec: ClusterSpec = ClusterSpec()) -> dict:
    """The RayJob of one stage."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    name = job_name(stage, cfg)
    cm = name + "-config"
    gpu = stage in GPU_STAGES
    head = _container("ray-head", spec, "2", "8Gi")
    head["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"}]
    workers = _container("ray-worker", spec, "16" if gpu else "4", "128Gi" if gpu else "16Gi", spec.gpus_per_worker if gpu else 0)
    n = spec.gpu_workers if gpu else spec.cpu_workers
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": "cmevlm", "app.kubernetes.io/component": stage, "cmevlm.io/stage": stage}},
        "spec": {
            "entrypoint": f"python jobs/{stage}.py --config /etc/cmevlm/run.yaml",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            "backoffLimit": spec.backoff_limit,
            "submissionMode": "K8sJobMode",
            "rayClusterSpec": {
                "rayVersion": spec.ray_version,
                "headGroupSpec": {"rayStartParams": {"num-gpus": "0", "dashboard-host": "0.0.0.0"},
                                  "template": {"metadata": {"labels": {"cmevlm.io/stage": stage}}, "spec": _pod(head, cm, spec)}},
                "workerGroupSpecs": [{
                    "groupName": "h100" if gpu else "cpu", "replicas": n, "minReplicas": n, "maxReplicas": n,
                    "rayStartParams": {},
                    "template": {"metadata": {"labels": {"cmevlm.io/stage": stage}},
                                 "spec": _pod(workers, cm, spec, dict(spec.gpu_node_selector) if gpu else None, gpu)},
                }],
            },
        },
    }


# ---------------------------------------------------------------------------------------------
# Submission


class SubmitError(RuntimeError):
    pass


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


def submit(stage: str, cfg: RunConfig, namespace: str = "default", host: str | None = None,
           spec: ClusterSpec = ClusterSpec()) -> dict:
    """Create the ConfigMap (or keep an identical one) and the RayJob; returns the RayJob."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    api = _api(host)
    job = rayjob(stage, cfg, namespace, spec)
    try:
        client.CoreV1Api(api).create_namespaced_config_map(namespace, config_map(stage, cfg, namespace))
    except ApiException as e:
        if e.status != 409:  # the same name means the same config: keep it
            raise _explain(e, "ConfigMap", namespace) from None
    try:
        return client.CustomObjectsApi(api).create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    except ApiException as e:
        raise _explain(e, f"RayJob {job['metadata']['name']}", namespace) from None


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
