"""``python -m training.demo_model``: train the demo model (resumable) and write it to models/Stable-diffusion."""

from __future__ import annotations

import argparse
from pathlib import Path

from .train import Config, Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_model", description=__doc__)
    parser.add_argument("--run", default="training/demo_model/runs/default", help="run folder (state, log)")
    parser.add_argument("--out", default="models/Stable-diffusion/sdstudio-demo.safetensors")
    parser.add_argument("--vae-steps", type=int)
    parser.add_argument("--unet-steps", type=int)
    parser.add_argument("--v-steps", type=int, help="UNet steps predicting v, after the --unet-steps predicting noise")
    parser.add_argument("--fresh", type=float, help="share of diffusion steps that render and encode new pictures")
    parser.add_argument("--encode-dtype", choices=["float32", "bfloat16"], help="the diffusion stages' VAE encoding")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run with tiny widths")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in {"vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
                                   "v_steps": args.v_steps, "batch": args.batch,
                                   "fresh": args.fresh, "encode_dtype": args.encode_dtype,
                                   "size": args.size}.items() if v is not None}
    cfg = Config.tiny(**overrides) if args.tiny else Config(**overrides)
    run = Run(Path(args.run), cfg)
    run.train()
    print(run.export(Path(args.out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
