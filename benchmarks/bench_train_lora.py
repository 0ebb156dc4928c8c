"""LoRA training speed: steps/s of our trainer vs the same loop written in plain diffusers + peft.

Both train a UNet-only LoRA of the same modules (kohya's: every Linear / 1x1 conv in the transformer
blocks: to_q/k/v/out, proj_in/out, ff), same rank, alpha, batch and size, AdamW, on the demo model at
128²: VAE encode and text encode without grad, UNet forward and backward, gradient clipping, an
optimiser step. The two loops alternate (``--rounds``) and each step is timed after warm-up; the figure
is the ratio of median step times (ours / theirs as a speed: >= 0.95 is the goal). Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_train_lora.py [--steps 12] [--rounds 2] [--batch 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def make_dataset(folder: Path, n: int, size: int) -> Path:
    from sdstudio.eval import shapes

    sub = folder / "1_shapes"
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        scene = shapes.random_scene(rng, max_things=2)
        shapes.render(scene, size).save(sub / f"{i}.png")
        (sub / f"{i}.caption").write_text(shapes.caption(scene))
    return folder


def ours(data: Path, steps: int, batch: int, dim: int, alpha: float, size: int) -> list[float]:
    from sdstudio.models.loader import load_checkpoint
    from sdstudio.training import TrainingDataset, train_lora

    model = load_checkpoint(DEMO, torch.float32)
    ds = TrainingDataset.from_folder(data, resolution=size, min_bucket_reso=64, max_bucket_reso=256)
    stamps = []
    with tempfile.TemporaryDirectory() as out:
        train_lora(model, ds, max_train_steps=steps, batch_size=batch, network_dim=dim, network_alpha=alpha,
                   train_text_encoder=False, learning_rate=1e-4, output_dir=out, output_name="bench",
                   on_progress=lambda p: stamps.append(time.perf_counter()))
    return [b - a for a, b in itertools.pairwise(stamps)]


def theirs(data: Path, steps: int, batch: int, dim: int, alpha: float, size: int) -> tuple[list[float], int]:
    """The textbook diffusers + peft loop (as diffusers' train_text_to_image_lora.py)."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from sdstudio.models.diffusers_layout import write_config_folder
    from sdstudio.models.loader import load_checkpoint

    spec = load_checkpoint(DEMO).spec
    with tempfile.TemporaryDirectory() as cfg:
        pipe = StableDiffusionPipeline.from_single_file(str(DEMO), config=str(write_config_folder(spec, Path(cfg))),
                                                        local_files_only=True, torch_dtype=torch.float32)
    unet, vae, text, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=dim, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TARGETS))
    params = [p for p in unet.parameters() if p.requires_grad]
    n_modules = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    files = sorted((data / "1_shapes").glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))) for f in files])
    pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
    captions = [f.with_suffix(".caption").read_text() for f in files]
    ids = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    unet.train()
    stamps = []
    for step in range(steps):
        sel = [(step * batch + i) % len(files) for i in range(batch)]
        with torch.no_grad():
            latents = vae.encode(pixels[sel]).latent_dist.sample() * vae.config.scaling_factor
            context = text(ids[sel])[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        noisy = sched.add_noise(latents, noise, t)
        pred = unet(noisy, t, context).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)], n_modules


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=4.0)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    from sdstudio.models.loader import load_checkpoint
    from sdstudio.training.lora import LoRANetwork

    n_ours = len(LoRANetwork(load_checkpoint(DEMO), args.dim, args.alpha, text_encoder=False))
    mine, other, n_theirs = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(Path(tmp), 8, args.size)
        for _ in range(args.rounds):
            mine += ours(data, args.steps, args.batch, args.dim, args.alpha, args.size)[args.warmup:]
            times, n_theirs = theirs(data, args.steps, args.batch, args.dim, args.alpha, args.size)
            other += times[args.warmup:]
    a, b = statistics.median(mine), statistics.median(other)
    print(json.dumps({"threads": torch.get_num_threads(), "size": args.size, "batch": args.batch, "dim": args.dim,
                      "lora_modules": {"ours": n_ours, "diffusers_peft": n_theirs},
                      "ours_steps_per_s": round(1 / a, 3), "diffusers_peft_steps_per_s": round(1 / b, 3),
                      "ratio": round(b / a, 3), "goal": ">= 0.95"}))


if __name__ == "__main__":
    main()
