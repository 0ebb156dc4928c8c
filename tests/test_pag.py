"""Perturbed-Attention Guidance (sdstudio/scripts/pag.py) against diffusers' own PAG attention processor and
the formula Forge's built-in script applies, and through whole requests on the tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import PAGIdentitySelfAttnProcessor2_0

from sdstudio.core import infotext
from sdstudio.core.params import Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.core.scripts import builtin
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import Guidance, Step, UNetCall
from sdstudio.scripts import Studio
from sdstudio.scripts.pag import MIDDLE_SELF_ATTENTION, PAG, PAG_NAME
from sdstudio.testing.synthetic import unet_config


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(3)
    return UNet2DConditionModel(**unet_config("sd1", "tiny")).eval()


def hook(**args):
    (h,) = PAG.hooks(builtin().parse(PAG_NAME, {"enabled": True, **args}), None)
    return h


def test_the_degraded_prediction_and_the_guidance_are_pags(unet):
    torch.manual_seed(4)
    x, t, text = torch.randn(1, 4, 16, 16), torch.tensor([400]), torch.randn(1, 7, 64)
    # diffusers' PAG processor on the same layer: the second half of its batch is the perturbed branch
    reference = dict(unet.attn_processors)
    unet.set_attn_processor({**reference, MIDDLE_SELF_ATTENTION: PAGIdentitySelfAttnProcessor2_0()})  # (it pops)
    with torch.no_grad():
        expected_eps = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text, text])
                            ).sample[1:]
    unet.set_attn_processor(dict(reference))
    with torch.no_grad():
        plain_eps = unet(x, t, encoder_hidden_states=text).sample
    assert (expected_eps - plain_eps).abs().max() > 1e-4  # the perturbation changes the prediction

    h = hook(scale=2.5, start_step=0.0, end_step=1.0)
    sigma = torch.tensor(3.0)
    step = Step(0, 4, sigma.reshape(1))
    with torch.no_grad(), h.applied(unet):
        h.unet_inputs(UNetCall(x, t, text, [0], [False], step))
        cond = torch.randn(4, 16, 16)
        guidance = Guidance(x[0], sigma, torch.randn(4, 16, 16), [(cond, 1.0)], 7.0, step, 0,
                            lambda out: x[0] - out.float() * sigma)
        guided = torch.randn(4, 16, 16)
        out = h.after_cfg(guidance, guided)
    degraded = x[0] - expected_eps[0].float() * sigma
    assert torch.allclose(out, guided + (cond - degraded) * 2.5, atol=1e-5)
    assert unet.attn_processors[MIDDLE_SELF_ATTENTION].__class__ is reference[MIDDLE_SELF_ATTENTION].__class__


def test_window_and_attenuation_as_forge_counts_them(unet):
    h = hook(start_step=0.25, end_step=0.75)
    assert [h.active(Step(i, 5, torch.ones(1))) for i in range(5)] == [False, True, True, True, False]  # i / 4
    h = hook(scale=4.0, attenuation=25.0)
    x = torch.zeros(1, 4, 8, 8)
    with torch.no_grad(), h.applied(unet):
        scales = []
        for _ in range(5):
            h.unet_inputs(UNetCall(x, torch.tensor([500]), torch.zeros(1, 7, 64), [0], [False], Step(1, 4, torch.ones(1))))
            g = Guidance(x[0], torch.tensor(1.0), x[0], [(x[0], 1.0)], 7.0, Step(1, 4, torch.ones(1)), 0,
                         lambda out: -out.float())
            h.after_cfg(g, x[0])
            scales.append(h.scale)
    assert scales == [4.0, 3.0, 2.0, 1.0, 0.0]  # 25 % of the scale less at each call


# 256²: the tiny UNet's middle block sees 4x4 tokens (at 64² one token, whose self-attention is the identity)
BASE = {"prompt": "a red circle", "steps": 4, "width": 256, "height": 256, "seed": 8, "sampler_name": "Euler",
        "cfg_scale": 4.0}


def test_pag_in_whole_requests(make_data_root):
    studio = Studio(Engine(Paths(make_data_root("pag"))))

    def px(result):
        return np.asarray(result.images[0].image).astype(int)

    plain = studio.generate(Txt2ImgRequest(**BASE))
    zero = studio.generate(Txt2ImgRequest(**BASE, alwayson_scripts={"pag": {"scale": 0.0}}))
    on = studio.generate(Txt2ImgRequest(**BASE, alwayson_scripts={"pag": {"scale": 3.0, "start_step": 0.0}}))
    assert np.array_equal(px(plain), px(zero)) and not np.array_equal(px(plain), px(on))
    fields = infotext.parse(on.images[0].infotext)
    assert fields["pagi_enabled"] == "True" and fields["pagi_scale"] == "3" and fields["pagi_start_step"] == "0"
    again = studio.generate(from_infotext(on.images[0].infotext))
    assert np.array_equal(px(again), px(on))
    positional = builtin().from_a1111_list(PAG_NAME, [True, 2.0, 10.0, 0.1, 0.9])
    assert positional == {"enabled": True, "scale": 2.0, "attenuation": 10.0, "start_step": 0.1, "end_step": 0.9}
