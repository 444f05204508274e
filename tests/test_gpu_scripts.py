"""The GPU machine has torch and transformers only (no Ray, DeepSpeed, TRL, nor this package's
dependencies): every script under bench/gpu/ must import there. Checked here with those packages
made unimportable, and the training comparison checked against a real plan."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GPU = ROOT / "bench" / "gpu"
# What the GPU machine lacks: importing any of these there fails.
ABSENT = ("ray", "deepspeed", "trl", "peft", "cmevlm", "pyarrow", "nvflare")

BLOCKER = """
import importlib.abc, runpy, sys
ABSENT = {absent!r}
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)")
sys.meta_path.insert(0, Absent())
for m in [m for m in sys.modules if m.split(".")[0] in ABSENT]:
    del sys.modules[m]
sys.path = [p for p in sys.path if p not in ("{root}", "")]
mod = runpy.run_path({script!r}, run_name="gpu_check")
import transformers  # what the scripts may use
print("imported", sorted(k for k in mod if not k.startswith("_"))[:5])
"""


def test_only_python_scripts_under_bench_gpu():
    assert {p.suffix for p in GPU.iterdir() if p.is_file()} <= {".py", ".yaml", ".md"}


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.py")))
def test_gpu_script_imports_with_torch_and_transformers_only(script):
    code = BLOCKER.format(absent=ABSENT, root=str(ROOT), script=str(GPU / script))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "imported" in r.stdout


def test_training_is_compared_phase_by_phase(tmp_path):
    """The forward and backward estimates each leave out what that phase does not hold, so both
    are below the plan's sum of parts; the peak is the larger."""
    import runpy

    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "plan", "--config", "bench/gpu/plan.yaml", "--json"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    plan = json.loads(r.stdout)
    (tmp_path / "plan.json").write_text(r.stdout)
    sft = next(s for s in plan["stages"] if s["stage"] == "sft")
    parts = sft["parts_gib"]
    assert {"autocast copies", "gradients", "logits", "activations"} <= set(parts)
    mod = runpy.run_path(str(GPU / "real_size.py"), run_name="gpu_check")
    results = {"train": {"peak_gib": 40.0, "forward_peak_gib": 38.0, "backward_peak_gib": 40.0}}
    mod["compare"](results, str(tmp_path / "plan.json"), "sft", "train")
    t = results["train"]
    total = sft["need_gib"] - parts["overhead"]
    assert t["plan_phases_gib"]["forward"] == pytest.approx(total - parts["gradients"], abs=0.02)
    assert t["plan_phases_gib"]["backward"] == pytest.approx(total - parts["autocast copies"], abs=0.02)
    assert t["plan_phases_gib"]["peak"] == max(t["plan_phases_gib"]["forward"], t["plan_phases_gib"]["backward"]) < total
    assert t["measured_over_plan"] == round(40.0 / t["plan_phases_gib"]["peak"], 3)
