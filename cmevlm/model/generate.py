"""Batched generation with Qwen2.5-VL: one `generate` call per sampling setting, left padding.

Left padding keeps every prompt's last token at the end of the row, so batched greedy output
equals unbatched output (right padding changed 2 of 4 greedy answers when measured). One
`generate` call has one temperature/top_p, so five settings are five calls over the batch.

Every call states all of do_sample, temperature, top_p, top_k and repetition_penalty
(`Setting.kwargs`): transformers fills any setting left unset from the model's
generation_config.json, and the real Qwen2.5-VL's says do_sample, temperature 0.1, top_p 0.001,
top_k 1 and repetition_penalty 1.05, so an unstated "greedy" would be penalised decoding.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

from PIL import Image


@dataclass(frozen=True)
class Setting:
    """One decoding mode, whole: greedy (`Setting.greedy()`) or sampling with a seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    top_k: int = 0                     # 0: no top-k filter
    repetition_penalty: float = 1.0    # 1.0: none
    do_sample: bool = True

    @classmethod
    def greedy(cls, repetition_penalty: float = 1.0) -> "Setting":
        return cls(do_sample=False, repetition_penalty=repetition_penalty)

    @classmethod
    def of(cls, s, repetition_penalty: float = 1.0) -> "Setting":
        """From a config's SamplingSetting (temperature, top_p, seed, top_k)."""
        return cls(s.temperature, s.top_p, s.seed, s.top_k, repetition_penalty)

    @property
    def name(self) -> str:
        extra = (f"_k{self.top_k}" if self.top_k else "") + (f"_r{self.repetition_penalty:g}" if self.repetition_penalty != 1.0 else "")
        if not self.do_sample:
            return "greedy" + extra
        return f"t{self.temperature:g}_p{self.top_p:g}_s{self.seed}" + extra

    def kwargs(self) -> dict:
        """Everything `generate` decides by, none left to the model's generation_config.json."""
        return {"do_sample": self.do_sample, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "repetition_penalty": self.repetition_penalty}

    def record(self) -> dict:
        """What metrics, manifests and reports write down."""
        return asdict(self)

    def seed_torch(self) -> None:
        import torch

        if self.do_sample and self.seed is not None:
            torch.manual_seed(self.seed)


def decode_image(png: bytes, geometry: tuple[int, str] | None = None) -> Image.Image:
    """An RGB image from PNG bytes; with `geometry` (side, pad|crop: the model's training images,
    cmevlm.model.loading.image_geometry) brought to that square, as training saw it."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if geometry is None:
        return img
    from cmevlm.data.composite import fit_image

    return fit_image(img, *geometry)


def generate(model, processor, images: list[Image.Image], prompts: list[str], max_new_tokens: int,
             setting: Setting | None = None) -> list[tuple[str, int]]:
    """(text, new token count) per (image, prompt); plain greedy (no penalty) when `setting` is None."""
    convs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}] for p in prompts]
    return [(t, n) for t, n, _ in generate_chat(model, processor, convs, images, max_new_tokens, setting)]


def generate_chat(model, processor, conversations: list[list[dict]], images: list[Image.Image], max_new_tokens: int,
                  setting: Setting | None = None) -> list[tuple[str, int, int]]:
    """(text, new tokens, prompt tokens) per conversation (messages with `{"type": "image"}`
    parts, in order of `images`); plain greedy (no penalty) when `setting` is None."""
    import torch

    tok = processor.tokenizer
    tok.padding_side = "left"
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True).to(model.device)
    setting = setting or Setting.greedy()
    setting.seed_torch()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **setting.kwargs())
    new = out[:, inputs["input_ids"].shape[1]:]
    stops = {tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
    prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, plen in zip(new.tolist(), prompt_lens):
        n = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append((tok.decode(row[:n], skip_special_tokens=True).strip(), n, int(plen)))
    return results
