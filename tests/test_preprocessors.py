"""The weight-free ControlNet preprocessors and the control map geometry, against the sd-webui-controlnet
extension's definitions (v1.1.455): each expected value below is computed here from the definition (or by
hand), not by calling the code under test a second way."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from sdstudio.core.controlnet import ControlNetError, Preprocessor
from sdstudio.engine import preprocessors as P
from sdstudio.engine.preprocessors import (
    WEIGHT_FREE,
    Preprocessors,
    detect,
    fit_to,
    hwc3,
    pixel_perfect_resolution,
    resize_with_pad,
)

REG = Preprocessors(WEIGHT_FREE)


def _image(h: int, w: int, seed: int = 0, smooth: float = 2.0) -> np.ndarray:
    x = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8)
    return cv2.GaussianBlur(x, (0, 0), smooth) if smooth else x


def _lines(h: int, w: int) -> np.ndarray:
    """White paper with black strokes (what canny, lineart and xdog are for)."""
    x = np.full((h, w, 3), 255, np.uint8)
    cv2.line(x, (0, 0), (w - 1, h - 1), (0, 0, 0), 2)
    cv2.circle(x, (w // 2, h // 3), max(3, min(h, w) // 5), (30, 30, 30), 3)
    cv2.rectangle(x, (w // 5, h // 2), (w // 2, h - 5), (90, 40, 10), -1)
    return x


def _run(name: str, image, res=-1, a=-1, b=-1, mask=None, **kw) -> np.ndarray:
    return detect(REG.get(name), image, res, a, b, mask, **kw)


# ---- hwc3 ----------------------------------------------------------------------------------------------------
def test_hwc3_gray_repeats_and_rgb_is_kept():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = hwc3(g)
    assert out.shape == (3, 4, 3) and all((out[:, :, c] == g).all() for c in range(3))
    assert (hwc3(g[:, :, None]) == out).all()
    rgb = _image(5, 6, smooth=0)
    assert hwc3(rgb) is rgb


def test_hwc3_composites_rgba_over_white():
    x = np.array([[[200, 100, 0, 128], [10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8)
    out = hwc3(x)
    a = np.float32(128) / np.float32(255)  # in 32-bit floats, truncated, as the extension
    assert out[0, 0].tolist() == [int(np.float32(c) * a + np.float32(255) * (1 - a)) for c in (200, 100, 0)]
    assert out[0, 0].tolist() == [227, 177, 126]
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent: the white paper
    assert out[0, 2].tolist() == [10, 20, 30]


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((0, 4, 3), np.uint8), np.zeros((2, 2, 2, 3), np.uint8)])
def test_hwc3_rejects_what_is_not_an_8bit_image(bad):
    with pytest.raises(ControlNetError):
        hwc3(bad)


# ---- resize_with_pad -----------------------------------------------------------------------------------------
def test_resize_with_pad_short_side_and_multiple_of_64():
    x = _image(300, 200)
    padded, unpad = resize_with_pad(x, 512)
    # short side 200 -> 512: k = 2.56, 300 * 2.56 = 768 (already multiples of 64)
    assert padded.shape == (768, 512, 3)
    assert (padded == cv2.resize(x, (512, 768), interpolation=cv2.INTER_CUBIC)).all()
    x = _image(330, 500)
    padded, unpad = resize_with_pad(x, 520)
    # k = 520/330; 500 * k = 787.9 -> 788, padded to 832; 520 padded to 576
    assert padded.shape == (576, 832, 3)
    core = unpad(padded)
    assert core.shape == (520, 788, 3)
    assert (core == cv2.resize(x, (788, 520), interpolation=cv2.INTER_CUBIC)).all()
    assert (padded[:520, 788:] == core[:, 787:788]).all()  # edge columns repeated
    assert (padded[520:, :788] == core[519:520]).all()  # edge rows repeated


def test_resize_with_pad_refuses_a_map_over_the_pixel_limit():
    strip = np.zeros((4, 600, 3), np.uint8)  # at 512: 76800×512 = 37.5 megapixels
    with pytest.raises(ControlNetError, match=r"a 600×4 control picture at resolution 512 would be 76800×512 "
                                               r"pixels, over the limit of 16 megapixels"):
        resize_with_pad(strip, 512)
    assert resize_with_pad(strip, 64)[0].shape == (64, 9600, 3)  # 0.6 megapixels: fine
    assert resize_with_pad(np.zeros((2048, 2048, 3), np.uint8), 4096)[0].shape == (4096, 4096, 3)  # the limit


def test_resize_with_pad_area_down_and_pad_values():
    x = _image(100, 150, smooth=0)
    padded, unpad = resize_with_pad(x, 40)  # k = 0.4: 40 x 60, padded to 64 x 64
    assert padded.shape == (64, 64, 3)
    want = cv2.resize(x, (60, 40), interpolation=cv2.INTER_AREA)
    assert (unpad(padded) == want).all()
    assert (padded[40:, :60] == want[39:40]).all() and (padded[:40, 60:] == want[:, 59:60]).all()
    assert (padded[40:, 60:] == want[39, 59]).all()  # the corner takes the corner pixel
    same, unpad = resize_with_pad(x, 100)
    assert same.shape == (128, 192, 3) and (unpad(same) == x).all()


def test_resize_with_pad_gray_becomes_rgb_and_mask_channel_is_kept():
    g = _image(40, 40)[:, :, 0]
    padded, _ = resize_with_pad(g, 64)
    assert padded.shape == (64, 64, 3)
    rgba = np.concatenate([_image(40, 40), np.full((40, 40, 1), 255, np.uint8)], axis=2)
    assert resize_with_pad(rgba, 64)[0].shape == (64, 64, 4)


# ---- pixel perfect -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hw", "w", "h", "mode", "want"), [
    ((300, 200), 512, 512, "Crop and Resize", 512),  # max(512/300, 512/200) * 200
    ((300, 200), 512, 512, "Just Resize", 512),
    ((300, 200), 512, 512, "Resize and Fill", 341),  # 512/300 * 200 = 341.3
    ((512, 768), 1024, 512, "Crop and Resize", 683),  # 1024/768 * 512 = 682.7
    ((512, 768), 1024, 512, "Resize and Fill", 512),
    ((512, 768), 1024, 512, "Envelope (Outer Fit)", 512),  # an old spelling
    ((512, 768), 1024, 512, 2, 512),  # the position
    ((1000, 1000), 768, 512, "Just Resize", 768),
    ((1000, 1000), 768, 512, "Resize and Fill", 512),
])
def test_pixel_perfect_resolution(hw, w, h, mode, want):
    assert pixel_perfect_resolution(hw, w, h, mode) == want


def test_resize_modes_by_name_old_spelling_and_position():
    assert P.resize_mode_of("crop and resize") == "Crop and Resize"
    assert P.resize_mode_of("Inner Fit (Scale to Fit)") == "Crop and Resize"
    assert [P.resize_mode_of(i) for i in range(5)] == ["Just Resize", "Crop and Resize", "Resize and Fill",
                                                      "Just Resize", "Just Resize"]  # 3: latent upscale
    with pytest.raises(ControlNetError):
        P.resize_mode_of(-1)


def test_pixel_perfect_rejects_bad_mode():
    with pytest.raises(ControlNetError, match="resize mode"):
        pixel_perfect_resolution((10, 10), 64, 64, "Stretch")


# ---- fit_to --------------------------------------------------------------------------------------------------
def test_fit_just_resize_stretches_many_colour_maps_cubic_up_area_down():
    x = _image(50, 80, smooth=0)
    up = fit_to(x, 200, 120, "Just Resize")
    assert up.shape == (120, 200, 3) and (up == cv2.resize(x, (200, 120), interpolation=cv2.INTER_CUBIC)).all()
    down = fit_to(x, 40, 25, "Just Resize")
    assert (down == cv2.resize(x, (40, 25), interpolation=cv2.INTER_AREA)).all()
    assert (fit_to(x, 80, 50, 0) == x).all()


def test_fit_crop_and_resize_cuts_the_overflow_evenly():
    x = _image(100, 200, smooth=0)
    out = fit_to(x, 100, 100, "Crop and Resize")  # k = max(1, 0.5) = 1: nothing scaled, 50 cut each side
    assert out.shape == (100, 100, 3) and (out == x[:, 50:150]).all()
    out = fit_to(x, 400, 100, "Crop and Resize")  # k = max(1, 2) = 2: 200 x 400, rows 50-150 kept
    scaled = cv2.resize(x, (400, 200), interpolation=cv2.INTER_CUBIC)
    assert (out == scaled[50:150]).all()


def test_fit_resize_and_fill_centres_and_fills_with_the_border_median():
    x = _image(100, 200, smooth=0)
    x[0, :] = x[-1, :] = x[:, 0] = x[:, -1] = (10, 20, 30)
    x[0, :7] = (250, 250, 250)  # a few odd border pixels do not move the median
    out = fit_to(x, 200, 200, "Resize and Fill")  # k = min(2, 1) = 1: placed at rows 50-150
    assert out.shape == (200, 200, 3)
    assert (out[50:150] == x).all()
    assert (out[:50] == (10, 20, 30)).all() and (out[150:] == (10, 20, 30)).all()
    out = fit_to(x, 300, 100, "Resize and Fill")  # k = min(1, 1.5) = 1: columns 50-250
    assert (out[:, 50:250] == x).all() and (out[:, :50] == (10, 20, 30)).all()


def test_fit_keeps_few_colour_maps_nearest():
    seg = np.zeros((30, 30, 3), np.uint8)
    seg[:10] = (1, 2, 3)
    seg[10:20] = (50, 60, 70)
    out = fit_to(seg, 77, 91, "Just Resize")
    colours = {tuple(c) for c in out.reshape(-1, 3)}
    assert colours == {(0, 0, 0), (1, 2, 3), (50, 60, 70)}
    assert (out == cv2.resize(seg, (77, 91), interpolation=cv2.INTER_NEAREST)).all()


def test_fit_binary_maps_stay_binary_and_one_pixel_lines_stay_one_pixel():
    thick = np.zeros((64, 64, 3), np.uint8)
    thick[30:36, 8:56] = 255
    out = fit_to(thick, 128, 128, "Just Resize")
    assert set(np.unique(out)) == {0, 255}
    assert [np.count_nonzero(out[:, c, 0]) for c in range(20, 110, 20)] == [12] * 5
    thin = np.zeros((64, 64, 3), np.uint8)
    thin[32, 8:56] = 255
    out = fit_to(thin, 128, 128, "Just Resize")
    assert set(np.unique(out)) == {0, 255}
    assert [np.count_nonzero(out[:, c, 0]) for c in range(20, 110, 10)] == [1] * 9  # thinned back to one pixel
    blurry = cv2.resize(thin, (128, 128), interpolation=cv2.INTER_CUBIC)
    assert max(np.count_nonzero(blurry[:, c, 0] > 0) for c in range(20, 110, 10)) > 1  # what plain cubic gives


def test_fit_inpaint_maps_keep_a_binary_mask_and_fill_the_new_area_as_masked():
    rgb = _image(60, 40, smooth=0)
    mask = np.zeros((60, 40, 1), np.uint8)
    mask[10:30, 5:20] = 200  # not 255: made 0/255 at 127
    m = np.concatenate([rgb, mask], axis=2)
    same = fit_to(m, 40, 60, "Just Resize")
    assert same.shape == (60, 40, 4) and (same[:, :, :3] == rgb).all()
    assert set(np.unique(same[:, :, 3])) == {0, 255} and (same[10:30, 5:20, 3] == 255).all()
    filled = fit_to(m, 80, 60, "Resize and Fill")  # k = min(1, 2) = 1: columns 20-60
    assert filled.shape == (60, 80, 4)
    assert (filled[:, :20, 3] == 255).all() and (filled[:, 60:, 3] == 255).all()
    assert (filled[:, 20:60, :3] == rgb).all()
    cropped = fit_to(m, 20, 20, "Crop and Resize")
    assert cropped.shape == (20, 20, 4) and set(np.unique(cropped[:, :, 3])) <= {0, 255}


def test_fit_rejects_a_bad_mode_and_size():
    with pytest.raises(ControlNetError):
        fit_to(_image(8, 8), 64, 64, "Stretch")
    with pytest.raises(ControlNetError):
        fit_to(_image(8, 8), 0, 64, "Just Resize")


# ---- the preprocessors ---------------------------------------------------------------------------------------
def test_canny_is_opencv_canny_of_the_resized_image():
    x = (_lines(300, 200) * 0.6 + _image(300, 200, smooth=1.0) * 0.4).astype(np.uint8)
    resized = cv2.resize(x, (512, 768), interpolation=cv2.INTER_CUBIC)
    out = _run("canny", x, 512, 100, 200)
    assert out.shape == (768, 512, 3)
    assert (out[:, :, 0] == cv2.Canny(resized, 100, 200)).all()
    low = _run("canny", x, 512, 10, 200)
    assert (low[:, :, 0] == cv2.Canny(resized, 10, 200)).all()
    assert np.count_nonzero(low) > np.count_nonzero(out)  # the thresholds reach opencv
    assert (_run("canny", x, -1, -1, -1) == out).all()  # -1: 512, 100, 200
    assert (_run("canny", x, 512, 300, 0) == out).all()  # out of 1-255: the defaults


def test_threshold_is_strictly_above_on_the_darkest_channel():
    x = np.zeros((64, 64, 3), np.uint8)
    x[:, :16] = (127, 255, 255)
    x[:, 16:32] = (128, 200, 250)
    x[:, 32:48] = (255, 255, 255)
    out = _run("threshold", x, 64, 127)
    assert (out[:, :16] == 0).all() and (out[:, 16:48] == 255).all() and (out[:, 48:] == 0).all()
    assert (_run("threshold", x, 64, -1) == out).all()  # the default is 127
    assert (_run("threshold", x, 64, 127.5)[:, 16:32] == 255).all()
    assert (_run("threshold", x, 64, 128)[:, 16:32] == 0).all()


def test_invert():
    x = _image(33, 17, smooth=0)
    assert (_run("invert", x) == 255 - x).all()
    assert (_run("invert", x[:, :, 0]) == 255 - hwc3(x[:, :, 0])).all()
    assert _run("invert", x, 5000).shape == x.shape  # no resolution: the size is kept


def test_color_grid_is_cells_of_one_64th():
    x = _image(512, 512, smooth=0)
    out = _run("color", x, 512)
    assert out.shape == (512, 512, 3)
    cells = cv2.resize(x, (8, 8), interpolation=cv2.INTER_CUBIC)
    for i in range(8):
        for j in range(8):
            assert (out[i * 64:(i + 1) * 64, j * 64:(j + 1) * 64] == cells[i, j]).all()
    tall = _run("color", _image(250, 200, smooth=0), 256)  # short side 200 -> 256, long 250 -> 320
    assert tall.shape == (320, 256, 3)
    assert len({tuple(c) for c in tall.reshape(-1, 3)}) <= 5 * 4


def test_tile_resample_divides_the_size_by_the_rate():
    x = _image(300, 200, smooth=0)
    assert (_run("tile_resample", x, -1, 1.0) == x).all()
    assert (_run("tile_resample", x, -1, 1.05) == x).all()  # below 1.1: unchanged
    out = _run("tile_resample", x, -1, 2.0)
    assert out.shape == (150, 100, 3) and (out == cv2.resize(x, (100, 150), interpolation=cv2.INTER_AREA)).all()
    assert _run("tile_resample", x, -1, 3.0).shape == (100, 66, 3)  # int(200 / 3) = 66
    assert _run("tile_resample", x, -1, 9.0).shape == x.shape  # out of 1-8: the default 1


def test_blur_gaussian_sigma():
    x = _lines(256, 256)
    out = _run("blur_gaussian", x, 256, 4.0)
    assert (out == cv2.GaussianBlur(x, (0, 0), 4.0)).all()
    assert not (out == cv2.GaussianBlur(x, (0, 0), 9.0)).all()
    assert (_run("blur_gaussian", x, 256, -1) == cv2.GaussianBlur(x, (0, 0), 9.0)).all()


def test_scribble_xdog_difference_of_gaussians_with_the_extension_8bit_doubling():
    x = _lines(128, 192)
    out = _run("scribble_xdog", x, 128, 20)
    img = x.astype(np.float32)
    dog = (255 - np.min(cv2.GaussianBlur(img, (0, 0), 5.0) - cv2.GaussianBlur(img, (0, 0), 0.5), axis=2))
    dog = dog.clip(0, 255).astype(np.uint8)
    doubled = np.multiply(255 - dog, 2, dtype=np.uint8)  # uint8 arithmetic, as the extension's numpy does
    assert (out[:, :, 0] == np.where(doubled > 20, 255, 0)).all()
    assert np.count_nonzero(out) > 0
    assert (_run("scribble_xdog", x, 128, -1)[:, :, 0] == np.where(doubled > 32, 255, 0)).all()


def test_lineart_standard_finds_dark_strokes_on_white():
    x = _lines(512, 512)
    out = _run("lineart_standard", x)  # no slider: at 512
    assert out.shape == (512, 512, 3)
    f = x.astype(np.float32)
    intensity = np.min(cv2.GaussianBlur(f, (0, 0), 6.0) - f, axis=2).clip(0, 255)
    intensity = intensity / max(16, np.median(intensity[intensity > 8])) * 127
    assert (out[:, :, 0] == intensity.clip(0, 255).astype(np.uint8)).all()
    assert out[5, 500, 0] == 0 and out[256, 256, 0] > 0  # paper stays black, the stroke lights up
    assert (_run("lineart_standard", np.full((64, 64, 3), 255, np.uint8)) == 0).all()  # nothing lit


def test_recolor_gamma():
    x = _image(16, 16, smooth=0)
    value = x.max(axis=2)  # HSV's value: the largest channel
    lightness = cv2.cvtColor(x[:, :, ::-1], cv2.COLOR_RGB2LAB)[:, :, 0]  # the extension reads RGB as BGR here
    for name, channel in (("recolor_intensity", value), ("recolor_luminance", lightness)):
        out = _run(name, x, -1, -1)  # gamma 1
        assert (out[:, :, 0] == channel).all() and (out[:, :, 1] == channel).all()
        for gamma in (0.5, 1.7):
            want = ((channel.astype(np.float32) / 255.0) ** gamma * 255.0).clip(0, 255).astype(np.uint8)
            assert (_run(name, x, -1, gamma)[:, :, 0] == want).all()
    red = np.array([[[200, 10, 10]]], np.uint8)
    assert _run("recolor_luminance", red, -1, 1.0)[0, 0, 0] < 100  # a red pixel gets a blue one's lightness


def _noise(rng: np.random.RandomState, h: int, w: int) -> np.ndarray:
    coarse = rng.uniform(0, 1, size=(h // 256 + 2, w // 256 + 2, 1))
    fine = cv2.resize(coarse, (w + 512, h + 512), interpolation=cv2.INTER_CUBIC)[256:256 + h, 256:256 + w]
    fine = fine - fine.min()
    return (fine / fine.max())[:, :, None]


def test_shuffle_is_a_seeded_random_flow_field():
    x = _image(300, 200)
    out = _run("shuffle", x, seed=1234)
    assert out.shape == (768, 512, 3)
    rng = np.random.RandomState(1234)  # what np.random.seed(seed) gives the extension
    fx, fy = _noise(rng, 768, 512) * 511.0, _noise(rng, 768, 512) * 767.0
    base = cv2.resize(x, (512, 768), interpolation=cv2.INTER_CUBIC)
    want = cv2.remap(base, np.concatenate([fx, fy], axis=2).astype(np.float32), None, cv2.INTER_LINEAR)
    assert (out == want).all()
    assert (_run("shuffle", x, seed=1234) == out).all()
    assert not (_run("shuffle", x, seed=1235) == out).all()


def test_numpy_seed_is_seed_plus_subseed_in_32_bits():
    assert P.numpy_seed(5, 7) == 12
    assert P.numpy_seed(2**32 - 1, 3) == 2
    assert P.numpy_seed(-1, 4) == 4
    assert P.numpy_seed(70000, 1) == 70001


def test_inpaint_appends_the_mask_and_needs_one():
    x = _image(40, 30, smooth=0)
    mask = np.zeros((40, 30), np.uint8)
    mask[5:10] = 255
    for name in ("inpaint", "inpaint_only", "inpaint_global_harmonious"):
        out = _run(name, x, mask=mask)
        assert out.shape == (40, 30, 4) and (out[:, :, :3] == x).all() and (out[:, :, 3] == mask).all()
    three = np.stack([mask, np.zeros_like(mask), 255 - mask], axis=2)
    assert (_run("inpaint", x, mask=three)[:, :, 3] == mask).all()  # a mask image's first channel
    with pytest.raises(ControlNetError, match="'inpaint_only' needs a mask"):
        _run("inpaint_only", x)
    with pytest.raises(ControlNetError, match="inpaint.*mask is 3×4, the image 30×40"):
        _run("inpaint", x, mask=np.zeros((4, 3), np.uint8))


def test_nothing_to_run_gives_back_the_image():
    x = _image(21, 13, smooth=0)
    for name in ("none", "reference_only", "reference_adain", "reference_adain+attn", "tile_colorfix",
                 "tile_colorfix+sharp"):
        assert REG.get(name).run is None
        assert (_run(name, x) == x).all()
    rgba = np.concatenate([x, np.zeros((21, 13, 1), np.uint8)], axis=2)
    assert (_run("none", rgba) == 255).all()  # transparent: white


def test_detect_errors_name_the_module():
    with pytest.raises(ControlNetError, match="'canny'.*8-bit"):
        _run("canny", np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ControlNetError, match="'inpaint'.*8-bit mask"):
        _run("inpaint", _image(8, 8), mask=np.zeros((8, 8), np.float32))

    def broken(image, res, a, b, mask):
        return cv2.resize(image, (0, 0))

    with pytest.raises(ControlNetError, match="'broken' failed on a 8×8 image"):
        detect(Preprocessor("broken", broken), _image(8, 8), -1, -1, -1)
    with pytest.raises(ControlNetError, match="float64 map"):
        detect(Preprocessor("floaty", lambda *args: np.zeros((4, 4))), _image(8, 8), -1, -1, -1)


def test_pixel_perfect_resolution_is_used_as_given():
    x = _lines(100, 100)
    big = _run("canny", x, 3000, pixel_perfect=True)  # past the slider's 2048, as the extension allows
    assert big.shape == (3000, 3000, 3)
    assert _run("canny", x, 3000).shape == (512, 512, 3)  # without: out of range is the default
    assert _run("shuffle", x, 128, pixel_perfect=True, seed=0).shape == (128, 128, 3)


# ---- sliders and the list ------------------------------------------------------------------------------------
RES = {"name": "Resolution", "value": 512, "min": 64, "max": 2048, "step": 8}
GAMMA = {"name": "Gamma Correction", "value": 1.0, "min": 0.1, "max": 2.0, "step": 0.001}
STYLE = {"name": "Style Fidelity (only for Balanced mode)", "value": 0.5, "min": 0.0, "max": 1.0, "step": 0.01}
VARIATION = {"name": "Variation", "value": 8.0, "min": 3.0, "max": 32.0, "step": 1.0}
EXTENSION_DETAIL = {  # /controlnet/module_list's module_detail in the extension
    "none": [RES],
    "canny": [RES, {"name": "Low Threshold", "value": 100, "min": 1, "max": 255, "step": 1},
              {"name": "High Threshold", "value": 200, "min": 1, "max": 255, "step": 1}],
    "invert": [],
    "blur_gaussian": [RES, {"name": "Sigma", "value": 9.0, "min": 0.01, "max": 64.0, "step": 0.01}],
    "scribble_xdog": [RES, {"name": "XDoG Threshold", "value": 32, "min": 1, "max": 64, "step": 0.01}],
    "shuffle": [],
    "inpaint": [], "inpaint_only": [],
    "threshold": [RES, {"name": "Binarization Threshold", "value": 127, "min": 0, "max": 255, "step": 0.01}],
    "color": [RES],
    "lineart_standard": [],
    "recolor_luminance": [GAMMA], "recolor_intensity": [GAMMA],
    "reference_only": [STYLE], "reference_adain": [STYLE], "reference_adain+attn": [STYLE],
    "tile_resample": [{"name": "Down Sampling Rate", "value": 1.0, "min": 1.0, "max": 8.0, "step": 0.01}],
    "tile_colorfix": [VARIATION],
    "tile_colorfix+sharp": [VARIATION, {"name": "Sharpness", "value": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}],
}
EXTENSION_ORDER = ["none", "tile_resample", "reference_only", "recolor_luminance", "lineart_standard",
                   "inpaint_only", "canny", "invert", "tile_colorfix+sharp", "tile_colorfix", "threshold", "color",
                   "shuffle", "scribble_xdog", "reference_adain+attn", "reference_adain", "recolor_intensity",
                   "inpaint", "blur_gaussian"]


def test_module_detail_equals_the_extension():
    detail = REG.module_detail()
    assert set(detail) == set(EXTENSION_DETAIL)
    for name, sliders in EXTENSION_DETAIL.items():
        assert detail[name]["sliders"] == sliders, name
        assert detail[name]["model_free"] == name.startswith("reference_"), name


def test_minus_one_takes_each_slider_default():
    for p in WEIGHT_FREE:
        res, a, b = p.resolved(-1, -1, -1)
        sliders = EXTENSION_DETAIL[p.name]
        with_res = bool(sliders) and sliders[0]["name"] == "Resolution"
        if with_res:
            assert res == 512
        rest = sliders[1:] if with_res else sliders
        for got, slider in zip((a, b), rest, strict=False):
            assert got == slider["value"], p.name


def test_names_follow_the_extension_order():
    # "none" first; then priority (100, 20, 0) high to low, and the label Z to A within one
    assert REG.names() == EXTENSION_ORDER
    labels = REG.names(labels=True)
    assert labels[4] == "lineart_standard (from white bg & black line)" and labels[7].startswith("invert (")
    assert labels[11] == "t2ia_color_grid" and labels[17] == "inpaint_global_harmonious"
    assert list(REG.module_detail(labels=True))[11] == "t2ia_color_grid"


def test_lookup_is_case_insensitive_with_labels_as_aliases():
    assert REG.get("CANNY").name == "canny"
    assert REG.get(" t2ia_color_grid ").name == "color"
    assert REG.get("Invert (From White BG & Black Line)").name == "invert"
    assert REG.get("inpaint_global_harmonious").name == "inpaint"
    assert "Canny" in REG and "hed" not in REG
    with pytest.raises(ControlNetError, match=r"unknown preprocessor 'nope'; available: none, tile_resample, "):
        REG.get("nope")


def test_add_refuses_a_taken_name_naming_the_owner():
    reg = Preprocessors(WEIGHT_FREE)
    reg.add(Preprocessor("my_edges", None, owner="edges-plugin", aliases=("My Edges",)))
    assert reg.get("my edges").owner == "edges-plugin"
    assert reg.names()[-3:] == ["my_edges", "inpaint", "blur_gaussian"]  # priority 0; labels Z to A
    with pytest.raises(ControlNetError, match="the name 'canny' is already taken by 'canny' from sdstudio"):
        reg.add(Preprocessor("Canny", None, owner="other"))
    with pytest.raises(ControlNetError, match="from late-plugin.*taken by 'my_edges' from edges-plugin"):
        reg.add(Preprocessor("late", None, owner="late-plugin", aliases=("MY_EDGES",)))
    with pytest.raises(ControlNetError):
        reg.add("canny")


def test_builtin_lists_the_weight_free_ones(tmp_path):
    reg = P.builtin(tmp_path)
    assert set(EXTENSION_ORDER) <= set(reg.names())
    assert reg.names()[0] == "none"


MODELS = ["control_sd15_canny [aaaa1111]", "control_v11p_sd15_canny [d14c016b]", "t2iadapter_color_sd14v1 [bbbb2222]",
          "control_v11f1e_sd15_tile [cccc3333]", "controlnet_union_sdxl [dddd4444]",
          "control_v11p_sd15_inpaint [eeee5555]", "control_v11e_sd15_ip2p [ffff6666]",
          "control_v11e_sd15_shuffle [1234abcd]", "my_blur_model [5678abcd]"]


def test_control_types_as_the_extension_answers():
    types = REG.control_types(MODELS)["control_types"]
    assert list(types) == ["All", "Canny", "Inpaint", "InstructP2P", "Lineart", "MLSD", "Recolor", "Reference",
                           "Scribble", "Shuffle", "SparseCtrl", "T2I-Adapter", "Tile"]
    assert types["All"] == {"module_list": REG.names(labels=True), "model_list": ["None", *MODELS],
                            "default_option": "none", "default_model": "None"}
    canny = types["Canny"]
    assert canny["module_list"] == ["none", "canny", "invert (from white bg & black line)"]
    assert canny["model_list"] == ["None", "control_sd15_canny [aaaa1111]", "control_v11p_sd15_canny [d14c016b]",
                                   "controlnet_union_sdxl [dddd4444]"]
    assert canny["default_option"] == "canny"
    assert canny["default_model"] == "control_v11p_sd15_canny [d14c016b]"  # a v1.1 name wins; the hash's 11 not
    tile = types["Tile"]
    assert tile["module_list"] == ["none", "tile_resample", "tile_colorfix+sharp", "tile_colorfix", "blur_gaussian"]
    assert tile["model_list"] == ["None", "control_v11f1e_sd15_tile [cccc3333]", "controlnet_union_sdxl [dddd4444]",
                                  "my_blur_model [5678abcd]"]  # "blur" is Tile's alias, "union" serves tile
    assert types["InstructP2P"] == {"module_list": ["none"], "model_list": ["None", "control_v11e_sd15_ip2p [ffff6666]"],
                                    "default_option": "none", "default_model": "control_v11e_sd15_ip2p [ffff6666]"}
    assert types["T2I-Adapter"]["model_list"] == ["None", "t2iadapter_color_sd14v1 [bbbb2222]"]
    assert types["T2I-Adapter"]["default_model"] == "t2iadapter_color_sd14v1 [bbbb2222]"
    assert types["Reference"]["default_model"] == "None" and types["Reference"]["model_list"] == ["None"]
    assert types["Scribble"]["default_option"] == "invert (from white bg & black line)"
    assert types["Shuffle"]["model_list"] == ["None", "control_v11e_sd15_shuffle [1234abcd]"]  # no union for it
    assert types["Inpaint"]["module_list"] == ["none", "inpaint_only", "inpaint_global_harmonious"]


def test_helpers_for_inpaint():
    m = np.zeros((5, 5, 4), np.uint8)
    m[..., 3] = 255
    assert (P.inpaint_display(m)[..., 3] == 128).all()  # 255 - 255 // 2
    mask = np.zeros((21, 21), np.uint8)
    mask[10, 10] = 255
    w = P.inpaint_blend_mask(mask, 7)
    assert w[10, 10] == pytest.approx(1.0) and w[0, 0] == 0.0
    assert w[10, 4] > 0 and w[10, 3] == 0.0  # dilated 3 px, blurred 3 more


# ---- fuzz ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_fuzz_odd_inputs_never_raise(seed):
    rs = np.random.RandomState(seed)
    shapes = [(1, 1), (1, 3), (2, 2), (5, 3), (17, 31), (9, 1), (33, 47)]
    for p in WEIGHT_FREE:
        h, w = shapes[rs.randint(len(shapes))]
        kind = rs.randint(3)
        image = (rs.rand(h, w, (1, 3, 4)[kind]) * 255).astype(np.uint8)
        if kind == 0:
            image = image[:, :, 0]
        res = [-1, 64, 65, 128, 200][rs.randint(5)]
        a, b = (float(rs.uniform(-2, 300)) for _ in range(2))
        mask = (rs.rand(h, w) > 0.5).astype(np.uint8) * 255
        out = detect(p, image, res, a, b, mask, seed=seed)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == (4 if p.needs_mask else 3), p.name
        for mode in ("Just Resize", "Crop and Resize", "Resize and Fill"):
            tw, th = int(rs.randint(1, 90)), int(rs.randint(1, 90))
            fitted = fit_to(out, tw, th, mode)
            assert fitted.shape == (th, tw, out.shape[2]) and fitted.dtype == np.uint8, (p.name, mode)
