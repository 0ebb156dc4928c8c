"""Extra-network tags in prompts: ``<lora:name:0.8>``, ``<lora:name:te:unet>``, ``<lora:name:unet=0.5>``.

:func:`extract` removes the tags from a prompt (as A1111 does before encoding) and returns them as
data; the engine decides what each kind does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .params import RequestError

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class NetworkTag:
    kind: str  # "lora", "lyco", "hypernet"...
    name: str
    positional: tuple[str, ...] = ()
    named: dict[str, str] = field(default_factory=dict)

    def number(self, index: int, key: str, default: float) -> float:
        """A numeric argument given by position (after the name) or by ``key=value``."""
        text = self.named.get(key)
        if text is None and len(self.positional) > index:
            text = self.positional[index]
        if text is None:
            return default
        try:
            return float(text)
        except ValueError:
            raise RequestError(f"<{self.kind}:{self.name}:...>: {key} must be a number, got {text!r}") from None


def extract(prompt: str) -> tuple[str, list[NetworkTag]]:
    tags: list[NetworkTag] = []

    def take(m: re.Match) -> str:
        args = m.group(2).split(":")
        positional = tuple(a for a in args[1:] if "=" not in a)
        named = dict(a.split("=", 1) for a in args[1:] if "=" in a)
        tags.append(NetworkTag(m.group(1), args[0], positional, named))
        return ""

    return _TAG.sub(take, prompt), tags


def hypernetwork_uses(tags: list[NetworkTag]) -> list[tuple[str, float]]:
    """``<hypernet:name:strength>`` (strength defaults to 1)."""
    return [(t.name, t.number(0, "strength", 1.0)) for t in tags if t.kind == "hypernet"]


@dataclass(frozen=True)
class LoraUse:
    name: str
    te: float
    unet: float


def lora_uses(tags: list[NetworkTag]) -> list[LoraUse]:
    """A1111's reading of LoRA arguments: ``<lora:n:te[:unet]>``; unet defaults to te; te defaults to 1."""
    uses = []
    for tag in tags:
        if tag.kind not in ("lora", "lyco"):
            continue
        te = tag.number(0, "te", 1.0)
        uses.append(LoraUse(tag.name, te, tag.number(1, "unet", te)))
    return uses
