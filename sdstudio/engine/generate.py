"""The generation engine: a request (txt2img, img2img / inpaint, with Hires. fix) in, images with their
infotext out. Scripts run above it (:mod:`sdstudio.scripts`): always-on ones hand it per-step hooks.

The engine owns the loaded models, the device plan and the upscalers; each call gets everything else
from the request (model, VAE, sampler, seeds...), so two jobs never change each other's settings.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from .. import __version__
from ..core import infotext, styles
from ..core.extra_networks import extract, hypernetwork_uses, lora_uses
from ..core.names import LATENT_UPSCALE_MODES, get_sampler, resolve_schedule
from ..core.params import Img2ImgRequest, RequestError, Txt2ImgRequest, to_infotext_params
from ..core.paths import DeviceOptions, Paths
from ..core.prompt import prompt_schedule, split_and
from ..models.embeddings import EmbeddingLibrary
from ..models.errors import ModelFileError, ModelNotFoundError
from ..models.files import ModelFile
from ..models.loader import LoadedModel, ModelCache, load_vae_file, unet_width
from ..models.registry import ModelRegistry
from . import flow as flow_ops
from . import hypernetwork as hypernetwork_ops
from . import img2img as img2img_ops
from . import lora as lora_ops
from . import vae as vae_ops
from .conditioning import TextConditioner
from .controlnet import ControlNets
from .denoiser import CFGDenoiser, ComposedConditioning, Interrupted, ScheduledConditioning
from .devices import Placement, plan_devices
from .faces import FaceRestorers
from .hooks import SamplingPlan, StepHook, calling, off_the_unet
from .interrogate import Interrogators
from .preview import PreviewDecoders
from .refiner import RefinerSwitch, SwitchTarget, sdxl_time_ids
from .rng import BrownianNoise, NoiseGenerator, image_noise
from .samplers import SAMPLER_FUNCTIONS
from .schedules import DiscreteSchedule, ddim_timesteps, get_sigmas, unipc_sigmas
from .soft_inpaint import SoftInpainting
from .speed import SpeedJob
from .tiling import circular_padding
from .upscalers import Upscalers

log = logging.getLogger(__name__)
VERSION = f"sdstudio-{__version__}"


@dataclass
class Progress:
    job_no: int  # which batch (0-based) of n_iter
    job_count: int
    step: int  # sampling step within this batch (1-based once a step finished)
    steps: int
    latent: torch.Tensor | None = None  # current denoised estimate, for live previews
    sdxl: bool = False  # which latent space ``latent`` is in (previews map it to RGB differently)
    decode: Callable[[torch.Tensor], Image.Image] | None = None  # the real VAE (call on the worker thread only)
    # (method, latent) -> a TAESD / Approx NN preview, None without a file for it (engine.preview; worker thread)
    approx: Callable[[str, torch.Tensor], Image.Image | None] | None = None


@dataclass
class GeneratedImage:
    image: Image.Image
    seed: int
    subseed: int
    infotext: str
    grid: bool = False  # a script's grid (X/Y/Z plot, prompt matrix, a Loopback history): saved with the grids
    extra: bool = False  # a hook's extra output (ControlNet's detected map): returned and shown, not saved


@dataclass
class Txt2ImgResult:
    request: Txt2ImgRequest  # with seeds made concrete
    images: list[GeneratedImage]
    all_seeds: list[int]
    all_subseeds: list[int]
    model_name: str
    model_hash: str
    interrupted: bool = False
    warnings: list[str] = field(default_factory=list)  # e.g. a LoRA that was not found or did not fit
    info: dict = field(default_factory=dict)
    batches_done: int = 0  # batches (of n_iter) finished, counting the ones skipped by ``first_batch``
    paused: bool = False  # stopped between batches because ``should_pause`` said so
    inpainting_model: bool = False  # the UNet took image conditioning (9 input channels)


@dataclass
class HiresPass:
    request: Img2ImgRequest  # the second pass: size, steps, sampler, CFG, prompts, denoising strength
    sampler: object
    schedule: str
    schedule_label: str
    conds: tuple
    upscaler: str
    upscale_to: tuple[int, int]  # (width, height) before truncation
    truncate: tuple[int, int]  # latent pixels cropped (x, y) when both "resize to" sides were given
    first_steps: int
    steps: int
    tiled_vae: bool


@dataclass
class RefinerUse:
    """The refiner of one job (A1111's Refiner accordion): its model, VAE and the conditioning its own
    text encoders made of the job's prompts; ``switched`` once it took over in some pass."""

    file: ModelFile
    model: LoadedModel
    vae: object
    conds: tuple
    hires_conds: tuple | None = None
    switched: bool = False


def _named_hashes(text: str) -> dict[str, str]:
    """``"a: 0123abcd, b: 4567ef01"`` (an infotext's ``Lora hashes``) -> ``{"a": "0123abcd", ...}``."""
    pairs = (part.split(":", 1) for part in text.split(",") if ":" in part)
    return {name.strip(): value.strip() for name, value in pairs}


def _either(*checks: Callable[[], bool] | None) -> Callable[[], bool] | None:
    live = [c for c in checks if c is not None]
    return (lambda: any(c() for c in live)) if live else None


class Engine:
    def __init__(self, paths: Paths, device_options: DeviceOptions | None = None, cache_size: int = 1):
        self.paths = paths
        self.registry = ModelRegistry(paths)
        self.plan = plan_devices(device_options)
        self.placement = Placement(self.plan)
        self.models = ModelCache(cache_size)
        self._vaes: dict[str, object] = {}
        self._loras: dict[tuple, lora_ops.LoraFile] = {}
        self._hypernets: dict[tuple, hypernetwork_ops.Hypernetwork] = {}
        self.embeddings = EmbeddingLibrary(paths.embeddings_dir)
        self.schedule = DiscreteSchedule()
        self.upscalers = Upscalers(paths.upscaler_dirs, self.plan.device, self.plan.aux_dtype)
        self.faces = FaceRestorers(paths.face_restorer_dirs, self.plan.device, self.plan.aux_dtype)
        self.interrogators = Interrogators(paths.models_dir, self.plan.device, self.plan.aux_dtype)
        self.controlnets = ControlNets(self.registry, paths.annotators_dir, self.plan.device, self.plan.dtype,
                                       placement=self.placement)
        self.previews = PreviewDecoders(paths.vae_approx_dir, self.plan.device, self.plan.dtype)  # live previews
        self.lock = threading.Lock()  # one generation at a time per device

    # ---- models -----------------------------------------------------------------------------------
    def load(self, name: str | None, model_hash: str | None = None) -> tuple[ModelFile, LoadedModel]:
        """The checkpoint by name; a pasted infotext's ``Model hash`` finds it when the file was renamed."""
        try:
            file = self.registry.checkpoint(name)
        except ModelNotFoundError:
            if not model_hash:
                raise
            file = self.registry.checkpoint(model_hash)
        return file, self._get(file)

    def _get(self, file: ModelFile) -> LoadedModel:
        width = unet_width(file.path)
        return self.models.get(file.path, self.plan.dtype_for(width), self.plan.vae_dtype_for(width),
                               text_encoder_dirs=tuple(self.paths.text_encoder_dirs), vae_dirs=(self.paths.vae_dir,))

    def vae_module(self, file: ModelFile, model: LoadedModel, choice: str):
        vae_file = self.registry.vae_for(file, choice)
        if vae_file is None:
            return model.vae, None
        key = str(vae_file.path)
        if key not in self._vaes:
            self._vaes = {key: load_vae_file(vae_file.path, model.vae, self.plan.vae_dtype_for(unet_width(file.path)))}
        return self._vaes[key], vae_file

    # ---- generation --------------------------------------------------------------------------------
    def generate(self, req: Txt2ImgRequest, *, on_progress: Callable[[Progress], None] | None = None,
                should_stop: Callable[[], bool] | None = None,
                on_image: Callable[[GeneratedImage], None] | None = None,
                should_skip: Callable[[], bool] | None = None,
                should_pause: Callable[[], bool] | None = None, first_batch: int = 0,
                on_batch: Callable[[int, list[GeneratedImage]], None] | None = None,
                keep_images: bool = True, hooks: Sequence[StepHook] = (),
                infotext_extra: dict[str, object] | None = None) -> Txt2ImgResult:
        """Generate ``req``. ``should_stop`` (checked every step) interrupts: the images finished so far
        are returned. ``should_skip`` drops the current batch and goes on with the next. ``first_batch``
        starts at that batch of ``n_iter`` (the seeds are those the full run would give it), and
        ``should_pause``, checked between batches, stops early so a queue can serve someone else and
        resume later with ``first_batch=result.batches_done``: the images are the same either way.
        ``on_batch(batches_done, images_of_that_batch)`` is called after each batch (a skipped one: no images);
        with ``keep_images=False`` the result does not hold them (a queue worker saves them per batch)."""
        req.validate(check_scripts=False)
        if req.restore_faces:  # the restorer named (the infotext says which); missing files: said now
            req = req.replace(face_restoration_model=self.faces.resolve(req.face_restoration_model))
            self.faces.check(req.face_restoration_model)
        if req.script_name:
            raise RequestError(f"{req.script_name}: scripts run above the engine (sdstudio.scripts.Studio)")
        if req.styles:  # the styled text is what gets generated and written to the infotext
            prompt, negative = styles.apply(req.prompt, req.negative_prompt, req.styles, styles.load(self.paths.styles_file))
            req = req.replace(prompt=prompt, negative_prompt=negative, styles=[])
        sampler = get_sampler(req.sampler_name)
        schedule = resolve_schedule(sampler, req.scheduler)
        req = req.with_concrete_seeds().replace(sampler_name=sampler.label)
        seed, subseed = req.seed, req.subseed
        total = req.n_iter * req.batch_size
        all_seeds = [seed + i for i in range(total)]
        all_subseeds = [subseed + i for i in range(total)]
        with self.lock:
            file, model = self.load(req.model, req.model_hash)
            vae, vae_file = self.vae_module(file, model, req.vae)
            self.placement.prepare(model.unet, *model.text_encoders, vae)  # before LoRA swaps any weight
            refiner = self._refiner(req, file, model)
            # A1111's speed options; the padding's empty prompt is encoded now, before any LoRA applies
            speed = SpeedJob.prepare(req, [model, refiner.model if refiner is not None else None], self.plan.device,
                                     self.placement)
            if model.spec.is_flow:
                self._check_flow(model, req, sampler, hooks)
            resolved = {"Model hash": file.short_hash, "Model": file.name, "Version": VERSION}
            if vae_file is not None:
                resolved.update({"VAE hash": vae_file.short_hash, "VAE": vae_file.name})
            resolved.update(infotext_extra or {})
            if not sampler.timesteps:
                resolved["Schedule type"] = schedule.label
            if sampler.uses_ensd and req.eta_noise_seed_delta:
                resolved["ENSD"] = req.eta_noise_seed_delta
            if model.spec.is_flow and model.spec.dit.is_flux and model.spec.dit.guidance_distilled:
                resolved["Distilled CFG Scale"] = req.distilled_cfg_scale  # Forge's key
            req_for_text = req.replace(model=file.name, model_hash=None)
            warnings: list[str] = list(model.warnings)  # e.g. a tensor the file lacked, filled in
            bare, loras, hypernets = self._extra_networks(model, req, warnings, resolved)
            images: list[GeneratedImage] = []
            interrupted = paused = False
            batches_done = first_batch
            with circular_padding([model.unet, vae], req.tiling), lora_ops.applied(model, loras), \
                    hypernetwork_ops.applied(model.unet, hypernets):
                conds, used = self._encode(model, bare)
                hires = self._hires_pass(model, req, bare, conds, sampler, schedule.name) if req.enable_hr else None
                if refiner is not None:  # its own encoders' conditioning (LoRAs apply to the first model only)
                    refiner.conds = self._encode(refiner.model, bare)[0]
                    if hires is not None:
                        refiner.hires_conds = refiner.conds if hires.conds is conds else \
                            self._encode(refiner.model, hires.request)[0]
                if hires is not None and not hires.sampler.timesteps and hires.schedule_label != schedule.label:
                    resolved["Hires schedule type"] = hires.schedule_label  # "Automatic" resolved, as above
                prepared = None
                if isinstance(req, Img2ImgRequest):
                    with self.placement.use(vae):
                        prepared = img2img_ops.prepare(req, vae, self.plan.device, model.spec.inpainting)
                # hashes of what this job used; a pasted infotext's stale ones are not written back
                resolved["TI hashes"] = ", ".join(f"{e.name}: {e.short_hash}" for e in used.values()) or None
                for n in range(first_batch, req.n_iter):
                    if n > first_batch and should_pause is not None and should_pause():
                        paused = True
                        break
                    seeds = all_seeds[n * req.batch_size:(n + 1) * req.batch_size]
                    subseeds = all_subseeds[n * req.batch_size:(n + 1) * req.batch_size]
                    stop_batch = _either(should_stop, should_skip)
                    inits = None
                    if prepared is not None:
                        inits = [prepared[(n * req.batch_size + j) % len(prepared)] for j in range(len(seeds))]
                    try:
                        span = None if hires is None else (0, hires.first_steps + hires.steps)
                        # A1111's hires_fix_refiner_pass: by default the refiner joins in the second pass only
                        first_refiner = refiner if hires is None or req.hires_fix_refiner_pass != "second pass" else None
                        latents = self._sample(model, vae, req, sampler, schedule.name, conds, seeds, subseeds, n,
                                               on_progress, stop_batch, inits, span, hooks, refiner=first_refiner,
                                               speed=speed)
                        now_model, now_vae = model, vae
                        if refiner is not None and refiner.switched:  # once it took over, it stays for the job
                            now_model, now_vae = refiner.model, refiner.vae
                        if hires is not None:
                            late = refiner if refiner is not None and not refiner.switched and \
                                req.hires_fix_refiner_pass != "first pass" else None
                            run = hires if now_model is model else dataclasses.replace(hires, conds=refiner.hires_conds)
                            latents = self._run_hires(run, now_model, now_vae, latents, seeds, subseeds, n, on_progress,
                                                      stop_batch, hooks if now_model is model else off_the_unet(hooks),
                                                      late, speed)
                            if refiner is not None and refiner.switched:
                                now_model, now_vae = refiner.model, refiner.vae
                    except Interrupted:
                        if should_stop is not None and should_stop():
                            interrupted = True
                            break
                        batches_done = n + 1  # skipped: this batch gives no images, the next one runs
                        if on_batch is not None:
                            on_batch(batches_done, [])
                        continue
                    batches_done = n + 1
                    batch_images: list[GeneratedImage] = []
                    if refiner is not None and refiner.switched:
                        resolved.update(self._refiner_infotext(req, refiner, hires is not None))
                        refiner.switched = False  # the next batch starts with the first model again
                    resolved.update(speed.infotext())
                    for j, (image, s, ss) in enumerate(zip(vae_ops.to_pil(self._decode(now_vae, latents, req.tiled_vae)),
                                                           seeds, subseeds)):
                        if req.restore_faces:
                            image = self.faces.restore(image, name=req.face_restoration_model, seed=s,
                                                       fidelity=req.code_former_weight)
                        if inits is not None:
                            image = img2img_ops.finish(inits[j], image, latents[j:j + 1], SoftInpainting.of(req))
                        for hook in hooks:
                            with calling(hook):
                                image = hook.finish_image(image, n * req.batch_size + j)
                        params = to_infotext_params(req_for_text.replace(seed=s, subseed=ss), **{**resolved, "Seed": s})
                        generated = GeneratedImage(image, s, ss, infotext.format(params))
                        if keep_images:
                            images.append(generated)
                        batch_images.append(generated)
                        if on_image is not None:
                            on_image(generated)
                    if on_batch is not None:
                        on_batch(batches_done, batch_images)
        for w in warnings:
            log.warning(w)
        return Txt2ImgResult(req, images, all_seeds, all_subseeds, file.name, file.short_hash, interrupted,
                             warnings, batches_done=batches_done, paused=paused,
                             inpainting_model=model.spec.inpainting)

    txt2img = generate
    img2img = generate  # an Img2ImgRequest brings its init images, mask and denoising strength

    def _decode(self, vae, latents: torch.Tensor, tiled: bool = False) -> torch.Tensor:
        with self.placement.use(vae):
            if self.plan.device.type == "cpu":  # per image: batch-invariant pixels (see CFGDenoiser)
                return torch.cat([vae_ops.decode(vae, lat[None], self.plan.device, tiled) for lat in latents])
            return vae_ops.decode(vae, latents, self.plan.device, tiled)

    def _preview(self, vae, latent: torch.Tensor) -> Image.Image:
        """The first image of a batch's current estimate through the real VAE (the "Full" live preview)."""
        with torch.no_grad():
            pixels = self._decode(vae, latent[:1].to(self.plan.dtype))
        return vae_ops.to_pil(pixels)[0]

    # ---- Hires. fix ---------------------------------------------------------------------------------
    def _hires_pass(self, model, req: Txt2ImgRequest, bare: Txt2ImgRequest, conds, sampler, schedule_name
                    ) -> HiresPass:
        """Everything the second pass needs, worked out once per job: its request (an img2img request at
        the upscaled size), sampler, schedule, conditioning and step counts."""
        (up_w, up_h), (cut_x, cut_y) = req.hires_size()
        hr_sampler = get_sampler(req.hr_sampler_name or req.sampler_name)
        hr_schedule = resolve_schedule(hr_sampler, req.hr_scheduler or req.scheduler)
        prompt, _ = extract(req.hr_prompt) if req.hr_prompt else (bare.prompt, None)
        negative, _ = extract(req.hr_negative_prompt) if req.hr_negative_prompt else (bare.negative_prompt, None)
        fields = {f.name: getattr(bare, f.name) for f in dataclasses.fields(Txt2ImgRequest)}
        hr_req = Img2ImgRequest(**{**fields, "enable_hr": False}).replace(
            width=(up_w // 8 - cut_x) * 8, height=(up_h // 8 - cut_y) * 8, steps=req.hr_second_pass_steps or req.steps,
            sampler_name=hr_sampler.label, cfg_scale=req.cfg_scale if req.hr_cfg is None else req.hr_cfg,
            prompt=prompt, negative_prompt=negative)
        hr_conds = conds
        if (prompt, negative, hr_req.steps) != (bare.prompt, bare.negative_prompt, bare.steps):
            hr_conds, _ = self._encode(model, hr_req)  # schedules like [a:b:0.5] follow the hires steps
        if req.hr_upscaler not in LATENT_UPSCALE_MODES:
            self.upscalers.get(req.hr_upscaler)  # an unknown name fails now, before any sampling
        first = len(self._sigmas(model, bare, sampler, schedule_name, False)) - 1
        steps = len(self._sigmas(model, hr_req, hr_sampler, hr_schedule.name, True)) - 1
        return HiresPass(hr_req, hr_sampler, hr_schedule.name, hr_schedule.label, hr_conds, req.hr_upscaler,
                         (up_w, up_h), (cut_x, cut_y), first, steps, req.tiled_vae)

    def _run_hires(self, hires: HiresPass, model, vae, latents: torch.Tensor, seeds, subseeds, batch_no, on_progress,
                   should_stop, hooks: Sequence[StepHook] = (), refiner: RefinerUse | None = None,
                   speed: SpeedJob | None = None) -> torch.Tensor:
        """Upscale a batch's first-pass latents (in latent space, or decoded, upscaled and re-encoded) and
        run the img2img pass over them, as A1111's ``sample_hr_pass``."""
        (up_w, up_h), (cut_x, cut_y) = hires.upscale_to, hires.truncate
        pixels = None
        if hires.upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[hires.upscaler]
            big = F.interpolate(latents.float(), size=(up_h // 8, up_w // 8), mode=mode, antialias=antialias)
        else:
            images = vae_ops.to_pil(self._decode(vae, latents, hires.tiled_vae))
            w8, h8 = up_w // 8 * 8, up_h // 8 * 8
            pixels = torch.cat([img2img_ops.to_tensor(self.upscalers.upscale(im, w8, h8, hires.upscaler))
                                for im in images])
            with self.placement.use(vae):
                big = torch.cat([vae_ops.encode(vae, p[None], self.plan.device, hires.tiled_vae) for p in pixels])
        h, w = big.shape[-2:]
        big = big[:, :, cut_y // 2:h - (cut_y + 1) // 2, cut_x // 2:w - (cut_x + 1) // 2]
        inits = []
        for i in range(big.shape[0]):
            image_cond = None
            if model.spec.inpainting:
                with self.placement.use(vae):
                    if pixels is None:
                        image_cond = img2img_ops.txt2img_conditioning(vae, self.plan.device, 1, big.shape[-2] * 8,
                                                                      big.shape[-1] * 8)
                    else:
                        crop = pixels[i:i + 1, :, cut_y // 2 * 8:, cut_x // 2 * 8:][..., :big.shape[-2] * 8, :big.shape[-1] * 8]
                        image_cond = img2img_ops.inpaint_conditioning(vae, self.plan.device, crop, None, 1.0,
                                                                      big.shape[-2:])
            inits.append(img2img_ops.Prepared(None, big[i:i + 1].cpu(), None, None, None, None, image_cond))
        return self._sample(model, vae, hires.request, hires.sampler, hires.schedule, hires.conds, seeds, subseeds,
                            batch_no, on_progress, should_stop, inits, (hires.first_steps, hires.first_steps + hires.steps),
                            hooks, "hires", refiner=refiner, speed=speed)

    # ---- the refiner --------------------------------------------------------------------------------
    def _refiner(self, req: Txt2ImgRequest, file: ModelFile, model: LoadedModel) -> RefinerUse | None:
        """The job's refiner, loaded; None without one, or when it is the job's own checkpoint (A1111)."""
        if not req.uses_refiner():
            return None
        r_file = self.registry.checkpoint(req.refiner_checkpoint)
        if r_file.path == file.path:
            return None
        self.models.capacity = max(self.models.capacity, 2)  # base and refiner stay loaded: no reload per job
        r_model = self._get(r_file)
        if r_model.spec.unet["out_channels"] != model.spec.unet["out_channels"] or \
                r_model.spec.vae["scaling_factor"] != model.spec.vae["scaling_factor"]:
            raise RequestError(f"refiner_checkpoint: {r_file.name} ({r_model.spec.describe()}) works in another "
                               f"latent space than {file.name} ({model.spec.describe()})")
        r_vae, _ = self.vae_module(r_file, r_model, req.vae)
        self.placement.prepare(r_model.unet, *r_model.text_encoders, r_vae)
        return RefinerUse(r_file, r_model, r_vae, ())

    @staticmethod
    def _refiner_infotext(req: Txt2ImgRequest, refiner: RefinerUse, hires: bool) -> dict[str, object]:
        out: dict[str, object] = {"Refiner": f"{refiner.file.name} [{refiner.file.short_hash}]",
                                  "Refiner switch at": req.refiner_switch_at}
        if hires and req.hires_fix_refiner_pass != "second pass":
            out["Hires refiner"] = req.hires_fix_refiner_pass
        if req.refiner_switch_by_sample_steps:
            out["Refiner switch by sampling steps"] = True
        return out

    def _extra_networks(self, model: LoadedModel, req: Txt2ImgRequest, warnings: list[str], resolved: dict):
        """Take ``<lora:...>`` / ``<hypernet:...>`` tags out of both prompts and load what they name.
        Returns the request with bare prompts, the LoRAs and the hypernetworks; records ``Lora hashes``."""
        prompt, tags = extract(req.prompt)
        negative, negative_tags = extract(req.negative_prompt)
        if model.spec.is_flow and (refused := [t for t in tags + negative_tags if t.kind == "hypernet"]):
            warnings.append(f"{', '.join(t.name for t in refused)}: hypernetworks are not applied to "
                            f"{model.spec.describe()} models; generated without them")
            tags = [t for t in tags if t.kind != "hypernet"]
            negative_tags = [t for t in negative_tags if t.kind != "hypernet"]
        loras = self._networks(model, tags + negative_tags, warnings, _named_hashes(req.extra.get("Lora hashes", "")))
        resolved["Lora hashes"] = ", ".join(f"{name}: {self.registry.hashes.addnet(lf.path)}"
                                            for name, (lf, _, _) in loras.items()) or None
        hypernets = self._hypernetworks(hypernetwork_uses(tags + negative_tags), warnings)
        return req.replace(prompt=prompt, negative_prompt=negative), list(loras.values()), hypernets

    def _networks(self, model: LoadedModel, tags, warnings: list[str], known_hashes: dict[str, str]
                  ) -> dict[str, tuple[lora_ops.LoraFile, float, float]]:
        """The LoRA files a prompt's ``<lora:...>`` tags name (by the tag's name), parsed for this model
        (cached). A missing or unusable file is reported in ``warnings`` and left out; the job goes on."""
        out = {}
        for use in lora_uses(tags):
            try:
                file = self.registry.lora(use.name, known_hashes.get(use.name))
                st = file.path.stat()
                key = (str(file.path), st.st_size, st.st_mtime, id(model))
                if key not in self._loras:
                    self._loras[key] = lora_ops.LoraFile(file.path, model)
            except (ModelNotFoundError, ModelFileError) as exc:
                warnings.append(f"LoRA left out: {exc}")
                continue
            lora = self._loras[key]
            if lora.unmatched:
                warnings.append(f"{file.path.name}: {len(lora.unmatched)} of {len(lora.unmatched) + len(lora.targets)} "
                                f"modules do not fit this model (e.g. {lora.unmatched[0]}); applied the rest")
            out[use.name] = (lora, use.te, use.unet)
        return out

    def _hypernetworks(self, uses, warnings: list[str]) -> list[tuple[hypernetwork_ops.Hypernetwork, float]]:
        out = []
        for name, strength in uses:
            try:
                out.append((self._hypernetwork(name), strength))
            except (ModelNotFoundError, ModelFileError) as exc:
                warnings.append(f"hypernetwork left out: {exc}")
        return out

    def _hypernetwork(self, name: str) -> hypernetwork_ops.Hypernetwork:
        file = self.registry.hypernetwork(name)
        key = (str(file.path), file.path.stat().st_mtime)
        if key not in self._hypernets:
            self._hypernets[key] = hypernetwork_ops.Hypernetwork(file.path)
        return self._hypernets[key]

    def _encode(self, model: LoadedModel, req: Txt2ImgRequest):
        """The prompt's AND parts and the negative prompt, each scheduled per step (each distinct text
        encoded once), and the embeddings they used."""
        if model.spec.is_flow:  # SD 3.x / Flux.1: CLIP-L (+ CLIP-G) and T5-XXL (no embeddings yet)
            conditioner = flow_ops.FlowConditioner(self._flow_encoders(model, req), self.plan.device)
        else:
            widths = [te.config["hidden_size"] for te in model.spec.text_encoders]
            known = _named_hashes(req.extra.get("TI hashes", ""))
            conditioner = TextConditioner(model, self.plan.device, self.embeddings.usable(widths, known))
        encoded: dict[str, object] = {}

        def scheduled(text: str) -> ScheduledConditioning:
            entries = []
            for end, step_text in prompt_schedule(text, req.steps):
                if step_text not in encoded:
                    encoded[step_text] = conditioner.encode(step_text, req.clip_skip, emphasis=req.emphasis,
                                                            novelai_braces=req.novelai_braces)
                entries.append((end, encoded[step_text]))
            return ScheduledConditioning(entries)

        with self.placement.use(*model.text_encoders):
            cond = ComposedConditioning([(scheduled(text), weight) for text, weight in split_and(req.prompt)])
            uncond = scheduled(req.negative_prompt)  # A1111 does not split the negative prompt on AND
        return (cond, uncond), conditioner.used_embeddings

    # ---- SD 3.x / Flux.1 -------------------------------------------------------------------------------
    @staticmethod
    def _flow_encoders(model: LoadedModel, req: Txt2ImgRequest) -> flow_ops.FlowTextEncoders:
        enc, dit = model.extras["encoders"], model.spec.dit
        tokens = None
        if dit.is_flux:
            tokens = flow_ops.FLUX_DEV_T5_TOKENS if dit.guidance_distilled else flow_ops.FLUX_SCHNELL_T5_TOKENS
        return flow_ops.FlowTextEncoders("flux" if dit.is_flux else "sd3", enc["clip_l"], enc.get("clip_g"),
                                         enc.get("t5xxl"), tokens)

    def _schedule(self, model: LoadedModel, req: Txt2ImgRequest):
        """The noise schedule of the model at this pass's size (Flux.1 shifts by image size)."""
        if not model.spec.is_flow:
            return self.schedule
        if model.spec.dit.is_flux:
            return flow_ops.FlowSchedule.flux(req.width, req.height, schnell=not model.spec.dit.guidance_distilled)
        return flow_ops.FlowSchedule.sd3()

    def _model_call(self, model: LoadedModel, req: Txt2ImgRequest):
        """What the denoiser calls: the UNet itself, or a flow transformer behind the same call."""
        if not model.spec.is_flow:
            return model.unet
        if model.spec.dit.is_flux:
            return flow_ops.FluxCall(model.unet, guidance=req.distilled_cfg_scale)
        return flow_ops.SD3Call(model.unet)

    @staticmethod
    def _check_flow(model: LoadedModel, req: Txt2ImgRequest, sampler, hooks: Sequence[StepHook]) -> None:
        """What SD 3.x / Flux.1 cannot do here, said before any work."""
        name = model.spec.describe()
        if sampler.timesteps:
            raise RequestError(f"sampler {sampler.label}: {name} is a flow-matching model; DDIM / PLMS-style "
                               f"timestep samplers do not fit it (use Euler, DPM++ 2M, Heun...)")
        if model.spec.dit.is_flux and (req.width % 16 or req.height % 16):
            raise RequestError(f"{name} needs width and height in multiples of 16, got {req.width}x{req.height}")
        unfit = [h.owner or type(h).__name__ for h in hooks if h not in off_the_unet(hooks)]
        if unfit:
            raise RequestError(f"{', '.join(dict.fromkeys(unfit))}: not available for {name} models "
                               f"(it feeds a UNet; {name} is a transformer)")

    def _sigmas(self, model, req, sampler, schedule_name, img2img: bool) -> torch.Tensor:
        """The noise levels this pass steps through (img2img: the tail its denoising strength reaches)."""
        total, run = req.steps_to_run() if img2img else (req.steps, req.steps)
        if model.spec.is_flow:
            try:
                sigmas = self._schedule(model, req).sigmas_for(
                    schedule_name, total, discard_next_to_last=sampler.discard_next_to_last_sigma
                    or req.always_discard_next_to_last_sigma)
            except ValueError as exc:
                raise RequestError(f"scheduler: {exc}") from None
            return sigmas[len(sigmas) - run - 1:]
        if sampler.timesteps:
            return self._timestep_sigmas(req, sampler, total, run if img2img else None)
        sigmas = get_sigmas(schedule_name, total, self.schedule,
                            discard_next_to_last=sampler.discard_next_to_last_sigma
                            or req.always_discard_next_to_last_sigma, sdxl=model.spec.is_sdxl)
        return sigmas[len(sigmas) - run - 1:]  # img2img starts part-way down the schedule

    def _timesteps(self, req, total: int) -> torch.Tensor:
        """A1111's DDIM-style timesteps (ascending); "Discard penultimate sigma" plans one more."""
        return ddim_timesteps(total + (1 if req.always_discard_next_to_last_sigma else 0))

    def _timestep_sigmas(self, req, sampler, total: int, run: int | None) -> torch.Tensor:
        """The noise levels of a timestep sampler (DDIM, PLMS, UniPC, DDIM CFG++), as A1111 runs them: over its
        timesteps, with no trailing zero; UniPC over its own levels (``unipc_sigmas``), as many steps as there
        are timesteps. img2img (``run`` = A1111's t_enc + 1) runs over the first t_enc timesteps, from
        timesteps[t_enc - 1], while the picture is noised to timesteps[t_enc] (see ``_timestep_img2img_start``)."""
        timesteps = self._timesteps(req, total)
        t_enc = None if run is None else max(run - 1, 0)
        if t_enc == 0:  # nothing to run: A1111 hands back the picture as noised
            return self.schedule.sigmas[timesteps[:1]]
        if sampler.function == "unipc":
            if t_enc is None:
                return unipc_sigmas(len(timesteps), self.schedule, req.uni_pc_skip_type)
            return unipc_sigmas(t_enc, self.schedule, req.uni_pc_skip_type,
                                t_start=float(timesteps[t_enc - 1] + 1) / len(self.schedule.sigmas))
        return self.schedule.sigmas[timesteps if t_enc is None else timesteps[:t_enc]].flip(0)

    def _timestep_img2img_start(self, req, total: int, run: int, init: torch.Tensor, noise: torch.Tensor,
                                first_sigma: float) -> torch.Tensor:
        """A timestep sampler's img2img start, as A1111 makes it: the picture noised to timesteps[t_enc], one
        timestep above the sampler's first, and handed over as it is (variance-preserving), so the sampler reads
        it as a picture at its own first level: in sigma space (init + sigma_a * noise) *
        sqrt((1 + sigma_first^2) / (1 + sigma_a^2))."""
        t_enc = max(run - 1, 0)
        level = float(self.schedule.sigmas[self._timesteps(req, total)[t_enc]])
        start = init + noise * (req.initial_noise_multiplier * level + req.extra_noise)
        return start * ((1 + first_sigma ** 2) / (1 + level ** 2)) ** 0.5

    def _sample(self, model, vae, req, sampler, schedule_name, conds, seeds, subseeds, batch_no, on_progress,
                should_stop, inits: list[img2img_ops.Prepared] | None = None,
                progress_span: tuple[int, int] | None = None, hooks: Sequence[StepHook] = (),
                pass_name: str = "first", refiner: RefinerUse | None = None,
                speed: SpeedJob | None = None) -> torch.Tensor:
        """One sampling pass for one batch. ``progress_span`` = (steps reported before this pass, steps of
        the whole job's passes), so a Hires. fix job counts its two passes as one run of steps."""
        h, w = req.height // 8, req.width // 8
        shape = (model.spec.unet["out_channels"], h, w)
        noises, gens = [], []
        for s, ss in zip(seeds, subseeds):
            noise, gen = image_noise(s, shape, source=req.rng, subseed=ss, subseed_strength=req.subseed_strength,
                                     resize_from=(req.seed_resize_from_w, req.seed_resize_from_h),
                                     device=self.plan.device)
            if req.eta_noise_seed_delta:
                gen = NoiseGenerator(s + req.eta_noise_seed_delta, req.rng, self.plan.device)
            noises.append(noise)
            gens.append(gen)
        device = self.plan.device  # the sampler's arithmetic runs where the UNet runs: no per-step copies
        x = torch.stack([n.to(device) for n in noises])
        sigmas = self._sigmas(model, req, sampler, schedule_name, inits is not None)
        if sampler.brownian_noise:
            noise_fn = BrownianNoise(x, sigmas, seeds)
        else:
            def noise_fn(sigma, sigma_next):
                return torch.stack([g.randn(shape).to(device) for g in gens])
        crop = (req.sdxl_crop_top, req.sdxl_crop_left)
        aesthetic = (req.sdxl_refiner_high_aesthetic_score, req.sdxl_refiner_low_aesthetic_score)
        time_ids = sdxl_time_ids(model.spec, req.width, req.height, crop, aesthetic) or (None, None)
        cond, uncond = conds
        image_cond = latent_mask = init = keep = None
        if inits is not None:
            init = torch.cat([p.latent for p in inits]).to(device)
            if inits[0].keep is not None:
                keep = torch.cat([p.keep for p in inits]).to(device)
                if req.inpainting_fill == img2img_ops.LATENT_NOISE:
                    init = init * keep + x * (1 - keep)
                elif req.inpainting_fill == img2img_ops.LATENT_NOTHING:
                    init = init * keep
                latent_mask = img2img_ops.LatentMask(init, keep, SoftInpainting.of(req))
            if model.spec.inpainting:
                image_cond = torch.cat([p.image_cond for p in inits])
        elif model.spec.inpainting:
            with self.placement.use(vae):
                image_cond = img2img_ops.txt2img_conditioning(vae, self.plan.device, len(seeds), req.height, req.width)
        schedule = self._schedule(model, req)
        speed_hooks, guidance_options = speed.for_pass(pass_name, model, refiner.model if refiner else None, seeds) \
            if speed is not None else ([], None)
        plan = SamplingPlan(self._model_call(model, req), schedule, model.spec.prediction, [cond] * len(seeds),
                            [uncond] * len(seeds), req.cfg_scale * sampler.cfg_scale_multiplier, model.dtype,
                            self.plan.device,
                            steps=len(sigmas) - 1, pass_name=pass_name, add_time_ids=time_ids[0],
                            add_time_ids_uncond=time_ids[1], should_stop=should_stop,
                            batch_invariant=self.plan.device.type == "cpu", image_cond=image_cond,
                            latent_mask=latent_mask, hooks=[*hooks, *speed_hooks])
        if refiner is not None:
            r_spec, n = refiner.model.spec, len(seeds)
            r_cond, r_uncond = refiner.hires_conds if pass_name == "hires" else refiner.conds

            def target() -> SwitchTarget:
                refiner.switched = True
                return SwitchTarget(self._model_call(refiner.model, req), r_spec.prediction, [r_cond] * n, [r_uncond] * n,
                                    sdxl_time_ids(r_spec, req.width, req.height, crop, aesthetic),
                                    r_spec.unet["in_channels"])

            plan.switch = RefinerSwitch(req.refiner_switch_at, schedule, len(sigmas) - 1, target,
                                        by_steps=req.refiner_switch_by_sample_steps)
        denoiser = CFGDenoiser(plan, guidance_options)
        offset, n_steps = progress_span or (0, len(sigmas) - 1)

        def callback(d: dict) -> None:
            if on_progress is not None:
                on_progress(Progress(batch_no, req.n_iter, offset + d["i"] + 1, n_steps, d["denoised"],
                                     model.spec.is_sdxl, lambda latent: self._preview(vae, latent),
                                     lambda method, latent: self.previews.decode(method, model.spec, vae, latent)))

        # Timestep samplers (DDIM, PLMS) start from unit-variance noise in the model's own space.
        scale = (sigmas[0] ** 2 + 1) ** 0.5 if sampler.timesteps else sigmas[0]
        options = {"s_churn": req.s_churn, "s_tmin": req.s_tmin, "s_tmax": req.s_tmax, "s_noise": req.s_noise}
        if req.eta is not None:
            options["eta"] = req.eta
        if sampler.function == "unipc":  # its A1111 settings ("order" means another thing to LMS)
            options.update(order=req.uni_pc_order, variant=req.uni_pc_variant,
                           lower_order_final=req.uni_pc_lower_order_final)
        fn = SAMPLER_FUNCTIONS[sampler.function]
        x = plan.initial_noise(x)
        if init is None:
            start = x * scale
        elif sampler.timesteps:
            start = self._timestep_img2img_start(req, *req.steps_to_run(), init, x, float(sigmas[0]))
        else:
            start = init + x * (req.initial_noise_multiplier * sigmas[0] + req.extra_noise)
        with torch.no_grad(), self.placement.use(model.unet, *([refiner.model.unet] if refiner else [])), \
                plan.applied():
            latents = fn(denoiser, start, sigmas, noise=noise_fn, callback=callback, after_step=denoiser.after_step,
                         **options)
        if speed is not None:
            speed.record(denoiser)
        if sampler.timesteps:
            latents = latents / (sigmas[-1] ** 2 + 1) ** 0.5
        if latent_mask is not None:
            latents = latent_mask.final(latents)
        return latents
