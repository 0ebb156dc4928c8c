"""ControlNet on the engine's per-step hooks: each enabled unit becomes one :class:`ControlHook`.

Preparing a unit (:meth:`ControlNets.hooks`, before sampling): its control image (the unit's, or the
img2img init image when it has none) goes through the preprocessor at the processor resolution (or the
"pixel perfect" one) into the *detected map*; the map is what the user sees beside the images. At each
UNet call of an active step the hook brings the map to the call's size (the resize mode; Hires. fix's
second pass gets its own size), runs the ControlNet on the UNet's own inputs and hands back the residuals,
scaled as sd-webui-controlnet scales them:

- Balanced: every output × weight;
- "My prompt is more important" and "ControlNet is more important" (soft injection): output ``i`` of the
  13 (SD 1.x; SDXL: the first 10 of the same 13) × ``weight * 0.825 ** (12 - i)``, so the deep outputs
  count most; T2I-Adapters ``weight * (0.25, 0.62, 0.825, 1.0)``. Canny and M-LSD maps get soft injection
  in the Hires. fix pass whatever the mode, as the extension does;
- "ControlNet is more important" also applies the control to the prompt's evaluation only (the negative
  prompt's rows get none), so CFG pushes towards the control;
- ``advanced_weighting`` replaces the scales.

The unit is active at sampling step ``i`` of ``n`` when ``guidance_start <= i / n <= guidance_end``, and,
in a job with Hires. fix, in the passes its ``hr_option`` names. Residuals of several units are summed
by the sampling plan.

Other kinds of unit (:attr:`PreparedUnit.kind`) have their own modules: IP-Adapter (:mod:`.ip_adapter`),
reference (:mod:`.reference`), ReVision (:mod:`.revision`), the T2I style adapter (:mod:`.t2i_style`) and
ControlNet-LLLite (:mod:`.lllite`); a ControlNet++ union model runs in :class:`ControlHook` through
:mod:`.controlnet_union`; inpaint_only adds :class:`InpaintOnlyHook`.
"""

from __future__ import annotations

import base64
import binascii
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

from ..core.controlnet import SCRIPT_NAME, ControlNetError, ControlUnit, Preprocessor
from ..core.imageops import UPLOAD_FORMATS
from . import preprocessors
from .controlnet_union import type_index, union_forward
from .hooks import StepHook, UNetCall

MAX_CONTROL_PIXELS = 64 * 1024 * 1024
# the unit kinds (PreparedUnit.kind) whose input is a picture map, shown after the images when asked
MAP_KINDS = ("controlnet", "reference", "lllite")
SOFT_DECAY = 0.825
ADAPTER_SOFT = (0.25, 0.62, 0.825, 1.0)
HIRES_SOFT_MODULES = ("canny", "mlsd")  # their maps get soft injection in the Hires. fix pass
LAMA = "inpaint_only+lama"


def decode_image(data: str | Image.Image, what: str) -> Image.Image:
    """A unit's image: base64 (optionally a ``data:`` URL) or a PIL image (in-process callers). Paths are
    never read: a request names no server file."""
    if isinstance(data, Image.Image):
        return data
    text = data.split(",", 1)[-1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise ControlNetError(f"{what}: not valid base64") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=UPLOAD_FORMATS)  # the API's formats: no EPS via Ghostscript
        w, h = image.size
        if w * h > MAX_CONTROL_PIXELS:
            raise ControlNetError(f"{what}: {w}x{h} is over the limit of {MAX_CONTROL_PIXELS // 2**20} megapixels")
        image.load()
    except ControlNetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is this unit's bad image, never a crash
        raise ControlNetError(f"{what}: not an image that can be read ({type(exc).__name__})") from None
    return ImageOps.exif_transpose(image)


def _rgb_array(image: Image.Image) -> np.ndarray:
    """RGB uint8 (transparent pixels on black, as the extension's HWC3 drops alpha)."""
    if image.mode not in ("RGB", "L", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = (arr[:, :, :3].astype(np.float32) * alpha).round().astype(np.uint8)
    return np.ascontiguousarray(arr[:, :, :3])


def _mask_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """A mask as H×W uint8 (255 = masked), at ``size`` (w, h); an RGBA mask's alpha counts as the mask."""
    if image.mode == "RGBA" and np.asarray(image)[:, :, 3].min() < 255:
        gray = image.getchannel("A")
    else:
        gray = image.convert("L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.NEAREST)
    return np.where(np.asarray(gray) > 127, 255, 0).astype(np.uint8)


def is_image_prompt_module(name: str) -> bool:
    """An IP-Adapter unit's preprocessor (CLIP or face embedding: the unit's hook encodes the picture)."""
    return name.startswith("ip-adapter") or name == "instant_id_face_embedding"


def is_instant_id(title: str) -> bool:
    """An InstantID ControlNet, told by its name as the extension tells it (its layout is a plain SDXL one)."""
    return "instant_id" in str(title).lower()


@dataclass
class PreparedUnit:
    index: int
    unit: ControlUnit
    preprocessor: Preprocessor
    detected: np.ndarray  # H×W×3 (×4 for inpaint: RGB and the mask) uint8, before fitting to a pass size
    model: object | None  # sdstudio.models.controlnet.ControlModel
    path: object = None  # the model file (IP-Adapter units, whose hooks load it themselves)
    region: np.ndarray | None = None  # the effective region mask, H×W float32 in 0-1 (None: everywhere)
    more: tuple[np.ndarray, ...] = ()  # an IP-Adapter unit's further images (the extension's Multi-Inputs)

    @property
    def kind(self) -> str:
        """What runs the unit: "ip-adapter", "revision", "reference", "t2i_style" (a style adapter's tokens),
        "lllite" (ControlNet-LLLite) or "controlnet" (ControlNets, T2I-Adapters)."""
        name = self.preprocessor.name
        if is_image_prompt_module(name):
            return "ip-adapter"
        if name.startswith("revision"):
            return "revision"
        if name.startswith("reference"):
            return "reference"
        if self.model is not None and self.model.spec.kind in ("t2i_style", "lllite"):
            return self.model.spec.kind
        return "controlnet"


class ControlHook(StepHook):
    """One enabled unit's per-step hook (see the module's docstring)."""

    def __init__(self, prepared: PreparedUnit, device: torch.device, dtype: torch.dtype, hires_job: bool):
        from .preprocessors import fit_to

        self.prepared, self.unit = prepared, prepared.unit
        self.start, self.end = self.unit.guidance_start, self.unit.guidance_end
        self.device, self.dtype, self.hires_job = device, dtype, hires_job
        self.owner = f"{SCRIPT_NAME} unit {prepared.index}"
        self._fit = fit_to
        self._hints: dict[tuple[int, int], torch.Tensor] = {}
        self._adapter: dict[tuple[int, int], list[torch.Tensor]] = {}
        model = prepared.model
        # a Control-LoRA, once completed from the base UNet, is a ControlNet like the others
        self.kind = None if model is None else "t2i_adapter" if model.spec.kind == "t2i_adapter" else "controlnet"
        self.union = model is not None and model.spec.kind == "controlnet_union"  # a control type per unit
        self.region = region_tensor(prepared.region)
        self.module = model.module if model is not None else None
        # InstantID: the ControlNet's context is the previous IP-Adapter unit's image prompt, not the text
        self.context_prompt = None

    # ---- when -----------------------------------------------------------------------------------------
    def active(self, step) -> bool:
        if self.module is None or not self.start <= step.fraction <= self.end:
            return False
        return self.unit.in_pass(step.pass_name, self.hires_job)

    def applied(self, unet):
        import contextlib

        if self.module is not None:
            want = unet.config.get("cross_attention_dim")
            have = self.module.config.get("cross_attention_dim", want) if hasattr(self.module, "config") else want
            if self.kind == "controlnet" and want != have:
                raise ControlNetError(
                    f"{self.owner}: the ControlNet {self.unit.model} is for another model family (context width "
                    f"{have}) than this checkpoint ({want}); pick a ControlNet made for it")
            if not self.unit.low_vram:
                self._place(self.device)
        return contextlib.nullcontext()

    def _place(self, device) -> None:
        """The model on ``device`` in the pass's dtype (nothing to do when it is there already)."""
        first = next(self.module.parameters(), None)
        want = torch.device(device)
        here = first is not None and first.dtype == self.dtype and first.device.type == want.type and \
            (want.index is None or first.device.index == want.index)
        if first is not None and not here:
            self.module.to(want, self.dtype)

    # ---- what -----------------------------------------------------------------------------------------
    def hint(self, height: int, width: int) -> torch.Tensor:
        """The detected map at a pass's pixel size, as the ControlNet's input (1×C×H×W in [0, 1]; the
        inpaint protocol's 4 channels become RGB with masked pixels at -1)."""
        key = (height, width)
        if key not in self._hints:
            fitted = self._fit(self.prepared.detected, width, height, self.unit.resize_mode)
            x = torch.from_numpy(np.array(fitted, dtype=np.float32)).div(255.0).permute(2, 0, 1)[None]
            if x.shape[1] == 4:
                rgb, mask = x[:, :3], (x[:, 3:4] > 0.5).float()
                x = rgb * (1 - mask) - mask
            self._hints = {key: x}  # one pass size at a time
        return self._hints[key]

    def scales(self, count: int, hires: bool) -> list[float]:
        """The weight of each of the ``count`` control outputs (see the module's docstring)."""
        unit, w = self.unit, self.unit.weight
        if unit.advanced_weighting is not None:
            weights = list(unit.advanced_weighting)
            if len(weights) < count:
                raise ControlNetError(f"{self.owner}: advanced_weighting has {len(weights)} weights; this model "
                                      f"has {count} control outputs")
            return weights[:count]
        soft = unit.soft_injection or hires and any(m in self.prepared.preprocessor.name for m in HIRES_SOFT_MODULES)
        if not soft:
            return [w] * count
        if self.kind == "t2i_adapter":
            return [w * s for s in ADAPTER_SOFT][:count] + [w] * max(0, count - len(ADAPTER_SOFT))
        return [w * SOFT_DECAY ** float(12 - i) for i in range(max(13, count))][:count]

    def finish_image(self, image: Image.Image, index: int) -> Image.Image:
        """inpaint_only: the unmasked part of the control image pasted back over the picture (the mask
        dilated and blurred by the extension's σ 7, so the seam lies just outside it)."""
        if not self.prepared.preprocessor.name.startswith("inpaint_only") or self.prepared.detected.shape[2] != 4:
            return image
        from .preprocessors import inpaint_blend_mask

        w, h = image.size
        fitted = self._fit(self.prepared.detected, w, h, self.unit.resize_mode)
        keep_generated = inpaint_blend_mask(fitted[:, :, 3])[:, :, None]
        out = np.asarray(image.convert("RGB"), dtype=np.float32) * keep_generated + \
            fitted[:, :, :3].astype(np.float32) * (1.0 - keep_generated)
        return Image.fromarray(np.clip(out.round(), 0, 255).astype(np.uint8))

    def _rows_mask(self, call: UNetCall, like: torch.Tensor) -> torch.Tensor | None:
        if not self.unit.cfg_injection or not any(call.uncond):
            return None
        keep = torch.tensor([0.0 if u else 1.0 for u in call.uncond], device=like.device, dtype=like.dtype)
        return keep.view(-1, *([1] * (like.ndim - 1)))

    def unet_inputs(self, call: UNetCall):
        x = call.x
        in_channels = self.module.config.get("in_channels", 4) if hasattr(self.module, "config") else 4
        if self.kind == "controlnet" and x.shape[1] != in_channels:
            x = x[:, :in_channels]  # a 9-channel inpainting UNet: the ControlNet sees the latent only
        height, width = x.shape[-2] * 8, x.shape[-1] * 8
        hires = call.step.pass_name == "hires"
        rows = x.shape[0]
        if self.unit.low_vram:
            self._place(self.device)
        try:
            if self.kind == "t2i_adapter":
                return self._adapter_inputs(call, x, height, width, hires)
            hint = self.hint(height, width).to(x.device, self.dtype).expand(rows, -1, -1, -1)
            kwargs = {}
            if call.added_cond_kwargs is not None:
                kwargs["added_cond_kwargs"] = call.added_cond_kwargs
            context = call.encoder_hidden_states
            if self.context_prompt is not None:  # each row's image prompt (the negative rows' blank one)
                context = self.context_prompt.for_rows(call.uncond, rows, x.device, self.dtype)
            if self.union:
                down, mid = union_forward(self.module, x.to(self.dtype), call.timestep, context,
                                          hint, type_index(self.unit.union_control_type), call.added_cond_kwargs)
            else:
                down, mid = self.module(x.to(self.dtype), call.timestep, encoder_hidden_states=context,
                                        controlnet_cond=hint, conditioning_scale=1.0, return_dict=False, **kwargs)
        finally:
            if self.unit.low_vram:
                self._place("cpu")
        scales = self.scales(len(down) + 1, hires)
        down = [in_region(d * s, self.region) for d, s in zip(down, scales[:-1])]
        mid = in_region(mid * scales[-1], self.region)
        mask = self._rows_mask(call, mid)
        if mask is not None:
            down, mid = [d * mask for d in down], mid * mask
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    def _adapter_inputs(self, call: UNetCall, x: torch.Tensor, height: int, width: int, hires: bool):
        key = (height, width)
        if key not in self._adapter:  # a T2I-Adapter does not depend on the step: once per pass size
            hint = self.hint(height, width).to(x.device, self.dtype)
            if self.module.config.get("in_channels", 3) == 1 and hint.shape[1] == 3:
                hint = hint.mean(dim=1, keepdim=True)
            self._adapter = {key: list(self.module(hint))}
        features = self._adapter[key]
        scales = self.scales(len(features), hires)
        out = [in_region(f.expand(x.shape[0], -1, -1, -1) * s, self.region) for f, s in zip(features, scales)]
        mask = self._rows_mask(call, out[0])
        if mask is not None:
            out = [f * mask for f in out]
        return {"down_intrablock_additional_residuals": out}


def _pair_instant_id(hooks: list) -> None:
    """An InstantID ControlNet takes the image prompt of the IP-Adapter unit right before it (the extension's
    rule: the embedding unit, then the keypoints unit); anything else before it is an error naming both."""
    from .ip_adapter import IPAdapterHook

    units = [h for h in hooks if isinstance(h, (ControlHook, IPAdapterHook))]
    for before, hook in zip([None, *units], units):
        if not isinstance(hook, ControlHook) or hook.module is None or not is_instant_id(hook.unit.model):
            continue
        if not isinstance(before, IPAdapterHook):
            raise ControlNetError(f"{hook.owner}: the InstantID ControlNet {hook.unit.model} takes its context from "
                                  f"the unit before it, which must be an InstantID IP-Adapter unit "
                                  f"(instant_id_face_embedding with ip-adapter_instant_id_sdxl)")
        hook.context_prompt = before.prompt


class ControlNets:
    """What the engine holds for ControlNet: the preprocessors and a small cache of loaded models."""

    def __init__(self, registry, annotators_dir, device: torch.device, dtype: torch.dtype,
                 extra_preprocessors: Sequence[Preprocessor] = (), placement=None):
        self.registry, self.annotators_dir, self.placement = registry, annotators_dir, placement
        self.device, self.dtype = device, dtype
        self._extra = list(extra_preprocessors)
        self._preprocessors = None
        self._lock = threading.Lock()
        self._cache = None

    @property
    def preprocessors(self):
        with self._lock:
            if self._preprocessors is None:
                from .preprocessors import builtin

                registry = builtin(self.annotators_dir, self.registry.paths.models_dir)
                for p in self._extra:
                    registry.add(p)
                self._preprocessors = registry
            return self._preprocessors

    def add_preprocessor(self, p: Preprocessor) -> None:
        """A plug-in's preprocessor (before or after the list was first built)."""
        with self._lock:
            self._extra.append(p)
            if self._preprocessors is not None:
                self._preprocessors.add(p)

    def model(self, title: str, base_unet=None, dtype: torch.dtype | None = None):
        """The loaded model a unit names (the extension's lookup: "name [hash]", name, closest), and its title.
        ``base_unet()`` gives the checkpoint's UNet, which difference ControlNets and Control-LoRAs complete."""
        from ..models.controlnet import ControlModelCache, detect_control_file
        from ..models.errors import ModelFileError

        file = self.registry.controlnet(title)
        with self._lock:
            if self._cache is None:
                self._cache = ControlModelCache()
        title, dtype = file.title, dtype or self.dtype
        try:
            return title, self._cache.get(file.path, dtype)
        except ModelFileError:
            if base_unet is None or not detect_control_file(file.path).needs_unet:
                raise
        return title, self._cache.get(file.path, dtype, unet=base_unet())

    # ---- a job's units ----------------------------------------------------------------------------------
    def prepare(self, index: int, unit: ControlUnit, req, base_unet=None, dtype: torch.dtype | None = None
                ) -> PreparedUnit:
        """Run a unit's preprocessor on its image (see the module's docstring); bad fields and missing images
        or models are a :class:`ControlNetError` naming the unit."""
        from .preprocessors import detect, numpy_seed, pixel_perfect_resolution

        where = f"{SCRIPT_NAME} unit {index}"
        pre = self.preprocessors.get(unit.module)
        source, mask = self._source(index, unit, req, pre)
        if is_image_prompt_module(pre.name):  # the hook encodes the image itself; the mask rides along
            if not unit.model or unit.model == "None":
                raise ControlNetError(f"{where}: an IP-Adapter unit needs its model (an ip-adapter_*.safetensors or "
                                      f".bin file in {self.registry.paths.controlnet_dir})")
            file = self.registry.controlnet(unit.model)
            detected, *more = [rgb if m is None else np.concatenate([rgb, m[:, :, None]], axis=2)
                               for rgb, m in [(source, mask), *self._more_sources(index, unit, pre)]]
            used = unit.replace(module=pre.name, model=file.title)
            return _with_region(PreparedUnit(index, used, pre, detected, None, file.path, more=tuple(more)))
        if unit.more_images:
            raise ControlNetError(f"{where}: several images (the extension's Multi-Inputs) are for IP-Adapter units; "
                                  f"for {pre.name}, give one unit per image, or input_mode \"merge\" (one unit per "
                                  f"picture at weight / N, as the extension's Multi-Inputs tab)")
        model = title = None
        if unit.model and unit.model != "None" and not pre.model_free:
            title, model = self.model(unit.model, base_unet, dtype)
        elif not pre.model_free:
            raise ControlNetError(f"{where}: no ControlNet model chosen (model is 'None'); pick one of the files in "
                                  f"{self.registry.paths.controlnet_dir}")
        res, a, b = pre.resolved(unit.processor_res, unit.threshold_a, unit.threshold_b)
        if pre.name == LAMA and preprocessors.resize_mode_of(unit.resize_mode) == "Resize and Fill":
            source, mask = _outpaint_canvas(source, mask, req)  # LaMa fills the new border too
        if unit.pixel_perfect:  # after the range check, as the extension does
            res = pixel_perfect_resolution(source.shape[:2], req.width, req.height, unit.resize_mode)
        try:
            detected = detect(pre, source, res, a, b, mask, seed=numpy_seed(req.seed, req.subseed),
                              pixel_perfect=unit.pixel_perfect)
        except ControlNetError as exc:
            raise ControlNetError(f"{where}: {exc}") from None
        used = unit.replace(module=pre.name, processor_res=res, threshold_a=a, threshold_b=b)
        if title is not None:
            used = used.replace(model=title)
        elif pre.model_free:
            used = used.replace(model="None")
        return _with_region(PreparedUnit(index, used, pre, detected, model))

    def _more_sources(self, index: int, unit: ControlUnit, pre: Preprocessor) -> list[tuple]:
        """The (RGB, mask) arrays of the unit's further images."""
        return [self._source(index, unit.replace(image=image, mask=mask, more_images=()), None, pre, f"image[{i}]")
                for i, (image, mask) in enumerate(unit.more_images, 1)]

    def _source(self, index: int, unit: ControlUnit, req, pre: Preprocessor, field: str = "image"):
        where = f"{SCRIPT_NAME} unit {index}"
        mask_image = None
        if unit.image is not None:
            image = decode_image(unit.image, f"{where}.{field}")
            if unit.mask is not None:
                mask_image = decode_image(unit.mask, f"{where}.{field}.mask" if field != "image" else f"{where}.mask")
        elif getattr(req, "init_images", None):
            from .img2img import open_image

            image = open_image(req.init_images[0], "init image")
            if getattr(req, "mask", None):
                mask_image = open_image(req.mask, "mask")
                if getattr(req, "inpainting_mask_invert", 0):
                    mask_image = ImageOps.invert(mask_image.convert("L"))
        else:
            raise ControlNetError(f"{where}: no control image given (image), and txt2img has no init image to use")
        if mask_image is None and image.mode == "RGBA" and pre.needs_mask:
            mask_image = image.getchannel("A").point(lambda a: 255 if a < 128 else 0)  # painted-out pixels
        source = _rgb_array(image)
        mask = _mask_array(mask_image, (source.shape[1], source.shape[0])) if mask_image is not None else None
        if pre.needs_mask and mask is None:  # as the extension: nothing masked, nothing repainted
            mask = np.zeros(source.shape[:2], np.uint8)
        return source, mask

    @staticmethod
    def detected_maps(prepared: PreparedUnit, req, hires_job: bool) -> list[tuple[Image.Image, str]]:
        """What the extension appends after the images: the map as the ControlNet sees it (at the generation
        size, after the resize mode; with Hires. fix, also at the second pass's size); an inpaint map as RGBA
        with the masked part half transparent."""
        from .preprocessors import fit_to, inpaint_display

        out = []
        for w, h in pass_sizes(req, hires_job):
            fitted = inpaint_display(fit_to(prepared.detected, w, h, prepared.unit.resize_mode))
            out.append((Image.fromarray(fitted), (f"{SCRIPT_NAME} {prepared.index}: detected map "
                                                 f"({prepared.unit.module}, {w}x{h})")))
        return out

    def hooks(self, units: Sequence[ControlUnit], req, extra_images: list | None = None, base=None) -> list:
        """The hooks of a request's enabled units; their detected maps go to ``extra_images`` (not for the kinds
        whose input is no picture map: IP-Adapter, ReVision, the style adapter, as in the extension).
        ``base()`` gives the job's (LoadedModel, VAE): difference ControlNets and Control-LoRAs complete the
        UNet's weights, reference units encode their image with the VAE.

        Order: the hooks that replace the UNet's own inputs first (ReVision's pooled prompt, then the style
        adapters' tokens), as the extension changes them before its ControlNets run; then the other units in
        their order; ReVision and LLLite units share one hook each."""
        hires_job = bool(getattr(req, "enable_hr", False)) and req.kind == "txt2img"
        base_unet = (lambda: base()[0].unet) if base is not None else None
        dtype = None  # the job's UNet's (a narrow UNet stays float32 where others run in bfloat16)
        prepared_units: list[PreparedUnit] = []
        for i, unit in enumerate(units):
            if not unit.enabled:
                continue
            if dtype is None:
                dtype = base()[0].dtype if base is not None else self.dtype
            prepared = self.prepare(i, unit, req, base_unet, dtype)
            _check_style_pairing(prepared)
            if extra_images is not None and unit.save_detected_map and prepared.kind in MAP_KINDS:
                extra_images += self.detected_maps(prepared, req, hires_job)
            prepared_units.append(prepared)
        of_kind = {kind: [p for p in prepared_units if p.kind == kind] for kind in ("revision", "t2i_style", "lllite")}
        out = [self._revision_hook(of_kind["revision"], req, base)] if of_kind["revision"] else []
        out += [self._style_hook(p, hires_job) for p in of_kind["t2i_style"]]
        for prepared in prepared_units:
            if prepared.kind == "ip-adapter":
                out.append(self._ip_adapter_hook(prepared, dtype))
            elif prepared.kind == "reference":
                out.append(self._reference_hook(prepared, base, hires_job))
            elif prepared.kind == "controlnet":
                out.append(ControlHook(prepared, self.device, dtype, hires_job))
                if prepared.preprocessor.name.startswith("inpaint_only") and prepared.detected.shape[2] == 4:
                    out.append(self._inpaint_only_hook(prepared, base, hires_job))
        if of_kind["lllite"]:  # their nudges add up per projection
            from .lllite import lllite_hook

            out.append(lllite_hook(of_kind["lllite"], self.device, dtype, *pass_sizes(req, hires_job)[0]))
        _pair_instant_id(out)
        return out

    def _ip_adapter_hook(self, prepared: PreparedUnit, dtype: torch.dtype):
        from .ip_adapter import ip_adapter_hook

        paths = self.registry.paths
        hook = ip_adapter_hook(prepared, prepared.path, paths.models_dir / "clip_vision", self.device, dtype,
                               face_dirs=(paths.models_dir, self.annotators_dir))
        hook.prepared = prepared  # the unit as used (its model's title) for the infotext
        return hook

    def _style_hook(self, prepared: PreparedUnit, hires_job: bool):
        from .t2i_style import style_hook

        hook = style_hook(prepared, self.registry.paths.models_dir / "clip_vision", self.device, hires_job)
        hook.prepared = prepared
        return hook

    def _revision_hook(self, prepared: list[PreparedUnit], req, base):
        from .revision import revision_hook

        if base is not None and not base()[0].spec.is_sdxl:
            raise ControlNetError(f"{SCRIPT_NAME} unit {prepared[0].index}: {prepared[0].unit.module} works on SDXL "
                                  f"checkpoints only; this one is {base()[0].spec.describe()}")
        empty = req.prompt == "" and req.negative_prompt == ""
        return revision_hook(prepared, self.registry.paths.models_dir / "clip_vision", self.device, req.seed, empty)

    def _vae_encoder(self, base):
        """``encode(rgb)``: an H×W×3 uint8 picture's latent (1, C, h, w) by the job's VAE."""
        from . import vae as vae_ops

        _, vae = base()
        placement = self.placement

        def encode(rgb: np.ndarray) -> torch.Tensor:
            pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            with torch.no_grad(), (placement.use(vae) if placement is not None else _nothing()):
                return vae_ops.encode(vae, pixels, self.device)

        return encode

    def _inpaint_only_hook(self, prepared: PreparedUnit, base, hires_job: bool) -> InpaintOnlyHook:
        from .schedules import DiscreteSchedule

        if base is None:
            raise ControlNetError(f"{SCRIPT_NAME} unit {prepared.index}: {prepared.preprocessor.name} needs the "
                                  f"job's model")
        return InpaintOnlyHook(prepared, self._vae_encoder(base), DiscreteSchedule().alphas_cumprod, hires_job)

    def _reference_hook(self, prepared: PreparedUnit, base, hires_job: bool):
        from .reference import reference_hook
        from .schedules import DiscreteSchedule

        if base is None:
            raise ControlNetError(f"{SCRIPT_NAME} unit {prepared.index}: reference units need the job's model")
        model, _ = base()
        return reference_hook(prepared, self._vae_encoder(base), DiscreteSchedule(), self.device, model.dtype,
                              model.spec.is_sdxl, hires_job=hires_job)


REGION_KINDS = ("controlnet", "ip-adapter")  # the kinds the extension's effective_region_mask works with


def _with_region(prepared: PreparedUnit) -> PreparedUnit:
    """``prepared`` with its unit's effective region mask read (first channel / 255); a kind that cannot use
    one is an error naming the unit, as the extension refuses it."""
    data = prepared.unit.effective_region_mask
    if not data:
        return prepared
    where = f"{SCRIPT_NAME} unit {prepared.index}"
    if prepared.kind not in REGION_KINDS:
        raise ControlNetError(f"{where}: effective_region_mask works with ControlNet, T2I-Adapter and IP-Adapter "
                              f"units, not with {prepared.unit.module} ({prepared.kind})")
    image = decode_image(data, f"{where}.effective_region_mask").convert("RGB")
    prepared.region = np.asarray(image, np.float32)[:, :, 0] / 255.0
    return prepared


def region_tensor(region: np.ndarray | None) -> torch.Tensor | None:
    """A region mask as (1, 1, H, W) float32, or None."""
    return None if region is None else torch.from_numpy(np.ascontiguousarray(region))[None, None]


def in_region(x: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """``x`` (B, C, h, w) times the region mask brought to h × w bilinearly (the extension's
    ``apply_effective_region_mask``)."""
    if region is None:
        return x
    mask = torch.nn.functional.interpolate(region.to(x.device, x.dtype), size=tuple(x.shape[-2:]), mode="bilinear")
    return x * mask


def _check_style_pairing(prepared: PreparedUnit) -> None:
    """clip_vision gives a style adapter's input and nothing else takes it: a mismatch names both."""
    from .t2i_style import MODULE

    style_model = prepared.kind == "t2i_style"
    if style_model != (prepared.preprocessor.name == MODULE):
        where = f"{SCRIPT_NAME} unit {prepared.index}"
        if style_model:
            raise ControlNetError(f"{where}: {prepared.unit.model} is a T2I style adapter; it takes the "
                                  f"t2ia_style_clipvision preprocessor (clip_vision), not {prepared.unit.module}")
        raise ControlNetError(f"{where}: t2ia_style_clipvision (clip_vision) makes CLIP tokens for a T2I style adapter "
                              f"(t2iadapter_style_sd14v1); {prepared.unit.model} is a {prepared.model.spec.describe()}")


def units_used(hooks) -> dict:
    """Unit index -> the unit as it ran (model titles, resolved sliders), for the infotext: every hook of
    :meth:`ControlNets.hooks` carries its ``prepared`` unit, the one ReVision hook all of its ``prepared_units``."""
    out = {}
    for hook in hooks:
        for prepared in getattr(hook, "prepared_units", None) or [hook.prepared]:
            out[prepared.index] = prepared.unit
    return out


def pass_sizes(req, hires_job: bool) -> list[tuple[int, int]]:
    """The pixel sizes (width, height) of a job's passes: the generation size, then Hires. fix's."""
    sizes = [(req.width, req.height)]
    if hires_job:
        (up_w, up_h), (cut_x, cut_y) = req.hires_size()
        sizes.append(((up_w // 8 - cut_x) * 8, (up_h // 8 - cut_y) * 8))
    return sizes


def _outpaint_canvas(source: np.ndarray, mask: np.ndarray | None, req) -> tuple[np.ndarray, np.ndarray]:
    """inpaint_only+lama with Resize and Fill (the extension's "outpaint fix"): the picture and its mask fitted
    into the job's final size first (the Hires. fix size when it has one), the new border masked, so that
    LaMa paints the border before the unit sees the map."""
    from .preprocessors import fit_to

    width, height = pass_sizes(req, bool(getattr(req, "enable_hr", False)) and req.kind == "txt2img")[-1]
    width, height = width // 8 * 8, height // 8 * 8
    rgba = np.concatenate([source, (mask if mask is not None else np.zeros(source.shape[:2], np.uint8))[:, :, None]],
                          axis=2)
    fitted = fit_to(rgba, width, height, "Resize and Fill")
    return np.ascontiguousarray(fitted[:, :, :3]), np.ascontiguousarray(fitted[:, :, 3])


class InpaintOnlyHook(StepHook):
    """What inpaint_only (and inpaint_only+lama) add to their unit, as the extension's UNet hook does:

    * at every step, outside the mask the prediction is pulled to the control picture's own latent: the
      denoised latent becomes ``d + w (1 - m) (x0 - d)`` with ``w`` the unit's weight (clamped to 0..1),
      ``x0`` the VAE latent of the map's picture at the pass's size and ``m`` the pixel mask max-pooled to
      the latent (10×10 windows, stride 8, padding 1). The extension mixes noise predictions the same way
      (``eps' w + eps (1 - w)`` from that x0); in the denoised prediction it is this affine blend, so it
      commutes with CFG and holds for v-prediction models as well;
    * inpaint_only+lama: the first pass starts from the filled picture, as the extension's initial-noise
      hack does: the unit noise becomes ``√ᾱ₉₉₉ x0 + √(1 - ᾱ₉₉₉) noise`` (the latent at timestep 999).
    """

    def __init__(self, prepared: PreparedUnit, vae_encode, alphas_cumprod: torch.Tensor, hires_job: bool):
        self.prepared, self.unit = prepared, prepared.unit
        self.owner = f"{SCRIPT_NAME} unit {prepared.index}"
        self.vae_encode, self.hires_job = vae_encode, hires_job
        self.alpha_999 = float(alphas_cumprod[-1])
        self._latents: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def active(self, step) -> bool:  # every step (the extension's restore ignores guidance start / end)
        return self.unit.in_pass(step.pass_name, self.hires_job)

    def _at(self, height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0 (C, h, w), the latent mask (1, h, w)) at a latent size."""
        key = (height, width)
        if key not in self._latents:
            from .preprocessors import fit_to

            fitted = fit_to(self.prepared.detected, width * 8, height * 8, self.unit.resize_mode)
            x0 = self.vae_encode(fitted[:, :, :3])[0]
            m = torch.from_numpy(fitted[:, :, 3].astype(np.float32) / 255.0)[None, None]
            m = torch.nn.functional.max_pool2d(m, (10, 10), stride=(8, 8), padding=1)[0]
            self._latents = {key: (x0, m[:, :height, :width])}  # one pass size at a time
        x0, m = self._latents[key]
        return x0.to(like.device, like.dtype), m.to(like.device, like.dtype)

    def after_cfg(self, guidance, denoised: torch.Tensor) -> torch.Tensor:
        x0, m = self._at(denoised.shape[-2], denoised.shape[-1], denoised)
        w = max(0.0, min(1.0, float(self.unit.weight)))
        return denoised + w * (1 - m) * (x0 - denoised)

    def initial_noise(self, noise: torch.Tensor, pass_name: str) -> torch.Tensor:
        if self.prepared.preprocessor.name != LAMA or pass_name != "first":
            return noise
        x0, _ = self._at(noise.shape[-2], noise.shape[-1], noise)
        return self.alpha_999 ** 0.5 * x0[None] + (1 - self.alpha_999) ** 0.5 * noise


def _nothing():
    import contextlib

    return contextlib.nullcontext()

