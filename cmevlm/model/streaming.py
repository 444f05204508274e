"""Serving-side generation: each request prepared on its own, batches collated from prepared
requests, and tokens streamed to each request as they are generated.

A request is prepared (chat template, image processing, token count) before it joins a batch,
so an image the processor cannot take fails that request alone with a 400, never the batch it
would have joined. A batch is then collated from the prepared tensors: left-padded token ids
(every prompt's last token at the end of its row, as in cmevlm.model.generate) and the
images' patches concatenated in order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from transformers.generation.logits_process import LogitsProcessor
from transformers.generation.stopping_criteria import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from cmevlm.model.generate import Setting


@dataclass
class RowControl:
    """What one request of a batch asks of its own row: its stop strings, and a flag set when
    its client went away (the row then stops at the next decode step)."""

    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)


class RowStops(StoppingCriteria):
    """Per row of a batch: done once its request is cancelled, or once its text holds one of its
    stop strings; the other rows go on (transformers ends rows one by one)."""

    def __init__(self, tok, rows: list[RowControl], prompt_len: int):
        self.tok, self.rows, self.prompt_len = tok, rows, prompt_len
        self.tail = [max((len(x) for x in r.stop), default=0) + 8 for r in rows]  # tokens: each is at least a character

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i, r in enumerate(self.rows):
            if r.cancelled.is_set():
                done[i] = True
            elif r.stop:
                text = self.tok.decode(input_ids[i, self.prompt_len:][-self.tail[i]:], skip_special_tokens=True)
                done[i] = any(x in text for x in r.stop)
        return done


class Penalties(LogitsProcessor):
    """OpenAI's frequency and presence penalties over the tokens generated so far: a token's
    logit less frequency x its count and presence x (count > 0)."""

    def __init__(self, frequency: float, presence: float, prompt_len: int):
        self.frequency, self.presence, self.prompt_len = frequency, presence, prompt_len

    def __call__(self, input_ids, scores):
        import torch

        new = input_ids[:, self.prompt_len:]
        if new.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones_like(new, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(the text before its first stop string, whether one was found)."""
    hits = [text.find(x) for x in stop if x in text]
    return (text[:min(hits)], True) if hits else (text, False)


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
                      sinks: list[Callable] | None = None, rows: list[RowControl] | None = None, min_p: float = 0.0,
                      penalties: tuple[float, float] = (0.0, 0.0), ignore_eos: bool = False) -> list[tuple[str, int, int, str]]:
    """(text, new tokens, prompt tokens, finish reason) per prepared request, generated as one
    batch with every decoding setting stated (cmevlm.model.generate.Setting; min_p, OpenAI's
    penalties, ignore_eos); `sinks` receive the streamed pieces; `rows` carry each request's
    stop strings and cancel flag. The finish reason is stop, length or cancelled."""
    import torch

    inputs = {k: v.to(model.device) for k, v in collate(prepared, tok.pad_token_id).items()}
    width = inputs["input_ids"].shape[1]
    rows = rows or [RowControl() for _ in prepared]
    extra = {"stopping_criteria": [RowStops(tok, rows, width)], **({"min_p": min_p} if min_p else {})}
    if any(penalties):
        extra["logits_processor"] = [Penalties(*penalties, width)]
    if ignore_eos:
        extra["min_new_tokens"] = max_new_tokens
    setting.seed_torch()
    streamer = RowStreamer(tok, sinks) if sinks else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, streamer=streamer,
                             **setting.kwargs(), **extra)
    return [_result(tok, row, p, r, max_new_tokens) for row, p, r in zip(out[:, width:].tolist(), prepared, rows)]


def _result(tok, row: list[int], prepared: dict, control: RowControl, max_new_tokens: int) -> tuple[str, int, int, str]:
    stops = stop_ids(tok)
    n = next((i for i, t in enumerate(row) if t in stops), len(row))
    text, stopped = cut_at_stop(tok.decode(row[:n], skip_special_tokens=True).strip(), control.stop)
    reason = "cancelled" if control.cancelled.is_set() else "stop" if stopped or n < max_new_tokens else "length"
    return text, n, int(prepared["input_ids"].shape[1]), reason
