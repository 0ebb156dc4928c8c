"""depth_leres++ (sdstudio.engine.annotators.leres_boost): the merge network under pix2pix's names against a direct
computation, the resolution search, the patch selection, the blending mask, the boosting with a real depth
estimate of the picture (its blurred brightness) and the whole preprocessor with random LeReS and merge files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.engine.annotators import common, leres, leres_boost
from tests.test_annotators import by_name, fresh_annotator_cache, leres_layout, picture, random_weights, write  # noqa: F401

torch.set_num_threads(1)


def _level_prefix(depth: int) -> str:
    """Where level ``depth`` (1 = outermost) sits: each deeper level is item 1 of the outermost level's
    Sequential, item 3 of the others'."""
    return "model." + "".join("model.1." if d == 0 else "model.3." for d in range(depth - 1)) + "model."


def pix2pix_layout(levels: int, ngf: int) -> dict[str, tuple[int, ...]]:
    """pix2pix's UnetGenerator(2, 1, levels, ngf, norm none) file keys and shapes, written from its definition:
    (outer, inner) widths 1/ngf (2 channels in), ngf/2ngf, 2ngf/4ngf, 4ngf/8ngf, then 8ngf/8ngf; down convs
    (item 0 outermost, else 1) have no bias, up convs (item 3 outermost and innermost, else 5) take the
    concatenated skip (2 × inner) but the innermost's, and only the outermost's has a bias."""
    widths = [(1, ngf), (ngf, 2 * ngf), (2 * ngf, 4 * ngf), (4 * ngf, 8 * ngf)] + [(8 * ngf, 8 * ngf)] * (levels - 4)
    out = {}
    for depth, (outer, inner) in enumerate(widths, 1):
        p = _level_prefix(depth)
        if depth == 1:
            out |= {p + "0.weight": (inner, 2, 4, 4), p + "3.weight": (2 * inner, outer, 4, 4), p + "3.bias": (outer,)}
        elif depth == levels:
            out |= {p + "1.weight": (inner, outer, 4, 4), p + "3.weight": (inner, outer, 4, 4)}
        else:
            out |= {p + "1.weight": (inner, outer, 4, 4), p + "5.weight": (2 * inner, outer, 4, 4)}
    return out


def test_published_layout_is_the_networks():
    net = leres_boost.MergeNet(10, 64)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == pix2pix_layout(10, 64)
    assert leres_boost._levels_and_width(net.state_dict()) == (10, 64)


def _direct(weights: dict, x: torch.Tensor, levels: int) -> torch.Tensor:
    """The U-Net written out as recursion: skip = LeakyReLU(input) below the outermost level."""
    def level(depth: int, h: torch.Tensor) -> torch.Tensor:
        prefix = _level_prefix(depth)
        if depth == 1:
            down = F.conv2d(h, weights[prefix + "0.weight"], stride=2, padding=1)
            inner = level(2, down)
            return torch.tanh(F.conv_transpose2d(F.relu(inner), weights[prefix + "3.weight"], weights[prefix + "3.bias"],
                                                 stride=2, padding=1))
        down = F.conv2d(F.leaky_relu(h, 0.2), weights[prefix + "1.weight"], stride=2, padding=1)
        if depth == levels:
            up = F.conv_transpose2d(F.relu(down), weights[prefix + "3.weight"], stride=2, padding=1)
        else:
            up = F.conv_transpose2d(F.relu(level(depth + 1, down)), weights[prefix + "5.weight"], stride=2, padding=1)
        return torch.cat([F.leaky_relu(h, 0.2), up], 1)

    return level(1, x)


def test_merge_network_loads_the_file_and_matches_the_direct_computation(tmp_path):
    weights = random_weights(pix2pix_layout(6, 4), seed=3)
    path = write(tmp_path / "leres" / "latest_net_G.pth", weights)
    net = leres_boost.load(path)
    assert isinstance(net, leres_boost.MergeNet)
    x = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(net(x), _direct(weights, x, 6), atol=1e-5)
    low, high = np.random.default_rng(0).random((2, 64, 64)).astype(np.float32)
    got = leres_boost.merge(net, low * 5 + 2, high)  # inputs are min-max stretched first
    stretched = torch.from_numpy(np.stack([(low - low.min()) / np.ptp(low), (high - high.min()) / np.ptp(high)]))
    with torch.no_grad():
        expected = (_direct(weights, (stretched * 2 - 1)[None], 6)[0, 0] + 1) / 2
    assert np.allclose(got, expected.numpy(), atol=1e-5)
    assert np.isfinite(leres_boost.merge(net, np.ones((64, 64), np.float32), high)).all()  # flat: zeros, no NaN


# ---- the resolution search and the patches -----------------------------------------------------------------
def _lines(size: int = 512, spacing: int = 64) -> np.ndarray:
    img = np.full((size, size, 3), 128, np.uint8)
    img[::spacing] = 250
    return img


def test_resolution_search():
    noise = np.random.default_rng(0).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    assert leres_boost.processing_resolution(noise)[0] == 1344  # edges everywhere: the largest size searched
    size, scale = leres_boost.processing_resolution(_lines(spacing=256))
    assert size == 448 and 0 < scale < 0.5  # sparse edges: the receptive field's size, few pixels near edges
    dense, _ = leres_boost.processing_resolution(_lines(spacing=24))
    assert 448 < dense <= 1344
    assert leres_boost.processing_resolution(picture(64, 80))[0] == 448  # too small to search: no failure
    flat = np.full((300, 300, 3), 9, np.uint8)
    assert leres_boost.processing_resolution(flat)[0] == 672  # no gradient: all "edge"; the search stops under 3×300


def test_patch_selection_keeps_the_textured_part_inside_the_picture():
    img = np.full((1600, 1600, 3), 100, np.uint8)
    texture = np.random.default_rng(1).integers(0, 255, (500, 500, 3), dtype=np.uint8)
    img[100:600, 100:600] = texture
    patches = leres_boost.select_patches(img, factor=1.0)
    assert patches and all(p[2] == p[3] for p in patches)
    assert [p[2] for p in patches] == sorted((p[2] for p in patches), reverse=True)
    for x, y, w, h in patches:
        assert x >= 0 and y >= 0 and x + w < 1601 and y + h < 1601
        assert x < 600 and y < 600  # every patch reaches into the texture
    # a flat picture: every density is 0, the picture's too, and 0 >= 0 keeps all 3 × 3 grid patches (as the
    # extension's test does), each grown as far as the picture allows
    flat = leres_boost.select_patches(np.full((1600, 1600, 3), 7, np.uint8), 1.0)
    assert len(flat) == 9 and flat[0] == [0, 0, 1568, 1568]


def test_blending_mask():
    mask = leres_boost._mask_template(300)
    assert mask.shape == (300, 300) and mask.min() == 0.0 and mask.max() == pytest.approx(1.0)
    assert mask[150, 150] == pytest.approx(1.0, abs=1e-3) and mask[0, 0] == 0.0
    assert np.allclose(mask, mask.T) and np.allclose(mask, mask[::-1])


# ---- the boosting -------------------------------------------------------------------------------------------
def _brightness_depth(rgb: np.ndarray, size: int) -> np.ndarray:
    """A real (if simple) monocular estimate: blurred brightness at size², back at the picture's size."""
    small = cv2.resize(rgb, (size, size)).astype(np.float32).mean(axis=2)
    depth = cv2.GaussianBlur(small, (0, 0), size / 64)
    return cv2.resize(depth, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)


@pytest.fixture(scope="module")
def merge_net():
    torch.manual_seed(0)
    net = leres_boost.MergeNet(10, 2).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    return net


def test_small_pictures_are_the_double_estimate(merge_net):
    img = picture(96, 128)
    got = leres_boost.boost(img, _brightness_depth, merge_net)
    whole = leres_boost.double_estimate(img, 448, 448, _brightness_depth, merge_net)
    assert np.allclose(got, cv2.resize(whole, (128, 96), interpolation=cv2.INTER_CUBIC))
    assert 0.0 <= whole.min() and whole.max() <= 1.0 + 1e-6


def test_boosting_changes_the_estimate_only_inside_the_patches(merge_net):
    side = 512
    img = _lines(side, spacing=256)
    img[300:400, 60:180] = np.random.default_rng(2).integers(0, 255, (100, 120, 3), dtype=np.uint8)
    whole_size, patch_scale = leres_boost.processing_resolution(img)
    # max_res (the extension passes the picture's long side) above R_x: the local boosting runs
    got = leres_boost.boost(img, _brightness_depth, merge_net, max_res=whole_size)
    whole = leres_boost.double_estimate(img, 448, whole_size, _brightness_depth, merge_net)
    factor = max(min(1.0, 4 * patch_scale * whole_size / leres_boost.R_MAX), 0.2)
    large = round(2 * whole_size / factor)
    base = cv2.resize(cv2.resize(whole, (side, side), interpolation=cv2.INTER_CUBIC), (side, side),
                      interpolation=cv2.INTER_CUBIC)
    patches = leres_boost.select_patches(cv2.resize(img, (large, large), interpolation=cv2.INTER_CUBIC), factor)
    assert patches
    covered = np.zeros((side, side), bool)
    for rect in patches:
        x, y, w, h = np.round(np.asarray(rect) * side / large).astype(int)
        covered[y: y + h, x: x + w] = True
    assert covered.mean() < 0.9
    assert np.allclose(got[~covered], base[~covered], atol=1e-4)  # outside every patch: the base estimate
    assert not np.allclose(got[covered], base[covered], atol=1e-3)
    assert np.isfinite(got).all()


# ---- the preprocessor ------------------------------------------------------------------------------------------
def test_the_preprocessor_with_the_published_files(tmp_path):
    weights = random_weights(leres_layout(), seed=5, dtype=torch.float16)
    write(tmp_path / "leres" / "res101.pth", {"depth_model": {"module." + k: v for k, v in weights.items()}})
    found, image = by_name(tmp_path), picture()
    with pytest.raises(Exception, match=f"put latest_net_G.pth in {tmp_path / 'leres'}"):
        found["depth_leres++"].run(image, 64, 0, 0)
    write(tmp_path / "leres" / "latest_net_G.pth", random_weights(pix2pix_layout(10, 2), seed=6))
    out = found["depth_leres++"].run(image, 64, 0, 0)
    assert out.shape == (64, 80, 3) and out.dtype == np.uint8
    padded, crop = common.resize_with_pad(image, 64)
    net = leres.load(tmp_path / "leres" / "res101.pth")
    merge_net = leres_boost.load(tmp_path / "leres" / "latest_net_G.pth")

    def estimate(rgb, size):
        depth = leres.predict(net, cv2.resize(rgb, (size, size)))
        return cv2.resize(depth, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)

    expected = leres.depth_map(leres_boost.boost(padded, estimate, merge_net))
    assert (out[:, :, 0] == crop(expected)).all()
    plain = found["depth_leres"].run(image, 64, 0, 0)
    assert not np.array_equal(plain, out)
