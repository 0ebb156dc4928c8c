"""The README's ControlNet picture: for a few scenes of the shapes world, the scene, the canny map the unit
makes of it, the demo model without a unit and with the demo ControlNet (same prompt and seed).

Usage: python benchmarks/quality/controlnet_picture.py [--out docs/images/controlnet-demo.png]
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.eval import shapes
from sdstudio.scripts import Studio

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "images" / "controlnet-demo.png"))
    ap.add_argument("--size", type=int, default=128)
    a = ap.parse_args()
    studio = Studio(Engine(Paths(ROOT)))
    rng = np.random.default_rng(7)
    scenes = [shapes.random_scene(rng, 1) for _ in range(4)]
    columns = ("scene", "canny map", "no unit", "ControlNet")
    cell, top = a.size, 18
    sheet = Image.new("RGB", (cell * len(columns), top + cell * len(scenes)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(columns):
        draw.text((c * cell + 4, 3), label, fill="black")
    for r, scene in enumerate(scenes):
        picture = shapes.render(scene, a.size)
        buf = io.BytesIO()
        picture.save(buf, format="PNG")
        unit = {"enabled": True, "module": "canny", "model": "sdstudio-demo-canny", "pixel_perfect": True,
                "image": base64.b64encode(buf.getvalue()).decode()}
        base = {"prompt": shapes.caption(scene), "seed": 100 + r, "steps": 20, "sampler_name": "Euler a",
                "width": a.size, "height": a.size, "model": "sdstudio-demo"}
        plain = studio.generate(Txt2ImgRequest(**base)).images[0].image
        out = studio.generate(Txt2ImgRequest(**base, alwayson_scripts={"ControlNet": {"units": [unit]}}))
        controlled, detected = out.images[0].image, out.images[1].image
        for c, im in enumerate((picture, detected, plain, controlled)):
            sheet.paste(im.convert("RGB").resize((cell, cell)), (c * cell, top + r * cell))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(a.out, [shapes.caption(s) for s in scenes])


if __name__ == "__main__":
    main()
