"""img2img and inpainting on the tiny random-weight model: steps, strength, masks, the 9-channel UNet."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstudio.core import infotext
from sdstudio.core.params import Img2ImgRequest, RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine


@pytest.fixture(scope="module")
def files(tmp_path_factory, inpaint_files):
    return inpaint_files(tmp_path_factory.mktemp("i2i"), 64, mask=(0, 0, 31, 63), small_mask=(8, 8, 19, 19))


def req(files, **kw) -> Img2ImgRequest:
    return Img2ImgRequest(**{"prompt": "a red circle", "init_images": [str(files / "init.png")], "width": 64,
                             "height": 64, "steps": 10, "seed": 1, "sampler_name": "Euler", **kw})


def run(engine, request):
    steps = []
    result = engine.img2img(request, on_progress=lambda p: steps.append(p.step))
    return result, steps


def arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(int)


@pytest.mark.parametrize("strength, fix, expected", [(0.5, False, 6), (0.75, False, 8), (1.0, False, 10),
                                                     (0.5, True, 10), (0.3, True, 10)])
def test_steps_actually_run(session_engine, files, strength, fix, expected):
    _, steps = run(session_engine, req(files, denoising_strength=strength, fix_steps=fix))
    assert max(steps) == expected


def test_more_strength_moves_further_from_the_init(session_engine, files):
    base = arr(run(session_engine, req(files, denoising_strength=0.0))[0].images[0].image)
    distances = [np.abs(arr(run(session_engine, req(files, denoising_strength=s))[0].images[0].image) - base).mean()
                 for s in (0.2, 0.6, 1.0)]
    assert distances[0] < distances[1] < distances[2]


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpaint_leaves_the_unmasked_half_exact(session_engine, files, fill):
    r = req(files, mask=str(files / "mask.png"), mask_blur=0, inpainting_fill=fill, denoising_strength=0.9)
    out = arr(run(session_engine, r)[0].images[0].image)
    original = arr(Image.open(files / "init.png"))
    assert np.array_equal(out[:, 32:], original[:, 32:])
    assert not np.array_equal(out[:, :32], original[:, :32])


def test_inverted_mask_and_blur(session_engine, files):
    r = req(files, mask=str(files / "mask.png"), mask_blur=4, inpainting_mask_invert=1)
    out = arr(run(session_engine, r)[0].images[0].image)
    original = arr(Image.open(files / "init.png"))
    radius = int(2.5 * 4 + 0.5)
    assert np.array_equal(out[:, :32 - radius - 1], original[:, :32 - radius - 1])  # now the left half is kept
    assert not np.array_equal(out[:, 32 + radius:], original[:, 32 + radius:])


def test_only_masked_works_on_the_crop_and_pastes_it_back(session_engine, files):
    r = req(files, mask=str(files / "small-mask.png"), mask_blur=0, inpaint_full_res=True,
            inpaint_full_res_padding=4, denoising_strength=1.0)
    out = arr(run(session_engine, r)[0].images[0].image)
    original = arr(Image.open(files / "init.png"))
    changed = np.argwhere((out != original).any(-1))
    assert changed.size and changed.min() >= 8 and changed.max() <= 19  # only inside the mask
    text = infotext.parse(run(session_engine, r)[0].images[0].infotext)
    assert text["Inpaint area"] == "Only masked" and text["Masked area padding"] == "4"


def test_infotext_round_trip_recreates_the_image(session_engine, files):
    r = req(files, mask=str(files / "mask.png"), inpainting_fill=2, denoising_strength=0.6, seed=77)
    first = run(session_engine, r)[0].images[0]
    base = Img2ImgRequest(init_images=r.init_images, mask=r.mask)
    again = from_infotext(first.infotext, base)
    assert again.denoising_strength == 0.6 and again.inpainting_fill == 2
    second = run(session_engine, again)[0].images[0]
    assert np.array_equal(arr(first.image), arr(second.image))


def test_batch_of_several_init_images(session_engine, files, tmp_path):
    other = tmp_path / "other.png"
    Image.new("RGB", (32, 32), (0, 255, 0)).save(other)
    result, _ = run(session_engine, req(files, init_images=[str(files / "init.png"), str(other)], batch_size=2,
                                        denoising_strength=0.1))
    a, b = (arr(g.image) for g in result.images)
    assert a.shape == b.shape == (64, 64, 3) and np.abs(a - b).mean() > 1


def test_bad_img2img_requests(session_engine, files):
    with pytest.raises(RequestError, match="init image"):
        session_engine.img2img(Img2ImgRequest(prompt="x", width=64, height=64))
    with pytest.raises(RequestError, match="denoising_strength"):
        session_engine.img2img(req(files, denoising_strength=1.5))
    (files / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RequestError, match="init image 1: cannot read"):
        session_engine.img2img(req(files, init_images=[str(files / "broken.png")]))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_nine_channel_inpainting_model(tmp_path, files, family):
    from sdstudio.testing.synthetic import write_checkpoint

    folder = tmp_path / "models" / "Stable-diffusion"
    write_checkpoint(folder / "tiny-inpainting.safetensors", family, "tiny", seed=3, inpainting=True)
    engine = Engine(Paths(tmp_path))
    result, _ = run(engine, req(files, mask=str(files / "mask.png"), mask_blur=0, inpainting_mask_weight=0.5))
    assert result.inpainting_model
    out, original = arr(result.images[0].image), arr(Image.open(files / "init.png"))
    assert np.array_equal(out[:, 32:], original[:, 32:])
    txt = engine.generate(Txt2ImgRequest(prompt="x", width=64, height=64, steps=2, seed=1))
    assert txt.images[0].image.size == (64, 64)  # txt2img on an inpainting model: all-repaint conditioning
