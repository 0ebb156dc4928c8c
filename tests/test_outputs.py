"""Output naming, numbering, infotext embedding and grids."""

from PIL import Image

from sdstudio.core import outputs


def _img(color="red"):
    return Image.new("RGB", (16, 8), color)


def test_numbering_continues_and_never_overwrites(tmp_path):
    p0 = outputs.save_image(_img(), tmp_path, infotext="a", suffix="42")
    p1 = outputs.save_image(_img(), tmp_path, infotext="b", suffix="43")
    assert (p0.name, p1.name) == ("00000-42.png", "00001-43.png")
    (tmp_path / "00007-1.png").write_bytes(b"x")
    assert outputs.save_image(_img(), tmp_path, infotext="c", suffix="5").name == "00008-5.png"
    g = outputs.save_image(_img(), tmp_path, infotext="g", basename="grid")
    assert g.name == "grid-0000.png"
    assert not list(tmp_path.glob(".*tmp"))


def test_infotext_in_png_jpeg_webp(tmp_path):
    text = "a cat, 猫\nNegative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 1"
    for fmt in ("png", "jpg", "webp"):
        path = outputs.save_image(_img(), tmp_path, infotext=text, suffix="1", fmt=fmt)
        assert outputs.read_infotext(path) == text, fmt


def test_non_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    try:
        outputs.read_infotext(bad)
    except outputs.NotAnImageError as exc:
        assert "notes.txt" in str(exc)
    else:
        raise AssertionError("expected NotAnImageError")


def test_grid_rows_rule():
    assert outputs.grid_shape(4) == (2, 2)
    assert outputs.grid_shape(2) == (1, 2)
    assert outputs.grid_shape(3) == (2, 2)
    assert outputs.grid_shape(6, batch_size=3, n_rows=0) == (3, 2)
    assert outputs.grid_shape(5, n_rows=2) == (2, 3)
    grid = outputs.image_grid([_img("red"), _img("blue"), _img("green")])
    assert grid.size == (32, 16)
    assert grid.getpixel((20, 2)) == (0, 0, 255)
    assert grid.getpixel((2, 10)) == (0, 128, 0)
    assert grid.getpixel((20, 10)) == (0, 0, 0)
