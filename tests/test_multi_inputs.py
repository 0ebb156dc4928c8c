"""The extension's Multi-Inputs: a unit's image as a list of {image, mask}. The unit keeps them all (the first as
image/mask, the rest as more_images), an IP-Adapter unit averages the images' tokens as the extension does,
and other units refuse several images by name instead of silently using the first."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core import controlnet as cn
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine import ip_adapter as ipa
from sdstudio.engine.controlnet import PreparedUnit
from sdstudio.models import ip_adapter as files
from sdstudio.testing.ip_adapter_files import tiny_clip_vision, write_clip_vision, write_ip_adapter

torch.set_num_threads(1)


def _b64(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_the_unit_keeps_every_image():
    red, green, blue = _b64("red"), _b64("green"), _b64("blue")
    unit = cn.unit_from_dict({"image": [{"image": red, "mask": None}, {"image": green}, {"image": blue, "mask": red}]})
    assert unit.image == red and unit.more_images == ((green, None), (blue, red))
    assert cn.unit_from_dict(unit.to_dict()) == unit  # a queued job keeps them
    assert cn.ControlUnit().to_dict()["more_images"] == []
    with pytest.raises(cn.ControlNetError, match=r"unit 3.image\[1\]: expected \{\"image\": base64"):
        cn.unit_from_dict({"image": [{"image": red}, {"mask": red}]}, 3)


def test_an_ip_adapter_unit_averages_the_images_tokens(tmp_path):
    path = write_ip_adapter(tmp_path / "ip-adapter_sd15.safetensors", "plain", seed=1)
    write_clip_vision(tmp_path / "clip_vision" / "clip_h.pth", seed=0)
    pictures = [np.full((64, 64, 3), c, np.uint8) for c in (30, 140, 250)]
    unit = cn.ControlUnit(enabled=True, module="ip-adapter_clip_sd15", model="ip-adapter_sd15")
    prepared = PreparedUnit(0, unit, cn.Preprocessor("ip-adapter_clip_sd15"), pictures[0], None, more=tuple(pictures[1:]))
    hook = ipa.ip_adapter_hook(prepared, path, tmp_path / "clip_vision", torch.device("cpu"), torch.float32)
    model, encoder = files.load_ip_adapter(path), tiny_clip_vision(0)
    each = [ipa.image_prompt(model, encoder, p) for p in pictures]
    assert torch.allclose(hook.prompt.cond, sum(p.cond for p in each) / 3, atol=1e-5)
    assert torch.allclose(hook.prompt.uncond, sum(p.uncond for p in each) / 3, atol=1e-5)


def _pixels(studio, unit) -> np.ndarray:
    req = Txt2ImgRequest(prompt="a cat", seed=2, steps=2, width=64, height=64, sampler_name="Euler",
                         alwayson_scripts={"ControlNet": {"units": [unit]}})
    return np.asarray(studio.generate(req).images[0].image.convert("RGB"), np.int16)


def test_requests_with_several_images(controlnet_studio):
    studio = controlnet_studio
    ip = {"enabled": True, "module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny"}
    one = _pixels(studio, {**ip, "image": _b64("red")})
    two = _pixels(studio, {**ip, "image": [{"image": _b64("red")}, {"image": _b64("blue")}]})
    same = _pixels(studio, {**ip, "image": [{"image": _b64("red")}, {"image": _b64("red")}]})
    assert not np.array_equal(one, two) and np.abs(same - one).max() <= 1  # the mean of one picture twice
    with pytest.raises(cn.ControlNetError, match="unit 0: several images .* are for IP-Adapter units; for none, give "
                                                 "one unit per image"):
        _pixels(studio, {"enabled": True, "module": "none", "model": "tiny-canny",
                         "image": [{"image": _b64("red")}, {"image": _b64("blue")}]})


def test_merge_mode_unfolds_a_controlnet_unit_per_picture(controlnet_studio):
    studio = controlnet_studio
    red, blue = _b64("red"), _b64("blue")
    base = {"enabled": True, "module": "none", "model": "tiny-canny", "weight": 0.9, "input_mode": "merge",
            "image": [{"image": red}, {"image": blue}]}
    units = cn.units_from([base])
    assert [(u.image, u.weight, u.input_mode) for u in units] == [(red, 0.45, "simple"), (blue, 0.45, "simple")]
    ip = cn.units_from([{**base, "module": "ip-adapter_clip_sd15"}])
    assert len(ip) == 1 and ip[0].more_images == ((blue, None),) and ip[0].weight == 0.9  # averaged in the hook
    merged = _pixels(studio, base)
    halves = Txt2ImgRequest(prompt="a cat", seed=2, steps=2, width=64, height=64, sampler_name="Euler",
                            alwayson_scripts={"ControlNet": {"units": [
                                {**base, "input_mode": "simple", "image": red, "weight": 0.45},
                                {**base, "input_mode": "simple", "image": blue, "weight": 0.45}]}})
    result = studio.generate(halves)
    assert np.array_equal(merged, np.asarray(result.images[0].image.convert("RGB"), np.int16))
    assert "ControlNet 1" in result.images[0].infotext  # two units numbered, as the extension writes them


def test_pickled_ip_adapter_inputs_are_refused_not_ignored():
    with pytest.raises(cn.ControlNetError, match="unit 2.ipadapter_input: not read .* a torch pickle"):
        cn.unit_from_dict({"module": "ip-adapter_clip_sd15", "ipadapter_input": ["gASVAAAA"]}, 2)
    assert cn.unit_from_dict({"ipadapter_input": None}).module == "none"
