"""SFT and DPO on Ray Train + DeepSpeed (CPU, gloo) with the tiny model and two workers."""

import json
import math
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pytest
import torch
from safetensors import safe_open


from cmevlm.config import load_config
from cmevlm.data.formats import PREF_SCHEMA
from cmevlm.model.loading import load_model, load_processor
from cmevlm.storage import Storage, join
from cmevlm.train import dpo, sft
from cmevlm.train.common import deepspeed_config, grad_accumulation
from cmevlm.train.freeze import apply_freeze, component
from conftest import weights

TRAIN = ["sft.num_workers=2", "sft.max_steps=6", "sft.checkpoint_every=3", "sft.per_device_batch_size=2",
         "sft.effective_batch_size=8", "sft.lr=1e-3", "sft.zero_stage=2", "sft.keep_checkpoints=3"]


def _cfg(workdir, base, *extra):
    return load_config(overrides=[f"workdir={workdir}", f"model.base={base}", "data.image_size=56", *TRAIN, *extra])





def _copy(taught, dest: Path) -> Path:
    import shutil

    for sub in ("frames", "sft"):
        shutil.copytree(taught / sub, dest / sub)
    return dest


@pytest.fixture(scope="module")
def sft_run(taught, tmp_path_factory, tiny_model_dir):
    workdir = _copy(taught, tmp_path_factory.mktemp("sft") / "run")
    manifest = sft.run(_cfg(workdir, tiny_model_dir))
    return workdir, manifest


def _params(path):
    return {k: v.clone() for k, v in load_model(str(path)).state_dict().items()}


def test_sft_trains_merger_and_lm_and_keeps_the_vision_encoder_bit_identical(sft_run, tiny_model_dir):
    workdir, manifest = sft_run
    base, tuned = _params(tiny_model_dir), _params(workdir / "models/sft")
    changed = {c: [] for c in ("vision", "merger", "lm")}
    for k in base:
        changed[component(k)].append(not torch.equal(base[k], tuned[k]))
    assert not any(changed["vision"])
    assert all(changed["merger"]) and sum(changed["lm"]) > 0.9 * len(changed["lm"])
    assert manifest["global_step"] == 6
    p = manifest["parameters"]
    assert p["vision"]["trainable"] == 0 and p["merger"]["trainable"] == p["merger"]["total"] > 0


def test_sft_model_directory_is_complete_and_loads(sft_run, tiny_model_dir, synth_dir):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    out = sft_run[0] / "models/sft"
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.json", "preprocessor_config.json", "cmevlm_images.json", "training_args.json", "metrics.jsonl",
            "loss.png", "manifest.json"} <= names
    assert not names & {"chat_template.jinja", "processor_config.json"}  # the real repo's split, nothing to mislead a loader
    with safe_open(out / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(weights(tiny_model_dir))  # the base architecture's names, no model.model.*
        assert all(f.get_tensor(k).dtype == torch.float32 for k in f.keys())
    args = json.loads((out / "training_args.json").read_text())
    assert args["gradient_accumulation_steps"] == 2 and args["effective_batch_size_actual"] == 8 and args["zero_stage"] == 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss"] > 0 and r["samples_per_s"] > 0 and r["grad_norm"] is not None for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, proc = AutoModelForImageTextToText.from_pretrained(out), load_processor(str(out))
    img = Image.open(next(synth_dir.glob("proc_000/frames/*.png"))).convert("RGB").resize((56, 56))
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Identify it."}]}], add_generation_prompt=True)
    inputs = proc(text=[text], images=[img], return_tensors="pt")
    out_ids = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out_ids.shape[1] > inputs.input_ids.shape[1]


def test_sft_rerun_is_skipped(sft_run, tiny_model_dir):
    assert sft.run(_cfg(sft_run[0], tiny_model_dir))["skipped"]


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_a_killed_worker_resumes_from_its_checkpoint_with_the_same_losses(taught, tmp_path, tiny_model_dir, sft_run):
    """kill -9 one training worker after the first checkpoint: the worker group restarts from
    it, finishes the same number of steps, and the losses after the checkpoint match an
    uninterrupted run's."""
    workdir = _copy(taught, tmp_path / "run")
    result = {}
    thread = threading.Thread(target=lambda: result.update(m=sft.run(_cfg(workdir, tiny_model_dir))))
    thread.start()
    ckpts = workdir / "checkpoints" / "sft"
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("checkpoint_*/checkpoint")):
        time.sleep(0.1)
    victims = _train_workers()
    assert victims, "no training worker found"
    victims[0].kill()
    victims[0].wait(timeout=30)
    assert not victims[0].is_running()  # the kill really happened mid-run
    thread.join(timeout=600)
    m = result["m"]
    assert m["global_step"] == 6
    resumed = json.loads((workdir / "models/sft/log_history.json").read_text())
    clean = json.loads((sft_run[0] / "models/sft/log_history.json").read_text())
    loss = lambda hist: {h["step"]: h["loss"] for h in hist if "loss" in h}  # noqa: E731
    a, b = loss(resumed), loss(clean)
    assert set(a) == set(b) == set(range(1, 7))
    # A kill right after a report can lose that checkpoint, so the retry may start from an
    # earlier one; either way every later step must reproduce the clean run.
    for step in range(4, 7):
        assert a[step] == pytest.approx(b[step], rel=1e-3, abs=1e-4), (step, a[step], b[step])
    assert not set(p.pid for p in _train_workers()) & {victims[0].pid}  # finished on a new worker group


def _preferences(workdir: Path, n=16):
    st = Storage()
    rows = st.read_parquet(str(workdir / "sft/train")).to_pylist()[:n]
    prefs = [{"images": r["images"], "prompt": [r["messages"][0]], "chosen": [r["messages"][1]],
              "rejected": [rows[(i + 3) % len(rows)]["messages"][1]], "judge_reason": "other structure",
              **{k: r[k] for k in ("item_id", "procedure_id", "site", "structure", "laterality", "phase", "template_id", "needs_review")}}
             for i, r in enumerate(rows)]
    st.write_parquet(str(workdir / "preferences/part-00000.parquet"), pa.Table.from_pylist(prefs, schema=PREF_SCHEMA))
    st.write_manifest(str(workdir / "preferences"), stage="prefer")


def test_dpo_zero3_trains_every_component_from_ln2(sft_run, tmp_path, tiny_model_dir):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(sft_run[0] / "models", workdir / "models")
    shutil.copytree(sft_run[0] / "sft", workdir / "sft")
    _preferences(workdir)
    cfg = _cfg(workdir, tiny_model_dir, "dpo.num_workers=2", "dpo.max_steps=2", "dpo.per_device_batch_size=2",
               "dpo.effective_batch_size=4", "dpo.lr=1e-3", "dpo.zero_stage=3", "dpo.checkpoint_every=10")
    m = dpo.run(cfg)
    assert m["global_step"] == 2
    rows = [json.loads(x) for x in (workdir / "models/dpo/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # reference = policy at the start
    before, after = _params(workdir / "models/sft"), _params(workdir / "models/dpo")
    for comp in ("vision", "merger", "lm"):
        assert any(not torch.equal(before[k], after[k]) for k in before if component(k) == comp), comp
    with safe_open(workdir / "models/dpo/model.safetensors", "pt") as f:
        assert set(f.keys()) == set(weights(tiny_model_dir))  # ZeRO-3 export keeps the architecture's names
    assert json.loads((workdir / "models/dpo/training_args.json").read_text())["beta"] == 0.1


# ---- pure pieces --------------------------------------------------------------------------------

def test_freeze_policies(tiny_model_dir):
    m = load_model(str(tiny_model_dir))
    c = apply_freeze(m, "sft")
    assert c["vision"]["trainable"] == 0 and c["merger"]["trainable"] > 0 and c["lm"]["trainable"] == c["lm"]["total"]
    for name, p in m.named_parameters():
        assert p.requires_grad == (not name.startswith("model.visual.") or ".merger." in name), name
    c = apply_freeze(m, "dpo")
    assert all(v["trainable"] == v["total"] for v in c.values())
    c = apply_freeze(m, "lm_only")
    assert c["merger"]["trainable"] == 0 and c["lm"]["trainable"] > 0
    with pytest.raises(ValueError, match="unknown freeze policy"):
        apply_freeze(m, "lora")


def test_deepspeed_config_and_effective_batch():
    cfg = load_config(overrides=["sft.zero_stage=3", "sft.offload=true", "sft.per_device_batch_size=4",
                                 "sft.num_workers=2", "sft.effective_batch_size=16"])
    ds = deepspeed_config(cfg.sft)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu" and "optimizer" not in ds
    assert grad_accumulation(cfg.sft) == 2
    assert deepspeed_config(load_config(overrides=["sft.zero_stage=0"]).sft) is None
