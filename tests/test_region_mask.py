"""The extension's effective_region_mask: the unit's field, the residuals and IP-Adapter attention scaled by the
mask at each layer's size (an all-ones mask changes nothing, an all-zeros one removes the unit), diffusers'
IP-Adapter attention as the regional path's reference, and the kinds that refuse it."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from sdstudio.core import controlnet as cn
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine import ip_adapter as ipa
from sdstudio.engine.controlnet import in_region
from sdstudio.models import ip_adapter as files
from sdstudio.testing.ip_adapter_files import tiny_clip_vision, write_ip_adapter
from sdstudio.testing.synthetic import tiny_unet

torch.set_num_threads(1)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _mask(kind: str, size: int = 64) -> str:
    if kind in ("ones", "zeros"):
        return _b64(Image.new("RGB", (size, size), "white" if kind == "ones" else "black"))
    im = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(im).rectangle((0, 0, size // 2 - 1, size - 1), fill="white")  # the left half
    return _b64(im)


def test_the_units_field():
    unit = cn.unit_from_dict({"enabled": True, "effective_region_mask": _mask("half")})
    assert unit.effective_region_mask and cn.unit_from_dict(unit.to_dict()) == unit
    assert "Region" not in unit.infotext()
    with pytest.raises(cn.ControlNetError, match="unit 1.effective_region_mask: expected a base64-encoded image"):
        cn.unit_from_dict({"effective_region_mask": [1, 2]}, 1)


def test_in_region_is_the_bilinear_mask_times_the_tensor():
    region = torch.zeros(1, 1, 8, 8)
    region[..., :4] = 1.0
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    expected = x * torch.nn.functional.interpolate(region, size=(4, 4), mode="bilinear")
    assert torch.equal(in_region(x, region), expected) and torch.equal(in_region(x, None), x)
    assert torch.equal(in_region(x, region)[..., 2:], torch.zeros(2, 3, 4, 2))


# ---- IP-Adapter attention ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    path = write_ip_adapter(tmp_path_factory.mktemp("region") / "ip-adapter_sd15.safetensors", "plain", seed=1)
    return files.load_ip_adapter(path)


def _layer_output(unet, adapter, region, weight=1.0):
    layer = ipa.cross_attention_layers(unet)[0]
    prompt = ipa.image_prompt(adapter, tiny_clip_vision(0), np.full((64, 64, 3), 120, np.uint8))
    prompt.region = region
    prompt.begin_call([False, True], True, (16, 16))
    proc = ipa.ImagePromptAttnProcessor(adapter.spec.widths[0], adapter.spec.cross_attention_dim, [prompt], [weight],
                                        [adapter.to_k[0]], [adapter.to_v[0]])
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 256, layer.attn.to_q.in_features, generator=g)  # 16x16 positions
    context = torch.randn(2, 8, layer.attn.to_k.in_features, generator=g)
    with torch.no_grad():
        return proc(layer.attn, hidden, context)


def test_the_regional_attention_path_against_diffusers(adapter):
    unet = tiny_unet("sd1")
    plain = _layer_output(unet, adapter, None)  # diffusers' IPAdapterAttnProcessor2_0
    ones = _layer_output(unet, adapter, torch.ones(1, 1, 64, 64))
    assert torch.allclose(ones, plain, atol=1e-5)
    off = _layer_output(unet, adapter, None, weight=0.0)
    zeros = _layer_output(unet, adapter, torch.zeros(1, 1, 64, 64))
    assert torch.allclose(zeros, off, atol=1e-5)
    left = torch.zeros(1, 1, 64, 64)
    left[..., :32] = 1.0
    half = _layer_output(unet, adapter, left).reshape(2, 16, 16, -1)
    assert torch.allclose(half[:, :, :8], plain.reshape(2, 16, 16, -1)[:, :, :8], atol=1e-5)
    assert torch.allclose(half[:, :, 8:], off.reshape(2, 16, 16, -1)[:, :, 8:], atol=1e-5)


# ---- whole requests ----------------------------------------------------------------------------------------
def _edges() -> str:
    im = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(im).rectangle((16, 16, 48, 48), outline="white", width=2)
    return _b64(im)


def _pixels(studio, units=()) -> np.ndarray:
    args = {"prompt": "a square", "seed": 4, "steps": 3, "width": 64, "height": 64, "sampler_name": "Euler"}
    if units:
        args["alwayson_scripts"] = {"ControlNet": {"units": list(units)}}
    return np.asarray(studio.generate(Txt2ImgRequest(**args)).images[0].image.convert("RGB"), np.int16)


@pytest.mark.parametrize("unit", [
    {"module": "none", "model": "tiny-canny", "image": None},
    {"module": "ip-adapter_clip_sd15", "model": "ip-adapter_tiny", "image": None},
], ids=["controlnet", "ip-adapter"])
def test_requests_with_a_region(controlnet_studio, unit):
    studio = controlnet_studio
    unit = {**unit, "enabled": True, "image": _edges()}
    plain, on = _pixels(studio), _pixels(studio, [unit])
    assert np.abs(on - plain).mean() > 0.2
    assert np.array_equal(_pixels(studio, [{**unit, "effective_region_mask": _mask("ones")}]), on)
    assert np.array_equal(_pixels(studio, [{**unit, "effective_region_mask": _mask("zeros")}]), plain)
    half = _pixels(studio, [{**unit, "effective_region_mask": _mask("half")}])
    assert not np.array_equal(half, on) and not np.array_equal(half, plain)


def test_kinds_without_regions_refuse_one(controlnet_studio):
    studio = controlnet_studio
    unit = {"enabled": True, "module": "reference_only", "model": "None", "image": _edges(),
            "effective_region_mask": _mask("half")}
    with pytest.raises(cn.ControlNetError, match="unit 0: effective_region_mask works with ControlNet, T2I-Adapter "
                                                 "and IP-Adapter units, not with reference_only"):
        _pixels(studio, [unit])
