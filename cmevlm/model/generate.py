"""Batched generation with Qwen2.5-VL: one `generate` call per sampling setting, left padding.

Left padding keeps every prompt's last token at the end of the row, so batched greedy output
equals unbatched output (right padding changed 2 of 4 greedy answers when measured). One
`generate` call has one temperature/top_p, so five settings are five calls over the batch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image


@dataclass(frozen=True)
class Setting:
    temperature: float
    top_p: float
    seed: int

    @property
    def name(self) -> str:
        return f"t{self.temperature:g}_p{self.top_p:g}_s{self.seed}"


def decode_image(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


def generate(model, processor, images: list[Image.Image], prompts: list[str], max_new_tokens: int,
             setting: Setting | None = None) -> list[tuple[str, int]]:
    """(text, new token count) per (image, prompt); greedy when `setting` is None."""
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
    return [(t, n) for t, n, _ in generate_chat(model, processor, convs, images, max_new_tokens, setting)]


def generate_chat(model, processor, conversations: list[list[dict]], images: list[Image.Image], max_new_tokens: int,
                  setting: Setting | None = None) -> list[tuple[str, int, int]]:
    """(text, new tokens, prompt tokens) per conversation (messages with `{"type": "image"}`
    parts, in order of `images`); greedy when `setting` is None."""
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True).to(model.device)
    kw = {"do_sample": False}
    if setting is not None:
        torch.manual_seed(setting.seed)
        kw = {"do_sample": True, "temperature": setting.temperature, "top_p": setting.top_p, "top_k": 0}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
    new = out[:, inputs["input_ids"].shape[1]:]
    stops = {tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, plen in zip(new.tolist(), prompt_lens):
        n = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append((tok.decode(row[:n], skip_special_tokens=True).strip(), n, int(plen)))
    return results
