import io

import numpy as np
import pytest
from PIL import Image

from cmevlm.data.composite import (
    BadInput, build_composite, build_composites, decode_frame, decode_mask, encode_png, mask_geometry, overlay, to_square,
)


def _png(arr, mode=None, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG", **kw) if mode else Image.fromarray(arr).save(buf, format="PNG", **kw)
    return buf.getvalue()


def test_overlay_exact_pixels():
    frame = np.array([[[100, 50, 200], [10, 20, 30]], [[0, 0, 0], [255, 255, 255]]], np.uint8)
    mask = np.array([[True, False], [True, False]])
    out = overlay(frame, mask, (0, 255, 0), 0.4)
    # 0.6 * 100 + 0.4 * 0 = 60; 0.6 * 50 + 0.4 * 255 = 132; 0.6 * 200 = 120
    assert out[0, 0].tolist() == [60, 132, 120]
    assert out[1, 0].tolist() == [0, 102, 0]
    assert out[0, 1].tolist() == [10, 20, 30] and out[1, 1].tolist() == [255, 255, 255]  # untouched
    assert frame[0, 0].tolist() == [100, 50, 200]  # input not modified


def test_overlay_alpha_extremes():
    frame = np.full((3, 3, 3), 77, np.uint8)
    mask = np.eye(3, dtype=bool)
    assert (overlay(frame, mask, (1, 2, 3), 0.0) == frame).all()
    full = overlay(frame, mask, (1, 2, 3), 1.0)
    assert full[mask].tolist() == [[1, 2, 3]] * 3 and (full[~mask] == 77).all()


def test_pad_keeps_whole_frame_and_centres_it():
    frame = np.full((100, 200, 3), 200, np.uint8)
    sq = to_square(frame, 56, "pad", Image.BILINEAR)
    assert sq.shape == (56, 56, 3)
    assert (sq[:14] == 0).all() and (sq[42:] == 0).all()  # 200x100 -> 56x28, 14 rows of black above and below
    assert (sq[14:42] == 200).all()


def test_crop_takes_the_centre():
    frame = np.zeros((100, 200, 3), np.uint8)
    frame[:, 50:150] = 255  # the centre square is white
    sq = to_square(frame, 28, "crop", Image.NEAREST)
    assert sq.shape == (28, 28, 3) and (sq == 255).all()


def test_composite_overlay_lies_exactly_on_the_resized_mask():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    mask = np.zeros((120, 160), bool)
    mask[30:90, 20:60] = True
    comp, bmask = build_composite(frame, mask, 56, "pad", (0, 255, 0), 0.4)
    assert comp.shape == (56, 56, 3) and bmask.shape == (56, 56)
    assert set(np.unique(bmask)) == {0, 255}
    plain = to_square(frame, 56, "pad", Image.BILINEAR)
    inside = bmask > 0
    assert (comp[~inside] == plain[~inside]).all()
    expect = np.floor(0.6 * plain[inside].astype(np.float32) + 0.4 * np.array([0, 255, 0], np.float32) + 0.5)
    assert (comp[inside] == expect).all()
    # Several masks of one frame give the same as one at a time.
    many = build_composites(frame, [mask, ~mask], 56, "pad", (0, 255, 0), 0.4)
    assert (many[0][0] == comp).all()


def test_decode_frame_rejects_corrupt_and_truncated():
    good = _png(np.zeros((20, 20, 3), np.uint8))
    assert decode_frame(good).shape == (20, 20, 3)
    with pytest.raises(BadInput, match="unreadable frame"):
        decode_frame(b"not an image")
    big = _png(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    with pytest.raises(BadInput, match="unreadable frame"):
        decode_frame(big[: len(big) // 2])


def test_decode_frame_converts_grey_and_rgba_to_rgb():
    assert decode_frame(_png(np.zeros((5, 6), np.uint8))).shape == (5, 6, 3)
    assert decode_frame(_png(np.zeros((5, 6, 4), np.uint8))).shape == (5, 6, 3)


@pytest.mark.parametrize("make, reason", [
    (lambda: b"garbage", "unreadable mask"),
    (lambda: _png(np.full((10, 10, 3), 255, np.uint8)), "not single-channel"),
    (lambda: _png(np.full((12, 10), 255, np.uint8)), "differs from frame size"),
    (lambda: _png(np.zeros((10, 10), np.uint8)), "empty mask"),
    (lambda: _png(np.arange(100, dtype=np.uint8).reshape(10, 10)), "distinct values"),
])
def test_decode_mask_rejects(make, reason):
    with pytest.raises(BadInput, match=reason):
        decode_mask(make(), (10, 10))


def test_decode_mask_binarises_multivalue_only_when_asked():
    arr = np.zeros((10, 10), np.uint8)
    arr[2:4] = 1
    arr[5:7] = 7
    m = decode_mask(_png(arr), (10, 10), binarize_multivalue=True)
    assert m.sum() == 40
    arr2 = np.where(arr > 0, 1, 0).astype(np.uint8)  # 0/1 masks are fine as they are
    assert decode_mask(_png(arr2), (10, 10)).sum() == 40


def test_mask_geometry():
    m = np.zeros((90, 90), bool)
    m[60:90, 0:30] = True  # the lower-left ninth
    g = mask_geometry(m)
    assert g.area_fraction == pytest.approx(1 / 9)
    assert g.bbox == pytest.approx((0, 2 / 3, 1 / 3, 1))
    assert g.centroid == pytest.approx((15 / 90, 75 / 90))
    assert g.region == "lower left"
    m2 = np.zeros((90, 90), bool)
    m2[40:50, 40:50] = True
    assert mask_geometry(m2).region == "centre"
    assert "lower left" in g.describe() and "11.1%" in g.describe()


def test_written_pngs_carry_no_metadata():
    img = Image.new("RGB", (8, 8), (1, 2, 3))
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"  # Make
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    frame = decode_frame(buf.getvalue())
    out = Image.open(io.BytesIO(encode_png(frame)))
    assert not out.info.get("exif") and not out.getexif() and "CameraMaker" not in str(out.info)
