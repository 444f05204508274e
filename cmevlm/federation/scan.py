"""Scan what sites sent for their own image bytes.

Each site keeps every serialized message it sent (federation.capture_messages, written by the
audit filter just before FLARE sends it). Every frame, mask and composite of the site gives two
probes of PROBE bytes from the middle of its data: one of its PNG bytes (past the header, which
all PNGs of one size share) and one of its decoded 8-bit pixels. A message holding an image,
encoded or raw, holds both; a probe found anywhere in any message counts as image bytes found.
"""

from __future__ import annotations

import io
from pathlib import Path

from cmevlm.config import RunConfig
from cmevlm.storage import Storage, join

PROBE = 48


def _middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[mid - PROBE // 2: mid + PROBE // 2]


def probes_of(png: bytes) -> list[bytes]:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png))).tobytes()
    return [p for p in (_middle(png), _middle(pixels)) if len(p) == PROBE and len(set(p)) > 4]  # flat mask regions say nothing


def site_images(cfg: RunConfig) -> list[bytes]:
    """Every frame and mask of the site's sources, and every composite and re-encoded mask of
    its frames stage."""
    out = []
    for s in cfg.sources:
        out += [p.read_bytes() for p in sorted(Path(s.uri).rglob("*.png"))]
    st = Storage(cfg.storage)
    for f in st.list_files(join(cfg.workdir, "frames"), suffix=".parquet"):
        table = st.read_parquet(f, columns=["composite", "mask"])
        out += [b for col in ("composite", "mask") for b in table.column(col).to_pylist() if b]
    return out


def scan(messages: list[bytes], images: list[bytes]) -> dict:
    probes = [p for img in images for p in probes_of(img)]
    found = sum(1 for m in messages for p in probes if p in m)
    return {"messages": len(messages), "message_bytes": sum(map(len, messages)), "images": len(images), "probes": len(probes),
            "image_bytes_found": found}


def scan_sites(sites: list[RunConfig]) -> dict:
    total = {"messages": 0, "message_bytes": 0, "images": 0, "probes": 0, "image_bytes_found": 0}
    for c in sites:
        st = Storage(c.storage)
        messages = [st.read_bytes(f) for f in st.list_files(join(c.workdir, "federation", "messages"), suffix=".bin")]
        for k, v in scan(messages, site_images(c)).items():
            total[k] += v
    return total
