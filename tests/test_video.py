"""Videos through imageio-ffmpeg's bundled ffmpeg: frames -> mp4 (frame count, fps, size read back),
soundtrack, GIF, frames extracted from a video every N-th."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdstudio.engine import video


def frames(folder, n, size=(64, 48), timestring="20261202000000"):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((size[1], size[0], 3), i * 10 % 255, np.uint8)).save(folder / f"{timestring}_{i:09d}.png")
    return video.frame_pattern(folder, timestring)


def test_frames_to_mp4_and_back(tmp_path):
    out = video.stitch(frames(tmp_path / "f", 24), tmp_path / "a.mp4", fps=15)
    info = video.probe(out)
    assert (info.frames, info.fps, info.width, info.height) == (24, 15.0, 64, 48)
    back = video.extract_frames(out, tmp_path / "in", every=5)
    assert len(back) == 5 and Image.open(back[0]).size == (64, 48)  # frames 0, 5, 10, 15, 20
    grey = [np.asarray(Image.open(p)).mean() for p in back]
    assert grey == sorted(grey)  # the ramp comes back in order
    assert len(video.extract_frames(out, tmp_path / "in2", start=10, end=13)) == 4


def test_start_frames_odd_sizes_and_soundtrack(tmp_path):
    pattern = frames(tmp_path / "f", 10, size=(63, 47))
    info = video.probe(video.stitch(pattern, tmp_path / "b.mp4", fps=10, start=4, crf=30, preset="ultrafast"))
    assert info.frames == 6 and (info.width, info.height) == (64, 48)  # padded to even sides for yuv420p
    wav = tmp_path / "tone.wav"
    import wave
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(8000 * 3) / 5) * 3000).astype("<i2").tobytes())
    with_sound = video.stitch(pattern, tmp_path / "c.mp4", fps=10, soundtrack=wav)
    assert video.probe(with_sound).frames == 10
    with pytest.raises(video.VideoError, match="no such file"):
        video.stitch(pattern, tmp_path / "d.mp4", fps=10, soundtrack=tmp_path / "none.mp3")


def test_gif_and_errors(tmp_path):
    frames(tmp_path / "f", 5)
    files = sorted((tmp_path / "f").glob("*.png"))
    gif = Image.open(video.make_gif(files, tmp_path / "a.gif", fps=10))
    assert gif.n_frames == 5 and gif.info["duration"] == 100
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(video.VideoError, match="bad.mp4"):
        video.probe(tmp_path / "bad.mp4")
    with pytest.raises(video.VideoError, match="no such"):
        video.extract_frames(tmp_path / "missing.mp4", tmp_path / "x")
