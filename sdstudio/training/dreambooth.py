"""Dreambooth / full fine-tuning of an SD 1.x, 2.x or SDXL checkpoint, saved as an A1111 single-file checkpoint.

Every UNet weight trains (and, when asked, every text-encoder weight), with the loss, precision choices and
resumable step loop of :mod:`sdstudio.training.loop` that the LoRA trainer uses too. The instance images are a
:class:`~sdstudio.training.dataset.TrainingDataset` (kohya's ``N_name`` repeat folders, captions, buckets).

Prior preservation, as diffusers' ``train_dreambooth.py`` and the Dreambooth extension define it: beside each
instance batch the step takes a batch of class images (kohya's regularisation folder, ``N_class`` folders or
plain images, each captioned by its caption file or its folder's class tokens), and the loss is
``instance loss + prior_loss_weight * class loss``, each the mean denoising MSE of its batch. When the class
folder holds fewer images than ``num_class_images``, the missing ones are generated first from the class
prompt (the Dreambooth extension's way), with a caption file holding that prompt; class batches follow the
class set's own seeded epochs, step by step, so a resumed run sees the same ones.

The result is the base file with its UNet (and trained text encoders) replaced, in the original LDM / SGM key
layout (:mod:`sdstudio.models.convert`), written tensor by tensor (:func:`sdstudio.models.merge.write_safetensors`):
the VAE and anything else the base holds are copied as they are, EMA weights (``model_ema.*``, stale once the
UNet changed) are left out, a ``.yaml`` beside the base (v-prediction) is copied beside the result.
``save_precision`` "fp16" / "bf16" stores every float tensor at that precision. Files:
``<output_dir>/<name>.safetensors`` at the end, ``<name>-step00000050.safetensors`` every
``save_every_n_steps``; ``<work_dir>/<name>-state.pt`` (weights, optimizer, scheduler, generator: the resume
state, at each save and on interrupt) and ``<name>-log.csv``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

from ..models.convert import (
    canonical_text_state,
    clip_hf_ldm_to_hf,
    component_to_ldm,
    openclip_to_hf,
    unet_ldm_to_hf,
)
from ..models.detect import UNET_PREFIX, VAE_PREFIX, ModelSpec, detect
from ..models.errors import ModelFileError
from ..models.loader import LoadedModel, load_checkpoint
from ..models.merge import _Source, write_safetensors
from .dataset import Batch, DatasetError, TrainingDataset, _repeats_folder
from .loop import (
    SCHEDULERS,
    RunConfig,
    Steps,
    TrainingError,
    TrainProgress,
    TrainResult,
    autocast_dtype,
    batch_loss,
    check_unet_spec,
    loss_options,
    make_optimizer,
    resume_state,
    run_to_end,
    total_steps,
    vae_encoder,
)
from .lora import base_model_version, model_hash
from .preprocess import caption_job_dataset, check_caption_missing

SAVE_PRECISIONS = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WHAT = "Dreambooth training"


@dataclass
class DreamboothConfig(RunConfig):
    """kohya's train_db.py options (the shared ones: :class:`~sdstudio.training.loop.RunConfig`). The UNet
    always trains; the text encoder(s) too when asked. ``batch_size``: instance images per step (and as many
    class images with prior preservation); ``output_dir``: the checkpoints (the checkpoint folder: they are
    listed at once); ``work_dir``: the resume state and the loss log (None: ``output_dir``)."""

    train_text_encoder: bool = False
    learning_rate: float = 2e-6  # kohya's train_db default
    prior_loss_weight: float = 1.0
    work_dir: Path | None = None
    save_precision: str = "float"  # "float" (float32), "fp16", "bf16"


CONFIG_FIELDS = tuple(f.name for f in fields(DreamboothConfig))


# ---- the base model -------------------------------------------------------------------------------------
def check_base_file(path: str | Path) -> ModelSpec:
    """The spec of a checkpoint file (its header only), refused with a clear error when it cannot be trained."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        raise TrainingError(f"{path.name}: a quantized (GGUF) model cannot be fine-tuned; train on the full checkpoint")
    try:
        from ..models.safe_load import open_state_dict

        spec = detect(open_state_dict(path).shapes)
    except ModelFileError as exc:
        raise TrainingError(f"{path.name}: {exc}") from None
    check_unet_spec(spec, path.name, WHAT)
    return spec


# ---- class images ---------------------------------------------------------------------------------------
def count_images(folder: str | Path, **dataset_options) -> int:
    """The usable images a class folder holds, read as the trainer reads it (0 for a missing or empty one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    try:
        return len(TrainingDataset.from_folder(folder, **dataset_options).items)
    except DatasetError:
        return 0


def class_image_folder(root: str | Path) -> Path:
    """Where generated class images go: the first ``N_class`` folder inside ``root`` when it has such folders
    (kohya's layout), else ``root`` itself."""
    root = Path(root)
    if root.is_dir():
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            parsed = _repeats_folder(sub.name)
            if parsed and parsed[0] >= 1:
                return sub
    return root


def ensure_class_images(root: str | Path, count: int, prompt: str | None,
                        generate: Callable[[int, int], list[Image.Image]] | None, *,
                        caption_extension: str = ".caption", batch_size: int = 1,
                        on_text: Callable[[str], None] | None = None, should_stop: Callable[[], bool] | None = None,
                        **dataset_options) -> list[Path]:
    """Generate the class images ``root`` lacks to hold ``count`` (the Dreambooth extension's
    num_class_images): ``generate(index, n)`` gives pictures ``index .. index+n-1`` (seeded by index, so a
    stopped generation carries on with the same pictures), saved as ``class-00012.png`` with a caption file
    holding ``prompt``. Returns the files written (stops early when ``should_stop``)."""
    have = count_images(root, caption_extension=caption_extension, **dataset_options)
    missing = count - have
    if missing <= 0:
        return []
    if not (prompt or "").strip() or generate is None:
        raise TrainingError(f"class images: {root} holds {have} of the {count} asked (num_class_images); give a "
                            "class prompt to generate the rest")
    folder = class_image_folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    taken = [int(p.stem[6:]) for p in folder.glob("class-*.png") if p.stem[6:].isdigit()]
    index = max(taken, default=-1) + 1
    written: list[Path] = []
    while len(written) < missing:
        if should_stop is not None and should_stop():
            break
        if on_text is not None:
            on_text(f"Generating class images: {have + len(written)} of {count}")
        n = min(batch_size, missing - len(written))
        for picture in generate(index, n)[:n]:
            path = folder / f"class-{index:05d}.png"
            picture.save(path)
            path.with_suffix(caption_extension).write_text(prompt.strip(), encoding="utf-8")
            written.append(path)
            index += 1
    return written


def engine_class_generator(engine, checkpoint: str, prompt: str, *, negative_prompt: str = "", width: int = 512,
                           height: int = 512, steps: int = 20, cfg_scale: float = 7.0,
                           sampler_name: str = "DPM++ 2M", seed: int = 0) -> Callable[[int, int], list[Image.Image]]:
    """A ``generate`` for :func:`ensure_class_images`: txt2img of the class prompt with the Engine on the base
    checkpoint, picture ``i`` with seed ``seed + i``."""
    from ..core.params import Txt2ImgRequest

    def generate(index: int, n: int) -> list[Image.Image]:
        req = Txt2ImgRequest(prompt=prompt, negative_prompt=negative_prompt, seed=seed + index, batch_size=n,
                             steps=steps, cfg_scale=cfg_scale, sampler_name=sampler_name, width=width, height=height,
                             model=checkpoint)
        return [g.image for g in engine.generate(req).images]

    return generate


class ClassBatches:
    """The class batch of each step: the class set's seeded epochs one after the other (step s takes batch
    s of that sequence), so any step's class batch is known without the steps before it."""

    def __init__(self, dataset: TrainingDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.per_epoch = dataset.batches_per_epoch(batch_size)
        self._epoch: tuple[int, list[list[int]]] | None = None

    def at(self, step: int) -> Batch:
        epoch, index = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.dataset.epoch_batches(epoch, self.batch_size))
        return self.dataset.load_batch(self._epoch[1][index], epoch, index)


def dreambooth_loss(model: LoadedModel, batch: Batch, class_batch: Batch | None, gen: torch.Generator,
                    prior_loss_weight: float = 1.0, **loss_options) -> torch.Tensor:
    """``instance loss + prior_loss_weight * class loss`` (the instance loss alone without a class batch);
    each is :func:`~sdstudio.training.loop.batch_loss`, drawn from ``gen`` in that order."""
    loss = batch_loss(model, batch, gen, **loss_options)
    if class_batch is None:
        return loss
    return loss + prior_loss_weight * batch_loss(model, class_batch, gen, **loss_options)


# ---- saving ---------------------------------------------------------------------------------------------
_TEXT_LDM_TO_HF = {"clip_hf": clip_hf_ldm_to_hf, "openclip": openclip_to_hf}


def _replaced(key: str, components: list[tuple[str, Callable[[str], object], set[str]]]) -> bool:
    """Whether a base file's key holds a weight of a module being written anew (``components``: key prefix,
    original -> module name(s), the module's names). Anything else (CLIP's position ids, a projection the
    module does not use) stays as the base has it."""
    for prefix, mapper, names in components:
        if key.startswith(prefix):
            mapped = mapper(key[len(prefix):])
            if mapped is not None and not names.isdisjoint([mapped] if isinstance(mapped, str) else mapped):
                return True
    return False


def trained_state(model: LoadedModel, *, text_encoders: bool, vae: bool = False) -> dict[str, torch.Tensor]:
    """The UNet (and text encoders / VAE when asked) under the original single-file names."""
    spec = model.spec
    state = component_to_ldm(model.unet.state_dict(), UNET_PREFIX, "unet", layers_per_block=spec.layers_per_block,
                             up_has_attention=list(spec.up_has_attention))
    if text_encoders:
        for te, encoder in zip(spec.text_encoders, model.text_encoders):
            state.update(component_to_ldm(canonical_text_state(encoder.state_dict()), te.prefix, te.layout))
    if vae:
        state.update(component_to_ldm(model.vae.state_dict(), VAE_PREFIX, "vae", levels=spec.vae_levels))
    return state


def save_checkpoint(model: LoadedModel, path: str | Path, *, base: str | Path | None = None,
                    text_encoders: bool = True, precision: str = "float", metadata: dict[str, str] | None = None
                    ) -> Path:
    """``model`` as an A1111 single-file ``.safetensors``: the base file's tensors with the UNet (and the text
    encoders, ``text_encoders``) replaced by the model's, ``model_ema.*`` left out; without a base file, all
    components from the model. Written tensor by tensor into a temporary file, then renamed."""
    path = Path(path)
    if precision not in SAVE_PRECISIONS:
        raise TrainingError(f"save_precision: {precision!r} is not one of {', '.join(SAVE_PRECISIONS)}")
    dtype = SAVE_PRECISIONS[precision]
    base = Path(base) if base is not None and Path(base).is_file() else None
    spec = model.spec
    new = trained_state(model, text_encoders=text_encoders or base is None, vae=base is None)
    components = [(UNET_PREFIX, lambda n: unet_ldm_to_hf(n, spec.layers_per_block), set(model.unet.state_dict()))]
    if text_encoders:
        components += [(te.prefix, _TEXT_LDM_TO_HF[te.layout], set(canonical_text_state(encoder.state_dict())))
                       for te, encoder in zip(spec.text_encoders, model.text_encoders)]
    source = _Source(base) if base is not None else None

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    plan: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    written = set()
    for key in (source.keys() if source is not None else ()):
        if key.startswith("model_ema."):
            continue
        if key in new:
            t = new[key]
        elif _replaced(key, components):
            continue  # another spelling of a weight written anew (old files' layouts)
        else:
            t = source.get(key, meta=True)
        plan.append((key, tuple(t.shape), dtype if t.is_floating_point() else t.dtype))
        written.add(key)
    plan += [(k, tuple(t.shape), dtype if t.is_floating_point() else t.dtype) for k, t in new.items()
             if k not in written]

    def produce(key: str) -> torch.Tensor:
        t = new[key] if key in new else source.get(key, meta=False)
        return cast(t.detach().to("cpu")).contiguous()

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(tmp, plan, produce, {"format": "pt", **(metadata or {})})
    finally:
        if source is not None:
            source.close()
    tmp.replace(path)
    if base is not None and base.with_suffix(".yaml").is_file():  # A1111's v-prediction / config hint
        shutil.copyfile(base.with_suffix(".yaml"), path.with_suffix(".yaml"))
    return path


def _architecture(spec: ModelSpec) -> str:
    """Stability's ModelSpec ``modelspec.architecture``."""
    if spec.family == "sdxl":
        return "stable-diffusion-xl-v1-base"
    if spec.family == "sd2":
        return "stable-diffusion-v2-768-v" if spec.prediction == "v_prediction" else "stable-diffusion-v2-512"
    return "stable-diffusion-v1"


def _metadata(cfg: DreamboothConfig, model: LoadedModel, ds: TrainingDataset, class_ds: TrainingDataset | None,
              total: int, started: float, base_hashes: tuple[str, str] | None) -> dict[str, str]:
    training = {"base_model": model.path.name, "base_model_version": base_model_version(model),
                "max_train_steps": total, "learning_rate": cfg.learning_rate,
                "text_encoder_lr": cfg.text_encoder_lr, "train_text_encoder": cfg.train_text_encoder,
                "lr_scheduler": cfg.lr_scheduler, "batch_size": cfg.batch_size, "seed": cfg.seed,
                "num_train_images": ds.num_train_images, "resolution": list(ds.resolution),
                "prior_loss_weight": cfg.prior_loss_weight if class_ds is not None else None,
                "num_reg_images": class_ds.num_train_images if class_ds is not None else 0,
                "mixed_precision": cfg.mixed_precision, "min_snr_gamma": cfg.min_snr_gamma,
                "noise_offset": cfg.noise_offset, "save_precision": cfg.save_precision, "cache_latents": cfg.cache_latents,
                "training_started_at": started}
    if base_hashes:
        training["base_model_hash"], training["base_model_sha256"] = base_hashes
    w, h = ds.resolution
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": _architecture(model.spec),
            "modelspec.title": cfg.output_name, "modelspec.resolution": f"{w}x{h}",
            "modelspec.date": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
            "modelspec.prediction_type": "v" if model.spec.prediction == "v_prediction" else "epsilon",
            "sdstudio_training": json.dumps({"method": "dreambooth", **training})}


# ---- the run --------------------------------------------------------------------------------------------
def train_dreambooth(model: LoadedModel | str | Path, dataset: TrainingDataset, config: DreamboothConfig | None = None,
                     *, class_dataset: TrainingDataset | None = None, device: str | torch.device = "cpu",
                     resume: bool | str | Path = False, on_progress: Callable[[TrainProgress], None] | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     sampler: Callable[[Path, int], object] | None = None, **overrides) -> TrainResult:
    """Fine-tune ``model`` (a checkpoint file, loaded here in float32; or a loaded model, whose weights are
    trained in place) on ``dataset``, with prior preservation on ``class_dataset`` when given. ``config``
    fields may also be passed as keywords. ``resume``: True continues from ``<name>-state.pt`` when there is
    one, a path names a state file. ``should_stop`` (checked after each step) saves the state and returns
    (``interrupted``). ``sampler(checkpoint_file, step)`` runs every ``sample_every_n_steps`` with that step's
    saved checkpoint (see :func:`engine_sampler`)."""
    cfg = DreamboothConfig(**{**(config.__dict__ if config else {}), **overrides})
    cfg.output_dir = Path(cfg.output_dir)
    work = Path(cfg.work_dir) if cfg.work_dir is not None else cfg.output_dir
    if cfg.lr_scheduler not in SCHEDULERS:
        raise TrainingError(f"unknown lr_scheduler {cfg.lr_scheduler!r} ({', '.join(SCHEDULERS)})")
    if cfg.save_precision not in SAVE_PRECISIONS:
        raise TrainingError(f"save_precision: {cfg.save_precision!r} is not one of {', '.join(SAVE_PRECISIONS)}")
    if cfg.prior_loss_weight < 0:
        raise TrainingError(f"prior_loss_weight must be 0 or more, got {cfg.prior_loss_weight}")
    device = torch.device(device)
    if not isinstance(model, LoadedModel):
        check_base_file(model)
        model = load_checkpoint(Path(model), torch.float32)
    check_unet_spec(model.spec, model.path.name, WHAT)
    precision = autocast_dtype(device, cfg.mixed_precision)
    if model.unet.dtype != torch.float32:
        raise TrainingError(f"the model is loaded in {model.unet.dtype}; full fine-tuning keeps float32 weights "
                            "(load it in float32; mixed_precision computes in bf16/fp16)")

    unet, vae, encoders = model.unet, model.vae, list(model.text_encoders)
    for m in [unet, vae, *encoders]:
        m.to(device)
    if cfg.cache_latents:
        for ds in (dataset, class_dataset) if class_dataset is not None else (dataset,):
            ds.cache_latents(vae_encoder(vae, device))
    trained = [unet] + (encoders if cfg.train_text_encoder else [])
    groups = [{"params": list(unet.parameters()), "lr": cfg.learning_rate}]
    if cfg.train_text_encoder:
        te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
        groups.append({"params": [p for e in encoders for p in e.parameters()], "lr": te_lr})
    optimizer = make_optimizer(cfg.optimizer, groups, cfg.learning_rate, cfg.weight_decay, device)
    per_epoch = dataset.batches_per_epoch(cfg.batch_size)
    total = total_steps(cfg.max_train_steps, cfg.max_train_epochs, per_epoch)
    steps = Steps.for_run(optimizer, cfg, total, precision)

    out = cfg.output_dir
    if (out / f"{cfg.output_name}.safetensors").resolve() == Path(model.path).resolve():
        raise TrainingError(f"output_name: {cfg.output_name!r} would overwrite the base checkpoint; choose another")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / f"{cfg.output_name}-state.pt"
    log_path = work / f"{cfg.output_name}-log.csv"
    saved = resume_state(resume, state_path)
    if saved is not None:
        resume_from, state = saved
        if bool(state.get("text_encoders")) != cfg.train_text_encoder:
            raise TrainingError(f"{resume_from.name}: the saved run was made with train_text_encoder="
                                f"{not cfg.train_text_encoder}; resume it with the same setting")
        unet.load_state_dict(state["unet"])
        for encoder, weights in zip(encoders, state.get("text_encoders") or []):
            encoder.load_state_dict(weights)
        steps.load_state_dict(state)
    base_hashes = model_hash(model.path) if Path(model.path).is_file() else None
    metadata = _metadata(cfg, model, dataset, class_dataset, total, steps.started, base_hashes)
    options = loss_options(model, cfg, device, precision)
    classes = ClassBatches(class_dataset, cfg.batch_size) if class_dataset is not None else None

    def save_state() -> None:
        steps.save(state_path, unet=unet.state_dict(), total=total,
                   text_encoders=[e.state_dict() for e in encoders] if cfg.train_text_encoder else None)

    def save(path: Path, epoch: int) -> Path:
        meta = json.loads(metadata["sdstudio_training"])
        meta.update(steps=steps.step, epoch=epoch, training_finished_at=time.time())
        return save_checkpoint(model, path, base=model.path, text_encoders=cfg.train_text_encoder,
                               precision=cfg.save_precision, metadata={**metadata, "sdstudio_training": json.dumps(meta)})

    def loss_of(batch: Batch, epoch: int, index: int) -> torch.Tensor:
        class_batch = classes.at(steps.step) if classes is not None else None
        return dreambooth_loss(model, batch, class_batch, steps.gen, cfg.prior_loss_weight, **options)

    path = run_to_end(steps, dataset, cfg.batch_size, total, loss_of, trained=trained, save=save,
                      save_state=save_state, output_dir=out, output_name=cfg.output_name, log_path=log_path,
                      save_every=cfg.save_every_n_steps, sample_every=cfg.sample_every_n_steps, sampler=sampler,
                      gradient_checkpointing=cfg.gradient_checkpointing, train_weights=True,
                      on_progress=on_progress, should_stop=should_stop)
    interrupted = path is None
    skipped = list(dataset.skipped) + [(f"class images: {n}", why) for n, why in
                                       (class_dataset.skipped if class_dataset is not None else [])]
    return TrainResult(path, steps.step, total, interrupted, state_path, log_path, steps.losses, metadata, skipped)


def engine_sampler(engine, prompts: list[str], folder: str | Path, **request) -> Callable[[Path, int], list]:
    """A ``sampler`` for :func:`train_dreambooth` that generates ``prompts`` with the Engine on the step's
    checkpoint (saved in one of the engine's checkpoint folders: train with ``output_dir`` there); pictures
    with their infotext go to ``folder/<step>-<i>-<j>.png``."""
    from ..core import outputs
    from ..core.params import Txt2ImgRequest

    folder = Path(folder)

    def sample(checkpoint_file: Path, step: int) -> list:
        engine.registry.refresh()
        file = next((m for m in engine.registry.checkpoints if Path(m.path).resolve() == Path(checkpoint_file).resolve()),
                    None)
        if file is None:
            raise TrainingError(f"{checkpoint_file}: not in the engine's checkpoint folders; cannot sample from it")
        images = []
        folder.mkdir(parents=True, exist_ok=True)
        for i, prompt in enumerate(prompts):
            req = Txt2ImgRequest(**{"seed": 1, "steps": 20, "width": 512, "height": 512, **request,
                                    "prompt": prompt, "model": file.title})
            for j, image in enumerate(engine.generate(req).images):
                outputs.write_image(image.image, folder / f"{step:08d}-{i}-{j}.png", infotext=image.infotext)
                images.append(image)
        return images

    return sample


# ---- queue jobs ---------------------------------------------------------------------------------------------
CLASS_FIELDS = ("num_class_images", "class_prompt", "class_negative_prompt", "class_infer_steps",
                "class_guidance_scale", "class_sampler_name", "class_seed", "class_batch_size")


def prepare_job(registry, *, dataset: str | Path, model: str | None = None, output_name: str | None = None,
                resume: bool = False, dataset_options: dict | None = None, class_dir: str | Path | None = None,
                class_options: dict | None = None, config: dict | None = None,
                sample_prompts: list[str] | None = None, caption_missing: str | None = None) -> dict:
    """A ``train_dreambooth`` job (JSON) after the checks the run would make: the checkpoint exists and can be
    fine-tuned, the folder holds usable images, the class folder holds its images or a class prompt to
    generate the missing ones, every option is a :class:`DreamboothConfig` field (``class_options``: the
    Dreambooth extension's ``num_class_images``, ``class_prompt``, ``class_negative_prompt``,
    ``class_infer_steps``, ``class_guidance_scale``, plus ``class_sampler_name``, ``class_seed``,
    ``class_batch_size``). ``caption_missing`` (``blip``, ``deepbooru``, ``both``): the instance pictures without a
    caption are captioned by the run first (:func:`sdstudio.training.preprocess.caption_job_dataset`). Errors are
    :class:`TrainingError` / :class:`~sdstudio.training.dataset.DatasetError`; an unknown checkpoint raises the
    registry's ModelNotFoundError."""
    config = {k: v for k, v in (config or {}).items() if v is not None}
    dataset_options = {k: v for k, v in (dataset_options or {}).items() if v is not None}
    class_options = {k: v for k, v in (class_options or {}).items() if v is not None}
    unknown = sorted(set(config) - (set(CONFIG_FIELDS) - {"output_dir", "work_dir", "output_name"}))
    if unknown:
        raise TrainingError(f"unknown Dreambooth option {unknown[0]!r}")
    unknown = sorted(set(class_options) - set(CLASS_FIELDS))
    if unknown:
        raise TrainingError(f"unknown class image option {unknown[0]!r} ({', '.join(CLASS_FIELDS)})")
    if config.get("lr_scheduler", "constant") not in SCHEDULERS:
        raise TrainingError(f"lr_scheduler: {config['lr_scheduler']!r} is not one of {', '.join(SCHEDULERS)}")
    if config.get("save_precision", "float") not in SAVE_PRECISIONS:
        raise TrainingError(f"save_precision: {config['save_precision']!r} is not one of {', '.join(SAVE_PRECISIONS)}")
    for key in ("max_train_steps", "max_train_epochs", "batch_size", "save_every_n_steps", "sample_every_n_steps"):
        if key in config and int(config[key]) < 1:
            raise TrainingError(f"{key} must be at least 1, got {config[key]}")
    if "learning_rate" in config and float(config["learning_rate"]) <= 0:
        raise TrainingError("learning_rate must be above 0")
    if float(config.get("prior_loss_weight", 1.0)) < 0:
        raise TrainingError("prior_loss_weight must be 0 or more")
    checkpoint = registry.checkpoint(model or None)
    check_base_file(checkpoint.path)
    folder = Path(dataset)
    name = output_name or folder.name
    if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
        raise TrainingError(f"output_name: {name!r} must be a plain file name")
    if (Path(registry.paths.ckpt_dirs[0]) / f"{name}.safetensors").resolve() == Path(checkpoint.path).resolve():
        raise TrainingError(f"output_name: {name!r} would overwrite the base checkpoint; choose another name")
    try:
        ds = TrainingDataset.from_folder(folder, **dataset_options)
    except (TypeError, ValueError, OSError) as exc:  # DatasetError included; an unknown option; a bad name
        raise DatasetError(f"dataset: {exc}") from None
    job = {"model": checkpoint.title, "dataset": {"root": str(folder), **dataset_options}, "output_name": name,
           "resume": bool(resume), "config": config, "images": len(ds.items),
           "skipped_images": [list(s) for s in ds.skipped], "class_dataset": None, "class_options": {},
           "sample_prompts": [str(p) for p in sample_prompts or [] if str(p).strip()],
           "caption_missing": check_caption_missing(caption_missing)}
    if class_dir:
        have = count_images(class_dir, **dataset_options)
        wanted = int(class_options.get("num_class_images", 0))
        if wanted < 0:
            raise TrainingError(f"num_class_images must be 0 or more, got {wanted}")
        if have < wanted and not str(class_options.get("class_prompt") or "").strip():
            raise TrainingError(f"class images: {class_dir} holds {have} of the {wanted} asked (num_class_images); "
                                "give a class prompt to generate the rest")
        if have == 0 and wanted == 0:
            raise TrainingError(f"class images: {class_dir} holds no usable images; set num_class_images and a class "
                                "prompt to generate them, or train without a class folder")
        job["class_dataset"] = {"root": str(class_dir), **dataset_options}
        job["class_options"] = class_options
        job["class_images"] = have
    elif class_options.get("num_class_images"):
        raise TrainingError("num_class_images is set but no class images folder is given")
    return job


def run_job(engine, spec: dict, *, resume: bool = False, on_progress: Callable[[TrainProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None, on_text: Callable[[str], None] | None = None) -> dict:
    """A ``train_dreambooth`` job (:func:`prepare_job`) on the engine's device: the missing class images
    generated with the engine from the base checkpoint, then the run, its checkpoint into the engine's first
    checkpoint folder (listed at once), its state, log and samples in ``models/dreambooth/<name>/``."""
    checkpoint = engine.registry.checkpoint(spec["model"])
    name = spec["output_name"]
    work = engine.paths.models_dir / "dreambooth" / name
    captioned = caption_job_dataset(engine, spec, on_text)
    ds = TrainingDataset.from_folder(**spec["dataset"])
    config = dict(spec["config"])
    class_ds = None
    if spec.get("class_dataset"):
        options = spec.get("class_options") or {}
        data = dict(spec["class_dataset"])
        if options.get("num_class_images"):
            res = data.get("resolution", 512)
            w, h = (res, res) if isinstance(res, int) else res
            generate = engine_class_generator(
                engine, checkpoint.title, str(options.get("class_prompt") or ""),
                negative_prompt=str(options.get("class_negative_prompt") or ""), width=w, height=h,
                steps=int(options.get("class_infer_steps", 20)), cfg_scale=float(options.get("class_guidance_scale", 7.5)),
                sampler_name=str(options.get("class_sampler_name") or "DPM++ 2M"), seed=int(options.get("class_seed", 0)))
            ensure_class_images(data["root"], int(options["num_class_images"]), options.get("class_prompt"), generate,
                                batch_size=int(options.get("class_batch_size", 1)), on_text=on_text,
                                should_stop=should_stop,
                                **{k: v for k, v in data.items() if k != "root"})
            if should_stop is not None and should_stop():
                return {**TrainResult(None, 0, interrupted=True, skipped_images=ds.skipped).to_dict(),
                        "captioned": captioned}
        class_ds = TrainingDataset.from_folder(**data)
    sampler = None
    if spec.get("sample_prompts") and config.get("sample_every_n_steps"):
        res = spec["dataset"].get("resolution", 512)
        w, h = (res, res) if isinstance(res, int) else res
        sampler = engine_sampler(engine, spec["sample_prompts"], work / "samples", width=w, height=h)
    if on_text is not None:
        on_text("Initializing training...")
    out = train_dreambooth(checkpoint.path, ds, class_dataset=class_ds, device=engine.plan.device,
                           resume=bool(spec.get("resume")) or resume, on_progress=on_progress,
                           should_stop=should_stop, sampler=sampler, output_dir=engine.paths.ckpt_dirs[0],
                           work_dir=work, output_name=name, **config)
    engine.registry.refresh()
    return {**out.to_dict(), "class_images": class_ds.num_train_images if class_ds is not None else 0,
            "captioned": captioned}
