"""Deforum-style animation: a settings file in (the extension's saved settings, as is), frames and a video out.

The run loop follows the extension's ``render.py``: each diffused frame starts from the previous picture
carried by that frame's motion (2D / 3D warp), colour-matched, contrast-scaled, sharpened (anti-blur) and
noised, then sent through img2img at ``1 - strength``; with a cadence of N only every N-th frame is
diffused and the frames between are the previous and next diffused pictures, each carried forward by its
frame's motion, blended by position. Video Input diffuses each extracted video frame; Interpolation makes
every frame by txt2img from the blended prompts. Frames go out as ``{timestring}_%09d.png`` beside the
settings (``{timestring}_settings.txt``), then an mp4 (and a GIF when asked).

Each diffused frame is one generation through the :class:`~sdstudio.scripts.studio.Studio` (so always-on
scripts apply). Between diffused frames the run may stop (interrupt) or pause for the queue; after every
diffused frame the loop's state (the pictures it carries, as lossless PNGs, and the next frame) is written
beside the frames, so a paused, killed or interrupted run resumes where it stopped and makes the same
frames as an uninterrupted one (``resume_from_timestring``).

Where the extension leaves the last gap's in-between frames unwritten (``max_frames`` not a multiple of the
cadence past the last diffused frame), the run writes them, so the video has ``max_frames`` frames.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..core import deforum as spec
from ..core.names import get_sampler
from ..core.params import Img2ImgRequest, RequestError, Txt2ImgRequest
from ..engine import animation, video
from ..models.errors import ModelNotFoundError

log = logging.getLogger(__name__)
STATE = "{timestring}_state.json"
CONTROLNET_UNITS = 5  # the extension's cn_1_ .. cn_5_
MODES = ("None", "2D", "3D", "Video Input", "Interpolation")


@dataclass
class FrameProgress:
    frame: int  # frames written so far
    frames: int  # max_frames
    image: Image.Image | None = None  # the frame just written


@dataclass
class DeforumResult:
    outdir: Path
    timestring: str
    frames: list[Path]
    video: Path | None = None
    gif: Path | None = None
    interrupted: bool = False
    paused: bool = False
    settings_file: Path | None = None
    warnings: list[str] = field(default_factory=list)
    extra_videos: list[Path] = field(default_factory=list)  # the upscaled and the interpolated video


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _png(array: np.ndarray, path: Path) -> None:
    """Written beside and then moved into place: a frame file that exists is whole (a range run skips it)."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(path)


def _base64_png(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class DeforumRun:
    """One animation. ``studio`` generates the diffused frames; ``outputs_dir`` holds ``img2img-images/<batch>``
    as A1111's Deforum writes it, or ``outdir`` is the run's folder itself."""

    def __init__(self, studio, settings: spec.DeforumSettings, outputs_dir: Path, *, outdir: Path | None = None,
                 options: dict | None = None, model: str | None = None, now: float | None = None,
                 timestring: str | None = None, frame_range: tuple[int, int] | None = None,
                 on_frame: Callable[[FrameProgress], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, should_pause: Callable[[], bool] | None = None):
        self.studio, self.s = studio, settings
        self.options = {"ffmpeg_crf": 17, "ffmpeg_preset": "slow", **(options or {})}
        self.model = model
        self.on_frame, self.should_stop, self.should_pause = on_frame, should_stop, should_pause
        if self.s["animation_mode"] not in MODES:
            raise RequestError(f"animation_mode: {self.s['animation_mode']!r} is not one of {', '.join(MODES)}")
        self.seed = spec.fixed_seed(int(self.s["seed"]))
        if int(self.s["seed"]) != self.seed:  # -1 drawn now: the saved settings repeat this run
            self.s = settings = settings.updated({"seed": self.seed})
        self.timestring = timestring or spec.run_timestring(settings, now)
        self.max_frames = 1 if self.s["animation_mode"] == "None" else int(self.s["max_frames"])
        batch = spec.format_batch_name(settings, self.timestring, self.seed)
        self.outdir = Path(outdir) if outdir is not None else Path(outputs_dir) / "img2img-images" / batch
        self.keys = settings.schedules(self.seed)
        self.prompts = spec.prompts_by_frame(settings, self.seed)
        self.seeds = spec.seeds_by_frame(settings, self.seed)
        self.video_frames: list[Path] = []
        self.warnings: list[str] = []
        self._depth_model = None
        self._cn_frames: dict[int, list[Path]] = {}
        self._hybrid: list[Path] | None = None
        self.frame_range = None if frame_range is None else (int(frame_range[0]), int(frame_range[1]))
        if self.frame_range is not None and not spec.independent_frames(self.s):
            raise RequestError(f"frames {self.frame_range[0]}-{self.frame_range[1] - 1} alone: this run's frames "
                               f"depend on the ones before ({self.s['animation_mode']} mode, colour coherence "
                               f"{self.s['color_coherence']}); only Video Input and Interpolation runs without "
                               f"frame-to-frame colour matching are made in ranges")
        # a range run reads its videos into folders of its own (several ranges may run at once)
        self._scratch = "" if self.frame_range is None else f"_{self.frame_range[0]}-{self.frame_range[1]}"
        get_sampler(self.s["sampler"])  # an unknown sampler is said before any frame

    # ---- per-frame values ----------------------------------------------------------------------------
    def key(self, name: str, frame: int) -> float:
        return float(self.keys[name][frame])

    def _motion(self, image: np.ndarray, frame: int) -> np.ndarray:
        mode = self.s["animation_mode"]
        flip = None
        if self.s["enable_perspective_flip"]:
            flip = tuple(self.key(f"perspective_flip_{k}", frame) for k in ("theta", "phi", "gamma", "fv"))
        if mode == "2D":
            return animation.warp_2d(image, angle=self.key("angle", frame), zoom=self.key("zoom", frame),
                                     translation_x=self.key("translation_x", frame),
                                     translation_y=self.key("translation_y", frame),
                                     transform_center_x=self.key("transform_center_x", frame),
                                     transform_center_y=self.key("transform_center_y", frame),
                                     perspective_flip=flip, border=self.s["border"])
        if mode == "3D":
            return animation.warp_3d(
                image, self._depth(image), translation=tuple(self.key(f"translation_{a}", frame) for a in "xyz"),
                rotation_3d=tuple(self.key(f"rotation_3d_{a}", frame) for a in "xyz"),
                fov=self.key("fov_schedule", frame), near=self.key("near_schedule", frame),
                far=self.key("far_schedule", frame), aspect_ratio=self.key("aspect_ratio_schedule", frame),
                depth_algorithm="Depth-Anything", padding_mode=self.s["padding_mode"],
                sampling_mode=self.s["sampling_mode"], perspective_flip=flip, border=self.s["border"])
        return image

    def _depth(self, image: np.ndarray):
        """Depth for the 3D warp from the Depth Anything network (the ControlNet annotator's file)."""
        from ..engine.annotators import depth_anything

        if self._depth_model is None:
            folder = self.studio.engine.paths.annotators_dir
            self._depth_model = depth_anything.load(depth_anything.FILE.locate(folder, "Deforum's 3D mode"))
        depth = depth_anything.detect(self._depth_model, image)
        return np.asarray(depth, dtype=np.float32)[..., 0] if np.asarray(depth).ndim == 3 else np.asarray(depth)

    def _request(self, frame: int, init: np.ndarray | None, strength: float):
        s = self.s
        positive, negative = self.prompts[frame]
        steps = int(self.keys["steps_schedule"][frame]) if s["enable_steps_scheduling"] else int(s["steps"])
        sampler = s["sampler"]
        if s["enable_sampler_scheduling"]:
            sampler = s.string_schedule("sampler_schedule").at(frame)
        fields = {"prompt": positive, "negative_prompt": negative, "seed": self.seeds[frame], "steps": steps,
                  "sampler_name": sampler, "cfg_scale": self.key("cfg_scale_schedule", frame), "width": int(s["W"]),
                  "height": int(s["H"]), "tiling": bool(s["tiling"]), "restore_faces": bool(s["restore_faces"])}
        if s["enable_checkpoint_scheduling"]:
            fields["model"] = s.string_schedule("checkpoint_schedule").at(frame)
        elif self.model:
            fields["model"] = self.model
        if s["enable_clipskip_scheduling"]:
            fields["clip_skip"] = int(self.keys["clipskip_schedule"][frame])
        units = self._controlnet_units(frame, init)
        if units:
            fields["alwayson_scripts"] = {"ControlNet": {"units": units}}
        if init is None:
            return Txt2ImgRequest(**fields)
        noise_multiplier = self.key("noise_multiplier_schedule", frame) if s["enable_noise_multiplier_scheduling"] \
            else 1.0
        # Deforum's strength is how much of the init picture stays; img2img steps scale with 1 - strength
        return Img2ImgRequest(**fields, init_images=[Image.fromarray(init)], denoising_strength=1.0 - strength,
                              initial_noise_multiplier=noise_multiplier, fix_steps=False)

    # ---- ControlNet units per frame (the extension's cn_1_ .. cn_5_ keys) ------------------------------------
    def _controlnet_units(self, frame: int, init: np.ndarray | None) -> list[dict]:
        """Each enabled unit with this frame's weight / guidance start / end and its picture: the frame's
        start picture in loopback mode, else this frame of its video (or its one image)."""
        units = []
        for i in range(1, CONTROLNET_UNITS + 1):
            p = f"cn_{i}_"
            if not self.s.get(p + "enabled"):
                continue
            if self.s.get(p + "loopback_mode"):
                picture = init
            else:
                frames = self._controlnet_frames(i)
                picture = _rgb(Image.open(frames[min(frame, len(frames) - 1)])) if frames else None
            if picture is None:  # loopback on a first frame without an init picture: off for that frame
                continue
            unit = {k: self.s[p + k] for k in ("module", "model", "resize_mode", "control_mode", "low_vram",
                                               "pixel_perfect", "processor_res", "threshold_a", "threshold_b")}
            unit.update(enabled=True, weight=self.key(p + "weight", frame),
                        guidance_start=self.key(p + "guidance_start", frame),
                        guidance_end=self.key(p + "guidance_end", frame), image=_base64_png(picture))
            units.append(unit)
        return units

    def _controlnet_frames(self, unit: int) -> list[Path]:
        if unit not in self._cn_frames:
            path = spec.local_path(self.s, f"cn_{unit}_vid_path")
            if not path:
                raise RequestError(f"cn_{unit}_vid_path: ControlNet unit {unit} is enabled without loopback mode; "
                                   f"give it a local video or image")
            if Path(path).suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
                self._cn_frames[unit] = [Path(path)]
            else:
                self._cn_frames[unit] = video.extract_frames(
                    path, self.outdir / f"controlnet_{unit}_inputframes{self._scratch}")
        return self._cn_frames[unit]

    def _generate(self, frame: int, init: np.ndarray | None, strength: float) -> np.ndarray:
        result = self.studio.generate(self._request(frame, init, strength),
                                      should_stop=self.should_stop)
        self.warnings += [w for w in result.warnings if w not in self.warnings]
        if result.interrupted or not result.images:
            raise _Stopped
        return _rgb(result.images[0].image)

    # ---- output -------------------------------------------------------------------------------------
    def _write(self, frame: int, image: np.ndarray) -> None:
        path = self.outdir / spec.frame_filename(self.timestring, frame)
        _png(image, path)
        if self.on_frame is not None:
            self.on_frame(FrameProgress(frame + 1, self.max_frames, Image.fromarray(image)))

    def _save_state(self, state: dict, images: dict[str, np.ndarray | None]) -> None:
        for name, image in images.items():
            path = self.outdir / f"{self.timestring}_state_{name}.png"
            if image is None:
                path.unlink(missing_ok=True)
            else:
                _png(image, path)
        state["images"] = [n for n, im in images.items() if im is not None]
        tmp = self.outdir / (STATE.format(timestring=self.timestring) + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.outdir / STATE.format(timestring=self.timestring))  # atomic: a kill never half-writes it

    def _load_state(self) -> tuple[dict, dict[str, np.ndarray | None]] | None:
        path = self.outdir / STATE.format(timestring=self.timestring)
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        images = {name: _rgb(Image.open(self.outdir / f"{self.timestring}_state_{name}.png"))
                  for name in state.get("images", [])}
        return state, images

    # ---- the loop -----------------------------------------------------------------------------------
    def run(self) -> DeforumResult:
        if self.frame_range is not None:
            return self._run_range(*self.frame_range)
        s = self.s
        self.outdir.mkdir(parents=True, exist_ok=True)
        settings_file = self.outdir / spec.settings_filename(self.timestring)
        settings_file.write_text(s.to_json())
        spec.check_files(s)  # a used web URL: "put the file here and give its path"
        if s["r_upscale_video"]:
            self._upscaler()
        mode = s["animation_mode"]
        cadence = 1 if mode in ("Video Input", "Interpolation", "None") else max(1, int(s["diffusion_cadence"]))
        inputs = self._video_inputs() if mode == "Video Input" else None
        state = {"frame": 0, "turbo_prev_frame": 0, "turbo_next_frame": 0}
        pics: dict[str, np.ndarray | None] = {"prev": None, "turbo_prev": None, "turbo_next": None, "color": None}
        stored = self._load_state()
        if stored is not None:
            state.update(stored[0])
            pics.update({k: stored[1].get(k) for k in pics})
        elif s["resume_from_timestring"]:
            raise RequestError(f"resume_timestring {self.timestring}: no saved run state in {self.outdir}")
        pics["color"] = pics["color"] if pics["color"] is not None else self._color_reference()
        result = DeforumResult(self.outdir, self.timestring, [], settings_file=settings_file)
        diffused = 0
        try:
            while state["frame"] < self.max_frames:
                frame = state["frame"]
                if self.should_stop is not None and self.should_stop():
                    result.interrupted = True
                    break
                if diffused and self.should_pause is not None and self.should_pause():
                    result.paused = True
                    break
                if cadence > 1:
                    self._tweens(state, pics, frame, cadence)
                if s["color_coherence"] == "Video Input" and mode in ("2D", "3D") and \
                        frame % max(1, int(s["color_coherence_video_every_N_frames"])) == 0:
                    pics["color"] = self._video_frame(frame)  # the video's colours, every N frames
                init, strength = self._init(frame, pics, inputs)
                image = self._generate(frame, init, strength)
                image = self._after_generation(image, frame, pics, init is not None, strength)
                if mode != "Video Input":
                    pics["prev"] = image
                if cadence > 1:
                    pics["turbo_prev"], state["turbo_prev_frame"] = pics["turbo_next"], state["turbo_next_frame"]
                    pics["turbo_next"], state["turbo_next_frame"] = image, frame
                    state["frame"] = frame + cadence
                else:
                    self._write(frame, image)
                    state["frame"] = frame + 1
                diffused += 1
                self._save_state(state, pics)
            else:
                if cadence > 1 and pics["turbo_next"] is not None:  # the last gap, which the extension drops
                    self._tweens(state, pics, state["turbo_next_frame"] + cadence, cadence)
                    self._save_state(state, pics)
        except _Stopped:
            result.interrupted = True
        result.frames = sorted(self.outdir.glob(f"{self.timestring}_[0-9]*.png"))
        result.warnings = self.warnings
        if not (result.interrupted or result.paused):
            self._finish(result)
        return result

    def _run_range(self, start: int, end: int) -> DeforumResult:
        """Frames ``start`` .. ``end - 1`` only (a shard of a split run; :func:`spec.independent_frames`): each
        made as the whole run makes it, a frame whose file is there already skipped (made before a pause or
        by a shard whose worker died); ``should_pause`` is asked after each frame made. No video, no saved
        state: :meth:`finish` makes the video once every range is done."""
        s = self.s
        self.outdir.mkdir(parents=True, exist_ok=True)
        spec.check_files(s)
        inputs = self._video_inputs() if s["animation_mode"] == "Video Input" else None
        pics: dict[str, np.ndarray | None] = {"prev": None, "turbo_prev": None, "turbo_next": None,
                                              "color": self._color_reference()}
        result = DeforumResult(self.outdir, self.timestring, [], settings_file=self.outdir /
                               spec.settings_filename(self.timestring))
        made, frames = 0, range(start, min(end, self.max_frames))
        try:
            for frame in frames:
                if self.should_stop is not None and self.should_stop():
                    result.interrupted = True
                    break
                if made and self.should_pause is not None and self.should_pause():
                    result.paused = True  # another client's turn; the frames on disk are kept
                    break
                if (self.outdir / spec.frame_filename(self.timestring, frame)).is_file():
                    if self.on_frame is not None:
                        self.on_frame(FrameProgress(frame + 1, self.max_frames, None))
                    continue
                init, strength = self._init(frame, pics, inputs)
                image = self._generate(frame, init, strength)
                self._write(frame, self._after_generation(image, frame, pics, init is not None, strength))
                made += 1
        except _Stopped:
            result.interrupted = True
        finally:
            for folder in self.outdir.glob(f"*inputframes{self._scratch}"):
                shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(self.outdir / f"hybridframes{self._scratch}", ignore_errors=True)
        paths = (self.outdir / spec.frame_filename(self.timestring, f) for f in frames)
        result.frames = [p for p in paths if p.is_file()]
        result.warnings = self.warnings
        return result

    def finish(self, frames: int | None = None) -> DeforumResult:
        """The end of a run made in ranges: its settings file, then the video (and GIF, upscaled and
        interpolated videos) from every frame in the folder, as a whole run ends. ``frames``: how many the
        ranges made (Video Input: the video's count, which the ranges read), else ``max_frames``. A frame
        missing (a folder the workers do not share) is an error naming it."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        settings_file = self.outdir / spec.settings_filename(self.timestring)
        settings_file.write_text(self.s.to_json())
        paths = sorted(self.outdir.glob(f"{self.timestring}_[0-9]*.png"))
        made = {int(p.stem.rsplit("_", 1)[1]) for p in paths}
        expected = self.max_frames if frames is None else min(int(frames), self.max_frames)
        missing = sorted(set(range(expected)) - made)
        if missing:
            shown = ", ".join(map(str, missing[:8])) + (" …" if len(missing) > 8 else "")
            raise RequestError(f"frames {shown} of {self.timestring} are not in {self.outdir}: a run split across "
                               f"workers needs its output folder shared by them and this server")
        if self.s["r_upscale_video"]:
            self._upscaler()  # a missing upscaler is said before the video is made
        result = DeforumResult(self.outdir, self.timestring, paths, settings_file=settings_file)
        self._finish(result)
        result.warnings = self.warnings
        return result

    def _tweens(self, state: dict, pics: dict, frame: int, cadence: int) -> None:
        """The in-between frames before ``frame`` (render.py's cadence loop), written up to max_frames. With
        optical-flow cadence the gap's flow between the two diffused pictures (halved, as the extension
        does) moves them towards each other, the flow field carried by each frame's motion."""
        start = max(0, frame - cadence)
        method = self.s["optical_flow_cadence"]
        flow = None
        if method != "None" and self.s["animation_mode"] == "2D" and pics["turbo_prev"] is not None \
                and self.key("strength_schedule", start) > 0:
            flow = _flow(pics["turbo_prev"], pics["turbo_next"], method, "optical_flow_cadence") / 2
            pics["turbo_next"] = animation.warp_by_flow(pics["turbo_next"], -flow)
        for t in range(start, min(frame, self.max_frames)):
            tween = (t - start + 1) / (frame - start)
            advance_prev = pics["turbo_prev"] is not None and t > state["turbo_prev_frame"]
            advance_next = t > state["turbo_next_frame"]
            if advance_prev:
                pics["turbo_prev"] = self._motion(pics["turbo_prev"], t)
            if advance_next:
                pics["turbo_next"] = self._motion(pics["turbo_next"], t)
            if t > 0 and self.s["hybrid_motion"] != "None":
                if advance_prev:
                    pics["turbo_prev"] = self._hybrid_motion(pics["turbo_prev"], t)
                if advance_next:
                    pics["turbo_next"] = self._hybrid_motion(pics["turbo_next"], t)
            if flow is not None:
                flow = self._motion(flow, t)  # the warps keep float fields as they are (no clamping)
                factor = self.key("cadence_flow_factor_schedule", t)
                if advance_prev:
                    pics["turbo_prev"] = animation.warp_by_flow(pics["turbo_prev"], flow * tween, factor)
                if advance_next:
                    pics["turbo_next"] = animation.warp_by_flow(pics["turbo_next"], flow * tween, factor)
            state["turbo_prev_frame"] = state["turbo_next_frame"] = t
            image = animation.blend(pics["turbo_prev"], pics["turbo_next"], tween) \
                if pics["turbo_prev"] is not None and tween < 1.0 else pics["turbo_next"].copy()
            pics["prev"] = image
            self._write(t, image)

    def _init(self, frame: int, pics: dict, inputs: list[Path] | None) -> tuple[np.ndarray | None, float]:
        """The picture this frame starts from and its strength (render.py, before ``generate``)."""
        s = self.s
        strength = min(1.0, max(0.0, self.key("strength_schedule", frame)))
        if inputs is not None:  # Video Input: this frame of the video
            return _rgb(Image.open(inputs[min(frame, len(inputs) - 1)]).resize((int(s["W"]), int(s["H"])),
                                                                               Image.LANCZOS)), strength
        if pics["prev"] is not None and s["animation_mode"] in ("2D", "3D"):
            prev = self._motion(pics["prev"], frame)
            if s["hybrid_composite"] == "Before Motion":
                prev = self._hybrid_composite(prev, frame)
            prev = self._hybrid_motion(prev, frame)
            if s["hybrid_composite"] == "Normal":
                prev = self._hybrid_composite(prev, frame)
            mode = s["color_coherence"]
            if mode != "None":
                if pics["color"] is None:
                    pics["color"] = prev.copy()
                else:
                    prev = animation.match_colors(prev, pics["color"], mode)
            image = animation.contrast(prev, self.key("contrast_schedule", frame))
            amount = self.key("amount_schedule", frame)
            if amount > 0:
                image = animation.unsharp(image, amount, int(self.key("kernel_schedule", frame)),
                                          self.key("sigma_schedule", frame), self.key("threshold_schedule", frame))
            image = animation.add_noise(image, self.key("noise_schedule", frame), seed=self.seeds[frame],
                                        noise_type=s["noise_type"], perlin_w=s["perlin_w"], perlin_h=s["perlin_h"],
                                        octaves=int(s["perlin_octaves"]), persistence=s["perlin_persistence"])
            return image, strength
        hybrid = s["hybrid_composite"] != "None" or s["hybrid_motion"] != "None"
        if frame == 0 and hybrid and s["hybrid_use_first_frame_as_init_image"] and not s["use_init"]:
            return self._video_frame(0), min(1.0, max(0.0, float(s["strength"])))
        if frame == 0 and s["use_init"]:
            path = spec.local_path(s, "init_image")
            if path:
                init = Image.open(path).convert("RGB").resize((int(s["W"]), int(s["H"])), Image.LANCZOS)
                return _rgb(init), min(1.0, max(0.0, float(s["strength"])))
        return None, strength

    def _after_generation(self, image: np.ndarray, frame: int, pics: dict, had_init: bool, strength: float):
        """Colour matching after generation and the choice of the colour reference (render.py)."""
        s, mode = self.s, self.s["color_coherence"]
        if frame > 0 and s["hybrid_composite"] == "After Generation" and s["animation_mode"] in ("2D", "3D"):
            image = self._hybrid_composite(image, frame)
        legacy = bool(s["legacy_colormatch"])
        first_to_reference = frame == 0 and mode in ("Image", "Video Input")
        if pics["color"] is not None and (first_to_reference or (mode != "None" and not legacy)):
            image = animation.match_colors(image, pics["color"], mode)
        if ((not legacy and not had_init) or (legacy and strength == 0)) and mode not in ("Image", "Video Input"):
            pics["color"] = image.copy()
        return image

    # ---- hybrid video ---------------------------------------------------------------------------------
    def _hybrid_frames(self) -> list[Path]:
        if self._hybrid is None:
            path = spec.local_path(self.s, "video_init_path")
            if not path:
                raise RequestError("hybrid video: give video_init_path (a local video file)")
            s = self.s
            self._hybrid = video.extract_frames(path, self.outdir / f"hybridframes{self._scratch}",
                                                every=int(s["extract_nth_frame"]),
                                                start=int(s["extract_from_frame"]), end=int(s["extract_to_frame"]))
            if not self._hybrid:
                raise RequestError(f"video_init_path {path}: no frames in the range asked for")
        return self._hybrid

    def _video_frame(self, frame: int) -> np.ndarray:
        frames, s = self._hybrid_frames(), self.s
        return _rgb(Image.open(frames[min(frame, len(frames) - 1)]).resize((int(s["W"]), int(s["H"])), Image.LANCZOS))

    def _hybrid_composite(self, image: np.ndarray, frame: int) -> np.ndarray:
        s = self.s
        if s["hybrid_use_init_image"]:
            path = spec.local_path(s, "init_image")
            other = _rgb(Image.open(path).resize((int(s["W"]), int(s["H"])), Image.LANCZOS))
        else:
            other = self._video_frame(frame)
        return animation.hybrid_blend(image, other, self.key("hybrid_comp_alpha_schedule", frame),
                                      s["hybrid_comp_mask_type"], self.key("hybrid_comp_mask_blend_alpha_schedule", frame),
                                      bool(s["hybrid_comp_mask_inverse"]))

    def _hybrid_motion(self, image: np.ndarray, frame: int) -> np.ndarray:
        """The video's own motion from frame - 1 to frame, put on the picture (the extension's hybrid motion)."""
        kind = self.s["hybrid_motion"]
        if kind == "None" or frame == 0:
            return image
        a, b = self._video_frame(frame - 1), self._video_frame(frame)
        if kind == "Optical Flow":
            flow = _flow(a, b, self.s["hybrid_flow_method"], "hybrid_flow_method")
            return animation.warp_by_flow(image, flow, self.key("hybrid_flow_factor_schedule", frame))
        return animation.warp_matrix(image, animation.motion_matrix(a, b, kind), self.s["border"])

    def _color_reference(self) -> np.ndarray | None:
        s = self.s
        if s["color_coherence"] == "Image":
            path = spec.local_path(s, "color_coherence_image_path")
            if not path:
                raise RequestError("color_coherence Image: give color_coherence_image_path (a local image)")
            return _rgb(Image.open(path).resize((int(s["W"]), int(s["H"])), Image.LANCZOS))
        return None

    def _video_inputs(self) -> list[Path]:
        s = self.s
        path = spec.local_path(s, "video_init_path")
        if not path:
            raise RequestError("Video Input mode: give video_init_path (a local video file)")
        frames = video.extract_frames(path, self.outdir / f"inputframes{self._scratch}",
                                      every=int(s["extract_nth_frame"]),
                                      start=int(s["extract_from_frame"]), end=int(s["extract_to_frame"]))
        if not frames:
            raise RequestError(f"video_init_path {path}: no frames in the range asked for")
        self.max_frames = min(self.max_frames, len(frames)) if self.max_frames else len(frames)
        return frames

    def _finish(self, result: DeforumResult) -> None:
        s = self.s
        if not result.frames:
            return
        if not s["skip_video_creation"]:
            sound = None
            if s["add_soundtrack"] == "File":
                sound = spec.local_path(s, "soundtrack_path")
            elif s["add_soundtrack"] == "Init Video" and s["animation_mode"] == "Video Input":
                sound = spec.local_path(s, "video_init_path")
            result.video = video.stitch(video.frame_pattern(self.outdir, self.timestring),
                                        self.outdir / f"{self.timestring}.mp4", float(s["fps"]),
                                        crf=int(self.options["ffmpeg_crf"]), preset=str(self.options["ffmpeg_preset"]),
                                        soundtrack=sound)
        if s["make_gif"]:
            result.gif = video.make_gif(result.frames, self.outdir / f"{self.timestring}.gif", float(s["fps"]))
        if s["r_upscale_video"]:
            result.extra_videos.append(self._upscaled(result.frames))
        if s["frame_interpolation_engine"] != "None":
            result.extra_videos.append(self._interpolated(result.frames))
        for name in ("prev", "turbo_prev", "turbo_next", "color"):
            (self.outdir / f"{self.timestring}_state_{name}.png").unlink(missing_ok=True)
        (self.outdir / STATE.format(timestring=self.timestring)).unlink(missing_ok=True)
        if s["delete_imgs"] and result.video is not None:
            for path in result.frames:
                path.unlink()
            shutil.rmtree(self.outdir / "inputframes", ignore_errors=True)
            result.frames = []


    def _upscaler(self) -> str:
        """The upscaler ``r_upscale_model`` names, checked (before any frame is made)."""
        upscalers, name = self.studio.engine.upscalers, str(self.s["r_upscale_model"])
        try:
            upscalers.get(name)
        except ModelNotFoundError:
            names = ", ".join(u.name for u in upscalers.available())
            raise RequestError(f"r_upscale_model {name!r}: not found; put its file in models/RealESRGAN or "
                               f"models/ESRGAN, or choose one of: {names}") from None
        return name

    def _upscaled(self, frames: list[Path]) -> Path:
        """Every frame through an upscaler (any of ours: the extension's ``r_upscale_model`` when we have it,
        by name), as ``{timestring}_upscaled_xN/`` and its mp4."""
        s = self.s
        factor = int(str(s["r_upscale_factor"]).lstrip("x") or 2)
        upscalers, name = self.studio.engine.upscalers, self._upscaler()
        folder = self.outdir / f"{self.timestring}_upscaled_x{factor}"
        folder.mkdir(exist_ok=True)
        for i, path in enumerate(frames):
            image = Image.open(path).convert("RGB")
            upscalers.upscale(image, image.width * factor, image.height * factor, name).save(
                folder / spec.frame_filename(self.timestring, i))
        return video.stitch(video.frame_pattern(folder, self.timestring), folder.with_suffix(".mp4"),
                            float(s["fps"]), crf=int(self.options["ffmpeg_crf"]),
                            preset=str(self.options["ffmpeg_preset"]))

    def _interpolated(self, frames: list[Path]) -> Path:
        """``frame_interpolation_x_amount`` frames for every one. RIFE / FILM need their networks' weights,
        which are not here: the frames between are blends of their neighbours (said in the warnings). The
        video plays at ``fps * x`` (the same duration), or at ``fps`` with slow motion."""
        s = self.s
        amount = max(2, int(s["frame_interpolation_x_amount"]))
        self.warnings.append(f"frame interpolation {s['frame_interpolation_engine']}: its network's weights are "
                             f"not available here; frames interpolated by blending")
        folder = self.outdir / f"{self.timestring}_interpolated_x{amount}"
        folder.mkdir(exist_ok=True)
        pictures = [_rgb(Image.open(p)) for p in frames]
        k = 0
        for a, b in zip(pictures, [*pictures[1:], None]):
            for j in range(amount if b is not None else 1):
                _png(animation.blend(a, b, j / amount) if b is not None and j else a,
                     folder / spec.frame_filename(self.timestring, k))
                k += 1
        fps = float(s["fps"]) * (1 if s["frame_interpolation_slow_mo_enabled"] else amount)
        return video.stitch(video.frame_pattern(folder, self.timestring), folder.with_suffix(".mp4"), fps,
                            crf=int(self.options["ffmpeg_crf"]), preset=str(self.options["ffmpeg_preset"]))


def _flow(a: np.ndarray, b: np.ndarray, method: str, key: str) -> np.ndarray:
    try:
        return animation.optical_flow(a, b, method)
    except ValueError as exc:
        raise RequestError(f"{key}: {exc}; choose one of {', '.join(animation.FLOW_METHODS)}") from None


class _Stopped(Exception):
    """The generation of a frame was interrupted."""
