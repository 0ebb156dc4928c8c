"""The T2I style adapter (sdstudio.models.t2i_style, sdstudio.engine.t2i_style): detection of the published
layout and shapes, strict loading, the forward pass against a direct computation, the tokens appended to the
prompt's rows (zeros for the negative prompt's), windows and stacking, the pairing with t2ia_style_clipvision,
the clip_vitl file and whole requests on the tiny checkpoint."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core import infotext
from sdstudio.core.controlnet import ControlNetError
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine import t2i_style as ts
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import SamplingPlan, Step, UNetCall
from sdstudio.engine.preprocessors import builtin
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.models.controlnet import detect_control, load_control_model
from sdstudio.models.errors import ModelFileError
from sdstudio.models.ip_adapter import clip_features, clip_pixels
from sdstudio.models.t2i_style import heads_for
from sdstudio.scripts import Studio
from sdstudio.testing.controlnet_files import t2i_style_state, write_controlnet, write_t2i_style
from sdstudio.testing.ip_adapter_files import tiny_clip_vision, write_clip_vision

torch.set_num_threads(1)
CPU = torch.device("cpu")


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


# ---- files ---------------------------------------------------------------------------------------------------
def test_published_shapes_are_detected():
    spec = detect_control(_shapes(t2i_style_state(1024, 768, 3, 8)))
    assert (spec.kind, spec.base, spec.layout) == ("t2i_style", "sd1", "tencentarc_style")
    assert spec.config == {"width": 1024, "context_dim": 768, "heads": 8, "layers": 3, "tokens": 8}
    assert spec.describe() == "SD 1.x T2I style adapter"
    assert heads_for(1024) == 8 and heads_for(256) == 2 and heads_for(64) == 1


def test_loads_strictly_and_names_bad_files(tmp_path):
    path = write_t2i_style(tmp_path / "t2iadapter_style_tiny.pth", seed=1)
    model = load_control_model(path)
    assert model.spec.kind == "t2i_style" and model.module.tokens == 4
    state = model.module.state_dict()
    for k, v in t2i_style_state(seed=1).items():
        assert torch.equal(state[k], v)
    broken = t2i_style_state(seed=1)
    del broken["transformer_layes.1.mlp.c_fc.bias"]
    write = tmp_path / "broken.pth"
    torch.save(broken, write)
    with pytest.raises(ModelFileError, match="broken.pth: missing 1 tensor.*transformer_layes.1.mlp.c_fc.bias"):
        load_control_model(write)
    wrong = t2i_style_state(seed=1) | {"proj": torch.zeros(64, 64)}
    torch.save(wrong, write)
    with pytest.raises(ModelFileError, match="proj is \\(64, 64\\), its first size must be the width 128"):
        load_control_model(write)


def _direct_forward(state, hidden: torch.Tensor, heads: int) -> torch.Tensor:
    """The adapter written out: append the style tokens, LayerNorm, pre-norm attention + QuickGELU MLP blocks,
    LayerNorm of the last tokens, projection."""
    def ln(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    tokens = state["style_embedding"].shape[1]
    x = ln(torch.cat([hidden, state["style_embedding"].expand(hidden.shape[0], -1, -1)], dim=1), "ln_pre")
    w = x.shape[-1]
    d = w // heads
    layers = len({k.split(".")[1] for k in state if k.startswith("transformer_layes.")})
    for i in range(layers):
        p = f"transformer_layes.{i}."
        h = ln(x, p + "ln_1")
        q, k, v = (h @ state[p + "attn.in_proj_weight"].T + state[p + "attn.in_proj_bias"]).split(w, dim=-1)
        q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(x.shape)
        x = x + a @ state[p + "attn.out_proj.weight"].T + state[p + "attn.out_proj.bias"]
        m = ln(x, p + "ln_2") @ state[p + "mlp.c_fc.weight"].T + state[p + "mlp.c_fc.bias"]
        m = m * torch.sigmoid(1.702 * m)
        x = x + m @ state[p + "mlp.c_proj.weight"].T + state[p + "mlp.c_proj.bias"]
    return ln(x[:, -tokens:], "ln_post") @ state["proj"]


@pytest.mark.parametrize("width, heads", [(128, 1), (256, 2)])
def test_forward_against_a_direct_computation(tmp_path, width, heads):
    state = t2i_style_state(width, 48, 2, 3, seed=2)
    path = tmp_path / "style.pth"
    torch.save(state, path)
    model = load_control_model(path)
    assert model.spec.config["heads"] == heads
    hidden = torch.randn(2, 17, width, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model.module(hidden)
    assert got.shape == (2, 3, 48)
    assert torch.allclose(got, _direct_forward(state, hidden, heads), atol=1e-5)


# ---- the hook --------------------------------------------------------------------------------------------------
def _call(uncond=(False, True), step=0, width=64) -> UNetCall:
    g = torch.Generator().manual_seed(4)
    rows = len(uncond)
    return UNetCall(torch.randn(rows, 4, 8, 8, generator=g), torch.full((rows,), 500.0),
                    torch.randn(rows, 6, width, generator=g), [0] * rows, list(uncond),
                    Step(step, 10, torch.ones(rows)))


def _plan(hooks) -> SamplingPlan:
    return SamplingPlan(None, DiscreteSchedule(), "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=hooks)


def _tokens(seed, n=4, width=64) -> torch.Tensor:
    return torch.randn(1, n, width, generator=torch.Generator().manual_seed(seed))


def test_tokens_are_appended_to_the_prompts_rows_and_zeros_to_the_negatives():
    call = _call((False, True, False))
    hook = ts.StyleHook("ControlNet unit 1", _tokens(1), 0.6, 0.0, 1.0)
    context = _plan([hook]).unet_inputs(call)["encoder_hidden_states"]
    assert context.shape == (3, 10, 64)
    assert torch.equal(context[:, :6], call.encoder_hidden_states)
    assert torch.allclose(context[0, 6:], 0.6 * _tokens(1)[0]) and torch.allclose(context[2, 6:], 0.6 * _tokens(1)[0])
    assert torch.equal(context[1, 6:], torch.zeros(4, 64))


def test_two_units_append_in_turn_and_windows_apply():
    first = ts.StyleHook("ControlNet unit 0", _tokens(1), 1.0, 0.0, 1.0)
    second = ts.StyleHook("ControlNet unit 1", _tokens(2, 2), 0.5, 0.5, 1.0)
    plan = _plan([first, second])
    early = plan.unet_inputs(_call(step=2))["encoder_hidden_states"]
    late = plan.unet_inputs(_call(step=7))["encoder_hidden_states"]
    assert early.shape[1] == 10 and late.shape[1] == 12
    assert torch.allclose(late[0, 6:10], _tokens(1)[0]) and torch.allclose(late[0, 10:], 0.5 * _tokens(2, 2)[0])
    with pytest.raises(ControlNetError, match="unit 0: the T2I style adapter gives 64-wide tokens; this checkpoint's "
                                              "context is 32 wide"):
        first.unet_inputs(_call(width=32))


# ---- the preprocessor and the factory ---------------------------------------------------------------------------
def test_clip_vision_is_listed_under_its_ui_label():
    p = builtin(None).get("t2ia_style_clipvision")
    assert p.name == "clip_vision" and not p.model_free and p.control_types == ("T2I-Adapter",)


def _picture(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (72, 64, 3), dtype=np.uint8)


def test_tokens_are_the_adapter_on_the_encoders_last_hidden_states(tmp_path):
    model = load_control_model(write_t2i_style(tmp_path / "style.pth", seed=3))
    encoder = tiny_clip_vision(6)
    got = ts.style_tokens(model.module, encoder, _picture(), CPU)
    hidden = clip_features(encoder, clip_pixels(_picture()))["last_hidden_state"]
    assert hidden.shape == (1, 257, 128)
    assert torch.allclose(got, _direct_forward(t2i_style_state(seed=3), hidden, 1), atol=1e-5)
    narrow = load_control_model(write_t2i_style(tmp_path / "narrow.pth", width=64, seed=3))
    with pytest.raises(ControlNetError, match="takes 64-wide CLIP hidden states; this image encoder gives 128"):
        ts.style_tokens(narrow.module, encoder, _picture(), CPU)


# ---- whole requests ------------------------------------------------------------------------------------------
def _b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def root(make_data_root):
    root = make_data_root("t2i-style")
    folder = root / "models" / "ControlNet"
    write_t2i_style(folder / "t2iadapter_style_tiny.pth", seed=4)
    write_controlnet(folder / "tiny-canny.safetensors", "sd1", "tiny", seed=3)
    return root


@pytest.fixture(scope="module")
def studio(root):
    write_clip_vision(root / "models" / "clip_vision" / "clip_vitl.pth", seed=7)
    return Studio(Engine(Paths(root)))


def _req(units=(), **kw) -> Txt2ImgRequest:
    args = {"prompt": "a red square", "negative_prompt": "blur", "steps": 3, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", **kw}
    if units:
        args["alwayson_scripts"] = {"ControlNet": {"units": list(units)}}
    return Txt2ImgRequest(**args)


def _unit(module="t2ia_style_clipvision", model="t2iadapter_style_tiny", **kw) -> dict:
    return {"enabled": True, "module": module, "model": model, "image": _b64(_picture(9)), **kw}


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image.convert("RGB"), np.float32)


def test_a_style_unit_on_the_tiny_checkpoint(studio):
    plain = _pixels(studio.generate(_req()))
    on = studio.generate(_req([_unit()]))
    assert np.abs(_pixels(on) - plain).mean() > 0.2 and len(on.images) == 1  # no detected map
    text = infotext.parse(on.images[0].infotext)["ControlNet 0"]
    assert "Module: clip_vision, Model: t2iadapter_style_tiny [" in text
    white = _pixels(studio.generate(_req([_unit(image=_b64(np.full((64, 64, 3), 255, np.uint8)))])))
    black = _pixels(studio.generate(_req([_unit(image=_b64(np.zeros((64, 64, 3), np.uint8)))])))
    assert np.abs(white - black).mean() > 0.2  # another picture, other tokens
    late = _pixels(studio.generate(_req([_unit(guidance_start=0.9)])))
    assert np.array_equal(late, plain)
    with_canny = _pixels(studio.generate(_req([_unit(), _unit("canny", "tiny-canny")])))
    assert np.abs(with_canny - _pixels(on)).mean() > 0.2  # a ControlNet on the lengthened context


def test_pairing_and_missing_encoder_errors(studio, make_data_root):
    with pytest.raises(ControlNetError, match="unit 0: t2iadapter_style_tiny \\[.*\\] is a T2I style adapter; it takes "
                                              "the t2ia_style_clipvision preprocessor"):
        studio.generate(_req([_unit(module="canny")]))
    with pytest.raises(ControlNetError, match="unit 0: t2ia_style_clipvision \\(clip_vision\\) makes CLIP tokens .*"
                                              "is a SD 1.x ControlNet"):
        studio.generate(_req([_unit(model="tiny-canny")]))
    bare = make_data_root("t2i-style-bare")
    write_t2i_style(bare / "models" / "ControlNet" / "t2iadapter_style_tiny.pth", seed=4)
    with pytest.raises(ControlNetError, match="unit 0: the T2I style adapter needs the OpenAI ViT-L/14 image encoder: "
                                              "put clip_vitl.pth in"):
        Studio(Engine(Paths(bare))).generate(_req([_unit()]))
