"""The whole method end to end on a reduced run, through the real `cmevlm pipeline` code path,
on Ray's own autoscaler (tests/autoscaling.py) with the chart's worker groups: every stage's
outputs exist and agree (row counts carried through, ids join), the groups scale up when a
stage asks and back to zero when idle, nothing runs on the 0-CPU head, and a shape the plan
refuses is indeed never placed."""

import json
import threading
import time

import pytest

from autoscaling import LocalAutoscalingCluster, alive_by_type, scaled
from cmevlm import k8s, pipeline, placement
from cmevlm.config import load_config
from cmevlm.storage import Storage
from conftest import wait_for

SMALL = ["data.image_size=56", "teacher.batch_size=8",
         "sft.num_workers=2", "sft.max_steps=3", "sft.per_device_batch_size=2", "sft.effective_batch_size=4", "sft.lr=1e-3",
         "sample.limit=6", "sample.batch_size=6", "sample.max_new_tokens=10",
         "dpo.num_workers=2", "dpo.max_steps=2", "dpo.per_device_batch_size=1", "dpo.effective_batch_size=2", "dpo.lr=1e-4",
         "evaluate.limit=6", "evaluate.max_new_tokens=10"]


@pytest.fixture
def autoscaling_cluster():
    """The chart's default Ray cluster as Ray's autoscaler sees it, scaled to this machine: head
    with 0 CPUs, the cpu group (1 CPU a pod, at most 2) and the H100 group (2 CPUs, 2 `h100`
    slots standing for its GPUs, at most 1), both from zero."""
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the session's local Ray; connect() starts a new one for later tests
    spec = placement.ray_clusters(k8s.template("t", [{}]))["job"]
    cluster = LocalAutoscalingCluster(scaled(placement.node_types(spec), {"cpu": 2}))
    cluster.start()
    try:
        yield cluster
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()


def _run_sampling(ray, cfg, lines):
    """pipeline.run with the largest node count per group seen while it runs, and the driver's
    CPU seconds per stage."""
    seen, stop, cpu = {"cpu": 0, "h100": 0}, threading.Event(), []

    def sample():
        while not stop.wait(1.0):
            for group, n in alive_by_type(ray).items():
                seen[group] = max(seen[group], n)

    def echo(line):
        cpu.append(time.process_time())
        lines.append(line)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.process_time()
    try:
        results = pipeline.run(cfg, echo=echo)
    finally:
        stop.set()
        thread.join()
    return results, seen, [b - a for a, b in zip([start, *cpu], cpu)]


def test_reduced_pipeline_end_to_end(autoscaling_cluster, tmp_path, synth_dir, tiny_model_dir):
    from cmevlm.cluster import connect

    gang = {"sft.resources_per_worker": "{CPU: 1, h100: 1}", "dpo.resources_per_worker": "{CPU: 1, h100: 1}"}
    cfg = load_config(overrides=[f"workdir={tmp_path / 'run'}", f"model.base={tiny_model_dir}", f"ray.address={autoscaling_cluster.address}",
                                 f"sources=[{{uri: '{synth_dir}'}}]", *SMALL, *(f"{k}={v}" for k, v in gang.items())])
    ray = connect(cfg.ray)
    assert alive_by_type(ray) == {"cpu": 0, "h100": 0} and ray.cluster_resources().get("CPU", 0) == 0  # from zero; the head has 0 CPUs
    lines = []
    results, seen, driver_cpu = _run_sampling(ray, cfg, lines)
    assert [r.stage for r in results] == list(pipeline.STAGES) and not any(r.skipped for r in results)
    assert len(lines) == 7 and all(" done in " in x for x in lines)
    assert seen["cpu"] >= 1 and seen["h100"] == 1, seen  # each group came up when a stage asked for it
    assert max(driver_cpu) < 30, dict(zip(pipeline.STAGES, driver_cpu))  # the driver orchestrates; the work is in Ray
    assert wait_for(lambda: alive_by_type(ray) == {"cpu": 0, "h100": 0}, 120), (  # and went back to zero
        alive_by_type(ray), [(n["Resources"], n.get("ObjectStoreUsedMemory")) for n in ray.nodes() if n["Alive"]])

    st, wd = Storage(), tmp_path / "run"
    frames = st.read_manifest(str(wd / "frames"))
    sft = st.read_manifest(str(wd / "sft"))
    assert sft["train"] + sft["test"] == frames["accepted"]  # every accepted item got an answer
    frame_ids = set(st.read_parquet(str(wd / "frames/shards"), columns=["item_id"]).column("item_id").to_pylist())
    train = st.read_parquet(str(wd / "sft/train")).to_pylist()
    test_ids = {r["item_id"] for r in st.read_parquet(str(wd / "sft/test")).to_pylist()}
    assert {r["item_id"] for r in train} | test_ids <= frame_ids and not test_ids & {r["item_id"] for r in train}
    samples = st.read_parquet(str(wd / "samples/parts")).to_pylist()
    assert [s["item_id"] for s in samples] and {s["item_id"] for s in samples} <= {r["item_id"] for r in train[:6]}
    prefs = st.read_parquet(str(wd / "preferences/parts")).to_pylist()
    assert {p["item_id"] for p in prefs} == {s["item_id"] for s in samples}
    for name in ("sft", "dpo"):
        assert st.read_manifest(str(wd / "models" / name))["global_step"] > 0
        assert (wd / "models" / name / "model.safetensors").exists()
    metrics = json.loads((wd / "eval/metrics.json").read_text())
    assert set(metrics["models"]) == {"base", "sft", "dpo"} and metrics["n_test"] == 6
    answers = st.read_parquet(str(wd / "eval/answers.parquet")).to_pylist()
    assert {a["item_id"] for a in answers} <= test_ids and len(answers) == 6 * 3 * 2  # greedy and the default sampled mode
    assert set(metrics["sampled"]["t0.7_p0.9_s2024"]["models"]) == {"base", "sft", "dpo"}

    again = pipeline.run(cfg, echo=lines.append)  # everything complete: all skipped
    assert all(r.skipped for r in again)
    _refused_shape_is_never_placed(ray, autoscaling_cluster.worker_types)


def _refused_shape_is_never_placed(ray, worker_types: dict):
    """3 bundles of {CPU: 1, h100: 1} in one PACK group (one h100 pod of 2 CPUs, 2 slots): the plan's check (Ray's scheduler code)
    refuses it for these node types, and the running autoscaler indeed never places it."""
    from ray.util.placement_group import placement_group, remove_placement_group

    types = {g: {"resources": {k: float(v) for k, v in t["resources"].items()}, "max_workers": t["max_workers"]}
             for g, t in worker_types.items()}
    bundle = {"CPU": 1.0, "h100": 1.0}
    assert not placement.placeable(placement.Demand("sft", "workers", bundle, 3, "PACK", "k"), types)[0]
    assert placement.placeable(placement.Demand("sft", "workers", bundle, 2, "PACK", "k"), types)[0]
    pg = placement_group([bundle] * 3, strategy="PACK")
    try:
        assert not pg.wait(timeout_seconds=20)
        assert alive_by_type(ray)["h100"] <= 1
    finally:
        remove_placement_group(pg)


def test_a_failing_stage_is_named(tmp_path, tiny_model_dir):
    cfg = load_config(overrides=[f"workdir={tmp_path / 'run'}", f"model.base={tiny_model_dir}"])
    with pytest.raises(pipeline.StageFailed) as e:
        pipeline.run(cfg, start="sft", stop="sft", echo=lambda _: None)
    assert e.value.stage == "sft" and "teach" in str(e.value)


@pytest.mark.slow
def test_demo_learning_signal(tmp_path):
    """The demo's claim (slow: ~6 min): on held-out procedures the SFT model names the
    structure (>= 0.8) where the random base cannot (<= 0.3); SFT beats base on BLEU-4 and
    BERTScore; DPO keeps the judge score within 0.1 of SFT."""
    from cmevlm import demo

    cfg = load_config()
    workdir = str(tmp_path / "demo")
    cfg.workdir, cfg.model.base, cfg.sources[0].uri = workdir, workdir + "/models/base", workdir + "/synth"
    m = demo.run(cfg)["metrics"]["models"]
    assert m["sft"]["structure_accuracy"] >= 0.8 and m["base"]["structure_accuracy"] <= 0.3
    assert m["sft"]["bleu4"]["mean"] > m["base"]["bleu4"]["mean"]
    assert m["sft"]["bertscore_f1"]["mean"] > m["base"]["bertscore_f1"]["mean"]
    assert m["dpo"]["judge"]["mean"] >= m["sft"]["judge"]["mean"] - 0.1
