"""Deforum's image-space maths (sdstudio.engine.animation): the 2D/3D warps, perspective flip, colour
coherence, noise, contrast, anti-blur, cadence blending and optical flow, on small synthetic frames."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from sdstudio.engine import animation as anim

H, W = 96, 128
CX, CY = W / 2, H / 2


def texture(seed: int = 0, height: int = H, width: int = W, sigma: float = 3.0) -> np.ndarray:
    """A smooth random RGB picture (optical flow and interpolation need texture without aliasing)."""
    rng = np.random.default_rng(seed)
    noise = rng.random((height, width, 3)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return np.rint(smooth * 255).astype(np.uint8)


def marker(x: float, y: float, height: int = H, width: int = W, sigma: float = 1.5) -> np.ndarray:
    """Black frame with a Gaussian spot centred at pixel coordinates (x, y)."""
    ys, xs = np.mgrid[0:height, 0:width]
    spot = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.rint(spot * 255).astype(np.uint8)[..., None], 3, axis=2)


def centroid(image: np.ndarray) -> tuple[float, float]:
    weights = image[..., 0].astype(np.float64)
    weights[weights < 8] = 0
    ys, xs = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


# ------------------------------------------------------------------------------------------------ 2D


@pytest.mark.parametrize("border", ["replicate", "wrap"])
def test_identity_2d_keeps_the_frame_exactly(border):
    image = texture()
    out = anim.warp_2d(image, angle=0, zoom=1, translation_x=0, translation_y=0, border=border)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, image)
    assert np.array_equal(anim.warp_2d_matrix(W, H), np.eye(3))


def test_positive_translation_moves_content_right_and_down():
    image = marker(50, 40)
    x, y = centroid(anim.warp_2d(image, translation_x=10))
    assert x == pytest.approx(60, abs=0.05) and y == pytest.approx(40, abs=0.05)
    x, y = centroid(anim.warp_2d(image, translation_y=7.5))
    assert x == pytest.approx(50, abs=0.05) and y == pytest.approx(47.5, abs=0.05)
    # an integer shift with border replicate is a pure copy of the pixels
    shifted = anim.warp_2d(texture(), translation_x=10)
    assert np.array_equal(shifted[:, 10:], texture()[:, :-10])


def test_zoom_scales_distances_from_the_transform_centre():
    for dx, dy in ((30, 0), (0, -25), (-20, 18)):
        x, y = centroid(anim.warp_2d(marker(CX + dx, CY + dy), zoom=1.1))
        assert x - CX == pytest.approx(1.1 * dx, abs=0.1)
        assert y - CY == pytest.approx(1.1 * dy, abs=0.1)
    # about another transform centre (0.25, 0.75 of the frame)
    px, py = 0.25 * W, 0.75 * H
    x, y = centroid(anim.warp_2d(marker(px + 20, py - 10), zoom=1.5, transform_center_x=0.25, transform_center_y=0.75))
    assert (x - px, y - py) == (pytest.approx(30, abs=0.1), pytest.approx(-15, abs=0.1))


def test_angle_rotates_counter_clockwise_on_screen_about_the_centre():
    x, y = centroid(anim.warp_2d(marker(CX + 40, CY), angle=90))
    assert (x - CX, y - CY) == (pytest.approx(0, abs=0.1), pytest.approx(-40, abs=0.1))  # right -> up
    x, y = centroid(anim.warp_2d(marker(CX, CY - 30), angle=90))
    assert (x - CX, y - CY) == (pytest.approx(-30, abs=0.1), pytest.approx(0, abs=0.1))  # up -> left


def test_translation_comes_before_rotation_and_zoom():
    # M = R @ T: the content is moved by (tx, ty), then zoomed about the centre, so the move is zoomed too
    x, y = centroid(anim.warp_2d(marker(CX, CY), zoom=2.0, translation_x=5))
    assert (x - CX, y - CY) == (pytest.approx(10, abs=0.1), pytest.approx(0, abs=0.1))


def test_border_replicate_stretches_the_edge_and_wrap_tiles_the_frame():
    image = texture()
    replicate = anim.warp_2d(image, translation_x=10, border="replicate")
    wrap = anim.warp_2d(image, translation_x=10, border="wrap")
    assert np.array_equal(replicate[:, :10], np.repeat(image[:, :1], 10, axis=1))
    assert np.array_equal(wrap[:, :10], image[:, -10:])
    assert np.array_equal(wrap[:, 10:], replicate[:, 10:])
    with pytest.raises(ValueError, match="border"):
        anim.warp_2d(image, translation_x=1, border="reflect")


def test_warp_2d_takes_float_fields():
    flow = np.random.default_rng(1).standard_normal((H, W, 2)).astype(np.float32) * 5
    out = anim.warp_2d(flow, translation_x=3)
    assert out.dtype == np.float32 and out.shape == flow.shape
    assert np.allclose(out[:, 3:], flow[:, :-3])
    assert out.min() < 0  # not clamped


# ---------------------------------------------------------------------------------------- perspective flip


@pytest.mark.parametrize("fv", [53, 30, 120, 160])
def test_perspective_flip_is_the_identity_at_zero_angles(fv):
    # the extension's flip is a 0.12 % zoom-out plus a 0.5 px shift here (P[3,3] left at 1), every frame
    assert np.allclose(anim.perspective_flip_matrix(W, H, (0, 0, 0, fv)), np.eye(3), atol=1e-12)
    image = texture()
    assert np.array_equal(anim.warp_2d(image, perspective_flip=(0, 0, 0, fv)), image)


@pytest.mark.parametrize("angles", [(10, 0, 0), (0, 15, 0), (0, 0, -20), (7, -12, 25)])
def test_perspective_flip_keeps_the_frame_centre(angles):
    # the extension composes its centring translation on the wrong side and pivots about (s/2, s/2)
    matrix = anim.perspective_flip_matrix(640, 384, (*angles, 53))
    centre = matrix @ np.array([320.0, 192.0, 1.0])
    assert centre[:2] / centre[2] == pytest.approx([320.0, 192.0], abs=1e-9)


def test_perspective_flip_theta_is_an_in_plane_rotation_clockwise_on_screen():
    matrix = anim.perspective_flip_matrix(W, H, anim.PerspectiveFlip(theta=12, fv=70))
    rotation = np.vstack([cv2.getRotationMatrix2D((CX, CY), -12, 1.0), [0, 0, 1]])
    assert np.allclose(matrix, rotation, atol=1e-12)


def test_perspective_flip_matches_the_extension_geometry():
    """Corner positions computed with the extension's own warpMatrix at 640×384, with its P[3,3] and
    centring order fixed (the pinhole geometry it intends): gamma 15 pulls the top corners in."""
    matrix = anim.perspective_flip_matrix(640, 384, (0, 15, 0, 53))

    def apply(x, y):
        v = matrix @ np.array([x, y, 1.0])
        return v[:2] / v[2]

    assert apply(0, 0) == pytest.approx([17.9469, 16.9435], abs=1e-3)
    assert apply(640, 0) == pytest.approx([622.0531, 16.9435], abs=1e-3)
    assert apply(100, 300) == pytest.approx([92.3930, 299.9271], abs=1e-3)


def test_perspective_flip_keeps_the_2d_translation():
    # the extension's np.matmul(bM, rot_mat, trans_mat) writes into trans_mat (numpy's out) and drops it
    image = marker(50, 40)
    x, y = centroid(anim.warp_2d(image, translation_x=10, translation_y=-6, perspective_flip=(0, 0, 0, 53)))
    assert (x, y) == (pytest.approx(60, abs=0.05), pytest.approx(34, abs=0.05))
    flip = (0, 10, 5, 60)
    with_flip = anim.warp_2d_matrix(W, H, angle=5, zoom=1.05, translation_x=4, perspective_flip=flip)
    expected = anim.perspective_flip_matrix(W, H, flip) @ anim.warp_2d_matrix(W, H, angle=5, zoom=1.05, translation_x=4)
    assert np.allclose(with_flip, expected)


# ------------------------------------------------------------------------------------------------ 3D


@pytest.mark.parametrize("sampling_mode", anim.SAMPLING_MODES)
def test_identity_3d_keeps_the_frame(sampling_mode):
    image = texture()
    depth = torch.rand(H, W, generator=torch.Generator().manual_seed(0))
    out = anim.warp_3d(image, depth, sampling_mode=sampling_mode)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert np.array_equal(out, image)


def test_flat_depth_translation_z_forward_is_a_zoom_in():
    tz, fov = 10.0, 70.0
    tan_half = math.tan(math.radians(fov / 2))
    # ndc grows by 1/(1 - tz/200) at z = 1; the offset is taken in grid units: s = u (1 - k)
    k = (1.0 / (1.0 - tz / 200.0) - 1.0) / tan_half
    zoom = 1.0 / (1.0 - k)
    for dx, dy in ((30, 0), (0, -25), (-20, 18)):
        out = anim.warp_3d(marker(CX + dx, CY + dy), None, translation=(0, 0, tz), fov=fov, sampling_mode="bilinear")
        x, y = centroid(out)
        assert x - CX == pytest.approx(zoom * dx, abs=0.35)
        assert y - CY == pytest.approx(zoom * dy, abs=0.35)
    # any constant depth map is the extension's flat plane
    constant = np.full((H, W), 7.5, dtype=np.float32)
    image = texture()
    assert np.array_equal(
        anim.warp_3d(image, constant, translation=(0, 0, tz)), anim.warp_3d(image, None, translation=(0, 0, tz))
    )
    # and backwards is a zoom-out
    x, _ = centroid(anim.warp_3d(marker(CX + 30, CY), None, translation=(0, 0, -tz), sampling_mode="bilinear"))
    assert x - CX < 29


def test_flat_depth_translation_xy_is_a_2d_shift():
    tx, ty, fov = 20.0, -12.0, 70.0
    tan_half = math.tan(math.radians(fov / 2))
    shift_x = -tx / 200 / tan_half * W / 2  # positive x moves the camera right: content goes left
    shift_y = ty / 200 / tan_half * H / 2  # positive y moves content down
    image = texture(sigma=4)
    out = anim.warp_3d(image, None, translation=(tx, ty, 0), fov=fov, sampling_mode="bilinear")
    expected = anim.warp_2d(image, translation_x=shift_x, translation_y=shift_y)
    inner = (slice(12, -12), slice(16, -16))
    assert np.abs(out[inner].astype(int) - expected[inner]).max() <= 2
    x, y = centroid(anim.warp_3d(marker(CX, CY), None, translation=(tx, ty, 0), fov=fov, sampling_mode="bilinear"))
    assert (x - CX, y - CY) == (pytest.approx(shift_x, abs=0.1), pytest.approx(shift_y, abs=0.1))


def test_near_far_do_not_change_the_picture_and_fov_does():
    image = texture()
    a = anim.warp_3d(image, None, translation=(5, 3, 8), near=200, far=10000)
    b = anim.warp_3d(image, None, translation=(5, 3, 8), near=10, far=500)
    c = anim.warp_3d(image, None, translation=(5, 3, 8), fov=40)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rotation_3d_signs():
    # roll: positive z turns content counter-clockwise on screen (right of centre goes up)
    x, y = centroid(anim.warp_3d(marker(CX + 30, CY), None, rotation_3d=(0, 0, 5), sampling_mode="bilinear"))
    assert y < CY - 1.5 and abs(x - (CX + 30)) < 1
    # pan: positive y turns the camera right, content goes left
    x, y = centroid(anim.warp_3d(marker(CX, CY), None, rotation_3d=(0, 3, 0), sampling_mode="bilinear"))
    assert x < CX - 2 and abs(y - CY) < 0.5


def test_3d_offsets_match_the_extensions_pytorch3d_cameras():
    """Displacements computed with the extension's vendored pytorch3d (FoVPerspectiveCameras old/new,
    euler_angles_to_matrix "XYZ", T = (-tx, ty, -tz)/200) on a 5×7 sloped depth."""
    ys, xs = torch.meshgrid(torch.arange(5.0), torch.arange(7.0), indexing="ij")
    z = 1 + 0.1 * ys + 0.05 * xs
    offsets = anim.warp_3d_offsets(z, translation=(3, 4, -7), rotation_3d=(5, -8, 12), fov=40, aspect_ratio=1.3)[0]
    golden = {(0, 0): (0.37597, 1.216988), (2, 3): (0.297727, 0.193329), (4, 6): (0.761716, 0.023158),
              (1, 5): (0.144769, -0.087038)}
    for (i, j), expected in golden.items():
        assert offsets[i, j].tolist() == pytest.approx(expected, abs=2e-6)


def test_3d_aspect_ratio_stretches_x_only():
    z = torch.ones(H, W)
    square = anim.warp_3d_offsets(z, translation=(10, 6, 0), aspect_ratio=1.0)
    wide = anim.warp_3d_offsets(z, translation=(10, 6, 0), aspect_ratio=2.0)
    assert torch.allclose(wide[..., 0], square[..., 0] / 2) and torch.equal(wide[..., 1], square[..., 1])


def test_depth_to_z_follows_the_extension():
    midas = torch.linspace(0, 10, H * W).reshape(H, W)  # inverse depth: larger = nearer
    z = anim.depth_to_z(midas, "Midas-3-Hybrid")
    assert z.dtype == torch.float32 and z.shape == (H, W)
    assert float(z.min()) == pytest.approx(1.0, abs=1e-6) and float(z.max()) <= 2.0
    assert float(z[0, 0]) > float(z[-1, -1])  # the nearest pixel has the smallest z
    metric = anim.depth_to_z(midas, "Zoe")
    assert float(metric[0, 0]) < float(metric[-1, -1])
    assert float(metric.max()) == pytest.approx(2.0, abs=1e-6)
    assert torch.equal(anim.depth_to_z(midas, "Depth Anything V2"), z)
    assert torch.equal(anim.depth_to_z(midas, "raw"), midas)
    bad = midas.clone()
    bad[0, 0] = float("nan")
    assert torch.equal(anim.depth_to_z(bad, "Midas-3-Hybrid"), torch.ones(H, W))
    with pytest.raises(ValueError, match="unknown depth algorithm"):
        anim.depth_to_z(midas, "sonar")


def test_near_pixels_move_more_than_far_ones():
    depth = np.zeros((H, W), dtype=np.float32)
    depth[:, : W // 2] = 1.0  # MiDaS: left half near
    out_near = anim.warp_3d(marker(W * 0.25, CY), depth, translation=(20, 0, 0), sampling_mode="bilinear")
    out_far = anim.warp_3d(marker(W * 0.75, CY), depth, translation=(20, 0, 0), sampling_mode="bilinear")
    move_near = W * 0.25 - centroid(out_near)[0]
    move_far = W * 0.75 - centroid(out_far)[0]
    assert move_near > 0 and move_far > 0
    # equalised, the far half sits at the CDF of the first bin (0.5): z = 1 near, 1.5 far
    assert move_near == pytest.approx(1.5 * move_far, rel=0.03)


# ---------------------------------------------------------------------------------------- colour coherence


def cdf(channel: np.ndarray) -> np.ndarray:
    return np.cumsum(np.bincount(channel.ravel(), minlength=256)) / channel.size


def test_histogram_matching_gives_the_reference_histograms():
    rng = np.random.default_rng(3)
    image = texture(1)
    reference = np.clip(rng.normal((40, 160, 220), (25, 30, 10), size=(80, 100, 3)), 0, 255).astype(np.uint8)
    matched = anim.match_colors(image, reference, "RGB")
    for c in range(3):
        assert np.abs(cdf(matched[..., c]) - cdf(reference[..., c])).max() < 0.03
        assert abs(matched[..., c].mean() - reference[..., c].mean()) < 1.0
    # the order of the pixels is kept: matching is a monotonic per-level map
    order = np.argsort(image[..., 0].ravel(), kind="stable")
    assert np.all(np.diff(matched[..., 0].ravel()[order].astype(int)) >= 0)


@pytest.mark.parametrize("mode", ["RGB", "HSV", "LAB"])
def test_matching_a_frame_to_itself_changes_nothing_but_the_colour_conversion(mode):
    image = texture(2)
    out = anim.match_colors(image, image, mode)
    if mode == "RGB":
        assert np.array_equal(out, image)
    else:
        forward, back = {"HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB), "LAB": (cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB)}[mode]
        assert np.array_equal(out, cv2.cvtColor(cv2.cvtColor(image, forward), back))


def test_colour_coherence_modes():
    image, reference = texture(4), texture(5)[::-1]
    assert np.array_equal(anim.match_colors(image, reference, "None"), image)
    lab = anim.match_colors(image, reference, "LAB")
    assert np.array_equal(anim.match_colors(image, reference, "Video Input"), lab)
    assert np.array_equal(anim.match_colors(image, reference, "Image"), lab)
    assert not np.array_equal(lab, anim.match_colors(image, reference, "HSV"))
    with pytest.raises(ValueError, match="color coherence"):
        anim.match_colors(image, reference, "XYZ")


def test_histogram_matching_agrees_with_skimage():
    # scikit-image is a test dependency (pyproject [test]): missing, this fails rather than skips
    from skimage import exposure

    image, reference = texture(6), texture(7, 50, 70, sigma=1.0)
    ours = anim.match_histograms(image, reference).astype(int)
    theirs = exposure.match_histograms(image, reference, channel_axis=-1).astype(int)
    assert np.abs(ours - theirs).max() <= 1  # we round where skimage truncates


# ------------------------------------------------------------------------------- contrast, anti-blur, noise


def test_contrast_is_a_clipped_gain():
    image = np.array([[[0, 101, 200]]], dtype=np.uint8)
    assert np.array_equal(anim.contrast(image, 1.0), image)
    assert anim.contrast(image, 0.5).tolist() == [[[0, 50, 100]]]
    assert anim.contrast(image, 1.5).tolist() == [[[0, 152, 255]]]  # the extension wraps 300 to 44


def test_unsharp_mask():
    image = texture(8)
    assert np.array_equal(anim.unsharp(image, 0.0), image)
    flat = np.full((32, 32, 3), 90, dtype=np.uint8)
    assert np.array_equal(anim.unsharp(flat, 1.0), flat)
    out = anim.unsharp(image, 0.7, kernel=5, sigma=1.2)
    blurred = cv2.GaussianBlur(image, (5, 5), 1.2).astype(np.float64)
    expected = np.clip(1.7 * image - 0.7 * blurred, 0, 255).round()
    assert np.array_equal(out, expected.astype(np.uint8))
    step = np.zeros((16, 16, 3), dtype=np.uint8)
    step[:, 8:] = 200
    sharp = anim.unsharp(step, 1.0)
    assert sharp[0, 8, 0] > 200 and sharp[0, 7, 0] == 0  # overshoot on the bright side, clipped on the dark
    # threshold keeps pixels within 5 levels of the blur on either side (the extension's uint8 difference
    # wraps when the pixel is darker than the blur, so it sharpens those)
    kept = anim.unsharp(image, 1.0, threshold=5)
    difference = image.astype(int) - cv2.GaussianBlur(image, (5, 5), 1.0)
    low = np.abs(difference) < 5
    assert (low & (difference < 0)).sum() > 100
    assert np.array_equal(kept[low], image[low])
    assert np.array_equal(kept[~low], anim.unsharp(image, 1.0)[~low])
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    mask[:, : W // 2] = 255
    masked = anim.unsharp(image, 1.0, mask=mask)
    assert np.array_equal(masked[:, W // 2 :], image[:, W // 2 :])
    assert np.array_equal(masked[:, : W // 2], anim.unsharp(image, 1.0)[:, : W // 2])
    assert anim.unsharp(image, 1.0, kernel=4).shape == image.shape  # even kernels are made odd


def test_perlin_noise_is_gradient_noise():
    noise = anim.perlin_noise((64, 96), (4, 6), octaves=1, generator=torch.Generator().manual_seed(1))
    assert noise.shape == (64, 96)
    assert torch.all(noise[::16, ::16].abs() < 1e-6)  # zero on the lattice
    assert float(noise.abs().max()) <= 1.0 + 1e-5
    assert float(noise.std()) > 0.1
    # smooth: neighbouring pixels differ far less than the spread (white noise: 1.13 std)
    assert float((noise[:, 1:] - noise[:, :-1]).abs().mean()) < 0.25 * float(noise.std())
    assert float((noise[1:] - noise[:-1]).abs().mean()) < 0.25 * float(noise.std())
    # and continuous across the cell borders (16 px cells: no step between neighbours near 1)
    assert float((noise[:, 1:] - noise[:, :-1]).abs().max()) < 0.2
    assert float((noise[1:] - noise[:-1]).abs().max()) < 0.2


def test_noise_is_reproducible_from_the_seed():
    for noise_type in anim.NOISE_TYPES:
        a = anim.noise_image((H, W, 3), seed=42, noise_type=noise_type)
        assert a.dtype == np.uint8 and a.shape == (H, W, 3)
        assert np.array_equal(a, anim.noise_image((H, W, 3), seed=42, noise_type=noise_type))
        assert not np.array_equal(a, anim.noise_image((H, W, 3), seed=43, noise_type=noise_type))
    white = anim.noise_image((128, 128, 3), seed=0, noise_type="uniform").astype(np.float64)
    assert white.mean() == pytest.approx(127.5, abs=1.5)
    # n ~ N(0, 1) mapped by n/2 + 1/2 and clipped to [0, 1]: P(n > 1) = 15.9 % saturate at each end
    assert (white == 255).mean() == pytest.approx(0.1587, abs=0.01)
    assert (white == 0).mean() == pytest.approx(0.1587, abs=0.01)
    perlin = anim.noise_image((128, 128, 3), seed=0, noise_type="perlin").astype(np.float64)
    assert perlin.std() < white.std()  # white noise scaled by (perlin + 1) / 2 <= 1


def test_add_noise_blends_towards_the_noise_picture():
    image = texture(9)
    assert np.array_equal(anim.add_noise(image, 0.0, seed=1), image)
    noise = anim.noise_image(image.shape, seed=1, noise_type="perlin")
    assert np.array_equal(anim.add_noise(image, 1.0, seed=1), noise)
    out = anim.add_noise(image, 0.1, seed=1).astype(np.float64)
    assert np.abs(out - (0.9 * image + 0.1 * noise)).max() <= 0.5 + 1e-9
    assert not np.array_equal(anim.add_noise(image, 0.1, seed=1), anim.add_noise(image, 0.1, seed=2))
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    mask[:, :40] = 255
    masked = anim.add_noise(image, 0.5, seed=1, mask=mask)
    assert np.array_equal(masked[:, 40:], image[:, 40:])
    assert not np.array_equal(masked[:, :40], image[:, :40])
    odd = np.zeros((70, 90, 3), dtype=np.uint8)  # not a multiple of 64 (the extension's uniform crashes)
    assert anim.add_noise(odd, 0.2, seed=3, noise_type="uniform").shape == odd.shape


# ------------------------------------------------------------------------------------------------ cadence


def test_tween_weights_and_blend():
    assert anim.tween_weights(1) == [1.0]
    assert anim.tween_weights(4) == [0.25, 0.5, 0.75, 1.0]
    with pytest.raises(ValueError):
        anim.tween_weights(0)
    prev = np.zeros((2, 2, 3), dtype=np.uint8)
    nxt = np.full((2, 2, 3), 200, dtype=np.uint8)
    assert anim.blend(prev, nxt, 0.25).tolist() == np.full((2, 2, 3), 50).tolist()
    assert np.array_equal(anim.blend(prev, nxt, 1.0), nxt)
    assert np.array_equal(anim.blend(None, nxt, 0.5), nxt)


# ------------------------------------------------------------------------------------------- optical flow


def test_warp_by_flow_moves_content_along_the_flow():
    image = marker(50, 40)
    flow = np.zeros((H, W, 2), dtype=np.float32)
    flow[..., 0], flow[..., 1] = 6, -4
    assert centroid(anim.warp_by_flow(image, flow)) == (pytest.approx(56, abs=0.05), pytest.approx(36, abs=0.05))
    assert centroid(anim.warp_by_flow(image, flow, 0.5)) == (pytest.approx(53, abs=0.05), pytest.approx(38, abs=0.05))
    assert np.array_equal(anim.warp_by_flow(image, np.zeros_like(flow)), image)


@pytest.mark.parametrize("method", anim.FLOW_METHODS)
def test_optical_flow_recovers_a_shift_and_warping_by_it_realigns(method):
    big = texture(10, H + 20, W + 20, sigma=2.5)
    dx, dy = 3, -2
    a = big[10 : 10 + H, 10 : 10 + W]
    b = big[10 - dy : 10 - dy + H, 10 - dx : 10 - dx + W]  # content of a moved by (+3, -2)
    flow = anim.optical_flow(a, b, method)
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32
    inner = (slice(16, -16), slice(16, -16))
    assert float(np.median(flow[inner][..., 0])) == pytest.approx(dx, abs=0.5)
    assert float(np.median(flow[inner][..., 1])) == pytest.approx(dy, abs=0.5)
    aligned = anim.warp_by_flow(a, flow)
    before = np.abs(a[inner].astype(int) - b[inner]).mean()
    after = np.abs(aligned[inner].astype(int) - b[inner]).mean()
    assert after < 0.25 * before


def test_optical_flow_methods_we_do_not_have():
    image = texture()
    for method in ("RAFT", "DeepFlow", "nope"):
        with pytest.raises(ValueError, match="DIS Medium"):
            anim.optical_flow(image, image, method)
    assert set(anim.EXTENSION_FLOW_METHODS) - {"RAFT"} <= set(anim.FLOW_METHODS)


def test_hybrid_motion_matrix_recovers_a_camera_shift():
    rng = np.random.default_rng(3)
    base = (rng.random((160, 160)) * 255).astype(np.uint8)
    base = np.stack([cv2.GaussianBlur(base, (5, 5), 1.5)] * 3, axis=-1)
    shifted = np.roll(base, (6, -9), axis=(0, 1))  # content 6 px down, 9 px left
    for kind in ("Affine", "Perspective"):
        m = anim.motion_matrix(base[20:140, 20:140], shifted[20:140, 20:140], kind)
        assert m.shape == (3, 3)
        assert m[0, 2] == pytest.approx(-9, abs=0.5) and m[1, 2] == pytest.approx(6, abs=0.5)
        assert np.allclose(m[:2, :2], np.eye(2), atol=0.02)
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert np.array_equal(anim.motion_matrix(flat, flat), np.eye(3))  # no features: no motion


def test_hybrid_blend_alpha_and_masks():
    prev = np.full((8, 8, 3), 200, np.uint8)
    frame = np.full((8, 8, 3), 100, np.uint8)
    assert np.array_equal(anim.hybrid_blend(prev, frame, 0.0), prev)
    assert np.array_equal(anim.hybrid_blend(prev, frame, 1.0), frame)
    assert np.all(anim.hybrid_blend(prev, frame, 0.25) == 175)  # 200 * 0.75 + 100 * 0.25
    # Difference mask: |200 - 100| = 100 of 255 of the previous frame over the video frame, then alpha 1
    out = anim.hybrid_blend(prev, frame, 1.0, "Difference")
    assert np.all(np.abs(out.astype(int) - round(200 * 100 / 255 + 100 * 155 / 255)) <= 1)
    with pytest.raises(ValueError, match="mask type"):
        anim.hybrid_blend(prev, frame, 0.5, "Depth")
