"""The file layout of the public Qwen2.5-VL-7B-Instruct repository, read and written the same way.

What the real repo holds (its file list, docs/real-model.md):

    .gitattributes  README.md  config.json  generation_config.json
    model-0000{1..5}-of-00005.safetensors  model.safetensors.index.json
    chat_template.json        {"chat_template": the image-aware Qwen2.5-VL template}
    tokenizer_config.json     its "chat_template" is the text-only Qwen2.5 template (with tools)
    tokenizer.json  vocab.json  merges.txt
    preprocessor_config.json  flat: min_pixels 3136, max_pixels 12845056, patch_size 14,
                              temporal_patch_size 2, merge_size 2, the CLIP mean/std

So the template a loader must use is the processor's, found as transformers' processor finds it
(`find_chat_template`); the tokenizer's own is only a fallback. Transformers 5 saves processors
differently (`chat_template.jinja`, `processor_config.json`, the tokenizer's template lost), so
everything this project writes goes through `save_processor` or `normalise`, which write the
real repo's split: tools that load our exported models (transformers, vLLM, TRL) find the same
files they find in the real one.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE_JSON = "chat_template.json"     # the real repo's (transformers' "legacy" processor file)
CHAT_TEMPLATE_JINJA = "chat_template.jinja"   # what transformers 5 writes
PROCESSOR_CONFIG = "processor_config.json"    # transformers 5's nested processor file
PREPROCESSOR_CONFIG = "preprocessor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# preprocessor_config.json of the real repo (values as published; the PIL image processor here
# is the torchvision-free implementation of the same class).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
REAL_MIN_PIXELS = 3136          # 56 x 56: 4 image tokens
REAL_MAX_PIXELS = 12845056      # 3584 x 3584: 16384 image tokens


def preprocessor_config(min_pixels: int = REAL_MIN_PIXELS, max_pixels: int = REAL_MAX_PIXELS) -> dict:
    return {"min_pixels": min_pixels, "max_pixels": max_pixels, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
            "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "image_processor_type": "Qwen2VLImageProcessor",
            "processor_class": "Qwen2_5_VLProcessor"}


def real_generation_config(bos: int, eos: list[int], pad: int) -> dict:
    """generation_config.json of the real repo: sampling with a near-zero temperature, top_k 1 and a
    repetition penalty. Nothing here decodes with it implicitly (cmevlm.model.generate)."""
    return {"bos_token_id": bos, "pad_token_id": pad, "eos_token_id": eos, "do_sample": True, "repetition_penalty": 1.05,
            "temperature": 0.1, "top_p": 0.001, "top_k": 1}


def reference_templates() -> tuple[str, str]:
    """(text template of tokenizer_config.json, image template of chat_template.json), as TRL
    ships them byte for byte to recognise the model (trl/chat_templates/qwen2_5*.jinja)."""
    from trl.chat_template_utils import _CHAT_TEMPLATES_DIR

    return ((_CHAT_TEMPLATES_DIR / "qwen2_5.jinja").read_text(encoding="utf-8"),
            (_CHAT_TEMPLATES_DIR / "qwen2_5_vl.jinja").read_text(encoding="utf-8"))


# What the model was trained on, written by the export (and the consortium) beside the weights, so
# that inference brings every image to it (cmevlm.data.composite.fit_image): its image tokens per
# request are then what `cmevlm plan` sized. A model without it (a base) is taken to see the
# run's data.image_size.
TRAINING_IMAGES = "cmevlm_images.json"


def write_training_images(model_dir: str | Path, image_size: int, resize: str) -> None:
    Path(model_dir, TRAINING_IMAGES).write_text(json.dumps({"image_size": image_size, "resize": resize}) + "\n")


def training_images(model_dir: str | Path, default_size: int, default_resize: str) -> tuple[int, str]:
    """(side, pad|crop) of the images the model at `model_dir` was trained on."""
    data = _json(Path(model_dir) / TRAINING_IMAGES)
    return int(data.get("image_size") or default_size), str(data.get("resize") or default_resize)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def find_chat_template(model_dir: str | Path, tokenizer=None) -> str | None:
    """The processor's chat template, in transformers' order: a `chat_template` key of
    processor_config.json, chat_template.json, chat_template.jinja; the tokenizer's own (in the
    real repo the text-only one) only when none of these exists."""
    d = Path(model_dir)
    for candidate in (_json(d / PROCESSOR_CONFIG).get("chat_template"), _json(d / CHAT_TEMPLATE_JSON).get("chat_template")):
        if isinstance(candidate, str) and candidate:
            return candidate
    if (d / CHAT_TEMPLATE_JINJA).exists():
        return (d / CHAT_TEMPLATE_JINJA).read_text(encoding="utf-8")
    return getattr(tokenizer, "chat_template", None) or _json(d / TOKENIZER_CONFIG).get("chat_template")


def image_processor_settings(model_dir: str | Path) -> dict:
    """min/max pixels of the saved image processor (flat preprocessor_config.json, or the nested
    section of transformers 5's processor_config.json)."""
    pp = {}
    for name in (PREPROCESSOR_CONFIG, PROCESSOR_CONFIG):
        data = _json(Path(model_dir) / name)
        pp.update(data.get("image_processor", data))
    size = pp.get("size") or {}
    return {"min_pixels": pp.get("min_pixels") or size.get("shortest_edge") or REAL_MIN_PIXELS,
            "max_pixels": pp.get("max_pixels") or size.get("longest_edge") or REAL_MAX_PIXELS}


def write_split(model_dir: str | Path, image_template: str, text_template: str | None, min_pixels: int, max_pixels: int) -> None:
    """The real repo's split in `model_dir`: chat_template.json (image template), the text template
    (if any) inside tokenizer_config.json, a flat preprocessor_config.json; transformers 5's
    chat_template.jinja and processor_config.json removed, so no loader can pick another one."""
    d = Path(model_dir)
    (d / CHAT_TEMPLATE_JSON).write_text(json.dumps({"chat_template": image_template}, indent=2) + "\n", encoding="utf-8")
    tok_cfg = _json(d / TOKENIZER_CONFIG)
    if text_template and tok_cfg:
        tok_cfg["chat_template"] = text_template
        (d / TOKENIZER_CONFIG).write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (d / PREPROCESSOR_CONFIG).write_text(json.dumps(preprocessor_config(min_pixels, max_pixels), indent=2) + "\n")
    for name in (CHAT_TEMPLATE_JINJA, PROCESSOR_CONFIG):
        (d / name).unlink(missing_ok=True)


def save_processor(processor, model_dir: str | Path) -> None:
    """Save `processor` (tokenizer files included) in the real repo's layout; the tokenizer's own
    template (the text one, when it was loaded from the real layout) goes back to tokenizer_config.json."""
    ip = processor.image_processor
    text = getattr(processor.tokenizer, "chat_template", None)
    text = text if isinstance(text, str) and text != processor.chat_template else None
    processor.save_pretrained(model_dir)
    write_split(model_dir, processor.chat_template, text, ip.size.shortest_edge, ip.size.longest_edge)


def normalise(model_dir: str | Path) -> None:
    """Bring a saved model folder (ours, or one transformers 5 wrote) to the real repo's split,
    keeping the template a loader would have found."""
    d = Path(model_dir)
    template = find_chat_template(d)
    if not template:
        return
    tok_text = _json(d / TOKENIZER_CONFIG).get("chat_template")
    s = image_processor_settings(d)
    write_split(d, template, tok_text if tok_text != template else None, s["min_pixels"], s["max_pixels"])
