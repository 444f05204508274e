"""LoRA through PEFT for SFT and DPO on Ray Train (CPU, gloo) with the tiny model."""

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cmevlm.model.loading import load_model, load_processor
from cmevlm.model import adapters
from cmevlm.train import dpo, lora, sft
from cmevlm.train.freeze import component
from test_train import _cfg, _copy, _preferences

LORA = ["sft.lora={r: 4, alpha: 8, dropout: 0.0}", "sft.lr=5e-3"]


@pytest.fixture(scope="module")
def lora_run(taught, tmp_path_factory, tiny_model_dir):
    workdir = _copy(taught, tmp_path_factory.mktemp("lora") / "run")
    manifest = sft.run(_cfg(workdir, tiny_model_dir, *LORA))
    return workdir, manifest


def _logits(model, processor, image):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which structure is highlighted?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_sft_lora_trains_only_the_adapter(lora_run, tiny_model_dir):
    workdir, manifest = lora_run
    out = workdir / "models/sft"
    assert adapters.is_adapter_dir(out) and (out / "merged/config.json").exists()
    assert adapters.base_of(out) == str(tiny_model_dir)
    adapter = load_file(out / adapters.ADAPTER_WEIGHTS)
    assert adapter and all("lora_A" in k or "lora_B" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at 0: it trained
    assert not any(component(k.removeprefix("base_model.model.")) == "vision" for k in adapter)  # sft policy
    counts = manifest["parameters"]
    assert counts["vision"]["trainable"] == 0 and 0 < counts["lm"]["trainable"] < counts["lm"]["total"] / 2
    base = load_model(str(tiny_model_dir)).state_dict()
    merged = load_model(str(out / "merged")).state_dict()
    targets = {k for k in merged if any(k.startswith(m.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] + ".") for m in adapter)}
    for k, v in merged.items():  # everything outside the adapted modules is the base, bit for bit
        if k not in targets:
            assert torch.equal(v, base[k]), k
    assert any(not torch.equal(merged[k], base[k]) for k in targets)


def test_merged_model_gives_the_logits_of_base_plus_adapter(lora_run, tiny_model_dir, synth_dir):
    from PIL import Image

    out = lora_run[0] / "models/sft"
    image = Image.open(next(synth_dir.glob("proc_*/frames/*.png"))).convert("RGB").resize((56, 56))
    processor = load_processor(str(out))
    shutil.copytree(out, out.parent / "sft-no-merge", ignore=shutil.ignore_patterns("merged"))
    on_the_fly = load_model(str(out.parent / "sft-no-merge"))  # base + adapter, merged at load
    merged = load_model(str(out))  # merged/ as exported
    torch.testing.assert_close(_logits(on_the_fly, processor, image), _logits(merged, processor, image), rtol=1e-5, atol=1e-5)
    from peft import PeftModel

    wrapped = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), str(out)).eval()  # unmerged PEFT forward
    torch.testing.assert_close(_logits(wrapped, processor, image), _logits(merged, processor, image), rtol=1e-4, atol=1e-4)


def test_dpo_lora_on_the_sft_adapter_uses_it_as_reference(lora_run, tmp_path, tiny_model_dir):
    workdir = tmp_path / "run"
    shutil.copytree(lora_run[0] / "models", workdir / "models")
    shutil.copytree(lora_run[0] / "sft", workdir / "sft")
    _preferences(workdir)
    cfg = _cfg(workdir, tiny_model_dir, *LORA, "dpo.num_workers=1", "dpo.max_steps=2", "dpo.per_device_batch_size=2",
               "dpo.effective_batch_size=2", "dpo.lr=1e-2", "dpo.zero_stage=0", "dpo.lora={r: 4, alpha: 8, merge: false}")
    m = dpo.run(cfg)
    rows = [json.loads(x) for x in (workdir / "models/dpo/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # reference = policy with the adapter off
    out = workdir / "models/dpo"
    assert adapters.is_adapter_dir(out) and not (out / "merged").exists()
    assert adapters.base_of(out) == str(workdir / "models/sft")  # an adapter on the SFT adapter
    assert m["parameters"]["vision"]["trainable"] > 0  # the dpo policy adapts every component
    load_model(str(out))  # base (itself adapter + base) + adapter
    _served_with_the_real_layout(out, tmp_path)


def _served_with_the_real_layout(adapter_dir, tmp_path):
    """An adapter on an adapter on a base laid out as the real repo: it carries the real template
    split and its training image size, and Ray Serve answers an image chat request with it
    through the official openai client (a 1080p frame costs the image tokens of training)."""
    import base64
    import io

    import numpy as np
    import openai
    from PIL import Image
    from ray import serve

    from cmevlm.model import layout
    from cmevlm.serve import app
    from conftest import free_port

    names = {p.name for p in adapter_dir.iterdir()}
    assert {"chat_template.json", "preprocessor_config.json", layout.TRAINING_IMAGES} <= names
    assert not names & {"chat_template.jinja", "processor_config.json"}
    assert json.loads((adapter_dir / "chat_template.json").read_text())["chat_template"] == layout.reference_templates()[1]
    port = free_port()
    cfg = _cfg(tmp_path / "serve", adapter_dir, f"serve.model={adapter_dir}", f"serve.port={port}", "serve.api_keys=[lora-test-key-0001]",
               "serve.num_cpus_per_replica=0.5", "serve.max_tokens_cap=16")
    app.run(cfg, block=False)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="lora-test-key-0001")
        usage = []
        for shape in ((56, 56, 3), (1080, 1920, 3)):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)).save(buf, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
            r = client.chat.completions.create(model="cmevlm", max_tokens=8, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "Identify the highlighted structure."}]}])
            assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens >= 1
            usage.append(r.usage.prompt_tokens)
        assert usage[0] == usage[1]  # the 1080p frame is brought to the training size: same image tokens
    finally:
        serve.shutdown()


def test_targets_follow_the_freeze_policy(tiny_model_dir):
    from cmevlm.config import LoraSettings

    m = load_model(str(tiny_model_dir))
    names = lora.targets(m, LoraSettings().target_modules + ["mlp.0", "mlp.2"], "sft")
    assert names and not any(component(n) == "vision" for n in names)
    assert any(".merger.mlp.0" in n for n in names)
    assert any(component(n) == "vision" for n in lora.targets(m, ["qkv", "q_proj"], "dpo"))
    with pytest.raises(ValueError, match="match no Linear"):
        lora.targets(m, ["qkv"], "sft")  # qkv exists only in the frozen vision encoder
