"""Guidance scripts (dynamic thresholding, CFG rescale, FreeU): their math against the published algorithms
written out here (the sd-dynamic-thresholding extension's, diffusers' rescale_noise_cfg, diffusers' FreeU),
then whole requests on the tiny model: on changes the picture, off leaves it alone, infotext, A1111's
positional arguments, X/Y/Z axes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

from sdstudio.core import infotext
from sdstudio.core.params import RequestError, Txt2ImgRequest, from_infotext
from sdstudio.core.paths import Paths
from sdstudio.core.scripts import ScriptError, builtin
from sdstudio.engine.generate import Engine
from sdstudio.engine.hooks import Guidance, Step, StepHook, UNetCall
from sdstudio.scripts import Studio
from sdstudio.scripts.guidance import (
    CFG_RESCALE,
    CFG_RESCALE_NAME,
    DYNAMIC_THRESHOLDING,
    DYNTHRES_NAME,
    FREEU,
    FREEU_NAME,
    MODES,
    scheduled,
)
from sdstudio.testing.synthetic import unet_config

# ---- the extension's algorithm, step by step (dynthres_core.DynThresh, batched as it runs) ----------------

# each mode's factor on (scale - minimum) at fraction f = step / (steps - 1), with the scheduler value v
CURVES = {
    "Constant": lambda f, v: 1.0,
    "Linear Down": lambda f, v: 1.0 - f,
    "Cosine Down": lambda f, v: math.cos(f * 1.5707),
    "Half Cosine Down": lambda f, v: math.cos(f),
    "Linear Up": lambda f, v: f,
    "Cosine Up": lambda f, v: 1.0 - math.cos(f * 1.5707),
    "Half Cosine Up": lambda f, v: 1.0 - math.cos(f),
    "Power Up": lambda f, v: f ** v,
    "Power Down": lambda f, v: 1.0 - f ** v,
    "Linear Repeating": lambda f, v: (0.5 - (f * v) % 1.0) * 2 if (f * v) % 1.0 < 0.5 else ((f * v) % 1.0 - 0.5) * 2,
    "Cosine Repeating": lambda f, v: math.cos(f * 6.28318 * v) * 0.5 + 0.5,
    "Sawtooth": lambda f, v: (f * v) % 1.0,
}


def extension(cond, uncond, cfg_scale, weights, o, step, steps):
    """``cond`` (B * n, C, H, W), ``uncond`` (B, C, H, W), ``weights`` (B, n, 1, 1, 1); ``o`` our args dict."""
    frac = step / (steps - 1)

    def interpret(scale, mode, minimum):
        return (scale - minimum) * CURVES[mode](frac, o["sched_val"]) + minimum

    mimic_scale = interpret(o["mimic_scale"], o["mimic_mode"], o["mimic_scale_min"])
    cfg_scale = interpret(cfg_scale, o["cfg_mode"], o["cfg_scale_min"])
    per = cond.shape[0] // uncond.shape[0]
    stacked = cond.reshape((-1, per) + uncond.shape[1:])
    relative = ((stacked - uncond.unsqueeze(1)) * weights).sum(1)
    mim_target = uncond + relative * mimic_scale
    cfg_target = uncond + relative * cfg_scale
    mim_flat, cfg_flat = mim_target.flatten(2), cfg_target.flatten(2)
    mim_means, cfg_means = mim_flat.mean(dim=2).unsqueeze(2), cfg_flat.mean(dim=2).unsqueeze(2)
    mim_c, cfg_c = mim_flat - mim_means, cfg_flat - cfg_means
    q = o["threshold_percentile"] * 0.01  # the script's "percentage to portion"
    if o["separate_feature_channels"]:
        if o["variability_measure"] == "STD":
            mim_ref, cfg_ref = mim_c.std(dim=2).unsqueeze(2), cfg_c.std(dim=2).unsqueeze(2)
        else:
            mim_ref = mim_c.abs().max(dim=2).values.unsqueeze(2)
            cfg_ref = torch.quantile(cfg_c.abs(), q, dim=2).unsqueeze(2)
    elif o["variability_measure"] == "STD":
        mim_ref, cfg_ref = mim_c.std(), cfg_c.std()
    else:
        mim_ref, cfg_ref = mim_c.abs().max(), torch.quantile(cfg_c.abs(), q)
    if o["scaling_startpoint"] == "ZERO":
        result = cfg_flat * (mim_ref / cfg_ref)
    else:
        if o["variability_measure"] == "STD":
            renormalized = (cfg_c / cfg_ref) * mim_ref
        else:
            max_ref = torch.maximum(mim_ref, cfg_ref)
            renormalized = (cfg_c.clamp(-max_ref, max_ref) / max_ref) * mim_ref
        result = renormalized + cfg_means
    result = result.unflatten(2, mim_target.shape[2:])
    if o["interpolate_phi"] != 1.0:
        result = result * o["interpolate_phi"] + cfg_target * (1.0 - o["interpolate_phi"])
    return result


def predictions(seed=0, parts=2, shape=(4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    uncond = torch.randn(shape, generator=g) * torch.tensor([1.0, 0.5, 2.0, 0.8])[:, None, None]
    conds = [uncond + 0.4 * torch.randn(shape, generator=g) + 0.1 * k for k in range(parts)]
    return uncond, conds


def guidance(uncond, conds, weights, cfg_scale, index, steps):
    sigma = torch.tensor(3.0)
    return Guidance(torch.zeros_like(uncond), sigma, uncond, list(zip(conds, weights)), cfg_scale,
                    Step(index, steps, sigma.reshape(1)), 0)


def dynthres_hook(**args):
    parsed = builtin().parse(DYNTHRES_NAME, {"enabled": True, **args})
    (hook,) = DYNAMIC_THRESHOLDING.hooks(parsed, None)
    return hook, parsed


@pytest.mark.parametrize("startpoint", ["MEAN", "ZERO"])
@pytest.mark.parametrize("measure", ["AD", "STD"])
@pytest.mark.parametrize("separate", [True, False])
@pytest.mark.parametrize("percentile, phi", [(100.0, 1.0), (97.5, 0.6)])
def test_dynamic_thresholding_is_the_extensions_algorithm(startpoint, measure, separate, percentile, phi):
    hook, o = dynthres_hook(mimic_scale=4.0, threshold_percentile=percentile, scaling_startpoint=startpoint,
                            variability_measure=measure, separate_feature_channels=separate, interpolate_phi=phi)
    uncond, conds = predictions()
    weights = [0.7, 0.45]  # "a AND b :0.45" with a weight on the first part too
    for step in (0, 4, 9):
        ours = hook.combine(guidance(uncond, conds, weights, 12.0, step, 10))
        theirs = extension(torch.stack(conds), uncond[None], 12.0, torch.tensor(weights).reshape(1, 2, 1, 1, 1),
                           o, step, 10)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    plain = guidance(uncond, conds, weights, 12.0, 0, 10).cfg()
    assert (ours - plain).abs().max() > 0.1  # it is not plain CFG


@pytest.mark.parametrize("mimic_mode, cfg_mode", [(m, c) for m, c in zip(MODES, MODES[3:] + MODES[:3])])
def test_scheduled_scales_through_the_hook(mimic_mode, cfg_mode):
    hook, o = dynthres_hook(mimic_scale=6.0, mimic_mode=mimic_mode, mimic_scale_min=1.5, cfg_mode=cfg_mode,
                            cfg_scale_min=3.0, sched_val=2.5, threshold_percentile=99.0)
    uncond, conds = predictions(seed=3, parts=1)
    for step in (0, 2, 5, 7):
        ours = hook.combine(guidance(uncond, conds, [1.0], 10.0, step, 8))
        theirs = extension(conds[0][None], uncond[None], 10.0, torch.ones(1, 1, 1, 1, 1), o, step, 8)[0]
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_each_scheduler_mode_against_its_definition(mode):
    for f in (0.0, 0.2, 0.5, 0.85, 1.0):
        assert scheduled(9.0, mode, 2.0, 3.0, f) == pytest.approx((9.0 - 2.0) * CURVES[mode](f, 3.0) + 2.0, abs=1e-12)


def test_scheduler_values_worked_by_hand():
    assert scheduled(7.0, "Constant", 3.0, 4.0, 0.4) == 7.0
    assert scheduled(7.0, "Linear Down", 1.0, 4.0, 0.5) == pytest.approx(4.0)
    assert scheduled(7.0, "Linear Down", 1.0, 4.0, 1.0) == pytest.approx(1.0)  # ends at the minimum
    assert scheduled(7.0, "Linear Up", 1.0, 4.0, 0.0) == pytest.approx(1.0)
    assert scheduled(8.0, "Power Up", 0.0, 2.0, 0.5) == pytest.approx(2.0)  # 8 * 0.5²
    assert scheduled(8.0, "Linear Repeating", 0.0, 4.0, 0.125) == pytest.approx(0.0)  # half way through a repeat
    assert scheduled(8.0, "Linear Repeating", 0.0, 4.0, 0.25) == pytest.approx(8.0)  # a repeat starts again
    assert scheduled(8.0, "Sawtooth", 0.0, 4.0, 0.125) == pytest.approx(4.0)
    assert scheduled(8.0, "Cosine Repeating", 0.0, 1.0, 0.5) == pytest.approx(0.0, abs=1e-4)
    assert scheduled(8.0, "Cosine Down", 0.0, 4.0, 1.0) == pytest.approx(8.0 * math.cos(1.5707))  # not quite 0
    with pytest.raises(ValueError, match="unknown scheduler mode"):
        scheduled(7.0, "Wobbly", 0.0, 4.0, 0.5)


# ---- CFG rescale -------------------------------------------------------------------------------------


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_cfg_rescale_is_diffusers_rescale_noise_cfg(phi):
    uncond, conds = predictions(seed=5, parts=1)
    (hook,) = CFG_RESCALE.hooks(builtin().parse(CFG_RESCALE_NAME, {"phi": max(phi, 0.01)}), None)
    hook.phi = phi  # the script makes no hook at 0: the formula itself is checked at 0 too
    g = guidance(uncond, conds, [1.0], 9.0, 0, 10)
    x_cfg = g.cfg()
    ours = hook.after_cfg(g, x_cfg)
    theirs = rescale_noise_cfg(x_cfg[None], conds[0][None], guidance_rescale=phi)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the paper's definition written out: std over every axis of the image
    written = phi * (x_cfg * conds[0].std() / x_cfg.std()) + (1 - phi) * x_cfg
    torch.testing.assert_close(ours, written, rtol=1e-5, atol=1e-6)


def test_cfg_rescale_with_and_parts_uses_their_weighted_positive_prediction():
    uncond, conds = predictions(seed=6, parts=2)
    (hook,) = CFG_RESCALE.hooks(builtin().parse(CFG_RESCALE_NAME, {"phi": 0.7}), None)
    g = guidance(uncond, conds, [0.8, 0.5], 7.0, 0, 10)
    positive = uncond + 0.8 * (conds[0] - uncond) + 0.5 * (conds[1] - uncond)
    x_cfg = g.cfg()
    torch.testing.assert_close(hook.after_cfg(g, x_cfg),
                               rescale_noise_cfg(x_cfg[None], positive[None], guidance_rescale=0.7)[0])
    assert CFG_RESCALE.hooks(builtin().parse(CFG_RESCALE_NAME, {"phi": 0.0}), None) == []


# ---- FreeU -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(11)
    return UNet2DConditionModel(**unet_config("sd1", "tiny")).eval()


def freeu_hook(**args):
    (hook,) = FREEU.hooks(builtin().parse(FREEU_NAME, {"enabled": True, **args}), None)
    return hook


def test_freeu_is_diffusers_own_and_ends_with_the_pass(unet):
    torch.manual_seed(2)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 7, 64)
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=text).sample
        reference = copy.deepcopy(unet)
        reference.enable_freeu(s1=0.9, s2=0.2, b1=1.5, b2=1.6)
        expected = reference(x, t, encoder_hidden_states=text).sample
        hook = freeu_hook(b1=1.5, b2=1.6, s1=0.9, s2=0.2)
        with hook.applied(unet):
            ours = unet(x, t, encoder_hidden_states=text).sample
        after = unet(x, t, encoder_hidden_states=text).sample
    assert torch.equal(ours, expected)
    assert (ours - plain).abs().max() > 1e-3
    assert torch.equal(after, plain)
    assert all(getattr(block, "b1", None) is None for block in unet.up_blocks)
    with pytest.raises(RuntimeError), hook.applied(unet):  # left also when the pass fails
        raise RuntimeError("sampler failed")
    assert all(getattr(block, "s1", None) is None for block in unet.up_blocks)


def test_freeu_start_and_end_as_forge_gates_them(unet):
    hook = freeu_hook(start=0.5, end=0.75)
    on = []
    with hook.applied(unet):
        for i in range(9):  # fractions i / 8
            hook.unet_inputs(UNetCall(None, None, None, [0], [False], Step(i, 9, torch.ones(1))))
            on.append(getattr(unet.up_blocks[0], "b1", None) is not None)  # never enabled yet: no attribute
    assert on == [False, False, False, False, True, True, True, False, False]
    assert unet.up_blocks[0].b1 is None


# ---- whole requests on the tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def studio(make_data_root):
    return Studio(Engine(Paths(make_data_root("guidance"))))


BASE = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 3, "width": 64, "height": 64, "seed": 5,
        "sampler_name": "Euler", "cfg_scale": 30.0}


class ExtensionHook(StepHook):
    """The extension's algorithm above, as a hook: what the engine makes with it is the reference picture."""

    def __init__(self, args: dict):
        self.args = args

    def combine(self, g):
        weights = torch.tensor([w for _, w in g.conds]).reshape(1, -1, 1, 1, 1)
        return extension(torch.stack([c for c, _ in g.conds]), g.uncond[None], g.cfg_scale, weights, self.args,
                         g.step.index, g.step.steps)[0]


class DiffusersRescale(StepHook):
    def __init__(self, phi: float):
        self.phi = phi

    def after_cfg(self, g, denoised):
        return rescale_noise_cfg(denoised[None], g.conds[0][0][None], guidance_rescale=self.phi)[0]


def changed(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def px(result, i=0):
    return np.asarray(result.images[i].image)


def run(studio, **alwayson):
    return studio.generate(Txt2ImgRequest(**BASE, alwayson_scripts=alwayson).validate(builtin()))


@pytest.fixture(scope="module")
def plain(studio):
    return px(run(studio))


DYNTHRES_ON = {"enabled": True, "mimic_scale": 4.0, "threshold_percentile": 99.0, "cfg_mode": "Linear Down",
               "cfg_scale_min": 5.0}


def test_dynamic_thresholding_end_to_end(studio, plain):
    on = run(studio, **{DYNTHRES_NAME: DYNTHRES_ON})
    assert changed(px(on), plain) > 3  # the tiny model's prompts pull little: a small change
    reference = studio.engine.generate(Txt2ImgRequest(**BASE), hooks=[
        ExtensionHook(builtin().parse(DYNTHRES_NAME, DYNTHRES_ON))])
    assert changed(px(on), px(reference)) <= 1
    assert np.array_equal(px(run(studio, **{DYNTHRES_NAME: {**DYNTHRES_ON, "enabled": False}})), plain)
    fields = infotext.parse(on.images[0].infotext)
    assert {k: fields[k] for k in ("Dynamic thresholding enabled", "Mimic scale", "Threshold percentile",
                                   "CFG mode", "CFG scale minimum", "Scaling Startpoint", "Variability Measure",
                                   "Interpolate Phi")} == {
        "Dynamic thresholding enabled": "True", "Mimic scale": "4", "Threshold percentile": "99",
        "CFG mode": "Linear Down", "CFG scale minimum": "5", "Scaling Startpoint": "MEAN",
        "Variability Measure": "AD", "Interpolate Phi": "1"}
    assert "Mimic mode" not in fields and "Scheduler value" not in fields  # at their defaults
    back = from_infotext(on.images[0].infotext)
    assert builtin().parse(DYNTHRES_NAME, back.alwayson_scripts[DYNTHRES_NAME]) == \
        builtin().parse(DYNTHRES_NAME, DYNTHRES_ON)
    assert np.array_equal(px(studio.generate(back)), px(on))
    assert "Dynamic thresholding enabled" not in infotext.parse(run(studio).images[0].infotext)


def test_dynamic_thresholding_positional_args_in_the_extensions_order():
    args = builtin().from_a1111_list(DYNTHRES_NAME, [True, 9.5, 99.5, "Power Up", 1.0, "Sawtooth", 2.0, 3.0, False,
                                                     "ZERO", "STD", 0.5])
    assert args == {"enabled": True, "mimic_scale": 9.5, "threshold_percentile": 99.5, "mimic_mode": "Power Up",
                    "mimic_scale_min": 1.0, "cfg_mode": "Sawtooth", "cfg_scale_min": 2.0, "sched_val": 3.0,
                    "separate_feature_channels": False, "scaling_startpoint": "ZERO", "variability_measure": "STD",
                    "interpolate_phi": 0.5}
    assert builtin().to_a1111_list("dynthres", {}) == [False, 7.0, 100.0, "Constant", 0.0, "Constant", 0.0, 4.0,
                                                      True, "MEAN", "AD", 1.0]  # the extension's defaults
    assert builtin().from_a1111_list(DYNTHRES_NAME, [True])["mimic_scale"] == 7.0  # the rest: defaults
    with pytest.raises(ScriptError, match="mimic mode must be one of"):
        builtin().from_a1111_list(DYNTHRES_NAME, [True, 7, 100, "Wobbly"])


def test_xyz_over_mimic_scale(studio, plain):
    req = Txt2ImgRequest(**BASE, script_name="X/Y/Z plot",
                         script_args={"x_type": "[DynThres] Mimic Scale", "x_values": "0, 4",
                                      "include_lone_images": True})
    grid, off, four = studio.generate(req.validate(builtin())).images
    assert grid.grid and "Mimic scale: 4" in four.infotext
    assert np.array_equal(np.asarray(off.image), plain)  # 0 switches it off, as the extension's axis does
    alone = run(studio, **{DYNTHRES_NAME: {"enabled": True, "mimic_scale": 4.0}})
    assert np.array_equal(np.asarray(four.image), px(alone))
    labels = builtin().axes()
    assert {"[DynThres] Threshold Percentile", "[DynThres] Mimic Scheduler", "[DynThres] CFG Scheduler",
            "[DynThres] Scheduler value", "Rescale CFG"} <= set(labels)


def test_cfg_rescale_end_to_end(studio, plain):
    on = run(studio, **{CFG_RESCALE_NAME: {"phi": 0.7}})
    assert changed(px(on), plain) > 3
    assert changed(px(on), px(studio.engine.generate(Txt2ImgRequest(**BASE), hooks=[DiffusersRescale(0.7)]))) <= 1
    assert np.array_equal(px(run(studio, **{CFG_RESCALE_NAME: {"phi": 0.0}})), plain)
    assert infotext.parse(on.images[0].infotext)["CFG Rescale phi"] == "0.7"
    back = from_infotext(on.images[0].infotext)
    assert back.alwayson_scripts == {CFG_RESCALE_NAME: {"phi": 0.7}}
    assert np.array_equal(px(studio.generate(back)), px(on))
    assert builtin().from_a1111_list(CFG_RESCALE_NAME, [0.7, False]) == {"phi": 0.7, "ddim_trailing": False}
    assert builtin().get("RescaleCFG").name == CFG_RESCALE_NAME  # Forge's title, [phi]
    with pytest.raises(RequestError, match="DDIM Trailing is not supported"):
        studio.generate(Txt2ImgRequest(**BASE, alwayson_scripts={CFG_RESCALE_NAME: {"phi": 0.7,
                                                                                     "ddim_trailing": True}}))


def test_freeu_end_to_end(studio, plain):
    args = {"enabled": True, "b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}
    on = run(studio, **{FREEU_NAME: args})
    assert changed(px(on), plain) > 10
    assert np.array_equal(px(run(studio)), plain)  # nothing left switched on in the loaded UNet
    fields = infotext.parse(on.images[0].infotext)
    assert {k: fields[k] for k in fields if k.startswith("freeu_")} == {
        "freeu_enabled": "True", "freeu_b1": "1.5", "freeu_b2": "1.6", "freeu_s1": "0.9", "freeu_s2": "0.2",
        "freeu_start": "0", "freeu_end": "1"}
    back = from_infotext(on.images[0].infotext)
    assert back.alwayson_scripts == {FREEU_NAME: {**args, "start": 0.0, "end": 1.0}}
    assert np.array_equal(px(studio.generate(back)), px(on))
    assert builtin().from_a1111_list("FreeU Integrated", [True, 1.3, 1.4, 0.9, 0.2, 0, 1]) == {
        "enabled": True, "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, "start": 0.0, "end": 1.0}
    # on the tiny model only the first of 3 steps' FreeU shows: a window with it looks like FreeU throughout,
    # one without it like no FreeU
    first = px(run(studio, **{FREEU_NAME: {**args, "end": 0.4}}))
    later = px(run(studio, **{FREEU_NAME: {**args, "start": 0.4}}))
    assert changed(first, plain) > 10 and changed(first, px(on)) <= 1
    assert changed(later, px(on)) > 10 and changed(later, plain) <= 1


def test_all_three_together(studio, plain):
    both = run(studio, **{DYNTHRES_NAME: DYNTHRES_ON, CFG_RESCALE_NAME: {"phi": 0.7},
                          FREEU_NAME: {"enabled": True}})
    fields = infotext.parse(both.images[0].infotext)
    assert {"Mimic scale", "CFG Rescale phi", "freeu_b1"} <= set(fields)
    assert set(from_infotext(both.images[0].infotext).alwayson_scripts) == {DYNTHRES_NAME, CFG_RESCALE_NAME,
                                                                           FREEU_NAME}


def test_cfg_rescale_is_read_under_the_other_extensions_keys():
    """Infotexts of the other CFG rescale extensions (and of Forge) spell the key differently."""
    from sdstudio.core.params import from_infotext

    for key in ("CFG Rescale phi", "CFG Rescale", "CFG Rescale φ", "Rescale CFG"):
        req = from_infotext(f"a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, {key}: 0.7")
        assert req.alwayson_scripts == {"CFG Rescale Extension": {"phi": 0.7}} and not req.extra, key
