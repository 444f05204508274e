"""Ray's own autoscaler on this machine: `ray.cluster_utils.AutoscalingCluster`, the fake
multi-node provider Ray tests its autoscaler with (each "node" a raylet on this machine,
started and stopped by Ray's autoscaler monitor), with node types taken from the chart's render.

Two changes to Ray's class, both forced by this machine and Ray 2.60's wheel:
- the provider config is written inline: the wheel lacks `fake_multi_node/example.yaml`, which
  `AutoscalingCluster._generate_config` reads;
- `start` / `shutdown` run without `ray stop --force` (which ends every Ray process on the
  machine, another test's included): this cluster gets its own temp dir and port, and shutdown
  ends the processes whose command line names that temp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from ray.cluster_utils import AutoscalingCluster

from conftest import free_port

# The chart's groups scaled to a 2-core machine: logical CPUs (Ray does not check them against
# the machine), and an "h100" custom resource standing for the GPUs (no GPU here), 1 per 4.
CPU_PER_CHART_CPU = 1 / 32
GPU_SLOTS_PER_GPU = 1 / 4
OBJECT_STORE_BYTES = 300 * 2**20  # per fake node (24 GiB machine)


def scaled(chart_types: dict[str, dict], max_workers: dict[str, int]) -> dict[str, dict]:
    """Autoscaler node types from cmevlm.placement.node_types of the rendered chart."""
    out = {}
    for group, t in chart_types.items():
        r = t["resources"]
        resources = {"CPU": max(1, round(r.get("CPU", 0) * CPU_PER_CHART_CPU)), "object_store_memory": OBJECT_STORE_BYTES}
        if r.get("GPU"):
            resources["h100"] = max(1, round(r["GPU"] * GPU_SLOTS_PER_GPU))
        out[group] = {"resources": resources, "node_config": {}, "min_workers": 0,
                      "max_workers": min(t["max_workers"], max_workers.get(group, t["max_workers"]))}
    return out


class LocalAutoscalingCluster(AutoscalingCluster):
    def __init__(self, worker_node_types: dict, idle_timeout_minutes: float = 0.2):
        from ray._private.services import get_node_ip_address

        self.port, self.ip = free_port(), get_node_ip_address()  # the address Ray itself would give a local head
        self.temp_dir = tempfile.mkdtemp(prefix="rayas", dir="/tmp")  # short: Ray's socket paths have a limit
        super().__init__(head_resources={"CPU": 0}, worker_node_types=worker_node_types, idle_timeout_minutes=idle_timeout_minutes)

    @property
    def worker_types(self) -> dict:
        return {g: t for g, t in self._config["available_node_types"].items() if g != "ray.head.default"}

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        types = dict(worker_node_types)
        types["ray.head.default"] = {"resources": dict(head_resources), "node_config": {}, "max_workers": 0}
        return {"cluster_name": "cmevlm-fake", "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
                "provider": {"type": "fake_multinode", "gcs_address": f"{self.ip}:{self.port}", "use_node_id_as_ip": True,
                             "disable_node_updaters": True, "disable_launch_config_check": True},
                "available_node_types": types, "head_node_type": "ray.head.default", "upscaling_speed": 1000,
                "idle_timeout_minutes": 1, "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
                "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
                "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
                "worker_start_ray_commands": [], **config_kwargs}

    def start(self, _system_config=None, override_env=None):
        config = Path(self.temp_dir) / "autoscaling.json"
        config.write_text(json.dumps(self._config))
        env = {**os.environ, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **(override_env or {})}
        ray_cli = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray_cli, "start", "--head", f"--port={self.port}", f"--node-ip-address={self.ip}", "--num-cpus=0",
                        f"--temp-dir={self.temp_dir}", f"--autoscaling-config={config}", "--include-dashboard=false",
                        "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)

    def shutdown(self):
        """End this cluster's processes only (every one names its temp dir), workers first."""
        mine = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.temp_dir in part for part in (p.info["cmdline"] or [])):
                    mine.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in mine:
                try:
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    pass
            gone, mine = psutil.wait_procs(mine, timeout=10)
            if not mine:
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def alive_by_type(ray) -> dict[str, int]:
    """Alive worker nodes per group, told apart by their resources (`h100` only on that group)."""
    counts = {"cpu": 0, "h100": 0}
    for n in ray.nodes():
        if n["Alive"] and n["Resources"].get("CPU", 0) > 0:
            counts["h100" if "h100" in n["Resources"] else "cpu"] += 1
    return counts
