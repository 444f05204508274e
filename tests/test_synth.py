import csv
import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from cmevlm.anatomy import LATERALITIES, PHASES, STRUCTURE_NAMES
from cmevlm.data.synth import FRAME_H, FRAME_W, write_dataset


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in [("a", 1), ("b", 1), ("c", 2)]:
        write_dataset(tmp_path / name, procedures=3, frames_per_procedure=3, seed=seed)
    a, b, c = (_tree_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert a != c


def _procedures(root: Path) -> list[dict]:
    with open(root / "procedures.csv") as f:
        return list(csv.DictReader(f))


def test_layout_metadata_and_masks(synth_dir):
    procs = _procedures(synth_dir)
    assert list(procs[0]) == ["procedure_id", "site", "laterality", "phase"]
    assert {p["laterality"] for p in procs} == set(LATERALITIES)
    assert {p["site"] for p in procs} == {"site_a", "site_b"}
    assert {p["phase"] for p in procs} <= set(PHASES)
    seen = Counter()
    for p in procs:
        frames = sorted((synth_dir / p["procedure_id"] / "frames").glob("*.png"))
        assert len(frames) == 6
        for f in frames:
            img = Image.open(f)
            assert img.mode == "RGB" and img.size == (FRAME_W, FRAME_H)
            masks = sorted((synth_dir / p["procedure_id"] / "masks" / f.stem).glob("*.png"))
            assert 1 <= len(masks) <= 3
            for m in masks:
                assert m.stem in STRUCTURE_NAMES
                arr = np.asarray(Image.open(m))
                assert arr.ndim == 2 and arr.dtype == np.uint8 and arr.shape == (FRAME_H, FRAME_W)
                assert set(np.unique(arr)) == {0, 255}
                seen[m.stem] += 1
    assert set(seen) == set(STRUCTURE_NAMES)


def test_frames_look_like_tissue_not_flat_colour(synth_dir):
    img = np.asarray(Image.open(next(synth_dir.glob("proc_000/frames/*.png"))), np.float32)
    assert img[..., 0].mean() > img[..., 2].mean()  # reddish
    assert img.std(axis=(0, 1)).min() > 15  # textured
    assert (img.min(axis=2) > 240).sum() > 10  # specular highlights


def _features(root: Path):
    """Mean colour, colour spread and mask centroid of each (frame, structure)."""
    rows = []
    for p in _procedures(root):
        for f in sorted((root / p["procedure_id"] / "frames").glob("*.png")):
            img = np.asarray(Image.open(f), np.float32)
            for m in sorted((root / p["procedure_id"] / "masks" / f.stem).glob("*.png")):
                mask = np.asarray(Image.open(m)) > 0
                if mask.sum() < 50:
                    continue
                px = img[mask]
                ys, xs = np.nonzero(mask)
                rows.append((m.stem, p["laterality"], np.r_[px.mean(0), px.std(0)], xs.mean() / mask.shape[1]))
    return rows


def test_structures_are_learnable_from_pixels(tmp_path, synth_dir):
    """A nearest-centroid classifier on colour statistics, trained on one dataset and tested
    on another seed, names the structure: the images carry the signal a model must learn."""
    train, test = _features(synth_dir), _features(write_dataset(tmp_path / "t", 4, 6, seed=11) and tmp_path / "t")
    cents = {s: np.mean([x for n, _, x, _ in train if n == s], axis=0) for s in STRUCTURE_NAMES}
    hits = [min(cents, key=lambda s: np.linalg.norm(x - cents[s])) == n for n, _, x, _ in test]
    assert np.mean(hits) > 0.9


def test_laterality_mirrors_the_scene(synth_dir):
    for name, side, _, cx in _features(synth_dir):
        assert (cx < 0.5) if side == "left" else (cx > 0.5), (name, side, cx)
