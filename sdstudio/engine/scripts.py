"""Running the img2img scripts (:mod:`sdstudio.core.scripts`): each is a series of ordinary img2img passes
on the engine, put together the way A1111's script does it.

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
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..core import imageops, infotext, scripts, tiles
from ..core.params import Img2ImgRequest, RequestError
from . import img2img as img2img_ops


def _with_script(text: str, req: Img2ImgRequest) -> str:
    params = infotext.parse(text)
    version = params.pop("Version", None)
    params.update(scripts.infotext_pairs(req.script_name, req.script_args))
    if version is not None:
        params["Version"] = version
    return infotext.format(params)


class _Passes:
    """Runs a script's inner passes, counting them as the jobs of one progress bar."""

    def __init__(self, engine, total: int, on_progress, should_stop):
        self.engine, self.total, self.done = engine, total, 0
        self.on_progress, self.should_stop = on_progress, should_stop
        self.first = None  # the first pass's result: its infotext describes the script's output

    def run(self, req: Img2ImgRequest):
        from .txt2img import Progress

        index = self.done

        def progress(p):
            if self.on_progress is not None:
                self.on_progress(Progress(index, self.total, p.step, p.steps, p.latent, p.sdxl))

        result = self.engine.generate(req, on_progress=progress, should_stop=self.should_stop)
        self.done += 1
        if self.first is None:
            self.first = result
        return result


def run(engine, req: Img2ImgRequest, *, on_progress=None, should_stop: Callable[[], bool] | None = None,
        on_image=None, on_batch=None, keep_images: bool = True):
    """Run ``req``'s script; returns a ``Txt2ImgResult`` of its output images."""
    from .txt2img import GeneratedImage, Txt2ImgResult

    args = scripts.parse(req.script_name, req.script_args)
    req = req.with_concrete_seeds()
    inner = req.replace(script_name="", script_args={})
    runner = {"SD upscale": _sd_upscale, "Loopback": _loopback, "Poor man's outpainting": _outpaint,
              "Outpainting mk2": _outpaint_mk2}[args.name]
    images: list[GeneratedImage] = []
    interrupted = False
    batches = 0
    for seed, outputs in runner(engine, inner, args, on_progress, should_stop):
        if outputs is None:
            interrupted = True
            break
        batch = [GeneratedImage(image, seed, req.subseed, _with_script(text, req)) for image, text in outputs]
        batches += 1
        for g in batch:
            if on_image is not None:
                on_image(g)
        if on_batch is not None:
            on_batch(batches, batch)
        if keep_images:
            images.extend(batch)
    seeds = [g.seed for g in images]
    return Txt2ImgResult(req, images, seeds, [req.subseed] * len(seeds), "", "", interrupted, batches_done=batches)


def _sd_upscale(engine, req: Img2ImgRequest, args: scripts.SDUpscale, on_progress, should_stop):
    init = img2img_ops.open_image(req.init_images[0], "init image").convert("RGB")
    if args.upscaler != "None":  # A1111: "None" leaves the picture at its size
        w, h = int(init.width * args.scale) // 8 * 8, int(init.height * args.scale) // 8 * 8
        init = engine.upscalers.upscale(init, w, h, args.upscaler)
    try:
        grid, work = tiles.split(init, req.width, req.height, args.overlap)
    except ValueError as exc:
        raise RequestError(f"SD upscale: {exc}; lower the width/height or raise the scale") from None
    per_batch = req.batch_size
    batches = math.ceil(len(work) / per_batch)
    passes = _Passes(engine, batches * req.n_iter, on_progress, should_stop)
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


def _loopback(engine, req: Img2ImgRequest, args: scripts.Loopback, on_progress, should_stop):
    passes = _Passes(engine, req.n_iter * args.loops, on_progress, should_stop)
    original = img2img_ops.open_image(req.init_images[0], "init image").convert("RGB")
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
                                      denoising_strength=args.strength(req.denoising_strength, loop + 1))
        if req.batch_size > 1:
            yield seed - 1, [history[-1]]


def _outpaint(engine, req: Img2ImgRequest, args: scripts.PoorMansOutpainting, on_progress, should_stop):
    init = img2img_ops.open_image(req.init_images[0], "init image").convert("RGB")
    grow = {d: (args.pixels if d in args.direction else 0) for d in scripts.OUTPAINT_DIRECTIONS}
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
    passes = _Passes(engine, len(todo) * req.n_iter, on_progress, should_stop)
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


def _grow_one_side(engine, passes: _Passes, req: Img2ImgRequest, args: scripts.OutpaintingMk2, images: list, side: str,
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


def _outpaint_mk2(engine, req: Img2ImgRequest, args: scripts.OutpaintingMk2, on_progress, should_stop):
    init = img2img_ops.open_image(req.init_images[0], "init image").convert("RGB")
    sides = [d for d in scripts.OUTPAINT_DIRECTIONS if d in args.direction]
    passes = _Passes(engine, req.n_iter * len(sides), on_progress, should_stop)
    for n in range(req.n_iter):
        seed = start = req.seed + n * req.batch_size
        images = [init] * req.batch_size
        for side in sides:
            images = _grow_one_side(engine, passes, req, args, images, side, seed)
            if images is None:
                yield start, None
                return
        yield start, [(image, passes.first.images[0].infotext) for image in images]
