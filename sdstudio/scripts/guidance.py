"""Always-on guidance scripts built on the engine's per-step hooks (:mod:`sdstudio.engine.hooks`):

- Dynamic Thresholding (CFG Scale Fix), mcmonkey's sd-dynamic-thresholding ("动态CFG"): guidance at the
  request's CFG scale, its spread brought back to what a lower "mimic" scale would give, per channel.
- CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4):
  the guided prediction's standard deviation pulled back towards the positive prediction's.
- FreeU (Si et al. 2023), as Forge's "FreeU Integrated" declares it (b1, b2, s1, s2, start, end),
  run through diffusers' own ``UNet2DConditionModel.enable_freeu``.

All three work on the denoised (x0) predictions the denoiser hands the hooks, one image at a time, so an
image does not depend on its batch-mates. Importing this module imports no torch: the math uses tensor
methods only, and the hook classes get the engine's base class when a job first builds them.
"""

from __future__ import annotations

import contextlib
import functools
import math

from ..core import xyz
from ..core.scripts import Args, Param, Script, ScriptCatalog, ScriptError

# ---- Dynamic thresholding ------------------------------------------------------------------------------

DYNTHRES_NAME = "Dynamic Thresholding (CFG Scale Fix)"
MODES = ("Constant", "Linear Down", "Cosine Down", "Half Cosine Down", "Linear Up", "Cosine Up", "Half Cosine Up",
         "Power Up", "Power Down", "Linear Repeating", "Cosine Repeating", "Sawtooth")
STARTPOINTS = ("MEAN", "ZERO")
MEASURES = ("AD", "STD")


def scheduled(scale: float, mode: str, minimum: float, value: float, fraction: float) -> float:
    """A scale at ``fraction`` (step / (steps - 1)) of the pass under one of the extension's scheduler
    modes: the part above ``minimum`` is multiplied by the mode's curve. The constants 1.5707 and 6.28318
    are the extension's (not pi / 2 and 2 pi), so the curves end where its curves end."""
    top = scale - minimum
    f = fraction
    if mode == "Linear Down":
        top *= 1.0 - f
    elif mode == "Half Cosine Down":
        top *= math.cos(f)
    elif mode == "Cosine Down":
        top *= math.cos(f * 1.5707)
    elif mode == "Linear Up":
        top *= f
    elif mode == "Half Cosine Up":
        top *= 1.0 - math.cos(f)
    elif mode == "Cosine Up":
        top *= 1.0 - math.cos(f * 1.5707)
    elif mode == "Power Up":
        top *= math.pow(f, value)
    elif mode == "Power Down":
        top *= 1.0 - math.pow(f, value)
    elif mode == "Linear Repeating":
        portion = (f * value) % 1.0
        top *= (0.5 - portion) * 2 if portion < 0.5 else (portion - 0.5) * 2
    elif mode == "Cosine Repeating":
        top *= math.cos(f * 6.28318 * value) * 0.5 + 0.5
    elif mode == "Sawtooth":
        top *= (f * value) % 1.0
    elif mode != "Constant":
        raise ValueError(f"unknown scheduler mode {mode!r}; one of {', '.join(MODES)}")
    return top + minimum


def dynamic_threshold(uncond, conds, cfg_scale: float, mimic_scale: float, *, percentile: float = 100.0,
                      separate_channels: bool = True, startpoint: str = "MEAN", measure: str = "AD",
                      phi: float = 1.0):
    """One image's guided prediction (C, H, W): CFG at ``cfg_scale``, its spread around each channel's mean
    matched to CFG at ``mimic_scale``. AD: the mimic's largest deviation against the CFG's ``percentile``
    of deviations (those beyond it clamped); STD: standard deviations. ZERO scales about 0 instead of the
    mean. ``phi`` < 1 mixes plain CFG back in. ``conds``: [(prediction, AND weight)]."""
    relative = None
    for cond, weight in conds:
        part = (cond - uncond) * weight
        relative = part if relative is None else relative + part
    mimic = uncond + relative * mimic_scale
    cfg = uncond + relative * cfg_scale
    channels = uncond.shape[0]
    mim_flat, cfg_flat = mimic.reshape(channels, -1), cfg.reshape(channels, -1)
    cfg_mean = cfg_flat.mean(dim=1, keepdim=True)
    mim_centered = mim_flat - mim_flat.mean(dim=1, keepdim=True)
    cfg_centered = cfg_flat - cfg_mean
    over = {"dim": 1, "keepdim": True} if separate_channels else {}  # per channel, or the whole image
    if measure == "STD":
        mim_ref, cfg_ref = mim_centered.std(**over), cfg_centered.std(**over)
    else:
        mim_ref = mim_centered.abs().amax(**over)
        deviation = cfg_centered.abs()
        q = percentile / 100.0
        cfg_ref = deviation.amax(**over) if q >= 1.0 else deviation.quantile(q, **over)
    tiny = 1e-12  # a flat channel (no spread) stays flat instead of turning into NaN
    if startpoint == "ZERO":
        result = cfg_flat * (mim_ref / cfg_ref.clamp_min(tiny))
    elif measure == "STD":
        result = cfg_centered / cfg_ref.clamp_min(tiny) * mim_ref + cfg_mean
    else:
        limit = mim_ref.maximum(cfg_ref)
        result = cfg_centered.clamp(min=-limit, max=limit) / limit.clamp_min(tiny) * mim_ref + cfg_mean
    result = result.reshape(uncond.shape)
    if phi != 1.0:
        result = result * phi + cfg * (1.0 - phi)
    return result


def step_fraction(step) -> float:
    """step / (steps - 1), as the extension and Forge schedule by (the last step is 1)."""
    return step.index / (step.steps - 1) if step.steps > 1 else 0.0


class _DynamicThresholding:
    """Replaces CFG with :func:`dynamic_threshold` at the scheduled mimic and CFG scales."""

    def __init__(self, args: Args):
        self.args = args

    def combine(self, guidance):
        a = self.args
        f = step_fraction(guidance.step)
        mimic = scheduled(a.mimic_scale, a.mimic_mode, a.mimic_scale_min, a.sched_val, f)
        cfg = scheduled(guidance.cfg_scale, a.cfg_mode, a.cfg_scale_min, a.sched_val, f)
        return dynamic_threshold(guidance.uncond, guidance.conds, cfg, mimic, percentile=a.threshold_percentile,
                                 separate_channels=a.separate_feature_channels, startpoint=a.scaling_startpoint,
                                 measure=a.variability_measure, phi=a.interpolate_phi)


def _mimic_axis(req, value: float, values):
    """As the extension's axis: a mimic scale switches the script on, 0 switches it off."""
    args = {**req.alwayson_scripts.get(DYNTHRES_NAME, {}), "enabled": value != 0}
    if value != 0:
        args["mimic_scale"] = value
    return req.replace(alwayson_scripts={**req.alwayson_scripts, DYNTHRES_NAME: args})


def _dynthres_axis(label: str, kind: type, param: str) -> xyz.Axis:
    # The extension's other axes only set the value (a plot with the script off draws the same picture in
    # every cell); ours also switch it on.
    return xyz.script_axis(f"[DynThres] {label}", kind, DYNTHRES_NAME, param, enabled="enabled")


DYNAMIC_THRESHOLDING = Script(
    DYNTHRES_NAME, alwayson=True, enabled="enabled",
    # in the order the extension writes its infotext; ``a1111`` is its positional order
    params=(
        Param("enabled", False, label="Enable Dynamic Thresholding (CFG Scale Fix)",
              infotext="Dynamic thresholding enabled", a1111=0),
        Param("mimic_scale", 7.0, label="Mimic CFG Scale", infotext="Mimic scale", minimum=1.0, maximum=30.0,
              step=0.5, a1111=1),
        Param("separate_feature_channels", True, label="Separate Feature Channels",
              infotext="Separate Feature Channels", a1111=8),
        Param("scaling_startpoint", "MEAN", label="Scaling Startpoint", infotext="Scaling Startpoint",
              choices=STARTPOINTS, a1111=9),
        Param("variability_measure", "AD", label="Variability Measure", infotext="Variability Measure",
              choices=MEASURES, a1111=10),
        Param("interpolate_phi", 1.0, label="Interpolate Phi", infotext="Interpolate Phi", minimum=0.0,
              maximum=1.0, step=0.01, a1111=11),
        Param("threshold_percentile", 100.0, label="Top percentile of latents to clamp",
              infotext="Threshold percentile", minimum=0.0, maximum=100.0, step=0.05, a1111=2),
        Param("mimic_mode", "Constant", label="Mimic Scale Scheduler", infotext="Mimic mode", choices=MODES,
              a1111=3, omit_default=True),
        Param("mimic_scale_min", 0.0, label="Minimum value of the Mimic Scale Scheduler",
              infotext="Mimic scale minimum", minimum=0.0, maximum=30.0, step=0.5, a1111=4, omit_default=True),
        Param("cfg_mode", "Constant", label="CFG Scale Scheduler", infotext="CFG mode", choices=MODES, a1111=5,
              omit_default=True),
        Param("cfg_scale_min", 0.0, label="Minimum value of the CFG Scale Scheduler", infotext="CFG scale minimum",
              minimum=0.0, maximum=30.0, step=0.5, a1111=6, omit_default=True),
        Param("sched_val", 4.0, label="Scheduler Value", infotext="Scheduler value", minimum=0.0, maximum=40.0,
              step=0.5, a1111=7, omit_default=True,
              help="Power Up/Down: the power; Linear/Cosine Repeating and Sawtooth: repeats per image."),
    ),
    hooks=lambda args, req: [_hook(_DynamicThresholding)(args)],
    axes=(
        xyz.Axis("[DynThres] Mimic Scale", float, _mimic_axis),
        _dynthres_axis("Separate Feature Channels", int, "separate_feature_channels"),
        _dynthres_axis("Scaling Startpoint", str, "scaling_startpoint"),
        _dynthres_axis("Variability Measure", str, "variability_measure"),
        _dynthres_axis("Interpolate Phi", float, "interpolate_phi"),
        _dynthres_axis("Threshold Percentile", float, "threshold_percentile"),
        _dynthres_axis("Mimic Scheduler", str, "mimic_mode"),
        _dynthres_axis("Mimic minimum", float, "mimic_scale_min"),
        _dynthres_axis("CFG Scheduler", str, "cfg_mode"),
        _dynthres_axis("CFG minimum", float, "cfg_scale_min"),
        _dynthres_axis("Scheduler value", float, "sched_val"),
    ),
    aliases=("dynthres", "dynamic-thresholding"),
    description="High CFG scales without burnt colours: the guided prediction's spread is brought back to what "
                "the mimic scale would give.",
)


# ---- CFG rescale ---------------------------------------------------------------------------------------

CFG_RESCALE_NAME = "CFG Rescale Extension"


def cfg_rescale(guided, positive, phi: float):
    """``phi * guided * std(positive) / std(guided) + (1 - phi) * guided``, std over the whole image."""
    ratio = positive.std() / guided.std().clamp_min(1e-12)
    return phi * (guided * ratio) + (1.0 - phi) * guided


class _CFGRescale:
    """After CFG: :func:`cfg_rescale` against the positive prediction (with AND parts, their weighted sum
    uncond + sum w_i (cond_i - uncond), as Neutral Prompt's rescale takes it)."""

    def __init__(self, phi: float):
        self.phi = phi

    def after_cfg(self, guidance, denoised):
        conds = guidance.conds
        positive = conds[0][0] if len(conds) == 1 and conds[0][1] == 1.0 else guidance.cfg(1.0)
        return cfg_rescale(denoised, positive, self.phi)


def _cfg_rescale_check(args: Args, catalog: ScriptCatalog) -> None:
    if args.ddim_trailing:
        raise ScriptError(f"{CFG_RESCALE_NAME}: DDIM Trailing is not supported here; send false")


CFG_RESCALE = Script(
    CFG_RESCALE_NAME, alwayson=True,
    params=(
        Param("phi", 0.0, label="CFG Rescale", infotext="CFG Rescale phi", minimum=0.0, maximum=1.0, step=0.01,
              infotext_aliases=("CFG Rescale", "CFG Rescale φ", "Rescale CFG"), a1111=0, omit_default=True,
              help="0: off; 0.7 is the paper's choice."),
        # the extension's second argument, taken so A1111 clients' two-value lists are read; only false
        Param("ddim_trailing", False, label="DDIM Trailing", a1111=1),
    ),
    hooks=lambda args, req: [_hook(_CFGRescale)(args.phi)] if args.phi > 0 else [],
    check=_cfg_rescale_check,
    axes=(xyz.script_axis("Rescale CFG", float, CFG_RESCALE_NAME, "phi"),),
    aliases=("cfg-rescale", "RescaleCFG"),
    description="At high CFG scales, keeps the guided prediction's spread near the prompt's own "
                "(less burnt, less washed out with v-prediction models).",
)


# ---- FreeU ---------------------------------------------------------------------------------------------

FREEU_NAME = "FreeU Integrated (SD 1.x, SD 2.x, SDXL)"


class _FreeU:
    """FreeU for the whole pass: diffusers' ``enable_freeu`` on entering, ``disable_freeu`` on leaving."""

    def __init__(self, args: Args):
        self.scales = {"b1": args.b1, "b2": args.b2, "s1": args.s1, "s2": args.s2}
        self.window = (args.start, args.end)
        self._unet = None
        self._on = False

    def _switch(self, on: bool) -> None:
        if on != self._on:
            if on:
                self._unet.enable_freeu(**self.scales)
            else:
                self._unet.disable_freeu()
            self._on = on

    @contextlib.contextmanager
    def applied(self, unet):
        if not hasattr(unet, "enable_freeu"):
            raise ValueError(f"FreeU needs a diffusers UNet; this model's is a {type(unet).__name__}")
        self._unet, self._on = unet, False
        try:
            self._switch(self.window[0] <= 0.0)
            yield
        finally:
            unet.disable_freeu()
            self._unet, self._on = None, False


class _FreeUWindow(_FreeU):
    """FreeU for the steps whose step / (steps - 1) is within start and end, as Forge gates it."""

    def unet_inputs(self, call):
        start, end = self.window
        self._switch(start <= step_fraction(call.step) <= end)


FREEU = Script(
    FREEU_NAME, alwayson=True, enabled="enabled",
    params=(
        Param("enabled", False, label="Enabled", infotext="freeu_enabled", a1111=0),
        Param("b1", 1.01, label="B1", infotext="freeu_b1", minimum=0.0, maximum=2.0, step=0.01, a1111=1),
        Param("b2", 1.02, label="B2", infotext="freeu_b2", minimum=0.0, maximum=2.0, step=0.01, a1111=2),
        Param("s1", 0.99, label="S1", infotext="freeu_s1", minimum=0.0, maximum=4.0, step=0.01, a1111=3),
        Param("s2", 0.95, label="S2", infotext="freeu_s2", minimum=0.0, maximum=4.0, step=0.01, a1111=4),
        Param("start", 0.0, label="Start step", infotext="freeu_start", minimum=0.0, maximum=1.0, step=0.01,
              a1111=5),
        Param("end", 1.0, label="End step", infotext="freeu_end", minimum=0.0, maximum=1.0, step=0.01, a1111=6),
    ),
    hooks=lambda args, req: [_hook(_FreeU if (args.start, args.end) == (0.0, 1.0) else _FreeUWindow)(args)],
    aliases=("FreeU Integrated", "freeu-integrated"),
    description="Scales the UNet decoder's backbone features up (b1, b2) and the skip connections' low "
                "frequencies down (s1, s2): more detail for free. Forge's presets: SD 1.5 1.5, 1.6, 0.9, 0.2; "
                "SDXL 1.3, 1.4, 0.9, 0.2.",
)


@functools.cache
def _hook(mixin: type) -> type:
    """``mixin`` as an engine hook class (the engine, and torch, are imported here, when a job needs one)."""
    from ..engine.hooks import StepHook

    return type(mixin.__name__.lstrip("_"), (mixin, StepHook), {"__doc__": mixin.__doc__,
                                                                 "__module__": __name__})

