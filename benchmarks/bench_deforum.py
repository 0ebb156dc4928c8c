"""Wall time of a Deforum 2D run with diffusion cadence 4 against cadence 1, on the demo model.

With cadence N only every N-th frame is diffused; the frames between are warped and blended, which costs
milliseconds. Goal (issue 20): cadence 4 takes <= 0.35x the time of cadence 1 for the same frames. Both
runs in this process, alternating, median of the repeats; the mp4 is made in both (preset ultrafast).

Usage: python benchmarks/bench_deforum.py [--frames 24] [--steps 10] [--size 128] [--repeats 2]
Writes a line to benchmarks/animation/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import demo_data_root

from sdstudio.core import deforum as spec
from sdstudio.core.paths import Paths
from sdstudio.engine.generate import Engine
from sdstudio.scripts.deforum import DeforumRun
from sdstudio.scripts.studio import Studio

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = demo_data_root(Path(tmp))
        studio = Studio(Engine(Paths(root)))
        times: dict[int, list[float]] = {1: [], 4: []}
        for r in range(a.repeats + 1):  # the first round warms up (model load, allocator)
            for cadence in (1, 4):
                settings = spec.load_settings({"max_frames": a.frames, "diffusion_cadence": cadence, "W": a.size,
                                               "H": a.size, "steps": a.steps, "seed": 1, "zoom": "0:(1.03)"})
                start = time.perf_counter()
                DeforumRun(studio, settings, root, outdir=root / f"c{cadence}-{r}",
                           options={"ffmpeg_preset": "ultrafast"}).run()
                if r:
                    times[cadence].append(time.perf_counter() - start)
    one, four = statistics.median(times[1]), statistics.median(times[4])
    line = (f"| {datetime.date.today()} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
            f"{a.frames} frames {a.size}² {a.steps} steps | cadence 1: {one:.1f} s | cadence 4: {four:.1f} s | "
            f"ratio {four / one:.2f} (goal <= 0.35) |")
    print(line)
    results = ROOT / "benchmarks" / "animation" / "RESULTS.md"
    if not results.exists():
        results.write_text("# Deforum benchmarks\n\n| date | cpu | torch | run | cadence 1 | cadence 4 | ratio |\n"
                           "| --- | --- | --- | --- | --- | --- | --- |\n")
    with results.open("a") as f:
        f.write(line + "\n")


if __name__ == "__main__":
    main()
