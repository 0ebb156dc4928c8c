"""The server's settings (A1111's "options"): one set of keys, kept in ``config.json`` in the data dir.

The UI's Settings tab and the API's ``/sdapi/v1/options`` read and write the same :class:`Settings`; a
job copies what it needs when it is queued, so a change applies to later jobs and never to one under
way. Keys are A1111's, so a pasted ``override_settings`` or an A1111 ``config.json`` means the same here;
keys we do not know are kept as they are and written back untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .names import UNI_PC_SKIP_TYPES, UNI_PC_VARIANTS, is_timestep_sampler


class SettingError(ValueError):
    """A value a setting cannot take; the message names the setting."""


@dataclass(frozen=True)
class Setting:
    key: str
    default: Any
    label: str
    section: str
    choices: tuple[str, ...] | None = None  # fixed choices (others, e.g. checkpoints, are filled by the UI)
    minimum: float | None = None
    maximum: float | None = None

    def convert(self, value: Any) -> Any:
        kind = type(self.default)
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.strip().lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError("not a yes/no value")
                    value = value.strip().lower() in ("true", "1", "yes")
                out = bool(value)
            elif kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError("not a whole number")
                out = int(value)
            elif kind is float:
                out = float(value)
            else:
                out = "" if value is None else str(value)
        except (TypeError, ValueError) as exc:
            raise SettingError(f"{self.key}: {value!r} is not usable ({exc})") from None
        if self.choices is not None and out not in self.choices:
            raise SettingError(f"{self.key}: {out!r} is not one of {', '.join(self.choices)}")
        if self.minimum is not None and out < self.minimum or self.maximum is not None and out > self.maximum:
            raise SettingError(f"{self.key}: {out!r} is outside {self.minimum}..{self.maximum}")
        return out


SETTINGS: tuple[Setting, ...] = (
    Setting("sd_model_checkpoint", "", "Stable Diffusion checkpoint", "Stable Diffusion"),
    Setting("sd_vae", "Automatic", "SD VAE", "Stable Diffusion"),
    Setting("CLIP_stop_at_last_layers", 1, "Clip skip", "Stable Diffusion", minimum=1, maximum=12),
    Setting("emphasis", "Original", "Emphasis mode", "Stable Diffusion", choices=("Original", "No norm", "None")),
    Setting("randn_source", "GPU", "Random number generator source", "Stable Diffusion", choices=("GPU", "CPU", "NV")),
    Setting("eta_noise_seed_delta", 0, "Eta noise seed delta", "Sampler parameters", minimum=0),
    Setting("eta_ddim", 0.0, "Eta for DDIM", "Sampler parameters", minimum=0.0, maximum=1.0),
    Setting("eta_ancestral", 1.0, "Eta for k-diffusion samplers", "Sampler parameters", minimum=0.0, maximum=1.0),
    Setting("uni_pc_variant", "bh1", "UniPC variant", "Sampler parameters", choices=UNI_PC_VARIANTS),
    Setting("uni_pc_skip_type", "time_uniform", "UniPC skip type", "Sampler parameters", choices=UNI_PC_SKIP_TYPES),
    Setting("uni_pc_order", 3, "UniPC order", "Sampler parameters", minimum=1, maximum=50),
    Setting("uni_pc_lower_order_final", True, "UniPC lower order final", "Sampler parameters"),
    # A1111's speed options, with its labels (request fields of the same names; sdstudio.engine.speed)
    Setting("s_min_uncond", 0.0, "Negative Guidance minimum sigma", "Optimizations", minimum=0.0, maximum=15.0),
    Setting("s_min_uncond_all", False, "Negative Guidance minimum sigma all steps", "Optimizations"),
    Setting("token_merging_ratio", 0.0, "Token merging ratio", "Optimizations", minimum=0.0, maximum=0.9),
    Setting("token_merging_ratio_img2img", 0.0, "Token merging ratio for img2img", "Optimizations",
            minimum=0.0, maximum=0.9),
    Setting("token_merging_ratio_hr", 0.0, "Token merging ratio for high-res pass", "Optimizations",
            minimum=0.0, maximum=0.9),
    Setting("pad_cond_uncond", False, "Pad prompt/negative prompt", "Optimizations"),
    Setting("pad_cond_uncond_v0", False, "Pad prompt/negative prompt (v0)", "Optimizations"),
    Setting("deepcache_interval", 0, "DeepCache interval (ours: the whole UNet every N steps; 0 = off)",
            "Optimizations", minimum=0, maximum=1000),
    Setting("img2img_fix_steps", False, "With img2img, do exactly the amount of steps the slider specifies",
            "img2img"),
    Setting("initial_noise_multiplier", 1.0, "Noise multiplier for img2img", "img2img", minimum=0.0, maximum=1.5),
    Setting("inpainting_mask_weight", 1.0, "Inpainting conditioning mask strength", "img2img",
            minimum=0.0, maximum=1.0),
    Setting("sdxl_crop_top", 0, "crop top coordinate", "Stable Diffusion XL", minimum=0, maximum=8192),
    Setting("sdxl_crop_left", 0, "crop left coordinate", "Stable Diffusion XL", minimum=0, maximum=8192),
    Setting("sdxl_refiner_low_aesthetic_score", 2.5, "SDXL low aesthetic score (the refiner's negative prompt)",
            "Stable Diffusion XL", minimum=0.0, maximum=10.0),
    Setting("sdxl_refiner_high_aesthetic_score", 6.0, "SDXL high aesthetic score (the refiner's prompt)",
            "Stable Diffusion XL", minimum=0.0, maximum=10.0),
    Setting("hires_fix_refiner_pass", "second pass", "Hires fix: which pass to enable refiner for", "Refiner",
            choices=("first pass", "second pass", "both passes")),
    Setting("refiner_switch_by_sample_steps", False,
            "Switch to refiner by sampling steps instead of model timesteps. Old behavior for refiner.", "Refiner"),
    Setting("face_restoration_model", "CodeFormer", "Face restoration model", "Face restoration",
            choices=("CodeFormer", "GFPGAN")),
    Setting("code_former_weight", 0.5, "CodeFormer weight (0 = maximum effect, 1 = minimum effect)",
            "Face restoration", minimum=0.0, maximum=1.0),
    Setting("samples_format", "png", "File format for images", "Saving images", choices=("png", "jpg", "webp")),
    Setting("live_previews_enable", True, "Show live previews of the created image", "Live previews"),
    Setting("show_progress_every_n_steps", 1, "Live preview display period (steps)", "Live previews",
            minimum=1, maximum=32),
    Setting("show_progress_type", "Approx cheap", "Live preview method", "Live previews",
            choices=("Full", "Approx NN", "Approx cheap", "TAESD")),  # TAESD, Approx NN: models/VAE-approx
    Setting("live_preview_refresh_period", 1000, "Preview picture update period (ms)", "Live previews",
            minimum=100, maximum=60000),
    Setting("localization", "None", "Localization", "User interface"),
    Setting("sdstudio_max_queued_per_client", 50, "Jobs one client may have waiting in the queue", "System",
            minimum=1, maximum=100000),
    # sd-webui-controlnet's own keys
    Setting("control_net_unit_count", 3, "Multi-ControlNet: ControlNet unit number (requires restart)", "ControlNet",
            minimum=1, maximum=10),
    Setting("control_net_no_detectmap", False, "Do not append detectmap to output", "ControlNet"),
    Setting("control_net_detectmap_autosaving", False, "Allow detectmap auto saving", "ControlNet"),
    Setting("controlnet_increment_seed_during_batch", False, "Increment seed after each controlnet batch iteration",
            "ControlNet"),
)
BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


def eta_for(settings: dict, sampler_name: str, eta: float | None) -> float | None:
    """A1111's eta for a job: the request's own, else its setting for the sampler's kind ("Eta for DDIM",
    ``eta_ddim``, for DDIM-family samplers; "Eta for k-diffusion samplers", ``eta_ancestral``, for the rest);
    None where that setting is absent or at its default (0 and 1: what the samplers do by themselves). A value
    that is not a number is a SettingError naming the key."""
    if eta is not None:
        return eta
    key = "eta_ddim" if is_timestep_sampler(sampler_name) else "eta_ancestral"
    if settings.get(key) is None:
        return None
    try:
        value = float(settings[key])
    except (TypeError, ValueError):
        raise SettingError(f"{key}: {settings[key]!r} is not a number") from None
    return None if value == BY_KEY[key].default else value


def sections() -> list[tuple[str, list[Setting]]]:
    out: dict[str, list[Setting]] = {}
    for s in SETTINGS:
        out.setdefault(s.section, []).append(s)
    return list(out.items())


class Settings:
    """The values (``values``: a plain dict the API serves as ``/options``) and their file.

    ``checks`` maps a key to a function that returns the stored form of a value or raises
    :class:`SettingError` (the server adds checkpoint and VAE names that must exist)."""

    def __init__(self, path: Path | None = None, overrides: dict[str, Any] | None = None,
                 checks: dict[str, Callable[[Any], Any]] | None = None):
        self.path = Path(path) if path is not None else None
        self.checks = dict(checks or {})
        self.values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
        if self.path is not None and self.path.is_file():
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise SettingError(f"{self.path}: not a readable settings file ({exc}); fix or remove it") from None
            if not isinstance(stored, dict):
                raise SettingError(f"{self.path}: settings must be a JSON object")
            for key, value in stored.items():
                setting = BY_KEY.get(key)
                try:
                    self.values[key] = setting.convert(value) if setting else value
                except SettingError:
                    pass  # a value we cannot use (another program's file): keep our default
        self.values.update(overrides or {})

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def check(self, changes: dict[str, Any]) -> dict[str, Any]:
        """The changes in their stored form; the first unusable one raises :class:`SettingError`."""
        out = {}
        for key, value in changes.items():
            setting = BY_KEY.get(key)
            value = setting.convert(value) if setting else value
            if key in self.checks:
                value = self.checks[key](value)
            out[key] = value
        return out

    def update(self, changes: dict[str, Any], save: bool = True) -> list[str]:
        """Apply checked changes (all or none); returns the keys whose value changed."""
        checked = self.check(changes)
        changed = [k for k, v in checked.items() if self.values.get(k) != v]
        self.values.update(checked)
        if save and changed:
            self.save()
        return changed

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.values, indent=4, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, self.path)
