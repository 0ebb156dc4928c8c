"""Labelled image grids (X/Y/Z plot, prompt matrix): cells laid out with optional margins, column labels
on top and row labels on the left, wrapped to fit and shrunk when a word is too long; inactive labels
(a prompt matrix part that is off) drawn grey and struck through. Pure PIL.

Fonts: the first installed font that can draw CJK text (Noto Sans CJK, WenQuanYi, Droid Sans Fallback...),
else DejaVu Sans, else Pillow's built-in font.
"""

from __future__ import annotations

import functools
import glob
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

ACTIVE, INACTIVE = (0, 0, 0), (153, 153, 153)
FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
    "/System/Library/Fonts/PingFang.ttc",
    "C:/Windows/Fonts/msyh.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


@dataclass
class Label:
    text: str
    active: bool = True


@functools.lru_cache(maxsize=1)
def font_path() -> str | None:
    """The font labels are drawn with (None: Pillow's built-in one)."""
    found = [p for p in FONT_CANDIDATES if glob.glob(p)]
    found += sorted(glob.glob("/usr/share/fonts/**/*CJK*.tt[cf]", recursive=True))
    return found[0] if found else None


@functools.lru_cache(maxsize=64)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(1, size)
    path = font_path()
    if path is not None:
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            pass
    return ImageFont.load_default(size)


def _width(draw: ImageDraw.ImageDraw, text: str, fnt) -> float:
    box = draw.textbbox((0, 0), text, font=fnt)
    return box[2] - box[0]


def wrap(draw: ImageDraw.ImageDraw, text: str, fnt, width: float) -> list[str]:
    """Lines of ``text`` no wider than ``width`` (a word longer than that stays whole on its line)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _width(draw, candidate, fnt) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def annotate(grid: Image.Image, cell_w: int, cell_h: int, columns: list[list[Label]], rows: list[list[Label]],
             margin: int = 0) -> Image.Image:
    """``grid`` (cells of ``cell_w`` × ``cell_h``, no margins) with each column's labels above it and each
    row's to its left, and ``margin`` pixels between cells."""
    n_cols, n_rows = grid.width // cell_w, grid.height // cell_h
    if len(columns) != n_cols or len(rows) != n_rows:
        raise ValueError(f"{n_cols}x{n_rows} cells but {len(columns)} column and {len(rows)} row labels")
    size = (cell_w + cell_h) // 25
    spacing = size // 2
    fnt = font(size)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad_left = 0 if not any(label.text for labels in rows for label in labels) else cell_w * 3 // 4

    def layout(labels: list[Label], width: int) -> list[tuple[Label, tuple[float, float]]]:
        out = []
        for label in labels:
            for line in wrap(measure, label.text, fnt, width):
                box = measure.multiline_textbbox((0, 0), line, font=fnt)
                out.append((Label(line, label.active), (box[2] - box[0], box[3] - box[1])))
        return out

    col_lines = [layout(labels, cell_w) for labels in columns]
    row_lines = [layout(labels, pad_left) for labels in rows]

    def height(lines) -> float:
        return sum(s[1] + spacing for _, s in lines) - spacing if lines else 0

    pad_top = 0 if not any(height(c) for c in col_lines) else int(max(height(c) for c in col_lines) + spacing * 2)
    out = Image.new("RGB", (grid.width + pad_left + margin * (n_cols - 1), grid.height + pad_top + margin * (n_rows - 1)),
                    "white")
    for r in range(n_rows):
        for c in range(n_cols):
            cell = grid.crop((c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h))
            out.paste(cell, (pad_left + (cell_w + margin) * c, pad_top + (cell_h + margin) * r))
    draw = ImageDraw.Draw(out)

    def draw_lines(x: float, y: float, lines, allowed: float) -> None:
        for label, (w, h) in lines:
            fsize, f = size, fnt
            while _width(draw, label.text, f) > allowed and fsize > 1:  # shrink what cannot wrap
                fsize -= 1
                f = font(fsize)
            colour = ACTIVE if label.active else INACTIVE
            draw.multiline_text((x, y + h / 2), label.text, font=f, fill=colour, anchor="mm", align="center")
            if not label.active:
                draw.line((x - w // 2, y + h // 2, x + w // 2, y + h // 2), fill=INACTIVE, width=4)
            y += h + spacing

    for c, lines in enumerate(col_lines):
        draw_lines(pad_left + (cell_w + margin) * c + cell_w / 2, pad_top / 2 - height(lines) / 2, lines, cell_w)
    for r, lines in enumerate(row_lines):
        draw_lines(pad_left / 2, pad_top + (cell_h + margin) * r + cell_h / 2 - height(lines) / 2, lines, pad_left)
    return out


def plain(images: list[Image.Image], cols: int, rows: int) -> Image.Image:
    """``images`` (row by row, all of the first one's size; missing ones left black) in a cols × rows grid."""
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        if im is not None:
            grid.paste(im.resize((w, h)) if im.size != (w, h) else im, ((i % cols) * w, (i // cols) * h))
    return grid
