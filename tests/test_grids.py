"""Labelled grids and prompt-file lines (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdstudio.core import grids
from sdstudio.core.outputs import grid_shape
from sdstudio.core.prompts_file import PromptsFileError, parse_line, parse_lines


def cells(n, size=(100, 80)):
    return [Image.new("RGB", size, (40 * i % 255, 120, 200)) for i in range(n)]


@pytest.mark.parametrize("n, batch, rows, expected", [(4, 1, -1, (2, 2)), (5, 1, -1, (2, 3)), (3, 1, -1, (2, 2)),
                                                       (6, 3, 0, (3, 2)), (6, 1, 1, (1, 6)), (2, 1, 5, (2, 1))])
def test_a1111_rows_rule(n, batch, rows, expected):
    assert grid_shape(n, batch, rows) == expected


def test_annotated_grid_geometry_and_cells_untouched():
    plain = grids.plain(cells(6), 3, 2)
    out = grids.annotate(plain, 100, 80, [[grids.Label("CFG Scale: 3")], [grids.Label("CFG Scale: 7")],
                                          [grids.Label("CFG Scale: 11")]],
                         [[grids.Label("Steps: 4")], [grids.Label("Steps: 8")]], margin=6)
    pad_left = 100 * 3 // 4
    pad_top = out.height - 2 * 80 - 6
    assert out.width == pad_left + 3 * 100 + 2 * 6 and pad_top > 0
    arr = np.asarray(out)
    for r in range(2):
        for c in range(3):
            x, y = pad_left + c * 106, pad_top + r * 86
            assert np.array_equal(arr[y:y + 80, x:x + 100], np.asarray(plain)[r * 80:(r + 1) * 80, c * 100:(c + 1) * 100])
    assert (arr[:pad_top, pad_left:] < 128).any()  # ink in the label band


def test_no_labels_no_margins_is_the_plain_grid():
    plain = grids.plain(cells(4), 2, 2)
    out = grids.annotate(plain, 100, 80, [[grids.Label("")]] * 2, [[grids.Label("")]] * 2)
    assert np.array_equal(np.asarray(out), np.asarray(plain))


def test_wrapping_and_inactive_labels():
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    fnt = grids.font(14)
    lines = grids.wrap(draw, "a long label that needs several lines to fit", fnt, 80)
    assert len(lines) > 2 and all(draw.textbbox((0, 0), line, font=fnt)[2] <= 80 or " " not in line for line in lines)
    out = grids.annotate(grids.plain(cells(2), 2, 1), 100, 80, [[grids.Label("on")], [grids.Label("off", False)]],
                         [[grids.Label("")]])
    arr = np.asarray(out).astype(int)
    band = arr[: out.height - 80]
    left, right = band[:, :100], band[:, 100:]
    assert left.min() < 128  # dark ink (how dark depends on the font found: DejaVu, Noto CJK...)
    assert right.min() >= 100 and (right < 200).any()  # grey ink only, struck through


def test_font_is_found_or_falls_back():
    f = grids.font(20)
    assert f.getbbox("Ag")[3] > 0
    path = grids.font_path()
    assert path is None or path.endswith((".ttf", ".ttc", ".otf"))


def test_prompt_file_lines():
    assert parse_line('--prompt "a cat" on a mat --steps 30 --cfg_scale 7.5 --sampler_name "DPM++ 2M"') == {
        "prompt": "a cat on a mat", "steps": 30, "cfg_scale": 7.5, "sampler_name": "DPM++ 2M"}
    assert parse_line("--sd_model v1-5 --styles a,b --tiling true --do_not_save_grid true") == {
        "model": "v1-5", "styles": ["a", "b"], "tiling": True}
    jobs = parse_lines("a plain prompt -- with dashes\n\n  --seed 4  \n")
    assert jobs == [{"prompt": "a plain prompt -- with dashes"}, {"seed": 4}]
    with pytest.raises(PromptsFileError, match="line 1: --outpath_samples: output folders"):
        parse_lines("--outpath_samples /etc")
    with pytest.raises(PromptsFileError, match="line 2: --steps has no value"):
        parse_lines("ok\n--steps")
    with pytest.raises(PromptsFileError, match="no prompts"):
        parse_lines("\n \n")
    assert parse_line("--restore_faces true")["restore_faces"] is True
