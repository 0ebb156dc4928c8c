"""X/Y/Z plot, Prompt matrix and Prompts from file or textbox: scripts that make many images of one request.

- X/Y/Z plot: one pass per cell (axes applied X, then Y, then Z; costly axes walked outermost), a labelled
  grid per Z value and a Z grid; every cell's request is checked before the first pass (``precheck`` does
  the same for the API before a job queues). Always-on scripts add their own axes.
- Prompt matrix: one pass per combination of the ``|`` parts, a grid with on/off labels.
- Prompts from file or textbox: one job per line.
"""

from __future__ import annotations

from ..core import grids, xyz
from ..core.params import RequestError, Txt2ImgRequest
from ..core.scripts import Args, Param, Script, ScriptCatalog, ScriptError, padded
from ..models.errors import ModelNotFoundError

# A1111 1.10's X/Y/Z axis list, in its order: what an index in a positional ``script_args`` means
# (per tab, the other tab's own axes left out). Axes we do not have are refused by name.
A1111_AXES = (
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps|t", "CFG Scale", "Image CFG Scale|i",
    "Prompt S/R", "Prompt order", "Sampler|t", "Hires sampler|t", "Sampler|i", "Checkpoint name",
    "Negative Guidance minimum sigma", "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type",
    "Schedule min sigma", "Schedule max sigma", "Schedule rho", "Skip Early CFG", "Beta schedule alpha",
    "Beta schedule beta", "Eta", "Clip skip", "Denoising", "Initial noise multiplier", "Extra noise",
    "Hires upscaler|t", "Cond. Image Mask Weight|i", "VAE", "Styles", "UniPC Order", "Face restore",
    "Token merging ratio", "Token merging ratio high-res", "Always discard next-to-last sigma",
    "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at", "RNG source", "FP8 mode", "Size",
)


def a1111_axis_label(value, kind: str) -> str:
    """An axis type as A1111's API sends it (an index into its list for the tab, or the label)."""
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        return value
    tab = "t" if kind == "txt2img" else "i"
    labels = [a.split("|")[0] for a in A1111_AXES if "|" not in a or a.endswith("|" + tab)]
    index = int(value)
    if not 0 <= index < len(labels):
        raise ScriptError(f"X/Y/Z plot: axis type index {index} is out of range (0-{len(labels) - 1})")
    return labels[index]


# ---- X/Y/Z plot ------------------------------------------------------------------------------------
def _xyz_axes(args: Args) -> list[tuple[str, str]]:
    return [(args.x_type, args.x_values), (args.y_type, args.y_values), (args.z_type, args.z_values)]


def _xyz_check(args: Args, catalog: ScriptCatalog) -> None:
    for kind, values in _xyz_axes(args):
        try:
            ax = xyz.axis(kind, catalog.axes())
            if ax.label != "Nothing":
                xyz.axis_values(ax, values, keep_random_seeds=True)  # syntax errors now, axis named
        except xyz.AxisError as exc:
            raise ScriptError(f"X/Y/Z plot: {exc}") from None


def _xyz_from_a1111(a: list, context: dict) -> dict:
    # A1111: [x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values,
    #         z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
    #         vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode]
    a = padded(a, [0, "", [], 0, "", [], 0, "", [], True, False, False, False, False, False, False, 0, False])
    kind = context.get("kind", "txt2img")

    def values(text, dropdown):
        if dropdown and not str(text).strip():
            return ",".join(f'"{v}"' if "," in str(v) else str(v) for v in dropdown)
        return str(text)

    return {"x_type": a1111_axis_label(a[0], kind), "x_values": values(a[1], a[2]),
            "y_type": a1111_axis_label(a[3], kind), "y_values": values(a[4], a[5]),
            "z_type": a1111_axis_label(a[6], kind), "z_values": values(a[7], a[8]),
            "draw_legend": a[9], "include_lone_images": a[10], "include_sub_grids": a[11], "no_fixed_seeds": a[12],
            "margin_size": a[16]}


def _confirm(ctx, ax: xyz.Axis, values: list, kind: str) -> None:
    """Axis values checked against what exists, before any image is made."""
    from ..core.names import LATENT_UPSCALE_MODES, get_sampler, get_schedule

    engine = ctx.engine
    if ax.only is not None and ax.only != kind:
        raise RequestError(f"X/Y/Z plot: {ax.label} is a {ax.only} axis")
    for v in values:
        try:
            if ax.choices == "samplers":
                get_sampler(v)
            elif ax.choices == "schedules":
                get_schedule(v)
            elif ax.choices == "checkpoints" and not (ax.field == "refiner_checkpoint" and v in ("None", "")):
                engine.registry.checkpoint(v)
            elif ax.choices == "vaes" and v not in ("Automatic", "None"):
                engine.registry.vae_for(engine.registry.checkpoint(None), v)
            elif ax.choices == "upscalers" and v not in LATENT_UPSCALE_MODES:
                engine.upscalers.get(v)
            elif ax.choices == "controlnets" and v not in ("None", ""):
                engine.registry.controlnet(v)
            elif ax.choices == "preprocessors":
                engine.controlnets.preprocessors.get(v)
        except (ValueError, ModelNotFoundError, RequestError) as exc:
            raise RequestError(f"X/Y/Z plot: {ax.label} value {v!r}: {exc}") from None


def _xyz_plan(ctx, req: Txt2ImgRequest, args: Args):
    """Axes, their values, and every cell's checked request in the order they are made."""
    import random

    catalog = ctx.studio.catalog
    values, axes = [], []
    # -1 seeds on an axis are drawn from the job's seed: every run of this job (a resume, each worker of a split
    # one) plots the same seeds
    draw = random.Random(f"xyz {req.seed} {req.subseed}")
    for kind, text in _xyz_axes(args):
        try:
            ax = xyz.axis(kind, catalog.axes())
            values.append(xyz.axis_values(ax, text, args.no_fixed_seeds, rng=draw))
        except xyz.AxisError as exc:
            raise RequestError(f"X/Y/Z plot: {exc}") from None
        axes.append(ax)
        _confirm(ctx, ax, values[-1], req.kind)
    shape = (len(values[0]), len(values[1]), len(values[2]))

    def cell_request(ix: int, iy: int, iz: int) -> Txt2ImgRequest:
        cell = req
        for ax, vals, i in zip(axes, values, (ix, iy, iz)):  # X, then Y, then Z, as A1111 applies them
            try:
                cell = ax.apply(cell, vals[i], vals)
            except xyz.AxisError as exc:
                raise RequestError(f"X/Y/Z plot: {exc}") from None
        return cell.validate(catalog)

    order = xyz.cell_order(shape, tuple(ax.cost for ax in axes))
    return axes, values, shape, order, {c: cell_request(*c) for c in order}  # every cell checked up front


def _xyz(ctx, req: Txt2ImgRequest, args: Args):
    from PIL import Image

    axes, values, shape, order, cells = _xyz_plan(ctx, req, args)
    passes = ctx.passes(len(order))
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
    drawn = dict(args)  # the seeds as drawn (-1 made concrete): the grid re-creates this plot
    for ax, vals, attr in zip(axes, values, ("x_values", "y_values", "z_values")):
        if ax.label in ("Seed", "Var. seed") and not args.no_fixed_seeds:
            drawn[attr] = ", ".join(str(v) for v in vals)
    text = ctx.with_script(passes.first.images[0].infotext, XYZ_PLOT.name, drawn)
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


def _xyz_precheck(ctx, req: Txt2ImgRequest, args: Args) -> None:
    _xyz_plan(ctx, req, args)


XYZ_PLOT = Script(
    "X/Y/Z plot",
    params=(
        Param("x_type", "Nothing", infotext="X Type", choices="xyz axes", a1111=0),
        Param("x_values", "", infotext="X Values", lines=6, a1111=1),
        Param("y_type", "Nothing", infotext="Y Type", choices="xyz axes", a1111=3),
        Param("y_values", "", infotext="Y Values", lines=6, a1111=4),
        Param("z_type", "Nothing", infotext="Z Type", choices="xyz axes", a1111=6),
        Param("z_values", "", infotext="Z Values", lines=6, a1111=7),
        Param("draw_legend", True, infotext="XYZ legend", a1111=9),
        Param("include_lone_images", False, infotext="XYZ sub images", a1111=10),
        Param("include_sub_grids", False, infotext="XYZ sub grids", a1111=11),
        Param("no_fixed_seeds", False, infotext="XYZ keep -1 seeds", a1111=12),  # "Keep -1 for seeds"
        Param("margin_size", 0, infotext="XYZ margin", minimum=0, maximum=500, a1111=16, omit_default=True),
    ),
    run=_xyz, check=_xyz_check, precheck=_xyz_precheck, from_a1111=_xyz_from_a1111, aliases=("xyz", "x/y/z"),
    independent_units=True,
    description="A grid of images, one per combination of up to three axes' values.",
)


# ---- Prompt matrix ---------------------------------------------------------------------------------
def _prompt_matrix(ctx, req: Txt2ImgRequest, args: Args):
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
    passes = ctx.passes(len(prompts))
    images = []
    for i, prompt in enumerate(prompts):
        change = {"prompt": prompt} if positive else {"negative_prompt": prompt}
        result = passes.run(req.replace(**change, seed=req.seed + (i if args.different_seeds else 0), n_iter=1,
                                        batch_size=1).validate(ctx.studio.catalog))
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
    yield req.seed, [(grid, ctx.with_script(images[0].infotext, PROMPT_MATRIX.name, args), "grid"), *images]


PROMPT_MATRIX = Script(
    "Prompt matrix",
    params=(
        Param("put_at_start", False, infotext="Matrix variable parts at start", a1111=0),
        Param("different_seeds", False, infotext="Matrix different seeds", a1111=1),
        Param("prompt_type", "positive", infotext="Matrix prompt type", choices=("positive", "negative"), a1111=2),
        Param("variations_delimiter", "comma", infotext="Matrix delimiter", choices=("comma", "space"), a1111=3),
        Param("margin_size", 0, infotext="Matrix margin", minimum=0, maximum=500, a1111=4, omit_default=True),
    ),
    run=_prompt_matrix, aliases=("prompt-matrix",), independent_units=True,
    description="``a cat|in a hat|wearing boots``: every combination of the parts after the first, in a "
                "labelled grid.",
)


# ---- Prompts from file or textbox ------------------------------------------------------------------
def _file_check(args: Args, catalog: ScriptCatalog) -> None:
    from ..core.prompts_file import PromptsFileError, parse_lines

    try:
        parse_lines(args.prompt_txt)
    except PromptsFileError as exc:
        raise ScriptError(f"Prompts from file: {exc}") from None


def _file_jobs(ctx, req: Txt2ImgRequest, args: Args) -> list[Txt2ImgRequest]:
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
            job.validate(ctx.studio.catalog)
            if job.model:
                ctx.engine.registry.checkpoint(job.model)
        except (RequestError, ModelNotFoundError) as exc:
            raise RequestError(f"Prompts from file, line {number}: {exc}") from None
        requests.append(job)
        if args.checkbox_iterate:
            seed += job.batch_size * job.n_iter
    return requests


def _prompts_from_file(ctx, req: Txt2ImgRequest, args: Args):
    requests = _file_jobs(ctx, req, args)
    passes = ctx.passes(len(requests))
    for job in requests:
        result = passes.run(job)
        if result.images:
            yield result.images[0].seed, list(result.images)
        if result.interrupted:
            yield job.seed, None
            return


PROMPTS_FROM_FILE = Script(
    "Prompts from file or textbox",
    params=(
        Param("checkbox_iterate", False, label="Iterate seed every line", a1111=0),
        Param("checkbox_iterate_batch", False, label="Use same random seed for all lines", a1111=1),
        # where the line's prompt goes relative to the request's
        Param("prompt_position", "start", label="Insert prompts at the", choices=("start", "end"), a1111=2),
        Param("prompt_txt", "", label="List of prompt inputs", lines=6, a1111=3),
    ),  # no infotext keys: the lines are the job, not repeated in every image's infotext
    run=_prompts_from_file, check=_file_check, precheck=_file_jobs, draws_seeds=True, aliases=("prompts-from-file",),
    independent_units=True,
    description="One job per line of the text; a line may set fields the A1111 way: "
                '``--steps 30 --prompt "..."``.',
)
