"""``python -m sdstudio.eval``: score a model on the shapes world and write ``benchmarks/quality/RESULTS.md``.

Every number comes from generating pictures with the engine and reading them back with the harness's
reader (:mod:`.harness`): prompt adherence against the renderer (upper bound) and random pictures (lower
bound), the response to CFG, negative prompts and emphasis, img2img strength and inpainting, and a
Fréchet distance between generated and rendered pictures in the reader's feature space. ``--precision``
picks the engine's precision as sdstudio's own flag does; the table's header says what ran (device, dtype).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import harness, shapes

RESULTS = Path("benchmarks/quality/RESULTS.md")


def _request(prompt: str, seed: int, args, **kw):
    from ..core.params import Txt2ImgRequest

    return Txt2ImgRequest(prompt=prompt, seed=seed, steps=args.steps, sampler_name=args.sampler, cfg_scale=kw.pop(
        "cfg_scale", args.cfg), width=args.size, height=args.size, model=args.model, **kw).validate()


def _generate(engine, prompt: str, seed: int, args, **kw) -> Image.Image:
    return engine.txt2img(_request(prompt, seed, args, **kw)).images[0].image


def _img2img(engine, init: Image.Image, prompt: str, seed: int, args, folder: Path, **kw) -> Image.Image:
    from ..core.params import Img2ImgRequest

    path = folder / f"init-{seed}.png"
    init.save(path)
    req = Img2ImgRequest(prompt=prompt, seed=seed, steps=args.steps, sampler_name=args.sampler, cfg_scale=args.cfg,
                         width=args.size, height=args.size, model=args.model, init_images=[str(path)], **kw)
    return engine.img2img(req.validate()).images[0].image


def evaluate(engine, args, log=print) -> list[tuple[str, str, str]]:
    """The table's rows: (measure, value, how to read it)."""
    import tempfile

    reader = harness.load()
    items = harness.prompt_set(args.n)
    scenes = [p.scene for p in items]
    rows: list[tuple[str, str, str]] = []

    def pct(v: float) -> str:
        return f"{100 * v:.1f} %"

    renders = [shapes.render(s, args.size) for s in scenes]
    upper, render_feats = harness.read(reader, renders)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in scenes]
    lower, _ = harness.read(reader, noise)
    started = time.perf_counter()
    generated = []
    for i, p in enumerate(items):
        generated.append(_generate(engine, p.prompt, p.seed, args))
        if i % 20 == 0:
            log(f"generated {i + 1}/{len(items)}")
    seconds = (time.perf_counter() - started) / len(items)
    predicted, gen_feats = harness.read(reader, generated)
    acc = harness.attribute_accuracy(predicted, scenes)
    up, low = harness.attribute_accuracy(upper, scenes), harness.attribute_accuracy(lower, scenes)
    rows.append(("attribute accuracy, renderer (upper bound)", pct(up["mean"]), "the reader on the renderer's own pictures"))
    rows.append(("attribute accuracy, random pictures (lower bound)", pct(low["mean"]), "the reader on uniform noise"))
    with tempfile.TemporaryDirectory() as tmp:  # img2img at strength 0: the VAE's encode and decode, no step
        through_vae = [_img2img(engine, r, p.prompt, p.seed, args, Path(tmp), denoising_strength=0.0)
                       for r, p in zip(renders, items)]
    vae = harness.attribute_accuracy(harness.read(reader, through_vae)[0], scenes)
    rows.append(("attribute accuracy, renderer through the model's VAE", pct(vae["mean"]),
                 (f"the model's ceiling: background {pct(vae['background'])}, colour {pct(vae['colour'])}, "
                 f"shape {pct(vae['shape'])}")))
    rows.append((f"attribute accuracy, model (CFG {args.cfg:g})", pct(acc["mean"]),
                 (f"background {pct(acc['background'])}, colour {pct(acc['colour'])}, shape {pct(acc['shape'])}; "
                 "target ≥ 80 %")))
    rows.append(("Fréchet distance to the renderer", f"{harness.frechet_distance(gen_feats, render_feats):.1f}",
                 (f"reader features; renderer vs itself (two halves): "
                 f"{harness.frechet_distance(render_feats[::2], render_feats[1::2]):.1f}")))
    sub = items[: max(8, args.n // 4)]
    sub_scenes = [p.scene for p in sub]
    cfg_means = []
    for cfg in (1.0, 3.0, 7.0):
        pics = [_generate(engine, p.prompt, p.seed, args, cfg_scale=cfg) for p in sub]
        cfg_means.append(harness.attribute_accuracy(harness.read(reader, pics)[0], sub_scenes)["mean"])
    rows.append(("CFG response (accuracy at CFG 1 / 3 / 7)", " / ".join(pct(v) for v in cfg_means),
                 "should rise with CFG"))

    def colour_share(pics, colours) -> float:
        return float(np.mean([r["colour"] == c for r, c in zip(harness.read(reader, pics)[0], colours)]))

    colours = [p.scene.main.colour for p in sub]
    plain = [_generate(engine, p.prompt, p.seed, args) for p in sub]
    negated = [_generate(engine, p.prompt, p.seed, args, negative_prompt=c) for p, c in zip(sub, colours)]
    rows.append(("negative prompt: object in the prompt's colour, without / with that colour as negative",
                 f"{pct(colour_share(plain, colours))} / {pct(colour_share(negated, colours))}", "should drop"))
    strong = [_generate(engine, p.prompt.replace(c, f"({c}:1.5)", 1), p.seed, args) for p, c in zip(sub, colours)]
    weak = [_generate(engine, p.prompt.replace(c, f"({c}:0.5)", 1), p.seed, args) for p, c in zip(sub, colours)]
    rows.append(("emphasis: object in the prompt's colour, (colour:0.5) / (colour:1.5)",
                 f"{pct(colour_share(weak, colours))} / {pct(colour_share(strong, colours))}", "should rise"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        inits = [shapes.render(p.scene, args.size) for p in sub[:8]]
        distances = []
        for strength in (0.25, 0.5, 0.75):
            outs = [_img2img(engine, im, p.prompt, p.seed, args, folder, denoising_strength=strength)
                    for im, p in zip(inits, sub)]
            distances.append(np.mean([np.abs(np.asarray(o, float) - np.asarray(i, float)).mean()
                                      for o, i in zip(outs, inits)]))
        rows.append(("img2img: mean distance from the init at strength 0.25 / 0.5 / 0.75",
                     " / ".join(f"{d:.1f}" for d in distances), "of 255; should rise"))
        mask = Image.new("L", (args.size, args.size), 0)
        mask.paste(255, (0, 0, args.size // 2, args.size))
        mask_path = folder / "mask.png"
        mask.save(mask_path)
        inside, outside = [], []
        for im, p in zip(inits, sub):
            out = np.asarray(_img2img(engine, im, p.prompt, p.seed, args, folder, denoising_strength=0.75,
                                      mask=str(mask_path), mask_blur=0), float)
            diff = np.abs(out - np.asarray(im, float))
            inside.append(diff[:, : args.size // 2].mean())
            outside.append(diff[:, args.size // 2:].mean())
        rows.append(("inpaint: mean change inside / outside the mask", f"{np.mean(inside):.1f} / {np.mean(outside):.1f}",
                     "of 255; outside must be 0"))
    rows += _companion_rows(engine, reader, sub, args, colour_share, pct)
    rows += guidance_rows(engine, reader, sub, args, pct, plain)
    rows.append(("seconds per picture", f"{seconds:.2f}", f"{args.size}×{args.size}, {args.steps} steps, this machine"))
    return rows


def stripe_score(image: Image.Image, bands: int = shapes.WIDE_BANDS) -> float:
    """How strongly a picture shows the renderer's diagonal stripes with ``bands`` periods across it: the
    amplitude (of 255, in grey) of the strongest Fourier component within one step of that frequency
    along the stripes' normal. A square wave of contrast 60 has 38; flat backgrounds, objects' edges and
    grain have next to none (a score of any detail, e.g. the distance from a blur, also counts those)."""
    grey = np.asarray(image.convert("L"), float)
    n = grey.shape[0]
    spectrum = np.abs(np.fft.fft2(grey - grey.mean())) * 2 / grey.size
    # intensity f(x - y): the stripes' component sits at u = bands, v = -bands cycles per picture
    return float(max(spectrum[(-bands + dv) % n, (bands + du) % n] for du in (-1, 0, 1) for dv in (-1, 0, 1)))


def _companion_rows(engine, reader, sub, args, colour_share, pct) -> list[tuple[str, str, str]]:
    """The demo LoRA (trigger "zebra": striped backgrounds) and embedding ("demo-red"), when installed."""
    rows = []
    if any(m.name == "demo-zebra" for m in engine.registry.loras):
        scores = []
        for weight in (0.0, 0.5, 1.0):
            pics = [_generate(engine, f"zebra, {p.prompt} <lora:demo-zebra:{weight:g}>", p.seed, args) for p in sub]
            scores.append(np.mean([stripe_score(im) for im in pics]))
        rendered = np.mean([stripe_score(shapes.render(dataclasses.replace(p.scene, stripes=True), args.size,
                                                           shapes.WIDE_BANDS)) for p in sub])
        rows.append(("LoRA strength response: stripe score at <lora:demo-zebra:0 / 0.5 / 1>",
                     " / ".join(f"{v:.1f}" for v in scores), f"should rise; rendered striped scenes: {rendered:.1f}"))
    else:
        rows.append(("LoRA strength response", "n/a", "models/Lora/demo-zebra.safetensors is not installed"))
    if "demo-red" in engine.embeddings.names():
        reds = []
        for p in sub:
            if p.scene.background != "red":
                scene = dataclasses.replace(p.scene, things=(dataclasses.replace(p.scene.main, colour="red"),))
                reds.append(dataclasses.replace(p, scene=scene, prompt=shapes.caption(scene)))
        red = ["red"] * len(reds)
        plain = [_generate(engine, p.prompt, p.seed, args) for p in reds]
        negated = [_generate(engine, p.prompt, p.seed, args, negative_prompt="demo-red") for p in reds]
        bare = [_generate(engine, p.prompt.replace("red ", "", 1), p.seed, args) for p in reds]
        named = [_generate(engine, p.prompt.replace("red ", "demo-red ", 1), p.seed, args) for p in reds]
        rows.append(("embedding: red objects for 'a red …', without / with negative demo-red",
                     f"{pct(colour_share(plain, red))} / {pct(colour_share(negated, red))}", "should drop"))
        rows.append(("embedding: red objects for 'a …' / 'a demo-red …'",
                     f"{pct(colour_share(bare, red))} / {pct(colour_share(named, red))}", "should rise"))
    else:
        rows.append(("embedding effect", "n/a", "embeddings/demo-red.safetensors is not installed"))
    return rows


def saturation(images: list[Image.Image]) -> float:
    """Mean HSV saturation (of 255): where high CFG scales' burnt colours would show."""
    return float(np.mean([np.asarray(im.convert("HSV"), float)[..., 1].mean() for im in images]))


GUIDANCE_CFG = 15.0
GUIDANCE_EXTRAS = (  # (label, always-on scripts): the guidance scripts at a CFG scale that burns colours
    ("plain", {}),
    ("dynamic thresholding (mimic 7)", {"Dynamic Thresholding (CFG Scale Fix)": {"enabled": True, "mimic_scale": 7.0}}),
    ("CFG rescale 0.7", {"CFG Rescale Extension": {"phi": 0.7}}),
    ("FreeU (SD 1.5 preset)", {"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"enabled": True, "b1": 1.5, "b2": 1.6,
                                                                          "s1": 0.9, "s2": 0.2}}),
)


def guidance_rows(engine, reader, sub, args, pct, plain=None) -> list[tuple[str, str, str]]:
    """Accuracy and colour saturation at CFG 15, plain and with each guidance script (through the studio,
    which runs the always-on scripts); ``plain``: the same prompts' pictures at the harness's CFG."""
    from ..scripts import Studio

    studio = Studio(engine)
    scenes = [p.scene for p in sub]
    accuracy, saturations = [], []
    for _label, scripts in GUIDANCE_EXTRAS:
        pics = [studio.generate(_request(p.prompt, p.seed, args, cfg_scale=GUIDANCE_CFG, alwayson_scripts=scripts))
                .images[0].image for p in sub]
        accuracy.append(harness.attribute_accuracy(harness.read(reader, pics)[0], scenes)["mean"])
        saturations.append(saturation(pics))
    names = " / ".join(label for label, _ in GUIDANCE_EXTRAS)
    at_cfg = f"CFG {args.cfg:g}: {saturation(plain):.0f}; " if plain else ""
    return [(f"guidance at CFG {GUIDANCE_CFG:g}: attribute accuracy, {names}",
             " / ".join(pct(v) for v in accuracy), f"the scripts should win back what CFG 15 loses against CFG {args.cfg:g}"),
            (f"guidance at CFG {GUIDANCE_CFG:g}: mean colour saturation, {names}",
             " / ".join(f"{v:.0f}" for v in saturations),
             f"of 255; {at_cfg}renderer: {saturation([shapes.render(s, args.size) for s in scenes]):.0f}")]


def table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| measure | value | notes |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


DEMO_CONTROLNET = "sdstudio-demo-canny"


def controlnet_rows(engine, args, n: int = 24, log=print) -> list[tuple[str, str, str]]:
    """The demo ControlNet (edges -> shapes): how well the generated objects cover the control scene's
    objects (IoU of the object masks), without a unit and with one at weight 0 / 0.5 / 1. The prompt is the
    plain caption (colour, shape, background: no place or size), so only the edge map says where and how big."""
    import base64
    import io

    from ..scripts import Studio

    if not any(m.name == DEMO_CONTROLNET for m in engine.registry.controlnets):
        return [("ControlNet shape IoU", "n/a", f"models/ControlNet/{DEMO_CONTROLNET}.safetensors is not installed")]
    studio = Studio(engine)
    rng = np.random.default_rng(4321)
    scenes = [shapes.random_scene(rng, 1) for _ in range(n)]
    seeds = [int(rng.integers(0, 2**31)) for _ in scenes]

    def b64(image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    variants: dict[str, list[float]] = {"none": [], "0": [], "0.5": [], "1": []}
    for k, (scene, seed) in enumerate(zip(scenes, seeds)):
        control = b64(shapes.render(scene, args.size))
        truth = shapes.scene_mask(scene, args.size)
        for label, scores in variants.items():
            units = [] if label == "none" else [{"enabled": True, "module": "canny", "model": DEMO_CONTROLNET,
                                                 "image": control, "weight": float(label), "pixel_perfect": True,
                                                 "save_detected_map": False}]
            req = _request(shapes.caption(scene), seed, args,
                           alwayson_scripts={"ControlNet": {"units": units}} if units else {})
            picture = studio.generate(req).images[0].image
            scores.append(shapes.shape_iou(truth, shapes.object_mask(picture)))
        if k % 8 == 0:
            log(f"ControlNet row: {k + 1}/{n}")
    means = {k: float(np.mean(v)) for k, v in variants.items()}
    return [("ControlNet (demo canny): object IoU with the control scene, no unit / weight 0 / 0.5 / 1",
             " / ".join(f"{means[k]:.2f}" for k in ("none", "0", "0.5", "1")),
             f"{n} scenes, plain captions (no place or size); should rise with the weight, weight 0 = no unit")]


def main(argv: list[str] | None = None) -> int:
    from ..core.paths import DeviceOptions, Paths, default_precision
    from ..engine.generate import Engine

    parser = argparse.ArgumentParser(prog="python -m sdstudio.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=".")
    parser.add_argument("--model", default=None, help="checkpoint name (default: the first one)")
    parser.add_argument("--n", type=int, default=200, help="prompts × seeds (default 200)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="Euler a")
    parser.add_argument("--cfg", type=float, default=7.0)
    parser.add_argument("--precision", choices=["full", "autocast", "half"], default=default_precision(),
                        help="the engine's precision, as sdstudio's --precision (full: float32; autocast/half: float16 "
                             "on a GPU, bfloat16 on a bfloat16 CPU; default: autocast, or SDSTUDIO_PRECISION)")
    parser.add_argument("--out", default=str(RESULTS), help="where the table is written ('-': nowhere)")
    parser.add_argument("--only", choices=["controlnet", "training"], help="compute only these rows and print them "
                        "(training: a LoRA and an embedding trained with our trainers on rendered scenes, minutes)")
    args = parser.parse_args(argv)
    options = DeviceOptions(precision=args.precision)
    engine = Engine(Paths(Path(args.data_dir)), options)
    file = engine.registry.checkpoint(args.model)
    args.model = file.name
    if args.only == "controlnet":
        print(table(controlnet_rows(engine, args, log=lambda m: print(m, file=sys.stderr))))
        return 0
    if args.only == "training":
        import tempfile

        from .training import training_rows

        with tempfile.TemporaryDirectory() as work:  # the trained files and their data: thrown away after
            print(table(training_rows(file.path, Path(work), lambda paths: Engine(paths, options), size=args.size,
                                      steps=args.steps, sampler=args.sampler, cfg=args.cfg,
                                      log=lambda m: print(m, file=sys.stderr))))
        return 0
    rows = evaluate(engine, args, log=lambda m: print(m, file=sys.stderr))
    rows += controlnet_rows(engine, args, log=lambda m: print(m, file=sys.stderr))
    text = table(rows)
    print(text)
    if args.out != "-":
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# Quality harness results\n\n{datetime.date.today().isoformat()}, model `{file.name}` "
                       f"[{file.short_hash}], {args.n} prompts × seeds, {args.size}×{args.size}, {args.steps} steps, "
                       f"{args.sampler}, CFG {args.cfg:g}, {engine.plan.describe()}; `python -m sdstudio.eval "
                       f"--precision {args.precision}`.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
