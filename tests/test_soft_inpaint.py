"""Soft inpainting: the percentile filter against its definition, the per-step blend's limits, and a real
soft-inpainting job on the tiny model (original kept far from the mask, infotext round trip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core import infotext
from sdstudio.core.params import Img2ImgRequest, RequestError, from_infotext
from sdstudio.engine import soft_inpaint
from sdstudio.engine.soft_inpaint import SoftInpainting

DEFAULTS = SoftInpainting.of(Img2ImgRequest(mask="mask.png", soft_inpainting=True))  # A1111's: 1, 0.5, 4, 0, 0.5, 2


def _reference_filter(img: np.ndarray, kernel: np.ndarray, lo: float, hi: float, min_width: float = 1.0):
    """The filter's definition, one pixel at a time: sort the window, stack the weights, average the values
    that overlap the [lo, hi] part of the stack (at least min_width high, kept inside the stack)."""
    r = kernel.shape[0] // 2
    out = np.zeros_like(img)
    for y in range(img.shape[0]):
        for x in range(img.shape[1]):
            items = sorted((img[yy, xx], kernel[yy - y + r, xx - x + r])
                           for yy in range(max(0, y - r), min(img.shape[0], y + r + 1))
                           for xx in range(max(0, x - r), min(img.shape[1], x + r + 1)))
            total = sum(w for _, w in items)
            a, b = total * lo, total * hi
            if b - a < min_width:
                c = (a + b) / 2
                a, b = c - min_width / 2, c + min_width / 2
                if b > total:
                    a, b = total - min_width, total
                if a < 0:
                    a, b = 0, min_width
            acc = weight = start = 0.0
            for value, w in items:
                overlap = max(0.0, min(b, start + w) - max(a, start))
                acc, weight, start = acc + value * overlap, weight + overlap, start + w
            out[y, x] = acc / weight if weight else 0.0
    return out


@pytest.mark.parametrize("lo, hi", [(0.9, 1.0), (0.25, 0.75), (0.0, 1.0), (0.5, 0.5)])
def test_percentile_filter_matches_its_definition(lo, hi):
    img = np.random.default_rng(3).random((6, 7))
    kernel = soft_inpaint.gaussian_kernel()
    got = soft_inpaint.percentile_filter(torch.from_numpy(img), lo, hi).numpy()
    assert np.allclose(got, _reference_filter(img, kernel.numpy(), lo, hi), atol=1e-12)


def test_kernel_is_one_at_the_centre_and_tapers():
    k = soft_inpaint.gaussian_kernel(1.5, 2)
    assert k.shape == (5, 5) and k[2, 2] == 1 and 0 < k[0, 0] < k[0, 2] < k[1, 2] < 1


def test_blend_keeps_the_original_outside_and_the_prediction_inside():
    g = torch.Generator().manual_seed(0)
    init, current = torch.randn(1, 4, 6, 6, generator=g), torch.randn(1, 4, 6, 6, generator=g)
    repaint = torch.zeros(1, 1, 6, 6)
    repaint[..., 3:] = 1
    out = soft_inpaint.blend(init, current, repaint, torch.tensor(5.0), DEFAULTS)
    assert torch.allclose(out[..., :3], init[..., :3], atol=1e-5)
    assert torch.allclose(out[..., 3:], current[..., 3:], atol=1e-5)


def test_blend_favours_the_original_early_and_keeps_vector_lengths():
    a = torch.tensor([1.0, 0, 0, 0]).view(1, 4, 1, 1)
    b = torch.tensor([0, 1.0, 0, 0]).view(1, 4, 1, 1)
    half = torch.full((1, 1, 1, 1), 0.5)
    soft = DEFAULTS
    assert (soft.power, soft.scale, soft.detail, soft.influence, soft.threshold, soft.contrast) == (1, 0.5, 4, 0, 0.5, 2)
    early, late = (soft_inpaint.blend(a, b, half, torch.tensor(s), soft) for s in (10.0, 0.1))
    assert early[0, 0] > 0.9 and late[0, 1] > late[0, 0]  # noisy steps keep the original, quiet ones follow b
    t = 0.5 ** (1.0 * 0.5)  # sigma 1: repaint ** (sigma ** power * scale)
    mid = soft_inpaint.blend(a, b, half, torch.tensor(1.0), soft)
    linear = a * (1 - t) + b * t
    assert linear.norm() < 0.99 and abs(mid.norm().item() - 1.0) < 1e-4  # equal lengths stay 1, not shrunk


def test_composite_mask_follows_where_the_latent_changed():
    init = torch.zeros(1, 4, 16, 16)
    final = init.clone()
    final[..., 4:12, 4:12] = 3.0  # a changed square
    repaint = torch.zeros(1, 1, 16, 16)
    repaint[..., 2:14, 2:14] = 1
    mask = np.asarray(soft_inpaint.composite_mask(repaint, init, final, DEFAULTS, (128, 128)))
    assert mask[64, 64] >= 250 and mask[2, 2] == 0 and mask[125, 3] == 0  # result where changed, else original
    same = np.asarray(soft_inpaint.composite_mask(repaint, init, init, DEFAULTS, (128, 128)))
    assert same.max() == 0  # nothing changed: all original


@pytest.fixture(scope="module")
def files(tmp_path_factory, inpaint_files):
    return inpaint_files(tmp_path_factory.mktemp("soft"), 128, mask=(0, 0, 31, 63))


def soft_req(files, **kw) -> Img2ImgRequest:
    return Img2ImgRequest(**{"prompt": "a red circle", "init_images": [str(files / "init.png")],
                             "mask": str(files / "mask.png"), "mask_blur": 8, "width": 128, "height": 64, "steps": 8,
                             "seed": 3, "sampler_name": "Euler", "denoising_strength": 0.9,
                             "soft_inpainting": True, **kw})


def test_soft_inpainting_job(session_engine, files):
    result = session_engine.img2img(soft_req(files))
    image = result.images[0]
    out = np.asarray(image.image).astype(int)
    original = np.asarray(Image.open(files / "init.png").convert("RGB")).astype(int)
    # far from the mask (past the blur, the filters' window and the composite's own blur): the original, exactly
    assert np.array_equal(out[:, 96:], original[:, 96:])
    assert np.abs(out[:, :16] - original[:, :16]).mean() > 5  # inside: repainted
    text = infotext.parse(image.infotext)
    assert text["Soft inpainting enabled"] == "True" and text["Soft inpainting preservation strength"] == "0.5"
    assert text["Soft inpainting transition contrast boost"] == "4"
    again = from_infotext(image.infotext, Img2ImgRequest(init_images=result.request.init_images,
                                                         mask=result.request.mask))
    assert again.soft_inpainting and again.composite_difference_contrast == 2.0
    assert np.array_equal(np.asarray(session_engine.img2img(again).images[0].image), np.asarray(image.image))
    # off, the same job is plain inpainting: different pixels near the mask's soft edge
    plain = np.asarray(session_engine.img2img(soft_req(files, soft_inpainting=False)).images[0].image).astype(int)
    assert not np.array_equal(plain, out)
    assert "Soft inpainting" not in session_engine.img2img(soft_req(files, soft_inpainting=False)).images[0].infotext


def test_soft_inpainting_ranges_are_checked(session_engine, files):
    with pytest.raises(RequestError, match="inpaint_detail_preservation must be from 1 to 32"):
        session_engine.img2img(soft_req(files, inpaint_detail_preservation=0.5))
