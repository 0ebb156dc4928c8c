"""ControlNet-LLLite (sdstudio.models.lllite, sdstudio.engine.lllite): detection and strict loading of the published
layout, the depth read from the shapes, one module against a direct computation, the projection inputs nudged by
exactly weight × module(x) inside the window (not outside it, not in Hires. fix, hooks gone after the pass), the
layer names mapped onto diffusers' UNet, and a whole request on the tiny SDXL checkpoint."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from sdstudio.core.controlnet import ControlNetError
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine import lllite as ll
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import SamplingPlan, Step, UNetCall
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.models import lllite as files
from sdstudio.models.controlnet import detect_control_file, load_control_model
from sdstudio.models.errors import ModelFileError
from sdstudio.scripts import Studio
from sdstudio.testing.controlnet_files import lllite_layers, lllite_state, write_lllite
from sdstudio.testing.synthetic import tiny_unet

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def unet():
    return tiny_unet("sdxl", seed=2)


@pytest.fixture(scope="module")
def lllite_file(tmp_path_factory, unet):
    return write_lllite(tmp_path_factory.mktemp("lllite") / "kohya_controllllite_xl_tiny.safetensors", unet, seed=1)


def test_detected_and_loaded_strictly(lllite_file, tmp_path, unet):
    spec = detect_control_file(lllite_file)
    assert (spec.kind, spec.base, spec.describe()) == ("lllite", "sdxl", "SDXL ControlNet-LLLite")
    model = load_control_model(lllite_file)
    assert len(model.module) == len(lllite_layers(unet)) == 44
    for depth in (1, 2, 3):
        state = lllite_state({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": 128}, depth=depth)
        assert files.build({k: tuple(v.shape) for k, v in state.items()})[
            "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"].depth == depth
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file(lllite_state({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn9_to_q": 128}), str(bad))
    with pytest.raises(ModelFileError, match="bad.safetensors: LLLite module .*attn9.* does not name an attention"):
        load_control_model(bad)


def test_one_module_against_a_direct_computation():
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    state = lllite_state({name: 32}, depth=3, cond_emb_dim=8, mlp_dim=6, seed=4)
    module = files.build({k: tuple(v.shape) for k, v in state.items()})[name]
    module.load_state_dict({k.split(".", 1)[1]: v for k, v in state.items()})
    w = {k.split(".", 1)[1]: v for k, v in state.items()}
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    c = F.conv2d(image, w["conditioning1.0.weight"], w["conditioning1.0.bias"], stride=4)
    c = F.conv2d(F.relu(c), w["conditioning1.2.weight"], w["conditioning1.2.bias"], stride=4)
    c = F.conv2d(F.relu(c), w["conditioning1.4.weight"], w["conditioning1.4.bias"], stride=2)  # 64 -> 2
    c = F.interpolate(c, (4, 4), mode="nearest-exact").flatten(2).transpose(1, 2)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(2))
    down = F.relu(F.linear(x, w["down.0.weight"], w["down.0.bias"]))
    mid = F.relu(F.linear(torch.cat([c.expand(2, -1, -1), down], dim=2), w["mid.0.weight"], w["mid.0.bias"]))
    expected = F.linear(mid, w["up.0.weight"], w["up.0.bias"])
    with torch.no_grad():
        got = module(x, module.condition(image, (4, 4)))
    assert torch.allclose(got, expected, atol=1e-5)


def test_layer_names_map_onto_the_diffusers_unet(unet):
    assert ll.projection_path("lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 2) == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert ll.projection_path("lllite_unet_middle_block_1_transformer_blocks_1_attn2_to_q", 2) == \
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_q"
    assert ll.projection_path("lllite_unet_output_blocks_2_1_transformer_blocks_0_attn1_to_out_0", 2) == \
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0"
    for name in lllite_layers(unet):
        unet.get_submodule(ll.projection_path(name, 2))  # every one exists


def _call(step=0, pass_name="first"):
    g = torch.Generator().manual_seed(5)
    added = {"text_embeds": torch.randn(2, 128, generator=g), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    return UNetCall(torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 600.0), torch.randn(2, 6, 192, generator=g),
                    [0, 0], [False, True], Step(step, 10, torch.ones(2), pass_name), added)


def _hint():
    return torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _run(unet, hooks, call, record: str | None = None):
    plan = SamplingPlan(unet, DiscreteSchedule(), "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=hooks)
    seen = []
    handle = unet.get_submodule(record).register_forward_hook(lambda m, a, o: seen.append(a[0])) if record else None
    try:
        with plan.applied(), torch.no_grad():
            plan.unet_inputs(call)
            out = unet(call.x, call.timestep, encoder_hidden_states=call.encoder_hidden_states,
                       added_cond_kwargs=call.added_cond_kwargs).sample
    finally:
        if handle is not None:
            handle.remove()
    return out, seen


def test_the_projections_see_the_nudge_in_the_window_only(unet, lllite_file):
    model = load_control_model(lllite_file).module
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = ll.projection_path(name, 2)

    def unit(weight=0.7, start=0.0, end=0.5):
        return ll.LLLiteUnit(0, model, _hint() * 2 - 1, weight, start, end)

    def hook(*units):
        return ll.LLLiteHook(list(units) or [unit()], CPU, torch.float32)

    bare, bare_inputs = _run(unet, [], _call(), path)
    on, on_inputs = _run(unet, [hook()], _call(), path)
    assert not torch.allclose(on, bare, atol=1e-4)
    # the first projection's input: the bare input plus weight x the module's nudge (8x8 latent, 4x4 at level 2)
    with torch.no_grad():
        cond = model[name].condition(_hint() * 2 - 1, (4, 4))
        expected = bare_inputs[0] + 0.7 * model[name](bare_inputs[0], cond)
    assert torch.allclose(on_inputs[0], expected, atol=1e-5)
    for silent in (hook(unit(weight=0.0)), hook(unit(start=0.5, end=1.0))):
        assert torch.equal(_run(unet, [silent], _call())[0], bare)
    assert torch.equal(_run(unet, [hook()], _call(pass_name="hires"))[0], bare)  # not in Hires. fix's pass
    assert torch.equal(_run(unet, [], _call())[0], bare)  # the hooks are gone after the pass
    two = _run(unet, [hook(unit(weight=0.35), unit(weight=0.35))], _call(), path)[1]
    assert torch.allclose(two[0], expected, atol=1e-4)  # several units add up


def test_an_sd1_unet_is_refused_naming_the_layer(lllite_file):
    model = load_control_model(lllite_file).module
    hook = ll.LLLiteHook([ll.LLLiteUnit(1, model, _hint(), 1.0, 0.0, 1.0)], CPU, torch.float32)
    with pytest.raises(ControlNetError, match="unit 1: the LLLite (model's layer|module) .*"), \
            hook.applied(tiny_unet("sd1")):
        pass


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_request_on_the_tiny_sdxl_checkpoint(make_data_root, lllite_file):
    root = make_data_root("lllite-requests", {"tiny-sdxl": "sdxl"})
    (root / "models" / "ControlNet").mkdir()
    (root / "models" / "ControlNet" / "kohya_controllllite_xl_tiny.safetensors").write_bytes(lllite_file.read_bytes())
    studio = Studio(Engine(Paths(root)))
    im = Image.new("RGB", (64, 64), "black")
    ImageDraw.Draw(im).ellipse((10, 10, 54, 54), outline="white", width=3)
    unit = {"enabled": True, "module": "none", "model": "kohya_controllllite_xl_tiny", "image": _b64(im)}
    base = {"prompt": "a circle", "seed": 3, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}
    plain = np.asarray(studio.generate(Txt2ImgRequest(**base)).images[0].image, np.float32)
    result = studio.generate(Txt2ImgRequest(**base, alwayson_scripts={"ControlNet": {"units": [unit]}}))
    assert np.abs(np.asarray(result.images[0].image, np.float32) - plain).mean() > 0.2
    assert len(result.images) == 2  # the detected map comes back, as for any ControlNet
