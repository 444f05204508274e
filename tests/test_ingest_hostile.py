"""Hostile images at ingest: a decompression bomb, APNG, CMYK, 16-bit, palette with alpha,
EXIF-rotated, truncated IDAT and a huge iTXt chunk among good frames. The stage exits 0; what
cannot be read is quarantined with a reason (the bomb from its header, never decoded); every
good frame is accepted."""

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from cmevlm.data.synth import write_dataset
from cmevlm.storage import Storage

ROOT = Path(__file__).resolve().parent.parent


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 40_000, height: int = 40_000) -> bytes:
    """A few hundred bytes declaring width x height gray pixels (1.6 Gpx by default)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4096, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def variants(frame: np.ndarray) -> dict[str, bytes]:
    """name -> file bytes, each of the frame's own size where it is an image at all."""
    img = Image.fromarray(frame)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    text = PngImagePlugin.PngInfo()
    text.add_itxt("comment", "x" * (3 * 2**20))
    good = _save(img)
    cut = good.index(b"IDAT") + 200
    return {
        "bomb": bomb_png(),
        "apng": _save(img, save_all=True, append_images=[img.transpose(Image.FLIP_LEFT_RIGHT)], duration=100),
        "cmyk": _save(img.convert("CMYK"), "JPEG"),
        "16bit": _save(Image.fromarray(frame[..., 0].astype(np.uint16) * 257)),
        "palette_alpha": _save(img.convert("RGBA").convert("P", palette=Image.ADAPTIVE), transparency=0),
        "exif_rotated": _save(img, "JPEG", exif=exif),
        "truncated_idat": good[:cut],
        "huge_itxt": _save(img, pnginfo=text),
    }


def test_hostile_frames_are_quarantined_or_accepted_and_the_stage_goes_on(ray_local, tmp_path):
    src = tmp_path / "src"
    write_dataset(src, procedures=2, frames_per_procedure=4, sites=1, seed=3)
    frames = sorted(src.glob("proc_*/frames/*.png"))
    reference = np.asarray(Image.open(frames[0]).convert("RGB"))
    hostile = variants(reference)
    placed = {}
    for (name, data), path in zip(hostile.items(), frames):
        path.write_bytes(data)  # same file name: the masks still point at it
        placed[name] = (path.parent.parent.name, path.stem)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "ingest", "--set", f"workdir={run}", "--set", f"sources=[{{uri: '{src}'}}]",
                        "--set", "data.image_size=56", "--set", "ray.num_cpus=2"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    st = Storage()
    import json

    quarantine = [json.loads(x) for x in (run / "quarantine/ingest.jsonl").read_text().splitlines()]
    why = {(q["item"]["procedure_id"], q["item"]["frame_id"]): q["reason"] for q in quarantine if "item" in q}
    accepted = st.read_parquet(str(run / "frames/shards"), columns=["procedure_id", "frame_id"]).to_pylist()
    ok = {(a["procedure_id"], a["frame_id"]) for a in accepted}
    assert "exceeds ingest.max_image_pixels" in why[placed["bomb"]] and placed["bomb"] not in ok
    assert "unreadable frame" in why[placed["truncated_idat"]]
    for name in ("apng", "cmyk", "16bit", "palette_alpha", "exif_rotated"):
        assert placed[name] in ok and placed[name] not in why, (name, why.get(placed[name]))
    assert placed["huge_itxt"] in ok or "unreadable frame" in why[placed["huge_itxt"]]
    for path in frames[len(hostile):]:  # the untouched frames
        assert (path.parent.parent.name, path.stem) in ok
