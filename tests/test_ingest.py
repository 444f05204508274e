"""The ingest stage on a real local Ray, on local disk and on a moto S3 server."""

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cmevlm import ingest
from cmevlm.config import load_config
from cmevlm.storage import Storage, join


def _cfg(workdir, sources, *extra):
    srcs = ", ".join(f"{{uri: '{u}', layout: {lay}, site: s{i}}}" for i, (u, lay) in enumerate(sources))
    return load_config(overrides=[f"workdir={workdir}", f"sources=[{srcs}]", "data.image_size=56", "ingest.batch_size=8", *extra])


def _rows(st, workdir):
    return st.read_parquet(join(workdir, "frames", "shards")).to_pylist()


def _quarantine(st, workdir):
    text = st.read_text(join(workdir, "quarantine", "ingest.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def local_run(ray_local, tmp_path_factory, synth_dir, bad_source):
    workdir = tmp_path_factory.mktemp("ingest") / "run"
    cfg = _cfg(workdir, [(synth_dir, "cmevlm"), (bad_source[0], "cmevlm")])
    return cfg, ingest.run(cfg)


def test_every_good_item_accepted_every_bad_one_quarantined(local_run, synth_dir, bad_source):
    cfg, manifest = local_run
    st = Storage()
    n_synth = len(list(synth_dir.glob("*/masks/*/*.png")))
    expected = bad_source[1]
    assert manifest["accepted"] == n_synth + expected["accepted"]
    assert manifest["quarantined"] == sum(expected["quarantined"].values())
    assert isinstance(manifest["accepted"], int) and isinstance(manifest["quarantined"], int)
    q = _quarantine(st, cfg.workdir)
    assert len(q) == manifest["quarantined"]
    kinds = Counter(next(k for k in expected["quarantined"] if k in e["reason"]) for e in q)
    assert kinds == expected["quarantined"]
    assert all(set(e) == {"source_uri", "item", "reason"} and e["source_uri"] == str(bad_source[0]) for e in q)
    rows = _rows(st, cfg.workdir)
    assert len(rows) == manifest["accepted"]
    assert len({r["item_id"] for r in rows}) == len(rows)


def test_rows_hold_composites_masks_geometry_and_metadata(local_run):
    cfg, manifest = local_run
    rows = _rows(Storage(), cfg.workdir)
    for r in rows[:20]:
        comp = Image.open(io.BytesIO(r["composite"]))
        mask = np.asarray(Image.open(io.BytesIO(r["mask"])))
        assert comp.mode == "RGB" and comp.size == (56, 56) and not comp.info.get("exif")
        assert mask.shape == (56, 56) and set(np.unique(mask)) <= {0, 255} and mask.any()
        assert 0 < r["area_fraction"] < 1 and len(r["bbox"]) == 4 and len(r["centroid"]) == 2 and r["region"]
        assert r["laterality"] in ("left", "right") and r["split"] in ("train", "test") and r["in_cme_set"]
        green = np.asarray(comp)[mask > 0].mean(0)
        assert green[1] > green[0]  # the overlay made the structure green
    assert sum(e["rows"] for e in manifest["files"]) == len(rows)
    assert all(e["rows"] <= cfg.ingest.rows_per_shard for e in manifest["files"])


def test_no_procedure_in_two_splits(local_run):
    cfg, manifest = local_run
    seen: dict = {}
    for r in _rows(Storage(), cfg.workdir):
        key = (r["site"], r["procedure_id"])
        assert seen.setdefault(key, r["split"]) == r["split"], key
    assert set(seen.values()) == {"train", "test"}
    assert sum(manifest["splits"].values()) == manifest["accepted"]


def test_rerun_is_skipped_and_force_rebuilds(local_run):
    cfg, manifest = local_run
    again = ingest.run(cfg)
    assert again["skipped"] and again["created"] == manifest["created"] and again["files"] == manifest["files"]
    st = Storage()
    stray = join(cfg.workdir, "frames", "shards", "half-written.parquet")
    st.write_bytes(stray, b"PAR1 partial")
    st.delete(join(cfg.workdir, "frames", "manifest.json"))  # as if killed before the manifest
    rebuilt = ingest.run(cfg)
    assert not st.exists(stray) and "skipped" not in rebuilt
    assert rebuilt["accepted"] == manifest["accepted"] and rebuilt["quarantined"] == manifest["quarantined"]
    forced = ingest.run(cfg, force=True)
    assert "skipped" not in forced and forced["accepted"] == manifest["accepted"]


def test_holdout_site_only_in_test(ray_local, tmp_path, synth_dir):
    cfg = _cfg(tmp_path / "run", [(synth_dir, "cmevlm")], "data.holdout_sites=[site_b]")
    ingest.run(cfg)
    splits = {(r["site"], r["split"]) for r in _rows(Storage(), cfg.workdir)}
    assert ("site_b", "train") not in splits and ("site_b", "test") in splits and ("site_a", "train") in splits


def test_s3_in_and_out_matches_local(ray_local, s3_server, s3_bucket, local_run, synth_dir, bad_source):
    local_cfg, local_manifest = local_run
    st = Storage()
    st.upload_dir(synth_dir, s3_bucket + "/in/synth")
    st.upload_dir(bad_source[0], s3_bucket + "/in/bad")
    cfg = _cfg(s3_bucket + "/runs/r1", [(s3_bucket + "/in/synth", "cmevlm"), (s3_bucket + "/in/bad", "cmevlm")],
               f"storage.endpoint={s3_server}", "storage.access_key_id=testing", "storage.secret_access_key=testing")
    manifest = ingest.run(cfg)
    assert (manifest["accepted"], manifest["quarantined"]) == (local_manifest["accepted"], local_manifest["quarantined"])
    assert manifest["splits"] == local_manifest["splits"] and manifest["structures"] == local_manifest["structures"]
    key = lambda r: (r["procedure_id"], r["frame_id"], r["structure"])  # noqa: E731
    content = lambda r: (r["composite"], r["mask"], r["split"], r["bbox"], r["region"])  # noqa: E731
    s3_rows = {key(r): content(r) for r in _rows(Storage(cfg.storage), cfg.workdir)}
    local_rows = {key(r): content(r) for r in _rows(st, local_cfg.workdir)}
    assert s3_rows == local_rows
    assert Storage(cfg.storage).is_complete(cfg.workdir + "/frames")


def test_dsad_layout(ray_local, tmp_path):
    root = tmp_path / "dsad"
    rng = np.random.default_rng(0)
    for structure, nn in [("pancreas", "01"), ("pancreas", "02"), ("stomach", "03"), ("liver", "04")]:
        d = root / structure / nn
        d.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / "image01.png")
        m = np.zeros((60, 80), np.uint8)
        m[5:25, 10:40] = 255
        Image.fromarray(m).save(d / "mask01.png")
    cfg = _cfg(tmp_path / "run", [(root, "dsad")], "data.test_fraction=0.25")
    manifest = ingest.run(cfg)
    assert manifest["accepted"] == 4 and manifest["quarantined"] == 0
    rows = _rows(Storage(), cfg.workdir)
    assert {(r["structure"], r["in_cme_set"]) for r in rows} == {("pancreas", True), ("stomach", False), ("liver", False)}
    assert sum(r["split"] == "test" for r in rows) == 1
    assert pq.ParquetFile(Storage().list_files(join(cfg.workdir, "frames", "shards"), ".parquet")[0]).schema_arrow.field("composite")


def test_ingest_strict_passes_on_the_real_dsad_tree(tmp_path):
    """`cmevlm ingest --strict` on a tree laid out as the published DSAD: every structure folder
    and every present multilabel mask is an item; empty multilabel masks (the structure is not
    in that frame) and the weak labels CSV are skipped and counted, nothing is quarantined."""
    import subprocess
    import sys
    from pathlib import Path

    from test_sources import write_dsad_tree

    present = write_dsad_tree(tmp_path / "dsad", surgeries=("01", "02", "03"), frames=1)
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "cmevlm.cli", "ingest", "--strict", "--set", f"workdir={run}",
                        "--set", f"sources=[{{uri: '{tmp_path / 'dsad'}', layout: dsad, site: dresden}}]",
                        "--set", "data.image_size=56", "--set", "ray.num_cpus=2"],
                       capture_output=True, text=True, cwd=Path(__file__).parent.parent, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = Storage().read_manifest(str(run / "frames"))
    n_present = sum(len(p) for p in present.values())
    assert manifest["quarantined"] == 0
    assert manifest["accepted"] == 11 * 3 + n_present
    assert manifest["not_read"] == 1 + (11 * 3 - n_present)
    rows = Storage().read_parquet(str(run / "frames/shards"), columns=["procedure_id", "frame_id", "structure"]).to_pylist()
    multi = {(r["procedure_id"], r["structure"]) for r in rows if r["frame_id"] == "multilabel_1"}
    assert multi == {(f"surgery_{nn}", s) for (nn, _), here in present.items() for s in here}
