"""img2img/inpaint picture geometry: resize modes, masks, crop regions, the overlay."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdstudio.core import imageops


def stripes(w: int, h: int) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.arange(w)[None, :] * 255 // max(w - 1, 1)
    arr[..., 1] = np.arange(h)[:, None] * 255 // max(h - 1, 1)
    return Image.fromarray(arr)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_every_mode_gives_the_asked_size(mode):
    for size in [(100, 50), (50, 100), (64, 64)]:
        assert imageops.resize_image(mode, stripes(*size), 80, 48).size == (80, 48)


def test_crop_and_resize_cuts_the_sides_of_a_wide_image():
    im = stripes(200, 100)  # 2:1 into 1:1 -> the middle 100 columns
    out = np.asarray(imageops.resize_image(1, im, 100, 100))
    assert np.array_equal(out, np.asarray(im)[:, 50:150])


def test_resize_and_fill_pads_with_stretched_edges():
    im = stripes(200, 100)  # 2:1 into 1:1: fitted to 100x50, bands of 25 rows above and below
    out = np.asarray(imageops.resize_image(2, im, 100, 100)).astype(int)
    fitted = np.asarray(im.resize((100, 50), Image.Resampling.LANCZOS)).astype(int)
    assert np.array_equal(out[25:75], fitted)
    assert np.abs(out[0] - fitted[0]).max() <= 2 and np.abs(out[99] - fitted[-1]).max() <= 2


def test_binary_mask_thresholds_and_reads_alpha():
    grey = Image.fromarray(np.array([[0, 128, 129, 255]], np.uint8))
    assert np.asarray(imageops.binary_mask(grey)).tolist() == [[0, 0, 255, 255]]
    drawing = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    drawing.putpixel((2, 0), (255, 0, 0, 255))
    assert np.asarray(imageops.binary_mask(drawing)).tolist() == [[0, 0, 255, 0]]


def test_blur_spreads_within_its_radius_and_keeps_the_mean():
    # A1111's mask blur: a Gaussian of sigma = blur per axis, its kernel cut at int(2.5 * sigma + 0.5)
    # pixels and normalised. One lit pixel becomes that kernel's outer product, and nothing beyond it.
    mask = Image.new("L", (41, 41), 0)
    mask.putpixel((20, 20), 255)
    arr = np.asarray(imageops.blur_mask(mask, 4)).astype(int)
    k = np.arange(-10, 11)  # offsets within the radius int(2.5 * 4 + 0.5) = 10
    g = np.exp(-k ** 2 / (2 * 4 ** 2))
    g /= g.sum()
    want = np.zeros((41, 41))
    want[10:31, 10:31] = 255 * np.outer(g, g)
    assert np.abs(arr - want).max() <= 1 and arr[20, 20] == arr.max() > 0
    assert arr[:10].sum() == arr[31:].sum() == arr[:, :10].sum() == arr[:, 31:].sum() == 0
    assert np.asarray(imageops.blur_mask(Image.new("L", (41, 41), 0), 4)).sum() == 0
    big = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(big).rectangle((0, 0, 31, 63), fill=255)
    blurred = np.asarray(imageops.blur_mask(big, 4)).astype(int)
    radius = int(2.5 * 4 + 0.5)
    assert (blurred[:, :32 - radius - 1] == 255).all() and (blurred[:, 32 + radius:] == 0).all()
    assert 0 < blurred[0, 32] < 255 and abs(blurred.mean() - 127.5) < 1
    edge = np.array([255 * g[(x + k < 32)].sum() for x in range(64)])  # the kernel's mass left of the edge
    assert np.abs(blurred - edge[None, :]).max() <= 1


def test_fill_paints_the_hole_from_its_surroundings():
    im = Image.new("RGB", (64, 64), (10, 200, 30))
    ImageDraw.Draw(im).rectangle((24, 24, 40, 40), fill=(255, 0, 255))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((24, 24, 40, 40), fill=255)
    filled = np.asarray(imageops.fill_masked(im, mask)).astype(int)
    assert np.abs(filled[32, 32] - [10, 200, 30]).max() <= 3  # the magenta is gone
    assert np.abs(filled[:10, :10] - [10, 200, 30]).max() <= 1


def test_crop_region_and_ratio():
    mask = Image.new("L", (100, 100), 0)
    ImageDraw.Draw(mask).rectangle((40, 45, 49, 54), fill=255)
    assert imageops.crop_region(mask, 0) == (40, 45, 50, 55)
    assert imageops.crop_region(mask, 60) == (0, 0, 100, 100)
    assert imageops.crop_region(Image.new("L", (8, 8)), 4) is None
    x1, y1, x2, y2 = imageops.expand_to_ratio((40, 45, 50, 55), 128, 64, 100, 100)
    assert (x2 - x1) == 2 * (y2 - y1) and 0 <= x1 and x2 <= 100
    x1, y1, x2, y2 = imageops.expand_to_ratio((90, 0, 100, 10), 128, 64, 100, 100)  # pushed back inside
    assert x2 == 100 and x2 - x1 == 20


def test_overlay_is_exact_outside_the_mask():
    original, result = stripes(64, 64), Image.new("RGB", (64, 64), (1, 2, 3))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)
    mixed = np.asarray(imageops.overlay(result, original, mask))
    assert np.array_equal(mixed[:, 32:], np.asarray(original)[:, 32:]) and (mixed[:, :32] == [1, 2, 3]).all()
    placed = np.asarray(imageops.overlay(Image.new("RGB", (16, 16), (9, 9, 9)), original, mask, (0, 0, 32, 32)))
    assert (placed[:32, :32] == 9).all() and np.array_equal(placed[32:, 32:], np.asarray(original)[32:, 32:])


def test_inpaint_sketch_mask_is_the_strokes():
    from PIL import ImageDraw

    from sdstudio.core.imageops import inpaint_sketch

    original = Image.new("RGB", (40, 30), (10, 20, 30))
    sketch = original.copy()
    ImageDraw.Draw(sketch).rectangle((5, 5, 14, 9), fill=(250, 0, 0))
    init, mask = inpaint_sketch(original, sketch, mask_blur=0)
    m = np.asarray(mask)
    assert m[5:10, 5:15].min() == 255 and m.sum() == 255 * 50  # exactly the 10 × 5 stroke
    assert np.array_equal(np.asarray(init), np.asarray(sketch))  # no blur: the sketch itself
    _, dimmed = inpaint_sketch(original, sketch, mask_blur=0, mask_alpha=50)
    assert np.asarray(dimmed).max() == 127  # "mask transparency" 50 %
    soft, _ = inpaint_sketch(original, sketch, mask_blur=2)
    assert np.asarray(soft)[20, 30].tolist() == [10, 20, 30]  # far from the strokes: the original
