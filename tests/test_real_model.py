"""Decoding on a model laid out as the real Qwen2.5-VL repo, whose generation_config.json says
do_sample, temperature 0.1, top_p 0.001, top_k 1 and repetition_penalty 1.05: nothing here may
decode with those settings unless the run config says so."""

import json
import shutil

import torch
from PIL import Image

from cmevlm.config import load_config
from cmevlm.evaluate.evaluation import GREEDY, modes
from cmevlm.model.generate import Setting, generate
from cmevlm.model.loading import load_model, load_processor

PROMPT = "Identify the highlighted anatomical structure and explain its significance."


def _inputs(proc, images):
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True)
    proc.tokenizer.padding_side = "left"
    return proc(text=[text] * len(images), images=images, return_tensors="pt", padding=True)


def _decode(proc, out, n):
    return [proc.tokenizer.decode(row[n:], skip_special_tokens=True).strip() for row in out]


def test_greedy_is_greedy_whatever_the_models_generation_config(tiny_model_dir, synth_dir, tmp_path):
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert gen["do_sample"] is True and gen["repetition_penalty"] == 1.05  # the real file's settings
    # The same file with a penalty strong enough to move a random model's argmax (1.05 may not).
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps({**gen, "repetition_penalty": 3.0}))
    model, proc = load_model(str(model_dir)), load_processor(str(model_dir))
    images = [Image.open(p).convert("RGB").resize((112, 112)) for p in sorted(synth_dir.glob("proc_000/frames/*.png"))[:4]]
    ours = [t for t, _ in generate(model, proc, images, [PROMPT] * len(images), 40)]
    inputs = _inputs(proc, images)
    n = inputs["input_ids"].shape[1]
    pad = proc.tokenizer.pad_token_id
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=40, do_sample=False, repetition_penalty=1.0, pad_token_id=pad)
        stated = model.generate(**inputs, max_new_tokens=40, pad_token_id=pad, **Setting.greedy().kwargs())  # what every stage passes
        torch.manual_seed(0)
        implicit = model.generate(**inputs, max_new_tokens=40, pad_token_id=pad)  # the file decides
    assert torch.equal(stated, plain) and ours == _decode(proc, plain, n)
    # The file's penalty changes the tokens (a random model repeats itself), so the equality above means something.
    assert not torch.equal(implicit, plain)


def test_every_evaluation_mode_states_every_setting(tmp_path):
    cfg = load_config(overrides=[f"workdir={tmp_path}"])
    m = modes(cfg)
    assert m[GREEDY].kwargs() == {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}
    sampled = [s for name, s in m.items() if name != GREEDY]
    assert sampled and all(s.kwargs()["do_sample"] and s.kwargs()["repetition_penalty"] == 1.0 for s in sampled)
    penalised = modes(load_config(overrides=[f"workdir={tmp_path}", "model.repetition_penalty=1.05"]))
    assert penalised[GREEDY].kwargs()["repetition_penalty"] == 1.05 and penalised[GREEDY].name == "greedy_r1.05"
    assert Setting.greedy().record()["do_sample"] is False
