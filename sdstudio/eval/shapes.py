"""A procedural world of coloured shapes, with captions: the demo model's training data and the quality
harness's ground truth (PIL and numpy only).

A :class:`Scene` is a background colour (optionally striped) and one to three objects, each with a colour,
a shape, a size and a place. :func:`render` draws it at any size (anti-aliased by drawing 4× larger);
:func:`caption` says it either plainly ("a red circle on a blue background") or richly ("two small green
squares on the left, white background").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "white": (245, 245, 245), "black": (20, 20, 20), "purple": (140, 60, 190), "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.18, "medium": 0.3, "large": 0.45}  # object diameter / picture side
PLACES = {  # centre, as fractions of the picture
    "center": (0.5, 0.5), "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75), "bottom right": (0.75, 0.75),
}
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLACE_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
                 "bottom": "at the bottom", "top left": "in the top left corner", "top right": "in the top right corner",
                 "bottom left": "in the bottom left corner", "bottom right": "in the bottom right corner"}


@dataclass(frozen=True)
class Thing:
    colour: str
    shape: str
    size: str = "medium"
    place: str = "center"


@dataclass(frozen=True)
class Scene:
    background: str
    things: tuple[Thing, ...] = field(default_factory=tuple)
    stripes: bool = False  # the background in stripes of its colour and a lighter shade

    @property
    def main(self) -> Thing:
        return self.things[0]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        return [(cx - r * 0.85, cy - r * 0.85), (cx + r * 0.85, cy - r * 0.85), (cx + r * 0.85, cy + r * 0.85),
                (cx - r * 0.85, cy + r * 0.85)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    points = []
    for i in range(10):  # star: 5 outer, 5 inner points
        a = -math.pi / 2 + i * math.pi / 5
        rr = r if i % 2 == 0 else r * 0.42
        points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return points


def _a(word: str) -> str:
    """``word`` with its article: "a red", "an orange"."""
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


STRIPE_BANDS = 8  # stripe periods across a picture, as the base model's training scenes have them
WIDE_BANDS = 4  # the demo LoRA's stripes: at 128² a band of the default is one latent pixel wide, finer
# than the demo VAE holds (a round trip takes the stripe score from 17.5 to 1.2); these are two


def render(scene: Scene, size: int = 256, bands: int = STRIPE_BANDS) -> Image.Image:
    """The scene as a size×size picture (drawn at 4× and downsampled: smooth edges); a striped
    background has ``bands`` diagonal stripe periods across the picture."""
    big = size * 4
    bg = COLOURS[scene.background]
    im = Image.new("RGB", (big, big), bg)
    draw = ImageDraw.Draw(im)
    if scene.stripes:
        light = tuple(min(255, c + 60) if sum(bg) < 500 else max(0, c - 60) for c in bg)
        step = big // bands
        for i in range(-bands, 2 * bands):
            x = i * step
            draw.polygon([(x, 0), (x + step // 2, 0), (x + step // 2 + big, big), (x + big, big)], fill=light)
    for thing in scene.things:
        cx, cy = (v * big for v in PLACES[thing.place])
        r = SIZES[thing.size] * big / 2
        colour = COLOURS[thing.colour]
        if thing.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        else:
            draw.polygon(_polygon(thing.shape, cx, cy, r), fill=colour)
    return im.resize((size, size), Image.Resampling.LANCZOS)


def caption(scene: Scene, rich: bool = False) -> str:
    """The plain form names the first object and the background; the rich form says every object with its
    size and place, grouping equal ones ("two small red squares")."""
    bg = f"a striped {scene.background} background" if scene.stripes else f"{_a(scene.background)} background"
    if not rich:
        t = scene.main
        return f"{_a(t.colour)} {t.shape} on {bg}"
    groups: dict[tuple[str, str, str], list[Thing]] = {}
    for t in scene.things:
        groups.setdefault((t.size, t.colour, t.shape), []).append(t)
    parts = []
    for (size, colour, shape), items in groups.items():
        n = len(items)
        noun = shape + ("s" if n > 1 else "")
        where = f" {PLACE_PHRASES[items[0].place]}" if n == 1 else ""
        parts.append(f"{COUNT_WORDS[n]} {size} {colour} {noun}{where}")
    return f"{' and '.join(parts)}, {bg.split(' ', 1)[1]}"


def random_scene(rng: np.random.Generator, max_things: int = 1, stripes: float = 0.0) -> Scene:
    """A scene whose objects differ in colour from the background and do not overlap much."""
    colours = list(COLOURS)
    background = colours[rng.integers(len(colours))]
    n = int(rng.integers(1, max_things + 1))
    places = list(PLACES) if n == 1 else ["left", "right", "top left", "top right", "bottom left", "bottom right"]
    chosen = rng.choice(len(places), size=n, replace=False)
    things = []
    for i in range(n):
        colour = background
        while colour == background:
            colour = colours[rng.integers(len(colours))]
        size = list(SIZES)[rng.integers(len(SIZES))] if n == 1 else ["small", "medium"][rng.integers(2)]
        things.append(Thing(colour, SHAPES[rng.integers(len(SHAPES))], size, places[chosen[i]]))
    return Scene(background, tuple(things), bool(rng.random() < stripes))


# ---- where the objects are (ControlNet's harness row) --------------------------------------------------------

def scene_mask(scene: Scene, size: int) -> np.ndarray:
    """Where the scene's objects are (size×size bool): the scene drawn white on black, without stripes."""
    import dataclasses

    flat = dataclasses.replace(scene, background="black", stripes=False,
                               things=tuple(dataclasses.replace(t, colour="white") for t in scene.things))
    return np.asarray(render(flat, size).convert("L")) > 127


def object_mask(picture, threshold: float = 40.0) -> np.ndarray:
    """The pixels of a picture that are not background: farther than ``threshold`` (RGB distance, of 255)
    from the per-channel median colour, which is the background's (objects cover under a quarter of a
    picture). 40 is over half the distance between the world's two closest colours (yellow, orange: 71)."""
    p = np.asarray(picture, dtype=np.float32)[..., :3]
    background = np.median(p.reshape(-1, 3), axis=0)
    return np.linalg.norm(p - background, axis=2) > threshold


def shape_iou(expected: np.ndarray, found: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty: they agree)."""
    a, b = np.asarray(expected, dtype=bool), np.asarray(found, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"shape_iou: masks differ in shape, {a.shape} vs {b.shape}")
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
