"""Tile grids of SD upscale / outpainting (pure geometry)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdstudio.core.tiles import combine, split


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_a1111_layout():
    grid, tiles = split(noise(1000, 700), 512, 512, 64)
    assert (grid.xs, grid.ys) == ([0, 244, 488], [0, 188])  # evenly spread, first and last at the edges
    assert len(tiles) == grid.count == 6 and all(t.size == (512, 512) for t in tiles)
    grid, _ = split(noise(512, 512), 512, 512, 64)
    assert grid.count == 1


@settings(max_examples=40, deadline=None)
@given(w=st.integers(64, 400), h=st.integers(64, 400), tile=st.sampled_from([64, 96, 128]),
       overlap=st.sampled_from([0, 8, 16, 32]))
def test_unchanged_tiles_give_back_the_picture_exactly(w, h, tile, overlap):
    if w < tile or h < tile:
        return
    image = noise(w, h)
    grid, tiles = split(image, tile, tile, overlap)
    assert np.array_equal(np.asarray(combine(grid, tiles)), np.asarray(image))


def test_seams_are_feathered_across_the_overlap():
    grid, _tiles = split(Image.new("RGB", (192, 64)), 128, 64, 32)
    black, white = Image.new("RGB", (128, 64)), Image.new("RGB", (128, 64), (255, 255, 255))
    out = np.asarray(combine(grid, [black, white]))[0, :, 0].astype(int)
    x = grid.xs[1]
    assert (out[:x] == 0).all() and (out[x + 32:] == 255).all()
    ramp = out[x:x + 32]
    assert ramp[0] == 0 and (np.diff(ramp) >= 0).all() and ramp[-1] >= 240  # linear rise across the overlap


def test_too_small_or_bad_overlap():
    with pytest.raises(ValueError, match="smaller than one"):
        split(noise(100, 100), 128, 128, 16)
    with pytest.raises(ValueError, match="overlap"):
        split(noise(200, 200), 128, 128, 128)
