"""What the UI and API show about a LoRA / embedding file: alias, trigger words, preferred weight, preview.

Sources, most specific first: A1111's user metadata ``NAME.json`` beside the file (``activation text``,
``preferred weight``, ``notes``), civitai's ``NAME.civitai.info`` (``trainedWords``), and the kohya
training metadata in the safetensors header (``ss_output_name``, ``ss_tag_frequency``: the most frequent
caption tags).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelFileError
from .safe_load import open_safetensors

PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".jpeg", ".webp")


@dataclass
class NetworkInfo:
    name: str
    path: Path
    alias: str
    metadata: dict[str, str] = field(default_factory=dict)
    trigger_words: list[str] = field(default_factory=list)
    preferred_weight: float | None = None
    notes: str = ""
    preview: Path | None = None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def top_tags(tag_frequency: str, n: int = 5) -> list[str]:
    """The ``n`` most frequent tags of kohya's ``ss_tag_frequency`` (``{"folder": {"tag": count}}``)."""
    try:
        folders = json.loads(tag_frequency)
    except ValueError:
        return []
    counts: Counter = Counter()
    for tags in folders.values() if isinstance(folders, dict) else []:
        if isinstance(tags, dict):
            counts.update({str(t).strip(): int(c) for t, c in tags.items() if str(t).strip()})
    return [t for t, _ in counts.most_common(n)]


def preview_of(path: Path) -> Path | None:
    """A model file's preview picture beside it (``NAME.preview.png``, ``NAME.png``...), as A1111 finds it."""
    path = Path(path)
    return next((p for s in PREVIEW_SUFFIXES if (p := path.with_name(path.stem + s)).is_file()), None)


def network_info(path: Path) -> NetworkInfo:
    path = Path(path)
    metadata: dict[str, str] = {}
    if path.suffix.lower() == ".safetensors":
        try:
            metadata = dict(open_safetensors(path).metadata)
        except ModelFileError:
            metadata = {}
    info = NetworkInfo(path.stem, path, metadata.get("ss_output_name") or path.stem, metadata)
    user = _read_json(path.with_suffix(".json"))
    civitai = _read_json(path.with_name(path.stem + ".civitai.info"))
    if user.get("activation text"):
        info.trigger_words = [w.strip() for w in str(user["activation text"]).split(",") if w.strip()]
    elif civitai.get("trainedWords"):
        info.trigger_words = [str(w).strip() for w in civitai["trainedWords"] if str(w).strip()]
    elif "ss_tag_frequency" in metadata:
        info.trigger_words = top_tags(metadata["ss_tag_frequency"])
    try:
        info.preferred_weight = float(user["preferred weight"]) if user.get("preferred weight") else None
    except (TypeError, ValueError):
        info.preferred_weight = None
    info.notes = str(user.get("notes") or "")
    info.preview = preview_of(path)
    return info


def save_user_metadata(path: Path, trigger_words: str, preferred_weight: float | None, notes: str) -> Path:
    """Write the user's card metadata as A1111 does: ``NAME.json`` beside the file ("activation text",
    "preferred weight", "notes"), keeping any other keys already there. Returns the JSON file's path."""
    target = Path(path).with_suffix(".json")
    data = _read_json(target)
    data["activation text"] = trigger_words.strip()
    data["preferred weight"] = float(preferred_weight) if preferred_weight else 0
    data["notes"] = notes.strip()
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
    tmp.replace(target)
    return target
