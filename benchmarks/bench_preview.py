"""Live preview cost: "Full" (the VAE) vs "TAESD" vs "Approx cheap", per preview picture, and the demo
decoder's quality.

1. Full size: the VAE of the full-size SD 1.5-layout random-weight checkpoint (:func:`common.full_sd15`, only
   its VAE is read) against a random-weight TAESD decoder in madebyollin's layout (64 wide, his published
   size), both through the engine's preview code, on one SIZE² latent. Times are the median of ``--repeats``.
2. The demo model (128²): its own VAE against the shipped ``models/VAE-approx/sdstudio-demo-taesd.safetensors``,
   and the PSNR of the TAESD and Approx cheap previews against the full decode, on the denoised estimates
   of a few demo generations (the pictures a live preview shows, early steps included).

Printed as ratios to Full measured in the same run. Usage:
``OMP_NUM_THREADS=1 python benchmarks/bench_preview.py [--size 512] [--repeats 3] [--skip-full-size]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from common import full_sd15

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors"
DEMO_TAESD = REPO / "models" / "VAE-approx" / "sdstudio-demo-taesd.safetensors"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (first-call allocations, the decoder file's load)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def full_size(size: int, repeats: int) -> None:
    from sdstudio.engine import vae as vae_ops
    from sdstudio.engine.preview import PreviewDecoders, cheap_preview
    from sdstudio.models.loader import load_vae_file
    from sdstudio.testing.taesd_files import reference_decoder, write_state

    vae = load_vae_file(full_sd15(), SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215)), torch.float32)
    spec = SimpleNamespace(family="sd1", dit=None)
    latent = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        write_state(Path(tmp) / "taesd_decoder.safetensors", reference_decoder(seed=0).state_dict())
        previews = PreviewDecoders(Path(tmp))
        full = timed(lambda: vae_ops.to_pil(vae_ops.decode(vae, latent, torch.device("cpu"))), repeats)
        taesd = timed(lambda: previews.decode("TAESD", spec, vae, latent), repeats)
    cheap = timed(lambda: cheap_preview(latent), max(repeats, 20))
    print(f"full-size SD 1.5 VAE vs TAESD at {size}² (CPU, {torch.get_num_threads()} threads):")
    print(f"  Full {full:.3f} s   TAESD {taesd:.3f} s ({taesd / full:.3f}× Full, {full / taesd:.1f}× faster)   "
          f"Approx cheap {cheap * 1000:.2f} ms ({cheap / full:.5f}× Full)")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * math.log10(255 ** 2 / max(float(np.mean((a - b) ** 2)), 1e-10))


def as_array(image, size: int | None = None) -> np.ndarray:
    from PIL import Image

    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def demo(repeats: int, generations: int) -> None:
    from sdstudio.core.params import Txt2ImgRequest
    from sdstudio.core.paths import Paths
    from sdstudio.engine.generate import Engine
    from sdstudio.engine.preview import cheap_preview

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for src, rel in ((DEMO, "models/Stable-diffusion"), (DEMO_TAESD, "models/VAE-approx")):
            (root / rel).mkdir(parents=True)
            (root / rel / src.name).symlink_to(src)
        engine = Engine(Paths(root))
        latents, scores = [], {"TAESD": [], "Approx cheap": []}

        def keep(p) -> None:
            if p.step in (2, 5, 8):
                full = as_array(p.decode(p.latent))
                scores["TAESD"].append(psnr(as_array(p.approx("TAESD", p.latent)), full))
                scores["Approx cheap"].append(psnr(as_array(cheap_preview(p.latent), 128), full))
                latents.append(p)

        prompts = ["a red circle on a blue background", "a green square on a white background",
                   "two yellow triangles on a black background", "a blue star on a striped background"]
        for n in range(generations):
            req = Txt2ImgRequest(prompt=prompts[n % len(prompts)], seed=100 + n, steps=8, width=128, height=128,
                                 sampler_name=("Euler a", "DPM++ 2M")[n % 2], cfg_scale=7.0, model="sdstudio-demo")
            engine.txt2img(req, on_progress=keep)
        p = latents[-1]
        full = timed(lambda: p.decode(p.latent), repeats)
        taesd = timed(lambda: p.approx("TAESD", p.latent), repeats)
        cheap = timed(lambda: cheap_preview(p.latent), max(repeats, 20))
    size = DEMO_TAESD.stat().st_size
    print(f"demo model at 128² (its VAE vs {DEMO_TAESD.name}, {size / 1e6:.2f} MB):")
    print(f"  Full {full * 1000:.1f} ms   TAESD {taesd * 1000:.1f} ms ({taesd / full:.3f}× Full, "
          f"{full / taesd:.1f}× faster)   Approx cheap {cheap * 1000:.2f} ms ({cheap / full:.4f}× Full)")
    for name, values in scores.items():
        print(f"  PSNR vs the full decode, {name}: mean {np.mean(values):.1f} dB, min {np.min(values):.1f} dB "
              f"({len(values)} previews at steps 2, 5, 8 of {generations} generations)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--skip-full-size", action="store_true")
    args = parser.parse_args()
    if not args.skip_full_size:
        full_size(args.size, args.repeats)
    demo(args.repeats, args.generations)


if __name__ == "__main__":
    main()
