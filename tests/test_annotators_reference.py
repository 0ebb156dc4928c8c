"""Our annotator networks against the reference implementations in controlnet_aux 0.0.10 (Apache-2.0), whose
network code is the sd-webui-controlnet extension's: HED, PiDiNet, M-LSD, the realistic and coarse line art
generators, the anime line art U-Net, TEED and OpenPose's body and hand networks.

Each reference network gets seeded random weights (fan-in scaled, batch norms with non-trivial scales and
running statistics), written in the published file's layout (ControlNetHED.pth in half precision,
table5_pidinet.pth as a training checkpoint of DataParallel names, the OpenPose files under their Caffe
names...). The reference's own loading code and ours read that same file, and every output of the two networks
(HED's five edge maps, OpenPose's part affinity fields and heatmaps, all nine channels of M-LSD's map) must
agree on the same input to float32 rounding, while the mirrored picture and a file of another seed give other
outputs (so the agreement is neither between constants nor blind to the picture). Where controlnet_aux's frame
is the extension's (a picture already at the resolution, sides multiples of 64, so that neither resizes nor
pads), the whole detected maps of the HED, PiDiNet, line art, M-LSD and TEED preprocessors must be pixel-equal as
well (OpenPose's detector cannot be imported: its package imports torchvision).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sdstudio.engine import preprocessors
from sdstudio.engine.annotators import hed, lineart, mlsd, openpose, pidinet, teed
from sdstudio.engine.annotators.common import AnnotatorFile, compute_device
from tests.test_annotators import by_name, fresh_annotator_cache, picture, write  # noqa: F401 (autouse)

torch.set_num_threads(1)

if importlib.util.find_spec("controlnet_aux") is None:  # locates the package without importing it
    pytest.skip("controlnet_aux (the reference networks) is not installed; scripts/setup.sh installs it",
                allow_module_level=True)
pytest.importorskip("einops", reason="controlnet_aux's network modules import einops (a test dependency)")


def reference_modules() -> types.SimpleNamespace:
    """controlnet_aux's network modules, imported without running its package ``__init__``: that imports every
    detector, some of them needing torchvision or timm, which are not installed (torchvision has no CPU build
    on PyPI and would replace the CPU torch; scripts/setup.sh installs controlnet_aux without dependencies).
    A bare package module pointing at its folder lets the submodules import one by one; ``open_pose`` is made
    the same way, as its ``__init__`` imports torchvision through ``face.py``."""
    root = Path(importlib.util.find_spec("controlnet_aux").submodule_search_locations[0])
    for name, folder in (("controlnet_aux", root), ("controlnet_aux.open_pose", root / "open_pose")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    names = {"hed": "hed", "pidi": "pidi", "pidi_model": "pidi.model", "mlsd": "mlsd",
             "mlsd_large": "mlsd.models.mbv2_mlsd_large", "lineart": "lineart",
             "lineart_anime": "lineart_anime", "teed": "teed", "teed_net": "teed.ted",
             "pose_util": "open_pose.util",  # before body: util and body import each other, util first
             "body": "open_pose.body", "hand": "open_pose.hand", "pose_model": "open_pose.model"}
    with warnings.catch_warnings():  # its OpenPose modules import gaussian_filter by scipy's deprecated path
        warnings.filterwarnings("ignore", "Please import `gaussian_filter`", DeprecationWarning)
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)  # TEED's smish
        modules = {key: importlib.import_module(f"controlnet_aux.{name}") for key, name in names.items()}
    return types.SimpleNamespace(**modules)


AUX = reference_modules()


def seeded_weights(net: nn.Module, seed: int, gain: float = 1.0) -> dict[str, torch.Tensor]:
    """Deterministic random tensors for ``net``'s state dict: convolution kernels normal × ``gain`` over
    √fan-in (for a transposed one, the input taps each output pixel reads), so that deep stacks neither vanish
    nor saturate (a deep stack of ReLUs without normalization needs gain √2, or the biases drown the picture);
    batch norms with scales and running variances in [0.5, 1.5) and shifts and running means normal × 0.1;
    the network's own parameters (HED's offset from 0-255 pixels) normal × 50; other biases normal × 0.1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in net.state_dict().items():
        owner_name, _, leaf = key.rpartition(".")
        owner = net.get_submodule(owner_name)
        shape = value.shape
        if leaf == "num_batches_tracked":
            out[key] = value.clone()
        elif isinstance(owner, nn.BatchNorm2d):
            if leaf in ("weight", "running_var"):
                out[key] = torch.rand(shape, generator=g) + 0.5
            else:
                out[key] = torch.randn(shape, generator=g) * 0.1
        elif isinstance(owner, nn.ConvTranspose2d) and leaf == "weight":
            taps = shape[0] * shape[2] * shape[3] / (owner.stride[0] * owner.stride[1])
            out[key] = torch.randn(shape, generator=g) * gain / math.sqrt(taps)
        elif leaf == "weight" and len(shape) >= 2:
            out[key] = torch.randn(shape, generator=g) * gain / math.sqrt(math.prod(shape[1:]))
        elif owner is net:
            out[key] = torch.randn(shape, generator=g) * 50.0
        else:
            out[key] = torch.randn(shape, generator=g) * 0.1
    return out


def published(folder: Path, file: AnnotatorFile, tensors: dict, wrap: str | None = None,
              prefix: str = "") -> Path:
    """``tensors`` written where the annotators look for ``file``: ``folder/<subfolder>/<name>``."""
    return write(folder / file.subfolder / file.name, tensors, wrap, prefix)


def caffe_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """controlnet_aux's OpenPose names (``model0.conv1_1.weight``) as the published files keep them
    (``conv1_1.weight``): its ``util.transfer`` drops the first part of each name to read the file."""
    return {key.split(".", 1)[1]: value for key, value in weights.items()}


def pixels(h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """The test picture as a 1×3×h×w float RGB tensor of 0-255 values."""
    return torch.from_numpy(picture(h, w, seed).astype(np.float32)).permute(2, 0, 1)[None]


def anime_unet() -> nn.Module:
    """The U-Net as LineartAnimeDetector builds it: 8 levels, 64 filters, instance norm without parameters."""
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    return AUX.lineart_anime.UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


@torch.no_grad()
def assert_networks_agree(ours: nn.Module, reference: nn.Module, other: nn.Module, x: torch.Tensor,
                          pick=as_list) -> None:
    """Every output of ours equals the reference's on ``x``, both run on the CPU (float32 rounding: rtol 1e-4,
    atol 1e-5 of the output's largest magnitude), while the reference's answer to the mirrored picture and our
    network of another seed's file (``other``) differ from it by over a thousand times that atol, so that
    neither a wrong layer nor a wrongly read file could hide under the tolerance. ``pick`` chooses the
    reference outputs that ours give."""
    ours, reference, other = (net.to("cpu").eval() for net in (ours, reference, other))  # (cached per test)
    got, want, unlike = as_list(ours(x)), pick(reference(x)), as_list(other(x))
    mirrored = pick(reference(x.flip(-1)))
    assert len(got) == len(want) == len(unlike) == len(mirrored)
    for i, (g, w, u, m) in enumerate(zip(got, want, unlike, mirrored, strict=True)):
        scale = w.abs().max().item()
        assert scale > 0, f"output {i} is all zeros"
        atol = 1e-5 * scale
        torch.testing.assert_close(g, w, rtol=1e-4, atol=atol, msg=lambda text, i=i: f"output {i}: {text}")
        assert (m - w).abs().max() > 1000 * atol, f"output {i} hardly depends on the picture"
        assert (u - w).abs().max() > 1000 * atol, f"output {i} is the same for another seed"


# --- the networks -------------------------------------------------------------------------------------------

def test_hed_network_is_controlnet_auxs(tmp_path):
    def file(folder: Path, seed: int) -> Path:  # ControlNetHED.pth: a plain state dict, half precision
        weights = seeded_weights(AUX.hed.ControlNetHED_Apache2(), seed)
        return published(folder, hed.FILE, {k: v.half() for k, v in weights.items()})

    path, other = file(tmp_path, 0), file(tmp_path / "other", 1)
    reference = AUX.hed.HEDdetector.from_pretrained(str(path.parent)).netNetwork
    assert_networks_agree(hed.load(path), reference, hed.load(other), pixels())  # RGB 0-255; all five maps


def test_pidinet_network_is_controlnet_auxs(tmp_path):
    def file(folder: Path, seed: int) -> Path:  # table5_pidinet.pth: {"epoch", "state_dict": {"module.…"}}
        weights = seeded_weights(AUX.pidi_model.pidinet(), seed)
        return published(folder, pidinet.FILE, weights, wrap="state_dict", prefix="module.")

    path, other = file(tmp_path, 0), file(tmp_path / "other", 1)
    reference = AUX.pidi.PidiNetDetector.from_pretrained(str(path.parent)).netNetwork
    bgr = pixels().flip(1) / 255.0
    # the reference gives the four side maps' sigmoids and then the fused one, the edge map (ours gives that)
    assert_networks_agree(pidinet.load(path), reference, pidinet.load(other), bgr, pick=lambda out: [out[-1]])


def test_mlsd_network_is_controlnet_auxs(tmp_path):
    def file(folder: Path, seed: int) -> Path:  # mlsd_large_512_fp32.pth: a plain state dict with BN counters
        return published(folder, mlsd.FILE, seeded_weights(AUX.mlsd_large.MobileV2_MLSD_Large(), seed))

    path, other = file(tmp_path, 0), file(tmp_path / "other", 1)
    reference = AUX.mlsd.MLSDdetector.from_pretrained(str(path.parent)).model
    rgb = pixels()
    x = torch.cat([rgb, torch.ones_like(rgb[:, :1])], 1) / 127.5 - 1.0  # RGB and a constant, in [-1, 1]
    assert_networks_agree(mlsd.load(path), reference, mlsd.load(other), x)  # all nine channels of the map


def test_lineart_generators_are_controlnet_auxs(tmp_path):
    # sk_model.pth and sk_model2.pth: plain state dicts of Generator(3, 1, 3), both read by LineartDetector
    def files(folder: Path, seed: int) -> tuple[Path, Path]:
        return tuple(published(folder, file, seeded_weights(AUX.lineart.Generator(3, 1, 3), seed + i))
                     for i, file in enumerate((lineart.REALISTIC, lineart.COARSE)))

    (realistic, coarse), (other, _) = files(tmp_path, 0), files(tmp_path / "other", 2)
    detector = AUX.lineart.LineartDetector.from_pretrained(str(realistic.parent))
    x = pixels() / 255.0
    for path, reference in ((realistic, detector.model), (coarse, detector.model_coarse)):
        assert_networks_agree(lineart.load_generator(path), reference, lineart.load_generator(other), x)


def test_lineart_anime_unet_is_controlnet_auxs(tmp_path):
    def file(folder: Path, seed: int) -> Path:  # netG.pth: the U-Net's state dict under DataParallel names
        return published(folder, lineart.ANIME, seeded_weights(anime_unet(), seed), prefix="module.")

    path, other = file(tmp_path, 0), file(tmp_path / "other", 1)
    reference = AUX.lineart_anime.LineartAnimeDetector.from_pretrained(str(path.parent)).model
    x = pixels(256, 256) / 127.5 - 1.0  # eight halvings: the smallest size it runs at
    assert_networks_agree(lineart.load_anime(path), reference, lineart.load_anime(other), x)


def test_teed_network_is_controlnet_auxs(tmp_path):
    def file(folder: Path, seed: int) -> Path:  # 7_model.pth (and Anyline's MTEED.pth): a plain state dict
        return published(folder, teed.FILE, seeded_weights(AUX.teed_net.TED(), seed))

    path, other = file(tmp_path, 0), file(tmp_path / "other", 1)
    reference = AUX.teed.TEEDdetector.from_pretrained(str(path.parent), teed.FILE.name).model
    assert_networks_agree(teed.load(path), reference, teed.load(other), pixels())  # RGB 0-255; all four maps


@pytest.mark.parametrize("part", ["body", "hand"])
def test_openpose_networks_are_controlnet_auxs(tmp_path, part):
    build, file_spec, load, detector = {
        "body": (AUX.pose_model.bodypose_model, openpose.BODY, openpose.load_body, AUX.body.Body),
        "hand": (AUX.pose_model.handpose_model, openpose.HAND, openpose.load_hand, AUX.hand.Hand)}[part]

    def file(folder: Path, seed: int) -> Path:  # body_pose_model.pth / hand_pose_model.pth: Caffe names, flat
        weights = seeded_weights(build(), seed, gain=math.sqrt(2))  # ReLUs, no norms
        return published(folder, file_spec, caffe_names(weights))

    path, other = file(tmp_path, 0), file(tmp_path / "other", 1)
    reference = detector(str(path)).model
    bgr = pixels().flip(1) / 256.0 - 0.5
    # the body's part affinity fields (38) and heatmaps (19) of the last stage; the hand's 22 heatmaps
    assert_networks_agree(load(path), reference, load(other), bgr)


# --- whole maps, where controlnet_aux's frame is the extension's --------------------------------------------
# controlnet_aux stretches a picture to sides that are multiples of 64 (Lanczos when enlarging) where the
# extension pads it by repeating its edges (cubic when enlarging) and crops the map afterwards; a picture at
# the detect resolution with such sides is neither stretched nor padded by either, so the maps must be equal.

RESOLUTION = 64
H, W = 64, 128


def frame_picture() -> np.ndarray:
    return picture(H, W, seed=3)


def ours(folder: Path, name: str, a: float = -1, b: float = -1) -> np.ndarray:
    return preprocessors.detect(by_name(folder)[name], frame_picture(), RESOLUTION, a, b)


def theirs(detector, **options) -> np.ndarray:
    """The reference detector's map, run where ours runs."""
    out = detector.to(compute_device())(frame_picture(), detect_resolution=RESOLUTION,
                                        image_resolution=RESOLUTION, output_type="np", **options)
    assert out.shape == (H, W, 3)
    return out


def assert_maps_equal(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, name
    assert len(np.unique(want)) > 1, f"{name}: the reference map is flat"
    differ = got != want
    assert not differ.any(), f"{name}: {int(differ.sum())} values differ, by up to " \
                             f"{int(np.abs(got.astype(int) - want).max())}"


def test_hed_maps_are_controlnet_auxs(tmp_path):
    path = published(tmp_path, hed.FILE, seeded_weights(AUX.hed.ControlNetHED_Apache2(), 0))
    detector = AUX.hed.HEDdetector.from_pretrained(str(path.parent))
    assert_maps_equal(ours(tmp_path, "hed"), theirs(detector), "hed")
    assert_maps_equal(ours(tmp_path, "hed_safe"), theirs(detector, safe=True), "hed_safe")
    assert_maps_equal(ours(tmp_path, "scribble_hed"), theirs(detector, scribble=True), "scribble_hed")


def test_pidinet_maps_are_controlnet_auxs(tmp_path):
    weights = seeded_weights(AUX.pidi_model.pidinet(), 0)
    for key in ("classifier.weight", "classifier.bias"):  # fused logits spread from about -4 to 3, so that
        weights[key] = weights[key] * 8  # the map spans the safe levels and both sides of the sketch's 0.5
    path = published(tmp_path, pidinet.FILE, weights, wrap="state_dict", prefix="module.")
    detector = AUX.pidi.PidiNetDetector.from_pretrained(str(path.parent))
    assert_maps_equal(ours(tmp_path, "pidinet"), theirs(detector), "pidinet")
    assert_maps_equal(ours(tmp_path, "pidinet_safe"), theirs(detector, safe=True), "pidinet_safe")
    assert_maps_equal(ours(tmp_path, "pidinet_sketch"), theirs(detector, apply_filter=True), "pidinet_sketch")
    assert_maps_equal(ours(tmp_path, "pidinet_scribble"), theirs(detector, scribble=True), "pidinet_scribble")


def test_lineart_maps_are_controlnet_auxs(tmp_path):
    for seed, file in enumerate((lineart.REALISTIC, lineart.COARSE)):
        published(tmp_path, file, seeded_weights(AUX.lineart.Generator(3, 1, 3), seed))
    anime = published(tmp_path, lineart.ANIME, seeded_weights(anime_unet(), 2), prefix="module.")
    detector = AUX.lineart.LineartDetector.from_pretrained(str(tmp_path / lineart.REALISTIC.subfolder))
    assert_maps_equal(ours(tmp_path, "lineart"), theirs(detector), "lineart")
    assert_maps_equal(ours(tmp_path, "lineart_coarse"), theirs(detector, coarse=True), "lineart_coarse")
    anime_detector = AUX.lineart_anime.LineartAnimeDetector.from_pretrained(str(anime.parent))
    assert_maps_equal(ours(tmp_path, "lineart_anime"), theirs(anime_detector), "lineart_anime")


def test_mlsd_maps_are_controlnet_auxs(tmp_path):
    weights = seeded_weights(AUX.mlsd_large.MobileV2_MLSD_Large(), 0)
    for key in ("block23.conv3.weight", "block23.conv3.bias"):  # the last layer's channel 7 (centre logits)
        weights[key][7:12] *= 20  # and 8-11 (offsets) enlarged: scores spread over (0, 1), segments of pixels
    path = published(tmp_path, mlsd.FILE, weights)
    detector = AUX.mlsd.MLSDdetector.from_pretrained(str(path.parent))
    for value, distance in ((0.1, 0.1), (0.5, 2.0)):
        got = ours(tmp_path, "mlsd", value, distance)
        assert_maps_equal(got, theirs(detector, thr_v=value, thr_d=distance), f"mlsd {value} {distance}")


def test_teed_maps_are_controlnet_auxs(tmp_path):
    path = published(tmp_path, teed.FILE, seeded_weights(AUX.teed_net.TED(), 0))
    detector = AUX.teed.TEEDdetector.from_pretrained(str(path.parent), teed.FILE.name).to(compute_device())
    for steps in (0, 2):  # its Safe Steps slider (threshold A)
        want = detector(frame_picture(), detect_resolution=RESOLUTION, safe_steps=steps, output_type="np")
        assert_maps_equal(ours(tmp_path, "softedge_teed", steps), want, f"softedge_teed {steps}")
