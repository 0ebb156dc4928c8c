"""Splitting a picture into overlapping tiles and putting it back together with feathered seams, as
A1111's SD upscale does (``split_grid`` / ``combine_grid`` behaviour): tiles of the processing size,
spread evenly so the first and last touch the edges; each tile is laid over its left and upper
neighbour with a linear ramp across the overlap. Tiles that come back unchanged give back the picture
exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class TileGrid:
    width: int  # of the whole picture
    height: int
    tile_w: int
    tile_h: int
    overlap: int
    xs: list[int] = field(default_factory=list)  # left edge of each column
    ys: list[int] = field(default_factory=list)  # top edge of each row

    @property
    def count(self) -> int:
        return len(self.xs) * len(self.ys)

    def boxes(self) -> list[tuple[int, int, int, int]]:
        """Row by row, the (left, top, right, bottom) of each tile."""
        return [(x, y, x + self.tile_w, y + self.tile_h) for y in self.ys for x in self.xs]


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    count = max(1, math.ceil((size - overlap) / (tile - overlap)))
    step = (size - tile) / (count - 1) if count > 1 else 0
    return [min(int(i * step), size - tile) for i in range(count)]


def split(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> tuple[TileGrid, list[Image.Image]]:
    """The grid for ``image`` and its tiles (row by row). The picture must be at least one tile big."""
    if image.width < tile_w or image.height < tile_h:
        raise ValueError(f"a {image.width}x{image.height} picture is smaller than one {tile_w}x{tile_h} tile")
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"overlap must be from 0 to less than the tile size, got {overlap}")
    grid = TileGrid(image.width, image.height, tile_w, tile_h, overlap,
                    _starts(image.width, tile_w, overlap), _starts(image.height, tile_h, overlap))
    return grid, [image.crop(box) for box in grid.boxes()]


def _ramp(n: int, length: int, vertical: bool) -> Image.Image:
    values = (np.arange(n, dtype=np.float32) * 255 / n).astype(np.uint8)
    arr = np.repeat(values[:, None], length, 1) if vertical else np.repeat(values[None, :], length, 0)
    return Image.fromarray(arr, "L")


def combine(grid: TileGrid, tiles: list[Image.Image]) -> Image.Image:
    """The picture from its (processed) tiles: each laid over its predecessors with a linear ramp across
    the ``overlap`` pixels it shares with its left and upper neighbours."""
    o = grid.overlap
    out = Image.new("RGB", (grid.width, grid.height))
    per_row = len(grid.xs)
    for r, y in enumerate(grid.ys):
        row = Image.new("RGB", (grid.width, grid.tile_h))
        for c, x in enumerate(grid.xs):
            tile = tiles[r * per_row + c].convert("RGB")
            if c == 0 or o == 0:
                row.paste(tile, (x, 0))
                continue
            row.paste(tile.crop((0, 0, o, grid.tile_h)), (x, 0), mask=_ramp(o, grid.tile_h, vertical=False))
            row.paste(tile.crop((o, 0, grid.tile_w, grid.tile_h)), (x + o, 0))
        if r == 0 or o == 0:
            out.paste(row, (0, y))
            continue
        out.paste(row.crop((0, 0, grid.width, o)), (0, y), mask=_ramp(o, grid.width, vertical=True))
        out.paste(row.crop((0, o, grid.width, grid.tile_h)), (0, y + o))
    return out
