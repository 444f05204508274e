import json
import re

import pytest

import torch
from PIL import Image

from cmevlm.config import StorageConfig
from cmevlm.model import layout
from cmevlm.model.loading import load_model, load_processor
from cmevlm.model.tiny import SPECIAL_TOKENS
from cmevlm.storage import Storage


def _size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# The files of the public Qwen/Qwen2.5-VL-7B-Instruct repository (docs/real-model.md), its five
# weight shards written as one pattern: the fixture must have exactly these, split the same way.
REAL_REPO_FILES = {
    ".gitattributes", "README.md", "chat_template.json", "config.json", "generation_config.json", "merges.txt",
    "model-NNNNN-of-NNNNN.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
    "tokenizer.json", "tokenizer_config.json", "vocab.json",
}
SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")


def test_laid_out_as_the_real_repo(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    shards = sorted(n for n in names if SHARD.match(n))
    assert {SHARD.sub("model-NNNNN-of-NNNNN.safetensors", n) for n in names} == REAL_REPO_FILES
    assert len(shards) > 1 and all(SHARD.match(n)[2] == f"{len(shards):05d}" for n in shards)
    index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert _size(tiny_model_dir) < 50e6
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    # The template split: the image-aware one only in chat_template.json, the text-only Qwen2.5
    # one (with tools) in tokenizer_config.json; both as the real repo has them (TRL keeps them).
    text, image = layout.reference_templates()
    assert json.loads((tiny_model_dir / "chat_template.json").read_text()) == {"chat_template": image}
    assert json.loads((tiny_model_dir / "tokenizer_config.json").read_text())["chat_template"] == text
    assert "tools" in text and "image_pad" not in text and "image_pad" in image
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert {k: gen[k] for k in ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")} == {
        "do_sample": True, "temperature": 0.1, "top_p": 0.001, "top_k": 1, "repetition_penalty": 1.05}
    pre = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pre == {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                   "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor"}


def test_the_processor_template_is_found_as_transformers_finds_it(tiny_model_dir):
    """The tokenizer's own template (text only) breaks on an image turn exactly as the real
    repo's does; the processor's, found first, renders it."""
    from transformers import AutoTokenizer

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Identify it."}]}]
    with pytest.raises(TypeError, match="can only concatenate str"):
        AutoTokenizer.from_pretrained(tiny_model_dir).apply_chat_template(turn, tokenize=False)
    text = load_processor(str(tiny_model_dir)).apply_chat_template(turn, add_generation_prompt=True)
    assert "<|vision_start|><|image_pad|><|vision_end|>Identify it." in text


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
