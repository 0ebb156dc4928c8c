"""The img2img scripts: SD upscale, Loopback, Poor man's outpainting, Outpainting mk2.

- SD upscale: upscale the init image, cut it into overlapping tiles of the request's size, img2img each
  (tile batch ``i`` uses seed ``seed + i``, as A1111), lay the tiles back with feathered seams.
- Loopback: img2img of the previous output, ``loops`` times, the strength following the curve, seed + 1
  each loop; masked content becomes "original" after the first loop.
- Poor man's outpainting: the canvas grown by ``pixels`` on the chosen sides (to a multiple of 64), the
  new band masked (blur × 2), and only the tiles touching it inpainted.
- Outpainting mk2: one side at a time (left, right, up, down): the band filled with noise matched to the
  picture (:func:`sdstudio.core.imageops.matched_noise`), then inpainted over a window of at most the
  request's size at that edge, masked content "original".

The result's infotext is the first pass's with the script and its arguments added (``Script: …``), so
pasting it back with the same init image runs the script again.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from ..core import imageops, tiles
from ..core.imageops import MASKED_CONTENT
from ..core.params import Img2ImgRequest, RequestError
from ..core.scripts import OUTPAINT_DIRECTIONS, Args, Param, Script, ScriptError

DENOISING_CURVES = ("Linear", "Aggressive", "Lazy")


def _open(path_or_image):
    from ..engine import img2img as img2img_ops

    return img2img_ops.open_image(path_or_image, "init image").convert("RGB")


def loopback_strength(args: Args, initial: float, loop: int) -> float:
    """A1111's schedule: the strength for loop ``loop`` (0-based) of ``args.loops``."""
    if args.loops == 1:
        return initial
    progress = loop / (args.loops - 1)
    curve = {"Aggressive": math.sin(progress * math.pi * 0.5),
             "Lazy": 1 - math.cos(progress * math.pi * 0.5)}.get(args.denoising_curve, progress)
    return initial + (args.final_denoising_strength - initial) * curve


def _sd_upscale(ctx, req: Img2ImgRequest, args: Args):
    init = _open(req.init_images[0])
    if args.upscaler != "None":  # A1111: "None" leaves the picture at its size
        w, h = int(init.width * args.scale) // 8 * 8, int(init.height * args.scale) // 8 * 8
        init = ctx.engine.upscalers.upscale(init, w, h, args.upscaler)
    try:
        grid, work = tiles.split(init, req.width, req.height, args.overlap)
    except ValueError as exc:
        raise RequestError(f"SD upscale: {exc}; lower the width/height or raise the scale") from None
    per_batch = req.batch_size
    batches = math.ceil(len(work) / per_batch)
    passes = ctx.passes(batches * req.n_iter)
    for n in range(req.n_iter):
        start = req.seed + n
        done = []
        for i in range(batches):
            chunk = work[i * per_batch:(i + 1) * per_batch]
            result = passes.run(req.replace(init_images=chunk, batch_size=len(chunk), n_iter=1, seed=start + i))
            if result.interrupted:
                yield start, None
                return
            done += [g.image for g in result.images]
        yield start, [(tiles.combine(grid, done), passes.first.images[0].infotext)]


def _loopback(ctx, req: Img2ImgRequest, args: Args):
    passes = ctx.passes(req.n_iter * args.loops)
    original = _open(req.init_images[0])
    seed = req.seed
    for _ in range(req.n_iter):
        current = req.replace(init_images=[original] * req.batch_size, n_iter=1)
        history = []
        for loop in range(args.loops):
            result = passes.run(current.replace(seed=seed))
            if result.interrupted:
                yield seed, None
                return
            first = result.images[0]
            history.append((first.image, passes.first.images[0].infotext))  # the whole run's: its first pass
            if req.batch_size == 1:
                yield seed, [history[-1]]
            seed += 1
            current = current.replace(init_images=[first.image], batch_size=1, inpainting_fill=1,
                                      denoising_strength=loopback_strength(args, req.denoising_strength, loop + 1))
        if req.batch_size > 1:
            yield seed - 1, [history[-1]]


def _outpaint(ctx, req: Img2ImgRequest, args: Args):
    init = _open(req.init_images[0])
    grow = {d: (args.pixels if d in args.direction else 0) for d in OUTPAINT_DIRECTIONS}
    target_w = math.ceil((init.width + grow["left"] + grow["right"]) / 64) * 64
    target_h = math.ceil((init.height + grow["up"] + grow["down"]) / 64) * 64
    left = grow["left"] * (target_w - init.width) // (grow["left"] + grow["right"]) if grow["left"] else 0
    right = target_w - init.width - left if grow["right"] else 0
    up = grow["up"] * (target_h - init.height) // (grow["up"] + grow["down"]) if grow["up"] else 0
    down = target_h - init.height - up if grow["down"] else 0
    canvas = Image.new("RGB", (target_w, target_h))
    canvas.paste(init, (left, up))
    mask = Image.new("L", canvas.size, 255)
    b = args.mask_blur * 2
    ImageDraw.Draw(mask).rectangle((left + (b if left else 0), up + (b if up else 0),
                                    target_w - right - (b if right else 0), target_h - down - (b if down else 0)), fill=0)
    try:
        grid, work = tiles.split(canvas, req.width, req.height, args.pixels)
    except ValueError as exc:
        raise RequestError(f"outpainting: {exc}") from None
    _, masks = tiles.split(mask, req.width, req.height, args.pixels)
    todo = [i for i, (x, y, x1, y1) in enumerate(grid.boxes())
            if not (x >= left and x1 <= target_w - right and y >= up and y1 <= target_h - down)]
    passes = ctx.passes(len(todo) * req.n_iter)
    for n in range(req.n_iter):
        start = seed = req.seed + n * len(todo)
        done = list(work)
        for i in todo:
            result = passes.run(req.replace(init_images=[work[i]], mask=masks[i], n_iter=1, batch_size=1, seed=seed,
                                            mask_blur=b, inpainting_fill=args.inpainting_fill, inpaint_full_res=False,
                                            inpainting_mask_invert=0))
            if result.interrupted:
                yield start, None
                return
            done[i] = result.images[0].image
            seed += 1
        yield start, [(tiles.combine(grid, done), passes.first.images[0].infotext)]


def _grow_one_side(passes, req: Img2ImgRequest, args: Args, images: list, side: str,
                   seed: int):
    """Every image of ``images`` grown by ``args.pixels`` on ``side``; one inpaint pass for the batch."""
    horizontal = side in ("left", "right")
    grow_w, grow_h = (args.pixels, 0) if horizontal else (0, args.pixels)
    canvases, masks, crops, sizes = [], [], [], []
    for image in images:
        res_w, res_h = image.width + grow_w, image.height + grow_h
        w, h = math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64
        canvas = Image.new("RGB", (w, h))
        canvas.paste(image, (grow_w if side == "left" else 0, grow_h if side == "up" else 0))
        mask = Image.new("L", (w, h), 255)
        blur = args.mask_blur
        ImageDraw.Draw(mask).rectangle((args.pixels + blur if side == "left" else 0, args.pixels + blur if side == "up" else 0,
                                        w - args.pixels - blur if side == "right" else res_w,
                                        h - args.pixels - blur if side == "down" else res_h), fill=0)
        pixels = np.asarray(canvas, dtype=np.float64) / 255.0
        filled = imageops.matched_noise(pixels, np.asarray(mask, dtype=np.float64) / 255.0, args.noise_q,
                                        args.color_variation)
        canvas = Image.fromarray((filled * 255).round().astype(np.uint8))
        tw = min(req.width, image.width + grow_w) if horizontal else w
        th = min(req.height, image.height + grow_h) if not horizontal else h
        box = (0 if side == "left" else w - tw, 0 if side == "up" else h - th,
               tw if side == "left" else w, th if side == "up" else h)
        canvases.append(canvas)
        masks.append(mask.crop(box))
        crops.append(canvas.crop(box))
        sizes.append((res_w, res_h))
    tw, th = crops[0].size
    result = passes.run(req.replace(init_images=crops, mask=masks[0], width=tw // 8 * 8, height=th // 8 * 8,
                                    batch_size=len(crops), n_iter=1, seed=seed, mask_blur=args.mask_blur,
                                    inpainting_fill=1, inpaint_full_res=False, inpainting_mask_invert=0))
    if result.interrupted:
        return None
    out = []
    for canvas, done, (res_w, res_h) in zip(canvases, result.images, sizes):
        piece = done.image.resize((tw, th), Image.Resampling.LANCZOS) if done.image.size != (tw, th) else done.image
        canvas.paste(piece, (0 if side == "left" else canvas.width - tw, 0 if side == "up" else canvas.height - th))
        out.append(canvas.crop((0, 0, res_w, res_h)))
    return out


def _outpaint_mk2(ctx, req: Img2ImgRequest, args: Args):
    init = _open(req.init_images[0])
    sides = [d for d in OUTPAINT_DIRECTIONS if d in args.direction]
    passes = ctx.passes(req.n_iter * len(sides))
    for n in range(req.n_iter):
        seed = start = req.seed + n * req.batch_size
        images = [init] * req.batch_size
        for side in sides:
            images = _grow_one_side(passes, req, args, images, side, seed)
            if images is None:
                yield start, None
                return
        yield start, [(image, passes.first.images[0].infotext) for image in images]



def _check_pixels(args: Args, catalog) -> None:
    if args.pixels % 8:
        raise ScriptError(f"outpainting: pixels must be a multiple of 8 from 8 to 512, got {args.pixels!r}")
    if not args.direction:
        raise ScriptError("outpainting: directions must be some of left, right, up, down, got []")


def _sd_upscale_precheck(ctx, req, args: Args) -> None:
    ctx.engine.upscalers.get(args.upscaler)


SD_UPSCALE = Script(
    "SD upscale", tabs=("img2img",),
    params=(
        Param("overlap", 64, label="Tile overlap", infotext="SD upscale overlap", minimum=0, maximum=256, step=16,
              a1111=1),
        Param("upscaler", "None", label="Upscaler", infotext="SD upscale upscaler", choices="upscalers", a1111=2),
        Param("scale", 2.0, label="Scale Factor", infotext="SD upscale scale", minimum=1.0, maximum=8.0, step=0.05,
              a1111=3),
    ),  # A1111: [info, overlap, upscaler_index, scale_factor]
    run=_sd_upscale, precheck=_sd_upscale_precheck, aliases=("sd-upscale",),
    description="Upscale the init image, then img2img it in overlapping tiles of the request's size.",
)

LOOPBACK = Script(
    "Loopback", tabs=("img2img",),
    params=(
        Param("loops", 4, label="Loops", infotext="Loopback loops", minimum=1, maximum=32, step=1, a1111=0),
        Param("final_denoising_strength", 0.5, infotext="Final denoising strength", minimum=0.0, maximum=1.0,
              step=0.01, a1111=1),
        Param("denoising_curve", "Linear", infotext="Denoising curve", choices=DENOISING_CURVES, a1111=2),
    ),  # A1111: [loops, final_denoising_strength, denoising_curve, append_interrogation]
    run=_loopback, aliases=("loopback",),
    description="Run img2img again on its own output, the denoising strength moving toward the final one.",
)

POOR_MANS_OUTPAINTING = Script(
    "Poor man's outpainting", tabs=("img2img",),
    params=(
        Param("pixels", 128, label="Pixels to expand", infotext="Outpaint pixels", minimum=8, maximum=512, step=8,
              a1111=0),
        Param("mask_blur", 4, label="Mask blur", infotext="Outpaint mask blur", minimum=0, maximum=64, a1111=1),
        Param("inpainting_fill", 1, label="Masked content", infotext="Outpaint masked content",
              choices=tuple((name, i) for i, name in enumerate(MASKED_CONTENT)), a1111=2),
        Param("direction", list(OUTPAINT_DIRECTIONS), label="Outpainting direction", infotext="Outpaint direction",
              choices=OUTPAINT_DIRECTIONS, a1111=3),
    ),  # A1111: [pixels, mask_blur, inpainting_fill, direction]
    run=_outpaint, check=_check_pixels, aliases=("outpainting",),
    description="Grow the canvas by ``pixels`` on the chosen sides and inpaint the new band.",
)

OUTPAINTING_MK2 = Script(
    "Outpainting mk2", tabs=("img2img",),
    params=(
        Param("pixels", 128, label="Pixels to expand", infotext="Outpaint pixels", minimum=8, maximum=512, step=8,
              a1111=1),
        Param("mask_blur", 8, label="Mask blur", infotext="Outpaint mask blur", minimum=0, maximum=64, a1111=2),
        Param("direction", list(OUTPAINT_DIRECTIONS), label="Outpainting direction", infotext="Outpaint direction",
              choices=OUTPAINT_DIRECTIONS, a1111=3),
        Param("noise_q", 1.0, label="Fall-off exponent (lower=higher detail)", infotext="Outpaint fall-off exponent",
              minimum=0.0, maximum=4.0, step=0.01, a1111=4),
        Param("color_variation", 0.05, label="Color variation", infotext="Outpaint color variation", minimum=0.0,
              maximum=1.0, step=0.01, a1111=5),
    ),  # A1111: [info, pixels, mask_blur, direction, noise_q, color_variation]
    run=_outpaint_mk2, check=_check_pixels, aliases=("outpainting-mk2",),
    description="Grow the canvas side by side, each new band filled with noise matched to the picture, then "
                "inpainted.",
)
