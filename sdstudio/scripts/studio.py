"""Running requests with their scripts, above the engine.

The engine generates one request; it knows no script. :class:`Studio` is what UI, API, CLI and the job
service call: it checks the request against its :class:`~sdstudio.core.scripts.ScriptCatalog`, turns the
always-on scripts into the engine's per-step hooks and infotext pairs, and runs a selectable script's
``run`` (X/Y/Z plot, Loopback, a plug-in's...), which makes its images through :meth:`ScriptContext.passes`.

A script's work is a series of *units*, one engine call each (an X/Y/Z cell, a Loopback loop, an SD
upscale tile batch). Between units the studio asks ``should_pause``: a queue pauses a long script so
another client's image goes next. Each finished unit's images are handed to ``on_unit`` (the queue
stores them); resuming runs the script again with those stored ``units``: the finished units are not
recomputed, the script's own code runs the same way, and the outputs already given (``first_batch``)
are not given again, so the result is that of an uninterrupted run.

The same seam splits a script whose units do not depend on each other (``Script.independent_units``: X/Y/Z
cells, prompt-file lines) across workers: :meth:`Studio.count_units` says how many units a request has,
a run with ``unit_range=(start, end)`` makes only those units (the earlier ones, not stored, are blank
stand-ins the script passes over; it stops after the last unit of the range and gives no outputs), and a
run with every unit stored and ``make_units=False`` is the script's own run, computing nothing: its grid
and outputs are those of one uninterrupted run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core import infotext
from ..core.errors import StudioError
from ..core.params import RequestError, Txt2ImgRequest
from ..core.scripts import ScriptCatalog, ScriptError, builtin


class Paused(Exception):
    """Raised between units when the queue wants the worker for someone else."""


class RangeDone(Paused):
    """Raised after the last unit of a run's ``unit_range``: the rest is another worker's."""


class _Counted(Exception):
    def __init__(self, total: int):
        super().__init__(total)
        self.total = total


@dataclass
class UnitResult:
    """A finished unit (from this run or stored by an earlier one): its images, as the engine made them."""

    images: list
    interrupted: bool = False


@dataclass
class ScriptContext:
    """What a script's ``run`` gets besides the request and its arguments."""

    engine: object  # for upscalers, the model registry; generation goes through passes()
    studio: Studio
    on_progress: Callable | None = None
    should_stop: Callable[[], bool] | None = None
    should_skip: Callable[[], bool] | None = None
    should_pause: Callable[[], bool] | None = None
    units: dict[int, UnitResult] = field(default_factory=dict)  # stored units by number
    on_unit: Callable[[int, list], None] | None = None
    unit_no: int = 0  # the next unit's number
    ran: int = 0  # units computed (not replayed) by this run
    unit_range: tuple[int, int] | None = None  # make only these units (a shard of a split job)
    make_units: bool = True  # False: a unit that is not stored is not made (counts as interrupted)
    counting: bool = False  # count_units: stop at the first passes() call

    def passes(self, total: int) -> Passes:
        """A series of ``total`` generation passes shown as the jobs of one progress bar."""
        if self.counting:
            raise _Counted(total)
        return Passes(self, total)

    def with_script(self, text: str, name: str, args: dict) -> str:
        """``text`` (an inner pass's infotext) with ``Script: name`` and the script's arguments."""
        params = infotext.parse(text)
        version = params.pop("Version", None)
        params.update(self.studio.catalog.infotext_pairs(name, args))
        if version is not None:
            params["Version"] = version
        return infotext.format(params)


@dataclass
class HookContext:
    """What an always-on script's ``hooks(args, req, ctx)`` gets besides its arguments: the engine (its model
    registry, devices, ControlNet models) and a place for extra output images (ControlNet's detected maps),
    which come back after the job's own images."""

    engine: object
    extra_images: list = field(default_factory=list)  # (PIL image, label)
    # a script's arguments as it resolved them (ControlNet: -1 resolutions and thresholds -> the values used):
    # the infotext is written from these
    resolved: dict = field(default_factory=dict)


def _takes_context(function) -> bool:
    import inspect

    try:
        params = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= 3


class Passes:
    """A script's inner passes; each is a unit of work (paused before, stored after)."""

    def __init__(self, ctx: ScriptContext, total: int):
        self.ctx, self.total, self.done = ctx, total, 0
        self.first = None  # the first pass's result: its infotext describes the script's output

    def run(self, req: Txt2ImgRequest):
        ctx = self.ctx
        number, index = ctx.unit_no, self.done
        ctx.unit_no += 1
        self.done += 1
        span = ctx.unit_range
        if span is not None and number >= span[1]:
            raise RangeDone
        if number in ctx.units:
            result = ctx.units[number]
        elif span is not None and number < span[0]:
            result = _stand_in(req)  # another worker's unit: the script passes over it to this range
        elif not ctx.make_units or (ctx.should_stop is not None and ctx.should_stop()):
            result = UnitResult([], interrupted=True)
        else:
            if ctx.ran and ctx.should_pause is not None and ctx.should_pause():
                raise Paused

            def progress(p):
                if ctx.on_progress is not None:
                    ctx.on_progress(dataclasses.replace(p, job_no=index, job_count=self.total))

            result = ctx.studio.generate(req, on_progress=progress, should_stop=ctx.should_stop,
                                         should_skip=ctx.should_skip)
            ctx.ran += 1
            if not result.interrupted:
                ctx.units[number] = UnitResult(list(result.images))
                if ctx.on_unit is not None:
                    ctx.on_unit(number, list(result.images))
        if self.first is None:
            self.first = result
        if span is not None and number + 1 >= span[1]:
            raise RangeDone
        return result


def _stand_in(req: Txt2ImgRequest) -> UnitResult:
    """Blank pictures in place of a unit this run does not make (its outputs are not given)."""
    from PIL import Image

    from ..engine.generate import GeneratedImage

    blank = Image.new("RGB", (req.width, req.height))
    return UnitResult([GeneratedImage(blank, req.seed + i, req.subseed, "") for i in range(req.n_iter * req.batch_size)])


class Studio:
    """The engine with scripts: a request in, its images out (see the module's docstring)."""

    def __init__(self, engine, catalog: ScriptCatalog | None = None):
        self.engine = engine
        self.catalog = catalog or builtin()

    # ---- checks -------------------------------------------------------------------------------------
    def validate(self, req: Txt2ImgRequest) -> Txt2ImgRequest:
        """``req`` checked, its always-on scripts under their declared names (a short alias from the CLI is
        fine) and switched on unless their arguments say otherwise."""
        if req.alwayson_scripts:
            named, fields = {}, {}
            for name, args in req.alwayson_scripts.items():
                try:
                    script = self.catalog.get(name, req.kind, alwayson=True)
                    args = dict(args)
                    if script.enabled is not None:
                        args.setdefault(script.enabled, True)
                    if script.request_fields:  # soft inpainting: its arguments are the request's own fields
                        fields.update(self.catalog.parse(script.name, args, req.kind))
                        continue
                except ScriptError as exc:
                    raise RequestError(str(exc)) from None
                named[script.name] = args
            req = req.replace(alwayson_scripts=named, **fields)
        return req.validate(self.catalog)

    def precheck(self, req: Txt2ImgRequest) -> None:
        """What a script would refuse, found before the job queues (X/Y/Z values against the real
        samplers, checkpoints and upscalers; every prompt-file line's request)."""
        req = self.validate(req)
        for script, args in self._alwayson_args(req):
            if script.precheck is not None:
                script.precheck(ScriptContext(self.engine, self), req, args)
        if not req.script_name:
            return
        script = self.catalog.get(req.script_name, req.kind, alwayson=False)
        if script.precheck is not None:
            args = self.catalog.parse(script.name, req.script_args, req.kind)
            script.precheck(ScriptContext(self.engine, self), req.replace(script_name="", script_args={}), args)

    def server_paths(self, req: Txt2ImgRequest) -> dict[str, str]:
        """The server files and folders the always-on scripts of ``req`` (as :meth:`validate` gave it back)
        name (``Script.server_paths``), by field."""
        found: dict[str, str] = {}
        for script, args in self._alwayson_args(req):
            if script.server_paths is not None:
                found.update(script.server_paths(args))
        return found

    def _alwayson_args(self, req: Txt2ImgRequest) -> list[tuple]:
        """(script, parsed arguments) of ``req``'s always-on scripts that are on, in catalog order."""
        out = []
        for script in self.catalog:
            if script.alwayson and not script.request_fields and script.name in req.alwayson_scripts:
                args = self.catalog.parse(script.name, req.alwayson_scripts[script.name], req.kind, alwayson=True)
                if script.is_on(args):
                    out.append((script, args))
        return out

    @staticmethod
    def _series(active: list[tuple]) -> tuple | None:
        """(script, run, args) of the first always-on script (of ``active``: :meth:`_alwayson_args`) that makes
        the job a series (``Script.series``)."""
        for script, args in active:
            run = script.series(args) if script.series is not None else None
            if run is not None:
                return script, run, args
        return None

    def count_units(self, req: Txt2ImgRequest) -> int:
        """How many units ``req``'s script makes (0: no script, or one whose units depend on each other's
        pictures, so they cannot be made apart); nothing is generated."""
        req = self.validate(req)
        if not req.script_name:
            return 0
        script = self.catalog.get(req.script_name, req.kind, alwayson=False)
        if not script.independent_units:
            return 0
        args = self.catalog.parse(script.name, req.script_args, req.kind)
        inner = req.replace(script_name="", script_args={})
        if not script.draws_seeds:
            inner = inner.with_concrete_seeds()
        ctx = ScriptContext(self.engine, self, counting=True)
        try:
            for _ in script.run(ctx, inner, args):
                pass
        except _Counted as counted:
            return counted.total
        return 0

    def alwayson(self, req: Txt2ImgRequest, context: HookContext | None = None, active: list[tuple] | None = None
                 ) -> tuple[list, dict[str, object]]:
        """The per-step hooks and infotext pairs of the request's always-on scripts, in catalog order
        (``active``: their parsed arguments when the caller has them, :meth:`_alwayson_args`)."""
        hooks, pairs = [], {}
        context = context if context is not None else HookContext(self.engine)
        for script, args in active if active is not None else self._alwayson_args(req):
            if script.hooks is not None:
                try:
                    made = list(script.hooks(args, req, context) if _takes_context(script.hooks)
                                else script.hooks(args, req))
                except StudioError:  # already names what is wrong, with its kind (a missing model: not found)
                    raise
                except Exception as exc:
                    raise ScriptError(f"{script.name} ({script.owner}): {type(exc).__name__}: {exc}") from exc
                for hook in made:
                    hook.owner = hook.owner or f"{script.name} ({script.owner})"
                hooks += made
            pairs.update(self.catalog.infotext_pairs(script.name, context.resolved.get(script.name, args)))
        return hooks, pairs

    # ---- running ------------------------------------------------------------------------------------
    def generate(self, req: Txt2ImgRequest, *, on_progress=None, should_stop=None, on_image=None, should_skip=None,
                 should_pause=None, first_batch: int = 0, on_batch=None, keep_images: bool = True,
                 units: dict[int, UnitResult] | None = None, on_unit=None,
                 unit_range: tuple[int, int] | None = None, make_units: bool = True):
        """Generate ``req`` (see :meth:`sdstudio.engine.generate.Engine.generate` for the callbacks). With a
        script, ``units``/``on_unit`` carry its finished units across a pause, ``unit_range`` makes only some
        of them and ``make_units=False`` assembles stored ones (module docstring)."""
        req = self.validate(req)
        try:  # a bad always-on argument fails now, before any pass (parsed only: building a selectable script's
            # hooks here would run their preparation, ControlNet's preprocessors, once more than its passes do)
            active = self._alwayson_args(req)
        except ScriptError as exc:
            raise RequestError(str(exc)) from None
        series = None if req.script_name else self._series(active)
        if series is not None:  # one generation after another (ControlNet's batch tab), each a unit
            ctx = ScriptContext(self.engine, self, on_progress, should_stop, should_skip, should_pause,
                                dict(units or {}), on_unit, make_units=make_units)
            return self._run_script(ctx, req, first_batch, on_image, on_batch, keep_images, series)
        if not req.script_name:
            req = req.with_concrete_seeds()  # hooks see the seeds the images get (ControlNet's shuffle field)
            context = HookContext(self.engine)
            try:
                hooks, pairs = self.alwayson(req, context, active)
            except ScriptError as exc:
                raise RequestError(str(exc)) from None
            result = self.engine.generate(req, on_progress=on_progress, should_stop=should_stop, on_image=on_image,
                                          should_skip=should_skip, should_pause=should_pause, first_batch=first_batch,
                                          on_batch=on_batch, keep_images=keep_images, hooks=hooks,
                                          infotext_extra=pairs)
            return self._with_extras(result, context, on_image, on_batch, keep_images)
        ctx = ScriptContext(self.engine, self, on_progress, should_stop, should_skip, should_pause,
                            dict(units or {}), on_unit, unit_range=unit_range, make_units=make_units)
        return self._run_script(ctx, req, first_batch, on_image, on_batch, keep_images)

    txt2img = generate
    img2img = generate

    @staticmethod
    def _with_extras(result, context: HookContext, on_image, on_batch, keep_images: bool):
        """The hooks' extra images (detected maps) after the job's own, marked ``extra`` (returned and shown,
        not saved as outputs), handed to ``on_image`` and, as one last batch, to ``on_batch``. A paused job
        gives them when it finishes."""
        if not context.extra_images or result.paused or result.interrupted:
            return result
        from ..engine.generate import GeneratedImage

        extras = [GeneratedImage(image, -1, -1, label, extra=True) for image, label in context.extra_images]
        for g in extras:
            if on_image is not None:
                on_image(g)
        if on_batch is not None:
            on_batch(result.batches_done, extras)
        if keep_images:
            result.images.extend(extras)
        return result

    def _run_script(self, ctx: ScriptContext, req: Txt2ImgRequest, first_batch: int, on_image, on_batch,
                    keep_images: bool, series: tuple | None = None):
        """The request's selectable script, or an always-on script's ``series`` (script, run, args)."""
        from ..engine.generate import GeneratedImage, Txt2ImgResult

        if series is not None:
            script, run, args = series
            inner = req.with_concrete_seeds()
        else:
            script = self.catalog.get(req.script_name, req.kind, alwayson=False)
            run, args = script.run, self.catalog.parse(script.name, req.script_args, req.kind)
            inner = req.replace(script_name="", script_args={})
            if not script.draws_seeds:  # prompts from file draws a seed per line unless told otherwise
                inner = inner.with_concrete_seeds()
        images: list = []
        interrupted = paused = False
        batches = 0
        try:
            for seed, outputs in run(ctx, inner, args):
                if outputs is None:
                    interrupted = True
                    break
                batch = []
                for item in outputs:  # an inner pass's own image, or (image, first pass's infotext[, "grid"])
                    if isinstance(item, GeneratedImage):
                        batch.append(item)
                        continue
                    image, text, *kind = item
                    text = text if kind else ctx.with_script(text, script.name, args)
                    batch.append(GeneratedImage(image, seed, inner.subseed, text, grid=kind == ["grid"]))
                batches += 1
                if batches <= first_batch or ctx.unit_range is not None:  # given before a pause; a shard's
                    continue  # outputs are its units
                for g in batch:
                    if on_image is not None:
                        on_image(g)
                if on_batch is not None:
                    on_batch(batches, batch)
                if keep_images:
                    images.extend(batch)
        except Paused:
            paused = True
        seeds = [g.seed for g in images]
        return Txt2ImgResult(inner, images, seeds, [inner.subseed] * len(seeds), "", "", interrupted,
                             batches_done=batches, paused=paused)
