"""ControlNet preprocessors that need no network, and the control image's geometry, as the sd-webui-controlnet
extension (Mikubill, v1.1.455) defines them.

Three parts:

* geometry the ControlNet hook calls: :func:`hwc3` (any image to RGB), :func:`resize_with_pad` (a
  preprocessor's working size: the short side to its resolution, padded to a multiple of 64),
  :func:`pixel_perfect_resolution` and :func:`fit_to` (a detected map brought to the generation size for
  the three resize modes, with the extension's "high quality" resize that keeps binary and one-pixel edge
  maps crisp and an inpaint mask binary);
* the weight-free preprocessors as :class:`~sdstudio.core.controlnet.Preprocessor` declarations, with the
  extension's module names, labels (as aliases), sliders and control types;
* :class:`Preprocessors`, the list a server knows (``/controlnet/module_list``, ``/controlnet/control_types``),
  and :func:`detect`, which runs one.

The maps match the extension's pixel for pixel where it uses opencv the same way; where the extension has a
quirk that changes the map (the XDoG threshold doubles in 8 bits, recolor_luminance reads RGB as BGR) the
quirk is kept, so a ControlNet sees what it saw there.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np

from ..core.controlnet import RESIZE_ALIASES, RESIZE_MODES, ControlNetError, Preprocessor, Slider
from ..core.params import MAX_PIXELS

JUST_RESIZE, CROP_AND_RESIZE, RESIZE_AND_FILL = RESIZE_MODES
HIDDEN_RESOLUTION = 512  # what preprocessors without a resolution slider work at (the extension's default)


# ---- geometry ----------------------------------------------------------------------------------------------
def hwc3(image: np.ndarray, where: str = "ControlNet") -> np.ndarray:
    """Any 8-bit image as H×W×3: gray is repeated, RGBA is composited over white (the extension's ``HWC3``),
    RGB comes back as it is. ``where`` starts the error message."""
    x = np.asarray(image)
    if x.dtype != np.uint8:
        raise ControlNetError(f"{where}: expected an 8-bit image, got {x.dtype}")
    if x.ndim == 2:
        x = x[:, :, None]
    if x.ndim != 3 or x.shape[2] not in (1, 3, 4):
        raise ControlNetError(f"{where}: expected a gray, RGB or RGBA image, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ControlNetError(f"{where}: the image is empty ({x.shape[1]}×{x.shape[0]})")
    if x.shape[2] == 3:
        return x
    if x.shape[2] == 1:
        return np.concatenate([x, x, x], axis=2)
    alpha = x[:, :, 3:4].astype(np.float32) / 255.0
    over_white = x[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return over_white.clip(0, 255).astype(np.uint8)


def _pad64(size: int) -> int:
    return -size % 64


def resize_with_pad(image: np.ndarray, resolution: float) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The image with its short side at ``resolution`` (cubic up, area down), padded at the bottom and right by
    repeating the edge to a multiple of 64 (what the annotator networks need); and a function that cuts that
    padding off a map of the padded size. Gray becomes RGB; other channel counts are kept (an inpaint map's
    mask too)."""
    x = np.asarray(image)
    if x.ndim == 2 or x.ndim == 3 and x.shape[2] == 1:
        x = hwc3(x)
    h, w = x.shape[:2]
    k = float(resolution) / float(min(h, w))
    interpolation = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    th, tw = max(1, round(h * k)), max(1, round(w * k))
    if th * tw > MAX_PIXELS:  # an elongated picture at a high resolution: gigabytes, then a network on them
        raise ControlNetError(f"a {w}×{h} control picture at resolution {resolution:g} would be {tw}×{th} pixels, "
                              f"over the limit of {MAX_PIXELS // 2**20} megapixels; use a lower resolution or a "
                              "less elongated picture")
    x = cv2.resize(x, (tw, th), interpolation=interpolation)
    if x.ndim == 2:  # opencv drops a single channel
        x = x[:, :, None]
    padded = np.pad(x, [[0, _pad64(th)], [0, _pad64(tw)], [0, 0]], mode="edge")

    def remove_pad(detected: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(detected[:th, :tw]).copy()

    return np.ascontiguousarray(padded), remove_pad


def resize_mode_of(value: str | int) -> str:
    """One of :data:`RESIZE_MODES` from a name, an old spelling or the positions 0-2 (3, A1111's img2img
    "Just resize (latent upscale)", and higher numbers mean Just Resize, as in the extension)."""
    if isinstance(value, bool):
        raise ControlNetError(f"ControlNet: resize mode must be one of {', '.join(RESIZE_MODES)}, got {value!r}")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ControlNetError(f"ControlNet: resize mode {value} is negative")
        return RESIZE_MODES[value] if value < len(RESIZE_MODES) else JUST_RESIZE
    text = str(value).strip()
    text = RESIZE_ALIASES.get(text, text)
    for mode in RESIZE_MODES:
        if mode.lower() == text.lower():
            return mode
    raise ControlNetError(f"ControlNet: resize mode must be one of {', '.join(RESIZE_MODES)}, got {value!r}")


def pixel_perfect_resolution(image_hw: tuple[int, int], target_w: int, target_h: int, resize_mode: str) -> int:
    """The preprocessor resolution at which the detected map's pixels land 1:1 on the generation size: the
    image's short side times the scale the resize mode will apply (the smaller of the two scales for Resize
    and Fill, the larger otherwise)."""
    mode = resize_mode_of(resize_mode)
    raw_h, raw_w = int(image_hw[0]), int(image_hw[1])
    if raw_h <= 0 or raw_w <= 0:
        raise ControlNetError(f"ControlNet: the image is empty ({raw_w}×{raw_h})")
    k_h, k_w = float(target_h) / raw_h, float(target_w) / raw_w
    k = min(k_h, k_w) if mode == RESIZE_AND_FILL else max(k_h, k_w)
    return round(k * min(raw_h, raw_w))


def _colour_count(x: np.ndarray) -> int:
    """How many distinct colours an H×W×3 uint8 map has (packed into one integer each, to count fast)."""
    flat = x.reshape(-1, 3).astype(np.uint32)
    return int(np.unique((flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]).size)


_LINES = [np.array(k, dtype=np.uint8) for k in (
    [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
    [[1, 0, 0], [0, 1, 0], [0, 0, 1]], [[0, 0, 1], [0, 1, 0], [1, 0, 0]])]


def _line_maxima(x: np.ndarray) -> np.ndarray:
    """Non-maximum suppression without a threshold: a pixel survives where it is the largest along at least
    one of the four directions through it."""
    keep = np.zeros(x.shape, dtype=bool)
    for line in _LINES:
        keep |= cv2.dilate(x, kernel=line) == x
    return np.where(keep, x, 0).astype(x.dtype)


def _rotations(*kernels: list[list[int]]) -> list[np.ndarray]:
    """Each hit-or-miss kernel (1 = set, -1 = clear, 0 = either) in its four rotations, rotation by rotation."""
    return [np.rot90(np.array(k, dtype=np.int32), turn) for turn in range(4) for k in kernels]


_THINNING = _rotations([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], [[0, -1, -1], [1, 1, -1], [0, 1, 0]])
_PRUNING = _rotations([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], [[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]])


def _hit_or_miss_pass(x: np.ndarray, kernels: list[np.ndarray]) -> bool:
    """Clears, kernel after kernel, the pixels each pattern matches; True when nothing matched."""
    done = True
    for kernel in kernels:
        hits = cv2.morphologyEx(x, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            x[hits] = 0
            done = False
    return done


def _thin(x: np.ndarray, prune: bool) -> np.ndarray:
    """Morphological thinning of a 0/255 map to one-pixel lines (at most 32 passes), then, when upscaling,
    one pass that trims the spurs thinning leaves."""
    y = x.copy()
    for _ in range(32):
        if _hit_or_miss_pass(y, _THINNING):
            break
    if prune:
        _hit_or_miss_pass(y, _PRUNING)
    return y


def _otsu(x: np.ndarray) -> np.ndarray:
    return cv2.threshold(x, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[1]


def high_quality_resize(x: np.ndarray, width: int, height: int) -> np.ndarray:
    """A map resized the way the extension resizes detected maps: maps of 3-199 colours (segmentation,
    poses) nearest-neighbour, others area down / cubic up; a black-and-white map (2 colours, dark < 16,
    light > 240) is re-binarised with Otsu's threshold after resizing, and when it is made of one-pixel
    lines (an opening removes more than half its lit pixels) the lines are thinned back to one pixel. An
    H×W×4 map's fourth channel (the inpaint mask) is resized alongside and made 0/255 at 127."""
    x = np.asarray(x)
    width, height = max(1, int(width)), max(1, int(height))
    mask = None
    if x.ndim == 3 and x.shape[2] == 4:
        x, mask = x[:, :, :3], x[:, :, 3]
    x = hwc3(x)
    if x.shape[:2] == (height, width):
        y = x
    else:
        area, new_area = x.shape[0] * x.shape[1], width * height
        colours = _colour_count(x)
        binary = colours == 2 and int(x.min()) < 16 and int(x.max()) > 240
        one_pixel = False
        if binary:
            square = np.ones((3, 3), dtype=np.uint8)
            opened = cv2.dilate(cv2.erode(x, square), square)
            one_pixel = 2 * np.count_nonzero(opened < x) > np.count_nonzero(x > 127)
        if 2 < colours < 200:
            interpolation = cv2.INTER_NEAREST
        elif new_area < area:
            interpolation = cv2.INTER_AREA
        else:
            interpolation = cv2.INTER_CUBIC
        source = x if mask is None else x.astype(np.float32)  # the extension resizes inpaint maps as floats
        y = cv2.resize(source, (width, height), interpolation=interpolation)
        if mask is not None:
            mask = cv2.resize(mask.astype(np.float32), (width, height), interpolation=interpolation)
        if binary:
            gray = y.astype(np.float32).mean(axis=2).clip(0, 255).astype(np.uint8)
            if one_pixel:
                gray = _thin(_otsu(_line_maxima(gray)), prune=new_area > area)
            else:
                gray = _otsu(gray)
            y = np.stack([gray] * 3, axis=2)
        y = np.round(np.clip(y, 0, 255)).astype(np.uint8)
    if mask is not None:
        y = np.concatenate([y, np.where(mask > 127, 255, 0).astype(np.uint8)[:, :, None]], axis=2)
    return np.ascontiguousarray(y)


def fit_to(detected: np.ndarray, width: int, height: int, resize_mode: str | int) -> np.ndarray:
    """The detected map at the generation size ``width``×``height``:

    * Just Resize: stretched to the size;
    * Crop and Resize: scaled to cover the size, the overflow cut off evenly on both sides;
    * Resize and Fill: scaled to fit inside, centred, the rest filled with the median colour of the map's
      border pixels (for an inpaint map, with the mask set there: the model paints the new area).

    An H×W×4 map is an inpaint map (RGB and the mask) and stays 4 channels; anything else becomes RGB.
    """
    mode = resize_mode_of(resize_mode)
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ControlNetError(f"ControlNet: cannot fit a map to {width}×{height}")
    x = np.asarray(detected)
    inpaint = x.ndim == 3 and x.shape[2] == 4
    if inpaint:
        hwc3(x)  # checks the dtype and the size
    else:
        x = hwc3(x)
    if mode == JUST_RESIZE:
        return high_quality_resize(x, width, height)
    old_h, old_w = x.shape[:2]
    k_h, k_w = height / old_h, width / old_w
    if mode == RESIZE_AND_FILL:
        k = min(k_h, k_w)
        border = np.concatenate([x[0, :, :], x[-1, :, :], x[:, 0, :], x[:, -1, :]], axis=0)
        colour = np.median(border, axis=0)
        colour = np.round(colour) if inpaint else np.floor(colour)  # the extension keeps uint8 maps' dtype
        if inpaint:
            colour[3] = 255
        out = np.tile(colour.astype(np.uint8)[None, None], (height, width, 1))
        inner = high_quality_resize(x, min(width, max(1, round(old_w * k))), min(height, max(1, round(old_h * k))))
        ih, iw = inner.shape[:2]
        top, left = max(0, (height - ih) // 2), max(0, (width - iw) // 2)
        out[top:top + ih, left:left + iw] = inner
        return out
    k = max(k_h, k_w)
    outer = high_quality_resize(x, max(width, round(old_w * k)), max(height, round(old_h * k)))
    top, left = max(0, (outer.shape[0] - height) // 2), max(0, (outer.shape[1] - width) // 2)
    return np.ascontiguousarray(outer[top:top + height, left:left + width])


def inpaint_display(detected: np.ndarray) -> np.ndarray:
    """How the extension shows an inpaint map (``/controlnet/detect``, the preview): RGBA with the masked
    part half transparent (alpha ``255 - mask // 2``); other maps unchanged."""
    x = np.asarray(detected)
    if x.ndim == 3 and x.shape[2] == 4:
        x = x.copy()
        x[:, :, 3] = 255 - x[:, :, 3] // 2
    return x


def inpaint_blend_mask(mask: np.ndarray, sigma: int = 7) -> np.ndarray:
    """The weight with which inpaint_only keeps the generated pixels when it pastes the unmasked input back
    (setting "control_net_inpaint_blur_sigma", default 7): the 0/255 mask as 0-1, dilated by a σ×σ square
    and box-blurred by σ×σ, so the seam lies just outside the masked area."""
    m = np.asarray(mask, dtype=np.float32)
    if m.ndim == 3:
        m = m[:, :, -1]
    if m.max(initial=0) > 1:
        m = m / 255.0
    sigma = max(1, int(sigma))
    m = cv2.dilate(m, np.ones((sigma, sigma), dtype=np.uint8))
    return cv2.blur(m, (sigma, sigma))


def numpy_seed(seed: int, subseed: int) -> int:
    """The seed the extension gives numpy before preprocessing (shuffle's random field): the job's seed plus
    its subseed, in 32 bits (pass the seeds actually used, not -1)."""
    return (max(int(seed), 0) + max(int(subseed), 0)) & 0xFFFFFFFF


# ---- the weight-free preprocessors ---------------------------------------------------------------------------
def _working_resolution(resolution: float) -> float:
    """Preprocessors without a resolution slider still resize: a real value (pixel perfect) is used, -1 or
    the hidden slider's placeholder means 512."""
    return resolution if resolution >= 1 else HIDDEN_RESOLUTION


def _canny(image, resolution, low, high, mask=None):
    padded, unpad = resize_with_pad(image, resolution)
    return hwc3(unpad(cv2.Canny(padded, int(low), int(high))))


def _scribble_xdog(image, resolution, threshold, _b=None, mask=None):
    padded, unpad = resize_with_pad(image, resolution)
    fine = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 0.5)
    coarse = cv2.GaussianBlur(padded.astype(np.float32), (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    strength = (2 * (255 - dog.astype(np.int32))) % 256  # the extension doubles in uint8, which wraps
    out = np.zeros_like(padded)
    out[strength > threshold] = 255
    return unpad(out)


def _threshold(image, resolution, threshold, _b=None, mask=None):
    padded, unpad = resize_with_pad(image, resolution)
    out = np.zeros_like(padded)
    out[np.min(padded, axis=2) > threshold] = 255
    return unpad(out)


def _invert(image, _res=None, _a=None, _b=None, mask=None):
    return 255 - hwc3(image)


def _color_grid(image, resolution, _a=None, _b=None, mask=None):
    x = hwc3(image)
    h, w = x.shape[:2]
    size = int(resolution)
    if h < w:
        nh, nw = size, round(w / h * size)
    else:
        nh, nw = round(h / w * size), size
    x = cv2.resize(x, (max(1, nw), max(1, nh)), interpolation=cv2.INTER_AREA)
    h, w = x.shape[:2]
    cells = cv2.resize(x, (max(1, w // 64), max(1, h // 64)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(cells, (w, h), interpolation=cv2.INTER_NEAREST)


def _noise_disk(rng: np.random.RandomState, h: int, w: int, f: int) -> np.ndarray:
    """A smooth random field in 0-1: coarse uniform noise on a grid of ``f`` pixels, cubic-upscaled."""
    noise = rng.uniform(low=0, high=1, size=(h // f + 2, w // f + 2, 1))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
    noise = noise - noise.min()
    top = noise.max()
    return (noise / top if top > 0 else noise)[:, :, None]


def _shuffle(image, resolution, _a=None, _b=None, mask=None, seed=None):
    padded, unpad = resize_with_pad(image, _working_resolution(resolution))
    x = unpad(padded)
    h, w = x.shape[:2]
    rng = np.random.RandomState(seed)  # the same stream as the extension's np.random.seed(seed)
    fx = _noise_disk(rng, h, w, 256) * float(w - 1)
    fy = _noise_disk(rng, h, w, 256) * float(h - 1)
    flow = np.concatenate([fx, fy], axis=2).astype(np.float32)
    return cv2.remap(x, flow, None, cv2.INTER_LINEAR)


def _tile_resample(image, _res, rate, _b=None, mask=None):
    x = hwc3(image)
    if rate < 1.1:
        return x
    h, w = x.shape[:2]
    return cv2.resize(x, (max(1, int(w / rate)), max(1, int(h / rate))), interpolation=cv2.INTER_AREA)


def _blur_gaussian(image, resolution, sigma, _b=None, mask=None):
    padded, unpad = resize_with_pad(image, resolution)
    return cv2.GaussianBlur(unpad(padded), (0, 0), float(sigma))


def lineart_standard_map(rgb: np.ndarray) -> np.ndarray:
    """H×W uint8 dark lines of an H×W×3 picture, as it is: how far each pixel lies below its blurred
    surroundings (σ 6), scaled so the median line (values above 8) is 127."""
    x = rgb.astype(np.float32)
    blurred = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(blurred - x, axis=2).clip(0, 255)
    lit = intensity[intensity > 8]
    intensity /= max(16.0, float(np.median(lit))) if lit.size else 16.0
    intensity *= 127
    return intensity.clip(0, 255).astype(np.uint8)


def _lineart_standard(image, resolution, _a=None, _b=None, mask=None):
    padded, unpad = resize_with_pad(image, _working_resolution(resolution))
    return hwc3(unpad(lineart_standard_map(padded)))


def _recolor(conversion: int) -> Callable:
    def run(image, _res, gamma, _b=None, mask=None):
        channel = 0 if conversion == cv2.COLOR_BGR2LAB else 2
        value = cv2.cvtColor(hwc3(image), conversion)[:, :, channel].astype(np.float32) / 255.0
        return hwc3((value ** gamma * 255.0).clip(0, 255).astype(np.uint8))
    return run


def _inpaint(image, _res=None, _a=None, _b=None, mask=None):
    x = hwc3(image)
    if mask is None:
        raise ControlNetError("needs a mask")
    return np.concatenate([x, mask[:, :, None]], axis=2)


RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
_STYLE_FIDELITY = Slider("Style Fidelity (only for Balanced mode)", 0.5, 0.0, 1.0, 0.01)
_GAMMA = Slider("Gamma Correction", 1.0, 0.1, 2.0, 0.001)
_VARIATION = Slider("Variation", 8.0, 3.0, 32.0, 1.0)
_NOISE_AUGMENTATION = Slider("Noise Augmentation", 0.0, 0.0, 1.0, 0.01)

WEIGHT_FREE: tuple[Preprocessor, ...] = (
    Preprocessor("none", None, RESOLUTION, control_types=("InstructP2P",)),
    Preprocessor("canny", _canny, RESOLUTION, Slider("Low Threshold", 100, 1, 255, 1),
                 Slider("High Threshold", 200, 1, 255, 1), control_types=("Canny",)),
    Preprocessor("invert", _invert, control_types=("Canny", "Lineart", "Scribble", "MLSD"),
                 aliases=("invert (from white bg & black line)",)),
    Preprocessor("blur_gaussian", _blur_gaussian, RESOLUTION, Slider("Sigma", 9.0, 0.01, 64.0, 0.01),
                 control_types=("Tile",)),
    Preprocessor("scribble_xdog", _scribble_xdog, RESOLUTION, Slider("XDoG Threshold", 32, 1, 64, 0.01),
                 control_types=("Scribble", "SparseCtrl")),
    Preprocessor("shuffle", _shuffle, control_types=("Shuffle",)),
    Preprocessor("inpaint", _inpaint, control_types=("Inpaint",), aliases=("inpaint_global_harmonious",),
                 needs_mask=True),
    Preprocessor("inpaint_only", _inpaint, control_types=("Inpaint",), needs_mask=True),
    Preprocessor("threshold", _threshold, RESOLUTION, Slider("Binarization Threshold", 127, 0, 255, 0.01)),
    Preprocessor("color", _color_grid, RESOLUTION, control_types=("T2I-Adapter",), aliases=("t2ia_color_grid",)),
    Preprocessor("lineart_standard", _lineart_standard, control_types=("Lineart",),
                 aliases=("lineart_standard (from white bg & black line)",)),
    Preprocessor("recolor_luminance", _recolor(cv2.COLOR_BGR2LAB), None, _GAMMA, control_types=("Recolor",)),
    Preprocessor("recolor_intensity", _recolor(cv2.COLOR_BGR2HSV), None, _GAMMA, control_types=("Recolor",)),
    Preprocessor("reference_only", None, None, _STYLE_FIDELITY, model_free=True, control_types=("Reference",)),
    Preprocessor("reference_adain", None, None, _STYLE_FIDELITY, model_free=True, control_types=("Reference",)),
    Preprocessor("reference_adain+attn", None, None, _STYLE_FIDELITY, model_free=True,
                 control_types=("Reference",)),
    Preprocessor("tile_resample", _tile_resample, None, Slider("Down Sampling Rate", 1.0, 1.0, 8.0, 0.01),
                 control_types=("Tile",)),
    Preprocessor("tile_colorfix", None, None, _VARIATION, control_types=("Tile",)),
    Preprocessor("tile_colorfix+sharp", None, None, _VARIATION, Slider("Sharpness", 1.0, 0.0, 2.0, 0.01),
                 control_types=("Tile",)),
)

# IP-Adapter and ReVision modules: nothing to run on the image (the unit's hook runs the CLIP vision encoder)
IMAGE_PROMPT: tuple[Preprocessor, ...] = (
    Preprocessor("ip-adapter-auto", None, control_types=("IP-Adapter",)),
    Preprocessor("ip-adapter_clip_sd15", None, control_types=("IP-Adapter",), aliases=("ip-adapter_clip_h",)),
    Preprocessor("ip-adapter_clip_sdxl", None, control_types=("IP-Adapter",), aliases=("ip-adapter_clip_g",)),
    Preprocessor("ip-adapter_clip_sdxl_plus_vith", None, control_types=("IP-Adapter",)),
    # FaceID adapters: InsightFace's face embedding (engine.annotators.insightface, buffalo_l)
    Preprocessor("ip-adapter_face_id", None, control_types=("IP-Adapter",)),
    Preprocessor("ip-adapter_face_id_plus", None, control_types=("IP-Adapter",)),  # and CLIP ViT-H
    # InstantID's image prompt: the antelopev2 face embedding for its IP-Adapter (the keypoints: annotators)
    Preprocessor("instant_id_face_embedding", None, control_types=("Instant-ID",)),
    # PuLID: the antelopev2 embedding and EVA02-CLIP of the facexlib face features (engine.ip_adapter.pulid_prompt)
    Preprocessor("ip-adapter_pulid", None, control_types=("IP-Adapter",)),
    # the T2I style adapter's input (engine.t2i_style): CLIP ViT-L hidden states, turned into tokens by the model
    Preprocessor("clip_vision", None, control_types=("T2I-Adapter",), aliases=("t2ia_style_clipvision",)),
    # ReVision (SDXL): the CLIP image embedding as the pooled prompt (engine.revision); no model file
    Preprocessor("revision_clipvision", None, None, _NOISE_AUGMENTATION, model_free=True, control_types=("Revision",)),
    Preprocessor("revision_ignore_prompt", None, None, _NOISE_AUGMENTATION, model_free=True,
                 control_types=("Revision",)),
)

# Every module of the extension: its UI label and sorting priority (higher first). The list order
# (``/controlnet/module_list``) and the quick filter's lists (labels) come from these; a module not here
# (a plug-in's) is labelled by its name, priority 0.
EXTENSION_MODULES: dict[str, tuple[str, int]] = {
    "none": ("none", 10), "canny": ("canny", 100), "invert": ("invert (from white bg & black line)", 20),
    "blur_gaussian": ("blur_gaussian", 0), "scribble_xdog": ("scribble_xdog", 0), "shuffle": ("shuffle", 0),
    "inpaint": ("inpaint_global_harmonious", 0), "inpaint_only": ("inpaint_only", 100),
    "inpaint_only+lama": ("inpaint_only+lama", 0), "threshold": ("threshold", 0), "color": ("t2ia_color_grid", 0),
    "lineart_standard": ("lineart_standard (from white bg & black line)", 100),
    "recolor_luminance": ("recolor_luminance", 100), "recolor_intensity": ("recolor_intensity", 0),
    "reference_only": ("reference_only", 100), "reference_adain": ("reference_adain", 0),
    "reference_adain+attn": ("reference_adain+attn", 0), "tile_resample": ("tile_resample", 100),
    "tile_colorfix": ("tile_colorfix", 0), "tile_colorfix+sharp": ("tile_colorfix+sharp", 0),
    "animal_openpose": ("animal_openpose", 0), "densepose": ("densepose (pruple bg & purple torso)", 0),
    "densepose_parula": ("densepose_parula (black bg & blue torso)", 0), "depth_anything": ("depth_anything", 0),
    "depth_anything_v2": ("depth_anything_v2", 0), "depth_hand_refiner": ("depth_hand_refiner", 0),
    "depth_leres": ("depth_leres", 0), "depth_leres++": ("depth_leres++", 0), "depth": ("depth_midas", 100),
    "depth_zoe": ("depth_zoe", 0), "dw_openpose_full": ("dw_openpose_full", 0),
    "instant_id_face_embedding": ("instant_id_face_embedding", 0),
    "instant_id_face_keypoints": ("instant_id_face_keypoints", 0),
    "ip-adapter_clip_sd15": ("ip-adapter_clip_h", 100), "ip-adapter_clip_sdxl": ("ip-adapter_clip_g", 0),
    "ip-adapter_clip_sdxl_plus_vith": ("ip-adapter_clip_sdxl_plus_vith", 0),
    "ip-adapter_face_id": ("ip-adapter_face_id", 0), "ip-adapter_face_id_plus": ("ip-adapter_face_id_plus", 0),
    "ip-adapter-auto": ("ip-adapter-auto", 1000), "ip-adapter_pulid": ("ip-adapter_pulid", 0),
    "facexlib": ("facexlib", 0), "lineart_anime": ("lineart_anime", 0),
    "lineart_anime_denoise": ("lineart_anime_denoise", 0), "lineart_coarse": ("lineart_coarse", 0),
    "lineart": ("lineart_realistic", 0), "mediapipe_face": ("mediapipe_face", 0), "mlsd": ("mlsd", 100),
    "normal_bae": ("normal_bae", 100), "normal_map": ("normal_midas", 0), "normal_dsine": ("normal_dsine", 0),
    "openpose": ("openpose", 0), "openpose_face": ("openpose_face", 0),
    "openpose_faceonly": ("openpose_faceonly", 0), "openpose_full": ("openpose_full", 100),
    "openpose_hand": ("openpose_hand", 0), "revision_clipvision": ("revision_clipvision", 100),
    "revision_ignore_prompt": ("revision_ignore_prompt", 0), "scribble_hed": ("scribble_hed", 0),
    "pidinet_scribble": ("scribble_pidinet", 100), "anime_face_segment": ("seg_anime_face", 0),
    "oneformer_ade20k": ("seg_ofade20k", 100), "oneformer_coco": ("seg_ofcoco", 0),
    "segmentation": ("seg_ufade20k", 0), "hed": ("softedge_hed", 0), "hed_safe": ("softedge_hedsafe", 0),
    "pidinet": ("softedge_pidinet", 100), "pidinet_safe": ("softedge_pidisafe", 0),
    "softedge_teed": ("softedge_teed", 0), "softedge_anyline": ("softedge_anyline", 0),
    "pidinet_sketch": ("t2ia_sketch_pidi", 0), "clip_vision": ("t2ia_style_clipvision", 0),
    "mobile_sam": ("mobile_sam", 0),
}
_BY_LABEL = {label: name for name, (label, _) in EXTENSION_MODULES.items()}


def _extension_name(p: Preprocessor) -> str | None:
    """The extension's module key for ``p``: its name, or one of its aliases (an annotator may be declared
    under the label)."""
    for candidate in (p.name, *p.aliases):
        if candidate in EXTENSION_MODULES:
            return candidate
        if candidate in _BY_LABEL:
            return _BY_LABEL[candidate]
    return None


def label_of(p: Preprocessor) -> str:
    """The name the extension's UI shows (``/controlnet/module_list?alias_names=true``, the quick filter)."""
    key = _extension_name(p)
    return EXTENSION_MODULES[key][0] if key is not None else p.name


def priority_of(p: Preprocessor) -> int:
    key = _extension_name(p)
    return EXTENSION_MODULES[key][1] if key is not None else 0


# ---- the list a server knows ---------------------------------------------------------------------------------
_TYPE_FILTERS = {"instructp2p": ("ip2p",), "segmentation": ("seg",), "normalmap": ("normal",),
                 "t2i-adapter": ("t2i_adapter", "t2iadapter", "t2ia"), "ip-adapter": ("ip_adapter", "ipadapter"),
                 "openpose": ("openpose", "densepose"), "instant-id": ("instant_id", "instantid"),
                 "scribble": ("sketch",), "tile": ("blur",)}
_UNION_TYPES = {"openpose", "depth", "softedge", "scribble", "canny", "lineart", "mlsd", "normalmap",
                "segmentation", "inpaint", "tile"}  # a ControlNet++ "union" model serves these


def _model_keywords(control_type: str) -> set[str]:
    """The words a model's title is searched for under a control type (the type itself, its aliases, and
    "union" for the types a union model covers)."""
    t = control_type.lower()
    return {t, *_TYPE_FILTERS.get(t, ()), *(("union",) if t in _UNION_TYPES else ())}


class Preprocessors:
    """The preprocessors a server knows, looked up by name or alias without regard to case."""

    def __init__(self, preprocessors: Iterable[Preprocessor] = ()):
        self._items: list[Preprocessor] = []
        self._index: dict[str, Preprocessor] = {}
        for p in preprocessors:
            self.add(p)

    def add(self, p: Preprocessor) -> None:
        """A further preprocessor (a plug-in's); a name or alias already taken is an error naming its owner."""
        if not isinstance(p, Preprocessor):
            raise ControlNetError(f"ControlNet: expected a Preprocessor declaration, got {type(p).__name__}")
        if not p.name or not p.name.strip():
            raise ControlNetError("ControlNet: a preprocessor needs a name")
        keys = [k.lower() for k in (p.name, *p.aliases)]
        for key in keys:
            other = self._index.get(key)
            if other is not None:
                raise ControlNetError(f"ControlNet: preprocessor {p.name!r} (from {p.owner}): the name {key!r} is "
                                      f"already taken by {other.name!r} from {other.owner}")
        if len(set(keys)) != len(keys):
            raise ControlNetError(f"ControlNet: preprocessor {p.name!r} repeats a name among its aliases")
        self._items.append(p)
        for key in keys:
            self._index[key] = p

    def get(self, name: str) -> Preprocessor:
        p = self._index.get(str(name).strip().lower())
        if p is None:
            raise ControlNetError(f"ControlNet: unknown preprocessor {name!r}; available: {', '.join(self.names())}")
        return p

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.strip().lower() in self._index

    def __iter__(self):
        return iter(self.sorted())

    def __len__(self) -> int:
        return len(self._items)

    def sorted(self) -> list[Preprocessor]:
        """The extension's list order: "none" first, then by priority, highest first, and within a priority
        by label, Z to A."""
        first = [p for p in self._items if p.name == "none"]
        rest = [p for p in self._items if p.name != "none"]
        rest.sort(key=lambda p: str(priority_of(p)).zfill(8) + label_of(p), reverse=True)
        return first + rest

    def names(self, labels: bool = False) -> list[str]:
        """``module_list``: the module names (the labels with ``labels``, as ``alias_names=true``)."""
        return [label_of(p) if labels else p.name for p in self.sorted()]

    def module_detail(self, labels: bool = False) -> dict[str, dict]:
        """``module_detail``: per module, ``model_free`` and its visible sliders."""
        return {(label_of(p) if labels else p.name): p.detail() for p in self.sorted()}

    def control_types(self, model_titles: Sequence[str]) -> dict:
        """The ``/controlnet/control_types`` answer: for "All" and every type a preprocessor declares, the
        preprocessors' labels ("none" kept in each), the model titles that mention the type (or one of its
        aliases, or "union"), the default preprocessor (the first after "none") and the default model (the
        first that matches, preferring a v1.1 file: "11" in the name)."""
        ordered = self.sorted()
        models = ["None", *[m for m in model_titles if m != "None"]]
        types = sorted({t for p in ordered for t in p.control_types})
        out = {"All": {"module_list": [label_of(p) for p in ordered], "model_list": models,
                       "default_option": "none", "default_model": "None"}}
        for control_type in types:
            words = _model_keywords(control_type)
            found = [m for m in models if m.lower() == "none" or any(w in m.lower() for w in words)]
            default_model = "None"
            if len(found) > 1:
                default_model = next((m for m in found if "11" in m.split("[")[0]), found[1])
            modules = [p for p in ordered if control_type in p.control_types or label_of(p) == "none"]
            out[control_type] = {"module_list": [label_of(p) for p in modules], "model_list": found,
                                 "default_option": label_of(modules[0] if len(modules) == 1 else modules[1]),
                                 "default_model": default_model}
        return {"control_types": out}


def builtin(annotators_dir: Path | None = None, models_dir: Path | None = None) -> Preprocessors:
    """The weight-free preprocessors and, when :mod:`sdstudio.engine.annotators` offers them, the ones that
    run networks from ``annotators_dir`` (InsightFace's packs also from ``models_dir``)."""
    registry = Preprocessors(WEIGHT_FREE + IMAGE_PROMPT)
    try:
        from . import annotators
    except ImportError:
        return registry
    declare = getattr(annotators, "preprocessors", None)
    if callable(declare):
        for p in declare(annotators_dir, models_dir):
            registry.add(p)
    return registry


# ---- running one ------------------------------------------------------------------------------------------
def _takes_seed(run: Callable) -> bool:
    try:
        params = inspect.signature(run).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(q.name == "seed" or q.kind is inspect.Parameter.VAR_KEYWORD for q in params)


def _mask_array(mask: np.ndarray, shape: tuple[int, int], where: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.dtype == bool:
        m = m.astype(np.uint8) * 255
    if m.dtype != np.uint8:
        raise ControlNetError(f"{where}: expected an 8-bit mask, got {m.dtype}")
    if m.ndim == 3:
        m = hwc3(m)[:, :, 0]  # the extension reads a mask image's first channel
    if m.ndim != 2:
        raise ControlNetError(f"{where}: expected a one-channel mask, got shape {tuple(m.shape)}")
    if m.shape != shape:
        raise ControlNetError(f"{where}: the mask is {m.shape[1]}×{m.shape[0]}, the image {shape[1]}×{shape[0]}")
    return np.ascontiguousarray(m)


def detect(p: Preprocessor, image: np.ndarray, processor_res: float, threshold_a: float, threshold_b: float,
           mask: np.ndarray | None = None, *, seed: int | None = None, pixel_perfect: bool = False) -> np.ndarray:
    """``p``'s detected map of ``image`` as uint8 H×W×3 (H×W×4 for the inpaint preprocessors: RGB and the
    mask). Values out of a slider's range (the unit's -1) take its default; with ``pixel_perfect`` the
    resolution is used as given, as the extension puts the pixel-perfect value in after its range check.
    ``seed`` (see :func:`numpy_seed`) makes shuffle's field repeat; None draws a new one, as the extension's
    ``/controlnet/detect`` does. A preprocessor with nothing to run gives back the image as RGB."""
    where = f"ControlNet preprocessor {p.name!r}"
    x = hwc3(image, where)
    res, a, b = p.resolved(processor_res, threshold_a, threshold_b)
    if pixel_perfect:
        res = int(processor_res)
    if mask is not None:
        mask = _mask_array(mask, x.shape[:2], where)
    if p.needs_mask and mask is None:
        raise ControlNetError(f"{where} needs a mask (the unit's mask, or the img2img inpaint mask)")
    if p.run is None:
        return x
    extra = {"seed": seed} if _takes_seed(p.run) else {}
    try:
        out = p.run(x, res, a, b, mask, **extra)
    except ControlNetError as exc:  # already says what: say where, once
        if where in str(exc):
            raise
        raise ControlNetError(f"{where}: {exc}") from exc
    except (cv2.error, ValueError) as exc:
        raise ControlNetError(f"{where} failed on a {x.shape[1]}×{x.shape[0]} image: {exc}") from exc
    out = np.asarray(out)
    if out.dtype != np.uint8:
        raise ControlNetError(f"{where} returned a {out.dtype} map; expected 8-bit")
    if out.ndim == 3 and out.shape[2] == 4 and p.needs_mask:
        return np.ascontiguousarray(out)
    return np.ascontiguousarray(hwc3(out))
