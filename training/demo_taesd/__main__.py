"""``python -m training.demo_taesd``: distil the demo model's VAE decoder into a TAESD-class decoder
(resumable, time-bounded) and write it to models/VAE-approx, where the engine's "TAESD" live preview finds it.

The shipped file: ``OMP_NUM_THREADS=1 nice python -m training.demo_taesd`` (the defaults; ``--minutes`` bounds
each invocation, a rerun with the same run folder continues from its last saved state)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .train import Config, Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_taesd", description=__doc__)
    parser.add_argument("--run", default="training/demo_taesd/runs/default", help="run folder (pool, state, log)")
    parser.add_argument("--model", default="models/Stable-diffusion/sdstudio-demo.safetensors")
    parser.add_argument("--out", default="models/VAE-approx/sdstudio-demo-taesd.safetensors")
    parser.add_argument("--minutes", type=float, help="stop (saved, resumable) after this long; 0: no limit")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--scenes", type=int, help="dataset pictures encoded into the pool")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run with a tiny student")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"minutes": args.minutes, "steps": args.steps, "width": args.width,
                                   "scenes": args.scenes}.items() if v is not None}
    cfg = Config.tiny(**overrides) if args.tiny else Config(**overrides)
    run = Run(Path(args.run), cfg, args.model)
    if not run.build_pool():
        print(f"time is up while building the pool ({run.scenes_done} scenes, {run.generations_done} generations); "
              "run again to continue")
        return 0
    finished = run.train()
    print(run.export(Path(args.out)))
    if not finished:
        print(f"time is up at step {run.step} of {cfg.steps} (exported as it is); run again to continue")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
