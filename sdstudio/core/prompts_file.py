"""Lines of A1111's "Prompts from file or textbox" script: a plain line is a prompt; a line starting with
``--`` sets request fields the way A1111 reads them (``--prompt "a cat" --steps 30 --cfg_scale 7 --seed 5
--sampler_name "Euler a" --width 512``): ``--prompt`` / ``--negative_prompt`` take every word up to the next
option. Errors name the line number."""

from __future__ import annotations

import shlex
from typing import Any

from .names import UnknownNameError, get_sampler


class PromptsFileError(ValueError):
    pass


def _bool(text: str) -> bool:
    return text.strip().lower() == "true"


# A1111 option -> (our request field, conversion)
TAGS: dict[str, tuple[str, Any]] = {
    "sd_model": ("model", str), "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str),
    "styles": ("styles", lambda t: [s.strip() for s in t.split(",") if s.strip()]),
    "seed": ("seed", int), "subseed_strength": ("subseed_strength", float), "subseed": ("subseed", int),
    "seed_resize_from_h": ("seed_resize_from_h", int), "seed_resize_from_w": ("seed_resize_from_w", int),
    "sampler_name": ("sampler_name", str), "batch_size": ("batch_size", int), "n_iter": ("n_iter", int),
    "steps": ("steps", int), "cfg_scale": ("cfg_scale", float), "width": ("width", int), "height": ("height", int),
    "tiling": ("tiling", _bool), "restore_faces": ("restore_faces", _bool),
    "do_not_save_samples": (None, _bool), "do_not_save_grid": (None, _bool), "prompt_for_display": (None, str),
}
REFUSED = {"outpath_samples": "output folders are set by the server, not by a prompt file",
           "outpath_grids": "output folders are set by the server, not by a prompt file",
           "sampler_index": "give the sampler by name: --sampler_name \"Euler a\""}


def parse_line(line: str) -> dict[str, Any]:
    """One ``--option value`` line -> request fields."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise PromptsFileError(f"cannot split it into words ({exc})") from None
    out: dict[str, Any] = {}
    pos = 0
    while pos < len(words):
        word = words[pos]
        if not word.startswith("--"):
            raise PromptsFileError(f"expected an option starting with --, got {word!r}")
        tag = word[2:]
        if pos + 1 >= len(words):
            raise PromptsFileError(f"{word} has no value")
        if tag in REFUSED:
            raise PromptsFileError(f"{word}: {REFUSED[tag]}")
        if tag not in TAGS:
            raise PromptsFileError(f"unknown option {word}; known: {', '.join('--' + t for t in TAGS)}")
        field, convert = TAGS[tag]
        if tag in ("prompt", "negative_prompt"):
            pos += 1
            parts = []
            while pos < len(words) and not words[pos].startswith("--"):
                parts.append(words[pos])
                pos += 1
            value: Any = " ".join(parts)
        else:
            try:
                value = convert(words[pos + 1])
            except ValueError:
                raise PromptsFileError(f"{word}: {words[pos + 1]!r} is not a valid value") from None
            pos += 2
        if tag == "sampler_name":
            try:
                value = get_sampler(value).label
            except UnknownNameError as exc:
                raise PromptsFileError(f"{word}: {exc}") from None
        if field is not None:
            out[field] = value
    return out


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Every non-empty line as request fields; all bad lines reported at once with their numbers."""
    jobs, errors = [], []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("--"):
            try:
                jobs.append(parse_line(line))
            except PromptsFileError as exc:
                errors.append(f"line {number}: {exc}")
        else:
            jobs.append({"prompt": line})
    if errors:
        raise PromptsFileError("; ".join(errors))
    if not jobs:
        raise PromptsFileError("no prompts: every line is empty")
    return jobs
