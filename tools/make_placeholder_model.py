"""Write the placeholder demo checkpoint: a tiny random-weight SD 1.x-architecture model.

It has the real SD 1.x key layout and the real CLIP tokenizer, so it loads through exactly the code
path a real checkpoint takes; its images are noise until the trained demo model replaces it.
Deterministic: the same seed and torch version give the same file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdstudio.models.synthetic import write_checkpoint

NAME = "sdstudio-placeholder-sd1.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default=".")
    args = parser.parse_args()
    path = Path(args.data_dir) / "models" / "Stable-diffusion" / NAME
    if path.exists():
        print(f"{path} exists")
        return
    write_checkpoint(path, "sd1", "tiny", seed=1234, dtype=torch.float16)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
