"""Frames to video and back with imageio-ffmpeg's bundled ffmpeg (no system ffmpeg needed).

Deforum's outputs: ``{timestring}_%09d.png`` frames stitched to an H.264 mp4 (yuv420p, CRF and preset;
the extension's defaults 17 / slow), optionally with a soundtrack, and a GIF. Its video input: a video's
frames extracted every N-th, from / to a frame. ``probe`` reads a video's frame count, fps and size.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..core.errors import BAD_REQUEST, StudioError


class VideoError(StudioError):
    """A video or audio file that cannot be used (missing, unreadable), or ffmpeg failing: the message names
    the file and carries ffmpeg's last lines."""

    kind = BAD_REQUEST


def ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _run(args: list[str], what: str) -> str:
    done = subprocess.run([ffmpeg(), "-hide_banner", *args], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " / ".join(done.stderr.strip().splitlines()[-3:])
        raise VideoError(f"{what}: ffmpeg failed ({tail})")
    return done.stderr


def frame_pattern(folder: str | Path, timestring: str) -> Path:
    return Path(folder) / f"{timestring}_%09d.png"


def stitch(pattern: str | Path, out: str | Path, fps: float, *, start: int = 0, frames: int | None = None,
           crf: int = 17, preset: str = "slow", soundtrack: str | Path | None = None) -> Path:
    """Frames matching ``pattern`` (a printf pattern, from number ``start``) -> an H.264 mp4 at ``fps``.
    A soundtrack is muxed in and cut to the video's length."""
    out = Path(out)
    args = ["-y", "-r", f"{float(fps)}", "-start_number", str(start), "-i", str(pattern)]
    if soundtrack is not None:
        if not Path(soundtrack).is_file():
            raise VideoError(f"soundtrack {soundtrack}: no such file; give the path of an audio file")
        args += ["-i", str(soundtrack), "-map", "0:v", "-map", "1:a", "-c:a", "aac", "-shortest"]
    if frames is not None:
        args += ["-frames:v", str(frames)]
    # even sides: yuv420p needs them (odd sizes would make ffmpeg refuse)
    args += ["-c:v", "libx264", "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-pix_fmt", "yuv420p", "-crf", str(crf),
             "-preset", preset, str(out)]
    _run(args, f"making {out.name}")
    return out


def make_gif(frames: list[Path], out: str | Path, fps: float) -> Path:
    images = [Image.open(f).convert("RGB") for f in frames]
    if not images:
        raise VideoError("no frames to make a GIF of")
    out = Path(out)
    images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return out


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int


def probe(path: str | Path) -> VideoInfo:
    """A video's frame count (decoded, so exact), fps and size."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    text = _run(["-i", str(path), "-map", "0:v:0", "-f", "null", "-"], f"reading {path.name}")
    stream = re.search(r"Stream #\d+:\d+.*Video:.*?(\d{2,5})x(\d{2,5}).*?([\d.]+) fps", text)
    counted = re.findall(r"frame=\s*(\d+)", text)
    if stream is None or not counted:
        raise VideoError(f"{path.name}: not a video ffmpeg can read")
    return VideoInfo(int(counted[-1]), float(stream[3]), int(stream[1]), int(stream[2]))


def extract_frames(video: str | Path, folder: str | Path, *, every: int = 1, start: int = 0, end: int = -1,
                   name: str = "") -> list[Path]:
    """Frames ``start``..``end`` (-1: the last) of ``video``, every ``every``-th, as PNGs ``name%09d.png``
    numbered from 0 (Deforum's video input)."""
    video, folder = Path(video), Path(folder)
    if not video.is_file():
        raise VideoError(f"{video}: no such video file; give the path of a local video")
    folder.mkdir(parents=True, exist_ok=True)
    select = f"gte(n\\,{start})" + (f"*lte(n\\,{end})" if end >= 0 else "") + f"*not(mod(n-{start}\\,{max(every, 1)}))"
    _run(["-y", "-i", str(video), "-vf", f"select='{select}'", "-fps_mode", "vfr", "-start_number", "0",
          str(folder / f"{name}%09d.png")], f"reading frames of {video.name}")
    return sorted(folder.glob(f"{name}[0-9]*.png"))
