"""Serving-side generation: each request prepared on its own, batches collated from prepared
requests, and tokens streamed to each request as they are generated.

A request is prepared (chat template, image processing, token count) before it joins a batch,
so an image the processor cannot take fails that request alone with a 400, never the batch it
would have joined. A batch is then collated from the prepared tensors: left-padded token ids
(every prompt's last token at the end of its row, as in cmevlm.model.generate) and the
images' patches concatenated in order.
"""

from __future__ import annotations

from typing import Callable

from transformers.generation.streamers import BaseStreamer

from cmevlm.model.generate import Setting


def prepare(processor, conversation: list[dict], images: list) -> dict:
    """One request's model inputs (batch of one): input_ids, attention_mask and, with images,
    pixel_values and image_grid_thw. Raises ValueError for images the processor refuses."""
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    return dict(processor(text=[text], images=images or None, return_tensors="pt"))


def collate(prepared: list[dict], pad_id: int) -> dict:
    """One batch from prepared requests: token ids left-padded to the longest prompt."""
    import torch

    width = max(p["input_ids"].shape[1] for p in prepared)
    ids = torch.full((len(prepared), width), pad_id, dtype=prepared[0]["input_ids"].dtype)
    mask = torch.zeros((len(prepared), width), dtype=prepared[0]["attention_mask"].dtype)
    for i, p in enumerate(prepared):
        n = p["input_ids"].shape[1]
        ids[i, width - n:] = p["input_ids"][0]
        mask[i, width - n:] = p["attention_mask"][0]
    out = {"input_ids": ids, "attention_mask": mask}
    with_images = [p for p in prepared if "pixel_values" in p]
    if with_images:
        out["pixel_values"] = torch.cat([p["pixel_values"] for p in with_images])
        out["image_grid_thw"] = torch.cat([p["image_grid_thw"] for p in with_images])
    return out


def stop_ids(tok) -> set[int]:
    return {tok.pad_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


class RowStreamer(BaseStreamer):
    """Text pieces of each row of a batched `generate`, as its tokens arrive: `sinks[i](piece)`
    for row i, then `sinks[i](None)` once generation ends. A piece is sent only when it decodes
    to whole characters (an empty one marks a first token that shows nothing yet); a row stops
    at its first stop token."""

    def __init__(self, tok, sinks: list[Callable[[str | None], None]]):
        self.tok, self.sinks, self.stops = tok, sinks, stop_ids(tok)
        self.prompt_seen = False
        self.ids: list[list[int]] = [[] for _ in sinks]
        self.sent = [""] * len(sinks)
        self.done = [False] * len(sinks)

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for i, t in enumerate(value.reshape(len(self.sinks), -1)[:, -1].tolist()):
            if self.done[i]:
                continue
            if t in self.stops:
                self.done[i] = True
                continue
            self.ids[i].append(t)
            text = self.tok.decode(self.ids[i], skip_special_tokens=True).lstrip()
            if len(self.ids[i]) == 1 and not text:
                self.sinks[i]("")  # the first token is out, even if it shows nothing yet (time to first token)
            if text.endswith("\ufffd") or len(text) <= len(self.sent[i]):
                continue
            piece, self.sent[i] = text[len(self.sent[i]):], text
            self.sinks[i](piece)

    def end(self) -> None:
        for sink in self.sinks:
            sink(None)


def generate_prepared(model, tok, prepared: list[dict], max_new_tokens: int, setting: Setting,
                      sinks: list[Callable] | None = None) -> list[tuple[str, int, int]]:
    """(text, new tokens, prompt tokens) per prepared request, generated as one batch with every
    decoding setting stated (cmevlm.model.generate.Setting); `sinks` receive the streamed pieces."""
    import torch

    inputs = {k: v.to(model.device) for k, v in collate(prepared, tok.pad_token_id).items()}
    setting.seed_torch()
    streamer = RowStreamer(tok, sinks) if sinks else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, streamer=streamer,
                             **setting.kwargs())
    new = out[:, inputs["input_ids"].shape[1]:]
    stops = stop_ids(tok)
    results = []
    for row, p in zip(new.tolist(), prepared):
        n = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append((tok.decode(row[:n], skip_special_tokens=True).strip(), n, int(p["input_ids"].shape[1])))
    return results
