"""Plug-ins (A1111's "extensions"): finding, loading and reporting them.

A plug-in is a Python module with

- ``SDSTUDIO_API = 1``: the plug-in API version it was written for (:data:`API_VERSION`);
- ``register(api)``: called once with a :class:`PluginAPI`, through which it adds scripts (selectable or
  always-on, with per-step hooks), samplers, schedulers, upscalers, ControlNet preprocessors, localizations and API
  routes. Nothing else is needed, and nothing of sdstudio may be patched;
- optionally ``NAME``, ``VERSION`` and ``DESCRIPTION``.

It is found as the ``sdstudio.plugins`` entry point of an installed package, or as a folder of the data
dir's ``extensions/`` (A1111's place) holding ``sdstudio_plugin.py`` or a package ``__init__.py`` with
``register``. Folders that are A1111 extensions (no ``register``) are listed as not loadable.

A plug-in that fails to import, declares another API version or raises in ``register`` is reported
(:class:`PluginInfo`: the Extensions tab, the log, ``/sdapi/v1/extensions``) and left out; the server and
the other plug-ins go on. One that raises inside a hook fails that job with its name
(:class:`sdstudio.engine.hooks.HookError`) and is reported here too (:meth:`Plugins.report`).

The API is documented in ``docs/plugins.md``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import sys
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from ..core.names import SamplerInfo, ScheduleInfo
from ..core.scripts import Script, ScriptCatalog, builtin

log = logging.getLogger(__name__)

API_VERSION = 1
ENTRY_POINT_GROUP = "sdstudio.plugins"


@dataclass
class PluginInfo:
    """One found plug-in and what became of it."""

    name: str
    origin: str  # "entry point <distribution>" or "extensions folder"
    path: str = ""
    version: str = ""
    description: str = ""
    api: int | None = None
    enabled: bool = True  # the user's choice (config.json's disabled_extensions)
    status: str = "loaded"  # loaded, disabled, failed, not a plug-in
    error: str = ""
    scripts: list[str] = field(default_factory=list)
    samplers: list[str] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    last_error: str = ""  # the last error one of its hooks raised in a job

    def to_a1111(self) -> dict:
        """``/sdapi/v1/extensions``' entry (A1111's fields, plus ours)."""
        return {"name": self.name, "remote": "", "branch": "", "commit_hash": "", "version": self.version,
                "commit_date": 0, "enabled": self.enabled and self.status == "loaded", "status": self.status,
                "error": self.error or self.last_error, "origin": self.origin, "path": self.path,
                "api_version": self.api, "scripts": self.scripts, "samplers": self.samplers}


class PluginAPI:
    """What a plug-in's ``register(api)`` receives: each ``add_*`` records one contribution."""

    version = API_VERSION

    def __init__(self, name: str):
        self.name = name
        self.scripts: list[Script] = []
        self.samplers: list[tuple[SamplerInfo, Callable]] = []
        self.schedulers: list[tuple[ScheduleInfo, Callable]] = []
        self.preprocessors: dict[str, object] = {}  # name -> sdstudio.core.controlnet.Preprocessor
        self.upscalers: dict[str, Callable] = {}
        self.localizations: dict[str, dict[str, str]] = {}
        self.routes: list[Callable] = []

    def add_script(self, script: Script) -> None:
        """A selectable or always-on script (:class:`sdstudio.core.scripts.Script`)."""
        if not isinstance(script, Script):
            raise TypeError(f"add_script takes a sdstudio.core.scripts.Script, got {type(script).__name__}")
        self.scripts.append(dataclasses.replace(script, owner=self.name))

    def add_sampler(self, info: SamplerInfo, function: Callable) -> None:
        """A sampler: its table row and ``function(model, x, sigmas, *, noise, callback, after_step, **options)``
        (the shape of :mod:`sdstudio.engine.samplers`)."""
        self.samplers.append((info, function))

    def add_scheduler(self, info: ScheduleInfo, function: Callable) -> None:
        """A schedule type: ``function(steps, schedule, sdxl) -> sigmas`` (a descending tensor ending in 0)."""
        self.schedulers.append((info, function))

    def add_upscaler(self, name: str, function: Callable) -> None:
        """An upscaler for Hires. fix, Extras and SD upscale: ``function(image, width, height) -> image``
        (a PIL image at about that size; it is resized to exactly that size)."""
        self.upscalers[name] = function

    def add_preprocessor(self, preprocessor) -> None:
        """A ControlNet preprocessor (:class:`sdstudio.core.controlnet.Preprocessor`: its module name, sliders
        and ``run(image, resolution, threshold_a, threshold_b, mask) -> map``, numpy H×W×3 uint8 in and out);
        it appears in the units' preprocessor list, ``/controlnet/module_list`` and ``/controlnet/detect``."""
        from ..core.controlnet import Preprocessor

        if not isinstance(preprocessor, Preprocessor):
            raise TypeError("add_preprocessor takes a sdstudio.core.controlnet.Preprocessor, got "
                            f"{type(preprocessor).__name__}")
        self.preprocessors[preprocessor.name] = dataclasses.replace(preprocessor, owner=self.name)

    def add_localization(self, language: str, strings: dict[str, str]) -> None:
        """UI texts for ``language`` (A1111's localization format: English text -> translation)."""
        self.localizations.setdefault(language, {}).update(strings)

    def add_api_routes(self, factory: Callable) -> None:
        """``factory(service) -> fastapi.APIRouter``: routes mounted on the server (behind --api-auth)."""
        self.routes.append(factory)


@dataclass
class Plugins:
    """The loaded plug-ins and everything they added."""

    infos: list[PluginInfo] = field(default_factory=list)
    catalog: ScriptCatalog = field(default_factory=builtin)
    samplers: list[tuple[SamplerInfo, Callable]] = field(default_factory=list)
    schedulers: list[tuple[ScheduleInfo, Callable]] = field(default_factory=list)
    preprocessors: dict[str, object] = field(default_factory=dict)  # name -> Preprocessor
    upscalers: dict[str, Callable] = field(default_factory=dict)
    localizations: dict[str, dict[str, str]] = field(default_factory=dict)
    routes: list[Callable] = field(default_factory=list)

    def report(self, owner: str, error: str) -> None:
        """A hook of ``owner`` (a script's "Name (plug-in)") failed a job: kept for the Extensions tab."""
        for info in self.infos:
            if owner == info.name or owner.endswith(f"({info.name})"):
                info.last_error = error

    def info(self, name: str) -> PluginInfo | None:
        return next((i for i in self.infos if i.name == name), None)


def _module_from_file(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(f"sdstudio_extension_{name}", path,
                                                  submodule_search_locations=[str(path.parent)]
                                                  if path.name == "__init__.py" else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def discover(extensions_dir: Path | None) -> list[tuple[PluginInfo, Callable[[], object]]]:
    """Every plug-in candidate (not imported yet): installed entry points, then the extensions folders."""
    found: list[tuple[PluginInfo, Callable[[], object]]] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        info = PluginInfo(ep.name, f"entry point {dist.name if dist else ep.value}", ep.value,
                          version=dist.version if dist else "")
        found.append((info, ep.load))
    if extensions_dir is not None and Path(extensions_dir).is_dir():
        for folder in sorted(p for p in Path(extensions_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
            candidates = [folder / "sdstudio_plugin.py", folder / "__init__.py"]
            path = next((c for c in candidates if c.is_file()), None)
            info = PluginInfo(folder.name, "extensions folder", str(folder))
            if path is None:
                info.status, info.enabled = "not a plug-in", False
                info.error = "no sdstudio_plugin.py or __init__.py with register(api) (an A1111 extension?)"
                found.append((info, lambda: None))
                continue
            found.append((info, lambda folder=folder, path=path: _module_from_file(folder.name, path)))
    return found


def load(extensions_dir: Path | None = None, *, disabled: Iterable[str] = (), disable_all: bool = False,
         disable_extra: bool = False, base: ScriptCatalog | None = None) -> Plugins:
    """Load the plug-ins that are enabled. ``disabled`` names the ones the user switched off
    (config.json's ``disabled_extensions``); ``--disable-all-extensions`` / ``--disable-extra-extensions``
    leave every plug-in out (sdstudio ships its own features built in, so both mean every plug-in)."""
    plugins = Plugins(catalog=base or builtin())
    off = set(disabled)
    for info, importer in discover(extensions_dir):
        plugins.infos.append(info)
        if info.status == "not a plug-in":
            continue
        if info.name in off or disable_all or disable_extra:
            info.enabled, info.status = info.name not in off, "disabled"
            continue
        try:
            module = importer()
            wanted = getattr(module, "SDSTUDIO_API", None)
            info.api = wanted
            info.version = str(getattr(module, "VERSION", "") or info.version)
            info.description = str(getattr(module, "DESCRIPTION", "") or (module.__doc__ or "").strip().split("\n")[0])
            if wanted != API_VERSION:
                raise RuntimeError(f"it declares plug-in API version {wanted!r}; this sdstudio has version "
                                   f"{API_VERSION} (set SDSTUDIO_API = {API_VERSION} once it is updated)")
            if not callable(getattr(module, "register", None)):
                raise TypeError("it has no register(api) function")
            api = PluginAPI(info.name)
            module.register(api)
            catalog = plugins.catalog.extended(api.scripts)  # a name clash fails this plug-in only
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is reported; the server goes on
            info.status, info.error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("plug-in %s (%s) failed to load: %s\n%s", info.name, info.path, info.error,
                      traceback.format_exc())
            continue
        plugins.catalog = catalog
        plugins.samplers += api.samplers
        plugins.schedulers += api.schedulers
        plugins.preprocessors.update(api.preprocessors)
        plugins.upscalers.update(api.upscalers)
        for language, strings in api.localizations.items():
            plugins.localizations.setdefault(language, {}).update(strings)
        plugins.routes += api.routes
        info.scripts = [s.name for s in api.scripts]
        info.samplers = [s.label for s, _ in api.samplers]
        info.schedules = [s.label for s, _ in api.schedulers]
        log.info("plug-in %s %s loaded (%s)", info.name, info.version, info.origin)
    return plugins
