"""What the LoRA and Dreambooth trainers share: the diffusion loss of a batch, the text encoding, precision and
optimizer choices, the step loop with its resumable state, and the run around it (:func:`run_to_end`: saves
every N steps, samples, the final file, the state on interrupt, the modules put back as they were).

The loss is the usual one (noise or v at a uniform timestep of the model's 1000-step schedule, optional
noise offset and min-SNR weighting). All randomness comes from one CPU generator (noise, timesteps, VAE
samples) and the dataset's (seed, epoch, batch) generators; :class:`Steps` carries the generator, the
optimiser, the LR scheduler and the loss log, so a run resumed at step k from its state ends bit-identical to
one that was never stopped (the trainer adds its own weights to the state).
"""

from __future__ import annotations

import contextlib
import csv
import html
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..core.errors import RequestError
from ..engine.schedules import DiscreteSchedule
from ..models.detect import ModelSpec
from ..models.loader import LoadedModel
from .dataset import Batch, TrainingDataset

SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "cosine_with_restarts", "polynomial")


class TrainingError(RequestError):
    """A training request that cannot run (unfit base model, missing dataset, bad learning rate, an option this
    machine lacks): the one error class of every trainer here."""


@dataclass
class RunConfig:
    """The options every LoRA / Dreambooth run has (kohya's names); each trainer's config adds its own."""

    train_text_encoder: bool = True
    learning_rate: float = 1e-4
    text_encoder_lr: float | None = None  # None: learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    max_train_steps: int | None = None  # one of these two (steps win); neither: 1600 as kohya
    max_train_epochs: int | None = None
    batch_size: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"  # "no", "fp16" (CUDA), "bf16"
    min_snr_gamma: float | None = None
    noise_offset: float | None = None
    optimizer: str = "AdamW"  # or "AdamW8bit" (bitsandbytes on CUDA)
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 42
    save_every_n_steps: int | None = None
    sample_every_n_steps: int | None = None
    output_dir: Path = Path("output")
    output_name: str = "last"
    clip_skip: int = 1
    cache_latents: bool = False  # kohya's cache_latents: every picture (and its mirror) through the VAE once


@dataclass
class TrainProgress:
    """A finished optimizer step, of any trainer here: what progress bars, /progress and the CLI show."""

    step: int  # optimizer steps done
    total: int  # the step the run ends at
    loss: float
    eta: float | None = None  # seconds left (LoRA, Dreambooth)
    epoch: int = 0  # LoRA, Dreambooth: 1-based; textual inversion, hypernetworks: A1111's 0-based
    epoch_step: int = 0  # textual inversion, hypernetworks: the step within the epoch (1-based)
    steps_per_epoch: int = 0
    learn_rate: float | None = None
    prompt: str = ""  # textual inversion, hypernetworks: the step's first caption
    last_saved_file: str = "<none>"
    last_saved_image: str = "<none>"
    preview: Image.Image | None = None  # the picture made at this step (create_image_every), if any
    kind: str = "embedding"  # what is trained, for A1111's textinfo

    @property
    def textinfo(self) -> str:
        """What A1111 shows under the progress bar while training an embedding or hypernetwork (state.textinfo)."""
        return (f"<p>\nLoss: {self.loss:.7f}<br/>\nStep: {self.step}<br/>\nLast prompt: {html.escape(self.prompt)}<br/>\n"
                f"Last saved {self.kind}: {html.escape(self.last_saved_file)}<br/>\n"
                f"Last saved image: {html.escape(self.last_saved_image)}<br/>\n</p>\n")


@dataclass
class TrainResult:
    """How a run of any trainer here ended."""

    path: Path | None  # the trained file; LoRA / Dreambooth: None when interrupted (the state is in state_path)
    steps: int  # the step reached
    total: int = 0  # the step the run was to end at
    interrupted: bool = False
    state_path: Path | None = None  # LoRA / Dreambooth's resume state (the others resume from the file + .optim)
    log_path: Path | None = None  # the loss log (CSV)
    # LoRA / Dreambooth: the loss of every step from the first (a resumed run's too); textual inversion and
    # hypernetworks: (step, loss) of this run's steps
    losses: list = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # what the file's header records
    skipped_images: list[tuple[str, str]] = field(default_factory=list)  # (file name, why) of unreadable pictures
    initial_step: int = 0  # the step the run started from
    seed: int = 0
    saved: list[Path] = field(default_factory=list)  # textual inversion, hypernetworks: the every-N-steps copies
    images: list[Path] = field(default_factory=list)  # ... and pictures (create_image_every)
    note: str = ""

    def to_dict(self) -> dict:
        """The run as a queue job's JSON result (``metadata`` left out: it is in the file)."""
        def text(p: Path | None) -> str | None:
            return None if p is None else str(p)

        return {"path": text(self.path), "steps": self.steps, "total": self.total, "interrupted": self.interrupted,
                "state_path": text(self.state_path), "log_path": text(self.log_path),
                "losses": [list(x) if isinstance(x, tuple) else x for x in self.losses],
                "skipped_images": [list(s) for s in self.skipped_images], "initial_step": self.initial_step,
                "seed": self.seed, "saved": [str(p) for p in self.saved], "images": [str(p) for p in self.images],
                "note": self.note}


def check_unet_spec(spec: ModelSpec, name: str, what: str) -> None:
    """Refuse the base models these trainers cannot train (``name``: the file's, ``what``: the trainer's, for
    the message)."""
    if spec.is_flow:
        raise TrainingError(f"{name}: {what} here supports SD 1.x, 2.x and SDXL UNets, not {spec.describe()}")
    if spec.family == "sdxl_refiner":
        raise TrainingError(f"{name}: an SDXL refiner cannot be trained (train on the SDXL base)")
    if spec.inpainting:
        raise TrainingError(f"{name}: an inpainting UNet (9 input channels) cannot be trained here")


def check_unet_model(model: LoadedModel, what: str) -> None:
    check_unet_spec(model.spec, model.path.name, what)


def autocast_dtype(device: torch.device, mixed_precision: str | None) -> torch.dtype | None:
    """The autocast dtype of kohya's ``mixed_precision`` ("no", "fp16", "bf16") on ``device``, or None."""
    if mixed_precision in ("no", "", None):
        return None
    if mixed_precision == "bf16":
        if device.type == "cpu" and not torch.cpu._is_avx512_bf16_supported():
            raise TrainingError("bf16 mixed precision on the CPU needs avx512_bf16 (this CPU lacks it); "
                                "use mixed_precision='no'")
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("this GPU has no bf16; use mixed_precision='fp16'")
        return torch.bfloat16
    if mixed_precision == "fp16":
        if device.type != "cuda":
            raise TrainingError("fp16 mixed precision needs a CUDA GPU; on the CPU use bf16 or 'no'")
        return torch.float16
    raise TrainingError(f"unknown mixed precision {mixed_precision!r} (no, fp16, bf16)")


def make_optimizer(name: str, groups: list[dict], learning_rate: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=weight_decay)
    if name == "AdamW8bit":
        if device.type != "cuda":
            raise TrainingError("8-bit AdamW (bitsandbytes) runs on a CUDA GPU only; use optimizer='AdamW' on the CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("8-bit AdamW needs the bitsandbytes package (pip install bitsandbytes); "
                                "or use optimizer='AdamW'") from None
        return bnb.optim.AdamW8bit(groups, lr=learning_rate, weight_decay=weight_decay)
    raise TrainingError(f"unknown optimizer {name!r} (AdamW, AdamW8bit)")


def make_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total: int,
                      num_cycles: int = 1, power: float = 1.0):
    """diffusers' ``get_scheduler`` (kohya's choices: :data:`SCHEDULERS`)."""
    if name not in SCHEDULERS:
        raise TrainingError(f"unknown lr_scheduler {name!r} ({', '.join(SCHEDULERS)})")
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total,
                         num_cycles=num_cycles, power=power)


def total_steps(max_train_steps: int | None, max_train_epochs: int | None, per_epoch: int) -> int:
    """kohya's rule: the steps when given, else the epochs' steps, else 1600."""
    if max_train_steps:
        return max_train_steps
    if max_train_epochs:
        return max_train_epochs * per_epoch
    return 1600


class TextEncoding:
    """Captions -> (context, pooled) with the model's encoders directly (trainable when asked), as the
    engine's conditioner does it for a single 75-token chunk: hidden layer per encoder spec (SD 1.x: clip
    skip), the final layer norm where the family applies it, SDXL's encoders concatenated + pooled output."""

    def __init__(self, model: LoadedModel, device: torch.device, clip_skip: int = 1):
        self.model, self.device, self.clip_skip = model, device, clip_skip

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        zs, pooled = [], None
        for spec, encoder, tokenizer in zip(self.model.spec.text_encoders, self.model.text_encoders,
                                            self.model.tokenizers):
            ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            layer = -self.clip_skip if self.model.spec.family == "sd1" else spec.hidden_layer
            hidden = layer != -1 or not spec.final_norm  # last_hidden_state is the last layer, normed
            out = encoder(input_ids=ids, output_hidden_states=hidden)
            z = out.last_hidden_state
            if hidden:
                z = out.hidden_states[layer]
                if spec.final_norm:
                    inner = encoder.text_model if hasattr(encoder, "text_model") else encoder
                    z = inner.final_layer_norm(z)
            zs.append(z)
            if getattr(out, "text_embeds", None) is not None:
                pooled = out.text_embeds
        return torch.cat(zs, dim=-1), pooled


def snr_weight(alphas: torch.Tensor, t: torch.Tensor, gamma: float, v: bool) -> torch.Tensor:
    """kohya's ``apply_snr_weight``: min(SNR, gamma) / SNR (epsilon), / (SNR + 1) (v)."""
    a = alphas[t]
    snr = a / (1 - a)
    w = torch.clamp(snr, max=gamma) / (snr + 1 if v else snr)
    return w


def noised(latents: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, v_pred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward diffusion of ``latents`` at cumulative alpha ``a`` (broadcastable) and the UNet's training
    target there: the noise, or v = sqrt(a)·noise − sqrt(1−a)·latents. Every trainer here (LoRA, Dreambooth,
    textual inversion, hypernetworks, the demo model's recipe) noises through this one function."""
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if v_pred else noise
    return noisy, target


def batch_loss(model: LoadedModel, batch, gen: torch.Generator, *, device: torch.device | str = "cpu",
               noise_offset: float | None = None, min_snr_gamma: float | None = None,
               autocast: torch.dtype | None = None, train_text_encoder: bool = False, encode_text=None,
               alphas: torch.Tensor | None = None) -> torch.Tensor:
    """The training loss of one :class:`~sdstudio.training.dataset.Batch`: VAE latent sample, noise (plus
    ``noise_offset`` x per-channel noise), a uniform timestep, noise or v as the target by the model's
    prediction type, the MSE per picture (weighted by min-SNR when ``min_snr_gamma``), averaged. All random
    draws come from ``gen`` in a fixed order (a fixed generator state gives the same loss)."""
    device = torch.device(device)
    unet, vae = model.unet, model.vae
    alphas = DiscreteSchedule().alphas_cumprod.to(device) if alphas is None else alphas
    encode_text = encode_text or TextEncoding(model, device)
    v_pred = model.spec.prediction == "v_prediction"
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        if batch.latents is not None:  # cached (TrainingDataset.cache_latents): the same distribution
            mean, std = (t.to(device) for t in batch.latents)
        else:
            dist = vae.encode(batch.pixels.to(device, vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        noise_vae = torch.randn(mean.shape, generator=gen).to(device, mean.dtype)
        latents = ((mean + std * noise_vae).float() - shift) * scaling
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen).to(device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=gen).to(device)
    t = torch.randint(0, len(alphas), (n,), generator=gen).to(device)
    noisy, target = noised(latents, noise, alphas[t].view(-1, 1, 1, 1), v_pred)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        with torch.set_grad_enabled(train_text_encoder and torch.is_grad_enabled()):
            context, pooled = encode_text(batch.captions)
        extra = {}
        if model.spec.is_sdxl:  # size conditioning: original (h, w), crop (top, left), target (h, w)
            h, w = batch.size
            time_ids = torch.tensor([[*size, *crop, h, w] for size, crop in zip(batch.original_sizes, batch.crops)],
                                    dtype=torch.float32)
            extra["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(device)}
        pred = unet(noisy.to(unet.dtype), t, context.to(unet.dtype), **extra).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        loss = loss * snr_weight(alphas, t, min_snr_gamma, v_pred)
    return loss.mean()


def vae_encoder(vae, device: torch.device | str = "cpu") -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``pixels -> (mean, std)`` of the VAE's latent distribution, for :meth:`TrainingDataset.cache_latents`
    (the encoding :func:`batch_loss` does when nothing is cached)."""
    device = torch.device(device)

    @torch.no_grad()
    def encode(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        return dist.mean, dist.std

    return encode


def set_checkpointing(module: nn.Module, on: bool) -> None:
    """Gradient checkpointing on or off: diffusers' names, transformers 5's (``activation_checkpointing_*``) or
    older transformers' (``gradient_checkpointing_*``)."""
    for name in (("enable_gradient_checkpointing", "activation_checkpointing_enable", "gradient_checkpointing_enable")
                 if on else ("disable_gradient_checkpointing", "activation_checkpointing_disable",
                             "gradient_checkpointing_disable")):
        if hasattr(module, name):
            getattr(module, name)()
            return


def write_log(path: Path, rows: list[tuple[int, int, float, float]]) -> None:
    """The loss log: ``step, epoch, loss, lr`` per step (what the loss plot reads)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "loss", "lr"])
        for step, epoch, loss, lr in rows:
            w.writerow([step, epoch, f"{loss:.6f}", f"{lr:.3e}"])


class Steps:
    """The optimisation state of a run and its step loop: optimizer, LR scheduler, loss scaler (fp16),
    generator, the step reached, when the run started and the loss log. :meth:`state_dict` /
    :meth:`load_state_dict` carry it across an interrupt."""

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler, gen: torch.Generator, *,
                 scaler: torch.amp.GradScaler | None = None, max_grad_norm: float | None = None):
        self.optimizer, self.scheduler, self.gen, self.scaler = optimizer, scheduler, gen, scaler
        self.max_grad_norm = max_grad_norm
        self.step = 0
        self.started = time.time()
        self.log: list[tuple[int, int, float, float]] = []

    @property
    def losses(self) -> list[float]:
        return [r[2] for r in self.log]

    def state_dict(self) -> dict:
        return {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "generator": self.gen.get_state(), "scaler": self.scaler.state_dict() if self.scaler else None,
                "started_at": self.started, "log": self.log}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["generator"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.started, self.log = state["step"], state["started_at"], [tuple(r) for r in state["log"]]

    def save(self, path: Path, **extra) -> None:
        """The state and ``extra`` (the trainer's weights) into ``path``, atomically."""
        tmp = path.with_name(path.name + ".tmp")
        torch.save({**self.state_dict(), **extra}, tmp)
        tmp.replace(path)

    def update(self, loss: torch.Tensor) -> float:
        """One optimiser step on ``loss`` (gradients clipped to ``max_grad_norm``); the LR it used."""
        optimizer, scaler = self.optimizer, self.scaler
        optimizer.zero_grad(set_to_none=True)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
        lr = self.scheduler.get_last_lr()[-1]
        self.scheduler.step()
        return lr

    def run(self, dataset: TrainingDataset, batch_size: int, total: int,
            loss_of: Callable[[Batch, int, int], torch.Tensor], *,
            after_step: Callable[[int, int], None] | None = None,
            on_progress: Callable[[TrainProgress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> bool:
        """Steps from :attr:`step` to ``total`` over the dataset's epochs (a resumed run starts inside its
        epoch, at the batch it reached). ``loss_of(batch, epoch, index)`` is the step's loss (``self.step``
        is the step's 0-based number meanwhile); then the log, ``on_progress`` (with the ETA),
        ``after_step(step, epoch)`` (1-based both: saves, samples) and ``should_stop``. True when stopped."""
        per_epoch = dataset.batches_per_epoch(batch_size)
        t0, step0 = time.time(), self.step
        while self.step < total:
            epoch, index = divmod(self.step, per_epoch)
            batches = dataset.epoch_batches(epoch, batch_size)
            for b in range(index, len(batches)):
                if self.step >= total:
                    break
                loss = loss_of(dataset.load_batch(batches[b], epoch, b), epoch, b)
                lr = self.update(loss)
                self.step += 1
                value = float(loss.detach())
                self.log.append((self.step, epoch + 1, value, lr))
                if on_progress is not None:
                    rate = (time.time() - t0) / max(1, self.step - step0)
                    on_progress(TrainProgress(self.step, total, value, rate * (total - self.step), epoch + 1,
                                              b + 1, per_epoch, lr))
                if after_step is not None:
                    after_step(self.step, epoch + 1)
                if should_stop is not None and self.step < total and should_stop():
                    return True
        return False


    @classmethod
    def for_run(cls, optimizer: torch.optim.Optimizer, cfg: RunConfig, total: int, precision: torch.dtype | None) -> Steps:
        """The state of a LoRA / Dreambooth run: ``cfg``'s LR scheduler over ``total`` steps, its seed's
        generator, a loss scaler under fp16 autocast, its gradient clipping."""
        scheduler = make_lr_scheduler(cfg.lr_scheduler, optimizer, warmup_steps=cfg.lr_warmup_steps, total=total,
                                      num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)
        scaler = torch.amp.GradScaler("cuda") if precision == torch.float16 else None
        return cls(optimizer, scheduler, torch.Generator().manual_seed(cfg.seed), scaler=scaler,
                   max_grad_norm=cfg.max_grad_norm)


def loss_options(model: LoadedModel, cfg: RunConfig, device: torch.device, precision: torch.dtype | None) -> dict:
    """:func:`batch_loss`'s keyword arguments for a run with ``cfg`` (a LoRA or Dreambooth config)."""
    return {"device": device, "noise_offset": cfg.noise_offset, "min_snr_gamma": cfg.min_snr_gamma,
            "autocast": precision, "train_text_encoder": cfg.train_text_encoder,
            "encode_text": TextEncoding(model, device, cfg.clip_skip),
            "alphas": DiscreteSchedule().alphas_cumprod.to(device)}


def resume_state(resume: bool | str | Path, state_path: Path) -> tuple[Path, dict] | None:
    """The saved run to carry on from, (its file, its state): ``resume`` True takes ``state_path`` when it
    exists, a path names a state file; None when there is none."""
    path = Path(resume) if isinstance(resume, (str, Path)) else (state_path if resume else None)
    if path is None or not path.is_file():
        return None
    return path, torch.load(path, map_location="cpu", weights_only=False)  # our own file


def run_to_end(steps: Steps, dataset: TrainingDataset, batch_size: int, total: int,
               loss_of: Callable[[Batch, int, int], torch.Tensor], *, trained: list[nn.Module],
               save: Callable[[Path, int], Path], save_state: Callable[[], None], output_dir: Path,
               output_name: str, log_path: Path, save_every: int | None = None, sample_every: int | None = None,
               sampler: Callable[[Path, int], object] | None = None,
               sampling: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               gradient_checkpointing: bool = False, train_weights: bool = False,
               on_progress: Callable[[TrainProgress], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Path | None:
    """:meth:`Steps.run` from the step reached to ``total``, and what a trainer does around it: the
    ``trained`` modules in training mode (with gradient checkpointing; their own weights set to learn
    when ``train_weights``) and put back as the loader leaves them afterwards, whatever happens;
    ``save(path, epoch)`` writes ``<output_name>-step00000050.safetensors`` every ``save_every`` steps
    (with the state and the loss log) and ``<output_name>.safetensors`` at the end; ``sampler(file, step)``
    runs every ``sample_every`` steps on that step's file (the last step's: the final file) inside
    ``sampling()``; on interrupt the state is saved. The final file, or None when interrupted."""

    def step_file(step: int) -> Path:
        return output_dir / f"{output_name}-step{step:08d}.safetensors"

    def sample(path: Path, step: int) -> None:
        with sampling(), torch.no_grad():
            sampler(path, step)

    def sample_due(step: int) -> bool:
        return sampler is not None and bool(sample_every) and step % sample_every == 0

    def after_step(step: int, epoch: int) -> None:
        saved = None
        if save_every and step % save_every == 0 and step < total:
            saved = save(step_file(step), epoch)
            save_state()
            write_log(log_path, steps.log)
        if sample_due(step) and step < total:  # the last step samples from the final file
            sample(saved or save(step_file(step), epoch), step)

    def training_mode(on: bool) -> None:
        for m in trained:
            if train_weights:
                m.requires_grad_(on)
            m.train(on)
            if gradient_checkpointing:
                set_checkpointing(m, on)

    training_mode(True)
    path = None
    try:
        if steps.run(dataset, batch_size, total, loss_of, after_step=after_step, on_progress=on_progress,
                     should_stop=should_stop):
            save_state()
        else:
            path = save(output_dir / f"{output_name}.safetensors",
                        math.ceil(steps.step / dataset.batches_per_epoch(batch_size)))
        write_log(log_path, steps.log)
        if path is not None and sample_due(steps.step):
            sample(path, steps.step)
    finally:
        training_mode(False)
        steps.optimizer.zero_grad(set_to_none=True)  # the gradients' memory back
    return path
