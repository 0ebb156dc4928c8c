"""Training a Canny-edge ControlNet for the demo model, resumable, then exporting it in the original layout.

The ControlNet is diffusers' copy of the demo UNet's encoder and middle block (``ControlNetModel.from_unet``:
the zero convolutions start at zero, so at step 0 it changes nothing). The demo model's UNet, VAE and text
encoder stay frozen; only the ControlNet learns, with the same target as the UNet was trained on (v or
noise, as the checkpoint says) on the same noise schedule (:func:`training.demo_model.train._alphas_cumprod`).

Data: random scenes of the shapes world (1–3 objects, some striped backgrounds), rendered at ``size``; the
control image is ``cv2.Canny`` of the rendered RGB picture with thresholds 100/200, as the extension's
``canny`` preprocessor calls it (on the RGB picture itself: OpenCV then takes the strongest gradient over the
channels; a grayscale picture would lose the edge between red and green, whose grey levels are 25 apart).
The ControlNet sees it as the extension feeds hint images: 3 channels, float in [0, 1]. Half of the captions
are empty, so that the edge map alone has to place the shapes (as lllyasviel's training dropped prompts).

The hint encoder is not built as diffusers builds it (see ``Config.hint_init``): with that init the edge
map had no effect at all after 1100 steps; with each of its layers scaled to unit variance on real edge maps
it helped from the first 50 steps.

Every ``save_every`` steps the whole state (ControlNet, optimiser, step, random generators) goes to
``RUN/state.pt``; a rerun with the same run folder continues from there. ``RUN/log.csv`` records the losses.

:func:`shape_iou`, :func:`scene_mask` and :func:`object_mask` measure how well a generated picture follows
the edge map, for any generator (the quality harness through the engine)::

    picture = np.asarray(shapes.render(scene, 128))           # the scene, as a control picture
    edges = canny_map(picture)                                 # or the engine's canny preprocessor on it
    image = ...generate with the ControlNet and edges...       # H×W×3 uint8
    iou = shape_iou(scene_mask(scene, 128), object_mask(image))

:meth:`Run.sanity_check` runs that measurement with its own DDIM sampler, with and without the ControlNet.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel
from safetensors.torch import save_file
from tqdm import tqdm

from sdstudio.eval import shapes
from sdstudio.models.loader import LoadedModel, load_checkpoint
from training.demo_model.train import SCALING, _alphas_cumprod, render_batch, warmup_cosine

CANNY_LOW, CANNY_HIGH = 100, 200  # the extension's canny preprocessor defaults (thr_a, thr_b)


@dataclass
class Config:
    base: str = "models/Stable-diffusion/sdstudio-demo.safetensors"
    size: int = 128  # the demo model's pictures
    batch: int = 8
    # the shipped model: 2000 steps of 8 pictures, 26 min on one shared CPU thread. Going on to 4000
    # (``--steps 4000``: the cosine then runs over 4000 from step 2000) took the sanity check's IoU at
    # weight 1 only from 0.573 to 0.585 (empty prompt) and 0.627 to 0.625 (caption)
    steps: int = 2000
    lr: float = 2e-4  # the encoder copied from the UNet
    lr_new: float = 1e-3  # the parts that start from nothing: hint encoder, zero convolutions
    # "cubic": timesteps t = (1 − u³)·1000 for uniform u, mostly high noise, where the picture's layout is
    # decided, the part an edge map has to steer (T2I-Adapter trains so); "uniform": as the UNet was trained
    timesteps: str = "cubic"
    # The hint encoder (8 convolutions, SiLU between) as diffusers builds it: PyTorch's default init and a
    # zero last convolution. Then an edge map (1.4 % of its pixels set) changes the encoder's output by
    # ~4e-6 (random last layer) or nothing (zero): with the zero convolutions also at zero, the edge map had
    # no effect after 1100 steps of 16. "unit": each convolution rescaled, in order, so that its output on
    # real edge maps has unit standard deviation, the last one ``hint_std``. The zero convolutions alone
    # keep the ControlNet a no-op at step 0. "zero": as diffusers builds it.
    hint_init: str = "unit"
    hint_std: float = 0.5  # the UNet's conv_in output on latents is ~0.5 in mean absolute value
    warmup: int = 100
    empty_prompt: float = 0.5  # share of empty captions: the edge map alone must then place the shapes
    max_things: int = 3
    stripes: float = 0.15
    seed: int = 0
    save_every: int = 100
    # As for the demo model: encoding a picture costs more than the training step, so encoded pictures (with
    # their edge maps and captions) go to a pool and a step draws fresh ones with probability ``fresh``.
    pool: int = 4096
    fresh: float = 0.15
    encode_dtype: str = "bfloat16"  # the VAE's encoding under bfloat16 autocast, as in training/demo_model

    @classmethod
    def tiny(cls, base: str, **kw) -> Config:
        """For tests: a tiny base checkpoint, small pictures and batches."""
        return cls(**{"base": base, "size": 64, "batch": 2, "steps": 2, "warmup": 1, "save_every": 1, **kw})


def canny_map(picture: np.ndarray) -> np.ndarray:
    """The H×W uint8 edge map (0 or 255) of an H×W×3 uint8 RGB picture, as the extension's preprocessor
    computes it."""
    if picture.dtype != np.uint8 or picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"canny_map needs an H×W×3 uint8 picture, got {picture.dtype} {picture.shape}")
    return cv2.Canny(np.ascontiguousarray(picture), CANNY_LOW, CANNY_HIGH)


def hint_tensor(edges: np.ndarray | torch.Tensor) -> torch.Tensor:
    """N×H×W edge maps (uint8 0/255 or bool) as the N×3×H×W float [0, 1] batch a ControlNet is given."""
    e = torch.as_tensor(np.asarray(edges))
    e = e.float() / 255 if e.dtype == torch.uint8 else e.float()
    return e.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()


def render_scenes(scenes: list[shapes.Scene], size: int) -> tuple[torch.Tensor, np.ndarray]:
    """The scenes as an N×3×size×size batch in [-1, 1] (what the VAE encodes) and their N×size×size edge
    maps (uint8)."""
    images = render_batch(scenes, size)
    pixels = ((images.permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return images, np.stack([canny_map(p) for p in pixels])


# ---- measuring ----------------------------------------------------------------------------------

def shape_iou(expected: np.ndarray, found: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty: they agree)."""
    a, b = np.asarray(expected, dtype=bool), np.asarray(found, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shape_iou: masks differ in shape, {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def scene_mask(scene: shapes.Scene, size: int) -> np.ndarray:
    """Where the scene's objects are (size×size bool): the scene drawn white on black, no stripes."""
    flat = replace(scene, background="black", stripes=False,
                   things=tuple(replace(t, colour="white") for t in scene.things))
    return np.asarray(shapes.render(flat, size).convert("L")) > 127


def object_mask(picture: np.ndarray, threshold: float = 40.0) -> np.ndarray:
    """The pixels of an H×W×3 picture that are not background: farther than ``threshold`` (RGB, of 255)
    from the background colour, taken as the per-channel median of the whole picture. Objects of the shapes
    world cover under a quarter of it, so the median is the background's; a frame of border pixels is not
    (the demo model often shades its pictures' edges). 40 is a bit over half the distance between the
    world's closest colours (yellow and orange, 71 apart)."""
    p = np.asarray(picture, dtype=np.float32)
    if p.ndim != 3 or p.shape[2] != 3:
        raise ValueError(f"object_mask needs an H×W×3 picture, got shape {p.shape}")
    background = np.median(p.reshape(-1, 3), axis=0)
    return np.linalg.norm(p - background, axis=2) > threshold


@torch.no_grad()
def unit_variance_init(embedding: torch.nn.Module, hints: torch.Tensor, out_std: float) -> None:
    """Re-initialise a diffusers ``ControlNetConditioningEmbedding`` (conv_in, blocks, conv_out with SiLU
    between, as its forward runs them) layer by layer from ``hints``: Kaiming-normal weights and zero
    biases, each convolution then scaled so that its output on ``hints`` has standard deviation 1
    (``out_std`` for the last), so that the edge map's signal reaches the ControlNet undiminished."""
    x = hints
    convs = [embedding.conv_in, *embedding.blocks, embedding.conv_out]
    for i, conv in enumerate(convs):
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.zeros_(conv.bias)
        y = conv(x)
        conv.weight.mul_((out_std if i == len(convs) - 1 else 1.0) / y.std().clamp_min(1e-12))
        x = F.silu(conv(x))


# ---- training -----------------------------------------------------------------------------------

class Run:
    """A training run in ``folder``: the base model (frozen), the ControlNet and its optimiser."""

    def __init__(self, folder: Path, cfg: Config, log=print, base: LoadedModel | None = None):
        self.folder, self.cfg, self.log = Path(folder), cfg, log
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base = base or load_checkpoint(cfg.base)
        for module in [self.base.unet, self.base.vae, *self.base.text_encoders]:
            module.eval().requires_grad_(False)
        torch.manual_seed(cfg.seed)
        self.controlnet = ControlNetModel.from_unet(self.base.unet)
        if cfg.hint_init == "unit":
            scenes = [shapes.random_scene(np.random.default_rng(cfg.seed + 1), max_things=cfg.max_things)
                      for _ in range(16)]
            unit_variance_init(self.controlnet.controlnet_cond_embedding,
                               hint_tensor(render_scenes(scenes, cfg.size)[1]), cfg.hint_std)
        elif cfg.hint_init != "zero":
            raise ValueError(f"hint_init must be 'unit' or 'zero', not {cfg.hint_init!r}")
        self.controlnet.train()
        self.alphas = _alphas_cumprod()
        self.step = 0
        self.rng = np.random.default_rng(cfg.seed)
        self.opt = self._optimizer()
        self.pool: list[tuple[torch.Tensor, torch.Tensor, np.ndarray, str]] = []  # a cache, not saved
        self._contexts: dict[str, torch.Tensor] = {}
        state = self.folder / "state.pt"
        if state.is_file():
            self._load(state)

    @property
    def prediction(self) -> str:
        return self.base.spec.prediction

    _NEW = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")

    def _optimizer(self) -> torch.optim.Optimizer:
        named = list(self.controlnet.named_parameters())
        new = [p for n, p in named if n.startswith(self._NEW)]
        copied = [p for n, p in named if not n.startswith(self._NEW)]
        return torch.optim.AdamW([{"params": copied, "base_lr": self.cfg.lr},
                                  {"params": new, "base_lr": self.cfg.lr_new}], lr=self.cfg.lr, weight_decay=1e-2)

    def timesteps(self, n: int) -> torch.Tensor:
        """Training timesteps, as ``timesteps`` says."""
        if self.cfg.timesteps == "uniform":
            return torch.randint(0, 1000, (n,))
        if self.cfg.timesteps == "cubic":
            return ((1 - torch.rand(n) ** 3) * 1000).long().clamp(0, 999)
        raise ValueError(f"timesteps must be 'uniform' or 'cubic', not {self.cfg.timesteps!r}")

    # ---- persistence ----------------------------------------------------------------------------
    def save(self) -> None:
        state = {"step": self.step, "config": asdict(self.cfg), "controlnet": self.controlnet.state_dict(),
                 "opt": self.opt.state_dict(), "rng": self.rng.bit_generator.state,
                 "torch_rng": torch.get_rng_state()}
        tmp = self.folder / "state.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.folder / "state.pt")

    def _load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=False)  # our own file, written by save()
        self.controlnet.load_state_dict(state["controlnet"])
        self.step = state["step"]
        self.opt.load_state_dict(state["opt"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed at step {self.step}")

    def _record(self, loss: float) -> None:
        path = self.folder / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "step", "loss"])
            w.writerow([f"{time.time():.0f}", self.step, f"{loss:.5f}"])

    # ---- data -----------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor):
        """The VAE encoder's latent distribution (unscaled, no grad), bfloat16 autocast if asked."""
        fast = self.cfg.encode_dtype == "bfloat16"
        with torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=fast):
            return self.base.vae.encode(images).latent_dist

    def context(self, captions: list[str]) -> torch.Tensor:
        """The frozen text encoder's output for each caption (cached: there are few distinct ones)."""
        missing = [c for c in dict.fromkeys(captions) if c not in self._contexts]
        if missing:
            ids = self.base.tokenizers[0](missing, padding="max_length", max_length=77, truncation=True,
                                          return_tensors="pt").input_ids
            with torch.no_grad():
                out = self.base.text_encoders[0](ids).last_hidden_state
            if len(self._contexts) > 20000:
                self._contexts.clear()
            self._contexts.update(zip(missing, out))
        return torch.stack([self._contexts[c] for c in captions])

    def _fresh_entries(self) -> list[tuple[torch.Tensor, torch.Tensor, np.ndarray, str]]:
        scenes = [shapes.random_scene(self.rng, max_things=self.cfg.max_things, stripes=self.cfg.stripes)
                  for _ in range(self.cfg.batch)]
        captions = [shapes.caption(s, rich=bool(self.rng.random() < 0.5)) for s in scenes]
        images, edges = render_scenes(scenes, self.cfg.size)
        dist = self.encode(images)
        return list(zip(dist.mean.float(), dist.std.float(), edges > 0, captions))

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Latents (× SCALING), hint images and captions (some emptied), fresh or from the pool."""
        draw = self.rng.random()  # drawn even when the pool is short: a resumed run (empty pool) stays in step
        if len(self.pool) < self.cfg.batch or draw < self.cfg.fresh:
            entries = self._fresh_entries()
            for entry in entries:
                if len(self.pool) < self.cfg.pool:
                    self.pool.append(entry)
                else:
                    self.pool[int(self.rng.integers(len(self.pool)))] = entry
        else:
            entries = [self.pool[i] for i in self.rng.choice(len(self.pool), self.cfg.batch, replace=False)]
        mean = torch.stack([e[0] for e in entries])
        std = torch.stack([e[1] for e in entries])
        latents = (mean + std * torch.randn_like(mean)) * SCALING
        hints = hint_tensor(np.stack([e[2] for e in entries]))
        captions = ["" if self.rng.random() < self.cfg.empty_prompt else e[3] for e in entries]
        return latents, hints, captions

    # ---- the model ------------------------------------------------------------------------------
    def predict(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, hints: torch.Tensor | None,
                weight: float = 1.0) -> torch.Tensor:
        """The demo UNet's output with the ControlNet's residuals (each scaled by ``weight``) added;
        ``hints`` None: the UNet alone."""
        if hints is None:
            return self.base.unet(x, t, context).sample
        down, mid = self.controlnet(x, t, context, controlnet_cond=hints, return_dict=False)
        return self.base.unet(x, t, context, down_block_additional_residuals=[d * weight for d in down],
                              mid_block_additional_residual=mid * weight).sample

    def loss(self, latents: torch.Tensor, hints: torch.Tensor, context: torch.Tensor,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss of the controlled UNet at timesteps ``t`` (random if None)."""
        t = self.timesteps(latents.shape[0]) if t is None else t
        noise = torch.randn_like(latents) if noise is None else noise
        a = self.alphas[t].view(-1, 1, 1, 1)
        x = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * latents if self.prediction == "v_prediction" else noise
        return F.mse_loss(self.predict(x, t, context, hints), target)

    def train_step(self, rate: float) -> float:
        """One optimiser step; ``rate`` scales each parameter group's base rate (warm-up, decay)."""
        latents, hints, captions = self.batch()
        for group in self.opt.param_groups:
            group["lr"] = rate * group["base_lr"]
        loss = self.loss(latents, hints, self.context(captions))
        self.opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.controlnet.parameters(), 1.0)
        self.opt.step()
        return loss.item()

    def train(self, steps: int | None = None) -> None:
        """Optimiser steps from ``self.step`` to ``steps`` (default: the config's), warm-up and cosine
        rate, the loss logged every step and the state saved every ``save_every`` steps and at the end."""
        total = steps or self.cfg.steps
        self.controlnet.train()
        bar = tqdm(total=total, initial=self.step, desc="ControlNet", unit="step", mininterval=5)
        while self.step < total:
            loss = self.train_step(warmup_cosine(self.step, total, self.cfg.warmup))
            self.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._record(loss)
            if self.step % self.cfg.save_every == 0:
                self.save()
        bar.close()
        self.save()

    # ---- sampling and checking ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, edges: np.ndarray | None, captions: list[str], weight: float = 1.0, steps: int = 25,
                 seed: int = 0, size: int | None = None) -> np.ndarray:
        """Pictures (N×H×W×3 uint8) drawn by DDIM from noise, deterministic, with no CFG; ``edges``
        (N×H×W) steer it through the ControlNet at ``weight``; None: the demo model alone."""
        self.controlnet.eval()
        size = size or self.cfg.size
        n = len(captions)
        context = self.context(captions)
        hints = None if edges is None else hint_tensor(edges > 0)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((n, 4, size // 8, size // 8), generator=g)
        ts = np.linspace(999, 0, steps).round().astype(int)
        for i, t in enumerate(ts):
            a = self.alphas[t]
            a_prev = self.alphas[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
            out = self.predict(x, torch.full((n,), int(t)), context, hints, weight)
            if self.prediction == "v_prediction":
                x0, eps = a.sqrt() * x - (1 - a).sqrt() * out, (1 - a).sqrt() * x + a.sqrt() * out
            else:
                x0, eps = (x - (1 - a).sqrt() * out) / a.sqrt(), out
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        pictures = self.base.vae.decode(x / SCALING).sample.clamp(-1, 1)
        self.controlnet.train()
        return ((pictures.permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy()

    def sanity_check(self, n: int = 16, seed: int = 777, weights: tuple[float, ...] = (0.0, 0.5, 1.0),
                     steps: int = 25, prompt: bool = False) -> dict[str, float]:
        """Mean shape IoU between known scenes' object masks and the objects of pictures generated from
        the scenes' edge maps (empty prompts unless ``prompt``): the demo model alone ("none") and with
        the ControlNet at each weight (weight 0 must match "none")."""
        rng = np.random.default_rng(seed)
        scenes = [shapes.random_scene(rng, max_things=self.cfg.max_things) for _ in range(n)]
        _, edges = render_scenes(scenes, self.cfg.size)
        expected = [scene_mask(s, self.cfg.size) for s in scenes]
        captions = [shapes.caption(s) if prompt else "" for s in scenes]
        result = {}
        for name, weight in [("none", None), *((f"weight {w:g}", w) for w in weights)]:
            pictures = self.generate(None if weight is None else edges, captions, weight or 0.0, steps, seed)
            result[name] = float(np.mean([shape_iou(e, object_mask(p)) for e, p in zip(expected, pictures)]))
        return result

    # ---- export ---------------------------------------------------------------------------------
    def export(self, path: Path) -> Path:
        """The ControlNet as a single file in lllyasviel's layout (fp16 safetensors, no key prefix)."""
        from sdstudio.models.controlnet import controlnet_hf_to_ldm

        sd = controlnet_hf_to_ldm(self.controlnet.state_dict())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.cfg)
        save_file({k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}, str(path),
                  metadata={"sdstudio.demo": "trained by python -m training.demo_controlnet",
                            "sdstudio.demo.base": Path(self.cfg.base).name,
                            "sdstudio.demo.control": f"canny {CANNY_LOW}/{CANNY_HIGH}",
                            "sdstudio.demo.steps": str(self.step),
                            "sdstudio.demo.config": str(cfg)})
        return path

    @torch.no_grad()
    def check_export(self, path: Path, seed: int = 0) -> float:
        """Largest difference between the residuals of the exported file (loaded back by our engine's
        loader) and of this ControlNet with its weights rounded to fp16, on a fresh batch."""
        from sdstudio.models.controlnet import load_control_model

        module = load_control_model(path).module.float().eval()
        rounded = ControlNetModel.from_config(self.controlnet.config)
        rounded.load_state_dict({k: v.half().float() for k, v in self.controlnet.state_dict().items()})
        rounded.eval()
        g = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng(seed)
        scenes = [shapes.random_scene(rng, max_things=self.cfg.max_things) for _ in range(2)]
        _, edges = render_scenes(scenes, self.cfg.size)
        hints = hint_tensor(edges)
        x = torch.randn((2, 4, self.cfg.size // 8, self.cfg.size // 8), generator=g)
        t = torch.tensor([100, 700])
        context = self.context(["", shapes.caption(scenes[1])])
        a_down, a_mid = rounded(x, t, context, controlnet_cond=hints, return_dict=False)
        b_down, b_mid = module(x, t, context, controlnet_cond=hints, return_dict=False)
        return max(float((a - b).abs().max()) for a, b in zip([*a_down, a_mid], [*b_down, b_mid]))
