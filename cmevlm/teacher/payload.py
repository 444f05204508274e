"""The one way anything leaves the site: a payload of text and, at most, a binary mask.

Every request to any teacher or judge backend is a `Payload` built by `build_payload` and
passed through `guard` right before it is handed to a backend; backends receive only what the
guard returns. The guard trusts no byte of the payload: an image part must decode to a single
PNG frame of exactly two values (0 and 255), no larger than `mask_size` on either side, whose
pixels equal the item's own mask as the run's storage holds it (`frames/`, asked by item id
through `stored_mask`: never a hash or a mask the payload brings); what is sent is then
a fresh encoding of those pixels, so nothing else a file can carry (text or EXIF chunks, data
after IEND, a palette, other frames) ever leaves. Text (the system prompt and every text part)
may not carry a data: URI or a long run of encoded bytes, however it is wrapped or split
(`_check_text`). Anything else raises `PrivacyViolation` and nothing is sent.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

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


def pixel_sha256(mask: np.ndarray) -> str:
    """A binary mask's identity: its shape and its pixels, whatever file they came in."""
    h, w = mask.shape
    return hashlib.sha256(f"{h}x{w}|".encode() + np.packbits(mask.astype(bool)).tobytes()).hexdigest()


def _mask_pixels(mask_png: bytes, mask_size: int) -> np.ndarray:
    with Image.open(io.BytesIO(mask_png)) as img:
        arr = np.asarray(img.convert("L")) > 0
    h, w = arr.shape
    if max(h, w) > mask_size:
        scale = mask_size / max(h, w)
        small = Image.fromarray(arr.astype(np.uint8) * 255).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.NEAREST)
        arr = np.asarray(small) > 127
    return arr


def mask_for_teacher(mask_png: bytes, mask_size: int) -> bytes:
    """The item's binary mask as it may be sent: 0/255, at most `mask_size` px a side."""
    return encode_png(_mask_pixels(mask_png, mask_size).astype(np.uint8) * 255, compress_level=9)


def build_payload(item_id: str, system: str, text: str, mask_png: bytes | None, mask_size: int, params: dict | None = None,
                  facts: dict | None = None) -> Payload:
    """A payload of one text part and, when `mask_png` (the item's own mask from `frames/`)
    is given, that mask as a binary PNG."""
    parts = [Part("text", text=text)]
    if mask_png is not None:
        parts.append(Part("mask", data=mask_for_teacher(mask_png, mask_size)))
    return Payload(item_id=item_id, system=system, parts=tuple(parts), params=dict(params or {}), facts=dict(facts or {}))


# What could carry an image in text, looked for after normalising: a data: URI (any media type,
# with parameters, split across lines or spaces), or a run of encoded bytes long enough to hold
# one: base64 or base64url (wrapped at 76 columns, split into groups by spaces) or hex. A run is
# the text's consecutive whitespace-separated tokens made only of those alphabets, joined; prose
# breaks such runs with punctuation, and where it does not, its tokens read as words (lower
# case, Capitalised, short acronyms and numbers). A run is encoded when it holds a long stretch
# of hex digits, or when less than WORDLIKE of its characters are in word-like tokens (a random
# base64 group is word-like a few times in a hundred).
DATA_URI = re.compile(r"data:[a-z0-9.+-]+/[a-z0-9.+-]+(;[^,]*)?,", re.IGNORECASE)
ENCODED_TOKEN = re.compile(r"[A-Za-z0-9+/=_-]+")
WORD = re.compile(r"[A-Za-z][a-z]*|[A-Z]{1,6}|[0-9]{1,6}")
RUN_MIN = 256  # characters: ~190 bytes, far less than any image
HEX_RUN = re.compile(r"[0-9a-fA-F]{%d,}" % RUN_MIN)
WORDLIKE = 0.8


def _encoded_runs(text: str):
    """Each maximal run of whitespace-separated tokens made of base64 / base64url / hex
    characters, as its tokens, when the run is at least RUN_MIN characters long."""
    run: list[str] = []
    for token in [*text.split(), ""]:
        if token and ENCODED_TOKEN.fullmatch(token):
            run.append(token)
            continue
        if sum(map(len, run)) >= RUN_MIN:
            yield run
        run = []


def _looks_encoded(tokens: list[str]) -> bool:
    joined = "".join(tokens)
    if any(sum(c.isdigit() for c in m.group(0)) >= len(m.group(0)) / 4 for m in HEX_RUN.finditer(joined)):
        return True
    return sum(len(t) for t in tokens if WORD.fullmatch(t)) < WORDLIKE * len(joined)


def _check_text(text, where: str) -> None:
    if not isinstance(text, str):
        raise PrivacyViolation(f"{where} is not text")
    if DATA_URI.search("".join(text.split())):
        raise PrivacyViolation(f"{where} carries a data: URI")
    if any(_looks_encoded(run) for run in _encoded_runs(text)):
        raise PrivacyViolation(f"{where} carries a long run of encoded bytes (base64, base64url or hex)")


class StoredMasks:
    """`stored_mask` for the guard: an item's mask as the ingest stage stored it
    (<workdir>/frames/shards, item_id and mask only; read once, on the first mask asked for:
    a few KB per item)."""

    def __init__(self, storage, shards_uri: str):
        self.storage, self.uri, self._masks = storage, shards_uri, None

    def __call__(self, item_id: str) -> bytes | None:
        if self._masks is None:
            table = self.storage.read_parquet(self.uri, columns=["item_id", "mask"]) if self.storage.exists(self.uri) else None
            self._masks = dict(zip(table.column("item_id").to_pylist(), table.column("mask").to_pylist())) if table is not None else {}
        return self._masks.get(item_id)


def guard(payload: Payload, mask_size: int, stored_mask) -> Payload:
    """The payload that may be sent: every text part checked, the one mask (if any) re-encoded
    from its pixels once they are shown to be this item's 0/255 mask as storage holds it
    (`stored_mask(item_id)`: its PNG bytes, or None for an item with no stored mask). Raises
    PrivacyViolation for anything else."""
    _check_text(payload.system, "the system prompt")
    parts, masks = [], 0
    for part in payload.parts:
        if part.kind == "text":
            if part.data:
                raise PrivacyViolation("a text part carries binary data")
            _check_text(part.text, "a text part")
            parts.append(Part("text", text=part.text))
            continue
        if part.kind != "mask":
            raise PrivacyViolation(f"part kind {part.kind!r} is not allowed (only text and mask)")
        masks += 1
        if masks > 1:
            raise PrivacyViolation(f"item {payload.item_id}: at most one mask may be sent")
        pixels = _check_mask(part.data, mask_size)
        stored = stored_mask(payload.item_id)
        if stored is None or pixel_sha256(pixels) != pixel_sha256(_mask_pixels(stored, mask_size)):
            raise PrivacyViolation(f"item {payload.item_id}: the image part is not this item's stored mask (hash mismatch)")
        parts.append(Part("mask", data=encode_png(pixels.astype(np.uint8) * 255, compress_level=9)))
    return replace(payload, parts=tuple(parts))


def _check_mask(data: bytes, mask_size: int) -> np.ndarray:
    """The mask's pixels (True = structure), or PrivacyViolation."""
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(PNG_MAGIC):
        raise PrivacyViolation("image part is not a PNG")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if getattr(img, "n_frames", 1) != 1:
                raise PrivacyViolation("image part has more than one frame")
            img.load()
            mode, (w, h) = img.mode, img.size
            arr = np.asarray(img.convert("L") if mode in ("1", "P") else img)
    except PrivacyViolation:
        raise
    except Exception as e:  # noqa: BLE001 - whatever PIL raises, nothing is sent
        raise PrivacyViolation(f"image part cannot be decoded: {type(e).__name__}: {e}") from None
    if mode not in ("L", "1", "P") or arr.ndim != 2:
        raise PrivacyViolation(f"image part is not single-channel (mode {mode})")
    if max(w, h) > mask_size:
        raise PrivacyViolation(f"image part is {w}x{h}, larger than teacher.mask_size={mask_size}")
    values = set(np.unique(arr).tolist())
    if values != {0, 255}:
        raise PrivacyViolation(f"image part has values {sorted(values)[:6]}, not exactly 0 and 255")
    return arr > 0
