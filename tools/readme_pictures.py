"""Make the README's pictures with the bundled demo model: grids of demo outputs (colours × shapes, and the
demo LoRA's weights; X/Y plots through the CLI) and screenshots of the web UI in English and 简体中文 (headless Chromium).

Usage: python tools/readme_pictures.py [--out docs/images] [--port 7899]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from sdstudio.testing.headless import launch, set_options, start_server

ROOT = Path(__file__).resolve().parents[1]


def _xyz(out: Path, prompt: str, *script: str) -> None:
    """``prompt`` through the CLI's X/Y/Z plot script (128², 20 steps, Euler a, seed 7) into ``out``."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "models").symlink_to(ROOT / "models")
        subprocess.run([sys.executable, "-m", "sdstudio", "txt2img", prompt, "--data-dir", str(data), "--steps", "20",
                        "--width", "128", "--height", "128", "--seed", "7", "--sampler", "Euler a", "--script", "xyz",
                        *script], check=True, cwd=ROOT)
        made = sorted((data / "outputs").rglob("*grid*.png"))
        picture = Image.open(made[-1])
        picture.thumbnail((900, 900))
        picture.save(out, optimize=True)


def grid(out: Path) -> None:
    _xyz(out / "demo-grid.png", "a red circle on a blue background", "--x-type", "Prompt S/R",
         "--x-values", "red, green, yellow, white, purple", "--y-type", "Prompt S/R",
         "--y-values", "circle, square, triangle, star")
    _xyz(out / "demo-lora.png", "zebra, a red circle on a blue background <lora:demo-zebra:0>", "--x-type",
         "Prompt S/R", "--x-values", "demo-zebra:0, demo-zebra:0.5, demo-zebra:1, demo-zebra:1.5",
         "--y-type", "Seed", "--y-values", "7, 8")


def screenshots(out: Path, port: int) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        (data / "models").symlink_to(ROOT / "models")
        (data / "embeddings").symlink_to(ROOT / "embeddings")
        proc = start_server(port, data)
        url = f"http://127.0.0.1:{port}"
        try:
            with sync_playwright() as p:
                browser = launch(p)
                for lang in ("None", "zh_CN"):
                    set_options(url, {"localization": lang})
                    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
                    page.goto(url)
                    page.wait_for_selector("#txt2img_generate")
                    page.locator("#txt2img_prompt textarea").fill("a red circle on a blue background")
                    for elem, value in (("width", 128), ("height", 128), ("steps", 20), ("batch_size", 4)):
                        box = page.locator(f"#txt2img_{elem} input[type=number]")
                        box.fill(str(value))
                        box.press("Enter")
                    time.sleep(0.5)
                    page.click("#txt2img_generate")
                    page.wait_for_function("document.querySelector('#txt2img_html_info textarea').value.includes('Steps')",
                                           timeout=600_000)
                    time.sleep(1)
                    name = "ui-txt2img.png" if lang == "None" else "ui-txt2img-zh_CN.png"
                    page.screenshot(path=str(out / name), clip={"x": 0, "y": 0, "width": 1400, "height": 1000})
                    picture = Image.open(out / name)
                    picture.thumbnail((1100, 1100))
                    picture.save(out / name, optimize=True)
                browser.close()
        finally:
            try:
                set_options(url, {"localization": "None"})
            except OSError:
                pass
            proc.terminate()
            proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--port", type=int, default=7899)
    ap.add_argument("--skip-grid", action="store_true")
    ap.add_argument("--skip-ui", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.skip_grid:
        grid(out)
    if not args.skip_ui:
        screenshots(out, args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
