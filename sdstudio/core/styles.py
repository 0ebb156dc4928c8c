"""Prompt styles as A1111 keeps them: ``styles.csv`` with ``name,prompt,negative_prompt[,description]``.

A style's text replaces ``{prompt}`` in it with the user's prompt, or, without ``{prompt}``, is joined
after the prompt with ", ". Styles apply in the order given, to the prompt and the negative prompt;
the infotext records the styled prompt, so an image re-creates without the style file.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from .params import RequestError


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


def load(path: Path) -> dict[str, Style]:
    """Styles by name, in file order; a missing file is no styles. Bad rows are skipped."""
    path = Path(path)
    if not path.is_file():
        return {}
    styles: dict[str, Style] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for row in csv.DictReader(f, skipinitialspace=True):
            name = (row.get("name") or "").strip()
            if name:
                styles[name] = Style(name, row.get("prompt") or "", row.get("negative_prompt") or "",
                                     row.get("description") or "")
    return styles


def save(path: Path, styles: dict[str, Style]) -> None:
    """Write all styles (atomically: a crash never leaves half a file)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "prompt", "negative_prompt", "description"])
        for s in styles.values():
            writer.writerow([s.name, s.prompt, s.negative_prompt, s.description])
    os.replace(tmp, path)


def upsert(path: Path, style: Style) -> None:
    """Add or replace one style in the file."""
    current = load(path)
    current[style.name] = style
    save(path, current)


def delete(path: Path, name: str) -> None:
    current = load(path)
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
