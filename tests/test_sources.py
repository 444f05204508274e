from collections import Counter

import numpy as np
from PIL import Image

from cmevlm.config import Source
from cmevlm.data.sources import item_id, list_sources
from cmevlm.data.splits import assign_splits
from cmevlm.storage import Storage


def test_lists_cmevlm_layout(synth_dir):
    records, quarantine = list_sources(Storage(), [Source(uri=str(synth_dir), site="x")])
    assert quarantine == []
    assert len(records) == 36
    r = records[0]
    assert set(r) >= {"procedure_id", "frame_id", "site", "laterality", "phase", "frame_uri", "masks"}
    assert r["site"] in ("site_a", "site_b")  # procedures.csv wins over the source's default
    assert all(m["in_cme_set"] for r in records for m in r["masks"])


def test_listing_quarantines_metadata_problems(bad_source):
    root, expected = bad_source
    _, quarantine = list_sources(Storage(), [Source(uri=str(root))])
    reasons = Counter(next(k for k in expected["quarantined"] if k in q["reason"]) for q in quarantine)
    assert reasons == {k: expected["quarantined"][k] for k in ("unknown structure", "not in procedures.csv", "mask without a frame")}
    assert all(q["source_uri"] == str(root) and q["item"]["procedure_id"] for q in quarantine)


def test_same_source_twice_quarantines_duplicates(synth_dir):
    src = Source(uri=str(synth_dir))
    records, quarantine = list_sources(Storage(), [src, src])
    n = sum(len(r["masks"]) for r in records)
    assert len(quarantine) == n and all("duplicate item id" in q["reason"] for q in quarantine)


def test_item_ids_are_stable_and_distinct():
    a = item_id("/d", "p1", "f1", "pancreas")
    assert a == item_id("/d/", "p1", "f1", "pancreas")
    assert len({a, item_id("/d", "p1", "f1", "duodenum"), item_id("/e", "p1", "f1", "pancreas")}) == 3


def test_missing_source_is_a_clear_error(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_sources(Storage(), [Source(uri=str(tmp_path / "nope"))])


def _dsad(root):
    rng = np.random.default_rng(0)
    for structure, nn in [("pancreas", "01"), ("pancreas", "02"), ("stomach", "01"), ("multilabel", "01")]:
        d = root / structure / nn
        d.mkdir(parents=True)
        for k in (1, 2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"image{k:02d}.png")
            m = np.zeros((40, 50), np.uint8)
            m[10:20, 10:30] = 255
            Image.fromarray(m).save(d / f"mask{k:02d}.png")
    (root / "pancreas/02/image03.png").write_bytes((root / "pancreas/02/image01.png").read_bytes())  # no mask
    return root


def test_lists_dsad_layout(tmp_path):
    root = _dsad(tmp_path / "dsad")
    records, quarantine = list_sources(Storage(), [Source(uri=str(root), layout="dsad", site="dresden")])
    by = Counter((r["procedure_id"], r["masks"][0]["structure"], r["masks"][0]["in_cme_set"]) for r in records)
    assert by == {("surgery_01", "pancreas", True): 2, ("surgery_02", "pancreas", True): 2, ("surgery_01", "stomach", False): 2}
    assert all(r["site"] == "dresden" and r["laterality"] == "unknown" for r in records)
    reasons = sorted(q["reason"] for q in quarantine)
    assert reasons == ["image without its pair", "unknown structure 'multilabel'", "unknown structure 'multilabel'"]


def _procs(n, sites=("a", "b")):
    rng = np.random.default_rng(1)
    return {(sites[i % len(sites)], f"p{i:02d}"): Counter({s: int(rng.integers(0, 5)) for s in "vwxyz"}) for i in range(n)}


def test_splits_cover_every_procedure_once_with_the_fraction():
    procs = _procs(40)
    split = assign_splits(procs, 0.25, seed=3)
    assert set(split) == set(procs) and set(split.values()) == {"train", "test"}
    assert sum(v == "test" for v in split.values()) == 10
    assert assign_splits(procs, 0.25, seed=3) == split  # deterministic
    assert assign_splits(procs, 0.25, seed=4) != split


def test_splits_hold_out_whole_sites():
    procs = _procs(20, sites=("a", "b", "c"))
    split = assign_splits(procs, 0.2, holdout_sites=["c"], seed=0)
    assert all(split[k] == "test" for k in procs if k[0] == "c")
    assert any(split[k] == "test" for k in procs if k[0] != "c")


def test_splits_are_stratified_by_structure():
    procs = _procs(60)
    split = assign_splits(procs, 0.2, seed=0)
    total = sum(procs.values(), Counter())
    test = sum((procs[k] for k in procs if split[k] == "test"), Counter())
    for s in total:
        assert abs(test[s] / total[s] - 0.2) < 0.05, s
