import json

import torch
from PIL import Image

from cmevlm.config import StorageConfig
from cmevlm.model.loading import load_model, load_processor
from cmevlm.model.tiny import SPECIAL_TOKENS
from cmevlm.storage import Storage


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_saved_in_hf_format_and_small(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja", "processor_config.json"} <= names
    assert _size(tiny_model_dir) < 50e6
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert json.loads((tiny_model_dir / "processor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"


def test_auto_class_loads_it(tiny_model_dir):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 < n < 5_000_000


def test_special_tokens_follow_the_bpe_vocabulary(tiny_model_dir):
    proc = load_processor(str(tiny_model_dir))
    tok = proc.tokenizer
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(SPECIAL_TOKENS)))
    assert ids[0] > 256 and tok.pad_token_id == ids[0]  # never 0: TRL's collator would replace it
    # The domain vocabulary got merges of its own: few tokens for CME words.
    assert len(tok("inferior mesenteric vein").input_ids) <= 4
    assert tok.decode(tok("the duodenum, left CME.").input_ids) == "the duodenum, left CME."


def test_generates_text_from_image_and_prompt(tiny_model_dir, synth_dir):
    model, proc = load_model(str(tiny_model_dir)), load_processor(str(tiny_model_dir))
    image = Image.open(next(synth_dir.glob("proc_000/frames/*.png"))).convert("RGB").resize((168, 168))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Identify the highlighted structure."}]}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert "<|image_pad|>" in text and text.rstrip().endswith("assistant")
    inputs = proc(text=[text], images=[image], return_tensors="pt")
    assert int((inputs.input_ids == model.config.image_token_id).sum()) == 36  # 168x168 px -> 36 tokens
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs.input_ids.shape[1]
    assert isinstance(proc.batch_decode(out[:, inputs.input_ids.shape[1]:])[0], str)


def test_loads_from_s3(tiny_model_dir, s3_bucket, tmp_path):
    storage = StorageConfig(cache_dir=str(tmp_path / "cache"))
    Storage(storage).upload_dir(tiny_model_dir, s3_bucket + "/models/tiny")
    model = load_model(s3_bucket + "/models/tiny", storage)
    proc = load_processor(s3_bucket + "/models/tiny", storage)
    ref = load_model(str(tiny_model_dir))
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), n
    assert proc.tokenizer.padding_side == "left"
