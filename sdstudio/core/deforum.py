"""Deforum settings, prompts by frame, seeds, batch names: the extension's behaviour, as plain data and functions.

The settings file is the JSON the Deforum extension (deforum-art/sd-webui-deforum) saves beside its frames
(``{timestring}_settings.txt``) and ships as ``scripts/default_settings.txt``. :func:`load_settings` takes it
as it is: every known key is typed and checked (an error names the key), keys the extension renamed are read
under their new names (its ``deprecation_utils``), unknown keys are kept and reported, missing keys take
:data:`DEFORUM_DEFAULTS` — the extension's UI defaults (``args.py``), which are what it fills in for a key its
file lacks. :meth:`DeforumSettings.to_json` writes them back in the same form, so a run can be repeated or
resumed, here or in the extension.

Prompts (:func:`prompts_by_frame`): the frame -> prompt JSON, each held until the next key; ``positive_prompts``
is put before and ``negative_prompts`` after every frame's own (joined with a space, as the extension does);
``--neg`` splits positive from negative; `` `t*0.1` `` is an expression of ``t``, ``max_f`` and ``s`` evaluated
per frame with the safe evaluator of :mod:`.keyframes` (the extension replaces every letter ``t`` inside the
backticks, so ``sqrt(t)`` breaks there; here it works). Interpolation mode blends neighbouring keys with the
extension's composable weights: ``(A):0.75 AND (B):0.25``.

Seeds (:func:`next_seed`): the extension's ``iter``/``fixed``/``random``/``ladder``/``alternate``/``schedule``
behaviours, in closed form (the seed of the k-th diffusion), so a resumed run gets the seeds the uninterrupted
run had; ``random`` (and -1 in a seed schedule) is drawn reproducibly from the run's seed instead of the
extension's unseeded ``random``.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RequestError
from .keyframes import (
    ExpressionError,
    Schedule,
    ScheduleError,
    StringSchedule,
    compile_expression,
    format_number,
    frame_of_key,
    parse_schedule,
    parse_string_schedule,
)


class DeforumSettingsError(RequestError):
    """A settings value that cannot be used; the message starts with the key."""


# ---- the extension's defaults (facts from its args.py, defaults.py and default_settings.txt) ------------

DEFAULT_PROMPTS = {
    "0": "tiny cute bunny, vibrant diffraction, highly detailed, intricate, ultra hd, sharp photo, crepuscular "
         "rays, in focus",
    "30": "anthropomorphic clean cat, surrounded by fractals, epic angle and pose, symmetrical, 3d, depth of field",
    "60": "a beautiful coconut --neg photo, realistic",
    "90": "a beautiful durian, award winning photography",
}

DEFAULT_GUIDED_IMAGES = ('{\n    "0": "https://deforum.github.io/a1/Gi1.png",\n'
                         '    "max_f/4-5": "https://deforum.github.io/a1/Gi2.png",\n'
                         '    "max_f/2-10": "https://deforum.github.io/a1/Gi3.png",\n'
                         '    "3*max_f/4-15": "https://deforum.github.io/a1/Gi4.jpg",\n'
                         '    "max_f-20": "https://deforum.github.io/a1/Gi1.png"\n}')

CONTROLNET_UNITS = 5  # units in the extension's settings files (more are read when a file has them)

_CN_DEFAULTS: dict[str, Any] = {
    "overwrite_frames": True, "vid_path": "", "mask_vid_path": "", "enabled": False, "low_vram": False,
    "pixel_perfect": False, "module": "none", "model": "None", "weight": "0:(1)", "guidance_start": "0:(0.0)",
    "guidance_end": "0:(1.0)", "processor_res": 64, "threshold_a": 64, "threshold_b": 64,
    "resize_mode": "Inner Fit (Scale to Fit)", "control_mode": "Balanced", "loopback_mode": False,
}

DEFORUM_DEFAULTS: dict[str, Any] = {
    # run (DeforumArgs)
    "W": 512, "H": 512, "show_info_on_ui": True, "tiling": False, "restore_faces": False,
    "seed_resize_from_w": 0, "seed_resize_from_h": 0, "seed": -1, "sampler": "Euler a", "steps": 25,
    "batch_name": "Deforum_{timestring}", "seed_behavior": "iter", "seed_iter_N": 1,
    # init
    "use_init": False, "strength": 0.8, "strength_0_no_init": True, "init_image": "https://deforum.github.io/a1/I1.png",
    "use_mask": False, "use_alpha_as_mask": False, "mask_file": "https://deforum.github.io/a1/M1.jpg",
    "invert_mask": False, "mask_contrast_adjust": 1.0, "mask_brightness_adjust": 1.0, "overlay_mask": True,
    "mask_overlay_blur": 4, "fill": "original", "full_res_mask": True, "full_res_mask_padding": 4,
    "reroll_blank_frames": "ignore", "reroll_patience": 10.0, "motion_preview_mode": False,
    # prompts
    "prompts": DEFAULT_PROMPTS, "positive_prompts": "", "negative_prompts": "nsfw, nude",
    # keyframes (DeforumAnimArgs)
    "animation_mode": "2D", "max_frames": 120, "border": "replicate",
    "angle": "0: (0)", "zoom": "0: (1.0025+0.002*sin(1.25*3.14*t/30))",
    "translation_x": "0: (0)", "translation_y": "0: (0)", "translation_z": "0: (1.75)",
    "transform_center_x": "0: (0.5)", "transform_center_y": "0: (0.5)",
    "rotation_3d_x": "0: (0)", "rotation_3d_y": "0: (0)", "rotation_3d_z": "0: (0)",
    "enable_perspective_flip": False, "perspective_flip_theta": "0: (0)", "perspective_flip_phi": "0: (0)",
    "perspective_flip_gamma": "0: (0)", "perspective_flip_fv": "0: (53)",
    "noise_schedule": "0: (0.065)", "strength_schedule": "0: (0.65)", "contrast_schedule": "0: (1.0)",
    "cfg_scale_schedule": "0: (7)", "enable_steps_scheduling": False, "steps_schedule": "0: (25)",
    "fov_schedule": "0: (70)", "aspect_ratio_schedule": "0: (1)", "aspect_ratio_use_old_formula": False,
    "near_schedule": "0: (200)", "far_schedule": "0: (10000)",
    "seed_schedule": '0:(s), 1:(-1), "max_f-2":(-1), "max_f-1":(s)',
    "pix2pix_img_cfg_scale_schedule": "0:(1.5)",
    "enable_subseed_scheduling": False, "subseed_schedule": "0: (1)", "subseed_strength_schedule": "0: (0)",
    "enable_sampler_scheduling": False, "sampler_schedule": '0: ("Euler a")',
    "use_noise_mask": False, "mask_schedule": '0: ("{video_mask}")', "noise_mask_schedule": '0: ("{video_mask}")',
    "enable_checkpoint_scheduling": False,
    "checkpoint_schedule": '0: ("model1.ckpt"), 100: ("model2.safetensors")',
    "enable_clipskip_scheduling": False, "clipskip_schedule": "0: (2)",
    "enable_noise_multiplier_scheduling": True, "noise_multiplier_schedule": "0: (1.05)",
    "resume_from_timestring": False, "resume_timestring": "20230129210106",
    "enable_ddim_eta_scheduling": False, "ddim_eta_schedule": "0: (0)",
    "enable_ancestral_eta_scheduling": False, "ancestral_eta_schedule": "0: (1)",
    # anti-blur
    "amount_schedule": "0: (0.1)", "kernel_schedule": "0: (5)", "sigma_schedule": "0: (1)",
    "threshold_schedule": "0: (0)",
    # coherence
    "color_coherence": "LAB", "color_coherence_image_path": "", "color_coherence_video_every_N_frames": 1,
    "color_force_grayscale": False, "legacy_colormatch": False,
    "diffusion_cadence": 2, "optical_flow_cadence": "None", "cadence_flow_factor_schedule": "0: (1)",
    "optical_flow_redo_generation": "None", "redo_flow_factor_schedule": "0: (1)", "diffusion_redo": "0",
    # noise
    "noise_type": "perlin", "perlin_w": 8.0, "perlin_h": 8.0, "perlin_octaves": 4, "perlin_persistence": 0.5,
    # 3D depth warping
    "use_depth_warping": True, "depth_algorithm": "Midas-3-Hybrid", "midas_weight": 0.2,
    "padding_mode": "border", "sampling_mode": "bicubic", "save_depth_maps": False,
    # video input
    "video_init_path": "https://deforum.github.io/a1/V1.mp4", "extract_nth_frame": 1, "extract_from_frame": 0,
    "extract_to_frame": -1, "overwrite_extracted_frames": False, "use_mask_video": False,
    "video_mask_path": "https://deforum.github.io/a1/VM1.mp4",
    # hybrid video
    "hybrid_comp_alpha_schedule": "0:(0.5)", "hybrid_comp_mask_blend_alpha_schedule": "0:(0.5)",
    "hybrid_comp_mask_contrast_schedule": "0:(1)", "hybrid_comp_mask_auto_contrast_cutoff_high_schedule": "0:(100)",
    "hybrid_comp_mask_auto_contrast_cutoff_low_schedule": "0:(0)", "hybrid_flow_factor_schedule": "0:(1)",
    "hybrid_generate_inputframes": False, "hybrid_generate_human_masks": "None",
    "hybrid_use_first_frame_as_init_image": True, "hybrid_motion": "None", "hybrid_motion_use_prev_img": False,
    "hybrid_flow_consistency": False, "hybrid_consistency_blur": 2, "hybrid_flow_method": "RAFT",
    "hybrid_composite": "None", "hybrid_use_init_image": False, "hybrid_comp_mask_type": "None",
    "hybrid_comp_mask_inverse": False, "hybrid_comp_mask_equalize": "None", "hybrid_comp_mask_auto_contrast": False,
    "hybrid_comp_save_extra_frames": False,
    # parseq (read, not run)
    "parseq_manifest": None, "parseq_use_deltas": True, "parseq_non_schedule_overrides": True,
    # guided images (LoopArgs)
    "use_looper": False, "init_images": DEFAULT_GUIDED_IMAGES, "image_strength_schedule": "0:(0.75)",
    "blendFactorMax": "0:(0.35)", "blendFactorSlope": "0:(0.25)", "tweening_frames_schedule": "0:(20)",
    "color_correction_factor": "0:(0.075)",
    # ControlNet units
    **{f"cn_{i}_{k}": v for i in range(1, CONTROLNET_UNITS + 1) for k, v in _CN_DEFAULTS.items()},
    # output (DeforumOutputArgs)
    "skip_video_creation": False, "fps": 15, "make_gif": False, "delete_imgs": False, "delete_input_frames": False,
    "add_soundtrack": "None", "soundtrack_path": "https://deforum.github.io/a1/A1.mp3",
    "r_upscale_video": False, "r_upscale_factor": "x2", "r_upscale_model": "realesr-animevideov3",
    "r_upscale_keep_imgs": True, "store_frames_in_ram": False,
    "frame_interpolation_engine": "None", "frame_interpolation_x_amount": 2,
    "frame_interpolation_slow_mo_enabled": False, "frame_interpolation_slow_mo_amount": 2,
    "frame_interpolation_keep_imgs": False, "frame_interpolation_use_upscaled": False,
}

# The extension's A1111 options (Settings > Deforum; ``options_overrides`` in its API), not settings-file keys.
DEFORUM_OPTIONS: dict[str, Any] = {
    "deforum_ffmpeg_crf": 17, "deforum_ffmpeg_preset": "slow", "deforum_keep_3d_models_in_vram": False,
    "deforum_save_gen_info_as_srt": False, "deforum_embed_srt": False, "deforum_preview": "Off",
    "deforum_preview_interval_frames": 100,
}
FFMPEG_PRESETS = ("veryslow", "slower", "slow", "medium", "fast", "faster", "veryfast", "superfast", "ultrafast")

# written by the extension beside the settings, kept as they are
METADATA_KEYS = ("sd_model_name", "sd_model_hash", "deforum_git_commit_id")

CHOICES: dict[str, tuple[str, ...]] = {
    "animation_mode": ("None", "2D", "3D", "Video Input", "Interpolation"),
    "border": ("replicate", "wrap"),
    "color_coherence": ("None", "HSV", "LAB", "RGB", "Video Input", "Image"),
    "optical_flow_cadence": ("None", "RAFT", "DIS Medium", "DIS Fine", "Farneback"),
    "optical_flow_redo_generation": ("None", "RAFT", "DIS Medium", "DIS Fine", "Farneback"),
    "noise_type": ("uniform", "perlin"),
    "depth_algorithm": ("Midas+AdaBins (old)", "Zoe+AdaBins (old)", "Midas-3-Hybrid", "Midas-3.1-BeitLarge",
                        "AdaBins", "Zoe", "Leres", "Depth-Anything"),
    "padding_mode": ("border", "reflection", "zeros"),
    "sampling_mode": ("bicubic", "bilinear", "nearest"),
    "hybrid_generate_human_masks": ("None", "PNGs", "Video", "Both"),
    "hybrid_motion": ("None", "Optical Flow", "Perspective", "Affine"),
    "hybrid_flow_method": ("RAFT", "DIS Medium", "DIS Fine", "Farneback"),
    "hybrid_composite": ("None", "Normal", "Before Motion", "After Generation"),
    "hybrid_comp_mask_type": ("None", "Depth", "Video Depth", "Blend", "Difference"),
    "hybrid_comp_mask_equalize": ("None", "Before", "After", "Both"),
    "seed_behavior": ("iter", "fixed", "random", "ladder", "alternate", "schedule"),
    "fill": ("fill", "original", "latent noise", "latent nothing"),
    "reroll_blank_frames": ("reroll", "interrupt", "ignore"),
    "add_soundtrack": ("None", "File", "Init Video"),
    "r_upscale_factor": ("x2", "x3", "x4"),
    # r_upscale_model: any upscaler of ours by name (the extension's three ncnn models when their files are there)
    "frame_interpolation_engine": ("None", "RIFE v4.6", "FILM"),
}
_CN_CHOICES = {
    "resize_mode": ("Outer Fit (Shrink to Fit)", "Inner Fit (Scale to Fit)", "Just Resize"),
    "control_mode": ("Balanced", "My prompt is more important", "ControlNet is more important"),
}

_ANIM_SCHEDULES = (
    "angle", "zoom", "translation_x", "translation_y", "translation_z", "transform_center_x", "transform_center_y",
    "rotation_3d_x", "rotation_3d_y", "rotation_3d_z", "perspective_flip_theta", "perspective_flip_phi",
    "perspective_flip_gamma", "perspective_flip_fv", "noise_schedule", "strength_schedule", "contrast_schedule",
    "cfg_scale_schedule", "steps_schedule", "fov_schedule", "aspect_ratio_schedule", "near_schedule",
    "far_schedule", "seed_schedule", "pix2pix_img_cfg_scale_schedule", "subseed_schedule",
    "subseed_strength_schedule", "clipskip_schedule", "noise_multiplier_schedule", "ddim_eta_schedule",
    "ancestral_eta_schedule", "amount_schedule", "kernel_schedule", "sigma_schedule", "threshold_schedule",
    "cadence_flow_factor_schedule", "redo_flow_factor_schedule", "hybrid_comp_alpha_schedule",
    "hybrid_comp_mask_blend_alpha_schedule", "hybrid_comp_mask_contrast_schedule",
    "hybrid_comp_mask_auto_contrast_cutoff_high_schedule", "hybrid_comp_mask_auto_contrast_cutoff_low_schedule",
    "hybrid_flow_factor_schedule", "image_strength_schedule", "blendFactorMax", "blendFactorSlope",
    "tweening_frames_schedule", "color_correction_factor",
)
STRING_SCHEDULE_KEYS = ("sampler_schedule", "checkpoint_schedule", "mask_schedule", "noise_mask_schedule")
# the schedules the extension reads with int() (truncated toward zero)
INT_SCHEDULE_KEYS = ("steps_schedule", "seed_schedule", "subseed_schedule", "clipskip_schedule", "kernel_schedule",
                     "hybrid_comp_mask_auto_contrast_cutoff_high_schedule",
                     "hybrid_comp_mask_auto_contrast_cutoff_low_schedule")

_CN_KEY = re.compile(r"cn_(\d+)_(\w+)")
_CN_SCHEDULES = ("weight", "guidance_start", "guidance_end")

# keys whose values are numbers that may be fractional though the default is whole
_FLOAT_KEYS = {"reroll_patience", "perlin_w", "perlin_h", "strength", "midas_weight", "perlin_persistence",
               "mask_contrast_adjust", "mask_brightness_adjust"}
_CN_NUMBER = {"threshold_a", "threshold_b"}  # int or float, kept as given
_STR_FROM_NUMBER = {"diffusion_redo", "resume_timestring", "sd_model_hash"}
_NULLABLE = {"init_image", "parseq_manifest"}
# the smallest value a whole-number key can take (the extension's sliders; below them a run breaks)
_MINIMUM = {"max_frames": 1, "diffusion_cadence": 1, "W": 64, "H": 64, "steps": 1, "seed_iter_N": 1, "fps": 1,
            "extract_nth_frame": 1, "perlin_octaves": 1, "color_coherence_video_every_N_frames": 1,
            "frame_interpolation_x_amount": 2, "frame_interpolation_slow_mo_amount": 2, "mask_overlay_blur": 0,
            "hybrid_consistency_blur": 0}

# renamed keys (the extension's deprecation_utils, and the names its UI and its saved files use for prompts)
ALIASES = {"flip_2d_perspective": "enable_perspective_flip", "skip_video_for_run_all": "skip_video_creation",
           "animation_prompts": "prompts", "animation_prompts_positive": "positive_prompts",
           "animation_prompts_negative": "negative_prompts"}
REMOVED_KEYS = {"histogram_matching": "removed by the extension; ignored"}
_OLD_VALUES: dict[str, dict[Any, str]] = {
    "color_coherence": {"Match Frame 0 HSV": "HSV", "Match Frame 0 LAB": "LAB", "Match Frame 0 RGB": "RGB"},
    "hybrid_composite": {False: "None", True: "Normal"},
    "optical_flow_redo_generation": {False: "None", True: "DIS Fine"},
    "optical_flow_cadence": {False: "None", True: "DIS Fine"},
    "add_soundtrack": {False: "None", True: "File"},
}
_OLD_CN_RESIZE = {"Envelope (Outer Fit)": "Outer Fit (Shrink to Fit)", "Scale to Fit (Inner Fit)": "Inner Fit (Scale to Fit)"}

SCHEDULE_KEYS = _ANIM_SCHEDULES + tuple(f"cn_{i}_{k}" for i in range(1, CONTROLNET_UNITS + 1) for k in _CN_SCHEDULES)


def _is_schedule(key: str) -> bool:
    m = _CN_KEY.fullmatch(key)
    return key in _ANIM_SCHEDULES or bool(m and m.group(2) in _CN_SCHEDULES)


def _default_for(key: str) -> tuple[bool, Any]:
    if key in DEFORUM_DEFAULTS:
        return True, DEFORUM_DEFAULTS[key]
    m = _CN_KEY.fullmatch(key)
    if m and int(m.group(1)) >= 1 and m.group(2) in _CN_DEFAULTS:
        return True, _CN_DEFAULTS[m.group(2)]
    return False, None


def _choices_for(key: str) -> tuple[str, ...] | None:
    if key in CHOICES:
        return CHOICES[key]
    m = _CN_KEY.fullmatch(key)
    return _CN_CHOICES.get(m.group(2)) if m else None


# ---- typing one value -------------------------------------------------------------------------------

def _shown(value: Any) -> str:
    """``value`` for a message, at most 80 characters (an int past Python's 4,300-digit limit has no repr)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 80:
        return f"a {value.bit_length()}-bit number"
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def _bad(key: str, value: Any, wanted: str) -> DeforumSettingsError:
    shown = _shown(value)
    return DeforumSettingsError(f"{key}: expected {wanted}, got {shown}")


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _bad(key, value, "true or false")


def _as_number(key: str, value: Any, whole: bool) -> int | float:
    if isinstance(value, bool):
        raise _bad(key, value, "a whole number" if whole else "a number")
    wanted = "a whole number" if whole else "a number"
    given = value
    if isinstance(value, str):
        try:
            value = int(value) if re.fullmatch(r"\s*[+-]?\d+\s*", value) else float(value.strip())
        except ValueError:
            raise _bad(key, given, wanted) from None
    if not isinstance(value, (int, float)):
        raise _bad(key, given, wanted)
    if isinstance(value, float) and not math.isfinite(value):
        raise _bad(key, given, "a finite number")
    if whole:
        if isinstance(value, float) and not value.is_integer():
            raise _bad(key, given, wanted)
        return int(value)
    try:
        return float(value)
    except OverflowError:  # an int past float's range
        raise _bad(key, given, "a finite number") from None


def _as_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if isinstance(value, str):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
    raise _bad(key, value, "one of " + ", ".join(repr(c) for c in choices))


def _backticks(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group(1)) for m in re.finditer(r"`(.*?)`", text)]


def _read_json(text: str, key: str) -> Any:
    """``text`` read as JSON; what json cannot read (bad syntax, a number over Python's 4,300-digit limit,
    nesting too deep) is a DeforumSettingsError naming ``key``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeforumSettingsError(f"{key}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
                                   f"{exc.colno})") from None
    except ValueError as exc:  # an integer of more digits than int() takes
        raise DeforumSettingsError(f"{key}: not readable JSON ({exc})") from None
    except RecursionError:
        raise DeforumSettingsError(f"{key}: not readable JSON (nested too deeply)") from None


def _check_prompts(key: str, value: Any, max_frames: int) -> dict[str, str]:
    if isinstance(value, str):
        value = _read_json(value, key)
    if not isinstance(value, Mapping):
        raise _bad(key, value, 'a JSON object of frame -> prompt, e.g. {"0": "a forest", "30": "a city"}')
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(v, str):
            raise DeforumSettingsError(f"{key}, key {k}: the prompt must be text, got {type(v).__name__}")
        try:
            frame_of_key(str(k), max_frames, label=key)
        except ScheduleError as exc:
            raise DeforumSettingsError(str(exc)) from None
        for start, expr in _backticks(v):
            try:
                compile_expression(expr)
            except ExpressionError as exc:
                raise DeforumSettingsError(f"{key}, key {k}, column {start + 1 + exc.column}: `{expr}`: "
                                           f"{exc.message}") from None
        out[str(k)] = v
    return out


def _typed(key: str, value: Any, default: Any, max_frames: int, notes: list[str]) -> Any:
    for old, new in _OLD_VALUES.get(key, {}).items():
        if type(value) is type(old) and value == old:
            notes.append(f"{key}: the old value {value!r} is read as {new!r}")
            value = new
            break
    m = _CN_KEY.fullmatch(key)
    if m and m.group(2) == "resize_mode" and isinstance(value, str) and value in _OLD_CN_RESIZE:
        notes.append(f"{key}: the old value {value!r} is read as {_OLD_CN_RESIZE[value]!r}")
        value = _OLD_CN_RESIZE[value]
    if key == "fill" and isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < len(CHOICES["fill"]):
            raise _bad(key, value, f"0..{len(CHOICES['fill']) - 1} or one of {', '.join(CHOICES['fill'])}")
        value = CHOICES["fill"][value]
    if key == "prompts":
        return _check_prompts(key, value, max_frames)
    if _is_schedule(key) or key in STRING_SCHEDULE_KEYS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            notes.append(f"{key}: the number {value!r} is read as the schedule '0:({value})'")
            value = f"0:({value})"
        if not isinstance(value, str):
            raise _bad(key, value, "a schedule like '0: (1.0), 30: (2.0)'")
        try:
            if key in STRING_SCHEDULE_KEYS:
                parse_string_schedule(value, max_frames, key)
            else:
                parse_schedule(value, max_frames, key)
        except ScheduleError as exc:
            raise DeforumSettingsError(str(exc)) from None
        return value
    choices = _choices_for(key)
    if choices is not None:
        return _as_choice(key, value, choices)
    if key == "sampler" and not isinstance(value, str):
        raise _bad(key, value, "a sampler name such as 'Euler a' (an index into A1111's list cannot be read)")
    if m and m.group(2) in _CN_NUMBER:
        number = _as_number(key, value, whole=False)
        return int(number) if float(number).is_integer() else number
    if isinstance(default, bool):
        return _as_bool(key, value)
    if isinstance(default, int) and key not in _FLOAT_KEYS:
        number = _as_number(key, value, whole=True)
        minimum = _MINIMUM.get(key)
        if minimum is not None and number < minimum:
            raise DeforumSettingsError(f"{key}: must be at least {minimum}, got {number}")
        return number
    if isinstance(default, float) or key in _FLOAT_KEYS:
        return _as_number(key, value, whole=False)
    if default is None or key in _NULLABLE:
        if value is None or isinstance(value, str):
            return value
        raise _bad(key, value, "text or null")
    if isinstance(value, str):
        return value
    if key in _STR_FROM_NUMBER and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None:
        return ""
    raise _bad(key, value, "text")


# ---- settings -------------------------------------------------------------------------------------

@dataclass
class DeforumSettings:
    """Every known key, typed (``values``); the keys we do not know, kept as given (``unknown``); and what was
    read differently from how it was written (``notes``: renamed keys, old values). ``settings.zoom`` and
    ``settings["zoom"]`` read a value."""

    values: dict[str, Any]
    unknown: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __getattr__(self, key: str) -> Any:
        values = self.__dict__.get("values")
        if values is not None and key in values:
            return values[key]
        raise AttributeError(key)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        """The settings as the extension saves them: known keys in its order, then the unknown ones."""
        return {**copy.deepcopy(self.values), **copy.deepcopy(self.unknown)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=4)

    def updated(self, changes: Mapping[str, Any]) -> DeforumSettings:
        """A copy with ``changes`` applied and checked as :func:`load_settings` checks a file (the CLI's --set)."""
        return load_settings({**self.to_dict(), **changes}, legacy_colormatch_default=False)

    def schedule(self, key: str) -> Schedule:
        return parse_schedule(self.values[key], self.values["max_frames"], key)

    def string_schedule(self, key: str) -> StringSchedule:
        return parse_string_schedule(self.values[key], self.values["max_frames"], key)

    def schedules(self, seed: int = -1) -> dict[str, list[float]]:
        """Every numeric schedule's per-frame values (``s`` = ``seed``), as the extension expands them at the
        start of a run; whole-number schedules (:data:`INT_SCHEDULE_KEYS`) truncated as its ``int()``."""
        out: dict[str, list[float]] = {}
        for key in self.values:
            if _is_schedule(key):
                sched = parse_schedule(self.values[key], self.values["max_frames"], key, seed=seed)
                out[key] = sched.ints(seed) if key in INT_SCHEDULE_KEYS else sched.values(seed)
        return out


def load_settings(source: str | bytes | Mapping[str, Any] | os.PathLike, *,
                  legacy_colormatch_default: bool = True) -> DeforumSettings:
    """Read the extension's settings: its saved ``.txt`` (JSON text), the parsed dict, or a path to the file.

    Missing keys take :data:`DEFORUM_DEFAULTS`, except ``legacy_colormatch``: the extension reads it as True
    for a file that lacks it (files older than the option; ``legacy_colormatch_default``)."""
    if isinstance(source, os.PathLike):
        with open(source, "rb") as f:
            source = f.read()
    if isinstance(source, bytes):
        try:
            source = source.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DeforumSettingsError(f"settings: not UTF-8 text (byte {exc.start})") from None
    if isinstance(source, str):
        data = _read_json(source.lstrip("\ufeff"), "settings")
    else:
        data = dict(source)
    if not isinstance(data, dict):
        raise DeforumSettingsError(f"settings: expected a JSON object of key -> value, got {type(data).__name__}")

    notes: list[str] = []
    given: dict[str, Any] = {}
    for key, value in data.items():
        key = str(key)
        if key in REMOVED_KEYS:
            notes.append(f"{key}: {REMOVED_KEYS[key]}")
            continue
        if key == "use_zoe_depth":
            algo = "Zoe+AdaBins (old)" if str(value) == "True" else "Midas+AdaBins (old)"
            notes.append(f"use_zoe_depth: read as depth_algorithm {algo!r}")
            given.setdefault("depth_algorithm", algo)
            continue
        if key in ALIASES:
            new = ALIASES[key]
            if new in data:
                continue  # the current name wins
            if key not in ("animation_prompts", "animation_prompts_positive", "animation_prompts_negative"):
                notes.append(f"{key}: renamed {new} by the extension; read as {new}")
            key = new
        given[key] = value
    if "legacy_colormatch" not in given and legacy_colormatch_default:
        given["legacy_colormatch"] = True
        notes.append("legacy_colormatch: missing, so True as the extension reads older files (color matching "
                     "before noise); set it to false for the newer colour coherence")

    max_frames = _typed("max_frames", given.get("max_frames", DEFORUM_DEFAULTS["max_frames"]), 120, 1, notes)
    if max_frames > MAX_FRAMES:  # the extension has no limit; per-frame lists of more would not fit in memory
        raise DeforumSettingsError(f"max_frames: at most {MAX_FRAMES:,} frames, got {_shown(max_frames)}")
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for key, default in DEFORUM_DEFAULTS.items():
        raw = given.get(key, default)
        values[key] = _typed(key, raw, default, max_frames, notes) if key in given else copy.deepcopy(default)
    for key, value in given.items():
        if key in values:
            continue
        known, default = _default_for(key)
        if known:
            values[key] = _typed(key, value, default, max_frames, notes)
        elif key in METADATA_KEYS:
            values[key] = value
        else:
            unknown[key] = value
    for key in ("W", "H"):
        if values[key] % 8:
            notes.append(f"{key}: {values[key]} is rounded down to {values[key] - values[key] % 8} "
                         "(a multiple of 8, as the extension does)")
            values[key] -= values[key] % 8
    if not 0.0 <= values["strength"] <= 1.0:
        clamped = min(1.0, max(0.0, values["strength"]))
        notes.append(f"strength: {values['strength']} is clamped to {clamped}, as the extension does")
        values["strength"] = clamped
    if not values["prompts"]:
        raise DeforumSettingsError('prompts: no prompt; give at least {"0": "a prompt"}')
    if values["resume_from_timestring"]:
        run_timestring(DeforumSettings(values))  # a resume_timestring that is a path is refused here
    if unknown:
        notes.append("unknown keys kept as given: " + ", ".join(sorted(unknown)))
    return DeforumSettings(values, unknown, notes)


# ---- prompts ------------------------------------------------------------------------------------------

def _merged(settings: DeforumSettings) -> dict[int, tuple[str, str]]:
    """Frame -> (positive, negative) of each key, with positive_prompts before and negative_prompts after, as
    the extension builds ``f"{positive} {prompt} --neg {negative}"``."""
    max_frames = settings["max_frames"]
    pos_all = settings["positive_prompts"].strip()
    neg_all = settings["negative_prompts"].replace("--neg", "").strip()
    frames: dict[int, tuple[str, str]] = {}
    for key, prompt in settings["prompts"].items():
        frame = frame_of_key(key, max_frames, label="prompts")
        positive, negative = split_negative(prompt)
        frames.pop(frame, None)
        frames[frame] = (_join(pos_all, positive), _join(negative, neg_all))
    if not any(0 <= f < max_frames for f in frames):
        raise DeforumSettingsError(f"prompts: no key inside frames 0..{max_frames - 1}")
    return dict(sorted(frames.items()))


def _join(*parts: str) -> str:
    return " ".join(p for p in (p.strip() for p in parts) if p)


def split_negative(prompt: str) -> tuple[str, str]:
    """``"a city --neg fog"`` -> ``("a city", "fog")``; text after a second ``--neg`` joins the negative."""
    positive, *negatives = prompt.split("--neg")
    return positive.strip(), _join(*negatives)


def _weight(w: float) -> str:
    text = repr(w)
    return text if "e" not in text else f"{w:.12f}".rstrip("0").rstrip(".")  # A1111's weight regex has no 1e-05


def _blend(a: str, b: str, wa: float, wb: float) -> str:
    parts = []
    if a:
        parts.append(f"({a}):{_weight(wa)}")
    if b:
        parts.append(f"({b}):{_weight(wb)}")
    return " AND ".join(parts)


def _by_frame(settings: DeforumSettings, interpolate: bool) -> list[tuple[str, str]]:
    n = settings["max_frames"]
    keys = _merged(settings)
    frames = list(keys)
    out: list[tuple[str, str] | None] = [None] * n
    if interpolate:
        # the extension's interpolate_prompts: weights in 1/gap steps between each pair of keys, keys outside
        # the run included (frames toward a key past the end blend toward it), key frames as written
        for cur, nxt in itertools.pairwise(frames):
            (cp, cn), (np_, nn) = keys[cur], keys[nxt]
            step = 1 / (nxt - cur)
            for f in range(max(cur + 1, 0), min(nxt, n)):
                wn = step * (f - cur)
                wc = 1 - wn
                out[f] = (_blend(cp, np_, wc, wn), _blend(cn, nn, wc, wn))
    for f, prompt in keys.items():
        if 0 <= f < n:
            out[f] = prompt
    # held until the next key; before the first key, the first key's prompt
    current = next(p for p in out if p is not None)
    for f in range(n):
        if out[f] is None:
            out[f] = current
        current = out[f]
    return out  # type: ignore[return-value]


def expand_backticks(text: str, frame: int, max_frames: int, seed: int = -1) -> str:
    """`` `expr` `` -> its value at ``frame`` (variables ``t``, ``max_f`` = max_frames-1, ``s``), printed as
    numexpr prints it (``7``, ``0.5``)."""
    def value(m: re.Match) -> str:
        expr = m.group(1)
        try:
            result = compile_expression(expr).evaluate(t=frame, max_f=max_frames - 1, s=seed)
        except ExpressionError as exc:
            raise DeforumSettingsError(f"prompts: `{expr}`, column {exc.column}: {exc.message} "
                                       f"(at frame {frame})") from None
        if isinstance(result, float) and not math.isfinite(result):
            raise DeforumSettingsError(f"prompts: `{expr}` is {result} at frame {frame}")
        try:
            return format_number(result)
        except ValueError:  # a whole number of more than 4300 digits
            raise DeforumSettingsError(f"prompts: `{expr}` is too large a number to write at frame {frame}") from None
    return re.sub(r"`(.*?)`", value, text)


def prompts_by_frame(settings: DeforumSettings, seed: int = -1) -> list[tuple[str, str]]:
    """(positive, negative) for every frame; Interpolation mode blends neighbouring keys, the other modes hold
    each key's prompt. Backtick expressions are evaluated per frame with ``s`` = ``seed``."""
    n = settings["max_frames"]
    interpolate = settings["animation_mode"] == "Interpolation"
    return [(expand_backticks(p, f, n, seed), expand_backticks(q, f, n, seed))
            for f, (p, q) in enumerate(_by_frame(settings, interpolate))]


# ---- seeds --------------------------------------------------------------------------------------------

SEED_MAX = 2**32 - 1


def fixed_seed(seed: int | None, rng: random.Random | None = None) -> int:
    """A1111's get_fixed_seed: -1 (or nothing) is a random seed below 4294967294."""
    if seed is None or seed == "" or int(seed) == -1:
        return int((rng or random).randrange(4294967294))
    return int(seed)


def _derived(seed: int, index: int, salt: str) -> int:
    digest = hashlib.sha256(f"deforum:{salt}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (SEED_MAX + 1)


def generation_index(frame: int, settings: DeforumSettings | Mapping[str, Any] | None = None) -> int:
    """Which diffusion of the run makes ``frame``: 2D/3D diffuse every ``diffusion_cadence``-th frame (the ones
    between are warped blends, which take the seed of the last diffusion before them); Video Input and
    Interpolation diffuse every frame."""
    get = settings.get if settings is not None else (lambda k, d=None: d)
    mode = get("animation_mode", "2D")
    cadence = int(get("diffusion_cadence", 1) or 1) if mode in ("2D", "3D") else 1
    return frame // max(1, cadence)


def next_seed(behavior: str, seed: int, frame: int,
              settings: DeforumSettings | Mapping[str, Any] | None = None) -> int:
    """The seed the extension diffuses ``frame`` with, for the run's (already fixed) ``seed``.

    The extension steps its seed after each diffusion (``next_seed`` in its seed.py); this is the same
    sequence in closed form for diffusion k = :func:`generation_index`: iter ``seed + ceil(k / N)``
    (N = ``seed_iter_N``), fixed ``seed``, ladder ``seed, +2, +1, +3, +2, ...``, alternate ``seed, +1, seed,
    +1, ...``, random: ``seed`` first, then seeds drawn from (seed, k), schedule: ``seed_schedule`` at the frame
    with ``s`` = seed, where -1 is a seed drawn from (seed, frame)."""
    get = settings.get if settings is not None else (lambda k, d=None: d)
    k = generation_index(frame, settings)
    if behavior == "iter":
        n = max(1, int(get("seed_iter_N", 1) or 1))
        return seed + (k + n - 1) // n
    if behavior == "fixed":
        return seed
    if behavior == "ladder":
        return seed + (k // 2 if k % 2 == 0 else (k + 3) // 2)
    if behavior == "alternate":
        return seed + k % 2
    if behavior == "random":
        return seed if k == 0 else _derived(seed, k, "random")
    if behavior == "schedule":
        text = get("seed_schedule", DEFORUM_DEFAULTS["seed_schedule"])
        max_frames = int(get("max_frames", frame + 1))
        value = parse_schedule(text, max_frames, "seed_schedule", seed=seed).ints(seed)[frame]
        return _derived(seed, frame, "schedule") if value == -1 else value
    raise DeforumSettingsError(f"seed_behavior: expected one of {', '.join(CHOICES['seed_behavior'])}, "
                               f"got {behavior!r}")


def seeds_by_frame(settings: DeforumSettings, seed: int) -> list[int]:
    """:func:`next_seed` for every frame of the run."""
    behavior = settings["seed_behavior"]
    if behavior == "schedule":  # parse once
        values = parse_schedule(settings["seed_schedule"], settings["max_frames"], "seed_schedule",
                                seed=seed).ints(seed)
        return [_derived(seed, f, "schedule") if v == -1 else v for f, v in enumerate(values)]
    return [next_seed(behavior, seed, f, settings) for f in range(settings["max_frames"])]


# ---- names and files ----------------------------------------------------------------------------------

def make_timestring(now: float | None = None) -> str:
    """The extension's run id: local time as YYYYMMDDHHMMSS."""
    return time.strftime("%Y%m%d%H%M%S", time.localtime(now))


def run_timestring(settings: DeforumSettings, now: float | None = None) -> str:
    """The resumed run's timestring when resuming, else a new one."""
    if settings["resume_from_timestring"] and str(settings["resume_timestring"]).strip():
        timestring = str(settings["resume_timestring"]).strip()
        if not re.fullmatch(r"[\w-]+", timestring):  # it names the run's files: never a path
            raise DeforumSettingsError(f"resume_timestring: {timestring!r} is not a run's timestring (such as "
                                       "20240101120000)")
        return timestring
    return make_timestring(now)


def format_batch_name(settings: DeforumSettings, timestring: str, seed: int) -> str:
    """``Deforum_{timestring}`` -> ``Deforum_20240101120000``, as the extension's substitute_placeholders: any
    settings key (case-insensitive) may be a placeholder, each value cut to 50 characters (an empty one is
    ``_``; ``{prompts}`` is the first prompt); an unknown placeholder is left as its own name; then the characters
    ``<>:"/\\|?*``, commas and white space become ``_``."""
    values = {k.lower(): v for k, v in settings.values.items()}
    values["timestring"] = timestring
    values["seed"] = seed

    def sub(m: re.Match) -> str:
        name = m.group(1).lower()
        value = values.get(name, name) or "_"
        if isinstance(value, Mapping) and value:
            first = next(iter(value.values()))
            value = first[0] if isinstance(first, list) and first else first
        return str(value)[:50]

    name = re.sub(r"{(\w+)}", sub, settings["batch_name"])
    name = re.sub(r'[<>:"/\\|?*\s,]', "_", name)
    return "_" if name in ("", ".", "..") else name  # a folder's name: never its parent or itself


MAX_FRAMES = 1_000_000  # 9 hours at 30 frames a second
MAX_FRAMES_AT_ALL = 1 << 31  # an open end for a range of frames (a run's own count ends it)


def independent_frames(settings: DeforumSettings) -> int:
    """How many frames of the run can be made apart from each other (in ranges, on several workers): 0 when
    a frame starts from or is colour-matched to an earlier one. Video Input and Interpolation frames start
    from the video's frame or from noise, so they are apart unless colour coherence matches each to the one
    before (RGB / HSV / LAB; None, Image and Video Input match nothing there, or one fixed picture). Video
    Input's count is ``max_frames``, an upper bound until the video is read."""
    if settings["animation_mode"] not in ("Video Input", "Interpolation"):
        return 0
    if settings["color_coherence"] not in ("None", "Image", "Video Input"):
        return 0
    return max(0, int(settings["max_frames"]))


def frame_filename(timestring: str, frame: int) -> str:
    return f"{timestring}_{frame:09d}.png"


def settings_filename(timestring: str) -> str:
    return f"{timestring}_settings.txt"


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


def _path_is_used(settings: DeforumSettings, key: str) -> bool:
    get = settings.get
    mode = get("animation_mode")
    hybrid = get("hybrid_composite") != "None" or get("hybrid_motion") != "None"
    rules = {
        "init_image": get("use_init") or get("hybrid_use_init_image"),
        "mask_file": get("use_mask"),
        "video_init_path": mode == "Video Input" or (mode in ("2D", "3D") and hybrid),
        "video_mask_path": get("use_mask_video"),
        "soundtrack_path": get("add_soundtrack") == "File",
        "color_coherence_image_path": get("color_coherence") == "Image",
        "init_images": get("use_looper"),
    }
    if key in rules:
        return bool(rules[key])
    m = _CN_KEY.fullmatch(key)
    if m and m.group(2) in ("vid_path", "mask_vid_path"):
        return bool(get(f"cn_{m.group(1)}_enabled"))
    raise KeyError(f"{key} is not a file setting")


PATH_KEYS = ("init_image", "mask_file", "video_init_path", "video_mask_path", "soundtrack_path",
             "color_coherence_image_path")


def local_path(settings: DeforumSettings, key: str) -> str | None:
    """The file a setting names, when the run uses it; None when unused or empty.

    The extension's defaults point at its web examples; sdstudio never downloads, so a used setting that is a URL
    is an error asking for the file itself."""
    if not _path_is_used(settings, key):
        return None
    value = settings.get(key)
    if value is None or not str(value).strip():
        return None
    value = str(value).strip()
    if value.lower().startswith("file://"):
        return value[7:]
    if _URL.match(value):
        name = value.rstrip("/").rsplit("/", 1)[-1] or "the file"
        raise DeforumSettingsError(f"{key} is {value}: files are never downloaded; put the file here "
                                   f"({name}) and give its path in {key}")
    return value


def guided_images(settings: DeforumSettings) -> dict[int, str]:
    """``init_images`` (guided images mode): frame -> local path; the same URL rule as :func:`local_path`."""
    if not settings.get("use_looper"):
        return {}
    data = _read_json(settings["init_images"], "init_images")
    if not isinstance(data, dict):
        raise DeforumSettingsError(f"init_images: expected a JSON object of frame -> image, got {type(data).__name__}")
    out = {}
    for k, v in data.items():
        frame = frame_of_key(str(k), settings["max_frames"], label="init_images")
        if _URL.match(str(v)) and not str(v).lower().startswith("file://"):
            raise DeforumSettingsError(f"init_images, key {k} is {v}: files are never downloaded; put the file "
                                       "here and give its path")
        out[frame] = str(v)[7:] if str(v).lower().startswith("file://") else str(v)
    return out


def check_files(settings: DeforumSettings) -> dict[str, str]:
    """Every file the run will read, by key; the first used URL raises (see :func:`local_path`)."""
    keys = list(PATH_KEYS) + [k for k in settings.values if _CN_KEY.fullmatch(k) and
                              _CN_KEY.fullmatch(k).group(2) in ("vid_path", "mask_vid_path")]
    out = {}
    for key in keys:
        path = local_path(settings, key)
        if path is not None:
            out[key] = path
    for frame, path in guided_images(settings).items():
        out[f"init_images[{frame}]"] = path
    return out
