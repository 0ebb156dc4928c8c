"""img2img scripts on the tiny model: SD upscale, Loopback, Poor man's outpainting."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from sdstudio.core import infotext, scripts
from sdstudio.core.params import Img2ImgRequest, RequestError, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.scripts import Studio
from sdstudio.scripts.img2img import loopback_strength
from sdstudio.testing.synthetic import write_upscaler


@pytest.fixture(scope="module")
def setup(make_data_root):
    root = make_data_root("scripts")
    write_upscaler(root / "models" / "ESRGAN" / "2x-tiny.safetensors", "esrgan", 2)
    im = Image.new("RGB", (96, 64), (30, 60, 200))
    ImageDraw.Draw(im).ellipse((20, 10, 60, 50), fill=(220, 40, 40))
    im.save(root / "init.png")
    return Studio(Engine(Paths(root))), root / "init.png"


def request(init, **kw) -> Img2ImgRequest:
    return Img2ImgRequest(**{"prompt": "a red circle", "init_images": [str(init)], "width": 64, "height": 64,
                             "steps": 4, "seed": 1, "sampler_name": "Euler", "denoising_strength": 0.4, **kw})


def run(engine, req):
    jobs = []
    result = engine.img2img(req.validate(), on_progress=lambda p: jobs.append((p.job_no, p.job_count)))
    return result, jobs


def recreated(engine, image, init):
    again = engine.img2img(from_infotext(image.infotext, Img2ImgRequest(init_images=[str(init)])))
    return np.array_equal(np.asarray(again.images[-1].image), np.asarray(image.image))


def test_sd_upscale_tiles_and_infotext(setup):
    engine, init = setup
    result, jobs = run(engine, request(init, script_name="SD upscale",
                                       script_args={"overlap": 16, "upscaler": "2x-tiny", "scale": 2.0}))
    assert [g.image.size for g in result.images] == [(192, 128)]
    assert jobs[-1] == (11, 12)  # 4 × 3 tiles of 64 px, one pass each, counted as one job's progress
    fields = infotext.parse(result.images[0].infotext)
    assert fields["Script"] == "SD upscale" and fields["SD upscale upscaler"] == "2x-tiny"
    assert fields["SD upscale scale"] == "2" and fields["Seed"] == "1"
    assert recreated(engine, result.images[0], init)


def test_sd_upscale_batches_tiles_and_none_keeps_the_size(setup):
    engine, init = setup
    one, _ = run(engine, request(init, script_name="SD upscale", script_args={"overlap": 8, "upscaler": "None"}))
    batched, jobs = run(engine, request(init, batch_size=2, script_name="SD upscale",
                                        script_args={"overlap": 8, "upscaler": "None"}))
    assert one.images[0].image.size == (96, 64) and batched.images[0].image.size == (96, 64)
    assert jobs[-1] == (0, 1)  # 2 tiles in one batch
    with pytest.raises(RequestError, match="smaller than one"):
        run(engine, request(init, width=128, height=128, script_name="SD upscale", script_args={"upscaler": "None"}))


def test_loopback_strength_schedule_and_outputs(setup):
    engine, init = setup
    args = scripts.builtin().parse("Loopback", {"loops": 4, "final_denoising_strength": 0.8, "denoising_curve": "Linear"})
    assert [round(loopback_strength(args, 0.2, i), 3) for i in range(4)] == [0.2, 0.4, 0.6, 0.8]
    lazy = scripts.builtin().parse("Loopback", {"loops": 3, "final_denoising_strength": 1.0, "denoising_curve": "Lazy"})
    aggressive = scripts.builtin().parse("Loopback", {"loops": 3, "final_denoising_strength": 1.0, "denoising_curve": "Aggressive"})
    assert loopback_strength(lazy, 0.0, 1) < 0.5 < loopback_strength(aggressive, 0.0, 1)
    result, jobs = run(engine, request(init, script_name="Loopback",
                                       script_args={"loops": 3, "final_denoising_strength": 0.6}))
    assert [g.seed for g in result.images] == [1, 2, 3] and jobs[-1] == (2, 3)
    frames = [np.asarray(g.image) for g in result.images]
    assert not np.array_equal(frames[0], frames[1]) and not np.array_equal(frames[1], frames[2])
    assert "Final denoising strength: 0.6" in result.images[2].infotext
    assert recreated(engine, result.images[2], init)


def test_poor_mans_outpainting_keeps_the_picture_and_fills_the_band(setup):
    engine, init = setup
    result, _jobs = run(engine, request(init, script_name="Poor man's outpainting",
                                       script_args={"pixels": 32, "mask_blur": 2, "direction": ["left", "down"]}))
    out = result.images[0].image
    assert out.size == (128, 128)  # 96 + 32 and 64 + 32, up to multiples of 64
    arr = np.asarray(out).astype(int)
    original = np.asarray(Image.open(init)).astype(int)
    # the old picture sits at x 32, y 0; away from the blurred mask edge (blur 2 × 2 = 4: radius 10) it is
    # the original to the last pixel, tile seams included
    assert np.array_equal(arr[0:64 - 4 - 10, 32 + 4 + 10:], original[0:50, 14:])
    assert arr[100:, :].std() > 0  # the new band got content
    assert "Script: Poor man's outpainting" in result.images[0].infotext
    assert recreated(engine, result.images[0], init)


def test_bad_script_requests():
    for name, args, word in [("Nope", {}, "unknown img2img script"), ("Loopback", {"loops": 0}, "loops"),
                             ("SD upscale", {"scale": 20}, "scale"), ("Loopback", {"wat": 1}, "unknown argument"),
                             ("Poor man's outpainting", {"direction": ["sideways"]}, "direction must be some of")]:
        with pytest.raises(RequestError, match=word):
            Img2ImgRequest(init_images=["x.png"], script_name=name, script_args=args).validate()


def test_a1111_positional_script_args():
    assert scripts.builtin().from_a1111_list("SD upscale", [None, 32, 1, 3], {"upscalers": ["None", "Lanczos"]}) == \
        {"overlap": 32, "upscaler": "Lanczos", "scale": 3.0}
    assert scripts.builtin().from_a1111_list("Loopback", [2, 0.3, "Lazy", "None"]) == \
        {"loops": 2, "final_denoising_strength": 0.3, "denoising_curve": "Lazy"}
    assert scripts.builtin().from_a1111_list("Poor man's outpainting", [64, 4, "latent noise", ["up"]])["inpainting_fill"] == 2
    with pytest.raises(scripts.ScriptError, match="out of range"):
        scripts.builtin().from_a1111_list("SD upscale", [None, 32, 9, 2], {"upscalers": ["None"]})


def test_outpainting_mk2_grows_each_side_and_keeps_the_picture(setup):
    engine, init = setup
    result, jobs = run(engine, request(init, script_name="Outpainting mk2",
                                       script_args={"pixels": 32, "mask_blur": 4, "direction": ["left", "up"]}))
    out = result.images[0].image
    assert out.size == (96 + 32, 64 + 32) and jobs[-1] == (1, 2)  # one pass per side
    arr, original = np.asarray(out).astype(int), np.asarray(Image.open(init)).astype(int)
    # the old picture sits at (32, 32); well inside it (mask blur 4: radius 10, plus the 4 px margin) it is exact
    assert np.array_equal(arr[32 + 14:, 32 + 14:], original[14:, 14:])
    assert arr[:16, :].std() > 0 and arr[:, :16].std() > 0
    assert "Script: Outpainting mk2" in result.images[0].infotext and "Outpaint fall-off exponent: 1" in result.images[0].infotext
    assert recreated(engine, result.images[0], init)


def test_matched_noise_follows_the_known_colours():
    from sdstudio.core.imageops import match_histogram, matched_noise

    image = np.zeros((64, 96, 3))
    image[..., 0] = 0.8
    image[..., 2] = np.linspace(0, 1, 96)[None, :]
    unknown = np.zeros((64, 96))
    unknown[:, 64:] = 1
    out = matched_noise(image, unknown)
    assert np.array_equal(out[:, :64], image[:, :64])  # known pixels untouched
    assert np.allclose(np.sort(out[:, 64:, 2].ravel())[[0, -1]], [image[:, :64, 2].min(), image[:, :64, 2].max()],
                       atol=0.02)  # the fill spans the known range of each channel
    assert np.allclose(out[:, 64:, 0], 0.8) and out[:, 64:, 1].max() == 0
    assert np.array_equal(matched_noise(image, unknown), out)  # deterministic
    ref = np.random.default_rng(0).normal(size=(500, 1))
    matched = match_histogram(np.random.default_rng(1).random((500, 1)), ref)
    assert np.allclose(np.sort(matched[:, 0]), np.quantile(ref[:, 0], (np.arange(500) + 0.5) / 500))


def test_soft_inpainting_named_as_an_always_on_script_sets_its_fields():
    """``alwayson_scripts: {"soft inpainting": {...}}`` (our dict form, the CLI's --alwayson) means the request's
    own soft inpainting fields, switched on, as A1111's positional form does over the API."""
    from sdstudio.scripts import Studio

    req = Studio(engine=None).validate(Img2ImgRequest(init_images=["x.png"], alwayson_scripts={
        "soft inpainting": {"mask_blend_power": 2}}))
    assert (req.soft_inpainting, req.mask_blend_power, req.alwayson_scripts) == (True, 2.0, {})
    with pytest.raises(RequestError, match="mask blend power must be from 0 to 8"):
        Studio(engine=None).validate(Img2ImgRequest(init_images=["x.png"], alwayson_scripts={
            "Soft Inpainting": {"mask_blend_power": 9}}))
