from collections import Counter

import numpy as np
from PIL import Image

from cmevlm.anatomy import DSAD_STRUCTURES
from cmevlm.config import Source
from cmevlm.data.sources import item_id, list_sources
from cmevlm.data.splits import assign_splits
from cmevlm.storage import Storage


def test_lists_cmevlm_layout(synth_dir):
    records, quarantine, _ = list_sources(Storage(), [Source(uri=str(synth_dir), site="x")])
    assert quarantine == []
    assert len(records) == 36
    r = records[0]
    assert set(r) >= {"procedure_id", "frame_id", "site", "laterality", "phase", "frame_uri", "masks"}
    assert r["site"] in ("site_a", "site_b")  # procedures.csv wins over the source's default
    assert all(m["in_cme_set"] for r in records for m in r["masks"])


def test_listing_quarantines_metadata_problems(bad_source):
    root, expected = bad_source
    _, quarantine, _ = list_sources(Storage(), [Source(uri=str(root))])
    reasons = Counter(next(k for k in expected["quarantined"] if k in q["reason"]) for q in quarantine)
    assert reasons == {k: expected["quarantined"][k] for k in ("unknown structure", "not in procedures.csv", "mask without a frame")}
    assert all(q["source_uri"] == str(root) and q["item"]["procedure_id"] for q in quarantine)


def test_same_source_twice_quarantines_duplicates(synth_dir):
    src = Source(uri=str(synth_dir))
    records, quarantine, _ = list_sources(Storage(), [src, src])
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


def write_dsad_tree(root, surgeries=("01", "02"), frames=2, seed=0):
    """A tree laid out as the published Dresden Surgical Anatomy Dataset: one folder per structure
    (the eleven of DSAD) holding <nn>/image<k>.png + mask<k>.png, `multilabel/<nn>/` with
    image<k>.png and one mask<k>_<structure>.png per structure (most of them empty: the
    structure is not in that frame), and the weak labels CSV at the root."""
    rng = np.random.default_rng(seed)
    fg = np.zeros((40, 50), np.uint8)
    fg[10:20, 10:30] = 255
    for structure in DSAD_STRUCTURES:
        for nn in surgeries:
            d = root / structure / nn
            d.mkdir(parents=True)
            for k in range(1, frames + 1):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"image{k:02d}.png")
                Image.fromarray(fg).save(d / f"mask{k:02d}.png")
    present = {}
    for nn in surgeries:
        d = root / "multilabel" / nn
        d.mkdir(parents=True)
        for k in range(1, frames + 1):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"image{k:02d}.png")
            here = {str(s) for s in rng.choice(DSAD_STRUCTURES, size=3, replace=False)} | {"pancreas"}
            present[(nn, k)] = here
            for structure in DSAD_STRUCTURES:
                Image.fromarray(fg if structure in here else np.zeros_like(fg)).save(d / f"mask{k:02d}_{structure}.png")
    (root / "weak_labels.csv").write_text("image,abdominal_wall,colon\n01/image01.png,1,0\n")
    return present


def test_lists_the_real_dsad_tree(tmp_path):
    root = tmp_path / "dsad"
    write_dsad_tree(root)
    (root / "pancreas/02/image03.png").write_bytes((root / "pancreas/02/image01.png").read_bytes())  # no mask
    records, quarantine, skipped = list_sources(Storage(), [Source(uri=str(root), layout="dsad", site="dresden")])
    single = [r for r in records if not r["frame_id"].startswith("multilabel")]
    multi = [r for r in records if r["frame_id"].startswith("multilabel")]
    assert len(single) == 11 * 2 * 2 and all(len(r["masks"]) == 1 and not r["masks"][0]["absent_ok"] for r in single)
    assert Counter(r["masks"][0]["structure"] for r in single) == {s: 4 for s in DSAD_STRUCTURES}
    assert len(multi) == 4 and all(len(r["masks"]) == 11 and all(m["absent_ok"] for m in r["masks"]) for r in multi)
    assert {m["structure"] for m in multi[0]["masks"]} == set(DSAD_STRUCTURES)
    assert [m["in_cme_set"] for m in multi[0]["masks"]].count(True) == 1  # pancreas is the one CME structure in DSAD
    assert all(r["site"] == "dresden" and r["laterality"] == "unknown" and r["phase"] == "unknown" for r in records)
    assert [q["reason"] for q in quarantine] == ["image without its pair"]
    assert [q["item"]["path"] for q in skipped] == ["weak_labels.csv"]
    assert len({m["item_id"] for r in records for m in r["masks"]}) == 44 + 44  # every item its own id


def test_dsad_multilabel_keeps_its_own_quarantine(tmp_path):
    root = tmp_path / "dsad"
    write_dsad_tree(root, surgeries=("01",), frames=1)
    (root / "multilabel/01/mask01_gallbladder.png").write_bytes((root / "multilabel/01/mask01_colon.png").read_bytes())
    (root / "multilabel/01/mask07_colon.png").write_bytes((root / "multilabel/01/mask01_colon.png").read_bytes())
    _, quarantine, _ = list_sources(Storage(), [Source(uri=str(root), layout="dsad")])
    assert sorted(q["reason"] for q in quarantine) == ["multilabel mask without its image", "unknown structure 'gallbladder'"]


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
