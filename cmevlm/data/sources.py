"""Source layouts -> frame records: what to read, with its metadata, and what to quarantine.

Listing is cheap and runs on the driver (one recursive listing per source); reading and
decoding happen later in parallel. A frame record is a plain dict:

    {source_uri, layout, site, procedure_id, frame_id, frame_uri, laterality, phase,
     masks: [{structure, mask_uri, item_id, in_cme_set}]}

Layouts:
    cmevlm  <root>/procedures.csv, <root>/<procedure>/frames/<frame>.png,
            <root>/<procedure>/masks/<frame>/<structure>.png
    dsad    the Dresden Surgical Anatomy Dataset as published: <root>/<structure>/<nn>/image<k>.png
            with mask<k>.png beside it, for its eleven structure folders, and
            <root>/multilabel/<nn>/image<k>.png with one mask<k>_<structure>.png per structure
            (an item per mask; a mask with no foreground means the structure is absent from
            that frame: ingest skips it, counted, never quarantined). <nn> is the surgery, so it
            is the procedure; DSAD has no laterality or phase (both `unknown`; an optional
            procedures.csv keyed `surgery_<nn>` adds them). Files the reader does not use (the
            weak labels CSV, documentation) are skipped with a reason and counted.

A mask record's `absent_ok` says an empty mask means "not in this frame" (skipped) rather than
a broken file (quarantined).
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


def list_source(storage: Storage, source: Source) -> tuple[list[dict], list[dict], list[dict]]:
    """(frame records, quarantine entries, skipped entries) of one source."""
    root = source.uri.rstrip("/")
    if not storage.exists(root):
        raise MissingInput(f"source {root} does not exist")
    files = [posixpath.relpath(f, root) if not f.startswith("s3://") else f[len(root) + 1:] for f in storage.list_files(root)]
    files = [f.replace("\\", "/") for f in files]
    if source.layout == "dsad":
        return _list_dsad(storage, source, root, files)
    return (*_list_cmevlm(storage, source, root, files), [])


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
                good.append(_mask(root, rel, pid, fid, structure, True, absent_ok=False))
        if good:
            site = meta.get("site") or source.site
            records.append(_record(source, root, site, pid, fid, join(root, frames[key]), meta["laterality"], meta["phase"], good))
    return records, quarantine


_DSAD = re.compile(r"^(?P<structure>[^/]+)/(?P<nn>[^/]+)/(?P<kind>image|mask)(?P<k>\d+)\.(?P<ext>png|jpe?g)$", re.I)
_MULTI = re.compile(r"^multilabel/(?P<nn>[^/]+)/(?:image(?P<k>\d+)\.(?:png|jpe?g)|mask(?P<mk>\d+)_(?P<structure>[a-z_]+)\.png)$", re.I)
MULTILABEL = "multilabel"


def _mask(root: str, rel: str, pid: str, fid: str, structure: str, in_cme_set: bool, absent_ok: bool) -> dict:
    return {"structure": structure, "mask_uri": join(root, rel), "item_id": item_id(root, pid, fid, structure),
            "in_cme_set": in_cme_set, "absent_ok": absent_ok}


def _list_dsad(storage: Storage, source: Source, root: str, files: list[str]):
    quarantine: list[dict] = []
    skipped: list[dict] = []
    procs = {}
    if "procedures.csv" in files:
        procs, _ = read_procedures(storage.read_text(join(root, "procedures.csv")))
    pairs: dict[tuple[str, str, str], dict[str, str]] = defaultdict(dict)
    multi: dict[tuple[str, str], dict] = defaultdict(lambda: {"image": None, "masks": []})
    for rel in files:
        m, ml = _DSAD.match(rel), _MULTI.match(rel)
        if ml and ml["k"]:
            multi[(ml["nn"], ml["k"].lstrip("0") or "0")]["image"] = rel
        elif ml:
            multi[(ml["nn"], ml["mk"].lstrip("0") or "0")]["masks"].append((ml["structure"].lower(), rel))
        elif m and m["structure"] != MULTILABEL:
            pairs[(m["structure"], m["nn"], m["k"])][m["kind"].lower()] = rel
        elif rel != "procedures.csv":
            skipped.append(quarantine_entry(root, "not read: not a DSAD image or mask (e.g. the weak labels, documentation)", path=rel))
    records = []
    for (structure, nn, k), kinds in sorted(pairs.items()):
        pid, fid = f"surgery_{nn}", f"{structure}_{k}"
        if "image" not in kinds or "mask" not in kinds:
            quarantine.append(quarantine_entry(root, f"{'mask' if 'mask' in kinds else 'image'} without its pair", procedure_id=pid, frame_id=fid, structure=structure, path=next(iter(kinds.values()))))
            continue
        if structure not in DSAD_STRUCTURES:
            quarantine.append(quarantine_entry(root, f"unknown structure {structure!r}", procedure_id=pid, frame_id=fid, structure=structure, path=kinds["mask"]))
            continue
        records.append(_dsad_record(source, root, procs, pid, fid, kinds["image"], [_dsad_mask(root, kinds["mask"], pid, fid, structure, False)]))
    for (nn, k), entry in sorted(multi.items()):
        rec = _multilabel_record(source, root, procs, nn, k, entry, quarantine)
        if rec:
            records.append(rec)
    return records, quarantine, skipped


def _multilabel_record(source: Source, root: str, procs: dict, nn: str, k: str, entry: dict, quarantine: list[dict]) -> dict | None:
    """One multilabel frame with an item per structure mask (masks of unknown structures and a
    frame without its image or masks are quarantined)."""
    pid, fid = f"surgery_{nn}", f"{MULTILABEL}_{k}"
    if entry["image"] is None or not entry["masks"]:
        for structure, rel in entry["masks"] or [(None, entry["image"])]:
            quarantine.append(quarantine_entry(root, "multilabel mask without its image" if structure else "multilabel image without masks",
                                               procedure_id=pid, frame_id=fid, structure=structure, path=rel))
        return None
    masks = []
    for structure, rel in sorted(entry["masks"]):
        if structure not in DSAD_STRUCTURES:
            quarantine.append(quarantine_entry(root, f"unknown structure {structure!r}", procedure_id=pid, frame_id=fid, structure=structure, path=rel))
            continue
        masks.append(_dsad_mask(root, rel, pid, fid, structure, True))
    return _dsad_record(source, root, procs, pid, fid, entry["image"], masks) if masks else None


def _dsad_mask(root: str, rel: str, pid: str, fid: str, structure: str, absent_ok: bool) -> dict:
    """A DSAD structure's mask under its CME name where it has one (only the pancreas)."""
    name = DSAD_TO_CME.get(structure, structure)
    return _mask(root, rel, pid, fid, name, name in STRUCTURES, absent_ok=absent_ok)


def _dsad_record(source: Source, root: str, procs: dict, pid: str, fid: str, image_rel: str, masks: list[dict]) -> dict:
    """A DSAD frame: site, laterality and phase from the optional procedures.csv, else the
    source's site and `unknown` (DSAD has neither)."""
    meta = procs.get(pid, {})
    return _record(source, root, meta.get("site") or source.site, pid, fid, join(root, image_rel),
                   meta.get("laterality") or "unknown", meta.get("phase") or "unknown", masks)


def _record(source: Source, root: str, site: str, pid: str, fid: str, frame_uri: str, laterality: str, phase: str, masks: list[dict]) -> dict:
    return {
        "source_uri": root, "layout": source.layout, "site": site, "procedure_id": pid, "frame_id": fid,
        "frame_uri": frame_uri, "laterality": laterality, "phase": phase, "masks": masks,
    }


def list_sources(storage: Storage, sources: list[Source]) -> tuple[list[dict], list[dict], list[dict]]:
    """Every source's frame records, quarantine and skipped entries, with duplicate item ids
    (e.g. a source listed twice) quarantined after their first occurrence."""
    records, quarantine, skipped, seen = [], [], [], {}
    for source in sources:
        recs, q, sk = list_source(storage, source)
        quarantine += q
        skipped += sk
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
    return records, quarantine, skipped
