"""ReVision units (sdstudio.engine.revision): the noise augmentation against the low-scale models' schedule, the
pooled prompt replaced on the prompt's rows and zeroed on the negative prompt's, the context zeroed by
revision_ignore_prompt and by empty prompts, later hooks seeing the replaced inputs, windows, several units,
the clip_g file and the SDXL-only rule, and whole requests on the tiny SDXL checkpoint."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdstudio.core import infotext
from sdstudio.core.controlnet import ControlNetError, ControlUnit, Preprocessor
from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine import revision as rv
from sdstudio.engine.controlnet import PreparedUnit
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import SamplingPlan, Step, StepHook, UNetCall
from sdstudio.engine.preprocessors import builtin
from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.scripts import Studio
from sdstudio.testing.ip_adapter_files import tiny_clip_vision, write_clip_vision

torch.set_num_threads(1)
CPU = torch.device("cpu")
POOLED = 128  # the tiny SDXL's pooled prompt width


def _embeds(seed: int, width: int = POOLED) -> torch.Tensor:
    return torch.randn(1, width, generator=torch.Generator().manual_seed(seed))


def _call(uncond=(False, True), step: int = 0, steps: int = 10) -> UNetCall:
    g = torch.Generator().manual_seed(3)
    rows = len(uncond)
    added = {"text_embeds": torch.randn(rows, POOLED, generator=g),
             "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * rows)}
    return UNetCall(torch.randn(rows, 4, 8, 8, generator=g), torch.full((rows,), 500.0),
                    torch.randn(rows, 8, 192, generator=g), [0] * rows, list(uncond), Step(step, steps, torch.ones(rows)),
                    added)


def _plan(hooks) -> SamplingPlan:
    return SamplingPlan(None, DiscreteSchedule(), "epsilon", [], [], 5.0, torch.float32, CPU, steps=10, hooks=hooks)


# ---- the noise augmentation ----------------------------------------------------------------------------------
def test_augmentation_schedule_is_the_low_scale_models_linear_one():
    keep, noise = rv.augmentation_schedule()
    betas = np.linspace(1e-4 ** 0.5, 2e-2 ** 0.5, 1000, dtype=np.float64) ** 2
    cumprod = np.cumprod(1 - betas)
    assert np.allclose(keep.numpy(), np.sqrt(cumprod), rtol=1e-6)
    assert np.allclose(noise.numpy(), np.sqrt(1 - cumprod), rtol=1e-5)
    assert math.isclose(float(noise[0]), 0.01, rel_tol=1e-3)  # "0" still adds 1 % noise, as in the extension
    assert [rv.noise_level(a) for a in (0.0, 0.3, 0.5, 0.9999, 1.0, -1.0)] == [0, 300, 500, 999, 999, 0]


def test_augmented_embeds_follow_the_formula():
    e = _embeds(1)
    keep, noise = rv.augmentation_schedule()
    for amount in (0.0, 0.25, 1.0):
        got = rv.augmented(e, amount, torch.Generator().manual_seed(7))
        n = torch.randn(e.shape, generator=torch.Generator().manual_seed(7))
        k = rv.noise_level(amount)
        assert torch.allclose(got, keep[k] * e + noise[k] * n, atol=1e-6)
    far = rv.augmented(e, 1.0, torch.Generator().manual_seed(7))
    assert torch.corrcoef(torch.cat([far, e]))[0, 1] < 0.5 < torch.corrcoef(
        torch.cat([rv.augmented(e, 0.1, torch.Generator().manual_seed(7)), e]))[0, 1]


# ---- the hook --------------------------------------------------------------------------------------------------
def _unit(index=0, weight=1.0, start=0.0, end=1.0, seed=1) -> rv.RevisionUnit:
    return rv.RevisionUnit(index, _embeds(seed), weight, start, end)


def test_prompt_rows_get_the_image_embedding_and_negative_rows_zeros():
    call = _call(uncond=(False, True, False))
    out = _plan([rv.RevisionHook([_unit(weight=0.7)], ignore_prompt=False)]).unet_inputs(call)
    text = out["added_cond_kwargs"]["text_embeds"]
    assert torch.allclose(text[0], 0.7 * _embeds(1)[0]) and torch.allclose(text[2], 0.7 * _embeds(1)[0])
    assert torch.equal(text[1], torch.zeros(POOLED))
    assert torch.equal(out["added_cond_kwargs"]["time_ids"], call.added_cond_kwargs["time_ids"])  # sizes stay
    assert "encoder_hidden_states" not in out
    assert not torch.equal(call.added_cond_kwargs["text_embeds"], text)  # the call's own tensor is untouched


def test_several_units_sum_and_windows_apply():
    hook = rv.RevisionHook([_unit(0, 0.5, 0.0, 0.5, seed=1), _unit(2, 2.0, 0.3, 1.0, seed=2)], ignore_prompt=False)
    plan = _plan([hook])
    text = {i: plan.unet_inputs(_call(step=i))["added_cond_kwargs"]["text_embeds"][0] for i in (1, 4, 8)}
    assert torch.allclose(text[1], 0.5 * _embeds(1)[0])
    assert torch.allclose(text[4], 0.5 * _embeds(1)[0] + 2.0 * _embeds(2)[0], atol=1e-6)
    assert torch.allclose(text[8], 2.0 * _embeds(2)[0])
    assert hook.owner == "ControlNet units 0, 2"
    alone = rv.RevisionHook([_unit(start=0.5)], ignore_prompt=True)
    assert _plan([alone]).unet_inputs(_call(step=2)) == {}  # outside its window: the UNet's own inputs


def test_ignore_prompt_zeroes_the_context_and_later_hooks_see_the_replacement():
    seen = []

    class Recorder(StepHook):
        def unet_inputs(self, call):
            seen.append(call)

    call = _call()
    out = _plan([rv.RevisionHook([_unit()], ignore_prompt=True), Recorder()]).unet_inputs(call)
    assert torch.equal(out["encoder_hidden_states"], torch.zeros_like(call.encoder_hidden_states))
    assert torch.equal(seen[0].encoder_hidden_states, out["encoder_hidden_states"])
    assert seen[0].added_cond_kwargs is out["added_cond_kwargs"]
    assert call.encoder_hidden_states.abs().sum() > 0


def test_width_and_family_errors_name_the_unit():
    with pytest.raises(ControlNetError, match="unit 0: ReVision works on SDXL"):
        rv.RevisionHook([_unit()], False).unet_inputs(replace(_call(), added_cond_kwargs=None))
    wide = rv.RevisionHook([rv.RevisionUnit(0, _embeds(1, POOLED + 8), 1.0, 0.0, 1.0)], False)
    with pytest.raises(ControlNetError, match="136 wide, more than this checkpoint's pooled prompt \\(128\\)"):
        wide.unet_inputs(_call())


# ---- the factory -----------------------------------------------------------------------------------------------
def _picture(seed=0, size=64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _prepared(index=0, module="revision_clipvision", image=None, **unit) -> PreparedUnit:
    u = ControlUnit(enabled=True, module=module, model="None", threshold_a=unit.pop("threshold_a", 0.0), **unit)
    return PreparedUnit(index, u, Preprocessor(module), _picture() if image is None else image, None)


def test_factory_encodes_with_clip_g_and_noises_by_the_seed(tmp_path):
    write_clip_vision(tmp_path / "clip_g.pth", seed=4, projection_dim=POOLED)
    hook = rv.revision_hook([_prepared(weight=0.8, threshold_a=0.2)], tmp_path, CPU, seed=123, empty_prompts=False)
    from sdstudio.models.ip_adapter import clip_features, clip_pixels

    encoder = tiny_clip_vision(4, POOLED)
    plain = clip_features(encoder, clip_pixels(_picture()))["image_embeds"]
    expected = rv.augmented(plain, 0.2, torch.Generator().manual_seed(123))
    (unit,) = hook.units
    assert torch.allclose(unit.embeds, expected, atol=1e-5) and unit.weight == 0.8 and not hook.ignore_prompt
    again = rv.revision_hook([_prepared(weight=0.8, threshold_a=0.2)], tmp_path, CPU, seed=123, empty_prompts=True)
    assert torch.equal(again.units[0].embeds, unit.embeds) and again.ignore_prompt
    other = rv.revision_hook([_prepared(threshold_a=0.2)], tmp_path, CPU, seed=124, empty_prompts=False)
    assert not torch.allclose(other.units[0].embeds, unit.embeds)
    two = rv.revision_hook([_prepared(0), _prepared(1, "revision_ignore_prompt")], tmp_path, CPU, 1, False)
    assert two.ignore_prompt and len(two.units) == 2


def test_missing_clip_g_says_what_to_put_where(tmp_path):
    with pytest.raises(ControlNetError, match=f"unit 0: ReVision needs the OpenCLIP ViT-bigG/14 image encoder: put "
                                              f"clip_g.pth in {tmp_path}"):
        rv.revision_hook([_prepared()], tmp_path, CPU, 1, False)


def test_the_modules_are_listed_model_free_with_the_noise_slider():
    registry = builtin(None)
    for name in rv.MODULES:
        p = registry.get(name)
        assert p.model_free and p.control_types == ("Revision",)
        assert p.detail()["sliders"] == [{"name": "Noise Augmentation", "value": 0.0, "min": 0.0, "max": 1.0,
                                          "step": 0.01}]
    types = registry.control_types(["None"])["control_types"]["Revision"]
    assert types["module_list"][:3] == ["none", "revision_clipvision", "revision_ignore_prompt"]
    assert (types["default_option"], types["default_model"]) == ("revision_clipvision", "None")


# ---- whole requests ------------------------------------------------------------------------------------------
def _b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def xl(make_data_root):
    root = make_data_root("revision", {"tiny-sdxl": "sdxl", "tiny-sd1": "sd1"})
    write_clip_vision(root / "models" / "clip_vision" / "clip_g.pth", seed=5, projection_dim=POOLED)
    return Studio(Engine(Paths(root)))


def _req(units=(), model="tiny-sdxl", **kw) -> Txt2ImgRequest:
    args = {"prompt": "a red square", "negative_prompt": "blur", "steps": 3, "width": 64, "height": 64, "seed": 5,
            "sampler_name": "Euler", "model": model, **kw}
    if units:
        args["alwayson_scripts"] = {"ControlNet": {"units": list(units)}}
    return Txt2ImgRequest(**args)


def _pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].image.convert("RGB"), np.float32)


def _api_unit(module="revision_clipvision", **kw) -> dict:
    return {"enabled": True, "module": module, "model": "None", "image": _b64(_picture(9)), **kw}


def test_requests_on_the_tiny_sdxl_checkpoint(xl):
    plain = _pixels(xl.generate(_req()))
    on = xl.generate(_req([_api_unit()]))
    assert np.abs(_pixels(on) - plain).mean() > 0.2 and len(on.images) == 1  # no detected map
    text = infotext.parse(on.images[0].infotext)["ControlNet 0"]
    assert "Module: revision_clipvision, Model: None" in text and "Threshold A: 0.0" in text
    assert np.array_equal(_pixels(xl.generate(_req([_api_unit()]))), _pixels(on))  # same seed, same noise
    ignore = _pixels(xl.generate(_req([_api_unit("revision_ignore_prompt")])))
    assert np.abs(ignore - _pixels(on)).mean() > 0.2
    other_prompt = _pixels(xl.generate(_req([_api_unit("revision_ignore_prompt")], prompt="a blue circle")))
    assert np.array_equal(other_prompt, ignore)  # the prompt's context is zeroed: only the pooled image counts
    empty = _pixels(xl.generate(_req([_api_unit()], prompt="", negative_prompt="")))
    empty_ignore = _pixels(xl.generate(_req([_api_unit("revision_ignore_prompt")], prompt="", negative_prompt="")))
    assert np.array_equal(empty, empty_ignore)
    late = _pixels(xl.generate(_req([_api_unit(guidance_start=0.9)])))
    assert np.array_equal(late, plain)  # no step in its window (steps 0-2 of 3 are fractions 0, 1/3, 2/3)


def test_an_sd1_checkpoint_is_refused_naming_sdxl(xl):
    with pytest.raises(ControlNetError, match="unit 0: revision_clipvision works on SDXL checkpoints only; this one "
                                              "is SD 1.x"):
        xl.generate(_req([_api_unit()], model="tiny-sd1"))


def test_missing_encoder_in_a_request_names_the_file(make_data_root):
    root = make_data_root("revision-missing", {"tiny-sdxl": "sdxl"})
    studio = Studio(Engine(Paths(root)))
    with pytest.raises(ControlNetError, match="put clip_g.pth in"):
        studio.generate(_req([_api_unit()]))
