"""Will Ray place every stage on the chart's Ray clusters? Ray's own autoscaler answers.

    cmevlm plan --config run.yaml --values site-values.yaml

GPU memory (cmevlm.plan) is one question; whether Ray can *place* what a stage asks for is
another: a Ray Train placement group of 8 bundles `{CPU: 8, GPU: 1}` on a group whose one pod
offers 16 CPUs is never placed, and Ray only logs "No available node types can fulfill resource
request" while the job waits with the GPUs held. This module asks the same code Ray runs:

1. the clusters as the chart renders them (`helm template`: the pipeline RayJob's
   `rayClusterSpec`, the RayService's `rayClusterConfig`);
2. each worker group as Ray's KubeRay autoscaler sees it: Ray's own
   `_derive_autoscaling_config_from_ray_cr` (num-cpus / num-gpus / memory / custom resources
   from `rayStartParams`, else the container limits; maxReplicas x numOfHosts). A started node
   reports `memory` without its object store (30 % of the pod's memory by default), so that
   share is taken off here as on the node;
3. each stage's requests as the stage makes them: Ray Train's worker bundles (Ray Train's own
   `ScalingConfig`; in Ray 2.60 the trainer's controller actor asks 0 CPUs) as one gang with the
   stage's placement strategy (STRICT_PACK as affinity, STRICT_SPREAD as anti-affinity, as the
   GCS hands placement groups to the autoscaler), Ray Data's actor pools (ingest, teach, prefer,
   sample, evaluate and its judge), the export task, Serve's replicas at max_replicas;
4. Ray autoscaler v2's `ResourceDemandScheduler` schedules each stage alone on the empty
   cluster (the pipeline runs its stages in order); what it calls infeasible is refused.

docs/placement.md has the sources of each rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmevlm.config import RunConfig

# Ray's default object store: 30 % of the node's memory, which the node's `memory` resource excludes.
OBJECT_STORE_FRACTION = 0.3
# The values key of each worker group the chart renders (cmevlm.rayCluster, rayservice.yaml).
GROUP_VALUES = {"cpu": "workers.cpu", "h100": "workers.h100", "rtx4090": "serve.rtx4090"}


@dataclass
class Demand:
    """What one stage asks Ray for: `count` bundles, as one placement group with `strategy`
    (Ray Train) or as separate actors / tasks (strategy None); `knob` is the config key that sets it."""

    stage: str
    what: str
    bundle: dict
    count: int
    strategy: str | None
    knob: str
    cluster: str = "job"  # "job": the RayJob's cluster; "serve": the RayService's


def _train_bundle(t) -> dict:
    """The bundle of one Ray Train worker, as Ray Train's own ScalingConfig builds it."""
    from ray.train import ScalingConfig

    sc = ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=dict(t.resources_per_worker),
                       placement_strategy=t.placement_strategy)
    return {k: float(v) for k, v in sc._resources_per_worker_not_none.items() if v}


def _actors(stage: str, what: str, section: str, sc, gpus: float = 0.0) -> Demand:
    bundle = {"CPU": float(sc.num_cpus_per_actor), **({"GPU": float(gpus)} if gpus else {})}
    return Demand(stage, what, bundle, sc.concurrency, None, f"{section}.concurrency / {section}.num_cpus_per_actor")


def stage_demands(cfg: RunConfig) -> list[Demand]:
    """Every Ray request of every stage, in pipeline order, then serving."""
    demands = [_actors("ingest", "Ray Data actors", "ingest", cfg.ingest),
               _actors("teach", "teacher actors", "teacher", cfg.teacher)]
    for stage in ("sft", "dpo"):
        t = getattr(cfg, stage)
        demands.append(Demand(stage, f"Ray Train workers ({t.placement_strategy})", _train_bundle(t), t.num_workers,
                              t.placement_strategy, f"{stage}.resources_per_worker / {stage}.num_workers"))
        demands.append(Demand(stage, "export task", {"CPU": 1.0, "memory": cfg.model.export_memory_gb * 2**30}, 1, None,
                              "model.export_memory_gb"))
        if stage == "sft":
            demands.append(_actors("sample", "Ray Data model actors", "sample", cfg.sample, cfg.sample.num_gpus_per_actor))
            demands.append(_actors("prefer", "judge actors", "judge", cfg.judge))
    demands.append(_actors("evaluate", "Ray Data model actors", "evaluate", cfg.evaluate, cfg.evaluate.num_gpus_per_actor))
    demands.append(_actors("evaluate", "judge actors", "judge", cfg.judge))
    e = cfg.evaluate
    demands.append(Demand("evaluate", "metrics actors (BLEU, BERTScore)", {"CPU": float(e.metrics_num_cpus), "memory": e.metrics_memory_gb * 2**30},
                          e.metrics_concurrency, None, "evaluate.metrics_num_cpus / evaluate.metrics_memory_gb"))
    s = cfg.serve
    replica = {"CPU": float(s.num_cpus_per_replica), **({"GPU": float(s.num_gpus_per_replica)} if s.num_gpus_per_replica else {}),
               **({f"accelerator_type:{s.accelerator_type}": 0.001} if s.accelerator_type else {})}
    demands.append(Demand("serve", "Serve replicas at max_replicas", replica, s.max_replicas, None,
                          "serve.max_replicas / serve.num_cpus_per_replica / serve.accelerator_type", "serve"))
    return demands


def node_types(ray_cluster_spec: dict, name: str = "cmevlm") -> dict[str, dict]:
    """The worker groups of a RayCluster spec as Ray's KubeRay autoscaler reads them, with
    `memory` as a started node reports it (without the object store)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    derived = _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"}, "spec": ray_cluster_spec})
    types = {}
    for group, t in derived["available_node_types"].items():
        if group == derived["head_node_type"]:
            continue
        resources = {k: float(v) for k, v in t["resources"].items()}
        if "memory" in resources:
            resources["memory"] *= 1 - OBJECT_STORE_FRACTION
        types[group] = {"resources": resources, "min_workers": t["min_workers"], "max_workers": t["max_workers"]}
    return types


def _gang(d: Demand):
    from ray.core.generated.autoscaler_pb2 import (AffinityConstraint, AntiAffinityConstraint, GangResourceRequest,
                                                   PlacementConstraint, ResourceRequest)

    requests = []
    for _ in range(d.count):
        r = ResourceRequest(resources_bundle=d.bundle)
        if d.strategy == "STRICT_SPREAD":
            r.placement_constraints.append(PlacementConstraint(anti_affinity=AntiAffinityConstraint(label_name="_PG_plan")))
        elif d.strategy == "STRICT_PACK":
            r.placement_constraints.append(PlacementConstraint(affinity=AffinityConstraint(label_name="_PG_plan")))
        requests.append(r)
    return GangResourceRequest(requests=requests, details=f"{d.stage} {d.what}")


def placeable(d: Demand, types: dict[str, dict]) -> tuple[bool, dict[str, int]]:
    """Ray autoscaler v2's answer for this demand alone on an empty cluster of `types`:
    (placeable, pods it would launch per group)."""
    from ray.autoscaler.v2.scheduler import NodeTypeConfig, ResourceDemandScheduler, SchedulingRequest
    from ray.core.generated.autoscaler_pb2 import ResourceRequest, ResourceRequestByCount

    configs = {g: NodeTypeConfig(name=g, min_worker_nodes=0, max_worker_nodes=t["max_workers"], resources=t["resources"])
               for g, t in types.items()}
    request = SchedulingRequest(disable_launch_config_check=True, node_type_configs=configs)
    if d.strategy:
        request.gang_resource_requests.append(_gang(d))
    else:
        request.resource_requests.append(ResourceRequestByCount(request=ResourceRequest(resources_bundle=d.bundle), count=d.count))
    reply = ResourceDemandScheduler().schedule(request)
    launched: dict[str, int] = {}
    for launch in reply.to_launch:
        launched[launch.instance_type] = launched.get(launch.instance_type, 0) + launch.count
    return not (reply.infeasible_gang_resource_requests or reply.infeasible_resource_requests), launched


def _per_pod(bundle: dict, resources: dict) -> int:
    """How many bundles one pod holds (resources the bundle does not ask for do not limit it)."""
    return min((math.floor(resources.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0), default=0)


def fix(d: Demand, types: dict[str, dict]) -> tuple[str, str]:
    """(the group Ray would use, what would make the demand placeable), from the group that holds
    the most bundles per pod."""
    if not types:
        return "-", "the cluster has no worker group"
    group = max(types, key=lambda g: (_per_pod(d.bundle, types[g]["resources"]), types[g]["max_workers"]))
    t = types[group]
    offers = ", ".join(f"{k}: {_fmt(v)}" for k, v in t["resources"].items() if k in d.bundle)
    per_pod = _per_pod(d.bundle, t["resources"])
    undeclared = [k for k in d.bundle if k.startswith("accelerator_type:") and not any(k in x["resources"] for x in types.values())]
    if undeclared:
        return group, (f"no group declares {', '.join(undeclared)}: the autoscaler knows a group's accelerator only from its "
                       "rayStartParams resources, and a started node names its GPU as Ray reads it (an RTX 4090 is "
                       "GeForce-RTX-4090, an H100 is H100); drop serve.accelerator_type where one group serves")
    if per_pod == 0:
        short = [k for k, v in d.bundle.items() if t["resources"].get(k, 0.0) < v]
        return group, (f"no pod of any group holds one bundle (group {group}'s pod offers {offers or 'none of ' + ', '.join(short)} to "
                       f"Ray); lower {d.knob}, or give {GROUP_VALUES.get(group, group)} pods more {', '.join(short)}")
    pods = -(-d.count // per_pod)
    options = []
    for k, v in d.bundle.items():
        most = t["resources"].get(k, 0.0) / -(-d.count // max(t["max_workers"], 1))
        if most < v:
            options.append(f"{k} per bundle <= {_fmt(most)} ({d.knob})")
    options.append(f"{GROUP_VALUES.get(group, group)}.maxReplicas >= {pods}" if pods > t["max_workers"] else None)
    if d.strategy in ("STRICT_PACK", "STRICT_SPREAD"):
        options.append(f"placement strategy PACK instead of {d.strategy}")
    return group, f"group {group}'s pod offers {offers}, {per_pod} bundle(s) per pod, at most {t['max_workers']} pod(s): " + \
        "; or ".join(o for o in options if o)


def _fmt(v: float) -> str:
    return f"{v / 2**30:.1f} GiB" if v >= 2**20 else f"{v:g}"


def ray_clusters(docs: list[dict]) -> dict[str, dict]:
    """The RayCluster specs in rendered chart objects: "job" (a RayJob's) and "serve" (the RayService's)."""
    clusters = {"job": d["spec"]["rayClusterSpec"] for d in docs if d["kind"] == "RayJob"}
    return clusters | {"serve": d["spec"]["rayClusterConfig"] for d in docs if d["kind"] == "RayService"}


def checks(cfg: RunConfig, clusters: dict[str, dict]) -> list[dict]:
    """One entry per demand: placeable or not on its cluster (`clusters`: "job" / "serve" ->
    RayCluster spec, as rendered), the pods Ray would start, and the fix."""
    types = {name: node_types(spec) for name, spec in clusters.items()}
    out = []
    for d in stage_demands(cfg):
        if d.cluster not in types:
            continue
        ok, launched = placeable(d, types[d.cluster])
        bundle = "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in d.bundle.items()) + "}"
        entry = {"stage": d.stage, "asks": f"{d.count} x {bundle}", "what": d.what, "strategy": d.strategy, "fits": ok,
                 "pods": launched}
        if not ok:
            entry["group"], entry["fix"] = fix(d, types[d.cluster])
        out.append(entry)
    return out
