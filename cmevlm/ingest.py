"""Ingest: frames + masks -> composite Parquet shards under `<workdir>/frames/`.

    cmevlm ingest --config configs/demo.yaml [--set ...] [--force] [--strict]
    python jobs/run.py ingest --config /etc/cmevlm/run.yaml

Every (frame, structure) pair becomes one row: the composite (frame with a translucent overlay
on the structure, squared to `data.image_size`), the binary mask, its geometry and metadata
(paper, Section 2.1-2.2). Listing and splitting run on the driver; reading, decoding and
compositing run in a Ray Data actor pool; Ray Data writes the shards from the workers.

Bad input never stops the run: each bad item goes to `quarantine/ingest.jsonl` with a
reason, every good item is kept. `frames/manifest.json` is written last, so a rerun skips a
complete stage and an interrupted one is rebuilt from scratch (its partial shards are never
listed in a manifest, so no later stage reads them).
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pyarrow as pa

from cmevlm.assembly import write_quarantine
from cmevlm.config import RunConfig
from cmevlm.data.composite import EMPTY_MASK, BadInput, build_composites, decode_frame, decode_mask, encode_png, mask_geometry
from cmevlm.data.sources import list_sources, quarantine_entry
from cmevlm.data.splits import assign_splits
from cmevlm.errors import ConfigError
from cmevlm.storage import Storage, join

log = logging.getLogger(__name__)

ROW_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("source_uri", pa.string()), ("procedure_id", pa.string()), ("site", pa.string()),
    ("laterality", pa.string()), ("phase", pa.string()), ("structure", pa.string()), ("in_cme_set", pa.bool_()),
    ("frame_id", pa.string()), ("split", pa.string()),
    ("composite", pa.binary()), ("mask", pa.binary()), ("image_size", pa.int32()),
    ("area_fraction", pa.float64()), ("bbox", pa.list_(pa.float64())), ("centroid", pa.list_(pa.float64())),
    ("region", pa.string()),
])
# Worker output: the rows above plus why an item was quarantined (null when accepted) and where
# it came from, so the driver can write the quarantine file.
WORKER_SCHEMA = ROW_SCHEMA.append(pa.field("reason", pa.string())).append(pa.field("path", pa.string()))


# ---------------------------------------------------------------------------------------------
# The transform: plain Python, no Ray


# A multilabel mask with no foreground: the structure is not in that frame. Skipped and counted,
# never quarantined (nothing is wrong with the file).
SKIP = "skipped: "
SKIPPED_ABSENT = SKIP + "structure not in this frame (empty multilabel mask)"


def failed_frame(record: dict, reason: str) -> list[dict]:
    """Quarantine rows for every item of a frame that failed as a whole."""
    base = {k: record[k] for k in ("source_uri", "procedure_id", "site", "laterality", "phase", "frame_id", "split")}
    return [{**base, "item_id": m["item_id"], "structure": m["structure"], "in_cme_set": m["in_cme_set"],
             "path": record["frame_uri"], "reason": reason} for m in record["masks"]]


def process_frame(record: dict, frame_bytes: bytes | None, mask_bytes: list[bytes | None], cfg: RunConfig) -> list[dict]:
    """One frame record -> one output dict per mask: a composite row, or a `reason`."""
    d, base = cfg.data, {k: record[k] for k in ("source_uri", "procedure_id", "site", "laterality", "phase", "frame_id", "split")}
    outs = [{**base, "item_id": m["item_id"], "structure": m["structure"], "in_cme_set": m["in_cme_set"], "path": m["mask_uri"]} for m in record["masks"]]
    try:
        if frame_bytes is None:
            raise BadInput("cannot read frame file")
        frame = decode_frame(frame_bytes, cfg.ingest.max_image_pixels)
    except BadInput as e:
        return [{**o, "reason": str(e), "path": record["frame_uri"]} for o in outs]
    good, masks = [], []
    for o, data, m in zip(outs, mask_bytes, record["masks"]):
        try:
            if data is None:
                raise BadInput("cannot read mask file")
            masks.append(decode_mask(data, frame.shape[:2], cfg.ingest.binarize_multivalue_masks, cfg.ingest.max_image_pixels))
            good.append(o)
        except BadInput as e:
            o["reason"] = SKIPPED_ABSENT if str(e) == EMPTY_MASK and m.get("absent_ok") else str(e)
    for o, m, (comp, bin_mask) in zip(good, masks, build_composites(frame, masks, d.image_size, d.resize, d.overlay_color, d.overlay_alpha)):
        g = mask_geometry(m)
        o.update(
            composite=encode_png(comp, cfg.ingest.png_compress_level), mask=encode_png(bin_mask, cfg.ingest.png_compress_level),
            image_size=d.image_size, area_fraction=g.area_fraction, bbox=list(g.bbox), centroid=list(g.centroid),
            region=g.region, reason=None,
        )
    return outs


class FrameWorker:
    """Callable class for `map_batches`: reads a batch of frame records and composites them.
    Each actor holds one Storage client (one S3 connection pool)."""

    def __init__(self, cfg_json: str):
        self.cfg = RunConfig.model_validate_json(cfg_json)
        self.storage = Storage(self.cfg.storage)

    def _read(self, uri: str) -> bytes | None:
        try:
            return self.storage.read_bytes(uri)
        except OSError:
            return None

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for rec in batch.to_pylist():
            try:
                rows += process_frame(rec, self._read(rec["frame_uri"]), [self._read(m["mask_uri"]) for m in rec["masks"]], self.cfg)
            except Exception as e:  # noqa: BLE001 - one file never fails the stage: its items are quarantined
                log.exception("ingest: %s could not be processed", rec["frame_uri"])
                rows += failed_frame(rec, f"could not be processed: {type(e).__name__}: {e}")
        return pa.Table.from_pylist(rows, schema=WORKER_SCHEMA)


# ---------------------------------------------------------------------------------------------
# The stage


def list_and_split(st: Storage, cfg: RunConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """Every frame record with its split, and what listing already quarantined or skipped (on
    the driver: names and metadata only)."""
    records, quarantine, skipped = list_sources(st, cfg.sources)
    per_proc: dict[tuple[str, str], Counter] = {}
    for r in records:
        per_proc.setdefault((r["site"], r["procedure_id"]), Counter()).update(m["structure"] for m in r["masks"])
    splits = assign_splits(per_proc, cfg.data.test_fraction, cfg.data.holdout_sites, cfg.data.split_seed)
    for r in records:
        r["split"] = splits[(r["site"], r["procedure_id"])]
    n_items = sum(len(r["masks"]) for r in records)
    log.info("ingest: %d frames, %d items from %d sources; %d quarantined, %d skipped while listing", len(records), n_items,
             len(cfg.sources), len(quarantine), len(skipped))
    return records, quarantine, skipped


def transform(st: Storage, cfg: RunConfig, records: list[dict], out: str, quarantine: list[dict], skipped: list[dict]) -> Counter:
    """Read, composite and write the shards with Ray Data; returns the accepted counts per
    (split, structure) and appends the rejected items to `quarantine`, the skipped to `skipped`."""
    ray = _ray(cfg)
    blocks = max(1, min(len(records) // cfg.ingest.batch_size, 200))
    result = ray.data.from_items(records, override_num_blocks=blocks).map_batches(
        FrameWorker,
        fn_constructor_kwargs={"cfg_json": cfg.model_dump_json()},
        batch_size=cfg.ingest.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=min(cfg.ingest.concurrency, blocks)),
        num_cpus=cfg.ingest.num_cpus_per_actor,
    ).materialize()
    # One small pass over the metadata columns tells what was accepted and what not; the
    # composites themselves are written straight from the workers.
    accepted = Counter()
    for row in result.select_columns(["source_uri", "procedure_id", "frame_id", "structure", "item_id", "path", "reason", "split"]).iter_rows():
        if row["reason"] is None:
            accepted[(row["split"], row["structure"])] += 1
        else:
            entry = quarantine_entry(row["source_uri"], row["reason"], **{k: row[k] for k in ("procedure_id", "frame_id", "structure", "item_id", "path")})
            (skipped if row["reason"].startswith(SKIP) else quarantine).append(entry)
    from ray.data.expressions import col

    fs, path = st.resolve(join(out, "shards"))
    result.filter(expr=col("reason").is_null()).drop_columns(["reason", "path"]).write_parquet(
        path, filesystem=fs, min_rows_per_file=cfg.ingest.rows_per_shard, max_rows_per_file=cfg.ingest.rows_per_shard)
    return accepted


def run(cfg: RunConfig, force: bool = False) -> dict:
    """Ingest every source; returns the manifest of `frames/`."""
    st = Storage(cfg.storage)
    out = join(cfg.workdir, "frames")
    if st.is_complete(out) and not force:
        manifest = st.read_manifest(out)
        log.info("ingest: %s is complete (%d accepted, %d quarantined), skipped", out, manifest["accepted"], manifest["quarantined"])
        return {**manifest, "skipped": True}
    if not cfg.sources:
        raise ConfigError("ingest: no sources configured (set `sources:` in the config)")
    st.delete(out)  # whatever an interrupted attempt left
    t0 = time.time()
    records, quarantine, skipped = list_and_split(st, cfg)
    accepted = transform(st, cfg, records, out, quarantine, skipped) if records else Counter()
    qfile = write_quarantine(st, cfg.workdir, "ingest", quarantine)  # then the manifest, last: it marks the stage complete
    by_split = Counter()
    for (split, _), n in accepted.items():
        by_split[split] += n
    manifest = st.write_manifest(
        out, st.list_files(join(out, "shards"), ".parquet"), stage="ingest", accepted=sum(accepted.values()),
        quarantined=len(quarantine), splits=dict(by_split), structures={f"{sp}/{s}": n for (sp, s), n in sorted(accepted.items())},
        quarantine_reasons=dict(Counter(_reason_kind(q["reason"]) for q in quarantine)),
        not_read=len(skipped), not_read_reasons=dict(Counter(q["reason"] for q in skipped)),
        data=cfg.data.model_dump(mode="json"), seconds=round(time.time() - t0, 2),
    )
    log.info("ingest: %d accepted, %d quarantined (%s) in %.1f s -> %s", manifest["accepted"], len(quarantine), qfile, time.time() - t0, out)
    return manifest


def _reason_kind(reason: str) -> str:
    return reason.split(":")[0].split("(")[0].strip()


def _ray(cfg: RunConfig):
    from cmevlm.cluster import connect

    ray = connect(cfg.ray)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input, same shards
    return ray
