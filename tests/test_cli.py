"""The real `cmevlm` command, run as a subprocess."""

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cmevlm.stages import NAMES

ROOT = Path(__file__).resolve().parent.parent


def cmevlm(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if check and r.returncode:
        raise AssertionError(f"cmevlm {args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


# The subcommands the README documents: the tools, every stage of the registry, the rest.
SUBCOMMANDS = ("config", "plan", "synth", "tiny-model", *NAMES, "serve", "review", "submit", "demo", "pipeline", "federate", "site")


def test_help_lists_every_subcommand_with_a_line():
    out = cmevlm("--help").stdout
    unknown = cmevlm("no-such-command", check=False).stderr  # argparse names every valid choice
    assert re.findall(r"'([a-z-]+)'", unknown.split("choose from", 1)[1]) == list(SUBCOMMANDS)
    for name in SUBCOMMANDS:
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert len(line.split()) > 2, line


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    out = cmevlm(name, "--help").stdout
    assert out.startswith("usage: cmevlm " + name)


def test_synth_twice_is_byte_identical(tmp_path):
    for d in "ab":
        cmevlm("synth", "--out", str(tmp_path / d), "--procedures", "4", "--frames-per-procedure", "5", "--seed", "1", "--quiet")
    h = lambda root: {p.relative_to(root): hashlib.sha256(p.read_bytes()).digest() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    a, b = h(tmp_path / "a"), h(tmp_path / "b")
    assert a == b and len(a) > 20
    text = (tmp_path / "a/procedures.csv").read_text()
    assert "left" in text and "right" in text
    masks = {p.stem for p in (tmp_path / "a").glob("*/masks/*/*.png")}
    assert len(masks) == 5


def test_tiny_model_command(tmp_path):
    r = cmevlm("tiny-model", "--out", str(tmp_path / "m"), "--max-image-tokens", "16")
    assert "at most 16 image tokens" in r.stdout and "laid out as Qwen2.5-VL-7B-Instruct" in r.stdout
    assert (tmp_path / "m/model.safetensors.index.json").exists() and (tmp_path / "m/chat_template.json").exists()


def test_config_errors_exit_2_with_a_clear_message():
    r = cmevlm("config", "--set", "data.nope=1", check=False)
    assert r.returncode == 2
    assert "unknown key 'data.nope'" in r.stderr and "image_size" in r.stderr
    r = cmevlm("config", "--config", "/nonexistent.yaml", check=False)
    assert r.returncode == 2 and "not found" in r.stderr


def test_config_prints_resolved_yaml():
    out = cmevlm("config", "--set", "data.image_size=224").stdout
    assert "image_size: 224" in out


def test_ingest_command_quarantines_and_strict_fails(tmp_path, bad_source):
    args = ["--set", f"workdir={tmp_path / 'run'}", "--set", f"sources=[{{uri: '{bad_source[0]}'}}]",
            "--set", "data.image_size=56", "--set", "ray.num_cpus=2"]
    r = cmevlm("ingest", *args, "--strict", check=False)
    assert r.returncode == 1, r.stderr
    n_bad = sum(bad_source[1]["quarantined"].values())
    assert f"{bad_source[1]['accepted']} accepted, {n_bad} quarantined" in r.stdout
    assert "--strict" in r.stderr
    r = cmevlm("ingest", *args)  # complete: skipped, and without --strict it succeeds
    assert r.returncode == 0 and "skipped" in r.stdout


def test_the_job_entry_point_runs_the_same_command_for_every_stage_and_the_pipeline(tmp_path):
    from cmevlm.stages import NAMES

    for name in ("pipeline", *NAMES):
        r = subprocess.run([sys.executable, "jobs/run.py", name, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0 and f"usage: cmevlm {name}" in r.stdout
    r = subprocess.run([sys.executable, "jobs/run.py", "serve"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "usage: python jobs/run.py pipeline|ingest|teach|sft" in r.stderr
