"""Frame + mask -> composite image, binary mask and mask geometry. Pure functions on numpy/PIL.

The composite is what the model sees (paper, Section 2.1): the endoscopic frame with a
semi-transparent overlay on one structure's pixels, resized to a square. The binary mask and
its geometry are what the teacher may see: they never contain a frame pixel.

Shapes: frames are (H, W, 3) uint8 RGB, masks (H, W) bool; composites (S, S, 3) uint8 where
S = data.image_size.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


class BadInput(ValueError):
    """An input that cannot become a composite; the message is the quarantine reason."""


# ---------------------------------------------------------------------------------------------
# Decoding and validation


# What PIL raises for files it cannot take: unknown formats, truncated or corrupt data, text
# chunks over its limits, and decompression bombs (DecompressionBombError is no OSError).
PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


EMPTY_MASK = "empty mask (no foreground pixel)"


def _open_checked(data: bytes, what: str, max_pixels: int | None):
    """The opened image, its size checked from the header before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # PIL's own limit (2 x MAX_IMAGE_PIXELS) met at open
        raise BadInput(f"{what} exceeds ingest.max_image_pixels ({max_pixels}) and PIL's bomb limit: not decoded ({e})") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise BadInput(f"{what} of {w}x{h} pixels exceeds ingest.max_image_pixels ({max_pixels}): not decoded")
    return img


def decode_frame(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """PNG/JPEG bytes -> (H, W, 3) uint8 RGB. Raises BadInput for corrupt, truncated or
    oversized files (the size is read from the header before decoding)."""
    try:
        with _open_checked(data, "frame", max_pixels) as img:
            img.load()  # forces a full decode: truncated files fail here, not later
            return np.asarray(img.convert("RGB"))
    except PIL_ERRORS as e:
        raise BadInput(f"unreadable frame: {type(e).__name__}: {e}") from None


def decode_mask(data: bytes, frame_shape: tuple[int, int], binarize_multivalue: bool = False, max_pixels: int | None = None) -> np.ndarray:
    """8-bit single-channel mask bytes -> (H, W) bool (True = structure).

    Raises BadInput when the mask is unreadable, not single-channel, of another size than its
    frame, has more than two values (unless `binarize_multivalue`: then >0), or is empty."""
    try:
        with _open_checked(data, "mask", max_pixels) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except PIL_ERRORS as e:
        raise BadInput(f"unreadable mask: {type(e).__name__}: {e}") from None
    if mode not in ("L", "1", "P") or arr.ndim != 2:
        raise BadInput(f"mask is not single-channel (mode {mode}, shape {arr.shape})")
    if arr.shape != tuple(frame_shape):
        raise BadInput(f"mask size {arr.shape[1]}x{arr.shape[0]} differs from frame size {frame_shape[1]}x{frame_shape[0]}")
    values = np.unique(arr)
    if len(values) > 2 and not binarize_multivalue:
        raise BadInput(f"mask has {len(values)} distinct values (expected 0 and one foreground value)")
    mask = arr > 0
    if not mask.any():
        raise BadInput(EMPTY_MASK)
    return mask


# ---------------------------------------------------------------------------------------------
# Composite


def overlay(frame: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], alpha: float) -> np.ndarray:
    """Blend `color` over the mask's pixels only: out = (1 - alpha) * frame + alpha * color,
    rounded half up; pixels outside the mask are unchanged."""
    out = frame.copy()
    blended = (1.0 - alpha) * frame[mask].astype(np.float32) + alpha * np.asarray(color, np.float32)
    out[mask] = np.floor(blended + 0.5).astype(np.uint8)
    return out


def square_geometry(h: int, w: int, size: int, mode: str) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Where a (h, w) frame goes in a size x size square.

    Returns ((new_h, new_w), (top, left, crop_top, crop_left)): `pad` scales the longer side to
    `size` and centres the frame on black; `crop` scales the shorter side to `size` and takes
    the centre."""
    scale = size / max(h, w) if mode == "pad" else size / min(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if mode == "pad":
        return (nh, nw), ((size - nh) // 2, (size - nw) // 2, 0, 0)
    return (nh, nw), (0, 0, (nh - size) // 2, (nw - size) // 2)


def to_square(arr: np.ndarray, size: int, mode: str, resample: int) -> np.ndarray:
    """Resize an (H, W[, C]) uint8 array into a size x size square, padding or cropping."""
    (nh, nw), (top, left, ct, cl) = square_geometry(arr.shape[0], arr.shape[1], size, mode)
    resized = np.asarray(Image.fromarray(arr).resize((nw, nh), resample))
    if mode == "crop":
        return np.ascontiguousarray(resized[ct:ct + size, cl:cl + size])
    out = np.zeros((size, size, *arr.shape[2:]), np.uint8)
    out[top:top + nh, left:left + nw] = resized
    return out


def fit_image(img: Image.Image, size: int, mode: str) -> Image.Image:
    """An RGB image brought to the size x size square the model was trained on, as ingest squares
    its frames (bilinear, `pad` or `crop`); unchanged when it already is that square."""
    img = img.convert("RGB")
    if img.size == (size, size):
        return img
    return Image.fromarray(to_square(np.asarray(img), size, mode, Image.BILINEAR))


def build_composites(frame: np.ndarray, masks: list[np.ndarray], size: int, mode: str, color, alpha: float):
    """[(composite (S, S, 3) uint8, binary mask (S, S) uint8 in {0, 255})] for each mask of one
    frame. The frame is resized once (bilinear); each mask is resized (nearest) and overlaid
    on it, so the overlay covers exactly the pixels of the mask the teacher sees."""
    square = to_square(frame, size, mode, Image.BILINEAR)
    out = []
    for m in masks:
        sm = to_square(m.astype(np.uint8) * 255, size, mode, Image.NEAREST) > 127
        out.append((overlay(square, sm, color, alpha), sm.astype(np.uint8) * 255))
    return out


def build_composite(frame: np.ndarray, mask: np.ndarray, size: int, mode: str, color, alpha: float):
    """(composite, binary mask) for one structure; see `build_composites`."""
    return build_composites(frame, [mask], size, mode, color, alpha)[0]


def encode_png(arr: np.ndarray, compress_level: int = 1) -> bytes:
    """PNG bytes of an array, with no metadata (no EXIF, no text chunks)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Geometry (what the teacher reads)

_ROWS = ("upper", "middle", "lower")
_COLS = ("left", "centre", "right")


@dataclass(frozen=True)
class Geometry:
    area_fraction: float  # structure pixels / frame pixels
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of width / height
    centroid: tuple[float, float]  # x, y as fractions
    region: str  # the ninth of the frame holding the centroid, e.g. "lower left"

    def describe(self) -> str:
        return (
            f"It covers {100 * self.area_fraction:.1f}% of the image, centred in the {self.region} part "
            f"(centroid x={self.centroid[0]:.2f}, y={self.centroid[1]:.2f}; bounding box "
            f"x {self.bbox[0]:.2f}-{self.bbox[2]:.2f}, y {self.bbox[1]:.2f}-{self.bbox[3]:.2f})."
        )


def mask_geometry(mask: np.ndarray) -> Geometry:
    """Area fraction, bounding box, centroid and ninth of a (H, W) bool mask, in frame fractions."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    if not len(xs):
        raise BadInput(EMPTY_MASK)
    cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
    row, col = _ROWS[min(2, int(cy * 3))], _COLS[min(2, int(cx * 3))]
    region = "centre" if (row, col) == ("middle", "centre") else f"{row} {col}" if row != "middle" else f"middle {col}"
    return Geometry(
        area_fraction=float(mask.mean()),
        bbox=(xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h),
        centroid=(float(cx), float(cy)),
        region=region,
    )
