"""Draw a training log (``log.csv``) as loss curves, one panel per stage, with Pillow (no plotting library),
and print how long each stage took.

Usage: python -m training.demo_model.plot_log [training/demo_model/log.csv] [--out training/demo_model/log.png]
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from PIL import Image, ImageDraw

from sdstudio.core.grids import font


def smooth(values: list[float], k: int = 50) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def stage_seconds(path: Path, gap: float = 60.0) -> dict[str, float]:
    """Seconds of training per stage: the sum of the times between consecutive logged steps, leaving out
    pauses longer than ``gap`` (a stopped run waiting to be resumed). Steps redone after a resume (from the
    last saved state) count once, at their last run, so the figure is that of an uninterrupted run."""
    per_step: dict[tuple[str, int], float] = {}
    last_time = None
    with path.open() as f:
        for row in csv.DictReader(f):
            t = float(row["time"])
            key = (row["stage"], int(row["step"]))
            if last_time is not None and 0 <= t - last_time <= gap:
                per_step[key] = t - last_time
            else:
                per_step.pop(key, None)
            last_time = t
    totals: dict[str, float] = {}
    for (stage, _), dt in per_step.items():
        totals[stage] = totals.get(stage, 0.0) + dt
    return totals


def draw(path: Path, out: Path) -> Path:
    stages: dict[str, list[float]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            stages.setdefault(row["stage"], []).append(float(row["loss"]))
    w, h, pad = 360, 220, 36
    image = Image.new("RGB", (w * len(stages), h), "white")
    d = ImageDraw.Draw(image)
    face = font(13)
    for n, (stage, losses) in enumerate(stages.items()):
        x0 = n * w
        ys = [math.log10(max(v, 1e-6)) for v in smooth(losses)]
        lo, hi = min(ys), max(ys)
        pts = [(x0 + pad + (w - 2 * pad) * i / max(1, len(ys) - 1),
                h - pad - (h - 2 * pad) * (y - lo) / max(1e-9, hi - lo)) for i, y in enumerate(ys)]
        d.rectangle([x0 + pad, pad, x0 + w - pad, h - pad], outline="#999")
        d.line(pts, fill="#c33", width=2)
        d.text((x0 + pad, 8), f"{stage}: {len(losses)} steps, loss {10 ** ys[0]:.3g} → {10 ** ys[-1]:.3g}", fill="black",
               font=face)
        d.text((x0 + pad, h - pad + 6), "log loss (moving mean of 50)", fill="#555", font=face)
    image.save(out)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", nargs="?", default="training/demo_model/log.csv")
    ap.add_argument("--out", default="training/demo_model/log.png")
    args = ap.parse_args()
    print(draw(Path(args.log), Path(args.out)))
    times = stage_seconds(Path(args.log))
    for stage, seconds in times.items():
        print(f"{stage:>6}: {seconds / 60:6.1f} min")
    print(f"{'all':>6}: {sum(times.values()) / 60:6.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
