"""Training the demo model in stages, resumable, then exporting an A1111-style single file.

1. VAE (AutoencoderKL, 4 latent channels, 8× down): L1 + MSE reconstruction and a small KL term on
   rendered scenes; afterwards the latent scale is folded into ``quant_conv`` / ``post_quant_conv`` so
   that latents × 0.18215 have unit variance, as the SD 1.x loaders assume.
2. Text encoder (CLIP-style, the real CLIP BPE tokenizer), on its own: from the mean of its output over all
   77 positions, linear heads must read the caption's scene (object colour and shape, background, stripes;
   size, place and count from rich captions). Trained jointly with the UNet from scratch, the encoder
   collapsed (prompts encoded alike) and the UNet learnt to ignore it; this makes every position carry the
   caption, which the UNet's cross-attention can then read at once.
3. UNet with the text encoder frozen: epsilon prediction on the SD noise schedule (scaled-linear betas
   0.00085–0.012, 1000 steps), 10 % empty captions so CFG works, captions plain or rich
   (:func:`sdstudio.eval.shapes.caption`).
4. The same UNet going on to predict v instead of the noise (see ``Config.v_steps``); the export then
   carries a ``v_pred`` key.

Every ``save_every`` steps the whole state (weights, optimiser, step, random generators) goes to
``RUN/state.pt``; a rerun with the same run folder continues from there. ``RUN/log.csv`` records the losses.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from sdstudio.engine.schedules import DiscreteSchedule
from sdstudio.eval import shapes
from sdstudio.models.loader import clip_tokenizer
from sdstudio.testing.synthetic import ldm_state_dict
from sdstudio.training.loop import noised

SCALING = 0.18215


@dataclass
class Config:
    size: int = 128  # the diffusion stage's pictures (the UNet is convolutional: it also draws 256²)
    vae_size: int = 48  # the VAE stage's pictures: it learns local detail, so small crops do, much faster
    batch: int = 16
    vae_steps: int = 1500
    text_steps: int = 800
    unet_steps: int = 4500
    lr_vae: float = 1e-3
    lr_text: float = 1e-3
    lr_unet: float = 4e-4
    # then the "v" stage: the UNet goes on learning to predict v = sqrt(a)·noise − sqrt(1−a)·picture instead
    # of the noise (the file then says so with a `v_pred` key). With epsilon prediction the picture at high
    # noise is (x − sqrt(1−a)·eps)/sqrt(a): at the first sampling step any error in copying the noise is
    # multiplied by 1/sqrt(a) ≈ 15, which drowned what the caption says (the predicted picture at t=999 was
    # the same for every prompt); v at high noise is the picture itself.
    # harness accuracy after 4500 noise steps: 79 % at 6000 v steps, 82 % at 9000 (the shipped model: 64 min on
    # 2 CPU cores with the defaults below) and 82 % at 12000
    v_steps: int = 9000
    v_cycle: int = 3000  # the v stage's rate: warm-up and cosine decay, restarted every v_cycle steps
    lr_v: float = 2e-4
    seed: int = 0
    save_every: int = 250
    # The diffusion stage encodes pictures with the (frozen) VAE; encoding costs about as much as the UNet
    # step, so encoded batches go to a pool of up to `pool` pictures and a step draws fresh ones with
    # probability `fresh` (else a random pool batch, a new latent sample of each stored distribution).
    pool: int = 4096
    fresh: float = 0.15
    # "bfloat16": encode pictures under bfloat16 autocast, half the time of float32 on a CPU with avx512_bf16
    # (latent means move by ~4 % of the latent noise); "float32" and fresh 0.3 gave 82.2 % at 12000 v steps
    encode_dtype: str = "bfloat16"
    # widths (the SD 1.x layout the loader knows: 4 UNet levels of 2 layers, 3 with cross-attention, 8 heads;
    # text heads = width // 64). The VAE's GroupNorms have 32 groups (as in every SD file), and its last
    # norms (encoder's deepest level, decoder's top level) are not residual: with 1 or 2 channels per group a
    # flat patch normalises to the same vector whatever its colour (a red and a white background decoded
    # alike), so both ends need >= 3 channels per group — hence 96 throughout.
    unet_channels: tuple[int, ...] = (32, 64, 96, 96)
    vae_channels: tuple[int, ...] = (96, 96, 96, 96)
    text_width: int = 96
    text_layers: int = 4

    @classmethod
    def tiny(cls, **kw) -> Config:
        """For tests: the same pipeline in seconds."""
        return cls(**{"size": 64, "vae_size": 64, "batch": 2, "vae_steps": 2, "text_steps": 2, "unet_steps": 2,
                      "v_steps": 1, "v_cycle": 1, "save_every": 1,
                      "unet_channels": (32, 32, 32, 32), "vae_channels": (32, 32, 32, 32), "text_width": 32,
                      "text_layers": 1, **kw})


def build(cfg: Config) -> tuple[AutoencoderKL, CLIPTextModel, UNet2DConditionModel]:
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        block_out_channels=list(cfg.vae_channels), layers_per_block=1, latent_channels=4)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=cfg.text_width, num_hidden_layers=cfg.text_layers,
                                        intermediate_size=cfg.text_width * 4, num_attention_heads=max(1, cfg.text_width // 64),
                                        max_position_embeddings=77, hidden_act="quick_gelu", pad_token_id=49407,
                                        eos_token_id=49407, bos_token_id=49406))
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, block_out_channels=list(cfg.unet_channels),
                                layers_per_block=2, attention_head_dim=8, cross_attention_dim=cfg.text_width,
                                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
    return vae, text, unet


def render_batch(scenes: list[shapes.Scene], size: int, bands: int = shapes.STRIPE_BANDS) -> torch.Tensor:
    """The scenes rendered as an N×3×size×size batch in [-1, 1] (what the VAE encodes)."""
    pictures = np.stack([np.asarray(shapes.render(s, size, bands), dtype=np.float32) for s in scenes])
    return torch.from_numpy(pictures / 127.5 - 1).permute(0, 3, 1, 2)


def _batch(rng: np.random.Generator, cfg: Config, size: int | None = None) -> tuple[torch.Tensor, list[str]]:
    scenes = [shapes.random_scene(rng, max_things=3, stripes=0.15) for _ in range(cfg.batch)]
    captions = [shapes.caption(s, rich=bool(rng.random() < 0.5)) for s in scenes]
    return render_batch(scenes, size or cfg.size), captions


def _fold_latent_scale(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """Rescale the latent space so that latents × SCALING have unit variance; returns the factor."""
    with torch.no_grad():
        std = float(vae.encode(images).latent_dist.mean.std())
        k = (1 / SCALING) / std
        c = vae.config.latent_channels
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    return k


def warmup_cosine(step: int, total: int, warmup: int = 200) -> float:
    return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / max(1, total)))


@torch.no_grad()
def reconstruction_error(vae: AutoencoderKL, cfg: Config, n: int = 16, seed: int = 12345) -> float:
    """Mean absolute error (of 255) of the VAE on fresh full-size pictures, through the latent mean."""
    images, _ = _batch(np.random.default_rng(seed), Config(**{**asdict(cfg), "batch": n}))
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    return float((recon - images).abs().mean() * 127.5)


_PROBE = {"colour": len(shapes.COLOURS), "shape": len(shapes.SHAPES), "background": len(shapes.COLOURS),
          "stripes": 2, "size": len(shapes.SIZES), "place": len(shapes.PLACES), "count": 3}
_RICH_ONLY = ("size", "place", "count")


def _label(scene: shapes.Scene, name: str) -> int:
    t = scene.main
    return {"colour": lambda: list(shapes.COLOURS).index(t.colour), "shape": lambda: list(shapes.SHAPES).index(t.shape),
            "background": lambda: list(shapes.COLOURS).index(scene.background), "stripes": lambda: int(scene.stripes),
            "size": lambda: list(shapes.SIZES).index(t.size), "place": lambda: list(shapes.PLACES).index(t.place),
            "count": lambda: len(scene.things) - 1}[name]()


@torch.no_grad()
def text_separation(run: Run) -> float:
    """Mean distance between the encodings of prompts that differ in colours, over the encodings' size."""
    a = run.text(run._tokens(["a red circle on a blue background", "a white square on a black background"]))
    b = run.text(run._tokens(["a yellow star on a green background", "a purple triangle on an orange background"]))
    a, b = a.last_hidden_state, b.last_hidden_state
    return float((a - b).abs().mean() / a.abs().mean())


def noise_loss(unet, latents: torch.Tensor, context: torch.Tensor, alphas: torch.Tensor,
               extra: torch.Tensor | None = None, prediction: str = "epsilon") -> torch.Tensor:
    """The diffusion loss at random timesteps: the UNet predicts the noise (``prediction`` "epsilon") or
    v ("v_prediction"); ``extra``: channels appended to the UNet's input (a 9-channel inpainting UNet's
    mask and masked-image latent)."""
    t = torch.randint(0, 1000, (latents.shape[0],))
    noise = torch.randn_like(latents)
    x, target = noised(latents, noise, alphas[t].view(-1, 1, 1, 1), prediction == "v_prediction")
    if extra is not None:
        x = torch.cat([x, extra], dim=1)
    return F.mse_loss(unet(x, t, context).sample, target)


def _alphas_cumprod() -> torch.Tensor:
    """The SD noise schedule the engine samples with (scaled-linear betas 0.00085-0.012, 1000 steps)."""
    return DiscreteSchedule().alphas_cumprod


class Run:
    def __init__(self, folder: Path, cfg: Config, log=print):
        self.folder, self.cfg, self.log = Path(folder), cfg, log
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vae, self.text, self.unet = build(cfg)
        self.probe = nn.ModuleDict({name: nn.Linear(cfg.text_width, n) for name, n in _PROBE.items()})
        self.stage, self.step = "vae", 0
        self.rng = np.random.default_rng(cfg.seed)
        self.opt = self._vae_optimizer()
        self.tokenizer = clip_tokenizer()
        self.pool: list[tuple[torch.Tensor, torch.Tensor, str]] = []  # (mean, std, caption); a cache, not saved
        state = self.folder / "state.pt"
        if state.is_file():
            self._load(state)

    # ---- persistence ----------------------------------------------------------------------------
    def _vae_optimizer(self):
        return torch.optim.AdamW(self.vae.parameters(), lr=self.cfg.lr_vae)

    def _text_optimizer(self):
        return torch.optim.AdamW(list(self.text.parameters()) + list(self.probe.parameters()), lr=self.cfg.lr_text,
                                 weight_decay=0.0)

    def _diffusion_optimizer(self):
        return torch.optim.AdamW(self.unet.parameters(), lr=self.cfg.lr_unet, weight_decay=1e-2)

    def _optimizer_for(self, stage: str):
        return {"vae": self._vae_optimizer, "text": self._text_optimizer}.get(stage, self._diffusion_optimizer)()

    def save(self) -> None:
        state = {"stage": self.stage, "step": self.step, "config": asdict(self.cfg), "vae": self.vae.state_dict(),
                 "text": self.text.state_dict(), "unet": self.unet.state_dict(), "opt": self.opt.state_dict(),
                 "probe": self.probe.state_dict(),
                 "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
        tmp = self.folder / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.folder / "state.pt")

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save()
        self.vae.load_state_dict(state["vae"])
        self.text.load_state_dict(state["text"])
        self.unet.load_state_dict(state["unet"])
        if "probe" in state:
            self.probe.load_state_dict(state["probe"])
        self.stage, self.step = state["stage"], state["step"]
        self.opt = self._optimizer_for(self.stage)
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed: stage {self.stage}, step {self.step}")

    def _record(self, loss: float) -> None:
        path = self.folder / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "stage", "step", "loss"])
            w.writerow([f"{time.time():.0f}", self.stage, self.step, f"{loss:.5f}"])

    # ---- stages ---------------------------------------------------------------------------------
    def _vae_step(self) -> torch.Tensor:
        """Random ``vae_size`` crops of full-size pictures: the VAE sees what it will encode, cheaply."""
        full, _ = _batch(self.rng, self.cfg)
        c = self.cfg.vae_size
        offsets = self.rng.integers(0, self.cfg.size - c + 1, size=(full.shape[0], 2)) // 8 * 8
        images = torch.stack([im[:, y:y + c, x:x + c] for im, (y, x) in zip(full, offsets)])
        dist = self.vae.encode(images).latent_dist
        recon = self.vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / images[0].numel()
        return F.l1_loss(recon, images) + F.mse_loss(recon, images) + 1e-6 * kl

    def encode(self, images: torch.Tensor):
        """The VAE encoder's latent distribution (unscaled, no grad), under bfloat16 autocast if
        ``encode_dtype`` asks: then its mean, std and samples are bfloat16."""
        fast = self.cfg.encode_dtype == "bfloat16"
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=fast):
            return self.vae.encode(images).latent_dist

    def _encoded_batch(self) -> tuple[torch.Tensor, list[str]]:
        """Latents (× SCALING) and captions: freshly rendered and encoded, or drawn from the pool."""
        if len(self.pool) < self.cfg.batch or self.rng.random() < self.cfg.fresh:
            images, captions = _batch(self.rng, self.cfg)
            dist = self.encode(images)
            entries = list(zip(dist.mean.float(), dist.std.float(), captions))
            for entry in entries:
                if len(self.pool) < self.cfg.pool:
                    self.pool.append(entry)
                else:
                    self.pool[int(self.rng.integers(len(self.pool)))] = entry
        else:
            entries = [self.pool[i] for i in self.rng.choice(len(self.pool), self.cfg.batch, replace=False)]
        mean = torch.stack([e[0] for e in entries])
        std = torch.stack([e[1] for e in entries])
        return (mean + std * torch.randn_like(mean)) * SCALING, [e[2] for e in entries]

    def _text_step(self) -> torch.Tensor:
        """Read the scene back from the mean of the encoder's output (size, place and count: rich captions)."""
        scenes = [shapes.random_scene(self.rng, max_things=3, stripes=0.15) for _ in range(self.cfg.batch * 4)]
        rich = self.rng.random(len(scenes)) < 0.5
        captions = [shapes.caption(s, rich=bool(r)) for s, r in zip(scenes, rich)]
        pooled = self.text(self._tokens(captions)).last_hidden_state.mean(dim=1)
        labels = {name: torch.tensor([_label(s, name) for s in scenes]) for name in _PROBE}
        loss = pooled.new_zeros(())
        for name, head in self.probe.items():
            logits = head(pooled)
            if name in _RICH_ONLY:
                keep = torch.from_numpy(rich)
                loss = loss + F.cross_entropy(logits[keep], labels[name][keep]) if keep.any() else loss
            else:
                loss = loss + F.cross_entropy(logits, labels[name])
        return loss

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids

    @property
    def prediction(self) -> str:
        """What the finished UNet predicts (the "v" stage, when there is one, makes it v)."""
        return "v_prediction" if self.cfg.v_steps > 0 else "epsilon"

    def _diffusion_step(self, alphas: torch.Tensor, prediction: str = "epsilon") -> torch.Tensor:
        latents, captions = self._encoded_batch()
        captions = ["" if self.rng.random() < 0.1 else c for c in captions]
        with torch.no_grad():
            context = self.text(self._tokens(captions)).last_hidden_state
        return noise_loss(self.unet, latents, context, alphas, prediction=prediction)

    def train(self) -> None:
        cfg = self.cfg
        alphas = _alphas_cumprod()
        if self.stage == "vae":
            self.vae.train()
            self._loop("VAE", cfg.vae_steps, cfg.lr_vae, self._vae_step, warmup=100)
            self.vae.eval()
            k = _fold_latent_scale(self.vae, _batch(np.random.default_rng(cfg.seed + 1), cfg)[0])
            self.log(f"VAE done: reconstruction error {reconstruction_error(self.vae, cfg):.1f}/255 on "
                     f"{cfg.size}² pictures; latent scale folded in (× {k:.3f})")
            self.stage, self.step, self.opt = "text", 0, self._text_optimizer()
            self.save()
        if self.stage == "text":
            self.text.train()
            self._loop("text encoder", cfg.text_steps, cfg.lr_text, self._text_step, warmup=50)
            self.log(f"text encoder done: {text_separation(self):.2f} (how far apart prompts are, relative)")
            self.stage, self.step, self.opt = "diffusion", 0, self._diffusion_optimizer()
            self.save()
        if self.stage == "done" and 0 < self.step < cfg.v_steps:  # more v steps asked of a finished run
            self.stage = "v"
        if self.stage in ("diffusion", "v"):
            self.vae.eval().requires_grad_(False)
            self.text.eval().requires_grad_(False)
            self.unet.train()
        if self.stage == "diffusion":
            self._loop("UNet", cfg.unet_steps, cfg.lr_unet, lambda: self._diffusion_step(alphas),
                       clip=list(self.unet.parameters()))
            self.stage, self.step, self.opt = "v", 0, self._diffusion_optimizer()
            self.save()
        if self.stage == "v":
            self._loop("UNet, v-prediction", cfg.v_steps, cfg.lr_v, lambda: self._diffusion_step(alphas, "v_prediction"),
                       warmup=100, clip=list(self.unet.parameters()), cycle=cfg.v_cycle)
            self.stage = "done"
            self.save()

    def _loop(self, desc: str, total: int, lr: float, step_loss, warmup: int = 200, clip: list | None = None,
              cycle: int | None = None) -> None:
        """Optimiser steps from ``self.step`` to ``total``: warm-up/cosine rate (restarted every ``cycle``
        steps when given), optional gradient clipping, a progress bar, the loss logged every step and the
        state saved every ``save_every``."""
        bar = tqdm(total=total, initial=self.step, desc=desc, unit="step")
        while self.step < total:
            for group in self.opt.param_groups:
                group["lr"] = lr * (warmup_cosine(self.step % cycle, cycle, warmup) if cycle else
                                    warmup_cosine(self.step, total, warmup))
            loss = step_loss()
            self.opt.zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(clip, 1.0)
            self.opt.step()
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            self._record(loss.item())
            if self.step % self.cfg.save_every == 0:
                self.save()
        bar.close()

    def export(self, path: Path) -> Path:
        """The trained model as an A1111-style single-file checkpoint (fp16 safetensors)."""
        sd = ldm_state_dict(self.unet, self.vae, [(self.text, "cond_stage_model.transformer.", "clip_hf")])
        if self.prediction == "v_prediction":
            sd["v_pred"] = torch.zeros(())  # the key other tools write for a v-prediction model; our loader reads it
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, str(path),
                  metadata={"sdstudio.demo": "trained by python -m training.demo_model",
                            "sdstudio.demo.config": str(asdict(self.cfg)),
                            # the ModelSpec key SAI's files carry: the UI's default size for this model
                            "modelspec.resolution": f"{self.cfg.size}x{self.cfg.size}"})
        return path
