"""Synthetic CME frames and masks, in the "cmevlm" source layout, deterministic per seed.

A frame looks like a laparoscopic view of retroperitoneal tissue: pink-red textured tissue,
branching vessels, a retracted colon bulge, specular highlights and the dark rim of the
endoscope's field. Each of the five structures has its own look (colour, texture, shape), so a
model can tell them apart from the pixels alone:

    preparation_plane          pale yellow-white band with fine striations (diagonal)
    angels_hair                fine white strands over a light areolar patch
    inferior_mesenteric_vein   dark blue-purple tubular vessel, roughly vertical
    duodenum                   thick tan-pink C-shaped loop
    pancreas                   yellow lobulated blob with a bumpy surface

A scene is drawn for a left CME (structures on the left half, an instrument entering from the
lower-left corner, the retracted colon on the right) and mirrored for a right CME, so
laterality is visible in the image. Layout written:

    <out>/procedures.csv                              procedure_id,site,laterality,phase
    <out>/<procedure_id>/frames/<frame_id>.png        RGB
    <out>/<procedure_id>/masks/<frame_id>/<structure>.png   8-bit, 0 = background, 255 = structure
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cmevlm.anatomy import LATERALITIES, PHASES, STRUCTURE_NAMES

FRAME_W, FRAME_H = 400, 320  # not square on purpose: ingest must pad or crop

# Nominal centre (x, y as fractions of the frame) of each structure in a LEFT CME scene.
NOMINAL = {
    "pancreas": (0.30, 0.26),
    "inferior_mesenteric_vein": (0.18, 0.55),
    "duodenum": (0.40, 0.70),
    "preparation_plane": (0.36, 0.45),
    "angels_hair": (0.30, 0.48),
}
# Drawing order: later structures occlude earlier ones (their mask is cut from the earlier).
DRAW_ORDER = ("preparation_plane", "pancreas", "duodenum", "inferior_mesenteric_vein", "angels_hair")


@dataclass(frozen=True)
class SiteStyle:
    """What one hospital's frames look like (the consortium demo's sites differ): which sides
    it operates on, which structures its frames show, the colour of its instruments."""

    site: str
    lateralities: tuple[str, ...] = LATERALITIES
    structures: tuple[str, ...] = STRUCTURE_NAMES
    instrument_rgb: tuple[int, int, int] = (150, 155, 165)


@dataclass(frozen=True)
class Procedure:
    procedure_id: str
    site: str
    laterality: str
    phase: str


# ---------------------------------------------------------------------------------------------
# Pure drawing functions: rng in, arrays out


def _smooth_noise(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1], (h, w) float32: a coarse random grid upsampled bicubically."""
    grid = (rng.random((max(2, cells * h // w), cells)) * 255).astype(np.uint8)
    img = Image.fromarray(grid, "L").resize((w, h), Image.BICUBIC)
    return np.asarray(img, np.float32) / 255.0


def _tissue(rng: np.random.Generator, tint: np.ndarray) -> np.ndarray:
    """Background tissue, (H, W, 3) float32 in 0..255."""
    n = 0.6 * _smooth_noise(rng, FRAME_W, FRAME_H, 6) + 0.4 * _smooth_noise(rng, FRAME_W, FRAME_H, 24)
    base = np.array([178, 78, 72], np.float32) + tint
    img = base * (0.7 + 0.5 * n[..., None])
    # Vessels: a few branching dark-red random walks.
    layer = Image.new("L", (FRAME_W, FRAME_H), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(3, 6)):
        x, y = rng.random() * FRAME_W, rng.random() * FRAME_H
        angle = rng.random() * 2 * np.pi
        pts = [(x, y)]
        for _ in range(rng.integers(8, 16)):
            angle += rng.normal(0, 0.35)
            x, y = x + 14 * np.cos(angle), y + 14 * np.sin(angle)
            pts.append((x, y))
        draw.line(pts, fill=255, width=int(rng.integers(1, 4)))
    v = np.asarray(layer.filter(ImageFilter.GaussianBlur(1.2)), np.float32)[..., None] / 255.0
    return img * (1 - v) + np.array([110, 18, 28], np.float32) * v


def _colon_bulge(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The retracted colon on the side opposite the dissection (right half of a left scene)."""
    layer = Image.new("L", (FRAME_W, FRAME_H), 0)
    cx, cy = FRAME_W * (0.86 + rng.normal(0, 0.02)), FRAME_H * (0.45 + rng.normal(0, 0.05))
    rx, ry = FRAME_W * 0.16, FRAME_H * 0.42
    ImageDraw.Draw(layer).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    a = np.asarray(layer.filter(ImageFilter.GaussianBlur(6)), np.float32)[..., None] / 255.0
    shade = 0.8 + 0.3 * _smooth_noise(rng, FRAME_W, FRAME_H, 4)[..., None]
    return np.array([205, 120, 105], np.float32) * shade, a


def _structure_layer(rng: np.random.Generator, name: str, centre: tuple[float, float], scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(colour image (H, W, 3) float32, mask (H, W) bool) of one structure at `centre` (pixels)."""
    w, h = FRAME_W, FRAME_H
    cx, cy = centre
    mask_img = Image.new("L", (w, h), 0)
    md = ImageDraw.Draw(mask_img)
    tex = np.zeros((h, w, 3), np.float32)
    noise = _smooth_noise(rng, w, h, 16)[..., None]

    if name == "preparation_plane":
        ang = np.deg2rad(-40 + rng.normal(0, 8))
        dx, dy = 150 * scale * np.cos(ang), 150 * scale * np.sin(ang)
        md.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(34 * scale))
        yy, xx = np.mgrid[0:h, 0:w]
        stri = 0.5 + 0.5 * np.sin((xx * np.sin(ang) - yy * np.cos(ang)) * 0.9)[..., None]
        tex = np.array([232, 214, 178], np.float32) * (0.85 + 0.15 * stri) * (0.9 + 0.1 * noise)
    elif name == "angels_hair":
        rx, ry = 48 * scale, 34 * scale
        md.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        strands = Image.new("L", (w, h), 0)
        sd = ImageDraw.Draw(strands)
        for _ in range(40):
            x0 = cx + rng.uniform(-rx, rx)
            y0 = cy + rng.uniform(-ry, ry)
            a = rng.uniform(0, np.pi)
            sd.line([(x0, y0), (x0 + 30 * np.cos(a), y0 + 30 * np.sin(a))], fill=255, width=1)
        s = np.asarray(strands, np.float32)[..., None] / 255.0
        tex = np.array([196, 150, 142], np.float32) * (1 - s) + np.array([250, 248, 244], np.float32) * s
    elif name == "inferior_mesenteric_vein":
        pts, x, y = [], cx + rng.normal(0, 4), cy - 110 * scale
        for _ in range(12):
            pts.append((x, y))
            x, y = x + rng.normal(0, 4), y + 20 * scale
        md.line(pts, fill=255, width=int(22 * scale), joint="curve")
        yy, xx = np.mgrid[0:h, 0:w]
        core = np.exp(-((xx - cx) ** 2) / (2 * (5 * scale) ** 2))[..., None]
        tex = np.array([64, 46, 112], np.float32) * (0.9 + 0.2 * noise) + 50 * core
    elif name == "duodenum":
        rx, ry = 70 * scale, 52 * scale
        md.arc([cx - rx, cy - ry, cx + rx, cy + ry], start=200, end=520, fill=255, width=int(36 * scale))
        tex = np.array([214, 152, 118], np.float32) * (0.88 + 0.2 * noise)
    elif name == "pancreas":
        for _ in range(7):
            ox, oy = rng.normal(0, 26 * scale), rng.normal(0, 13 * scale)
            r = rng.uniform(18, 28) * scale
            md.ellipse([cx + ox - r, cy + oy - r, cx + ox + r, cy + oy + r], fill=255)
        lob = _smooth_noise(rng, w, h, 48)[..., None]
        tex = np.array([226, 188, 104], np.float32) * (0.75 + 0.35 * lob)
    else:  # pragma: no cover - STRUCTURE_NAMES is closed
        raise ValueError(name)
    return tex, np.asarray(mask_img) > 127


def _instrument(rng: np.random.Generator, rgb: tuple[int, int, int] = (150, 155, 165)) -> tuple[np.ndarray, np.ndarray]:
    """A grey metallic instrument shaft entering from the lower-left corner (the dissection
    side of a left CME): ((H, W, 3) colour, (H, W) bool footprint)."""
    layer = Image.new("L", (FRAME_W, FRAME_H), 0)
    x1, y1 = FRAME_W * (0.22 + rng.normal(0, 0.02)), FRAME_H * (0.72 + rng.normal(0, 0.03))
    ImageDraw.Draw(layer).line([(-10, FRAME_H + 10), (x1, y1)], fill=255, width=26)
    m = np.asarray(layer) > 127
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
    stripe = 0.5 + 0.5 * np.cos((xx + yy) * 0.35)[..., None]  # the shaft's cylindrical sheen
    return np.array(rgb, np.float32) * (0.8 + 0.4 * stripe), m


def _speculars(rng: np.random.Generator) -> np.ndarray:
    """Specular highlights: (H, W, 1) float32 in 0..1."""
    layer = Image.new("L", (FRAME_W, FRAME_H), 0)
    d = ImageDraw.Draw(layer)
    for _ in range(rng.integers(4, 9)):
        x, y = rng.random() * FRAME_W, rng.random() * FRAME_H
        rx, ry = rng.uniform(2, 7), rng.uniform(1.5, 4)
        d.ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
    return np.asarray(layer.filter(ImageFilter.GaussianBlur(1.5)), np.float32)[..., None] / 255.0


def _vignette() -> np.ndarray:
    yy, xx = np.mgrid[0:FRAME_H, 0:FRAME_W]
    r = np.hypot((xx - FRAME_W / 2) / (FRAME_W / 2), (yy - FRAME_H / 2) / (FRAME_H / 2))
    return np.clip(1.25 - 0.55 * r**2, 0.15, 1.0)[..., None].astype(np.float32)


def render_frame(rng: np.random.Generator, structures: list[str], laterality: str, tint: np.ndarray,
                 instrument_rgb: tuple[int, int, int] = (150, 155, 165)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One frame (H, W, 3) uint8 and a bool mask per structure; mirrored for a right CME."""
    img = _tissue(rng, tint)
    colon, a = _colon_bulge(rng)
    img = img * (1 - a) + colon * a
    masks: dict[str, np.ndarray] = {}
    for name in [s for s in DRAW_ORDER if s in structures]:
        nx, ny = NOMINAL[name]
        centre = (FRAME_W * (nx + rng.normal(0, 0.03)), FRAME_H * (ny + rng.normal(0, 0.03)))
        tex, m = _structure_layer(rng, name, centre, scale=rng.uniform(0.85, 1.15))
        img[m] = tex[m]
        for other in masks.values():  # a later structure occludes earlier ones
            other &= ~m
        masks[name] = m
    tool, tm = _instrument(rng, instrument_rgb)
    img[tm] = tool[tm]
    for m in masks.values():  # the instrument occludes what lies under it
        m &= ~tm
    spec = _speculars(rng)
    img = img * _vignette()
    img = img * (1 - spec) + 255 * spec
    img = img + rng.normal(0, 3, img.shape)
    frame = np.clip(img, 0, 255).astype(np.uint8)
    if laterality == "right":
        frame = frame[:, ::-1].copy()
        masks = {k: v[:, ::-1].copy() for k, v in masks.items()}
    return frame, masks


def plan_procedures(n: int, sites: int, seed: int) -> list[Procedure]:
    """Procedures spread over sites; lateralities alternate so both always appear."""
    rng = np.random.default_rng([seed, 0])
    site_names = [f"site_{chr(ord('a') + i)}" for i in range(sites)]
    flip = int(rng.integers(0, 2))
    return [
        Procedure(f"proc_{i:03d}", site_names[i % sites], LATERALITIES[(i + flip) % 2], PHASES[int(rng.integers(0, len(PHASES)))])
        for i in range(n)
    ]


def plan_frame_structures(rng: np.random.Generator, n_frames: int, names: tuple[str, ...] = STRUCTURE_NAMES) -> list[list[str]]:
    """1-3 structures per frame (of `names`); the first frames of each procedure cycle through them."""
    plans = []
    for i in range(n_frames):
        k = min(int(rng.integers(1, 4)), len(names))
        first = names[i % len(names)]
        others = [s for s in names if s != first]
        plans.append([first, *rng.choice(others, size=k - 1, replace=False).tolist()])
    return plans


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# The command


def styled(procs: list[Procedure], style: SiteStyle) -> list[Procedure]:
    """The procedures moved to one site, their sides cycling through the site's own."""
    return [Procedure(p.procedure_id, style.site, style.lateralities[i % len(style.lateralities)], p.phase) for i, p in enumerate(procs)]


def write_dataset(out: str | Path, procedures: int = 12, frames_per_procedure: int = 30, sites: int = 2, seed: int = 0, progress=None,
                  style: SiteStyle | None = None) -> dict:
    """Write a synthetic CME dataset to `out`; returns counts. Same seed, same bytes. With
    `style`, every procedure is that site's, with its sides, structures and instruments."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    procs = plan_procedures(procedures, sites, seed)
    style = style or SiteStyle(site="")
    if style.site:
        procs = styled(procs, style)
    with open(out / "procedures.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["procedure_id", "site", "laterality", "phase"])
        for p in procs:
            w.writerow([p.procedure_id, p.site, p.laterality, p.phase])
    n_masks = 0
    for pi, p in enumerate(procs):
        rng = np.random.default_rng([seed, 1, pi])
        tint = rng.normal(0, 10, 3).astype(np.float32)  # per-procedure lighting / patient
        for fi, structures in enumerate(plan_frame_structures(rng, frames_per_procedure, style.structures)):
            frame_id = f"frame_{fi:04d}"
            frame, masks = render_frame(rng, structures, p.laterality, tint, style.instrument_rgb)
            fdir = out / p.procedure_id / "frames"
            mdir = out / p.procedure_id / "masks" / frame_id
            fdir.mkdir(parents=True, exist_ok=True)
            mdir.mkdir(parents=True, exist_ok=True)
            (fdir / f"{frame_id}.png").write_bytes(_png(frame))
            for name, m in masks.items():
                if m.sum() < 20:  # (almost) hidden behind another structure or the instrument
                    continue
                (mdir / f"{name}.png").write_bytes(_png(m.astype(np.uint8) * 255))
                n_masks += 1
            if progress:
                progress()
    return {"procedures": len(procs), "frames": len(procs) * frames_per_procedure, "masks": n_masks}
