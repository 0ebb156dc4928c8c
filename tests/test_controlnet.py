"""ControlNet through the engine: the hook's scales and windows against the extension's formulas, and whole
requests on a tiny checkpoint with a tiny random-weight ControlNet (txt2img, Hires. fix, img2img, several
units, X/Y/Z, infotext, detected maps, errors)."""

from __future__ import annotations

import base64
import io
import os

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageOps

from sdstudio.core import controlnet as cn
from sdstudio.core import infotext
from sdstudio.core.errors import http_status
from sdstudio.core.params import Img2ImgRequest, RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.engine.controlnet import ControlHook, PreparedUnit
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import HookError, Step, UNetCall
from sdstudio.models.controlnet import load_control_model
from sdstudio.models.errors import ModelNotFoundError
from sdstudio.models.loader import load_checkpoint
from sdstudio.scripts import Studio
from sdstudio.testing.controlnet_files import write_control_lora, write_controlnet, write_t2i_adapter
from sdstudio.testing.ip_adapter_files import write_clip_vision, write_ip_adapter


@pytest.fixture(scope="module")
def cn_root(make_data_root):
    root = make_data_root("controlnet")
    folder = root / "models" / "ControlNet"
    folder.mkdir(parents=True)
    write_controlnet(folder / "tiny-canny.safetensors", "sd1", "tiny", seed=3)
    write_controlnet(folder / "tiny-other.pth", "sd1", "tiny", layout="ldm_prefixed", seed=4)
    write_controlnet(folder / "tiny-xl.safetensors", "sdxl", "tiny", seed=5)
    write_t2i_adapter(folder / "t2iadapter_tiny_sd14v1.pth", "sd1", "tiny", seed=6)
    unet = load_checkpoint(root / "models" / "Stable-diffusion" / "tiny-sd1.safetensors").unet
    write_control_lora(folder / "tiny-control-lora.safetensors", unet, seed=8)
    write_ip_adapter(folder / "ip-adapter_tiny.safetensors")
    write_clip_vision(root / "models" / "clip_vision" / "clip_h.safetensors")
    return root


@pytest.fixture(scope="module")
def studio(cn_root):
    return Studio(Engine(Paths(cn_root)))


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _control_image(size: int = 64) -> Image.Image:
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle((size // 4, size // 4, 3 * size // 4, 3 * size // 4), outline="white", width=2)
    return im


def _req(**kw) -> Txt2ImgRequest:
    base = {"prompt": "a square", "seed": 11, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 5.0}
    return Txt2ImgRequest(**{**base, **kw})


def _unit(**kw) -> dict:
    return {"enabled": True, "module": "none", "model": "tiny-canny", "image": _b64(_control_image()), **kw}


def _with(units, **kw) -> Txt2ImgRequest:
    return _req(alwayson_scripts={"ControlNet": {"units": units}}, **kw)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image, dtype=np.int16)


# ---- the hook on its own ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(cn_root):
    return load_control_model(cn_root / "models" / "ControlNet" / "tiny-canny.safetensors")


def _hook(model, hires_job: bool = False, **unit) -> ControlHook:
    u = cn.unit_from_dict({"enabled": True, "module": "canny", **unit})
    detected = np.zeros((64, 64, 3), np.uint8)
    detected[16:48, 16:48] = 255
    prepared = PreparedUnit(0, u, cn.Preprocessor(u.module), detected, model)
    return ControlHook(prepared, torch.device("cpu"), torch.float32, hires_job)


def test_scales_follow_the_control_mode(tiny_model):
    assert _hook(tiny_model, weight=0.8).scales(13, False) == [0.8] * 13
    soft = [0.8 * 0.825 ** (12 - i) for i in range(13)]
    for mode in ("My prompt is more important", "ControlNet is more important"):
        assert _hook(tiny_model, weight=0.8, control_mode=mode).scales(13, False) == pytest.approx(soft)
    # SDXL's 10 outputs take the first 10 of the same 13 (the middle block's is 0.825 ** 3, not 1)
    assert _hook(tiny_model, control_mode=1).scales(10, False) == pytest.approx([0.825 ** (12 - i) for i in range(10)])
    # canny (and mlsd) get soft injection in the Hires. fix pass even when Balanced
    assert _hook(tiny_model, weight=0.8).scales(13, True) == pytest.approx(soft)
    assert _hook(tiny_model, weight=0.8, module="invert").scales(13, True) == [0.8] * 13
    weights = [0.1 * i for i in range(13)]
    assert _hook(tiny_model, advanced_weighting=weights, control_mode=1).scales(13, False) == weights
    with pytest.raises(cn.ControlNetError, match="advanced_weighting has 3"):
        _hook(tiny_model, advanced_weighting=[1, 1, 1]).scales(13, False)


@pytest.mark.parametrize("start, end, steps, expected", [
    (0.0, 1.0, 4, [True, True, True, True]),
    (0.5, 1.0, 4, [False, False, True, True]),
    (0.0, 0.25, 4, [True, True, False, False]),
    (0.3, 0.6, 10, [False, False, False, True, True, True, True, False, False, False]),
])
def test_guidance_window_by_sampling_step(tiny_model, start, end, steps, expected):
    hook = _hook(tiny_model, guidance_start=start, guidance_end=end)
    assert [hook.active(Step(i, steps, torch.ones(1))) for i in range(steps)] == expected


@pytest.mark.parametrize("option, first, hires", [("Both", True, True), ("Low res only", True, False),
                                                   ("High res only", False, True)])
def test_hr_option(tiny_model, option, first, hires):
    hook = _hook(tiny_model, hires_job=True, hr_option=option)
    assert hook.active(Step(0, 4, torch.ones(1), "first")) is first
    assert hook.active(Step(0, 4, torch.ones(1), "hires")) is hires
    # without Hires. fix the option does not matter (the extension ignores it then)
    assert _hook(tiny_model, hr_option=option).active(Step(0, 4, torch.ones(1), "first"))


def _call(rows_uncond: list[bool], width: int) -> UNetCall:
    g = torch.Generator().manual_seed(0)
    n = len(rows_uncond)
    x = torch.randn(n, 4, 8, 8, generator=g)
    hidden = torch.randn(n, 77, width, generator=g)
    return UNetCall(x, torch.full((n,), 500.0), hidden, list(range(n)), rows_uncond, Step(0, 4, torch.ones(n)))


def test_residuals_are_the_controlnets_outputs_times_the_scales(tiny_model):
    hook = _hook(tiny_model, weight=0.7, control_mode="My prompt is more important")
    call = _call([False, True], tiny_model.module.config.cross_attention_dim)
    out = hook.unet_inputs(call)
    hint = hook.hint(64, 64).expand(2, -1, -1, -1)
    with torch.no_grad():
        down, mid = tiny_model.module(call.x, call.timestep, encoder_hidden_states=call.encoder_hidden_states,
                                      controlnet_cond=hint, return_dict=False)
    n = len(down) + 1
    scales = [0.7 * 0.825 ** (12 - i) for i in range(max(13, n))][:n]
    for got, want, s in zip(out["down_block_additional_residuals"], down, scales):
        torch.testing.assert_close(got, want * s)
    torch.testing.assert_close(out["mid_block_additional_residual"], mid * scales[-1])


def test_controlnet_is_more_important_leaves_the_negative_rows_alone(tiny_model):
    call = _call([False, True, False], tiny_model.module.config.cross_attention_dim)
    out = _hook(tiny_model, control_mode="ControlNet is more important").unet_inputs(call)
    balanced = _hook(tiny_model, control_mode="My prompt is more important").unet_inputs(call)
    for got, ref in zip(out["down_block_additional_residuals"], balanced["down_block_additional_residuals"]):
        assert torch.count_nonzero(got[1]) == 0
        torch.testing.assert_close(got[[0, 2]], ref[[0, 2]])
    assert torch.count_nonzero(out["mid_block_additional_residual"][1]) == 0


def test_inpaint_hint_protocol(tiny_model):
    u = cn.unit_from_dict({"enabled": True, "module": "inpaint"})
    detected = np.full((64, 64, 4), 128, np.uint8)
    detected[:, :, 3] = 0
    detected[:, :32, 3] = 255  # left half masked
    hook = ControlHook(PreparedUnit(0, u, cn.Preprocessor("inpaint"), detected, tiny_model), torch.device("cpu"),
                       torch.float32, False)
    hint = hook.hint(64, 64)
    assert hint.shape == (1, 3, 64, 64)
    assert torch.all(hint[..., :32] == -1)  # masked pixels at -1
    torch.testing.assert_close(hint[..., 32:], torch.full_like(hint[..., 32:], 128 / 255))


# ---- whole requests ------------------------------------------------------------------------------------

def test_a_unit_changes_the_picture_and_weight_zero_does_not(studio):
    plain = _pixels(studio.generate(_req()))
    on = studio.generate(_with([_unit()]))
    assert np.abs(_pixels(on) - plain).mean() > 0.5
    zero = studio.generate(_with([_unit(weight=0.0)]))
    assert np.array_equal(_pixels(zero), plain)
    disabled = studio.generate(_with([_unit(enabled=False)]))
    assert np.array_equal(_pixels(disabled), plain) and len(disabled.images) == 1


def test_two_half_units_equal_one_full_unit(studio):
    one = studio.generate(_with([_unit()]))
    two = studio.generate(_with([_unit(weight=0.5), _unit(weight=0.5)]))
    assert np.array_equal(_pixels(one), _pixels(two))


def test_guidance_end_limits_the_effect(studio):
    plain = _pixels(studio.generate(_req()))
    full = _pixels(studio.generate(_with([_unit()])))
    early = _pixels(studio.generate(_with([_unit(guidance_end=0.25)])))
    assert not np.array_equal(early, plain) and not np.array_equal(early, full)
    late = _pixels(studio.generate(_with([_unit(guidance_start=0.5)])))
    assert not np.array_equal(late, full) and not np.array_equal(late, early)


def test_infotext_detected_map_and_paste_back(studio, cn_root):
    result = studio.generate(_with([_unit(module="canny")]))
    image, detected = result.images
    assert detected.extra and not image.extra
    assert detected.image.size == (64, 64)  # as the ControlNet saw it: at the generation size
    params = infotext.parse(image.infotext)
    hashed = next(line for line in studio.engine.registry.controlnets if line.name == "tiny-canny")
    assert params["ControlNet 0"] == (f"Module: canny, Model: tiny-canny [{hashed.legacy_hash}], Weight: 1.0, "
                                      "Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100.0, "
                                      "Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, "
                                      "Pixel Perfect: False, Control Mode: Balanced")
    req = from_infotext(image.infotext)
    unit = req.alwayson_scripts["ControlNet"]["units"][0]
    assert (unit["module"], unit["processor_res"], unit["enabled"]) == ("canny", 512, True)
    again = studio.generate(req.replace(alwayson_scripts={"ControlNet": {"units": [
        {**unit, "image": _b64(_control_image())}]}}))
    assert np.array_equal(_pixels(again), _pixels(result))


def test_no_detected_map_when_not_asked(studio):
    result = studio.generate(_with([_unit(module="canny", save_detected_map=False)]))
    assert len(result.images) == 1
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 1}
    both = studio.generate(_with([_unit(module="none")], **hires))  # "none": the input as the model sees it
    assert [g.image.size for g in both.images if g.extra] == [(64, 64), (96, 96)]


def test_img2img_unit_without_image_uses_the_init(studio, tmp_path):
    init = tmp_path / "init.png"
    _control_image().save(init)
    base = {"prompt": "a square", "seed": 5, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler", "init_images": [str(init)],
                "denoising_strength": 0.8}
    plain = _pixels(studio.generate(Img2ImgRequest(**base)))
    with_init = studio.generate(Img2ImgRequest(**base, alwayson_scripts={"ControlNet": {"units": [
        {"enabled": True, "module": "none", "model": "tiny-canny"}]}}))
    given = studio.generate(Img2ImgRequest(**base, alwayson_scripts={"ControlNet": {"units": [_unit()]}}))
    assert not np.array_equal(_pixels(with_init), plain)
    assert np.array_equal(_pixels(with_init), _pixels(given))  # the same picture as the unit's own image


def test_hires_options(studio):
    hires = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "denoising_strength": 0.6, "hr_second_pass_steps": 2}
    plain = _pixels(studio.generate(_req(**hires)))
    both = _pixels(studio.generate(_with([_unit()], **hires)))
    low = _pixels(studio.generate(_with([_unit(hr_option="Low res only")], **hires)))
    high = _pixels(studio.generate(_with([_unit(hr_option="High res only")], **hires)))
    assert both.shape == (96, 96, 3)
    assert len({a.tobytes() for a in (plain, both, low, high)}) == 4


def test_low_vram_unit_gives_the_same_picture(studio):
    normal = _pixels(studio.generate(_with([_unit()])))
    low = _pixels(studio.generate(_with([_unit(low_vram=True)])))
    assert np.array_equal(normal, low)


def test_errors_name_the_unit(studio):
    with pytest.raises(RequestError, match="unit 0: no control image"):
        studio.generate(_with([{"enabled": True, "module": "none", "model": "tiny-canny"}]))
    with pytest.raises(RequestError, match="no ControlNet model chosen"):
        studio.generate(_with([_unit(model="None")]))
    with pytest.raises(ModelNotFoundError, match="no ControlNet model named 'no-such-model'; available: .*tiny-canny"):
        studio.generate(_with([_unit(model="no-such-model")]))
    with pytest.raises(RequestError, match="unknown preprocessor"):
        studio.generate(_with([_unit(module="no_such_module")]))
    with pytest.raises(RequestError, match="not valid base64|not an image"):
        studio.generate(_with([_unit(image="!!!")]))
    with pytest.raises(HookError, match="^ControlNet unit 0: the ControlNet tiny-xl .* another model family") as info:
        studio.generate(_with([_unit(model="tiny-xl")]))
    assert http_status(info.value) == 422  # the user's choice, not a failure of the code


def test_model_lookup_rules(studio):
    reg = studio.engine.registry
    canny = reg.controlnet("tiny-canny")
    assert reg.controlnet(f"tiny-canny [{canny.legacy_hash}]").path == canny.path
    assert reg.controlnet("TINY-CANNY").path == canny.path
    assert reg.controlnet("can").path == canny.path  # the shortest name containing it


def test_xyz_weight_axis(studio):
    req = _with([_unit()]).replace(script_name="X/Y/Z plot", script_args={
        "x_type": "[ControlNet] Weight", "x_values": "0, 1", "include_lone_images": True})
    result = studio.generate(req)
    cells = [g for g in result.images if not g.grid]
    assert len(cells) >= 2
    plain = _pixels(studio.generate(_req()))
    assert np.array_equal(np.asarray(cells[0].image, dtype=np.int16), plain)
    assert not np.array_equal(np.asarray(cells[1].image, dtype=np.int16), plain)


@pytest.mark.parametrize("axis, values, field", [("[ControlNet] Preprocessor", ("none", "invert"), "module"),
                                                 ("[ControlNet] Model", ("tiny-canny", "tiny-other"), "model"),
                                                 ("[ControlNet] Guidance Start", (0.0, 0.75), "guidance_start")])
def test_xyz_model_preprocessor_and_guidance_start_axes(studio, axis, values, field):
    """Each cell is the picture of a request whose first unit has that value, run on its own."""
    req = _with([_unit()]).replace(script_name="X/Y/Z plot", script_args={
        "x_type": axis, "x_values": ", ".join(str(v) for v in values), "include_lone_images": True})
    cells = [g for g in studio.generate(req).images if not g.grid and not g.extra]  # (not the detected maps)
    assert len(cells) == 2
    alone = [_pixels(studio.generate(_with([_unit(**{field: v})]))) for v in values]
    assert not np.array_equal(alone[0], alone[1])  # the two values make two pictures
    for cell, expected in zip(cells, alone):
        assert np.array_equal(np.asarray(cell.image, dtype=np.int16), expected)


def test_an_inpaint_unit_without_image_takes_the_requests_mask(studio, tmp_path):
    """img2img inpaint: a unit with no image of its own takes the init image and the request's mask
    (inverted with "Inpaint not masked"), the same as the unit given that image and mask itself."""
    init, mask_file = tmp_path / "init.png", tmp_path / "mask.png"
    _control_image().save(init)
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((32, 0, 63, 63), fill=255)
    mask.save(mask_file)
    base = {"prompt": "a square", "seed": 5, "steps": 4, "width": 64, "height": 64, "sampler_name": "Euler",
            "init_images": [str(init)], "mask": str(mask_file), "denoising_strength": 0.9}
    bare = {"enabled": True, "module": "inpaint_only", "model": "tiny-canny"}

    def run(unit: dict, invert: int) -> np.ndarray:
        return _pixels(studio.generate(Img2ImgRequest(**base, inpainting_mask_invert=invert,
                                                      alwayson_scripts={"ControlNet": {"units": [unit]}})))

    inverted = ImageOps.invert(mask)
    for invert, meant, other in ((0, mask, inverted), (1, inverted, mask)):
        given = {**bare, "image": _b64(_control_image())}
        from_request = run(bare, invert)
        assert np.array_equal(from_request, run({**given, "mask": _b64(meant)}, invert))
        assert not np.array_equal(from_request, run({**given, "mask": _b64(other)}, invert))


@pytest.mark.skipif(not os.path.exists("models/ControlNet/sdstudio-demo-canny.safetensors"),
                    reason="the demo ControlNet is not trained yet")
def test_demo_controlnet_loads():
    model = load_control_model("models/ControlNet/sdstudio-demo-canny.safetensors")
    assert model.spec.kind == "controlnet"


def test_inpaint_only_pastes_the_unmasked_input_back(studio):
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((40, 0, 63, 63), fill=255)  # the right part is repainted
    result = studio.generate(_with([_unit(module="inpaint_only", image=_b64(source), mask=_b64(mask))]))
    out = np.asarray(result.images[0].image, dtype=np.int16)
    assert np.abs(out[:, :28] - np.array([200, 30, 30])).max() <= 1  # well outside the seam: the input itself
    plain = _pixels(studio.generate(_with([_unit(module="inpaint", image=_b64(source), mask=_b64(mask))])))
    assert np.abs(plain[:, :28] - np.array([200, 30, 30])).max() > 5  # plain inpaint does not paste back
    unmasked = studio.generate(_with([_unit(module="inpaint_only", image=_b64(source))]))  # no mask: all kept
    assert np.abs(_pixels(unmasked) - np.array([200, 30, 30])).max() <= 1


def test_inpaint_only_lama_fills_the_hole_then_works_as_inpaint_only(studio, cn_root):
    from test_annotators_lama import checkpoint

    folder = cn_root / "models" / "ControlNet" / "annotators" / "lama"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint(1, seed=9)[1], folder / "ControlNetLama.pth")
    source = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((40, 0, 63, 63), fill=255)
    units = [_unit(module="inpaint_only+lama", image=_b64(source), mask=_b64(mask))]
    result = studio.generate(_with(units))
    out = np.asarray(result.images[0].image, dtype=np.int16)
    assert np.abs(out[:, :28] - np.array([200, 30, 30])).max() <= 1  # pasted back, as inpaint_only
    plain = _pixels(studio.generate(_with([_unit(module="inpaint_only", image=_b64(source), mask=_b64(mask))])))
    assert np.abs(out[:, 44:] - plain[:, 44:]).max() > 0  # it started from LaMa's fill (the hint masks the hole)
    wide = studio.generate(_with([{**units[0], "resize_mode": "Resize and Fill"}], width=96))  # outpainting
    assert wide.images[0].image.size == (96, 64)
    from sdstudio.engine.controlnet import _outpaint_canvas

    rgb, hole = _outpaint_canvas(np.asarray(source), np.asarray(mask), _req(width=96, enable_hr=True, hr_scale=2))
    assert rgb.shape == (128, 192, 3) and (hole[:, :32] == 255).all() and (hole[:, -32:] == 255).all()
    assert (hole[:, 32:112] == 0).all() and (hole[:, 112:160] == 255).all()  # the given mask, scaled, plus the border


def test_the_inpaint_only_hook_pulls_the_unmasked_latent_and_lama_starts_from_its_fill():
    from sdstudio.engine.controlnet import InpaintOnlyHook, PreparedUnit
    from sdstudio.engine.schedules import DiscreteSchedule

    detected = np.zeros((64, 64, 4), np.uint8)
    detected[:, :, :3] = 100
    detected[:, 32:, 3] = 255  # the right half masked
    shapes = []

    def encode(rgb):  # the VAE's part: a latent of 0.5 everywhere, an eighth of the size
        shapes.append(rgb.shape)
        return torch.full((1, 4, rgb.shape[0] // 8, rgb.shape[1] // 8), 0.5)

    alphas = DiscreteSchedule().alphas_cumprod
    for module in ("inpaint_only", "inpaint_only+lama"):
        unit = cn.ControlUnit(enabled=True, module=module, weight=0.6, resize_mode="Just Resize")
        hook = InpaintOnlyHook(PreparedUnit(0, unit, cn.Preprocessor(module), detected, None), encode, alphas, False)
        d = torch.full((4, 8, 8), -1.0)
        out = hook.after_cfg(None, d)
        # the mask max-pooled by 10×10 windows at stride 8 (padding 1): latent columns 0-2 are unmasked
        torch.testing.assert_close(out[:, :, :3], torch.full((4, 8, 3), 0.6 * 0.5 + 0.4 * -1.0))
        assert (out[:, :, 3:] == -1.0).all()  # the masked part is the model's
        noise = torch.randn(1, 4, 8, 8)
        started = hook.initial_noise(noise, "first")
        if module == "inpaint_only":
            assert started is noise
        else:  # the latent at timestep 999 of the filled picture, in unit-noise terms
            a = float(alphas[999])
            torch.testing.assert_close(started, a ** 0.5 * 0.5 + (1 - a) ** 0.5 * noise)
            assert hook.initial_noise(noise, "hires") is noise
    assert shapes == [(64, 64, 3)] * 2  # encoded once per unit and size


@pytest.mark.parametrize("model", ["t2iadapter_tiny_sd14v1", "tiny-control-lora"])
def test_t2i_adapters_and_control_loras_run_as_units(studio, model):
    plain = _pixels(studio.generate(_req()))
    on = _pixels(studio.generate(_with([_unit(model=model)])))
    assert np.abs(on - plain).mean() > 0.2
    assert np.array_equal(_pixels(studio.generate(_with([_unit(model=model, weight=0.0)]))), plain)


def test_an_sdxl_controlnet_on_an_sdxl_checkpoint(make_data_root, cn_root):
    root = make_data_root("controlnet-xl", {"tiny-sdxl": "sdxl"})
    (root / "models" / "ControlNet").mkdir()
    os.link(cn_root / "models" / "ControlNet" / "tiny-xl.safetensors", root / "models" / "ControlNet" / "tiny-xl.safetensors")
    xl = Studio(Engine(Paths(root)))
    plain = _pixels(xl.generate(_req(steps=2)))
    on = _pixels(xl.generate(_with([_unit(model="tiny-xl")], steps=2)))
    assert np.abs(on - plain).mean() > 0.2


def test_ip_adapter_and_reference_units(studio):
    plain = _pixels(studio.generate(_req()))
    picture = _b64(Image.new("RGB", (64, 64), (20, 200, 40)))
    ip = studio.generate(_with([_unit(module="ip-adapter_clip_sd15", model="ip-adapter_tiny", image=picture)]))
    assert np.abs(_pixels(ip) - plain).mean() > 0.2 and len(ip.images) == 1  # no map for an image prompt
    assert "Model: ip-adapter_tiny [" in infotext.parse(ip.images[0].infotext)["ControlNet 0"]
    zero = studio.generate(_with([_unit(module="ip-adapter_clip_sd15", model="ip-adapter_tiny", image=picture,
                                        weight=0.0)]))
    assert np.array_equal(_pixels(zero), plain)
    ref = studio.generate(_with([_unit(module="reference_only", model="None", image=picture)]))
    assert np.abs(_pixels(ref) - plain).mean() > 0.2
    assert "Module: reference_only, Model: None" in infotext.parse(ref.images[0].infotext)["ControlNet 0"]
    adain = _pixels(studio.generate(_with([_unit(module="reference_adain", model="None", image=picture)])))
    assert not np.array_equal(adain, _pixels(ref))
