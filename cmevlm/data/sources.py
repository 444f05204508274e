"""Source layouts -> frame records: what to read, with its metadata, and what to quarantine.

Listing is cheap and runs on the driver (one recursive listing per source); reading and
decoding happen later in parallel. A frame record is a plain dict:

    {source_uri, layout, site, procedure_id, frame_id, frame_uri, laterality, phase,
     masks: [{structure, mask_uri, item_id, in_cme_set}]}

Layouts:
    cmevlm  <root>/procedures.csv, <root>/<procedure>/frames/<frame>.png,
            <root>/<procedure>/masks/<frame>/<structure>.png
    dsad    <root>/<structure>/<nn>/image<k>.png with mask<k>.png beside it (Dresden Surgical
            Anatomy Dataset). <nn> is the surgery, so it is the procedure; DSAD has no
            laterality or phase (an optional procedures.csv keyed `surgery_<nn>` adds them).
"""

from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
from collections import defaultdict

from cmevlm.anatomy import DSAD_STRUCTURES, DSAD_TO_CME, LATERALITIES, STRUCTURES
from cmevlm.config import Source
from cmevlm.errors import MissingInput
from cmevlm.storage import Storage, join

IMAGE_EXT = (".png", ".jpg", ".jpeg")


def item_id(source_uri: str, procedure_id: str, frame_id: str, structure: str) -> str:
    """Stable id of one (frame, structure) pair: a hash of where it came from."""
    key = "|".join((source_uri.rstrip("/"), procedure_id, frame_id, structure))
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def quarantine_entry(source_uri: str, reason: str, **item) -> dict:
    return {"source_uri": source_uri, "item": item, "reason": reason}


def read_procedures(text: str) -> tuple[dict[str, dict], list[str]]:
    """procedures.csv text -> ({procedure_id: row}, problems)."""
    rows, problems = {}, []
    reader = csv.DictReader(io.StringIO(text))
    missing = {"procedure_id", "site", "laterality", "phase"} - set(reader.fieldnames or ())
    if missing:
        return {}, [f"procedures.csv lacks columns {sorted(missing)}"]
    for row in reader:
        pid = (row.get("procedure_id") or "").strip()
        if pid:
            rows[pid] = {k: (v or "").strip() for k, v in row.items()}
    return rows, problems


def list_source(storage: Storage, source: Source) -> tuple[list[dict], list[dict]]:
    """(frame records, quarantine entries) of one source."""
    root = source.uri.rstrip("/")
    if not storage.exists(root):
        raise MissingInput(f"source {root} does not exist")
    files = [posixpath.relpath(f, root) if not f.startswith("s3://") else f[len(root) + 1:] for f in storage.list_files(root)]
    files = [f.replace("\\", "/") for f in files]
    if source.layout == "dsad":
        return _list_dsad(storage, source, root, files)
    return _list_cmevlm(storage, source, root, files)


def _list_cmevlm(storage: Storage, source: Source, root: str, files: list[str]):
    quarantine: list[dict] = []
    procs, problems = ({}, ["no procedures.csv at the source root"])
    if "procedures.csv" in files:
        procs, problems = read_procedures(storage.read_text(join(root, "procedures.csv")))
    frames: dict[tuple[str, str], str] = {}
    masks: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[1] == "frames" and parts[2].lower().endswith(IMAGE_EXT):
            key = (parts[0], parts[2].rsplit(".", 1)[0])
            if key in frames:
                quarantine.append(quarantine_entry(root, f"duplicate frame id (also {frames[key]})", procedure_id=key[0], frame_id=key[1], path=rel))
                continue
            frames[key] = rel
        elif len(parts) == 4 and parts[1] == "masks" and parts[3].lower().endswith(".png"):
            masks[(parts[0], parts[2])].append((parts[3][:-4], rel))
    records = []
    for key in sorted(set(frames) | set(masks)):
        pid, fid = key
        if key not in frames:
            for structure, rel in masks[key]:
                quarantine.append(quarantine_entry(root, "mask without a frame", procedure_id=pid, frame_id=fid, structure=structure, path=rel))
            continue
        meta = procs.get(pid)
        reason = None
        if meta is None:
            reason = problems[0] if problems else f"procedure {pid!r} is not in procedures.csv"
        elif meta["laterality"] not in LATERALITIES:
            reason = f"laterality {meta['laterality']!r} in procedures.csv is not one of {LATERALITIES}"
        if not masks.get(key):
            quarantine.append(quarantine_entry(root, "frame has no masks", procedure_id=pid, frame_id=fid, path=frames[key]))
            continue
        good = []
        for structure, rel in sorted(masks[key]):
            if reason:
                quarantine.append(quarantine_entry(root, reason, procedure_id=pid, frame_id=fid, structure=structure, path=rel))
            elif structure not in STRUCTURES:
                quarantine.append(quarantine_entry(root, f"unknown structure {structure!r}", procedure_id=pid, frame_id=fid, structure=structure, path=rel))
            else:
                good.append({"structure": structure, "mask_uri": join(root, rel), "item_id": item_id(root, pid, fid, structure), "in_cme_set": True})
        if good:
            site = meta.get("site") or source.site
            records.append(_record(source, root, site, pid, fid, join(root, frames[key]), meta["laterality"], meta["phase"], good))
    return records, quarantine


_DSAD = re.compile(r"^(?P<structure>[^/]+)/(?P<nn>[^/]+)/(?P<kind>image|mask)(?P<k>\d+)\.(?P<ext>png|jpe?g)$", re.I)


def _list_dsad(storage: Storage, source: Source, root: str, files: list[str]):
    quarantine: list[dict] = []
    procs = {}
    if "procedures.csv" in files:
        procs, _ = read_procedures(storage.read_text(join(root, "procedures.csv")))
    pairs: dict[tuple[str, str, str], dict[str, str]] = defaultdict(dict)
    for rel in files:
        m = _DSAD.match(rel)
        if m:
            pairs[(m["structure"], m["nn"], m["k"])][m["kind"].lower()] = rel
    records = []
    for (structure, nn, k), kinds in sorted(pairs.items()):
        pid, fid = f"surgery_{nn}", f"{structure}_{k}"
        if "image" not in kinds or "mask" not in kinds:
            quarantine.append(quarantine_entry(root, f"{'mask' if 'mask' in kinds else 'image'} without its pair", procedure_id=pid, frame_id=fid, structure=structure, path=next(iter(kinds.values()))))
            continue
        name = DSAD_TO_CME.get(structure, structure)
        if structure not in DSAD_STRUCTURES:
            quarantine.append(quarantine_entry(root, f"unknown structure {structure!r}", procedure_id=pid, frame_id=fid, structure=structure, path=kinds["mask"]))
            continue
        meta = procs.get(pid, {})
        mask = {"structure": name, "mask_uri": join(root, kinds["mask"]), "item_id": item_id(root, pid, fid, name), "in_cme_set": name in STRUCTURES}
        records.append(_record(source, root, meta.get("site") or source.site, pid, fid, join(root, kinds["image"]),
                               meta.get("laterality") or "unknown", meta.get("phase") or "unknown", [mask]))
    return records, quarantine


def _record(source: Source, root: str, site: str, pid: str, fid: str, frame_uri: str, laterality: str, phase: str, masks: list[dict]) -> dict:
    return {
        "source_uri": root, "layout": source.layout, "site": site, "procedure_id": pid, "frame_id": fid,
        "frame_uri": frame_uri, "laterality": laterality, "phase": phase, "masks": masks,
    }


def list_sources(storage: Storage, sources: list[Source]) -> tuple[list[dict], list[dict]]:
    """Every source's frame records, with duplicate item ids (e.g. a source listed twice)
    quarantined after their first occurrence."""
    records, quarantine, seen = [], [], {}
    for source in sources:
        recs, q = list_source(storage, source)
        quarantine += q
        for r in recs:
            keep = []
            for m in r["masks"]:
                if m["item_id"] in seen:
                    quarantine.append(quarantine_entry(r["source_uri"], f"duplicate item id {m['item_id']} (first from {seen[m['item_id']]})",
                                                       procedure_id=r["procedure_id"], frame_id=r["frame_id"], structure=m["structure"]))
                else:
                    seen[m["item_id"]] = r["frame_uri"]
                    keep.append(m)
            if keep:
                records.append({**r, "masks": keep})
    return records, quarantine
