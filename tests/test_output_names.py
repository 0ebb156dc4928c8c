"""Output file names: two processes saving into one folder never take the same number, and a failed
write leaves nothing behind."""

from __future__ import annotations

import multiprocessing

import pytest
from PIL import Image

from sdstudio.core.outputs import save_image


def _save_many(folder: str, n: int) -> list[str]:
    from pathlib import Path

    image = Image.new("RGB", (8, 8), "red")
    return [save_image(image, Path(folder), infotext=f"image {i}", basename="x").name for i in range(n)]


def test_two_processes_never_take_the_same_number(tmp_path):
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        names = [n for part in pool.starmap(_save_many, [(str(tmp_path), 25)] * 2) for n in part]
    assert len(names) == len(set(names)) == 50
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no temporary files left


def test_a_failed_write_leaves_no_partial_file(tmp_path):
    with pytest.raises((KeyError, ValueError, OSError)):
        save_image(Image.new("RGB", (8, 8)), tmp_path, infotext=None, fmt="no-such-format")
    assert list(tmp_path.iterdir()) == []
    assert save_image(Image.new("RGB", (8, 8)), tmp_path, infotext=None).name == "00000.png"
