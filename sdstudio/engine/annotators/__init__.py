"""The weight-based ControlNet preprocessors ("annotators") of the sd-webui-controlnet extension, with our own
networks loading the published files in their own layouts (no timm, torchvision, controlnet_aux or mmcv).

:func:`preprocessors` declares them for the registry (:mod:`sdstudio.engine.preprocessors`): names are the
extension's module names (what ``/controlnet/module_list`` answers), the UI labels their aliases, sliders and
control types as the extension has them. Declaring costs nothing: a network loads on its first run, from
``annotators_dir/<subfolder>/<file>`` or ``annotators_dir/<file>``, and stays loaded for the process
(:func:`common.clear_cache` drops them). A missing file is a ControlNetError naming the file and the folder.

Each ``run(image, resolution, threshold_a, threshold_b, mask)`` works as the extension's: the picture's short
side is resized to the resolution and padded to multiples of 64, the network runs, the padding is cut off and
the map comes back H×W×3 uint8 at that resolution.

Modules (file, subfolder): hed / hed_safe / scribble_hed (ControlNetHED.pth, hed); pidinet / pidinet_safe /
pidinet_scribble / pidinet_sketch (table5_pidinet.pth, pidinet); lineart, lineart_coarse (sk_model.pth,
sk_model2.pth, lineart); lineart_anime (netG.pth, lineart_anime); openpose, openpose_hand, openpose_face,
openpose_faceonly, openpose_full (body_pose_model.pth, hand_pose_model.pth, facenet.pth, openpose); mlsd
(mlsd_large_512_fp32.pth, mlsd); depth_leres (res101.pth, leres); depth_leres++ (res101.pth and the boosting's
merge network latest_net_G.pth, leres); depth_anything (depth_anything_vitl14.pth,
depth_anything); normal_bae (scannet.pt, normal_bae); depth (depth_midas) and normal_map (normal_midas)
(dpt_hybrid-midas-501f0c75.pt, midas); depth_anything_v2 (depth_anything_v2_vitl.safetensors or .pth,
depth_anything_v2); depth_zoe (ZoeD_M12_N.pt, zoedepth); dw_openpose_full (yolox_l.onnx and
dw-ll_ucoco_384.onnx, openpose; run by onnxruntime, or OpenCV's dnn without it); anime_face_segment (seg_anime_face)
(UNet.pth, anime_face_segment); softedge_teed (7_model.pth, TEED); softedge_anyline (MTEED.pth, TEED; its
resolution slider starts at 1280, as the extension's); inpaint_only+lama (ControlNetLama.pth, lama: the masked
part filled by LaMa at 256, then the unit works as inpaint_only); instant_id_face_keypoints (InsightFace's
antelopev2 pack, :mod:`.insightface`); densepose / densepose_parula (densepose_r50_fpn_dl.torchscript, densepose;
torchvision's two operators it calls defined by :mod:`.densepose`); normal_dsine (dsine.pt, normal_dsine;
:mod:`.dsine`, its Fov and Iterations sliders); segmentation (seg_ufade20k) (upernet_global_small.pth, uniformer;
:mod:`.uniformer`); mobile_sam (mobile_sam.pt, mobile_sam; :mod:`.mobile_sam`: SAM's automatic mask generator
over MobileSAM's TinyViT, in controlnet_aux's frame); oneformer_ade20k (seg_ofade20k) and oneformer_coco (seg_ofcoco)
(250_16_swin_l_oneformer_ade20k_160k.pth, 150_16_swin_l_oneformer_coco_100ep.pth, oneformer; :mod:`.oneformer`:
transformers' OneFormer); facexlib (parsing_bisenet.pth and detection_Resnet50_Final.pth, facexlib;
:mod:`.face_parsing`: PuLID's face features, the centre face gray on white); mediapipe_face (no file: the
``mediapipe`` package's own face mesh and models, :mod:`.mediapipe_face`; its Max Faces and Min Face Confidence
sliders).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from ...core.controlnet import ControlNetError, Preprocessor, Slider
from ..preprocessors import lineart_standard_map
from . import (
    anime_face,
    depth_anything,
    dwpose,
    hed,
    lama,
    leres,
    leres_boost,
    lineart,
    mediapipe_face,  # (cheap: mediapipe itself is imported on the first run)
    midas,
    mlsd,
    normalbae,
    openpose,
    pidinet,
    teed,
    zoe,
)
from .common import AnnotatorFile, clear_cache, hwc3, resize_with_pad, scribble

RESOLUTION = Slider("Resolution", 512, 64, 2048, 8)
MLSD_VALUE = Slider("MLSD Value Threshold", 0.1, 0.01, 2.0, 0.01)
DSINE_FOV = Slider("Fov", 60.0, 0.0, 360.0, 0.1)
DSINE_ITERATIONS = Slider("Iterations", 5, 1, 20, 1)
MLSD_DISTANCE = Slider("MLSD Distance Threshold", 0.1, 0.01, 20.0, 0.01)
REMOVE_NEAR = Slider("Remove Near %", 0, 0, 100, 0.1)
REMOVE_BACKGROUND = Slider("Remove Background %", 0, 0, 100, 0.1)
NORMAL_BACKGROUND = Slider("Normal Background Threshold", 0.4, 0.0, 1.0, 0.01)
SAFE_STEPS = Slider("Safe Steps", 2, 0, 10, 1)
ANYLINE_RESOLUTION = Slider("Resolution", 1280, 64, 2048, 8)
MEDIAPIPE_MAX_FACES = Slider("Max Faces", mediapipe_face.MAX_FACES, 1, 10, 1)
MEDIAPIPE_MIN_CONFIDENCE = Slider("Min Face Confidence", mediapipe_face.MIN_CONFIDENCE, 0.01, 1.0, 0.01)

# every file a preprocessor here may read, for listings and messages
FILES: tuple[AnnotatorFile, ...] = (hed.FILE, pidinet.FILE, lineart.REALISTIC, lineart.COARSE, lineart.ANIME,
                                    openpose.BODY, openpose.HAND, openpose.FACE, mlsd.FILE, leres.FILE,
                                    depth_anything.FILE, depth_anything.FILE_V2, normalbae.FILE,
                                    midas.FILE, zoe.FILE, dwpose.DETECTOR, dwpose.POSE, anime_face.FILE,
                                    teed.FILE, teed.MTEED_FILE, lama.FILE, leres_boost.FILE)

Run = Callable[..., np.ndarray]


def _at_resolution(label: str, step: Callable[[np.ndarray, float, float], np.ndarray]) -> Run:
    """The extension's frame around a network: resize and pad, run, crop, three channels."""

    def run(image: np.ndarray, resolution: float = 512, threshold_a: float = -1, threshold_b: float = -1,
            mask: np.ndarray | None = None) -> np.ndarray:
        picture = np.ascontiguousarray(hwc3(image, f"ControlNet {label}"))
        padded, crop = resize_with_pad(picture, int(resolution))
        return hwc3(crop(step(padded, threshold_a, threshold_b)))

    run.__name__ = run.__qualname__ = label
    return run


def _hed(folder: Path, label: str, safe: bool = False) -> Run:
    return _at_resolution(label, lambda img, a, b: hed.detect(hed.load(hed.FILE.locate(folder, label)), img, safe))


def _teed(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:  # a: Safe Steps
        return teed.detect(teed.load(teed.FILE.locate(folder, label)), img, int(a))

    return _at_resolution(label, step)


def _anyline(folder: Path, label: str) -> Run:
    """MTEED's soft edges with ``lineart_standard``'s faint lines of the same padded picture merged in."""

    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:  # a: Safe Steps
        edges = teed.detect(teed.load(teed.MTEED_FILE.locate(folder, label)), img, int(a))
        return teed.anyline_merge(edges, lineart_standard_map(img))

    return _at_resolution(label, step)


def _scribble(soft: Run) -> Run:
    """The scribble variants: the soft edge map at the resolution, thinned and thickened into strokes."""

    def run(image: np.ndarray, resolution: float = 512, threshold_a: float = -1, threshold_b: float = -1,
            mask: np.ndarray | None = None) -> np.ndarray:
        return hwc3(scribble(soft(image, resolution, threshold_a, threshold_b)[:, :, 0]))

    run.__name__ = run.__qualname__ = f"scribble({soft.__name__})"
    return run


def _pidinet(folder: Path, label: str, safe: bool = False, binary: bool = False) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return pidinet.detect(pidinet.load(pidinet.FILE.locate(folder, label)), img, safe=safe, binary=binary)

    return _at_resolution(label, step)


def _lineart(folder: Path, label: str, file: AnnotatorFile) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return 255 - lineart.lines(lineart.load_generator(file.locate(folder, label)), img)

    return _at_resolution(label, step)


def _lineart_anime(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return 255 - lineart.anime_lines(lineart.load_anime(lineart.ANIME.locate(folder, label)), img)

    return _at_resolution(label, step)


def _openpose(folder: Path, label: str, body: bool = True, hands: bool = False, face: bool = False) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        # every file is looked for before any loads, so one message names the first missing one at once
        paths = [openpose.BODY.locate(folder, label), openpose.HAND.locate(folder, label) if hands else None,
                 openpose.FACE.locate(folder, label) if face else None]
        poses = openpose.detect_poses(img, openpose.load_body(paths[0]),
                                      openpose.load_hand(paths[1]) if hands else None,
                                      openpose.load_face(paths[2]) if face else None)
        return openpose.draw_poses(poses, img.shape[0], img.shape[1], body=body, hands=hands, face=face)

    return _at_resolution(label, step)


def _dwpose(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        detector, pose = dwpose.DETECTOR.locate(folder, label), dwpose.POSE.locate(folder, label)
        people = dwpose.detect(dwpose.load(detector), dwpose.load(pose), img)
        return openpose.draw_poses(people, img.shape[0], img.shape[1], body=True, hands=True, face=True)

    return _at_resolution(label, step)


def _mlsd(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return mlsd.detect(mlsd.load(mlsd.FILE.locate(folder, label)), img, a, b)

    return _at_resolution(label, step)


DEFAULT_DIR = Path("models") / "ControlNet" / "annotators"  # the studio's default (--annotators-dir)


def _leres(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return leres.detect(leres.load(leres.FILE.locate(folder, label)), img, a, b)

    return _at_resolution(label, step)


def _leres_boosted(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        net = leres.load(leres.FILE.locate(folder, label))
        merge_net = leres_boost.load(leres_boost.FILE.locate(folder, label))

        def estimate(rgb: np.ndarray, size: int) -> np.ndarray:  # the extension's estimateleres at size²
            depth = leres.predict(net, cv2.resize(rgb, (size, size)))
            return cv2.resize(depth, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_CUBIC)

        return leres.depth_map(leres_boost.boost(img, estimate, merge_net), a, b)

    return _at_resolution(label, step)


def _depth_anything(folder: Path, label: str, version: int = 1) -> Run:
    file = depth_anything.FILE if version == 1 else depth_anything.FILE_V2

    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return depth_anything.detect(depth_anything.load(file.locate(folder, label), version), img)

    return _at_resolution(label, step)


def _midas(folder: Path, label: str, normal: bool = False) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        raw = midas.predict(midas.load(midas.FILE.locate(folder, label)), img)
        return midas.normal_map(raw, a) if normal else midas.depth_map(raw)

    return _at_resolution(label, step)


def _zoe(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return zoe.detect(zoe.load(zoe.FILE.locate(folder, label)), img)

    return _at_resolution(label, step)


def _anime_face(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return anime_face.detect(anime_face.load(anime_face.FILE.locate(folder, label)), img)

    return _at_resolution(label, step)


def _uniformer(folder: Path, label: str) -> Run:
    from . import uniformer

    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return uniformer.detect(uniformer.load(uniformer.FILE.locate(folder, label)), img)

    return _at_resolution(label, step)


def _hidden_resolution(resolution: float) -> float:
    """The extension's bound check on a hidden resolution slider: out of its range (the unit's -1), the
    default 512."""
    return resolution if RESOLUTION.minimum <= resolution <= RESOLUTION.maximum else RESOLUTION.value


def _oneformer(folder: Path, label: str, dataset: str) -> Run:
    """OneFormer in the extension's frame. Its slider is hidden, not absent: a resolution out of the
    slider's range (the unit's -1) frames the picture at the default, 512, as the extension's bound check."""
    from . import oneformer

    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        file = oneformer.DATASETS[dataset].file
        return oneformer.detect(oneformer.load(file.locate(folder, label), dataset), img)

    framed = _at_resolution(label, step)

    def run(image: np.ndarray, resolution: float = 512, threshold_a: float = -1, threshold_b: float = -1,
            mask: np.ndarray | None = None) -> np.ndarray:
        return framed(image, _hidden_resolution(resolution), threshold_a, threshold_b, mask)

    run.__name__ = run.__qualname__ = label
    return run


def _facexlib(folder: Path, label: str) -> Run:
    """PuLID's face features as a picture: the centre face aligned to 512, gray on white (its slider hidden:
    the unit's resolution frames the picture, out of range the default 512)."""
    from . import face_parsing

    def run(image: np.ndarray, resolution: float = 512, threshold_a: float = -1, threshold_b: float = -1,
            mask: np.ndarray | None = None) -> np.ndarray:
        features = face_parsing.run(folder, image, _hidden_resolution(resolution), label)
        return face_parsing.to_image(features)

    run.__name__ = run.__qualname__ = label
    return run


def _mediapipe_face(label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:  # a: Max Faces, b: Min Face Confidence
        return mediapipe_face.detect(img, int(a), b, f"ControlNet preprocessor {label!r}")

    return _at_resolution(label, step)


def _mobile_sam(folder: Path, label: str) -> Run:
    """SAM's automatic masks in controlnet_aux's frame (its own resize, not the pad-to-64 one); the colours
    drawn from the job's seed, as the extension seeds numpy before every preprocessor."""
    from . import mobile_sam

    def run(image: np.ndarray, resolution: float = 512, threshold_a: float = -1, threshold_b: float = -1,
            mask: np.ndarray | None = None, seed: int | None = None) -> np.ndarray:
        model = mobile_sam.load(mobile_sam.FILE.locate(folder, label))
        return mobile_sam.run(model, image, resolution, seed=seed)

    run.__name__ = run.__qualname__ = label
    return run


def _normal_bae(folder: Path, label: str) -> Run:
    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return normalbae.detect(normalbae.load(normalbae.FILE.locate(folder, label)), img)

    return _at_resolution(label, step)


def _lama(folder: Path, label: str) -> Run:
    """The extension's ``inpaint_only+lama``: LaMa fills the masked part at 256 (the short side, padded as
    for every network), the result is brought back to the picture's size and blended in by the mask, and
    the map is that picture with the mask (H×W×4, as inpaint_only's)."""

    def run(image: np.ndarray, resolution: float = 512, threshold_a: float = -1, threshold_b: float = -1,
            mask: np.ndarray | None = None) -> np.ndarray:
        picture = np.ascontiguousarray(hwc3(image, f"ControlNet {label}"))
        if mask is None:
            raise ControlNetError(f"ControlNet {label} needs a mask")
        h, w = picture.shape[:2]
        padded, crop = resize_with_pad(np.concatenate([picture, mask[:, :, None]], axis=2), lama.RESOLUTION)
        filled = crop(lama.inpaint(lama.load(lama.FILE.locate(folder, label)), padded))
        filled = cv2.resize(filled, (w, h)).astype(np.float32)
        alpha = mask.astype(np.float32)[:, :, None] / 255.0
        blended = (filled * alpha + picture.astype(np.float32) * (1 - alpha)).clip(0, 255).astype(np.uint8)
        return np.concatenate([blended, mask[:, :, None]], axis=2)

    run.__name__ = run.__qualname__ = label
    return run


def _dsine(folder: Path, label: str) -> Run:
    from . import dsine

    def run(image: np.ndarray, resolution: float = 512, fov: float = dsine.FOV, iterations: float = dsine.ITERATIONS,
            mask: np.ndarray | None = None) -> np.ndarray:
        picture = np.ascontiguousarray(hwc3(image, f"ControlNet {label}"))
        padded, crop = resize_with_pad(picture, int(resolution))
        model = dsine.load(dsine.FILE.locate(folder, label))
        return hwc3(crop(dsine.detect(model, padded, picture.shape[:2], fov, int(iterations))))

    run.__name__ = run.__qualname__ = label
    return run


def _densepose(folder: Path, label: str, cmap: str) -> Run:
    from . import densepose

    def step(img: np.ndarray, a: float, b: float) -> np.ndarray:
        return densepose.detect(densepose.load(densepose.FILE.locate(folder, label)), img, cmap)

    return _at_resolution(label, step)


def _instant_id_keypoints(folder: Path, models_dir: Path, label: str) -> Run:
    from . import insightface

    def run(img: np.ndarray, res: float, a: float, b: float, mask=None) -> np.ndarray:
        analysis = insightface.face_analysis(models_dir, folder, "antelopev2", label)
        return insightface.instant_id_keypoints(analysis, img, f"ControlNet preprocessor {label!r}")

    return run


def preprocessors(annotators_dir: Path | None, models_dir: Path | None = None) -> list[Preprocessor]:
    """The weight-based preprocessors reading their files from ``annotators_dir`` (None: the default folder,
    relative to the working directory; InsightFace's packs also from ``models_dir``/insightface); cheap:
    nothing is read until one runs."""
    folder = Path(annotators_dir) if annotators_dir is not None else DEFAULT_DIR
    models = Path(models_dir) if models_dir is not None else folder.parent.parent
    out: list[Preprocessor] = []

    def add(name: str, label: str, run: Run, types: tuple[str, ...], a: Slider | None = None,
            b: Slider | None = None, resolution: Slider = RESOLUTION) -> None:
        out.append(Preprocessor(name=name, run=run, resolution=resolution, threshold_a=a, threshold_b=b,
                                control_types=types, aliases=(label,) if label != name else ()))

    add("hed", "softedge_hed", _hed(folder, "softedge_hed"), ("SoftEdge",))
    add("hed_safe", "softedge_hedsafe", _hed(folder, "softedge_hedsafe", safe=True), ("SoftEdge",))
    add("softedge_teed", "softedge_teed", _teed(folder, "softedge_teed"), ("SoftEdge",), SAFE_STEPS)
    add("softedge_anyline", "softedge_anyline", _anyline(folder, "softedge_anyline"), ("SoftEdge",), SAFE_STEPS,
        resolution=ANYLINE_RESOLUTION)
    add("scribble_hed", "scribble_hed", _scribble(_hed(folder, "scribble_hed")), ("Scribble", "SparseCtrl"))
    add("pidinet", "softedge_pidinet", _pidinet(folder, "softedge_pidinet"), ("SoftEdge",))
    add("pidinet_safe", "softedge_pidisafe", _pidinet(folder, "softedge_pidisafe", safe=True), ("SoftEdge",))
    add("pidinet_scribble", "scribble_pidinet", _scribble(_pidinet(folder, "scribble_pidinet")),
        ("Scribble", "SparseCtrl"))
    add("pidinet_sketch", "t2ia_sketch_pidi", _pidinet(folder, "t2ia_sketch_pidi", binary=True), ("T2I-Adapter",))
    add("lineart", "lineart_realistic", _lineart(folder, "lineart_realistic", lineart.REALISTIC), ("Lineart",))
    add("lineart_coarse", "lineart_coarse", _lineart(folder, "lineart_coarse", lineart.COARSE), ("Lineart",))
    add("lineart_anime", "lineart_anime", _lineart_anime(folder, "lineart_anime"), ("Lineart",))
    add("openpose", "openpose", _openpose(folder, "openpose"), ("OpenPose",))
    add("openpose_hand", "openpose_hand", _openpose(folder, "openpose_hand", hands=True), ("OpenPose",))
    add("openpose_face", "openpose_face", _openpose(folder, "openpose_face", face=True), ("OpenPose",))
    add("openpose_faceonly", "openpose_faceonly", _openpose(folder, "openpose_faceonly", body=False, face=True),
        ("OpenPose",))
    add("openpose_full", "openpose_full", _openpose(folder, "openpose_full", hands=True, face=True), ("OpenPose",))
    add("dw_openpose_full", "dw_openpose_full", _dwpose(folder, "dw_openpose_full"), ("OpenPose",))
    add("mlsd", "mlsd", _mlsd(folder, "mlsd"), ("MLSD",), MLSD_VALUE, MLSD_DISTANCE)
    add("depth_leres", "depth_leres", _leres(folder, "depth_leres"), ("Depth",), REMOVE_NEAR, REMOVE_BACKGROUND)
    add("depth_leres++", "depth_leres++", _leres_boosted(folder, "depth_leres++"), ("Depth",), REMOVE_NEAR,
        REMOVE_BACKGROUND)
    add("depth", "depth_midas", _midas(folder, "depth_midas"), ("Depth",))
    add("normal_map", "normal_midas", _midas(folder, "normal_midas", normal=True), ("NormalMap",), NORMAL_BACKGROUND)
    add("depth_zoe", "depth_zoe", _zoe(folder, "depth_zoe"), ("Depth",))
    add("depth_anything", "depth_anything", _depth_anything(folder, "depth_anything"), ("Depth",))
    add("depth_anything_v2", "depth_anything_v2", _depth_anything(folder, "depth_anything_v2", version=2), ("Depth",))
    # OneFormer: no resolution slider in the extension (the unit's resolution still frames the picture)
    for name, label, dataset in (("oneformer_ade20k", "seg_ofade20k", "ade20k"), ("oneformer_coco", "seg_ofcoco", "coco")):
        out.append(Preprocessor(name=name, run=_oneformer(folder, label, dataset), control_types=("Segmentation",),
                                aliases=(label,)))
    add("segmentation", "seg_ufade20k", _uniformer(folder, "seg_ufade20k"), ("Segmentation",))
    add("anime_face_segment", "seg_anime_face", _anime_face(folder, "seg_anime_face"), ("Segmentation",))
    add("mobile_sam", "mobile_sam", _mobile_sam(folder, "mobile_sam"), ("Segmentation",))
    out.append(Preprocessor(name="inpaint_only+lama", run=_lama(folder, "inpaint_only+lama"), control_types=("Inpaint",),
                            needs_mask=True))
    add("normal_bae", "normal_bae", _normal_bae(folder, "normal_bae"), ("NormalMap",))
    add("normal_dsine", "normal_dsine", _dsine(folder, "normal_dsine"), ("NormalMap",), DSINE_FOV, DSINE_ITERATIONS)
    add("densepose", "densepose (pruple bg & purple torso)", _densepose(folder, "densepose", "viridis"), ("OpenPose",))
    add("densepose_parula", "densepose_parula (black bg & blue torso)",
        _densepose(folder, "densepose_parula", "parula"), ("OpenPose",))
    out.append(Preprocessor(name="facexlib", run=_facexlib(folder, "facexlib")))  # PuLID's face features
    add("mediapipe_face", "mediapipe_face", _mediapipe_face("mediapipe_face"), (), MEDIAPIPE_MAX_FACES,
        MEDIAPIPE_MIN_CONFIDENCE)
    # InstantID's keypoint map (InsightFace's antelopev2 pack; no resolution slider, as in the extension)
    out.append(Preprocessor(name="instant_id_face_keypoints", run=_instant_id_keypoints(folder, models,
                                                                                         "instant_id_face_keypoints"),
                            control_types=("Instant-ID",)))
    return out


__all__ = ["DEFAULT_DIR", "FILES", "RESOLUTION", "clear_cache", "preprocessors"]
