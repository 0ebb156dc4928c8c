"""Deforum runs end to end on the demo model: frame counts with cadence, the video read back, prompts and
seeds per frame, strength, resume after a pause or a kill with the same frames, Video Input and
Interpolation modes, and clear refusals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdstudio.core import deforum as spec
from sdstudio.core.errors import RequestError
from sdstudio.core.paths import Paths
from sdstudio.engine import video
from sdstudio.engine.generate import Engine
from sdstudio.scripts.deforum import DeforumRun
from sdstudio.scripts.studio import Studio

ROOT = Path(__file__).resolve().parents[1]
BASE = {"max_frames": 7, "diffusion_cadence": 2, "W": 128, "H": 128, "steps": 4, "seed": 5, "sampler": "Euler a",
        "prompts": {"0": "a red circle", "4": "a blue square --neg green"}, "negative_prompts": "blurry", "fps": 10,
        "zoom": "0:(1.05)", "angle": "0:(2)", "ffmpeg_preset": "ultrafast"}


class Recording(Studio):
    """The real studio, keeping the requests it was given (to read prompts, seeds and strengths)."""

    def __init__(self, engine):
        super().__init__(engine)
        self.requests = []

    def generate(self, req, **kw):
        self.requests.append(req)
        return super().generate(req, **kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("deforum")
    (root / "models" / "Stable-diffusion").mkdir(parents=True)
    os.link(ROOT / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors",
            root / "models" / "Stable-diffusion" / "sdstudio-demo.safetensors")
    return Engine(Paths(root))


def run(engine, tmp_path, name="run", **changes):
    studio = Recording(engine)
    kw = {k: changes.pop(k) for k in ("should_pause", "should_stop", "timestring") if k in changes}
    r = DeforumRun(studio, spec.load_settings({**BASE, **changes}), tmp_path, outdir=tmp_path / name,
                   options={"ffmpeg_preset": "ultrafast"}, **kw).run()
    return r, studio.requests


def pixels(paths):
    return [np.asarray(Image.open(p)) for p in paths]


@pytest.mark.parametrize("cadence, diffused", [(1, 7), (2, 4), (3, 3)])
def test_frames_video_and_cadence(engine, tmp_path, cadence, diffused):
    r, requests = run(engine, tmp_path, diffusion_cadence=cadence)
    assert len(requests) == diffused  # frames 0, N, 2N... are diffused; the rest are warped and blended
    assert [p.name for p in r.frames] == [f"{r.timestring}_{i:09d}.png" for i in range(7)]
    info = video.probe(r.video)
    assert (info.frames, info.fps, info.width, info.height) == (7, 10.0, 128, 128)
    assert (r.outdir / f"{r.timestring}_settings.txt").is_file()
    assert not list(r.outdir.glob("*_state*"))  # a finished run leaves no resume state


def test_prompts_seeds_and_strength_per_frame(engine, tmp_path):
    _, requests = run(engine, tmp_path, diffusion_cadence=1, strength_schedule="0:(0.6), 3:(0.3)")
    assert [r.seed for r in requests] == [5, 6, 7, 8, 9, 10, 11]  # seed_behavior iter
    assert requests[0].prompt == "a red circle" and requests[0].negative_prompt == "blurry"
    assert requests[4].prompt == "a blue square" and requests[4].negative_prompt == "green blurry"
    assert type(requests[0]).__name__ == "Txt2ImgRequest"  # nothing to start from: txt2img
    # strength 0.6 at frame 0 falling linearly to 0.3 at frame 3 (then held): the share of the warped frame
    # kept, so img2img denoises 1 - strength
    assert [round(r.denoising_strength, 4) for r in requests[1:]] == [0.5, 0.6, 0.7, 0.7, 0.7, 0.7]


def test_resume_after_a_pause_gives_the_frames_of_an_uninterrupted_run(engine, tmp_path):
    whole, _ = run(engine, tmp_path, "whole")
    calls = []

    def pause():
        calls.append(1)
        return len(calls) >= 2  # after two diffused frames

    first, _ = run(engine, tmp_path, "parts", should_pause=pause)
    assert first.paused and first.video is None and 0 < len(first.frames) < 7
    rest, requests = run(engine, tmp_path, "parts", timestring=first.timestring)
    assert len(requests) == 2  # only the frames not made yet
    assert [np.array_equal(a, b) for a, b in zip(pixels(rest.frames), pixels(whole.frames))] == [True] * 7
    assert video.probe(rest.video).frames == 7


def test_a_killed_run_resumes_from_its_saved_state(engine, tmp_path):
    whole, _ = run(engine, tmp_path, "whole", diffusion_cadence=1)
    def stop():  # checked between frames and at every sampling step: after the third frame is written
        return len(list((tmp_path / "cut").glob("*_0*.png"))) >= 3

    cut, _ = run(engine, tmp_path, "cut", diffusion_cadence=1, should_stop=stop)
    assert cut.interrupted and len(cut.frames) == 3  # interrupt keeps the frames made
    (cut.outdir / f"{cut.timestring}_000000002.png").unlink()  # as if killed after saving the state, not the frame
    again, _ = run(engine, tmp_path, "cut", diffusion_cadence=1, timestring=cut.timestring)
    made = {p.name for p in again.frames}
    assert len(made) == 6 and f"{cut.timestring}_000000002.png" not in made  # the lost frame is reported missing
    for a, b in zip(pixels(p for p in again.frames if not p.name.endswith("02.png")),
                    pixels(p for p in whole.frames if not p.name.endswith("02.png"))):
        assert np.array_equal(a, b)


def test_video_input_and_interpolation_modes(engine, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(6):
        Image.new("RGB", (96, 96), (40 * i, 100, 200 - 30 * i)).save(source / f"v_{i:09d}.png")
    clip = video.stitch(video.frame_pattern(source, "v"), tmp_path / "clip.mp4", 10, preset="ultrafast")
    r, requests = run(engine, tmp_path, "vid", animation_mode="Video Input", video_init_path=str(clip),
                      extract_nth_frame=2, max_frames=10)
    assert len(r.frames) == 3 and len(requests) == 3  # frames 0, 2, 4 of the video, each diffused
    assert all(type(q).__name__ == "Img2ImgRequest" for q in requests)
    r, requests = run(engine, tmp_path, "interp", animation_mode="Interpolation", max_frames=5)
    assert len(r.frames) == 5 and all(type(q).__name__ == "Txt2ImgRequest" for q in requests)
    assert " AND " in requests[2].prompt  # between two prompt keys: a composable blend


def test_refusals_are_clear(engine, tmp_path):
    with pytest.raises(RequestError, match="Deforum's 3D mode needs depth_anything_vitl14"):
        run(engine, tmp_path, "3d", animation_mode="3D", max_frames=2)
    with pytest.raises(RequestError, match="video_init_path"):
        run(engine, tmp_path, "url", animation_mode="Video Input")  # the default is a web URL: never fetched
    with pytest.raises(RequestError, match="zoom"):
        run(engine, tmp_path, "bad", zoom="0:(1.0), 10:(foo)")
    with pytest.raises(RequestError, match="resume_timestring"):
        run(engine, tmp_path, "none", resume_from_timestring=True, resume_timestring="20200101000000")


def test_controlnet_units_per_frame_with_their_schedules(engine, tmp_path):
    (engine.paths.controlnet_dir).mkdir(parents=True, exist_ok=True)
    demo = engine.paths.controlnet_dir / "sdstudio-demo-canny.safetensors"
    if not demo.exists():
        os.link(ROOT / "models" / "ControlNet" / "sdstudio-demo-canny.safetensors", demo)
    engine.registry.refresh()
    source = tmp_path / "edges"
    source.mkdir()
    for i in range(4):
        picture = np.zeros((128, 128, 3), np.uint8)
        picture[20 + 10 * i:70 + 10 * i, 30:90] = 255
        Image.fromarray(picture).save(source / f"e_{i:09d}.png")
    clip = video.stitch(video.frame_pattern(source, "e"), tmp_path / "edges.mp4", 10, preset="ultrafast")
    units = {"cn_1_enabled": True, "cn_1_module": "canny", "cn_1_model": "sdstudio-demo-canny",
             "cn_1_vid_path": str(clip), "cn_1_weight": "0:(1.0), 3:(0.4)", "cn_1_guidance_end": "0:(0.8)",
             "cn_2_enabled": True, "cn_2_loopback_mode": True, "cn_2_module": "none", "cn_2_model": "sdstudio-demo-canny"}
    r, requests = run(engine, tmp_path, "cn", diffusion_cadence=1, max_frames=4, **units)
    assert len(r.frames) == 4
    per_frame = [q.alwayson_scripts["ControlNet"]["units"] for q in requests]
    assert [len(u) for u in per_frame] == [1, 2, 2, 2]  # loopback has no picture on the first frame
    assert [round(u[0]["weight"], 3) for u in per_frame] == [1.0, 0.8, 0.6, 0.4]
    assert all(u[0]["guidance_end"] == 0.8 and u[0]["resize_mode"] == "Inner Fit (Scale to Fit)" for u in per_frame)
    assert len({u[0]["image"] for u in per_frame}) == 4  # each frame its own video frame


def test_optical_flow_cadence(engine, tmp_path):
    plain, _ = run(engine, tmp_path, "plain", diffusion_cadence=3, translation_x="0:(4)")
    flowed, requests = run(engine, tmp_path, "flow", diffusion_cadence=3, translation_x="0:(4)",
                           optical_flow_cadence="DIS Medium")
    assert len(flowed.frames) == 7 and len(requests) == 3
    differs = [not np.array_equal(a, b) for a, b in zip(pixels(flowed.frames), pixels(plain.frames))]
    assert differs[:3] == [False, False, False] and any(differs[3:])  # the first gap has no previous picture


def test_upscaled_and_interpolated_videos(engine, tmp_path):
    r, _ = run(engine, tmp_path, "post", max_frames=4, r_upscale_video=True, r_upscale_factor="x2",
               r_upscale_model="Lanczos", frame_interpolation_engine="RIFE v4.6", frame_interpolation_x_amount=3)
    upscaled, interpolated = r.extra_videos
    info = video.probe(upscaled)
    assert (info.frames, info.width, info.height) == (4, 256, 256)
    info = video.probe(interpolated)
    assert (info.frames, info.fps) == (10, 30.0)  # 3 per frame between 4 frames: 3 * 3 + 1, at 3x the fps
    folder = interpolated.with_suffix("")
    a, mid, b = (np.asarray(Image.open(folder / f"{r.timestring}_{i:09d}.png"), dtype=float) for i in (0, 1, 3))
    assert np.abs(mid - (a * 2 / 3 + b / 3)).max() <= 1  # a blend, as the warning says
    assert any("blending" in w for w in r.warnings)
    with pytest.raises(RequestError, match="r_upscale_model 'realesr-animevideov3': not found"):
        run(engine, tmp_path, "post2", max_frames=2, r_upscale_video=True)


def test_hybrid_video_composite_and_motion(engine, tmp_path):
    source = tmp_path / "moving"
    source.mkdir()
    for i in range(5):
        picture = np.full((128, 128, 3), 30, np.uint8)
        picture[40:80, 10 + 12 * i:50 + 12 * i] = (250, 220, 40)  # a block moving right
        Image.fromarray(picture).save(source / f"m_{i:09d}.png")
    clip = video.stitch(video.frame_pattern(source, "m"), tmp_path / "moving.mp4", 10, preset="ultrafast")
    common = {"diffusion_cadence": 1, "max_frames": 4, "video_init_path": str(clip), "zoom": "0:(1)",
              "angle": "0:(0)"}
    plain, _ = run(engine, tmp_path, "plain", **common)
    mixed, requests = run(engine, tmp_path, "comp", hybrid_composite="Normal", hybrid_comp_alpha_schedule="0:(0.8)",
                          **common)
    assert type(requests[0]).__name__ == "Img2ImgRequest"  # the video's first frame is the first init
    assert not np.array_equal(pixels(mixed.frames)[2], pixels(plain.frames)[2])
    moved, _ = run(engine, tmp_path, "flow", hybrid_motion="Optical Flow", hybrid_flow_method="DIS Medium", **common)
    assert len(moved.frames) == 4
    affine, _ = run(engine, tmp_path, "affine", hybrid_motion="Affine", **common)
    assert len(affine.frames) == 4
    with pytest.raises(RequestError, match="hybrid_flow_method.*RAFT"):
        run(engine, tmp_path, "raft", hybrid_motion="Optical Flow", **common)  # the extension's default needs weights


def test_a_24_frame_2d_animation_to_mp4(engine, tmp_path):
    r, requests = run(engine, tmp_path, "long", max_frames=24, diffusion_cadence=4, translation_x="0:(2)",
                      make_gif=True)
    info = video.probe(r.video)
    assert (info.frames, info.fps, info.width, info.height) == (24, 10.0, 128, 128) and len(requests) == 6
    assert Image.open(r.gif).n_frames == 24


def test_colour_coherence_to_the_video(engine, tmp_path):
    source = tmp_path / "tint"
    source.mkdir()
    for i in range(3):
        Image.new("RGB", (128, 128), (200, 40 + 60 * i, 40)).save(source / f"t_{i:09d}.png")
    clip = video.stitch(video.frame_pattern(source, "t"), tmp_path / "tint.mp4", 10, preset="ultrafast")
    r, _ = run(engine, tmp_path, "vc", diffusion_cadence=1, max_frames=3, color_coherence="Video Input",
               video_init_path=str(clip), hybrid_composite="Normal", hybrid_comp_alpha_schedule="0:(0.1)")
    plain, _ = run(engine, tmp_path, "lab", diffusion_cadence=1, max_frames=3, color_coherence="LAB",
                   video_init_path=str(clip), hybrid_composite="Normal", hybrid_comp_alpha_schedule="0:(0.1)")
    assert not np.array_equal(pixels(r.frames)[2], pixels(plain.frames)[2])


# --- a run made in ranges (a split job's shards), then finished --------------------------------------------

def made_in_ranges(engine, tmp_path, name, ranges, settings):
    """Each range made by its own DeforumRun (as shards on several workers make them), in one folder."""
    parts = []
    for start, end in ranges:
        studio = Recording(engine)
        r = DeforumRun(studio, settings, tmp_path, outdir=tmp_path / name, timestring="20261203000000",
                       frame_range=(start, end)).run()
        assert r.video is None and not r.interrupted and not (r.outdir / r.settings_file.name).exists()
        parts.append((r, studio.requests))
    return parts


def clip_of(tmp_path, frames: int) -> Path:
    source = tmp_path / "src"
    source.mkdir(exist_ok=True)
    for i in range(frames):
        Image.new("RGB", (96, 96), (40 * i, 100, 200 - 30 * i)).save(source / f"v_{i:09d}.png")
    return video.stitch(video.frame_pattern(source, "v"), tmp_path / "clip.mp4", 10, preset="ultrafast")


@pytest.mark.parametrize("mode", ["Interpolation", "Video Input"])
def test_frames_made_in_ranges_then_finished_are_one_runs(engine, tmp_path, mode):
    changes = {"animation_mode": mode, "max_frames": 5, "diffusion_cadence": 1, "color_coherence": "None",
               "steps": 2}
    if mode == "Video Input":  # 6 frames of video, max_frames 10: the video's count wins
        changes.update(video_init_path=str(clip_of(tmp_path, 6)), max_frames=10)
    settings = spec.load_settings({**BASE, **changes})
    assert spec.independent_frames(settings) == changes["max_frames"]
    whole, _ = run(engine, tmp_path, "whole", **changes)
    n = len(whole.frames)
    parts = made_in_ranges(engine, tmp_path, "split", [(0, 2), (2, 4), (4, changes["max_frames"])], settings)
    assert [len(requests) for _, requests in parts] == [2, 2, n - 4]
    assert [p.name for r, _ in parts for p in r.frames] == [p.name.replace(whole.timestring, "20261203000000")
                                                           for p in whole.frames]
    out = tmp_path / "split"
    assert not list(out.glob("*inputframes*"))  # each range's own copy of the video's frames is gone
    again = made_in_ranges(engine, tmp_path, "split", [(1, 3)], settings)
    assert again[0][1] == [] and len(again[0][0].frames) == 2  # frames already there are not made again
    end = DeforumRun(Recording(engine), settings, tmp_path, outdir=out, timestring="20261203000000",
                     options={"ffmpeg_preset": "ultrafast"}).finish(frames=n)
    assert pixels(end.frames) and all(np.array_equal(a, b) for a, b in zip(pixels(end.frames),
                                                                           pixels(whole.frames), strict=True))
    assert video.probe(end.video).frames == n and end.settings_file.is_file()
    (out / "20261203000000_000000001.png").unlink()
    with pytest.raises(RequestError, match=r"frames 1 of 20261203000000 are not in .*shared"):
        DeforumRun(Recording(engine), settings, tmp_path, outdir=out, timestring="20261203000000").finish(frames=n)


def test_only_runs_whose_frames_stand_alone_are_made_in_ranges(engine, tmp_path):
    for changes in ({"animation_mode": "2D"}, {"animation_mode": "3D"},
                    {"animation_mode": "Interpolation", "color_coherence": "LAB"},
                    {"animation_mode": "Video Input", "color_coherence": "HSV"}):
        settings = spec.load_settings({**BASE, **changes})
        assert spec.independent_frames(settings) == 0
        with pytest.raises(RequestError, match="depend on the ones before"):
            DeforumRun(Recording(engine), settings, tmp_path, outdir=tmp_path / "x", frame_range=(0, 2))
    for colour in ("None", "Image", "Video Input"):
        settings = spec.load_settings({**BASE, "animation_mode": "Interpolation", "color_coherence": colour})
        assert spec.independent_frames(settings) == BASE["max_frames"]
