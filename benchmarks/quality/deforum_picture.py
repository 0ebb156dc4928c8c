"""The README's Deforum picture: a 24-frame 2D animation of the demo model (zoom in, a slow turn, the
prompt changing at frame 12, cadence 2), shown as a strip of every 4th frame, plus the GIF.

Usage: python benchmarks/quality/deforum_picture.py [--out docs/images/deforum-strip.png]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from PIL import Image

from sdstudio.core import deforum as spec
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.scripts.deforum import DeforumRun
from sdstudio.scripts.studio import Studio

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "max_frames": 24, "diffusion_cadence": 2, "W": 128, "H": 128, "steps": 16, "seed": 42, "sampler": "Euler a",
    "prompts": {"0": "a red circle on a blue background", "12": "a yellow square on a green background"},
    "zoom": "0:(1.04)", "angle": "0:(3)", "strength_schedule": "0:(0.6)", "noise_schedule": "0:(0.02)",
    "fps": 8, "make_gif": True,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "deforum-strip.png"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "models" / "Stable-diffusion").mkdir(parents=True)
        os.link(ROOT / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors",
                root / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors")
        run = DeforumRun(Studio(Engine(Paths(root))), spec.load_settings(SETTINGS), root, outdir=root / "run",
                         options={"ffmpeg_preset": "ultrafast"}).run()
        picks = run.frames[::4]
        strip = Image.new("RGB", (128 * len(picks) + 4 * (len(picks) - 1), 128), "white")
        for i, path in enumerate(picks):
            strip.paste(Image.open(path).convert("RGB"), (i * 132, 0))
        strip.save(a.out)
        gif = Path(a.out).with_suffix(".gif")
        gif.write_bytes(run.gif.read_bytes())
        print(a.out, gif, len(run.frames), "frames")


if __name__ == "__main__":
    main()
