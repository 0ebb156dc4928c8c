"""UI languages: A1111's localization files, applied in the browser.

A localization is a JSON object mapping the English text of the page to its translation, the format of
A1111's ``localizations/*.json`` (so its community files work here as they are). The page's script
(``static/sdstudio.js``) fetches the chosen one from ``/sdstudio/localization.json`` and translates text,
placeholders and tooltips as gradio draws them; element ids and values stay English, so page scripts and
the API are unaffected. Ours ship in ``sdstudio/ui/localizations/``; a data dir's ``localizations/``
folder adds or overrides files, as in A1111.

:func:`ui_strings` lists every text a built page shows: a test checks each language covers them all.
"""

from __future__ import annotations

import json
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent / "localizations"

# Texts the page shows that are not in a component's label (progress, queue panel, cards, messages).
DYNAMIC_STRINGS = (
    "Step", "ETA", "In queue", "ahead", "Loading model", "Model loaded", "Waiting", "Interrupted", "Done",
    "Your jobs", "No jobs waiting", "queued", "running", "Job", "Kind", "Status", "Prompt", "Size",
    "Search...", "Sort by", "Name", "Date", "No items", "Generate forever is on", "Copied to the prompt",
    "Settings saved", "Nothing changed", "Images saved to", "No parameters",
)


def _files(data_dir: Path | None) -> dict[str, Path]:
    found = {p.stem: p for p in sorted(PACKAGE_DIR.glob("*.json"))}
    if data_dir is not None and (Path(data_dir) / "localizations").is_dir():
        found.update({p.stem: p for p in sorted((Path(data_dir) / "localizations").glob("*.json"))})
    return found


def available(paths=None) -> list[str]:
    """Language names (file stems) other than English, which is the page's own text."""
    return sorted(name for name in _files(getattr(paths, "data_dir", None)) if name != "en")


def load(name: str, paths=None) -> dict[str, str]:
    """The mapping for ``name`` ("None" or "en": empty). A broken file is an error naming it."""
    if name in ("None", "en", ""):
        return {}
    path = _files(getattr(paths, "data_dir", None)).get(name)
    if path is None:
        raise KeyError(f"no localization named {name!r}; available: {', '.join(available(paths)) or '(none)'}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable localization file ({exc})") from None
    return {str(k): str(v) for k, v in data.items() if isinstance(v, str)}


def ui_strings(blocks) -> set[str]:
    """Every text a built page shows: labels, info lines, placeholders, button and tab texts, Markdown,
    and the choices of radios and of dropdowns marked ``translate-choices``; plus :data:`DYNAMIC_STRINGS`."""
    out = set(DYNAMIC_STRINGS)
    for block in blocks.blocks.values():
        name = type(block).__name__
        for attr in ("label", "info", "placeholder"):
            value = getattr(block, attr, None)
            if isinstance(value, str) and value.strip():
                out.add(value.strip())
        if name in ("Button", "DownloadButton", "UploadButton") and isinstance(getattr(block, "value", None), str):
            out.add(block.value.strip())
        if name == "Markdown" and isinstance(block.value, str):
            out.update(line.strip("#*- ").strip() for line in block.value.splitlines() if line.strip("#*- ").strip())
        if name in ("Radio", "CheckboxGroup") or "translate-choices" in (getattr(block, "elem_classes", None) or []):
            for choice in getattr(block, "choices", None) or []:
                label = choice[0] if isinstance(choice, (tuple, list)) else choice
                if isinstance(label, str) and label.strip():
                    out.add(label.strip())
    return {s for s in out if any(c.isalpha() for c in s) and not _is_name(s)}


def _is_name(text: str) -> bool:
    """Names, not words (left as they are in every language, as A1111's localizations do): samplers,
    schedule types, abbreviations, file formats. Emoji-only buttons have no letters and are skipped too."""
    from ..core.names import sampler_labels, schedule_labels

    return text in sampler_labels() or text in schedule_labels() or text.isupper() or text in ("png", "jpg", "webp")
