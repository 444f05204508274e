"""Request parsing and validation for the serving endpoint: plain functions, no Ray, no HTTP.

Each function raises `BadRequest(status, message)` for input a client must fix; the app turns
it into an HTTP error. Images come only as base64 data (data URIs in the OpenAI format): the
server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from cmevlm.config import RunConfig


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def check_auth(header: str | None, keys: list[str]) -> None:
    if not keys:
        return
    if not header or not header.startswith("Bearer ") or header[7:].strip() not in keys:
        raise BadRequest(401, "missing or invalid API key (Authorization: Bearer <key>)")


def decode_b64_image(data: str, max_pixels: int, what: str = "image") -> Image.Image:
    """base64 (or a data: URI) -> PIL image, checked against the pixel limit before decoding."""
    if data.startswith(("http://", "https://")):
        raise BadRequest(400, f"{what}: remote image URLs are refused; send the image as a base64 data URI")
    if data.startswith("data:"):
        head, _, data = data.partition(",")
        if ";base64" not in head:
            raise BadRequest(400, f"{what}: data URI must be base64")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, f"{what}: invalid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
        w, h = img.size
        if w * h > max_pixels:
            raise BadRequest(400, f"{what}: {w}x{h} exceeds the limit of {max_pixels} pixels")
        img.load()
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise BadRequest(400, f"{what}: not a readable image ({type(e).__name__})") from None
    return img


def generation_params(body: dict, cfg: RunConfig) -> dict:
    s = cfg.serve
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", min(s.default_max_tokens, s.max_tokens_cap)))
    temperature, top_p, n = body.get("temperature", 0.0), body.get("top_p", 1.0), body.get("n", 1)
    for name, v, ok in (("max_tokens", max_tokens, isinstance(max_tokens, int) and max_tokens >= 1),
                        ("temperature", temperature, isinstance(temperature, (int, float)) and 0 <= temperature <= 2),
                        ("top_p", top_p, isinstance(top_p, (int, float)) and 0 < top_p <= 1),
                        ("n", n, isinstance(n, int) and 1 <= n <= 8)):
        if not ok:
            raise BadRequest(400, f"invalid {name}: {v!r}")
    if max_tokens > s.max_tokens_cap:
        raise BadRequest(400, f"max_tokens {max_tokens} exceeds the cap of {s.max_tokens_cap}")
    return {"max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p), "n": n,
            "seed": body.get("seed"), "stream": bool(body.get("stream", False))}


def chat_conversation(body: dict, cfg: RunConfig) -> tuple[list[dict], list[Image.Image]]:
    """OpenAI chat messages -> (conversation for the chat template, images in order)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest(400, "messages must be a non-empty list")
    conv, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(400, f"messages[{i}]: role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, str):
            conv.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise BadRequest(400, f"messages[{i}].content must be a string or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(part.get("text", ""))})
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) else part.get("image_url", "")
                images.append(decode_b64_image(url, cfg.serve.max_image_pixels, f"messages[{i}].content[{j}]").convert("RGB"))
                parts.append({"type": "image"})
            else:
                raise BadRequest(400, f"messages[{i}].content[{j}]: type must be text or image_url")
        conv.append({"role": m["role"], "content": parts})
    if not images:
        raise BadRequest(400, "the request has no image: send the frame as an image_url data URI")
    return conv, images


def explain_inputs(body: dict, cfg: RunConfig) -> tuple[list[dict], Image.Image]:
    """/v1/explain: frame + mask -> the composite the model was trained on, and the question."""
    from cmevlm.data.composite import BadInput, build_composite, decode_mask
    from cmevlm.instructions import TEMPLATES

    for key in ("frame", "mask"):
        if not isinstance(body.get(key), str):
            raise BadRequest(400, f"{key} (base64 image) is required")
    frame = np.asarray(decode_b64_image(body["frame"], cfg.serve.max_image_pixels, "frame").convert("RGB"))
    mask_img = decode_b64_image(body["mask"], cfg.serve.max_image_pixels, "mask")
    buf = io.BytesIO()
    mask_img.save(buf, format="PNG")
    try:
        mask = decode_mask(buf.getvalue(), frame.shape[:2], binarize_multivalue=True)
    except BadInput as e:
        raise BadRequest(400, f"mask: {e}") from None
    d = cfg.data
    comp, _ = build_composite(frame, mask, d.image_size, d.resize, d.overlay_color, d.overlay_alpha)
    question = body.get("question") or TEMPLATES[0].text
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": str(question)}]}]
    return conv, Image.fromarray(comp)
