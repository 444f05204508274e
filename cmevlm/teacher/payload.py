"""The one way anything leaves the site: a payload of text and, at most, a binary mask.

Every request to any teacher or judge backend is a `Payload` built by `build_payload` and
checked by `guard` right before it is handed to a backend. The guard accepts an image part
only if it is a PNG of exactly two values (0 and 255), no larger than `mask_size` on either
side, and byte-identical to the mask derived from that item's own mask (hash match). Anything
else raises `PrivacyViolation` and nothing is sent. Backends receive only guarded payloads.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from cmevlm.data.composite import encode_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PrivacyViolation(RuntimeError):
    """A payload that could carry patient pixels (or anything but text and a binary mask)."""


@dataclass(frozen=True)
class Part:
    kind: str  # "text" | "mask"
    text: str = ""
    data: bytes = b""  # PNG bytes for a mask

    def describe(self) -> dict:
        """Kind, size and hash: what the audit log records of each part (never its content)."""
        body = self.text.encode() if self.kind == "text" else self.data
        return {"kind": self.kind, "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@dataclass(frozen=True)
class Payload:
    item_id: str
    system: str
    parts: tuple[Part, ...]
    expected_mask_sha256: str | None = None  # hash of the one mask this item may send
    params: dict = field(default_factory=dict)  # generation parameters (temperature, max tokens)
    # What the text says, as data (structure, side, ...), for the offline stand-in teacher and
    # judge. Never sent and never audited: real backends send the system prompt and the parts.
    facts: dict = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts if p.kind == "text")

    @property
    def mask(self) -> bytes | None:
        return next((p.data for p in self.parts if p.kind == "mask"), None)


def mask_for_teacher(mask_png: bytes, mask_size: int) -> bytes:
    """The item's binary mask as it may be sent: 0/255, at most `mask_size` px a side."""
    with Image.open(io.BytesIO(mask_png)) as img:
        arr = np.asarray(img.convert("L")) > 0
    h, w = arr.shape
    if max(h, w) > mask_size:
        scale = mask_size / max(h, w)
        small = Image.fromarray(arr.astype(np.uint8) * 255).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
        arr = np.asarray(small) > 127
    return encode_png(arr.astype(np.uint8) * 255, compress_level=9)


def build_payload(item_id: str, system: str, text: str, mask_png: bytes | None, mask_size: int, params: dict | None = None,
                  facts: dict | None = None) -> Payload:
    """A payload of one text part and, when `mask_png` (the item's own mask from `frames/`)
    is given, that mask as a binary PNG."""
    parts = [Part("text", text=text)]
    expected = None
    if mask_png is not None:
        data = mask_for_teacher(mask_png, mask_size)
        parts.append(Part("mask", data=data))
        expected = hashlib.sha256(data).hexdigest()
    return Payload(item_id=item_id, system=system, parts=tuple(parts), expected_mask_sha256=expected, params=dict(params or {}),
                   facts=dict(facts or {}))


def guard(payload: Payload, mask_size: int) -> None:
    """Raise PrivacyViolation unless every part is text or this item's own 0/255 PNG mask."""
    if not isinstance(payload.system, str):
        raise PrivacyViolation("system prompt is not text")
    masks = 0
    for part in payload.parts:
        if part.kind == "text":
            if not isinstance(part.text, str) or part.data:
                raise PrivacyViolation("a text part carries binary data")
            continue
        if part.kind != "mask":
            raise PrivacyViolation(f"part kind {part.kind!r} is not allowed (only text and mask)")
        masks += 1
        _check_mask(part.data, mask_size)
        if payload.expected_mask_sha256 is None or hashlib.sha256(part.data).hexdigest() != payload.expected_mask_sha256:
            raise PrivacyViolation(f"item {payload.item_id}: the image part is not this item's mask (hash mismatch)")
    if masks > 1:
        raise PrivacyViolation(f"item {payload.item_id}: {masks} images; at most one mask may be sent")


def _check_mask(data: bytes, mask_size: int) -> None:
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(PNG_MAGIC):
        raise PrivacyViolation("image part is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode, (w, h) = img.mode, img.size
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PrivacyViolation(f"image part cannot be decoded: {e}") from None
    if mode != "L" or arr.ndim != 2:
        raise PrivacyViolation(f"image part is not single-channel (mode {mode})")
    if max(w, h) > mask_size:
        raise PrivacyViolation(f"image part is {w}x{h}, larger than teacher.mask_size={mask_size}")
    values = set(np.unique(arr).tolist())
    if values != {0, 255}:
        raise PrivacyViolation(f"image part has values {sorted(values)[:6]}, not exactly 0 and 255")
