"""Scripts as data: one :class:`Script` declaration per script (A1111's "Script" dropdown and its
always-on scripts), from which everything else is made.

A declaration names the script (A1111's title, which ``script_name`` and ``alwayson_scripts`` keys
use), the tabs it appears on, whether it is always on, its parameters (:class:`Param`: type, default,
range or choices, label, infotext key, position in A1111's positional ``script_args``), the X/Y/Z axes it
adds and what runs it: a selectable script's ``run`` orchestrates generation passes above the engine
(:mod:`sdstudio.scripts`); an always-on script's ``hooks`` hand the engine per-step hooks
(:mod:`sdstudio.engine.hooks`). The UI controls, CLI ``--script-arg`` values, API bodies,
``/sdapi/v1/scripts`` and ``/sdapi/v1/script-info``, infotext writing and reading and validation are all
read from the declaration by :class:`ScriptCatalog`.

This module is pure Python: the built-in declarations (:mod:`sdstudio.scripts`) import the engine
only when they run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .errors import RequestError

OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


class ScriptError(RequestError):
    """A bad script name or argument; the message names the script and the argument."""


class Args(dict):
    """A script's checked arguments: a dict (JSON, infotext) that also reads as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


_TRUE = ("true", "1", "yes", "on")
_BOOL_WORDS = _TRUE + ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class Param:
    """One script argument. Its type is its default's (bool, int, float, str or list of str)."""

    name: str  # the key in our ``script_args`` dict, the CLI's ``--script-arg NAME=...``
    default: Any
    label: str = ""  # the UI label (A1111's where it has one)
    infotext: str | None = None  # the infotext key it is written under; None: not written
    infotext_aliases: tuple[str, ...] = ()  # other keys it is read from (other extensions' spellings)
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple | str | None = None  # fixed values, or a list the server knows: "upscalers", "xyz axes"
    a1111: int | None = None  # its position in A1111's positional ``script_args``
    lines: int = 1  # text: rows of the box
    omit_default: bool = False  # infotext: left out while at its default
    help: str = ""
    # a structured value (ControlNet's list of units): parse(value, script) -> its canonical JSON form
    parse: Callable[[Any, str], Any] | None = None

    @property
    def kind(self) -> type:
        return type(self.default)

    @property
    def title(self) -> str:
        return self.label or self.infotext or self.name.replace("_", " ").capitalize()

    def coerce(self, value: Any, script: str) -> Any:
        """``value`` (from JSON, a form, a CLI flag or an infotext) as this parameter's type."""
        kind = self.kind
        if self.parse is not None:
            return self.parse(value, script)
        try:
            if kind is bool:
                if isinstance(value, str):
                    if value.strip().lower() not in _BOOL_WORDS:
                        raise ValueError(f"{value!r} is not true or false")
                    return value.strip().lower() in _TRUE
                return bool(value)
            if kind is int:
                if isinstance(value, bool):
                    return int(value)
                number = float(value)
                if not number.is_integer():
                    raise ValueError(f"{value!r} is not a whole number")
                return int(number)
            if kind is float:
                return float(value)
            if kind is list:
                items = value.split(",") if isinstance(value, str) else list(value)
                return [str(v).strip() for v in items if str(v).strip()]
            return "" if value is None else str(value)
        except (TypeError, ValueError) as exc:
            raise ScriptError(f"{script}: {self.name.replace('_', ' ')}: {exc}") from None

    def check(self, value: Any, script: str) -> None:
        what = self.name.replace("_", " ")
        low, high = self.minimum, self.maximum
        if self.kind in (int, float) and (low is not None and value < low or high is not None and value > high):
            raise ScriptError(f"{script}: {what} must be from {low:g} to {high:g}, got {value!r}")
        if isinstance(self.choices, tuple):
            allowed = [c[1] if isinstance(c, tuple) else c for c in self.choices]
            values = value if isinstance(value, list) else [value]
            if any(v not in allowed for v in values):
                raise ScriptError(f"{script}: {what} must be {'some' if self.kind is list else 'one'} of "
                                  f"{', '.join(map(str, allowed))}, got {value!r}")


@dataclass(frozen=True)
class Script:
    """One script, declared once."""

    name: str  # A1111's title: ``script_name``, ``alwayson_scripts`` keys, the infotext's ``Script``
    params: tuple[Param, ...] = ()
    tabs: tuple[str, ...] = ("txt2img", "img2img")
    alwayson: bool = False
    # selectable scripts: run(ctx, req, args) yields (seed, outputs) per finished output (sdstudio.scripts)
    run: Callable | None = None
    # always-on scripts: hooks(args, req) or hooks(args, req, ctx) -> the engine's per-step hooks for a job
    # (sdstudio.engine.hooks); ctx (sdstudio.scripts.studio.HookContext) gives the engine and takes extra
    # output images (ControlNet's detected maps)
    hooks: Callable | None = None
    # always-on scripts that may make a job as a series of generations (ControlNet's batch tab: one per
    # control picture of a folder): series(args) -> None (the job is one generation, with the hooks) or a
    # run(ctx, req, args) as a selectable script's, whose passes' requests no longer ask for a series
    series: Callable | None = None
    # the server files and folders its arguments name (read or written): server_paths(args) -> {field: path};
    # the API lets a caller from the network name only paths inside the data dir
    server_paths: Callable[[Args], dict[str, str]] | None = None
    enabled: str | None = None  # always-on: the parameter that switches it on (None: on when given)
    check: Callable[[Args, ScriptCatalog], None] | None = None  # checks across parameters (raise ScriptError)
    # precheck(ctx, req, args): against the real models and files, before queueing (always-on scripts too)
    precheck: Callable | None = None
    from_a1111: Callable[[list, dict], dict] | None = None  # a positional list that needs more than positions
    axes: tuple = ()  # X/Y/Z axes it adds (sdstudio.core.xyz.Axis)
    draws_seeds: bool = False  # the runner makes the seeds concrete itself (prompts from file: per line)
    # each unit's request is known without the earlier units' pictures (X/Y/Z cells, prompt-file lines, not
    # Loopback's loops): a job's units may be made on several workers and put together (sdstudio.scripts.studio)
    independent_units: bool = False
    request_fields: bool = False  # its parameters are request fields (A1111's soft inpainting), not script args
    aliases: tuple[str, ...] = ()  # short names for the CLI's --script / --alwayson
    owner: str = "sdstudio"  # sdstudio, or the plug-in that declared it
    description: str = ""
    # infotext beyond one key per parameter (ControlNet's "ControlNet 0", "ControlNet 1"...):
    # write_infotext(args) -> pairs; read_infotext(params) -> (args or None when absent, keys read)
    write_infotext: Callable[[Args], dict] | None = None
    read_infotext: Callable[[dict], tuple[dict | None, set]] | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise ScriptError(f"{self.name}: unknown argument {name!r}; it takes {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def defaults(self) -> Args:
        return Args({p.name: list(p.default) if isinstance(p.default, list) else p.default for p in self.params})

    def is_on(self, args: dict) -> bool:
        return self.enabled is None or bool(args.get(self.enabled))


def padded(args: list, defaults: list) -> list:
    """A1111's positional arguments, the missing trailing ones taking their defaults (extra ones ignored)."""
    args = list(args)[:len(defaults)]
    return args + defaults[len(args):]


class ScriptCatalog:
    """The scripts a server knows (built-in and plug-ins'), looked up by name without regard to case."""

    def __init__(self, scripts: Iterable[Script] = ()):
        self.scripts: dict[str, Script] = {}
        for s in scripts:
            self.add(s)

    def add(self, script: Script) -> None:
        if script.name.lower() in {n.lower() for n in self.scripts}:
            raise ScriptError(f"a script named {script.name!r} is already declared "
                              f"(by {self.get(script.name).owner})")
        self.scripts[script.name] = script

    def extended(self, scripts: Iterable[Script]) -> ScriptCatalog:
        return ScriptCatalog([*self.scripts.values(), *scripts])

    def __iter__(self):
        return iter(self.scripts.values())

    def find(self, name: str) -> Script | None:
        key = name.strip().lower()
        for s in self.scripts.values():
            if s.name.lower() == key or key in (a.lower() for a in s.aliases):
                return s
        return None

    def get(self, name: str, kind: str | None = None, *, alwayson: bool | None = None) -> Script:
        script = self.find(name)
        if script is None or (kind is not None and kind not in script.tabs) or \
                (alwayson is not None and script.alwayson != alwayson):
            available = [s.name for s in self.scripts.values() if (kind is None or kind in s.tabs)
                         and (alwayson is None or s.alwayson == alwayson)]
            what = "always-on script" if alwayson else "script"
            raise ScriptError(f"unknown {kind + ' ' if kind else ''}{what} {name!r}; available: {', '.join(available)}")
        return script

    def names_for(self, kind: str, alwayson: bool = False) -> list[str]:
        return [s.name for s in self.scripts.values() if kind in s.tabs and s.alwayson == alwayson]

    # ---- arguments ----------------------------------------------------------------------------------
    def parse(self, name: str, args: dict[str, Any] | None, kind: str | None = None,
              alwayson: bool | None = None) -> Args:
        """The typed, checked arguments of script ``name`` (defaults for the ones not given)."""
        script = self.get(name, kind, alwayson=alwayson)
        args = dict(args or {})
        unknown = sorted(set(args) - set(script.names))
        if unknown:
            raise ScriptError(f"{script.name}: unknown argument(s) {', '.join(unknown)}; "
                              f"it takes {', '.join(sorted(script.names))}")
        parsed = script.defaults()
        for p in script.params:
            if p.name in args:
                parsed[p.name] = p.coerce(args[p.name], script.name)
            p.check(parsed[p.name], script.name)
        if script.check is not None:
            script.check(parsed, self)
        return parsed

    def from_a1111_list(self, name: str, args: list, context: dict | None = None, kind: str = "img2img") -> dict:
        """A1111's positional ``script_args`` (or an always-on script's ``args``) -> our dict.
        ``context`` holds the lists an index may point into ("upscalers")."""
        script = self.get(name)
        context = {"kind": kind, **(context or {})}
        try:
            if script.from_a1111 is not None:
                values = script.from_a1111(list(args), context)
            else:
                values = {}
                for p in script.params:
                    if p.a1111 is not None and p.a1111 < len(args):
                        values[p.name] = _from_position(p, args[p.a1111], context, script.name)
        except (TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, ScriptError):
                raise
            raise ScriptError(f"{script.name}: cannot read script_args {args!r} ({exc})") from None
        return dict(self.parse(script.name, values))

    def to_a1111_list(self, name: str, args: dict) -> list:
        """Our dict -> the positional list A1111 clients send (positions we do not use get None)."""
        script = self.get(name)
        positions = [p for p in script.params if p.a1111 is not None]
        out: list = [None] * (max((p.a1111 for p in positions), default=-1) + 1)
        parsed = self.parse(script.name, args)
        for p in positions:
            out[p.a1111] = parsed[p.name]
        return out

    # ---- infotext -----------------------------------------------------------------------------------
    def infotext_pairs(self, name: str, args: dict[str, Any]) -> dict[str, object]:
        """The script's infotext pairs: ``Script: name`` for a selectable one, then its arguments."""
        script = self.get(name)
        parsed = self.parse(script.name, args)
        pairs: dict[str, object] = {} if script.alwayson else {"Script": script.name}
        if script.alwayson and not script.is_on(parsed):
            return {}
        if script.write_infotext is not None:
            pairs.update(script.write_infotext(parsed))
            return pairs
        for p in script.params:
            if p.infotext is None:
                continue
            value = parsed[p.name]
            if value in ("", "Nothing") or (p.omit_default or isinstance(value, bool)) and value == p.default:
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            pairs[p.infotext] = ",".join(value) if isinstance(value, list) else value
        return pairs

    def from_infotext_pairs(self, params: dict[str, str]) -> tuple[tuple[str, dict] | None, dict[str, dict], set[str]]:
        """What an infotext says of scripts: (the selectable script and its arguments or None, the always-on
        scripts' arguments by name, the keys read)."""
        used: set[str] = set()
        selectable = None
        script = self.find(params.get("Script", "")) if params.get("Script") else None
        if script is not None and not script.alwayson:
            selectable = (script.name, self._read_keys(script, params, used))
            used.add("Script")
        alwayson = {}
        for s in self.scripts.values():
            if not s.alwayson or s.request_fields:
                continue
            if s.read_infotext is not None:
                args, keys_read = s.read_infotext(params)
                if args is not None:
                    alwayson[s.name] = args
                    used |= set(keys_read)
                continue
            keys = {k for p in s.params if p.infotext for k in (p.infotext, *p.infotext_aliases)}
            switch = s.param(s.enabled) if s.enabled is not None else None
            if switch is not None and switch.infotext:
                present = any(k in params for k in (switch.infotext, *switch.infotext_aliases))
            else:
                present = bool(keys & set(params))
            if present:
                args = self._read_keys(s, params, used)
                if s.enabled is not None:
                    args.setdefault(s.enabled, True)
                alwayson[s.name] = args
        return selectable, alwayson, used

    def _read_keys(self, script: Script, params: dict[str, str], used: set[str]) -> dict:
        args = {}
        for p in script.params:
            key = next((k for k in (p.infotext, *p.infotext_aliases) if k and k in params), None)
            if key is not None:
                args[p.name] = p.coerce(params[key], script.name)
                used.add(key)
        return args

    # ---- the API's listings ---------------------------------------------------------------------------
    def a1111_scripts(self) -> dict[str, list[str]]:
        """``/sdapi/v1/scripts``: selectable scripts per tab, lower-case as A1111 lists them."""
        return {kind: [s.name.lower() for s in self.scripts.values() if kind in s.tabs and not s.alwayson]
                for kind in ("txt2img", "img2img")}

    def a1111_script_info(self, context: dict | None = None) -> list[dict]:
        """``/sdapi/v1/script-info``: A1111's shape, one entry per script and tab, with its arguments."""
        out = []
        for s in self.scripts.values():
            for kind in s.tabs:
                args = []
                for p in sorted((p for p in s.params if p.a1111 is not None), key=lambda p: p.a1111):
                    choices = p.choices
                    if isinstance(choices, str):
                        choices = (context or {}).get(choices)
                    elif isinstance(choices, tuple):
                        choices = [c[0] if isinstance(c, tuple) else c for c in choices]
                    args.append({"label": p.title, "value": p.default, "minimum": p.minimum, "maximum": p.maximum,
                                 "step": p.step, "choices": list(choices) if choices is not None else None})
                out.append({"name": s.name.lower(), "is_alwayson": s.alwayson, "is_img2img": kind == "img2img",
                            "args": args})
        return out

    def axes(self) -> dict:
        """The X/Y/Z axes the scripts add, by label."""
        return {ax.label: ax for s in self.scripts.values() for ax in s.axes}


def _from_position(p: Param, value: Any, context: dict, script: str) -> Any:
    """A positional value: an index into a server list (A1111 sends the upscaler's index), a label of a
    labelled choice (masked content "latent noise" -> 2), or the value itself."""
    if p.choices == "upscalers" and not isinstance(value, str):
        names = context.get("upscalers", [])
        if not 0 <= int(value) < len(names):
            raise ScriptError(f"{script}: upscaler index {value} is out of range (0-{len(names) - 1})")
        return names[int(value)]
    if isinstance(p.choices, tuple) and p.choices and isinstance(p.choices[0], tuple) and isinstance(value, str):
        for label, v in p.choices:
            if label == value:
                return v
    return value


@functools.cache
def builtin() -> ScriptCatalog:
    """The scripts that ship with sdstudio (plug-ins' are added by the server's catalog)."""
    from ..scripts import BUILTIN_SCRIPTS

    return ScriptCatalog(BUILTIN_SCRIPTS)
