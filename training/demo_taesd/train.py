"""Distilling the demo model's VAE decoder into a TAESD-class decoder, for fast live previews.

The student is madebyollin's TAESD decoder architecture (a clamp, a latent convolution, plain 3×3 residual
blocks, nearest 2× upsampling; diffusers' ``DecoderTiny``), narrower than the published one (the demo VAE is
itself small: 96 channels, one resnet per level, so a 64-wide student would save little). The teacher is
the demo model's own VAE: the student learns to give what the VAE decoder gives, not the original picture.

Data, built once and kept in ``RUN/pool.pt`` (resumable, like everything here):

1. The demo model's training scenes (:mod:`sdstudio.eval.shapes`), encoded by its VAE: the latent mean, and
   a sample of the latent distribution for every other picture.
2. Latents the live preview really sees: the denoised estimates at several steps of demo-model generations
   from scene captions (early ones blurry, off the VAE's own latents).

Each latent's target is the VAE decoder's picture. Training takes random latent crops (``crop``) and scores
the student's pixels inside a margin where the crop cuts the picture (there the crop lacks the context the VAE
had; at the picture's own edges both see the same padding, and those pixels are scored). Every ``save_every``
steps the state (weights, optimiser, step, random generators) goes to ``RUN/state.pt``; ``RUN/log.csv`` has
the losses and the held-out PSNR against the VAE decode (and that of the "Approx cheap" preview).

Time-bounded: ``minutes`` of this process's CPU time (one thread: ``OMP_NUM_THREADS=1``) stop the run (pool or
training) at a step boundary with everything saved; a rerun continues. The CPU time of all invocations adds up
in the state (``cpu_seconds``, also in the export's metadata). The export is madebyollin's layout (numeric keys) in float16, with the VAE's fingerprint in the
metadata so the engine uses it for the demo model's latents only.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DecoderTiny
from safetensors.torch import save_file

from sdstudio.eval import shapes
from sdstudio.models.taesd import FINGERPRINT_KEY, vae_fingerprint

SCALING = 0.18215  # the demo VAE's (SD 1.x's) latent scale


@dataclass
class Config:
    width: int = 32
    blocks: tuple[int, ...] = (3, 3, 3, 1)  # TAESD's blocks per level (the last one before the RGB convolution)
    size: int = 128  # the demo model's pictures
    scenes: int = 384  # dataset pictures encoded into the pool
    generations: int = 24  # demo-model generations whose denoised estimates join the pool
    gen_steps: int = 12
    estimates: tuple[int, ...] = (2, 4, 6, 8, 10, 12)  # which steps' estimates
    holdout: int = 24  # pool entries kept out of training (the PSNR in the log)
    steps: int = 1200
    batch: int = 16
    crop: int = 10  # latent pixels (80 picture pixels)
    margin: int = 1  # latent pixels not scored where a crop cuts the picture (the picture's edges are)
    lr: float = 2e-3
    warmup: int = 50
    seed: int = 0
    save_every: int = 100
    eval_every: int = 250
    minutes: float = 25.0  # CPU minutes for the whole invocation (pool and training); 0: no limit

    @classmethod
    def tiny(cls, **kw) -> Config:
        """For tests: the same pipeline in seconds."""
        return cls(**{"width": 8, "blocks": (1, 1, 1, 1), "scenes": 4, "generations": 1, "gen_steps": 2,
                      "estimates": (2,), "holdout": 2, "steps": 3, "batch": 2, "save_every": 2, "eval_every": 2,
                      **kw})


def build(cfg: Config) -> DecoderTiny:
    torch.manual_seed(cfg.seed)
    return DecoderTiny(in_channels=4, out_channels=3, num_blocks=tuple(cfg.blocks),
                       block_out_channels=(cfg.width,) * len(cfg.blocks), upsampling_scaling_factor=2,
                       act_fn="relu", upsample_fn="nearest")


def taesd_state_dict(decoder: DecoderTiny) -> dict[str, torch.Tensor]:
    """diffusers' ``layers.N.`` -> madebyollin's ``N+1.`` (his Sequential starts with the clamp)."""
    out = {}
    for key, value in decoder.state_dict().items():
        index, rest = key[len("layers."):].split(".", 1)
        out[f"{int(index) + 1}.{rest}"] = value
    return out


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of pictures in [-1, 1] (peak-to-peak 2)."""
    mse = float(F.mse_loss(a.clamp(-1, 1), b.clamp(-1, 1)))
    return 10 * math.log10(4 / max(mse, 1e-10))


def cheap(latents: torch.Tensor, size: int) -> torch.Tensor:
    """The "Approx cheap" preview of latents, upscaled to the picture's size (for the comparison)."""
    from sdstudio.engine.preview import _SD1

    rgb = torch.einsum("bchw,cr->brhw", latents.float(), torch.tensor(_SD1))
    return F.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)


class Run:
    def __init__(self, folder: Path, cfg: Config, model: str | Path, log=print):
        from sdstudio.core.paths import Paths
        from sdstudio.engine.generate import Engine

        self.folder, self.cfg, self.log = Path(folder), cfg, log
        self.folder.mkdir(parents=True, exist_ok=True)
        model = Path(model).resolve()
        self.engine = Engine(Paths(self.folder, ckpt_dirs=[model.parent]))  # generates in memory: writes nothing
        self.model_name = model.stem
        self.vae = self.engine.load(self.model_name)[1].vae.eval().requires_grad_(False)
        self.student = build(cfg)
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr, weight_decay=1e-4)
        self.step = 0
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.latents = torch.zeros(0, 4, cfg.size // 8, cfg.size // 8)
        self.targets = torch.zeros(0, 3, cfg.size, cfg.size, dtype=torch.uint8)  # the VAE's pictures
        self.scenes_done = self.generations_done = 0
        self.deadline = time.process_time() + cfg.minutes * 60 if cfg.minutes else math.inf
        self.cpu_before = 0.0  # CPU seconds of earlier invocations (pool and training)
        if (self.folder / "pool.pt").is_file():
            pool = torch.load(self.folder / "pool.pt", map_location="cpu", weights_only=True)  # our own file
            self.latents, self.targets = pool["latents"], pool["targets"]
            self.scenes_done, self.generations_done = int(pool["scenes_done"]), int(pool["generations_done"])
            self.cpu_before = float(pool.get("cpu_seconds", 0.0))
        if (self.folder / "state.pt").is_file():
            state = torch.load(self.folder / "state.pt", map_location="cpu", weights_only=True)
            self.student.load_state_dict(state["student"])
            self.opt.load_state_dict(state["opt"])
            self.step = int(state["step"])
            self.gen.set_state(state["gen"])
            self.cpu_before = float(state.get("cpu_seconds", self.cpu_before))
            self.log(f"resumed at step {self.step}")

    def out_of_time(self) -> bool:
        return time.process_time() > self.deadline

    @property
    def cpu_seconds(self) -> float:
        """CPU time of the whole run so far, this invocation included."""
        return self.cpu_before + time.process_time()

    # ---- the pool --------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        pictures = torch.cat([self.vae.decode(z[None] / SCALING).sample for z in latents])
        return ((pictures.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    def _add(self, latents: torch.Tensor) -> None:
        self.latents = torch.cat([self.latents, latents.float()])
        self.targets = torch.cat([self.targets, self._decode(latents)])

    def _save_pool(self) -> None:
        tmp = self.folder / "pool.pt.tmp"
        torch.save({"latents": self.latents, "targets": self.targets, "scenes_done": self.scenes_done,
                    "generations_done": self.generations_done, "cpu_seconds": self.cpu_seconds}, tmp)
        tmp.replace(self.folder / "pool.pt")

    @torch.no_grad()
    def build_pool(self, chunk: int = 16) -> bool:
        """Adds to the pool until it is complete (True) or the time is up (False)."""
        from training.demo_model.train import render_batch

        cfg = self.cfg
        while self.scenes_done < cfg.scenes:
            if self.out_of_time():
                return False
            n = min(chunk, cfg.scenes - self.scenes_done)
            rng = np.random.default_rng([cfg.seed, 1, self.scenes_done])  # the same chunk after a resume
            pictures = render_batch([shapes.random_scene(rng, max_things=3, stripes=0.15) for _ in range(n)], cfg.size)
            dist = self.vae.encode(pictures).latent_dist
            torch.manual_seed(cfg.seed + self.scenes_done)
            latents = torch.where(torch.arange(n)[:, None, None, None] % 2 == 1, dist.sample(), dist.mean)
            self._add(latents * SCALING)
            self.scenes_done += n
            self._save_pool()
            self.log(f"pool: {self.scenes_done}/{cfg.scenes} scenes ({self.cpu_seconds / 60:.1f} CPU min)")
        while self.generations_done < cfg.generations:
            if self.out_of_time():
                return False
            self._add(self._estimates(self.generations_done))
            self.generations_done += 1
            self._save_pool()
            self.log(f"pool: {self.generations_done}/{cfg.generations} generations "
                     f"({self.cpu_seconds / 60:.1f} CPU min)")
        return True

    def _estimates(self, number: int) -> torch.Tensor:
        """The denoised estimates a live preview shows, at ``cfg.estimates`` steps of one generation."""
        from sdstudio.core.params import Txt2ImgRequest

        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, 2, number])
        prompt = shapes.caption(shapes.random_scene(rng, max_things=3, stripes=0.15), rich=bool(number % 2))
        sampler = ("Euler a", "DPM++ 2M", "Euler", "DDIM")[number % 4]
        req = Txt2ImgRequest(prompt=prompt, steps=cfg.gen_steps, width=cfg.size, height=cfg.size, seed=1000 + number,
                             sampler_name=sampler, cfg_scale=7.0, model=self.model_name)
        seen = []

        def keep(p) -> None:
            if p.step in cfg.estimates and p.latent is not None:
                seen.append(p.latent[:1].detach().float().cpu())

        self.engine.txt2img(req, on_progress=keep)
        return torch.cat(seen)

    # ---- training --------------------------------------------------------------------------------
    def _split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out entries: spread over the pool (scenes and estimates alike), fixed by the pool's size."""
        n = len(self.latents)
        held = torch.linspace(0, n - 1, min(self.cfg.holdout, n // 2)).round().long().unique()
        train = torch.ones(n, dtype=torch.bool)
        train[held] = False
        return train.nonzero()[:, 0], held

    def _crops(self, train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latent crops, their target pixels and the mask of the pixels scored."""
        cfg, g = self.cfg, self.gen
        side = cfg.size // 8
        picks = train[torch.randint(len(train), (cfg.batch,), generator=g)]
        ys = torch.randint(0, side - cfg.crop + 1, (cfg.batch,), generator=g)
        xs = torch.randint(0, side - cfg.crop + 1, (cfg.batch,), generator=g)
        lat = torch.stack([self.latents[i, :, y:y + cfg.crop, x:x + cfg.crop] for i, y, x in zip(picks, ys, xs)])
        pix = torch.stack([self.targets[i, :, 8 * y:8 * (y + cfg.crop), 8 * x:8 * (x + cfg.crop)]
                           for i, y, x in zip(picks, ys, xs)])
        out, m = 8 * cfg.crop, 8 * cfg.margin
        mask = torch.zeros(cfg.batch, 1, out, out)
        for k, (y, x) in enumerate(zip(ys.tolist(), xs.tolist())):
            top, left = (0 if y == 0 else m), (0 if x == 0 else m)
            bottom, right = (out if y + cfg.crop == side else out - m), (out if x + cfg.crop == side else out - m)
            mask[k, :, top:bottom, left:right] = 1
        return lat, pix.float() / 127.5 - 1, mask

    def evaluate(self, held: torch.Tensor) -> tuple[float, float]:
        """Held-out PSNR (dB) against the VAE decode: the student's, and Approx cheap's (upscaled)."""
        self.student.eval()
        with torch.no_grad():
            z = self.latents[held]
            target = self.targets[held].float() / 127.5 - 1
            ours = psnr(self.student(z), target)
            base = psnr(cheap(z, self.cfg.size), target)
        self.student.train()
        return ours, base

    def save(self) -> None:
        tmp = self.folder / "state.pt.tmp"
        torch.save({"student": self.student.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
                    "gen": self.gen.get_state(), "config": json.dumps(asdict(self.cfg)),
                    "cpu_seconds": self.cpu_seconds}, tmp)
        tmp.replace(self.folder / "state.pt")

    def _record(self, **row) -> None:
        path = self.folder / "log.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["time", "step", "loss", "psnr", "psnr_cheap"])
            w.writerow([f"{time.time():.0f}", self.step, row.get("loss", ""), row.get("psnr", ""),
                        row.get("psnr_cheap", "")])

    def train(self) -> bool:
        """Trains until ``cfg.steps`` (True) or the time is up (False); the state is saved either way."""
        cfg = self.cfg
        train, held = self._split()
        self.student.train()
        while self.step < cfg.steps:
            if self.out_of_time():
                self.save()
                return False
            lr = cfg.lr * min(1.0, (self.step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * self.step / cfg.steps))
            for group in self.opt.param_groups:
                group["lr"] = lr
            lat, ref, mask = self._crops(train)
            diff = (self.student(lat) - ref) * mask
            loss = (diff.abs().sum() + diff.square().sum()) / (3 * mask.sum())
            self.opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
            self.opt.step()
            self.step += 1
            row = {"loss": f"{loss.item():.5f}"}
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                ours, base = self.evaluate(held)
                row.update(psnr=f"{ours:.2f}", psnr_cheap=f"{base:.2f}")
                self.log(f"step {self.step}: loss {loss.item():.4f}, held-out PSNR {ours:.2f} dB "
                         f"(Approx cheap {base:.2f} dB), {self.cpu_seconds / 60:.1f} CPU min")
            self._record(**row)
            if self.step % cfg.save_every == 0:
                self.save()
        self.save()
        return True

    def export(self, path: Path) -> Path:
        """The student in madebyollin's layout (float16), made for this VAE only (its fingerprint)."""
        _, held = self._split()
        ours, base = self.evaluate(held)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in taesd_state_dict(self.student).items()}
        save_file(tensors, str(path), metadata={
            FINGERPRINT_KEY: json.dumps([round(v, 6) for v in vae_fingerprint(self.vae)]),
            "sdstudio.demo_taesd": f"a TAESD-class decoder distilled from {self.model_name}'s VAE by "
                                   f"python -m training.demo_taesd",
            "sdstudio.demo_taesd.config": json.dumps(asdict(self.cfg)),
            "sdstudio.demo_taesd.step": str(self.step),
            "sdstudio.demo_taesd.cpu_seconds": f"{self.cpu_seconds:.0f}",
            "sdstudio.demo_taesd.psnr": f"{ours:.2f} dB against the VAE decode (Approx cheap: {base:.2f} dB), "
                                        f"{len(held)} held-out latents"})
        return path

