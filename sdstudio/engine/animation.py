"""Deforum's image-space maths, one plain function per step the extension applies to a frame: the 2D and
3D motion warps (with perspective flip), colour coherence, contrast, anti-blur, noise, cadence blending and
optical flow.

Convention: frames are numpy ``uint8`` arrays H×W×3 in **RGB** order (the run loop's frames); every function
returns a new array of the same shape and dtype and never changes its input. The warps also take float32
H×W×C arrays (for example an optical-flow field, H×W×2) and then return float32 without clamping.

Behaviour follows deforum-art/sd-webui-deforum (``scripts/deforum_helpers``: ``animation.py``,
``colors.py``, ``noise.py``, ``image_sharpening.py``, ``hybrid_video.py``, ``render.py``); the code here is
our own, and where the extension has a bug the docstring says what we do instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

BORDER_MODES = {"replicate": cv2.BORDER_REPLICATE, "wrap": cv2.BORDER_WRAP}
PADDING_MODES = ("border", "reflection", "zeros")  # the extension's 3D "padding_mode" (grid_sample's)
SAMPLING_MODES = ("bicubic", "bilinear", "nearest")  # the extension's 3D "sampling_mode"
COLOR_COHERENCE_MODES = ("None", "HSV", "LAB", "RGB", "Video Input", "Image")
NOISE_TYPES = ("uniform", "perlin")
# What the extension offers for optical-flow cadence / redo / hybrid motion, and what opencv here can do.
EXTENSION_FLOW_METHODS = ("RAFT", "DIS Medium", "DIS Fine", "Farneback")
FLOW_METHODS = ("DIS Fine", "DIS Medium", "DIS Fast", "DIS UltraFast", "Farneback")

TRANSLATION_SCALE_3D = 1.0 / 200.0  # the extension's (Disco Diffusion's) 3D translation units


# ---------------------------------------------------------------------------------------------- 2D warp


@dataclass(frozen=True)
class PerspectiveFlip:
    """The extension's perspective flip, angles in degrees: ``theta`` rotates about the axis through the
    screen (z), ``phi`` about the horizontal axis (x, tilt), ``gamma`` about the vertical axis (y, pan);
    ``fv`` is the field of view (the extension's default 53, recommended 30-160)."""

    theta: float = 0.0
    phi: float = 0.0
    gamma: float = 0.0
    fv: float = 53.0


def _as_flip(flip) -> PerspectiveFlip | None:
    if flip is None or isinstance(flip, PerspectiveFlip):
        return flip
    if isinstance(flip, dict):
        return PerspectiveFlip(**flip)
    return PerspectiveFlip(*flip)


def _rotation_xyz(rx: float, ry: float, rz: float) -> np.ndarray:
    """``Rx @ Ry @ Rz`` (radians), the product order of both the extension's perspective flip and
    pytorch3d's ``euler_angles_to_matrix(..., "XYZ")``."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=np.float64)
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=np.float64)
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=np.float64)
    return rot_x @ rot_y @ rot_z


def perspective_flip_matrix(width: int, height: int, flip) -> np.ndarray:
    """3×3 homography (forward, source → destination pixel) of the perspective flip.

    The extension (``animation.py`` ``warpMatrix`` / ``get_flip_perspective_matrix``) rotates the frame,
    seen as a plane at distance ``h = diag / (2 sin(fv/2))`` from a pinhole camera of focal length ``h``
    (so that at zero angles the plane fills the frame 1:1), projects the four corners and fits a
    homography. Its code has three bugs we do not copy:

    1. its projection matrix starts from ``np.eye(4)``, so ``P[3,3]`` stays 1 (it must be 0): the divisor is
       ``h + 1`` instead of ``h`` and at theta = phi = gamma = 0 the "flip" is not the identity but a
       zoom of ``h/(h+1)`` (0.9988 at 640×384) plus a ~0.5 px shift, applied again every frame (an
       enabled flip with zero angles shrinks the picture by 13 % over 120 frames);
    2. it composes the centring translation on the wrong side (``M @ post`` instead of ``post @ M``), so
       the rotations pivot about ``(s/2, s/2)`` (s = the projected side length, larger than the frame)
       instead of the frame centre: a 10° theta moves the centre by ~40 px at 640×384;
    3. in 2D mode it calls ``np.matmul(bM, rot_mat, trans_mat)``, whose third argument is numpy's
       ``out``: translation x/y are silently dropped whenever perspective flip is enabled
       (see :func:`warp_2d_matrix`).

    Here the homography is written in closed form: a point at ``(X, Y)`` from the centre, rotated by
    ``R = Rx(phi) Ry(gamma) Rz(theta)``, lands at ``centre + h (R00 X + R01 Y, R10 X + R11 Y) / (h - R20 X
    - R21 Y)``; the centre stays fixed and zero angles give exactly the identity. Sign conventions are the
    extension's (image y axis pointing down): ``theta > 0`` turns the picture clockwise on screen.
    """
    flip = _as_flip(flip)
    half_fov = math.radians(flip.fv / 2.0)
    if abs(math.sin(half_fov)) < 1e-9:
        raise ValueError(f"perspective flip fv must not be a multiple of 360 degrees (got {flip.fv})")
    depth = math.hypot(width, height) / (2.0 * math.sin(half_fov))
    r = _rotation_xyz(math.radians(flip.phi), math.radians(flip.gamma), math.radians(flip.theta))
    about_centre = np.array(
        [[r[0, 0], r[0, 1], 0.0], [r[1, 0], r[1, 1], 0.0], [-r[2, 0] / depth, -r[2, 1] / depth, 1.0]]
    )
    cx, cy = width / 2.0, height / 2.0
    to_centre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
    back = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
    return back @ about_centre @ to_centre


def warp_2d_matrix(
    width: int,
    height: int,
    *,
    angle: float = 0.0,
    zoom: float = 1.0,
    translation_x: float = 0.0,
    translation_y: float = 0.0,
    transform_center_x: float = 0.5,
    transform_center_y: float = 0.5,
    perspective_flip=None,
) -> np.ndarray:
    """The extension's 2D motion as a 3×3 forward matrix (``anim_frame_warp_2d``):
    ``R = getRotationMatrix2D((W*cx, H*cy), angle, zoom)``, ``T = [[1,0,tx],[0,1,ty]]``, ``M = R @ T``:
    content is first moved by (tx, ty) pixels (positive x = right, positive y = down), then rotated by
    ``angle`` degrees (positive = counter-clockwise on screen) and scaled by ``zoom`` about the transform
    centre. With a perspective flip the result is ``flip @ R @ T`` (the extension meant this but, through
    ``np.matmul``'s ``out`` argument, computes ``flip @ R`` and loses the translation)."""
    centre = (width * transform_center_x, height * transform_center_y)
    rot = np.vstack([cv2.getRotationMatrix2D(centre, float(angle), float(zoom)), [0.0, 0.0, 1.0]])
    trans = np.array([[1.0, 0.0, float(translation_x)], [0.0, 1.0, float(translation_y)], [0.0, 0.0, 1.0]])
    matrix = rot @ trans
    if perspective_flip is not None:
        matrix = perspective_flip_matrix(width, height, perspective_flip) @ matrix
    return matrix


def _border(border: str) -> int:
    try:
        return BORDER_MODES[border]
    except KeyError:
        raise ValueError(f"border must be one of {sorted(BORDER_MODES)}, got {border!r}") from None


def warp_matrix(image: np.ndarray, matrix: np.ndarray, border: str = "replicate") -> np.ndarray:
    """``cv2.warpPerspective`` with the forward ``matrix`` (bilinear, as the extension), border replicate
    (edge pixels stretched into the uncovered area) or wrap (the frame tiles)."""
    height, width = image.shape[:2]
    out = cv2.warpPerspective(
        np.ascontiguousarray(image), np.asarray(matrix, dtype=np.float64), (width, height),
        flags=cv2.INTER_LINEAR, borderMode=_border(border),
    )
    return out.reshape(image.shape)


def warp_2d(
    image: np.ndarray,
    *,
    angle: float = 0.0,
    zoom: float = 1.0,
    translation_x: float = 0.0,
    translation_y: float = 0.0,
    transform_center_x: float = 0.5,
    transform_center_y: float = 0.5,
    perspective_flip=None,
    border: str = "replicate",
) -> np.ndarray:
    """One frame of 2D motion (see :func:`warp_2d_matrix`); ``perspective_flip`` is None or
    ``(theta, phi, gamma, fv)`` / :class:`PerspectiveFlip`."""
    height, width = image.shape[:2]
    matrix = warp_2d_matrix(
        width, height, angle=angle, zoom=zoom, translation_x=translation_x, translation_y=translation_y,
        transform_center_x=transform_center_x, transform_center_y=transform_center_y,
        perspective_flip=perspective_flip,
    )
    return warp_matrix(image, matrix, border)


# ---------------------------------------------------------------------------------------------- 3D warp

_INVERSE_DEPTH = ("midas", "depth anything", "depth-anything", "depth_anything")  # larger value = nearer
_METRIC_DEPTH = ("adabins", "leres", "zoe")  # larger value = farther
_RAW_DEPTH = ("raw", "midas+adabins (old)", "zoe+adabins (old)")


def _equalize(depth: np.ndarray) -> np.ndarray:
    """Histogram equalisation of a depth already in [0, 1] (1024 bins, as the extension)."""
    counts, edges = np.histogram(depth, bins=1024, range=(0.0, 1.0))
    cdf = np.cumsum(counts) / float(depth.size)
    return np.interp(depth, edges[:-1], cdf)


def depth_to_z(depth, algorithm: str = "Midas-3-Hybrid", shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Camera-space z (float32 H×W) from a depth model's output, as ``transform_image_3d_new`` does.

    No depth, or one with NaN/inf or a single value, gives a flat plane z = 1 (the extension's fallback;
    so any constant depth map is z = 1). Otherwise the map is normalised to [0, 1] and histogram-equalised,
    then inverse-depth models (MiDaS; Depth Anything, which also outputs relative inverse depth) give
    ``z = 2 - d`` (near = 1, far = 2) and metric ones (Zoe, AdaBins, LeReS) ``z = d + 1``. ``"raw"`` (and the
    extension's "(old)" AdaBins blends) use the values as z unchanged."""
    name = (algorithm or "raw").lower()
    if depth is None:
        if shape is None:
            raise ValueError("depth_to_z needs a shape when there is no depth map")
        return torch.ones(shape, dtype=torch.float32)
    tensor = torch.as_tensor(depth).detach().to("cpu", torch.float32)
    if tensor.ndim != 2:
        tensor = tensor.squeeze()
    if tensor.ndim != 2:
        raise ValueError(f"depth must be H×W, got shape {tuple(torch.as_tensor(depth).shape)}")
    if name in _RAW_DEPTH:
        return tensor.clone()
    inverse = name.startswith(_INVERSE_DEPTH)
    if not inverse and not name.startswith(_METRIC_DEPTH):
        raise ValueError(f"unknown depth algorithm {algorithm!r}")
    if not torch.isfinite(tensor).all() or tensor.min() == tensor.max():
        return torch.ones_like(tensor)
    values = tensor.numpy().astype(np.float64)
    normalised = _equalize((values - values.min()) / (values.max() - values.min()))
    z = 2.0 - normalised if inverse else normalised + 1.0
    return torch.from_numpy(z.astype(np.float32))


def _euler_xyz_torch(angles_deg: Sequence[float]) -> torch.Tensor:
    return torch.from_numpy(_rotation_xyz(*(math.radians(float(a)) for a in angles_deg)).astype(np.float32))


def warp_3d_offsets(
    z: torch.Tensor,
    *,
    translation: Sequence[float] = (0.0, 0.0, 0.0),
    rotation_3d: Sequence[float] = (0.0, 0.0, 0.0),
    fov: float = 70.0,
    aspect_ratio: float = 1.0,
) -> torch.Tensor:
    """Per-pixel displacement (1×H×W×2, grid_sample's [-1, 1] units) of the extension's 3D warp.

    Each pixel becomes a point ``(x, y, z)`` with x, y spread over [-1, 1] and z from the depth; the
    camera is pytorch3d's ``FoVPerspectiveCameras`` (ndc = ``(x / (z tan(fov/2) aspect), y / (z
    tan(fov/2)))``), moved as the extension moves it: points go to ``p @ R + T`` with ``R`` the XYZ Euler
    matrix of ``rotation_3d`` (degrees) and ``T = (-tx, ty, -tz) / 200``. The displacement is the change of
    the projected position; near/far only change the projected z and so never the picture."""
    height, width = z.shape
    device = z.device
    tan_half = math.tan(math.radians(float(fov)) / 2.0)
    ys = torch.linspace(-1.0, 1.0, height, dtype=torch.float32, device=device)
    xs = torch.linspace(-1.0, 1.0, width, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack((grid_x.flatten(), grid_y.flatten(), z.to(torch.float32).flatten()), dim=1)
    tx, ty, tz = (float(v) for v in translation)
    shift = torch.tensor([-tx, ty, -tz], dtype=torch.float32, device=device) * TRANSLATION_SCALE_3D
    moved = points @ _euler_xyz_torch(rotation_3d).to(device) + shift
    scale = torch.tensor([tan_half * float(aspect_ratio), tan_half], dtype=torch.float32, device=device)

    def project(p: torch.Tensor) -> torch.Tensor:
        return p[:, :2] / (p[:, 2:3] * scale)

    return (project(moved) - project(points)).reshape(1, height, width, 2)


def warp_3d(
    image: np.ndarray,
    depth=None,
    *,
    translation: Sequence[float] = (0.0, 0.0, 0.0),
    rotation_3d: Sequence[float] = (0.0, 0.0, 0.0),
    fov: float = 70.0,
    near: float = 200.0,
    far: float = 10000.0,
    aspect_ratio: float = 1.0,
    depth_algorithm: str = "Midas-3-Hybrid",
    padding_mode: str = "border",
    sampling_mode: str = "bicubic",
    perspective_flip=None,
    border: str = "replicate",
    device: torch.device | str | None = None,
) -> np.ndarray:
    """One frame of the extension's 3D motion (``anim_frame_warp_3d`` → ``transform_image_3d_new``),
    written in torch without pytorch3d.

    ``translation`` = (translation_x, translation_y, translation_z) in the extension's units (1/200 of the
    [-1, 1] canvas per unit): positive x moves the camera right (content moves left), positive y moves
    content down, positive z moves the camera forward (a zoom-in). ``rotation_3d`` = (x, y, z) degrees;
    positive z rolls content counter-clockwise on screen. ``depth`` is the depth model's raw H×W output,
    turned into z by :func:`depth_to_z` with ``depth_algorithm`` (None = flat plane). ``near``/``far`` are
    accepted for the settings' sake and do not change x, y (as in the extension). The perspective flip, if
    any, is applied first with ``border`` (the extension's ``flip_3d_perspective``).

    The image is sampled at ``pixel - displacement`` (:func:`warp_3d_offsets`) with
    ``grid_sample(mode=sampling_mode, padding_mode=padding_mode, align_corners=False)``. uint8 results are
    rounded and clipped (the extension truncates); float input stays float and unclamped.
    """
    del near, far  # only the projected z depends on them
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if sampling_mode not in SAMPLING_MODES:
        raise ValueError(f"sampling_mode must be one of {SAMPLING_MODES}, got {sampling_mode!r}")
    if perspective_flip is not None:
        height, width = image.shape[:2]
        image = warp_matrix(image, perspective_flip_matrix(width, height, perspective_flip), border)
    height, width = image.shape[:2]
    device = torch.device(device or "cpu")
    z = depth_to_z(depth, depth_algorithm, (height, width)).to(device)
    if tuple(z.shape) != (height, width):
        raise ValueError(f"depth is {tuple(z.shape)}, the image {(height, width)}")
    offsets = warp_3d_offsets(z, translation=translation, rotation_3d=rotation_3d, fov=fov, aspect_ratio=aspect_ratio)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], device=device)
    grid = F.affine_grid(identity, [1, 1, height, width], align_corners=False) - offsets
    channels = image.reshape(height, width, -1)
    tensor = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32)).permute(2, 0, 1)[None].to(device)
    sampled = F.grid_sample(tensor, grid, mode=sampling_mode, padding_mode=padding_mode, align_corners=False)
    out = sampled[0].permute(1, 2, 0).cpu().numpy()
    if image.dtype == np.uint8:
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.reshape(image.shape)


# ---------------------------------------------------------------------------------------- colour coherence


def _match_channel(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """skimage's ``_match_cumulative_cdf`` for uint8: each source level goes to the reference level at the
    same cumulative quantile (linear between the reference's levels), here rounded to the nearest level
    (skimage truncates when it writes the float result back into a uint8 array)."""
    source_counts = np.bincount(source.ravel(), minlength=256)
    reference_counts = np.bincount(reference.ravel(), minlength=256)
    reference_levels = np.nonzero(reference_counts)[0]
    source_quantiles = np.cumsum(source_counts) / source.size
    reference_quantiles = np.cumsum(reference_counts[reference_levels]) / reference.size
    lut = np.interp(source_quantiles, reference_quantiles, reference_levels)
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)[source]


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-channel histogram matching of uint8 images (any sizes)."""
    if image.dtype != np.uint8 or reference.dtype != np.uint8:
        raise TypeError("match_histograms works on uint8 images")
    if image.ndim != reference.ndim or image.shape[2:] != reference.shape[2:]:
        raise ValueError(f"image {image.shape} and reference {reference.shape} have different channels")
    if image.ndim == 2:
        return _match_channel(image, reference)
    return np.stack([_match_channel(image[..., c], reference[..., c]) for c in range(image.shape[2])], axis=-1)


_COLOR_SPACES = {"HSV": (cv2.COLOR_RGB2HSV, cv2.COLOR_HSV2RGB), "LAB": (cv2.COLOR_RGB2LAB, cv2.COLOR_LAB2RGB)}


def match_colors(image: np.ndarray, reference: np.ndarray, mode: str = "LAB") -> np.ndarray:
    """The extension's colour coherence (``colors.py`` ``maintain_colors``): histogram matching of an RGB
    frame to a reference, channel by channel in RGB, in opencv's 8-bit HSV, or in 8-bit LAB. "Video Input"
    and "Image" only choose the reference (a video frame, an image); the matching is LAB, as in the
    extension. "None" returns the frame unchanged.

    The extension's frames are BGR but it converts them with ``COLOR_RGB2HSV`` / ``COLOR_RGB2LAB``, so it
    matches in a space with red and blue swapped; our frames are RGB and converted as RGB."""
    if mode == "None" or mode is None:
        return image.copy()
    if mode not in COLOR_COHERENCE_MODES:
        raise ValueError(f"color coherence must be one of {COLOR_COHERENCE_MODES}, got {mode!r}")
    if mode == "RGB":
        return match_histograms(image, reference)
    to_space, from_space = _COLOR_SPACES["HSV" if mode == "HSV" else "LAB"]
    matched = match_histograms(cv2.cvtColor(image, to_space), cv2.cvtColor(reference, to_space))
    return cv2.cvtColor(matched, from_space)


# ------------------------------------------------------------------------------- contrast, anti-blur, noise


def contrast(image: np.ndarray, amount: float) -> np.ndarray:
    """The extension's contrast schedule: every value multiplied by ``amount`` and rounded (it is a gain,
    not a contrast about mid-grey). The extension casts to uint8 without clipping, so values above 255
    wrap round to dark ones; we clip."""
    return np.clip(np.rint(image.astype(np.float64) * float(amount)), 0, 255).astype(np.uint8)


def unsharp(
    image: np.ndarray,
    amount: float,
    kernel: int = 5,
    sigma: float = 1.0,
    threshold: float = 0.0,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Anti-blur (``image_sharpening.py`` ``unsharp_mask``): ``(1 + amount) * image - amount * blurred``
    with a ``kernel``×``kernel`` Gaussian of ``sigma``, clipped and rounded; pixels where ``|image -
    blurred| < threshold`` stay as they were; with ``mask`` (H×W, non-zero = sharpen) only the masked
    pixels change. An even kernel is made odd (opencv refuses even sizes; the extension crashes). The
    extension takes ``|image - blurred|`` in uint8, where a negative difference wraps to ~255 so dark-side
    detail is never treated as low contrast; we take it in integers."""
    if amount == 0:
        return image.copy()
    size = int(kernel)
    if size > 0 and size % 2 == 0:
        size += 1
    blurred = cv2.GaussianBlur(image, (size, size), float(sigma))
    sharpened = (float(amount) + 1.0) * image.astype(np.float64) - float(amount) * blurred
    out = np.clip(sharpened, 0, 255).round().astype(np.uint8)
    if threshold > 0:
        low_contrast = np.abs(image.astype(np.int16) - blurred.astype(np.int16)) < threshold
        out[low_contrast] = image[low_contrast]
    if mask is not None:
        keep = np.asarray(mask) == 0
        if keep.ndim == 3:
            keep = keep[..., 0]
        out[keep] = image[keep]
    return out


def _fade(t: torch.Tensor) -> torch.Tensor:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _perlin_octave(shape: tuple[int, int], res: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Gradient (Perlin) noise on a lattice of ``res`` cells (rows, columns) over ``shape``, values about
    [-1, 1]; the random gradient angles are drawn as ``torch.rand(res + 1)`` from ``generator``."""
    height, width = shape
    angles = 2.0 * math.pi * torch.rand(res[0] + 1, res[1] + 1, generator=generator)
    gradients = torch.stack((torch.cos(angles), torch.sin(angles)), dim=-1)
    pos_y = torch.arange(height, dtype=torch.float64) * res[0] / height
    pos_x = torch.arange(width, dtype=torch.float64) * res[1] / width
    cell_y, cell_x = pos_y.floor().long(), pos_x.floor().long()
    frac_y = (pos_y - cell_y).float()[:, None].expand(height, width)
    frac_x = (pos_x - cell_x).float()[None, :].expand(height, width)

    def corner(dy: int, dx: int) -> torch.Tensor:
        g = gradients[(cell_y + dy)[:, None], (cell_x + dx)[None, :]]
        return g[..., 0] * (frac_y - dy) + g[..., 1] * (frac_x - dx)

    t_y, t_x = _fade(frac_y), _fade(frac_x)
    top = torch.lerp(corner(0, 0), corner(1, 0), t_y)
    bottom = torch.lerp(corner(0, 1), corner(1, 1), t_y)
    return math.sqrt(2.0) * torch.lerp(top, bottom, t_x)


def perlin_noise(
    shape: tuple[int, int],
    res: tuple[int, int],
    *,
    octaves: int = 1,
    persistence: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fractal Perlin noise: octave k has ``res * 2**k`` cells and weight ``persistence**k`` (the
    extension's ``rand_perlin_2d_octaves``; here any shape works, the extension needs ``shape`` divisible
    by ``res * 2**(octaves-1)``)."""
    generator = generator or torch.Generator().manual_seed(0)
    noise = torch.zeros(shape)
    frequency, amplitude = 1, 1.0
    for _ in range(int(octaves)):
        noise += amplitude * _perlin_octave(shape, (frequency * res[0], frequency * res[1]), generator)
        frequency *= 2
        amplitude *= persistence
    return noise


def _noise_base(size: int) -> int:
    return size - size % 64 if size >= 64 else size


def noise_image(
    shape: tuple[int, int, int],
    *,
    seed: int,
    noise_type: str = "perlin",
    perlin_w: float = 8,
    perlin_h: float = 8,
    octaves: int = 4,
    persistence: float = 0.5,
) -> np.ndarray:
    """The extension's noise picture (uint8, ``shape``): white Gaussian noise ``n`` (its "uniform" type is
    ``torch.randn``), for "perlin" multiplied by ``(perlin + 1) / 2``, drawn on the size rounded down to a
    multiple of 64 and resized nearest, then mapped as a sample to pixels: ``trunc(clip(n/2 + 1/2, 0, 1) *
    255)``. Draws come from a CPU ``torch.Generator`` seeded with ``seed`` (white noise first, then the
    gradients of each octave), as in the extension.

    ``perlin_w`` sets the number of cells across the width and ``perlin_h`` down the height; the extension
    swaps them (its "perlin_w" goes down the image), which only shows when the two differ."""
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
    height, width, channels = shape
    base = (_noise_base(height), _noise_base(width))
    generator = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((channels, *base), generator=generator)
    if noise_type == "perlin":
        res = (max(1, int(perlin_h)), max(1, int(perlin_w)))
        pattern = perlin_noise(base, res, octaves=octaves, persistence=persistence, generator=generator)
        noise = noise * (pattern + 1.0) / 2.0
    if base != (height, width):
        noise = F.interpolate(noise[:, None], size=(height, width), mode="nearest")[:, 0]
    pixels = ((noise * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0).to(torch.uint8)
    return pixels.permute(1, 2, 0).numpy()


def add_noise(
    image: np.ndarray,
    amount: float,
    *,
    seed: int,
    noise_type: str = "perlin",
    perlin_w: float = 8,
    perlin_h: float = 8,
    octaves: int = 4,
    persistence: float = 0.5,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The extension's frame noising before img2img (``noise.py`` ``add_noise``): ``image * (1 - amount) +
    noise * amount`` in 0-255 pixels (``cv2.addWeighted``), the noise picture of :func:`noise_image`
    (grey 127.5 on average, so noise also pulls the frame towards grey by ``amount``). ``mask`` (H×W,
    ≥ 128 = noised) limits the noise to the masked pixels; the extension zeroes the noise outside its mask,
    which still blends those pixels with flat grey."""
    if amount == 0:
        return image.copy()
    noise = noise_image(
        image.shape, seed=seed, noise_type=noise_type, perlin_w=perlin_w, perlin_h=perlin_h, octaves=octaves,
        persistence=persistence,
    )
    out = cv2.addWeighted(image, 1.0 - float(amount), noise, float(amount), 0.0)
    if mask is not None:
        keep = np.asarray(mask) < 128
        if keep.ndim == 3:
            keep = keep[..., 0]
        out[keep] = image[keep]
    return out


# ------------------------------------------------------------------------------------------------ cadence


def tween_weights(cadence: int) -> list[float]:
    """Weights of the *next* diffused frame for the ``cadence`` frames of one gap (``render.py``):
    ``k / cadence`` for k = 1..cadence. In the extension, after frames P and N = P + cadence are diffused,
    it writes frames N .. N + cadence - 1 as ``blend(prev, next, w)`` with these weights, ``prev`` and
    ``next`` being P's and N's pictures carried forward by each frame's motion (the last one is ``next``
    alone); before the second diffused frame there is no ``prev`` and ``next`` is written alone."""
    cadence = int(cadence)
    if cadence < 1:
        raise ValueError(f"cadence must be at least 1, got {cadence}")
    return [k / cadence for k in range(1, cadence + 1)]


def blend(prev: np.ndarray | None, next_: np.ndarray, weight: float) -> np.ndarray:
    """``prev * (1 - weight) + next * weight``, rounded to uint8 (the extension writes the float blend
    with ``cv2.imwrite``, which rounds); ``prev`` None (the first gap) gives ``next``."""
    if prev is None or weight >= 1.0:
        return next_.copy()
    mixed = prev.astype(np.float64) * (1.0 - float(weight)) + next_.astype(np.float64) * float(weight)
    if next_.dtype == np.uint8:
        return np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return mixed.astype(next_.dtype)


# ------------------------------------------------------------------------------------------- optical flow


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def _dis(preset: str) -> cv2.DISOpticalFlow:
    presets = {
        "DIS Medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
        "DIS Fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "DIS UltraFast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "DIS Fine": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }
    dis = cv2.DISOpticalFlow_create(presets[preset])
    if preset == "DIS Fine":  # the extension's own preset: finest scale 0, 192 iterations, patch 8 stride 4
        dis.setGradientDescentIterations(192)
        dis.setFinestScale(0)
        dis.setPatchSize(8)
        dis.setPatchStride(4)
    return dis


def optical_flow(a: np.ndarray, b: np.ndarray, method: str = "DIS Medium", prev_flow: np.ndarray | None = None) -> np.ndarray:
    """Dense flow (float32 H×W×2, pixels) from frame ``a`` to frame ``b`` with opencv, as the extension's
    ``get_flow_from_images``: ``a(p) ≈ b(p + flow(p))``, so content moving right gives positive x.
    Methods: "DIS Fine" (the extension's: finest scale 0, 192 iterations, patch 8, stride 4), "DIS Medium",
    "DIS Fast", "DIS UltraFast" (opencv's presets) and "Farneback" (the extension's "normal" preset: pyramid
    0.5, 5 levels, window 21, 5 iterations, poly_n 7, sigma 1.2). The extension also offers RAFT (needs its
    weights) and lists opencv-contrib methods (DenseRLOF, SF, DualTVL1, DeepFlow, PCAFlow) it never offers;
    those raise ValueError here."""
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"frames differ in size: {a.shape} vs {b.shape}")
    gray_a, gray_b = _gray(a), _gray(b)
    initial = None if prev_flow is None else np.ascontiguousarray(prev_flow, dtype=np.float32)
    if method.startswith("DIS ") and method in FLOW_METHODS:
        if initial is not None:
            return _dis(method).calc(gray_a, gray_b, initial.copy())
        return _dis(method).calc(gray_a, gray_b, None)
    if method == "Farneback":
        return cv2.calcOpticalFlowFarneback(gray_a, gray_b, initial, 0.5, 5, 21, 5, 7, 1.2, 0)
    if method == "RAFT":
        raise ValueError("optical flow method RAFT needs the RAFT model, which sdstudio does not ship; "
                         f"use one of {FLOW_METHODS}")
    raise ValueError(f"unknown optical flow method {method!r}; use one of {FLOW_METHODS}")


def warp_by_flow(image: np.ndarray, flow: np.ndarray, flow_factor: float = 1.0) -> np.ndarray:
    """Move ``image`` along ``flow`` (the extension's ``image_transform_optical_flow``): ``out(p) =
    image(p - flow_factor * flow(p))``, bilinear, reflecting at the borders (the extension pads by a
    quarter of the frame with BORDER_REFLECT_101 and remaps with the same border, which is the same for
    displacements up to a quarter frame). ``warp_by_flow(a, optical_flow(a, b))`` brings ``a`` onto ``b``."""
    height, width = image.shape[:2]
    if flow.shape[:2] != (height, width):
        raise ValueError(f"flow is {flow.shape[:2]}, the image {(height, width)}")
    grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    step = np.asarray(flow, dtype=np.float32) * float(flow_factor)
    map_x = grid_x - step[..., 0]
    map_y = grid_y - step[..., 1]
    out = cv2.remap(np.ascontiguousarray(image), map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    return out.reshape(image.shape)


# ------------------------------------------------------------------------------------------- hybrid video

HYBRID_MOTIONS = ("None", "Optical Flow", "Perspective", "Affine")
HYBRID_COMPOSITES = ("None", "Normal", "Before Motion", "After Generation")


def motion_matrix(a: np.ndarray, b: np.ndarray, kind: str = "Affine", ratio: float = 0.75) -> np.ndarray:
    """The camera motion from video frame ``a`` to ``b`` as a 3×3 matrix (the extension's hybrid motion:
    SIFT features, Lowe's ratio test, then RANSAC: a similarity for "Affine", a homography for
    "Perspective"); the identity when fewer than 9 good matches are found."""
    sift = cv2.SIFT_create()
    kp1, des1 = sift.detectAndCompute(_gray(a), None)
    kp2, des2 = sift.detectAndCompute(_gray(b), None)
    if des1 is None or des2 is None or len(kp1) < 2 or len(kp2) < 2:
        return np.eye(3)
    good = [m for m, n in (p for p in cv2.BFMatcher().knnMatch(des1, des2, k=2) if len(p) == 2)
            if m.distance < ratio * n.distance]
    if len(good) <= 8:
        return np.eye(3)
    src = np.float32([kp1[m.queryIdx].pt for m in good]).reshape(-1, 1, 2)
    dst = np.float32([kp2[m.trainIdx].pt for m in good]).reshape(-1, 1, 2)
    if kind == "Perspective":
        matrix, _ = cv2.findHomography(src, dst, cv2.RANSAC, 5.0)
    else:
        partial, _ = cv2.estimateAffinePartial2D(src, dst)
        matrix = None if partial is None else np.vstack([partial, [0.0, 0.0, 1.0]])
    return np.eye(3) if matrix is None else matrix


def hybrid_blend(prev: np.ndarray, video_frame: np.ndarray, alpha: float, mask_type: str = "None",
                 mask_blend_alpha: float = 0.5, invert: bool = False) -> np.ndarray:
    """The extension's hybrid composite: the video frame (or, with a mask type "Blend" / "Difference",
    the previous frame over the video frame through that grey mask), then blended into the previous frame
    by ``alpha`` (``Image.blend(prev, composite, alpha)``)."""
    comp = video_frame
    if mask_type in ("Blend", "Difference"):
        gp, gv = _gray(prev).astype(np.float64), _gray(video_frame).astype(np.float64)
        mask = gp * (1 - mask_blend_alpha) + gv * mask_blend_alpha if mask_type == "Blend" else np.abs(gp - gv)
        mask = np.clip(np.rint(mask), 0, 255)
        if invert:
            mask = 255 - mask
        w = (mask / 255.0)[..., None]
        comp = np.clip(np.rint(prev * w + video_frame * (1 - w)), 0, 255).astype(np.uint8)
    elif mask_type != "None":
        raise ValueError(f"hybrid composite mask type {mask_type!r} is not available (None, Blend, Difference)")
    return blend(prev, comp, alpha)
