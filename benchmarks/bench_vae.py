"""Peak memory of tiled vs whole VAE decode, and an ESRGAN-architecture upscale in bounded memory.

VAE: a full-size SD VAE (random weights, the real layout), decoding one SIZE×SIZE latent whole and
tiled (sdstudio.engine.tiled_vae), each in a fresh process. Memory is the peak above what the process
held once the model was loaded: on CUDA torch's peak allocation on the GPU, on the CPU the peak RSS.
Also prints the largest pixel difference between the two (goal: within rounding) and both times.
Goal: tiled / whole peak memory <= 0.5 at 1024×1024.

Upscaler: a full-size RRDBNet (ESRGAN 4x: 64 features, 23 blocks; random weights) from 512×512 to
2048×2048 through sdstudio's tiled runner; prints its peak memory next to the size of the output.
Usage: python benchmarks/bench_vae.py [--size 1024] [--upscale-size 512] [--skip-upscale]
"""

from __future__ import annotations

import argparse
import json

from common import in_fresh_process

VAE = """
import json, resource, time, torch
from diffusers import AutoencoderKL
from sdstudio.engine import tiled_vae
cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
torch.manual_seed(0)
vae = AutoencoderKL(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
vae = vae.to(device, dtype).eval()
z = torch.randn(1, 4, {size} // 8, {size} // 8, generator=torch.Generator().manual_seed(1)).to(device, dtype)

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated() / 2**20
else:
    base = rss()
t = time.perf_counter()
with torch.no_grad():
    out = tiled_vae.decode(vae, z) if {tiled} else vae.decode(z).sample.float().cpu()
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - t
peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else rss()) - base
torch.save(out[0, :, ::7, ::7].clone(), {sample!r})  # a strided sample of the pixels, for the comparison
print(json.dumps({{"peak_mb": peak, "seconds": seconds, "device": device}}))
"""

UPSCALE = """
import json, resource, time, torch
from sdstudio.engine.upscalers import RRDBNet, run_tiled
cuda = torch.cuda.is_available()
device, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
torch.manual_seed(0)
model = RRDBNet(3, 3, 64, 23, 32, 2, 1).to(device, dtype).eval()
for p in model.parameters():
    p.data.mul_(0.1)
x = torch.rand(1, 3, {size}, {size})
if cuda:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated() / 2**20
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
out = run_tiled(model, 4, x, device=torch.device(device), dtype=dtype)
seconds = time.perf_counter() - t
peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024) - base
print(json.dumps({{"peak_mb": peak, "seconds": seconds, "out": list(out.shape),
                  "out_mb": out.numel() * 4 / 2**20, "device": device}}))
"""


def main() -> None:
    import tempfile
    from pathlib import Path

    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--upscale-size", type=int, default=512)
    parser.add_argument("--skip-upscale", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    runs = {}
    for tiled in (False, True):
        sample = str(folder / f"sample-{tiled}.pt")
        runs[tiled] = in_fresh_process(VAE.format(size=args.size, tiled=tiled, sample=sample))
        runs[tiled]["sample"] = torch.load(sample)
    diff = (runs[True]["sample"] - runs[False]["sample"]).abs().max().item() * 127.5
    ratio = runs[True]["peak_mb"] / runs[False]["peak_mb"]
    result = {"size": args.size, "device": runs[True]["device"], "whole_peak_mb": round(runs[False]["peak_mb"]),
              "tiled_peak_mb": round(runs[True]["peak_mb"]), "peak_ratio": round(ratio, 3),
              "whole_s": round(runs[False]["seconds"], 2), "tiled_s": round(runs[True]["seconds"], 2),
              "max_pixel_diff_of_255": round(diff, 4)}
    print(json.dumps(result))
    print(f"VAE decode {args.size}x{args.size} on {result['device']}: peak {result['tiled_peak_mb']} MB tiled vs "
          f"{result['whole_peak_mb']} MB whole -> ratio {result['peak_ratio']} (goal <= 0.5); "
          f"time {result['tiled_s']} s vs {result['whole_s']} s; largest pixel difference {result['max_pixel_diff_of_255']}/255")
    if not args.skip_upscale:
        up = in_fresh_process(UPSCALE.format(size=args.upscale_size))
        print(json.dumps(up))
        print(f"ESRGAN 4x {args.upscale_size} -> {up['out'][-1]}: peak {up['peak_mb']:.0f} MB (output alone "
              f"{up['out_mb']:.0f} MB) in {up['seconds']:.1f} s on {up['device']}")


if __name__ == "__main__":
    main()
