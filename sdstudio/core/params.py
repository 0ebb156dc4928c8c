"""The typed request that flows from UI / API / CLI to the engine, and its infotext round trip.

Field names are A1111's API names (``sampler_name``, ``cfg_scale``, ``n_iter``...). The table
``INFOTEXT_FIELDS`` ties each infotext key to one field, so writing and reading infotext are the
same data read in two directions.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import infotext, scripts
from .errors import RequestError
from .imageops import MASKED_CONTENT, RESIZE_MODES
from .names import (
    UNI_PC_SKIP_TYPES,
    UNI_PC_VARIANTS,
    find_sampler,
    get_sampler,
    get_schedule,
    is_timestep_sampler,
    split_legacy_sampler,
)

RNG_SOURCES = ("GPU", "CPU", "NV")
REFINER_PASSES = ("first pass", "second pass", "both passes")  # A1111's option hires_fix_refiner_pass
EMPHASIS_MODES = ("Original", "No norm", "None")
FACE_RESTORERS = ("", "CodeFormer", "GFPGAN")  # "": A1111's default, CodeFormer, when installed
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4096  # one image; more does not fit a VAE decode on any consumer machine
MAX_PROMPT_CHARS = 50_000


@dataclass
class Txt2ImgRequest:
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = field(default_factory=list)  # applied to the prompts before generating
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    tiling: bool = False
    restore_faces: bool = False  # each picture's faces restored, before inpainting's composite (A1111's checkbox)
    face_restoration_model: str = ""  # "CodeFormer" or "GFPGAN"; "" = A1111's default (CodeFormer) when installed
    code_former_weight: float = 0.5  # CodeFormer's fidelity: 0 = the most effect, 1 = the least (A1111's setting)
    clip_skip: int = 1
    emphasis: str = "Original"  # A1111's emphasis modes: "Original" (rescale to the mean), "No norm", "None"
    novelai_braces: bool = False  # {x} weighs x by 1.05
    rng: str = "GPU"  # A1111's default; on a machine without CUDA "GPU" runs the NV imitation
    eta_noise_seed_delta: int = 0
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0
    always_discard_next_to_last_sigma: bool = False  # A1111's option; some samplers always do it
    # UniPC's A1111 settings: variant (bh1, bh2, vary_coeff), skip type, order, lower order final
    uni_pc_variant: str = "bh1"
    uni_pc_skip_type: str = "time_uniform"
    uni_pc_order: int = 3
    uni_pc_lower_order_final: bool = True
    extra_noise: float = 0.0  # img2img / hires pass: noise added to the start on top of the schedule's (A1111's option)
    model: str | None = None  # checkpoint name (file stem), title or short hash; None = current
    model_hash: str | None = None  # from a pasted infotext: finds the checkpoint when the name differs
    vae: str = "Automatic"  # "Automatic", "None" or a VAE name
    tiled_vae: bool = False  # decode (and encode) the VAE in overlapping tiles: big images in little memory
    # Hires. fix: a second img2img pass at a larger size (txt2img only)
    enable_hr: bool = False
    denoising_strength: float = 0.7  # of the hires pass (img2img: of the whole job)
    hr_scale: float = 2.0
    hr_resize_x: int = 0  # "Resize width to"; with hr_resize_y, replaces hr_scale
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"  # a latent mode (LATENT_UPSCALE_MODES) or an image upscaler's name
    hr_second_pass_steps: int = 0  # 0 = the same as steps
    hr_sampler_name: str = ""  # "" = the same sampler
    hr_scheduler: str = ""  # "" = the same schedule type
    hr_prompt: str = ""  # "" = the same prompt
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None  # None = the same CFG scale
    distilled_cfg_scale: float = 3.5  # Flux.1 dev's distilled guidance (Forge's "Distilled CFG Scale")
    # A1111's Refiner: another checkpoint takes over once this fraction of sampling is done ("" / "None": none)
    refiner_checkpoint: str = ""
    refiner_switch_at: float = 0.8
    # A1111's options for SDXL and the refiner (copied from the settings when a job is made)
    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    sdxl_refiner_low_aesthetic_score: float = 2.5  # the negative prompt's
    sdxl_refiner_high_aesthetic_score: float = 6.0
    hires_fix_refiner_pass: str = "second pass"  # with Hires. fix: "first pass", "second pass", "both passes"
    refiner_switch_by_sample_steps: bool = False  # switch by steps done instead of by noise level
    # A1111's speed options (its settings of the same names; sdstudio.engine.speed)
    s_min_uncond: float = 0.0  # "Negative Guidance minimum sigma": skip the negative prompt below it (0: off)
    s_min_uncond_all: bool = False  # ... at every step below it, not every other one
    pad_cond_uncond: bool = False  # pad prompt / negative prompt to one token length (one UNet batch)
    pad_cond_uncond_v0: bool = False  # the pre-1.6 DDIM padding (repeat / cut the negative prompt)
    token_merging_ratio: float = 0.0  # ToMe: share of the full-resolution self-attention tokens merged
    token_merging_ratio_hr: float = 0.0  # the Hires. fix pass's (0: the same as the first pass)
    token_merging_ratio_img2img: float = 0.0  # img2img's (0: token_merging_ratio)
    deepcache_interval: int = 0  # ours: the whole UNet every N-th step, its outer level only between (0/1: off)
    # sd-webui-controlnet's setting of that name: its batch tab moves the seed on by the job's image count after
    # each control picture (off: every picture gets the same seeds)
    controlnet_increment_seed_during_batch: bool = False
    script_name: str = ""  # a selectable script (sdstudio.core.scripts) for this kind of request; "" = none
    script_args: dict[str, Any] = field(default_factory=dict)
    # always-on scripts (dynamic thresholding, CFG rescale, a plug-in's...): {script name: {argument: value}}
    alwayson_scripts: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)  # infotext keys we do not interpret, kept

    def validate(self, catalog: scripts.ScriptCatalog | None = None, *, check_scripts: bool = True) -> Txt2ImgRequest:
        """Raise :class:`RequestError` naming the first bad field; returns self for chaining. Scripts are
        checked against ``catalog`` (default: the built-in scripts; a server passes its plug-ins' too),
        unless ``check_scripts`` is False (the engine, which runs no script)."""
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 64 or value > MAX_SIDE or value % 8:
                raise RequestError(f"{name} must be a multiple of 8 between 64 and {MAX_SIDE}, got {value!r}")
        if self.width * self.height > MAX_PIXELS:
            raise RequestError(f"{self.width}x{self.height} is over the limit of {MAX_PIXELS // 2**20} megapixels")
        for name, low, high in (("steps", 1, 1000), ("batch_size", 1, 64), ("n_iter", 1, 1000),
                                ("clip_skip", 1, 12)):
            value = getattr(self, name)
            if not isinstance(value, int) or not low <= value <= high:
                raise RequestError(f"{name} must be an integer from {low} to {high}, got {value!r}")
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise RequestError(f"subseed_strength must be between 0 and 1, got {self.subseed_strength!r}")
        if not 0.0 <= self.extra_noise <= 1.0:
            raise RequestError(f"extra_noise must be between 0 and 1, got {self.extra_noise!r}")
        if not 0.0 <= self.distilled_cfg_scale <= 100.0:
            raise RequestError(f"distilled_cfg_scale must be between 0 and 100, got {self.distilled_cfg_scale!r}")
        if not 0.0 <= self.cfg_scale <= 100.0:
            raise RequestError(f"cfg_scale must be between 0 and 100, got {self.cfg_scale!r}")
        if not 0.0 <= self.s_min_uncond <= 1000.0:
            raise RequestError(f"s_min_uncond must be between 0 (off) and 1000, got {self.s_min_uncond!r}")
        if not isinstance(self.deepcache_interval, int) or not 0 <= self.deepcache_interval <= 1000:
            raise RequestError(f"deepcache_interval must be an integer from 0 (off) to 1000, got "
                               f"{self.deepcache_interval!r}")
        for name in ("token_merging_ratio", "token_merging_ratio_hr", "token_merging_ratio_img2img"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise RequestError(f"{name} must be from 0 (off) to below 1, got {getattr(self, name)!r}")
        if not 0.0 <= self.code_former_weight <= 1.0:
            raise RequestError(f"code_former_weight must be between 0 and 1, got {self.code_former_weight!r}")
        if self.face_restoration_model not in FACE_RESTORERS:
            raise RequestError(f"face_restoration_model must be one of {', '.join(FACE_RESTORERS)}, got "
                               f"{self.face_restoration_model!r}")
        for name in ("prompt", "negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise RequestError(f"{name} is {len(getattr(self, name))} characters; the limit is {MAX_PROMPT_CHARS}")
        for name in ("model", "vae", "refiner_checkpoint"):
            check_model_name(getattr(self, name), name)
        if self.uses_refiner():
            if not 0.0 <= self.refiner_switch_at <= 1.0:
                raise RequestError(f"refiner_switch_at must be between 0 and 1, got {self.refiner_switch_at!r}")
            if self.hires_fix_refiner_pass not in REFINER_PASSES:
                raise RequestError(f"hires_fix_refiner_pass must be one of {', '.join(REFINER_PASSES)}, got "
                                   f"{self.hires_fix_refiner_pass!r}")
        if self.emphasis not in EMPHASIS_MODES:
            raise RequestError(f"emphasis must be one of {', '.join(EMPHASIS_MODES)}, got {self.emphasis!r}")
        if self.uni_pc_variant not in UNI_PC_VARIANTS:
            raise RequestError(f"uni_pc_variant must be one of {', '.join(UNI_PC_VARIANTS)}, got {self.uni_pc_variant!r}")
        if self.uni_pc_skip_type not in UNI_PC_SKIP_TYPES:
            raise RequestError(f"uni_pc_skip_type must be one of {', '.join(UNI_PC_SKIP_TYPES)}, got "
                               f"{self.uni_pc_skip_type!r}")
        if not isinstance(self.uni_pc_order, int) or not 1 <= self.uni_pc_order <= 50:
            raise RequestError(f"uni_pc_order must be an integer from 1 to 50, got {self.uni_pc_order!r}")
        if self.rng not in RNG_SOURCES:
            raise RequestError(f"rng must be one of {', '.join(RNG_SOURCES)}, got {self.rng!r}")
        try:
            get_sampler(self.sampler_name)
            get_schedule(self.scheduler)
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if self.enable_hr:
            self._validate_hires()
        if check_scripts:
            self._validate_scripts(catalog)
        return self

    def _validate_scripts(self, catalog: scripts.ScriptCatalog | None) -> None:
        catalog = catalog or scripts.builtin()
        try:
            if self.script_name:
                catalog.parse(self.script_name, self.script_args, self.kind, alwayson=False)
            for name, args in self.alwayson_scripts.items():
                catalog.parse(name, args, self.kind, alwayson=True)
        except scripts.ScriptError as exc:
            raise RequestError(str(exc)) from None

    @property
    def kind(self) -> str:
        return "txt2img"

    def _validate_hires(self) -> None:
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise RequestError(f"denoising_strength must be between 0 and 1, got {self.denoising_strength!r}")
        if not 1.0 <= self.hr_scale <= 8.0:
            raise RequestError(f"hr_scale must be between 1 and 8, got {self.hr_scale!r}")
        for name in ("hr_resize_x", "hr_resize_y"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0 or value > MAX_SIDE:
                raise RequestError(f"{name} must be 0 (unset) or a size up to {MAX_SIDE}, got {value!r}")
        if not isinstance(self.hr_second_pass_steps, int) or not 0 <= self.hr_second_pass_steps <= 1000:
            raise RequestError(f"hr_second_pass_steps must be an integer from 0 to 1000, got {self.hr_second_pass_steps!r}")
        if self.hr_cfg is not None and not 0.0 <= self.hr_cfg <= 100.0:
            raise RequestError(f"hr_cfg must be between 0 and 100, got {self.hr_cfg!r}")
        for name in ("hr_prompt", "hr_negative_prompt"):
            if len(getattr(self, name)) > MAX_PROMPT_CHARS:
                raise RequestError(f"{name} is over the limit of {MAX_PROMPT_CHARS} characters")
        if not self.hr_upscaler or len(self.hr_upscaler) > 200:
            raise RequestError(f"hr_upscaler must name an upscaler, got {self.hr_upscaler!r}")
        check_model_name(self.hr_upscaler, "hr_upscaler")
        try:
            get_sampler(self.hr_sampler_name or self.sampler_name)
            get_schedule(self.hr_scheduler or self.scheduler)
        except ValueError as exc:
            raise RequestError(f"hires: {exc}") from None
        (w, h), _ = self.hires_size()
        if w < 64 or h < 64 or w * h > MAX_PIXELS or max(w, h) > MAX_SIDE:
            raise RequestError(f"Hires. fix to {w}x{h} is outside 64..{MAX_SIDE} per side or over "
                               f"{MAX_PIXELS // 2**20} megapixels")

    def hires_size(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """A1111's Hires. fix geometry: ((width, height) the first pass is upscaled to, (truncate_x,
        truncate_y) latent pixels cropped off when both "resize to" sides are given and the aspect differs)."""
        rx, ry, w, h = self.hr_resize_x, self.hr_resize_y, self.width, self.height
        if rx == 0 and ry == 0:
            return (int(w * self.hr_scale), int(h * self.hr_scale)), (0, 0)
        if ry == 0:
            return (rx, rx * h // w), (0, 0)
        if rx == 0:
            return (ry * w // h, ry), (0, 0)
        if w / h < rx / ry:
            up = (rx, rx * h // w)
        else:
            up = (ry * w // h, ry)
        return up, ((up[0] - rx) // 8, (up[1] - ry) // 8)

    def uses_denoising(self) -> bool:
        """Whether ``denoising_strength`` matters (and is written to the infotext)."""
        return self.enable_hr

    def uses_refiner(self) -> bool:
        return bool(self.refiner_checkpoint) and self.refiner_checkpoint != "None"

    def replace(self, **changes: Any) -> Txt2ImgRequest:
        return dataclasses.replace(self, **changes)

    def with_concrete_seeds(self) -> Txt2ImgRequest:
        """-1 (random) seeds drawn now, so the request re-creates its images wherever it runs next."""
        return self.replace(seed=concrete_seed(self.seed), subseed=concrete_seed(self.subseed))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the queue stores requests as JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Txt2ImgRequest:
        """The inverse of :meth:`to_dict`; unknown keys are a :class:`RequestError` naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise RequestError(f"unknown request field(s): {', '.join(unknown)}")
        return cls(**data)


MAX_SEED = 4294967294


# A1111 options that are request fields of the same name: a job keeps the values set when it was made.
OPTION_FIELDS = ("sdxl_crop_top", "sdxl_crop_left", "sdxl_refiner_low_aesthetic_score",
                 "sdxl_refiner_high_aesthetic_score", "hires_fix_refiner_pass", "refiner_switch_by_sample_steps",
                 "s_min_uncond", "s_min_uncond_all", "pad_cond_uncond", "pad_cond_uncond_v0", "token_merging_ratio",
                 "token_merging_ratio_hr", "token_merging_ratio_img2img", "deepcache_interval",
                 "controlnet_increment_seed_during_batch")


def option_fields(options) -> dict[str, Any]:
    """The request fields ``options`` (settings, with a request's ``override_settings``) give values to."""
    from .settings import BY_KEY

    return {key: BY_KEY[key].convert(value) for key in OPTION_FIELDS if (value := options.get(key)) is not None}


def token_merging_ratio(req: Txt2ImgRequest, hires: bool = False) -> float:
    """A1111's ``get_token_merging_ratio``: the Hires. fix pass's own ratio if set, else the first pass's;
    an img2img job's own ratio if set, else the general one."""
    if hires:
        return req.token_merging_ratio_hr or req.token_merging_ratio
    if isinstance(req, Img2ImgRequest):
        return req.token_merging_ratio_img2img or req.token_merging_ratio
    return req.token_merging_ratio


def check_model_name(name: str | None, field_name: str) -> None:
    """Model names are looked up in the model folders; a path that could leave them is refused."""
    if not name:
        return
    text = str(name).replace("\\", "/")
    if text.startswith("/") or re.match(r"^[A-Za-z]:", text) or ".." in text.split(" [")[0].split("/"):
        raise RequestError(f"{field_name}: {name!r} is a path; give a model name from the model folders")


def concrete_seed(seed: int | None) -> int:
    """A1111's rule: -1 (or nothing) means a random seed, which is then written down."""
    return int(random.randrange(MAX_SEED)) if seed is None or int(seed) == -1 else int(seed)


# Soft inpainting's settings in A1111's order (after "Soft inpainting enabled"): (field, infotext key, lowest,
# highest), the ranges of A1111's sliders
SOFT_INPAINTING_FIELDS = (("mask_blend_power", "Soft inpainting schedule bias", 0, 8),
                          ("mask_blend_scale", "Soft inpainting preservation strength", 0, 8),
                          ("inpaint_detail_preservation", "Soft inpainting transition contrast boost", 1, 32),
                          ("composite_mask_influence", "Soft inpainting mask influence", 0, 1),
                          ("composite_difference_threshold", "Soft inpainting difference threshold", 0, 8),
                          ("composite_difference_contrast", "Soft inpainting difference contrast", 0, 8))


@dataclass
class Img2ImgRequest(Txt2ImgRequest):
    """txt2img's fields plus the init image(s) (paths of files the job owns) and A1111's inpaint options."""

    init_images: list[Any] = field(default_factory=list)  # paths (what a job stores); scripts' inner passes: PIL images
    mask: Any = None  # a path (or a PIL image, as above); white = repaint (see inpainting_mask_invert)
    denoising_strength: float = 0.75
    resize_mode: int = 0  # RESIZE_MODES index
    mask_blur: int = 4
    inpainting_fill: int = 1  # MASKED_CONTENT index: fill, original, latent noise, latent nothing
    inpaint_full_res: bool = False  # "Only masked"
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: int = 0  # 1 = "Inpaint not masked"
    initial_noise_multiplier: float = 1.0
    inpainting_mask_weight: float = 1.0  # conditioning mask strength (9-channel inpainting models)
    fix_steps: bool = False  # "do exactly the amount of steps the slider specifies"
    # Soft inpainting (A1111's built-in script; sdstudio.engine.soft_inpaint): the mask's blur is kept
    soft_inpainting: bool = False
    mask_blend_power: float = 1.0  # "Schedule bias"
    mask_blend_scale: float = 0.5  # "Preservation strength"
    inpaint_detail_preservation: float = 4.0  # "Transition contrast boost"
    composite_mask_influence: float = 0.0  # "Mask influence"
    composite_difference_threshold: float = 0.5  # "Difference threshold"
    composite_difference_contrast: float = 2.0  # "Difference contrast"

    def validate(self, catalog: scripts.ScriptCatalog | None = None, *, check_scripts: bool = True) -> Img2ImgRequest:
        super().validate(catalog, check_scripts=False)
        if not self.init_images:
            raise RequestError("img2img needs an init image")
        if self.enable_hr:
            raise RequestError("Hires. fix is a txt2img option; img2img sets its size directly")
        if not 0.0 <= self.denoising_strength <= 1.0:
            raise RequestError(f"denoising_strength must be between 0 and 1, got {self.denoising_strength!r}")
        if self.resize_mode not in range(len(RESIZE_MODES)):
            raise RequestError(f"resize_mode must be 0-{len(RESIZE_MODES) - 1}, got {self.resize_mode!r}")
        if self.inpainting_fill not in range(len(MASKED_CONTENT)):
            raise RequestError(f"inpainting_fill must be 0-{len(MASKED_CONTENT) - 1}, got {self.inpainting_fill!r}")
        if not 0 <= self.mask_blur <= 256:
            raise RequestError(f"mask_blur must be from 0 to 256, got {self.mask_blur!r}")
        if not 0 <= self.inpaint_full_res_padding <= 1024:
            raise RequestError(f"inpaint_full_res_padding must be from 0 to 1024, got {self.inpaint_full_res_padding!r}")
        if not 0.0 <= self.inpainting_mask_weight <= 1.0:
            raise RequestError(f"inpainting_mask_weight must be between 0 and 1, got {self.inpainting_mask_weight!r}")
        for name, _key, low, high in SOFT_INPAINTING_FIELDS:
            value = getattr(self, name)
            if not low <= value <= high:
                raise RequestError(f"{name} must be from {low:g} to {high:g}, got {value!r}")
        if check_scripts:
            self._validate_scripts(catalog)
        return self

    def uses_denoising(self) -> bool:
        return True

    @property
    def kind(self) -> str:
        return "img2img"

    def steps_to_run(self) -> tuple[int, int]:
        """A1111's rule: (length of the full schedule, steps actually run). Normally
        ``int(steps × strength) + 1`` of ``steps``; with ``fix_steps`` exactly ``steps`` of a longer schedule."""
        strength = min(self.denoising_strength, 0.999)
        if self.fix_steps:
            return (int(self.steps / strength) if strength > 0 else 0), self.steps
        return self.steps, int(strength * self.steps) + 1


# ---- infotext <-> request ------------------------------------------------------------------------

def _fmt_float(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match:
        raise RequestError(f"bad size {text!r}; expected WxH such as 512x768")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class InfotextField:
    key: str
    write: Callable[[Txt2ImgRequest], object | None]  # None = not written
    read: Callable[[str], dict[str, Any]]


def _soft(req) -> bool:
    return bool(getattr(req, "soft_inpainting", False) and getattr(req, "mask", None))


def _simple(key: str, attr: str, conv: Callable[[str], Any], *, skip: Callable[[Any], bool] = lambda v: False,
            show: Callable[[Any], object] = lambda v: v) -> InfotextField:
    def write(req: Txt2ImgRequest) -> object | None:
        if not hasattr(req, attr):  # e.g. "Denoising strength" of a txt2img request
            return None
        value = getattr(req, attr)
        return None if skip(value) else show(value)

    return InfotextField(key, write, lambda text: {attr: conv(text)})


def _unipc(key: str, attr: str, conv: Callable[[str], Any]) -> InfotextField:
    """One of UniPC's A1111 settings, whose infotext key A1111 reads back as a setting: written when UniPC
    samples a pass (first or hires) with a value other than the request field's default."""
    default = Txt2ImgRequest.__dataclass_fields__[attr].default

    def write(req: Txt2ImgRequest) -> object | None:
        hires = getattr(req, "hr_sampler_name", "") if getattr(req, "enable_hr", False) else ""
        uses = any(s is not None and s.function == "unipc" for s in map(find_sampler, (req.sampler_name, hires)))
        value = getattr(req, attr)
        return value if uses and value != default else None

    return InfotextField(key, write, lambda text: {attr: conv(text)})


def _read_sampler(text: str) -> dict[str, Any]:
    sampler, schedule = split_legacy_sampler(text)
    return {"sampler_name": sampler, **({"scheduler": schedule} if schedule else {})}


def _read_int(text: str) -> int:
    return int(float(text))


def _read_bool(text: str) -> bool:
    return text.strip().lower() in ("true", "1", "yes", "on")


def _hires(req: Txt2ImgRequest) -> bool:
    return req.enable_hr


# Reading: each infotext key sets request fields. Writing: each returns its value or None (left out).
INFOTEXT_FIELDS: tuple[InfotextField, ...] = (
    _simple("Steps", "steps", _read_int),
    InfotextField("Sampler", lambda r: r.sampler_name, _read_sampler),
    _simple("Schedule type", "scheduler", str, skip=lambda v: v in ("", "Automatic")),
    _simple("CFG scale", "cfg_scale", float, show=_fmt_float),
    _simple("Seed", "seed", _read_int),
    InfotextField("Face restoration", lambda r: (r.face_restoration_model or "CodeFormer") if r.restore_faces else None,
                  lambda t: {"restore_faces": bool(t.strip()), "face_restoration_model": t.strip()}),
    InfotextField("CodeFormer weight",  # ours: A1111 keeps the weight in its settings only
                  lambda r: _fmt_float(r.code_former_weight) if r.restore_faces and
                  (r.face_restoration_model or "CodeFormer") == "CodeFormer" else None,
                  lambda t: {"code_former_weight": float(t)}),
    InfotextField("Size", lambda r: f"{r.width}x{r.height}",
                  lambda t: dict(zip(("width", "height"), _parse_size(t)))),
    InfotextField("Model hash", lambda r: None, lambda t: {"model_hash": t.strip()}),  # written by the engine
    # the refiner's keys are written by the engine, and only when it took over (as A1111)
    InfotextField("Distilled CFG Scale", lambda r: None, lambda t: {"distilled_cfg_scale": float(t)}),  # by the engine
    InfotextField("Refiner", lambda r: None, lambda t: {"refiner_checkpoint": t.strip()}),
    InfotextField("Refiner switch at", lambda r: None, lambda t: {"refiner_switch_at": float(t)}),
    InfotextField("Hires refiner", lambda r: None, lambda t: {"hires_fix_refiner_pass": t.strip()}),
    InfotextField("Refiner switch by sampling steps", lambda r: None,
                  lambda t: {"refiner_switch_by_sample_steps": _read_bool(t)}),
    _simple("Model", "model", str, skip=lambda v: not v),
    _simple("VAE", "vae", str, skip=lambda v: v in ("", "Automatic", "None")),
    _simple("Clip skip", "clip_skip", _read_int, skip=lambda v: v <= 1),
    _simple("Tiling", "tiling", _read_bool, skip=lambda v: not v),
    _simple("Emphasis", "emphasis", str, skip=lambda v: v == "Original"),
    _simple("NovelAI braces", "novelai_braces", _read_bool, skip=lambda v: not v),
    InfotextField("Variation seed", lambda r: r.subseed if r.subseed_strength > 0 else None,
                  lambda t: {"subseed": _read_int(t)}),
    InfotextField("Variation seed strength",
                  lambda r: _fmt_float(r.subseed_strength) if r.subseed_strength > 0 else None,
                  lambda t: {"subseed_strength": float(t)}),
    InfotextField("Seed resize from",
                  lambda r: f"{r.seed_resize_from_w}x{r.seed_resize_from_h}"
                  if r.seed_resize_from_w > 0 and r.seed_resize_from_h > 0 else None,
                  lambda t: dict(zip(("seed_resize_from_w", "seed_resize_from_h"), _parse_size(t)))),
    _simple("RNG", "rng", str, skip=lambda v: v == "GPU"),
    _simple("ENSD", "eta_noise_seed_delta", _read_int, skip=lambda v: not v),
    # A1111's two keys: "Eta DDIM" for DDIM-family samplers (default 0), "Eta" for the rest (default 1)
    InfotextField("Eta", lambda r: _fmt_float(r.eta) if r.eta is not None and r.eta != 1.0
                  and not is_timestep_sampler(r.sampler_name) else None, lambda t: {"eta": float(t)}),
    InfotextField("Eta DDIM", lambda r: _fmt_float(r.eta) if r.eta is not None and r.eta != 0.0
                  and is_timestep_sampler(r.sampler_name) else None, lambda t: {"eta": float(t)}),
    _simple("Sigma churn", "s_churn", float, skip=lambda v: not v, show=_fmt_float),
    _simple("Sigma tmin", "s_tmin", float, skip=lambda v: not v, show=_fmt_float),
    _simple("Sigma noise", "s_noise", float, skip=lambda v: v == 1.0, show=_fmt_float),
    _simple("Discard penultimate sigma", "always_discard_next_to_last_sigma", _read_bool, skip=lambda v: not v),
    _unipc("UniPC variant", "uni_pc_variant", str),
    _unipc("UniPC skip type", "uni_pc_skip_type", str),
    _unipc("UniPC order", "uni_pc_order", _read_int),
    _unipc("UniPC lower order final", "uni_pc_lower_order_final", _read_bool),
    InfotextField("Extra noise", lambda r: _fmt_float(r.extra_noise) if r.extra_noise and r.uses_denoising() else None,
                  lambda t: {"extra_noise": float(t)}),
    _simple("Tiled VAE", "tiled_vae", _read_bool, skip=lambda v: not v),
    # A1111's speed options: the ratios in effect; "NGMS all steps" and "Pad conds" are written by the engine,
    # as A1111 does, only when they acted
    InfotextField("Token merging ratio", lambda r: _fmt_float(token_merging_ratio(r)) if token_merging_ratio(r)
                  else None, lambda t: {"token_merging_ratio": float(t), "token_merging_ratio_img2img": 0.0}),
    InfotextField("Token merging ratio hr", lambda r: _fmt_float(token_merging_ratio(r, hires=True))
                  if r.enable_hr and token_merging_ratio(r, hires=True) else None,
                  lambda t: {"token_merging_ratio_hr": float(t)}),
    _simple("NGMS", "s_min_uncond", float, skip=lambda v: not v, show=_fmt_float),
    InfotextField("NGMS all steps", lambda r: None, lambda t: {"s_min_uncond_all": _read_bool(t)}),
    InfotextField("Pad conds", lambda r: None, lambda t: {"pad_cond_uncond": _read_bool(t)}),
    InfotextField("Pad conds v0", lambda r: None, lambda t: {"pad_cond_uncond_v0": _read_bool(t)}),
    _simple("DeepCache interval", "deepcache_interval", _read_int, skip=lambda v: v <= 1),  # ours
    # img2img, and txt2img's Hires. fix
    InfotextField("Denoising strength", lambda r: _fmt_float(r.denoising_strength) if r.uses_denoising() else None,
                  lambda t: {"denoising_strength": float(t)}),
    InfotextField("Hires upscale", lambda r: _fmt_float(r.hr_scale) if _hires(r) and not (r.hr_resize_x or r.hr_resize_y)
                  else None, lambda t: {"hr_scale": float(t)}),
    InfotextField("Hires resize", lambda r: f"{r.hr_resize_x}x{r.hr_resize_y}" if _hires(r) and
                  (r.hr_resize_x or r.hr_resize_y) else None,
                  lambda t: dict(zip(("hr_resize_x", "hr_resize_y"), _parse_size(t)))),
    InfotextField("Hires steps", lambda r: r.hr_second_pass_steps if _hires(r) and r.hr_second_pass_steps else None,
                  lambda t: {"hr_second_pass_steps": _read_int(t)}),
    InfotextField("Hires upscaler", lambda r: r.hr_upscaler if _hires(r) else None, lambda t: {"hr_upscaler": t.strip()}),
    InfotextField("Hires sampler", lambda r: r.hr_sampler_name if _hires(r) and r.hr_sampler_name else None,
                  lambda t: {"hr_sampler_name": "" if t.strip() == "Use same sampler" else t.strip()}),
    InfotextField("Hires schedule type", lambda r: r.hr_scheduler if _hires(r) and r.hr_scheduler else None,
                  lambda t: {"hr_scheduler": "" if t.strip() == "Use same scheduler" else t.strip()}),
    InfotextField("Hires prompt", lambda r: r.hr_prompt if _hires(r) and r.hr_prompt and r.hr_prompt != r.prompt
                  else None, lambda t: {"hr_prompt": t}),
    InfotextField("Hires negative prompt", lambda r: r.hr_negative_prompt if _hires(r) and r.hr_negative_prompt
                  and r.hr_negative_prompt != r.negative_prompt else None, lambda t: {"hr_negative_prompt": t}),
    InfotextField("Hires CFG Scale", lambda r: _fmt_float(r.hr_cfg) if _hires(r) and r.hr_cfg is not None
                  and r.hr_cfg != r.cfg_scale else None, lambda t: {"hr_cfg": float(t)}),
    # img2img / inpaint (written only for an Img2ImgRequest)
    InfotextField("Mask blur", lambda r: r.mask_blur if getattr(r, "mask", None) else None,
                  lambda t: {"mask_blur": _read_int(t)}),
    InfotextField("Mask mode", lambda r: "Inpaint not masked" if getattr(r, "mask", None) and r.inpainting_mask_invert
                  else None, lambda t: {"inpainting_mask_invert": int(t.strip() == "Inpaint not masked")}),
    InfotextField("Masked content", lambda r: MASKED_CONTENT[r.inpainting_fill]
                  if getattr(r, "mask", None) and r.inpainting_fill != 1 else None,
                  lambda t: {"inpainting_fill": MASKED_CONTENT.index(t.strip())}),
    InfotextField("Inpaint area", lambda r: "Only masked" if getattr(r, "mask", None) and r.inpaint_full_res else None,
                  lambda t: {"inpaint_full_res": t.strip() == "Only masked"}),
    InfotextField("Masked area padding", lambda r: r.inpaint_full_res_padding
                  if getattr(r, "mask", None) and r.inpaint_full_res else None,
                  lambda t: {"inpaint_full_res_padding": _read_int(t)}),
    InfotextField("Resize mode", lambda r: RESIZE_MODES[r.resize_mode] if getattr(r, "resize_mode", 0) else None,
                  lambda t: {"resize_mode": RESIZE_MODES.index(t.strip())}),
    _simple("Noise multiplier", "initial_noise_multiplier", float, skip=lambda v: v == 1.0, show=_fmt_float),
    InfotextField("Soft inpainting enabled", lambda r: True if _soft(r) else None,
                  lambda t: {"soft_inpainting": t.strip().lower() == "true"}),
    *(InfotextField(key, lambda r, a=attr: _fmt_float(getattr(r, a)) if _soft(r) else None,
                    lambda t, a=attr: {a: float(t)}) for attr, key, _low, _high in SOFT_INPAINTING_FIELDS),
)
_FIELD_BY_KEY = {f.key: f for f in INFOTEXT_FIELDS}

# A1111's key order; keys not listed (extensions, scripts, keys we keep unread) go before Version.
KEY_ORDER = (
    "Steps", "Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale", "Seed", "Face restoration", "CodeFormer weight", "Size",
    "Model hash", "Model", "VAE hash", "VAE", "Denoising strength", "Mask blur", "Mask mode", "Masked content", "Inpaint area",
    "Masked area padding", "Resize mode", "Noise multiplier", "Clip skip", "Tiling", "Variation seed", "Variation seed strength",
    "Seed resize from", "RNG", "ENSD", "Eta", "Sigma churn", "Sigma tmin", "Sigma noise", "Discard penultimate sigma",
    "Extra noise", "Hires upscale",
    "Hires resize", "Hires steps", "Hires upscaler", "Hires sampler", "Hires schedule type", "Hires prompt",
    "Hires negative prompt", "Hires CFG Scale", "Tiled VAE", "Lora hashes", "TI hashes", "Refiner", "Refiner switch at",
    "Hires refiner", "Refiner switch by sampling steps", "Emphasis",
    "Token merging ratio", "Token merging ratio hr", "NGMS", "NGMS all steps", "Pad conds", "Pad conds v0",
    "DeepCache interval",
)
# Keys that describe the result rather than the request: never turned into request fields.
_RESULT_KEYS = {"VAE hash", "Version"}


def to_infotext_params(req: Txt2ImgRequest, **resolved: object) -> dict[str, object]:
    """Ordered infotext pairs for one image.

    ``resolved`` holds what the engine decided, by infotext key: ``Seed`` (this image's seed),
    ``Model hash``, ``Model``, ``VAE hash``, ``VAE``, ``Schedule type``, ``Version``... and the scripts'
    pairs (:meth:`sdstudio.core.scripts.ScriptCatalog.infotext_pairs`).
    """
    pairs: dict[str, object] = {f.key: f.write(req) for f in INFOTEXT_FIELDS}
    pairs.update(req.extra)
    pairs.update(resolved)
    rank = {key: i for i, key in enumerate(KEY_ORDER)}
    ordered = sorted((k for k in pairs if k != "Version"), key=lambda k: rank.get(k, len(rank)))
    params: dict[str, object] = {infotext.PROMPT: req.prompt, infotext.NEGATIVE: req.negative_prompt}
    params.update({k: pairs[k] for k in ordered})
    params["Version"] = pairs.get("Version")
    return params


def from_infotext(text_or_params: str | dict[str, str], base: Txt2ImgRequest | None = None,
                  catalog: scripts.ScriptCatalog | None = None) -> Txt2ImgRequest:
    """A request that re-creates the image described by an infotext (A1111, Forge or ours).

    Missing keys take A1111's meaning of absence (Clip skip 1, RNG GPU, Schedule type Automatic);
    keys we do not interpret are kept in ``extra`` so they are written back unchanged. The scripts'
    keys are read by ``catalog`` (default: the built-in scripts).
    """
    params = infotext.parse(text_or_params) if isinstance(text_or_params, str) else dict(text_or_params)
    req = base.replace() if base else Txt2ImgRequest()
    changes: dict[str, Any] = {
        "prompt": params.pop(infotext.PROMPT, ""), "negative_prompt": params.pop(infotext.NEGATIVE, ""),
        "clip_skip": 1, "rng": "GPU", "scheduler": "Automatic", "subseed_strength": 0.0,
        "seed_resize_from_w": 0, "seed_resize_from_h": 0, "tiling": False, "extra": {}, "model_hash": None,
        "restore_faces": False, "face_restoration_model": "", "code_former_weight": 0.5,
        "styles": [],  # the infotext holds the styled prompt already
        "emphasis": "Original", "novelai_braces": False, "tiled_vae": False, "enable_hr": False,
        "always_discard_next_to_last_sigma": False, "extra_noise": 0.0,
        "refiner_checkpoint": "", "hires_fix_refiner_pass": "second pass", "refiner_switch_by_sample_steps": False,
        "s_min_uncond": 0.0, "s_min_uncond_all": False, "pad_cond_uncond": False, "pad_cond_uncond_v0": False,
        "token_merging_ratio": 0.0, "token_merging_ratio_hr": 0.0, "token_merging_ratio_img2img": 0.0,
        "deepcache_interval": 0, "controlnet_increment_seed_during_batch": False,
    }
    extra: dict[str, str] = {}
    own = {f.name for f in dataclasses.fields(req)}
    try:
        script, alwayson, used = (catalog or scripts.builtin()).from_infotext_pairs(params)
    except scripts.ScriptError as exc:
        raise RequestError(f"infotext: {exc}") from None
    params = {k: v for k, v in params.items() if k not in used}
    changes.update(script_name=script[0] if script else "", script_args=script[1] if script else {},
                   alwayson_scripts=alwayson)
    for key, value in params.items():
        f = _FIELD_BY_KEY.get(key)
        try:
            if f is not None:
                read = f.read(value)
                if set(read) <= own:
                    changes.update(read)
                else:  # a key this kind of request does not have (Denoising strength for txt2img): kept
                    extra[key] = value
            elif key not in _RESULT_KEYS:
                extra[key] = value
        except (ValueError, TypeError, OverflowError) as exc:  # OverflowError: Steps: 1e999
            raise RequestError(f"infotext field {key}: cannot read {value!r} ({exc})") from None
    changes["extra"] = extra
    # A1111's rule: Hires. fix was on when the text has a denoising strength and a hires key
    hires_keys = ("Hires upscale", "Hires resize", "Hires upscaler", "Hires steps")
    if "enable_hr" in own and "Denoising strength" in params and any(k in params for k in hires_keys):
        changes["enable_hr"] = not isinstance(req, Img2ImgRequest)
    return req.replace(**changes)


PNG_INFO_FIELDS = ("prompt", "negative_prompt", "seed", "sampler_name", "scheduler", "cfg_scale", "steps")


def with_png_info(req: Txt2ImgRequest, text: str | None) -> Txt2ImgRequest:
    """img2img batch "use PNG info": an input picture's own prompt, seed, sampler and steps replace the form's."""
    if not text:
        return req
    pasted = from_infotext(text, req)
    return req.replace(**{f: getattr(pasted, f) for f in PNG_INFO_FIELDS})

