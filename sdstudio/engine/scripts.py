"""Running the scripts (:mod:`sdstudio.core.scripts`): each is a series of ordinary generation passes on
the engine, put together the way A1111's script does it.

- X/Y/Z plot: one pass per cell (axes applied X, then Y, then Z; costly axes walked outermost), a labelled
  grid per Z value and a Z grid; every cell's request is checked before the first pass (:func:`precheck`
  does the same for the API before a job queues).
- Prompt matrix: one pass per combination of the ``|`` parts, a grid with on/off labels.
- Prompts from file or textbox: one job per line.

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
pasting it back (with the same init image, for img2img) runs the script again. Scripts run as one job:
the queue does not pause them between passes for other clients, and skip acts on the pass under way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

from ..core import grids, imageops, infotext, scripts, tiles, xyz
from ..core.params import Img2ImgRequest, RequestError, Txt2ImgRequest
from ..models.errors import ModelNotFoundError
from . import img2img as img2img_ops


def _with_script(text: str, req: Txt2ImgRequest, args: dict | None = None) -> str:
    """``text`` with ``Script: …`` and the script's arguments (``args``: instead of the request's)."""
    params = infotext.parse(text)
    version = params.pop("Version", None)
    params.update(scripts.infotext_pairs(req.script_name, req.script_args if args is None else args))
    if version is not None:
        params["Version"] = version
    return infotext.format(params)


class _Passes:
    """Runs a script's inner passes, counting them as the jobs of one progress bar."""

    def __init__(self, engine, total: int, on_progress, should_stop):
        self.engine, self.total, self.done = engine, total, 0
        self.on_progress, self.should_stop = on_progress, should_stop
        self.first = None  # the first pass's result: its infotext describes the script's output

    def run(self, req: Txt2ImgRequest):
        from .generate import Progress

        index = self.done

        def progress(p):
            if self.on_progress is not None:
                self.on_progress(Progress(index, self.total, p.step, p.steps, p.latent, p.sdxl, p.decode))

        result = self.engine.generate(req, on_progress=progress, should_stop=self.should_stop)
        self.done += 1
        if self.first is None:
            self.first = result
        return result


def run(engine, req: Txt2ImgRequest, *, on_progress=None, should_stop: Callable[[], bool] | None = None,
        on_image=None, on_batch=None, keep_images: bool = True):
    """Run ``req``'s script; returns a ``Txt2ImgResult`` of its output images (grids first)."""
    from .generate import GeneratedImage, Txt2ImgResult

    try:
        args = scripts.parse(req.script_name, req.script_args, req.kind)
    except scripts.ScriptError as exc:
        raise RequestError(str(exc)) from None
    runner = RUNNERS[args.name]
    inner = req.replace(script_name="", script_args={})
    if args.name != "Prompts from file or textbox":  # that one draws a seed per line unless told otherwise
        inner = inner.with_concrete_seeds()
    images: list[GeneratedImage] = []
    interrupted = False
    batches = 0
    for seed, outputs in runner(engine, inner, args, on_progress, should_stop):
        if outputs is None:
            interrupted = True
            break
        batch = []
        for item in outputs:  # an inner pass's own image as it is, or (image, first pass's infotext[, "grid"])
            if isinstance(item, GeneratedImage):
                batch.append(item)
                continue
            image, text, *kind = item
            text = text if kind else _with_script(text, req)
            batch.append(GeneratedImage(image, seed, inner.subseed, text, grid=kind == ["grid"]))
        batches += 1
        for g in batch:
            if on_image is not None:
                on_image(g)
        if on_batch is not None:
            on_batch(batches, batch)
        if keep_images:
            images.extend(batch)
    seeds = [g.seed for g in images]
    return Txt2ImgResult(inner, images, seeds, [inner.subseed] * len(seeds), "", "", interrupted,
                         batches_done=batches)


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


# ---- X/Y/Z plot, prompt matrix, prompts from file ----------------------------------------------------
def _confirm(engine, ax: xyz.Axis, values: list, kind: str) -> None:
    """Axis values checked against what exists, before any image is made."""
    from ..core.names import LATENT_UPSCALE_MODES, get_sampler, get_schedule

    if ax.only is not None and ax.only != kind:
        raise RequestError(f"X/Y/Z plot: {ax.label} is a {ax.only} axis")
    for v in values:
        try:
            if ax.choices == "samplers":
                get_sampler(v)
            elif ax.choices == "schedules":
                get_schedule(v)
            elif ax.choices == "checkpoints":
                engine.registry.checkpoint(v)
            elif ax.choices == "vaes" and v not in ("Automatic", "None"):
                engine.registry.vae_for(engine.registry.checkpoint(None), v)
            elif ax.choices == "upscalers" and v not in LATENT_UPSCALE_MODES:
                engine.upscalers.get(v)
        except (ValueError, ModelNotFoundError) as exc:
            raise RequestError(f"X/Y/Z plot: {ax.label} value {v!r}: {exc}") from None


def _xyz_plan(engine, req: Txt2ImgRequest, args: scripts.XYZPlot):
    """Axes, their values, and every cell's checked request in the order they are made."""
    axes = [xyz.axis(kind) for kind, _ in args.axes()]
    values = []
    for ax, (_, text) in zip(axes, args.axes()):
        try:
            values.append(xyz.axis_values(ax, text, args.no_fixed_seeds))
        except xyz.AxisError as exc:
            raise RequestError(f"X/Y/Z plot: {exc}") from None
        _confirm(engine, ax, values[-1], req.kind)
    shape = (len(values[0]), len(values[1]), len(values[2]))

    def cell_request(ix: int, iy: int, iz: int) -> Txt2ImgRequest:
        cell = req
        for ax, vals, i in zip(axes, values, (ix, iy, iz)):  # X, then Y, then Z, as A1111 applies them
            try:
                cell = ax.apply(cell, vals[i], vals)
            except xyz.AxisError as exc:
                raise RequestError(f"X/Y/Z plot: {exc}") from None
        return cell.validate()

    order = xyz.cell_order(shape, tuple(ax.cost for ax in axes))
    return axes, values, shape, order, {c: cell_request(*c) for c in order}  # every cell checked up front


def _xyz(engine, req: Txt2ImgRequest, args: scripts.XYZPlot, on_progress, should_stop):
    axes, values, shape, order, cells = _xyz_plan(engine, req, args)
    passes = _Passes(engine, len(order), on_progress, should_stop)
    made: dict[tuple[int, int, int], object] = {}
    interrupted = False
    for c in order:
        result = passes.run(cells[c])
        if result.images:
            made[c] = result.images
        if result.interrupted:
            interrupted = True
            break
    if not made:
        yield req.seed, None
        return
    size = next(iter(made.values()))[0].image.size
    labels = [[xyz.label(ax, v) for v in vals] for ax, vals in zip(axes, values)]
    sub_grids = []
    for iz in range(shape[2]):
        cells_z = [made.get((ix, iy, iz)) for iy in range(shape[1]) for ix in range(shape[0])]
        grid = grids.plain([c[0].image if c else Image.new("RGB", size) for c in cells_z], shape[0], shape[1])
        if args.draw_legend:
            grid = grids.annotate(grid, *size, [[grids.Label(t)] for t in labels[0]],
                                  [[grids.Label(t)] for t in labels[1]], args.margin_size)
        sub_grids.append(grid)
    drawn = dataclasses.asdict(args)  # the seeds as drawn (-1 made concrete): the grid re-creates this plot
    for ax, vals, attr in zip(axes, values, ("x_values", "y_values", "z_values")):
        if ax.label in ("Seed", "Var. seed") and not args.no_fixed_seeds:
            drawn[attr] = ", ".join(str(v) for v in vals)
    text = _with_script(passes.first.images[0].infotext, req.replace(script_name=args.name), drawn)
    outputs = []
    if shape[2] > 1:
        z_grid = grids.plain(sub_grids, len(sub_grids), 1) if len({g.size for g in sub_grids}) == 1 else sub_grids[0]
        if args.draw_legend:
            z_grid = grids.annotate(z_grid, *sub_grids[0].size, [[grids.Label(t)] for t in labels[2]], [[grids.Label("")]])
        outputs.append((z_grid, text, "grid"))
        if args.include_sub_grids:
            outputs += [(g, text, "grid") for g in sub_grids]
    else:
        outputs.append((sub_grids[0], text, "grid"))
    if args.include_lone_images:
        outputs += [g for c in order if c in made for g in made[c]]
    yield req.seed, outputs
    if interrupted:
        yield req.seed, None


def _prompt_matrix(engine, req: Txt2ImgRequest, args: scripts.PromptMatrix, on_progress, should_stop):
    positive = args.prompt_type == "positive"
    parts = (req.prompt if positive else req.negative_prompt).split("|")
    if len(parts) < 2:
        raise RequestError("Prompt matrix: separate the variable parts of the prompt with | (a cat|in a hat)")
    if len(parts) > 11:
        raise RequestError(f"Prompt matrix: {len(parts) - 1} variable parts make {2 ** (len(parts) - 1)} images; "
                           "at most 10 parts")
    delimiter = ", " if args.variations_delimiter == "comma" else " "
    prompts = []
    for combination in range(2 ** (len(parts) - 1)):
        chosen = [t.strip().strip(",") for n, t in enumerate(parts[1:]) if combination & (1 << n)]
        prompts.append(delimiter.join(chosen + [parts[0]] if args.put_at_start else [parts[0]] + chosen))
    passes = _Passes(engine, len(prompts), on_progress, should_stop)
    images = []
    for i, prompt in enumerate(prompts):
        change = {"prompt": prompt} if positive else {"negative_prompt": prompt}
        result = passes.run(req.replace(**change, seed=req.seed + (i if args.different_seeds else 0), n_iter=1,
                                        batch_size=1).validate())
        if result.interrupted or not result.images:
            yield req.seed, None
            return
        images.append(result.images[0])
    variable = parts[1:]
    boundary = -(-len(variable) // 2)
    cols, rows = 1 << boundary, 1 << (len(variable) - boundary)
    grid = grids.plain([g.image for g in images], cols, rows)
    w, h = images[0].image.size
    columns = [[grids.Label(t.strip(), bool(pos & (1 << i))) for i, t in enumerate(variable[:boundary])]
               for pos in range(cols)]
    row_labels = [[grids.Label(t.strip(), bool(pos & (1 << i))) for i, t in enumerate(variable[boundary:])]
                  for pos in range(rows)]
    grid = grids.annotate(grid, w, h, columns, row_labels, args.margin_size)
    yield req.seed, [(grid, _with_script(images[0].infotext, req.replace(script_name=args.name),
                                         dataclasses.asdict(args)), "grid"),
                     *images]


def _file_jobs(engine, req: Txt2ImgRequest, args: scripts.PromptsFromFile) -> list[Txt2ImgRequest]:
    """One checked request per line."""
    from ..core.prompts_file import parse_lines

    jobs = parse_lines(args.prompt_txt)
    if args.checkbox_iterate or args.checkbox_iterate_batch:
        req = req.with_concrete_seeds()  # one seed for all lines, or the start of the iteration
    requests = []
    seed = req.seed
    for number, fields in enumerate(jobs, 1):
        line = dict(fields)
        for key, base in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if line.get(key) and base:
                line[key] = f"{line[key]} {base}" if args.prompt_position == "start" else f"{base} {line[key]}"
        job = req.replace(**line) if "seed" in line else req.replace(**line, seed=seed)
        try:
            job.validate()
            if job.model:
                engine.registry.checkpoint(job.model)
        except (RequestError, ModelNotFoundError) as exc:
            raise RequestError(f"Prompts from file, line {number}: {exc}") from None
        requests.append(job)
        if args.checkbox_iterate:
            seed += job.batch_size * job.n_iter
    return requests


def _prompts_from_file(engine, req: Txt2ImgRequest, args: scripts.PromptsFromFile, on_progress, should_stop):
    requests = _file_jobs(engine, req, args)
    passes = _Passes(engine, len(requests), on_progress, should_stop)
    for job in requests:
        result = passes.run(job)
        if result.images:
            yield result.images[0].seed, list(result.images)
        if result.interrupted:
            yield job.seed, None
            return


def precheck(engine, req: Txt2ImgRequest) -> None:
    """What a script would refuse, found before it is queued: X/Y/Z values against the real samplers,
    checkpoints, VAEs and upscalers and every cell's request; each prompt-file line's request."""
    if not req.script_name:
        return
    try:
        args = scripts.parse(req.script_name, req.script_args, req.kind)
    except scripts.ScriptError as exc:
        raise RequestError(str(exc)) from None
    inner = req.replace(script_name="", script_args={})
    if isinstance(args, scripts.XYZPlot):
        _xyz_plan(engine, inner, args)
    elif isinstance(args, scripts.PromptsFromFile):
        _file_jobs(engine, inner, args)
    elif isinstance(args, scripts.SDUpscale):
        engine.upscalers.get(args.upscaler)


RUNNERS = {"SD upscale": _sd_upscale, "Loopback": _loopback, "Poor man's outpainting": _outpaint,
           "Outpainting mk2": _outpaint_mk2, "X/Y/Z plot": _xyz, "Prompt matrix": _prompt_matrix,
           "Prompts from file or textbox": _prompts_from_file}
