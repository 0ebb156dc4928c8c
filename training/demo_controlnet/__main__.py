"""``python -m training.demo_controlnet``: train the demo model's Canny ControlNet (resumable), write it to
models/ControlNet, check that the engine's loader reads it back, and (``--check``) measure shape IoU.

The shipped file: ``python -m training.demo_controlnet --check 16`` (2000 steps, about 26 minutes on one
CPU thread); a rerun with the same run folder continues from its last saved state."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .train import Config, Run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo_controlnet", description=__doc__)
    parser.add_argument("--run", default="training/demo_controlnet/runs/default", help="run folder (state, log)")
    parser.add_argument("--out", default="models/ControlNet/sdstudio-demo-canny.safetensors")
    parser.add_argument("--base", help="the base checkpoint (default: the demo model)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--no-export", action="store_true", help="train only")
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="afterwards, the shape-IoU sanity check on N scenes (JSON to RUN/check.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in {"base": args.base, "steps": args.steps, "batch": args.batch,
                                   "lr": args.lr}.items() if v is not None}
    run = Run(Path(args.run), Config(**overrides))
    run.train()
    if not args.no_export:
        path = run.export(Path(args.out))
        print(f"{path}: {path.stat().st_size / 2**20:.1f} MiB; loaded back, residuals differ by at most "
              f"{run.check_export(path):.2e}")
    if args.check:
        figures = run.sanity_check(n=args.check)
        figures_prompt = run.sanity_check(n=args.check, prompt=True)
        report = {"steps": run.step, "empty prompt": figures, "with caption": figures_prompt}
        (Path(args.run) / "check.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
