"""Prompt styles as A1111 keeps them: ``styles.csv`` with ``name,prompt,negative_prompt[,description]``.

A style's text replaces ``{prompt}`` in it with the user's prompt, or, without ``{prompt}``, is joined
after the prompt with ", ". Styles apply in the order given, to the prompt and the negative prompt;
the infotext records the styled prompt, so an image re-creates without the style file.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import StudioError
from .params import RequestError


class StylesError(RequestError):
    """A styles file that cannot be read well enough to be rewritten; the message names the file."""


class StylesSaveError(StudioError):
    """The styles file could not be written (a full disk); it is unchanged. A server error (500), not the request's."""


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    description: str = ""


def already_applied(style_text: str, prompt: str) -> bool:
    """True when ``prompt`` already holds this style's text (a pasted, already styled prompt)."""
    if not style_text.strip():
        return True
    if "{prompt}" in style_text:
        before, after = style_text.split("{prompt}", 1)
        return prompt.startswith(before) and prompt.endswith(after.replace("{prompt}", ""))
    return prompt.rstrip().endswith(style_text.strip())


def merge(style_text: str, prompt: str) -> str:
    if already_applied(style_text, prompt):  # style text is applied once, never twice
        return prompt
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(p for p in (prompt.strip(), style_text.strip()) if p)


def load(path: Path, *, strict: bool = False) -> dict[str, Style]:
    """Styles by name, in file order; a missing file is no styles. Bad rows are skipped, bytes that are not
    UTF-8 read as U+FFFD; with ``strict`` (before the file is rewritten) either is a :class:`StylesError`
    naming the file, so what could not be read is never overwritten."""
    path = Path(path)
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if strict:
            raise StylesError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8 before changing "
                              "styles") from None
        text = raw.decode("utf-8-sig", errors="replace")
    styles: dict[str, Style] = {}
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:  # a field over the csv module's size limit
            if strict:
                raise StylesError(f"{path}, line {reader.line_num}: {exc}") from None
            continue
        name = (row.get("name") or "").strip()
        if name:
            styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "",
                                 row.get("description") or "")
    return styles


def save(path: Path, styles: dict[str, Style]) -> None:
    """Write all styles (atomically: a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL)  # quoted, so a field's leading spaces read back
            writer.writerow(["name", "prompt", "negative_prompt", "description"])
            for s in styles.values():
                writer.writerow([s.name, s.prompt, s.negative_prompt, s.description])
    except OSError as exc:  # the disk is full: the old file stays as it was, no half-written copy beside it
        tmp.unlink(missing_ok=True)
        raise StylesSaveError(f"{path}: could not save the styles ({exc.strerror or exc}); the file is unchanged") from None
    os.replace(tmp, path)


def upsert(path: Path, style: Style) -> None:
    """Add or replace one style in the file."""
    current = load(path, strict=True)
    current[style.name] = style
    save(path, current)


def delete(path: Path, name: str) -> None:
    current = load(path, strict=True)
    if name not in current:
        raise RequestError(f"no style named {name!r}; available: {', '.join(current) or '(none)'}")
    del current[name]
    save(path, current)


def apply(prompt: str, negative: str, names: list[str], styles: dict[str, Style]) -> tuple[str, str]:
    for name in names:
        style = styles.get(name)
        if style is None:
            raise RequestError(f"no style named {name!r}; available: {', '.join(styles) or '(none in styles.csv)'}")
        prompt = merge(style.prompt, prompt)
        negative = merge(style.negative_prompt, negative)
    return prompt, negative
