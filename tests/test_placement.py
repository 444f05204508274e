"""`cmevlm plan --values`: every stage's Ray requests against the chart's clusters, decided by
Ray's own KubeRay node-type reading and autoscaler v2 scheduler (cmevlm/placement.py)."""

from pathlib import Path

import pytest
import yaml

from cmevlm import k8s, placement
from cmevlm.cli import main
from cmevlm.config import load_config

REPO = Path(__file__).resolve().parent.parent
CLUSTER = str(REPO / "configs" / "cluster.example.yaml")
VALUES = str(REPO / "helm" / "cmevlm" / "values.yaml")


def _job_cluster(values: dict | None = None) -> dict:
    return placement.ray_clusters(k8s.template("t", [values or {}]))["job"]


def test_the_charts_pods_as_rays_autoscaler_reads_them():
    """Ray's reading of the rendered groups: CPUs and memory from the container limits, GPUs from
    nvidia.com/gpu, maxReplicas as the bound; memory without the 30 % object store."""
    types = placement.node_types(_job_cluster())
    assert set(types) == {"cpu", "h100"}  # the head (num-cpus 0) is no worker type
    assert types["h100"]["resources"]["CPU"] == 64 and types["h100"]["resources"]["GPU"] == 8
    assert types["h100"]["resources"]["memory"] == pytest.approx(0.7 * 512 * 2**30)
    assert types["h100"]["max_workers"] == 1 and types["cpu"]["max_workers"] == 4


def test_the_shipped_example_places_every_stage(capsys):
    assert main(["plan", "--config", CLUSTER, "--values", VALUES]) == 0
    out = capsys.readouterr().out
    assert "8 x {CPU: 6, GPU: 1}" in out and "Ray Train workers (PACK): yes (h100 x1)" in out
    assert "Serve replicas at max_replicas: yes (rtx4090 x4)" in out and "NO" not in out


@pytest.mark.parametrize("change, stage, says", [
    # the shape this issue found: 8 x {CPU: 8, GPU: 1} = 64 CPUs on one 16-CPU pod
    (["--set", "sft.resources_per_worker={CPU: 8, GPU: 1}", "--set", "workers_h100_cpu=16"], "sft",
     "group h100's pod offers CPU: 16, GPU: 8, 2 bundle(s) per pod, at most 1 pod(s): CPU per bundle <= 2"),
    (["--set", "dpo.placement_strategy=STRICT_SPREAD"], "dpo", "placement strategy PACK instead of STRICT_SPREAD"),
    (["--set", "serve.accelerator_type=RTX"], "serve", "no group declares accelerator_type:RTX"),
    (["--set", "ingest.num_cpus_per_actor=5"], "ingest", "no pod of any group holds one bundle"),
])
def test_a_stage_ray_cannot_place_is_refused_with_its_group_and_fix(change, stage, says, tmp_path, capsys):
    site = yaml.safe_load(Path(VALUES).read_text())
    if "workers_h100_cpu=16" in change:
        change = change[:2]
        site["workers"]["h100"]["resources"] = {"requests": {"cpu": "16", "memory": "128Gi"}, "limits": {"cpu": "16", "memory": "128Gi"}}
    if stage == "ingest":
        site["workers"]["h100"]["enabled"] = False  # a CPU-only cluster: no pod holds 5 CPUs
    values = tmp_path / "site.yaml"
    values.write_text(yaml.safe_dump(site))
    assert main(["plan", "--config", CLUSTER, "--values", str(values), *change]) == 3
    out = capsys.readouterr().out
    refusal = next(line for line in out.splitlines() if line.startswith(f"{stage} cannot be placed by Ray"))
    assert says in refusal, refusal


def test_the_check_agrees_with_rays_scheduler_on_strategies():
    """Gangs as the GCS hands them over: PACK may use several pods, STRICT_PACK needs one pod,
    STRICT_SPREAD one pod per bundle."""
    types = {"h100": {"resources": {"CPU": 16.0, "GPU": 8.0}, "min_workers": 0, "max_workers": 2}}
    gang = lambda n, cpu, strategy: placement.Demand("sft", "w", {"CPU": cpu, "GPU": 1.0}, n, strategy, "k")  # noqa: E731
    assert placement.placeable(gang(16, 2, "PACK"), types) == (True, {"h100": 2})
    assert not placement.placeable(gang(16, 2, "STRICT_PACK"), types)[0]
    assert placement.placeable(gang(8, 2, "STRICT_PACK"), types) == (True, {"h100": 1})
    assert not placement.placeable(gang(3, 1, "STRICT_SPREAD"), types)[0]
    assert not placement.placeable(gang(17, 1, "PACK"), types)[0]


def test_stage_demands_follow_the_run_config():
    cfg = load_config(CLUSTER)
    d = {(x.stage, x.what): x for x in placement.stage_demands(cfg)}
    train = d[("sft", "Ray Train workers (PACK)")]
    assert train.count == 8 and train.bundle == {"CPU": 6.0, "GPU": 1.0} and train.strategy == "PACK"
    assert d[("sample", "Ray Data model actors")].bundle == {"CPU": 4.0, "GPU": 1.0}
    assert d[("sft", "export task")].bundle["memory"] == cfg.model.export_memory_gb * 2**30
