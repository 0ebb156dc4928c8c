"""Training a LoRA / LoCon on an SD 1.x, 2.x or SDXL checkpoint, saved as kohya's sd-scripts saves one.

The network is kohya's ``networks.lora``: a down / up pair beside each Linear and 1x1 conv inside the
UNet's transformer blocks and the text encoders' attention and MLP blocks (LoCon: with ``conv_dim`` also the
3x3 convs of the ResNet blocks and the down/up-samplers), output = original + up(down(x)) * alpha / dim,
``up`` starting at zero. Module names are kohya's: ``lora_unet_<diffusers path>`` for SD 1.x / 2.x,
``lora_unet_<original (LDM) path>`` for SDXL (as sd-scripts writes them: its SDXL UNet has the original
names), ``lora_te_`` / SDXL ``lora_te1_`` ``lora_te2_`` + the transformers path; the file holds
``<name>.lora_down.weight``, ``<name>.lora_up.weight`` and ``<name>.alpha`` and the ``ss_*`` metadata, with
``sshs_model_hash`` / ``sshs_legacy_hash`` computed as ``train_util.precalculate_safetensors_hashes`` does.

The loss, the precision and optimizer choices and the step loop are :mod:`sdstudio.training.loop`'s (shared
with the Dreambooth trainer); the state file carries the network beside the loop's state (generator,
optimiser, scheduler, loss log): a run resumed at step k ends bit-identical to one that was never stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_bytes
from torch import nn

from ..models.convert import unet_hf_to_ldm
from ..models.loader import LoadedModel, load_checkpoint
from .dataset import TrainingDataset
from .loop import (
    SCHEDULERS,
    RunConfig,
    Steps,
    TrainingError,
    TrainProgress,
    TrainResult,
    autocast_dtype,
    batch_loss,
    check_unet_model,
    loss_options,
    make_optimizer,
    resume_state,
    run_to_end,
    total_steps,
    vae_encoder,
)
from .loop import snr_weight as _snr_weight  # noqa: F401 - the name the tests know

UNET_TARGETS = ("Transformer2DModel",)
UNET_CONV_TARGETS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_TARGETS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")

# ---- the network ---------------------------------------------------------------------------------------
class LoRAModule(nn.Module):
    """kohya's LoRAModule: wraps ``org``'s forward (the original module and its weights are untouched)."""

    def __init__(self, name: str, org: nn.Module, dim: int, alpha: float):
        super().__init__()
        self.lora_name = name
        if isinstance(org, nn.Conv2d):
            self.lora_down = nn.Conv2d(org.in_channels, dim, org.kernel_size, org.stride, org.padding, bias=False)
            self.lora_up = nn.Conv2d(dim, org.out_channels, 1, 1, bias=False)
        else:
            self.lora_down = nn.Linear(org.in_features, dim, bias=False)
            self.lora_up = nn.Linear(dim, org.out_features, bias=False)
        alpha = dim if not alpha else alpha
        self.scale = alpha / dim
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.multiplier = 1.0
        self._org = [org]  # a list: not a submodule (its weights are not the network's)
        self._org_forward = None

    def apply_to(self) -> None:
        org = self._org[0]
        self._org_forward = org.forward
        org.forward = self.forward

    def restore(self) -> None:
        if self._org_forward is not None:
            del self._org[0].forward  # back to the class's forward
            self._org_forward = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._org_forward(x)
        if not self.multiplier:
            return out
        return out + self.lora_up(self.lora_down(x)) * (self.multiplier * self.scale)


def _kohya_unet_name(model: LoadedModel, path: str) -> str:
    """kohya's module name for a UNet module: diffusers' path for SD 1.x / 2.x, the original for SDXL."""
    if model.spec.is_sdxl:
        ldm = unet_hf_to_ldm(path + ".weight", model.spec.layers_per_block, list(model.spec.up_has_attention))
        if ldm:
            path = ldm.removesuffix(".weight")
    return "lora_unet_" + path.replace(".", "_")


class LoRANetwork(nn.ModuleDict):
    """The LoRA modules by kohya name (so ``state_dict()`` is the file's layout)."""

    def __init__(self, model: LoadedModel, dim: int = 4, alpha: float = 1.0, *, conv_dim: int | None = None,
                 conv_alpha: float | None = None, unet: bool = True, text_encoder: bool = True):
        super().__init__()
        self.unet_names: list[str] = []
        self.te_names: list[str] = []
        if text_encoder:
            prefixes = ["lora_te_"] if len(model.text_encoders) == 1 else ["lora_te1_", "lora_te2_"]
            for prefix, encoder in zip(prefixes, model.text_encoders):
                for name, child in self._targets(encoder, TEXT_TARGETS):
                    # kohya's names have transformers' ``text_model.`` level (flattened in transformers 5)
                    name = name if name.startswith("text_model.") else "text_model." + name
                    self._add(prefix + name.replace(".", "_"), child, dim, alpha, self.te_names)
        if unet:
            targets = UNET_TARGETS + (UNET_CONV_TARGETS if conv_dim else ())
            for name, child in self._targets(model.unet, targets):
                is_3x3 = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
                if is_3x3 and not conv_dim:
                    continue
                d, a = (conv_dim, conv_alpha) if is_3x3 else (dim, alpha)
                self._add(_kohya_unet_name(model, name), child, d, a, self.unet_names)

    @staticmethod
    def _targets(root: nn.Module, classes: tuple[str, ...]):
        seen = set()
        for name, module in root.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child_name, child in module.named_modules():
                if isinstance(child, (nn.Linear, nn.Conv2d)) and id(child) not in seen:
                    seen.add(id(child))
                    yield f"{name}.{child_name}", child

    def _add(self, name: str, org: nn.Module, dim: int, alpha: float, names: list[str]) -> None:
        if name in self:
            raise RuntimeError(f"duplicated LoRA module name {name}")
        self[name] = LoRAModule(name, org, dim, alpha)
        names.append(name)

    def apply_to(self) -> None:
        for m in self.values():
            m.apply_to()

    def restore(self) -> None:
        for m in self.values():
            m.restore()

    def set_multiplier(self, value: float) -> None:
        for m in self.values():
            m.multiplier = value

    @contextlib.contextmanager
    def applied(self) -> Iterator[LoRANetwork]:
        """The network in its model's forwards meanwhile (the model as it was afterwards)."""
        self.apply_to()
        try:
            yield self
        finally:
            self.restore()

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        """Multiplier 0 meanwhile (a sampler loading the saved file through the engine sees the base model)."""
        self.set_multiplier(0.0)
        try:
            yield
        finally:
            self.set_multiplier(1.0)

    def param_groups(self, unet_lr: float, te_lr: float) -> list[dict]:
        groups = []
        for names, lr in ((self.te_names, te_lr), (self.unet_names, unet_lr)):
            params = [p for n in names for p in self[n].parameters()]
            if params:
                groups.append({"params": params, "lr": lr})
        return groups


# ---- saving ---------------------------------------------------------------------------------------------
def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya's ``precalculate_safetensors_hashes``: the sha256 of the
    tensor data after the header, and the old 8-digit hash of bytes 0x100000..0x110000 of the file written
    with only the ``ss_*`` metadata."""
    data = save_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    n = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + n:]).hexdigest()
    legacy = hashlib.sha256(io.BytesIO(data).getbuffer()[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy


def save_network(network: LoRANetwork, path: Path, metadata: dict[str, str], dtype: torch.dtype = torch.float32
                 ) -> Path:
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in network.state_dict().items()}
    metadata = dict(metadata)
    metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(tensors, metadata)
    data = save_bytes(tensors, metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def model_hash(path: Path) -> tuple[str, str]:
    """(A1111's old 8-digit hash, the file's sha256) of the base checkpoint, as kohya records them."""
    old = hashlib.sha256()
    full = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        old.update(f.read(0x10000))
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            full.update(chunk)
    return old.hexdigest()[:8], full.hexdigest()


# ---- the run --------------------------------------------------------------------------------------------
@dataclass
class LoraConfig(RunConfig):
    """kohya's train_network.py options (the shared ones: :class:`~sdstudio.training.loop.RunConfig`)."""

    network_dim: int = 4
    network_alpha: float = 1.0
    network_module: str = "networks.lora"
    conv_dim: int | None = None  # LoCon: also the 3x3 convs (kohya's network_args conv_dim / conv_alpha)
    conv_alpha: float | None = None
    train_unet: bool = True
    unet_lr: float | None = None  # None: learning_rate
    save_dtype: torch.dtype = torch.float32
    training_comment: str | None = None


def base_model_version(model: LoadedModel) -> str:
    """kohya's ``ss_base_model_version``."""
    family = model.spec.family
    if family == "sdxl":
        return "sdxl_base_v1-0"
    v = "_v" if model.spec.prediction == "v_prediction" else ""
    return ("sd_v2" if family == "sd2" else "sd_v1") + v


def _metadata(cfg: LoraConfig, model: LoadedModel, ds: TrainingDataset, total: int, per_epoch: int,
              started: float, base_hashes: tuple[str, str] | None, optimizer: torch.optim.Optimizer,
              precision: str) -> dict[str, str]:
    net_args = {"conv_dim": str(cfg.conv_dim), "conv_alpha": str(cfg.conv_alpha if cfg.conv_alpha else cfg.conv_dim)} \
        if cfg.conv_dim else None
    epochs = math.ceil(total / per_epoch)
    meta = {
        "ss_session_id": cfg.seed, "ss_training_started_at": started, "ss_output_name": cfg.output_name,
        "ss_learning_rate": cfg.learning_rate, "ss_text_encoder_lr": cfg.text_encoder_lr, "ss_unet_lr": cfg.unet_lr,
        "ss_num_train_images": ds.num_train_images, "ss_num_reg_images": 0, "ss_num_batches_per_epoch": per_epoch,
        "ss_num_epochs": epochs, "ss_gradient_checkpointing": cfg.gradient_checkpointing,
        "ss_gradient_accumulation_steps": 1, "ss_max_train_steps": total, "ss_lr_warmup_steps": cfg.lr_warmup_steps,
        "ss_lr_scheduler": cfg.lr_scheduler, "ss_network_module": cfg.network_module,
        "ss_network_dim": cfg.network_dim, "ss_network_alpha": cfg.network_alpha, "ss_network_dropout": None,
        "ss_mixed_precision": precision, "ss_full_fp16": False, "ss_v2": model.spec.family == "sd2",
        "ss_base_model_version": base_model_version(model), "ss_clip_skip": cfg.clip_skip if cfg.clip_skip > 1 else None,
        "ss_max_token_length": None, "ss_cache_latents": cfg.cache_latents, "ss_seed": cfg.seed, "ss_lowram": False,
        "ss_noise_offset": cfg.noise_offset, "ss_training_comment": cfg.training_comment,
        "ss_optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "ss_max_grad_norm": cfg.max_grad_norm, "ss_caption_dropout_rate": ds.captions.dropout,
        "ss_caption_dropout_every_n_epochs": 0, "ss_caption_tag_dropout_rate": ds.captions.tag_dropout,
        "ss_face_crop_aug_range": None, "ss_prior_loss_weight": 1.0, "ss_min_snr_gamma": cfg.min_snr_gamma,
        "ss_batch_size_per_device": cfg.batch_size, "ss_total_batch_size": cfg.batch_size,
        "ss_resolution": tuple(ds.resolution), "ss_color_aug": False, "ss_flip_aug": ds.flip_aug,
        "ss_random_crop": False, "ss_shuffle_caption": ds.captions.shuffle, "ss_enable_bucket": ds.enable_bucket,
        "ss_bucket_no_upscale": ds.bucket_no_upscale, "ss_min_bucket_reso": ds.min_bucket_reso,
        "ss_max_bucket_reso": ds.max_bucket_reso, "ss_keep_tokens": ds.captions.keep_tokens,
        "ss_dataset_dirs": json.dumps({k: {"n_repeats": r, "img_count": n} for k, (r, n) in ds.folders.items()}),
        "ss_reg_dataset_dirs": json.dumps({}), "ss_tag_frequency": json.dumps(ds.tag_frequency),
        "ss_bucket_info": json.dumps(ds.bucket_info), "ss_sd_model_name": model.path.name,
    }
    if net_args:
        meta["ss_network_args"] = json.dumps(net_args)
    if base_hashes:
        meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"] = base_hashes
    return {k: str(v) for k, v in meta.items()}


def train_lora(model: LoadedModel | str | Path, dataset: TrainingDataset, config: LoraConfig | None = None, *,
               device: str | torch.device = "cpu", resume: bool | str | Path = False,
               on_progress: Callable[[TrainProgress], None] | None = None,
               should_stop: Callable[[], bool] | None = None,
               sampler: Callable[[Path, int], object] | None = None, **overrides) -> TrainResult:
    """Train a LoRA on ``model`` (a loaded model, left as it was afterwards, or a checkpoint file) with
    ``dataset``. ``config`` fields may also be passed as keywords. Files in ``output_dir``:
    ``<name>.safetensors`` at the end, ``<name>-step00000050.safetensors`` every ``save_every_n_steps``,
    ``<name>-state.pt`` (resume state: at each save and on interrupt), ``<name>-log.csv`` (loss per step).
    ``resume``: True continues from ``<name>-state.pt`` when there is one, a path names a state file.
    ``should_stop`` (checked after each step) saves the state and returns (``interrupted``).
    ``sampler(lora_file, step)`` runs every ``sample_every_n_steps`` with that step's saved file (the last
    step's: the final file; see :func:`engine_sampler`); the network in training is switched off meanwhile."""
    cfg = LoraConfig(**{**(config.__dict__ if config else {}), **overrides})
    cfg.output_dir = Path(cfg.output_dir)
    if cfg.lr_scheduler not in SCHEDULERS:
        raise TrainingError(f"unknown lr_scheduler {cfg.lr_scheduler!r} ({', '.join(SCHEDULERS)})")
    if not (cfg.train_unet or cfg.train_text_encoder):
        raise TrainingError("nothing to train: train_unet and train_text_encoder are both off")
    device = torch.device(device)
    if not isinstance(model, LoadedModel):
        model = load_checkpoint(Path(model), torch.float32)
    check_unet_model(model, "LoRA training")
    precision = autocast_dtype(device, cfg.mixed_precision)
    if model.unet.dtype != torch.float32 and precision is None:
        raise TrainingError(f"the model is loaded in {model.unet.dtype}; load it in float32 or use mixed precision")

    unet, vae, encoders = model.unet, model.vae, model.text_encoders
    for m in [unet, vae, *encoders]:
        m.to(device)
    if cfg.cache_latents:
        dataset.cache_latents(vae_encoder(vae, device))
    with torch.random.fork_rng(devices=[]):  # lora_down's kaiming init, seeded (kohya: set_seed) without
        torch.manual_seed(cfg.seed)           # touching the caller's global generator
        network = LoRANetwork(model, cfg.network_dim, cfg.network_alpha, conv_dim=cfg.conv_dim,
                              conv_alpha=cfg.conv_alpha, unet=cfg.train_unet, text_encoder=cfg.train_text_encoder)
    network.to(device)
    unet_lr = cfg.unet_lr if cfg.unet_lr is not None else cfg.learning_rate
    te_lr = cfg.text_encoder_lr if cfg.text_encoder_lr is not None else cfg.learning_rate
    optimizer = make_optimizer(cfg.optimizer, network.param_groups(unet_lr, te_lr), cfg.learning_rate,
                               cfg.weight_decay, device)
    per_epoch = dataset.batches_per_epoch(cfg.batch_size)
    total = total_steps(cfg.max_train_steps, cfg.max_train_epochs, per_epoch)
    steps = Steps.for_run(optimizer, cfg, total, precision)

    out = cfg.output_dir
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / f"{cfg.output_name}-state.pt"
    log_path = out / f"{cfg.output_name}-log.csv"
    saved = resume_state(resume, state_path)
    if saved is not None:
        network.load_state_dict(saved[1]["network"])
        steps.load_state_dict(saved[1])
    base_hashes = model_hash(model.path) if Path(model.path).is_file() else None
    metadata = _metadata(cfg, model, dataset, total, per_epoch, steps.started, base_hashes, optimizer,
                         cfg.mixed_precision)
    options = loss_options(model, cfg, device, precision)

    def save_state() -> None:
        steps.save(state_path, network=network.state_dict(), total=total)

    def save_lora(path: Path, epoch: int) -> Path:
        meta = dict(metadata, ss_training_finished_at=str(time.time()), ss_steps=str(steps.step), ss_epoch=str(epoch))
        return save_network(network, path, meta, cfg.save_dtype)

    def loss_of(batch, epoch: int, index: int) -> torch.Tensor:
        return batch_loss(model, batch, steps.gen, **options)

    trained = ([unet] if cfg.train_unet else []) + (list(encoders) if cfg.train_text_encoder else [])
    with network.applied():
        path = run_to_end(steps, dataset, cfg.batch_size, total, loss_of, trained=trained, save=save_lora,
                          save_state=save_state, output_dir=out, output_name=cfg.output_name, log_path=log_path,
                          save_every=cfg.save_every_n_steps, sample_every=cfg.sample_every_n_steps, sampler=sampler,
                          sampling=network.switched_off, gradient_checkpointing=cfg.gradient_checkpointing,
                          on_progress=on_progress, should_stop=should_stop)
    interrupted = path is None
    return TrainResult(path, steps.step, total, interrupted, state_path, log_path, steps.losses,
                       dict(metadata, ss_steps=str(steps.step)), list(dataset.skipped))


def engine_sampler(engine, checkpoint: str, prompts: list[str], folder: str | Path, *, multiplier: float = 1.0,
                   **request) -> Callable[[Path, int], list]:
    """A ``sampler`` for :func:`train_lora` that generates ``prompts`` with the Engine, the step's LoRA file
    applied through ``<lora:NAME:multiplier>`` (the file must lie in the engine's LoRA folder: train with
    ``output_dir`` inside ``engine.paths.lora_dir``); pictures go to ``folder/<step>-<i>.png``."""
    from ..core.params import Txt2ImgRequest

    folder = Path(folder)

    def sample(lora_file: Path, step: int) -> list:
        engine.registry.refresh()
        rel = lora_file.relative_to(engine.paths.lora_dir).with_suffix("")
        images = []
        for i, prompt in enumerate(prompts):
            req = Txt2ImgRequest(**{"seed": 1, "steps": 20, "width": 512, "height": 512, **request,
                                    "prompt": f"{prompt} <lora:{rel.name}:{multiplier}>", "model": checkpoint})
            result = engine.generate(req)
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in enumerate(result.images):
                image.image.save(folder / f"{step:08d}-{i}-{j}.png")
                images.append(image)
        return images

    return sample


def run_job(engine, spec: dict, *, resume: bool = False, on_progress: Callable[[TrainProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None, on_text: Callable[[str], None] | None = None) -> dict:
    """A ``train_lora`` job (:meth:`~sdstudio.service.jobs.JobService.prepare_train_lora`'s JSON: ``model``,
    ``dataset``, ``output_name``, ``resume``, ``config``; optional ``caption_missing`` and ``sample_prompts``) on
    the engine's device: the pictures without a caption captioned first (``caption_missing``: ``blip``,
    ``deepbooru`` or ``both``, :func:`sdstudio.training.preprocess.caption_job_dataset`), then the run, its file
    into the engine's LoRA folder (listed at once); with ``sample_prompts`` and ``sample_every_n_steps`` the
    step's LoRA generates them through the engine (:func:`engine_sampler`) into ``models/Lora/sample/<name>/``,
    kohya's ``sample`` folder. ``resume``: carry on from the saved state (a job restarted after a crash)."""
    from .preprocess import caption_job_dataset

    checkpoint = engine.registry.checkpoint(spec["model"])
    name = spec["output_name"]
    captioned = caption_job_dataset(engine, spec, on_text)
    ds = TrainingDataset.from_folder(**spec["dataset"])
    config = dict(spec["config"])
    sampler = None
    if spec.get("sample_prompts") and config.get("sample_every_n_steps"):
        res = spec["dataset"].get("resolution", 512)
        w, h = (res, res) if isinstance(res, int) else res
        sampler = engine_sampler(engine, checkpoint.title, list(spec["sample_prompts"]),
                                 engine.paths.lora_dir / "sample" / name, width=w, height=h)
    if on_text is not None:
        on_text("Initializing training...")
    out = train_lora(checkpoint.path, ds, device=engine.plan.device, resume=bool(spec.get("resume")) or resume,
                     on_progress=on_progress, should_stop=should_stop, sampler=sampler,
                     output_dir=engine.paths.lora_dir, output_name=name, **config)
    engine.registry.refresh()
    return {**out.to_dict(), "captioned": captioned}
