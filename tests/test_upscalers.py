"""Image upscalers: the built-in resamplers and ESRGAN-family model files (random weights), tiling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sdstudio.engine.upscalers import Upscalers, load_model, run_tiled
from sdstudio.models.errors import ModelFileError, ModelNotFoundError
from sdstudio.testing.synthetic import write_upscaler


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("up")
    for arch, scale in [("esrgan", 4), ("esrgan", 2), ("esrgan", 1), ("esrgan", 8), ("esrgan-old", 4),
                        ("compact", 4), ("compact", 2)]:
        write_upscaler(root / "ESRGAN" / f"{scale}x-{arch}.safetensors", arch, scale)
    return root


def picture(w=40, h=24) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("name, scale", [("4x-esrgan", 4), ("2x-esrgan", 2), ("1x-esrgan", 1), ("8x-esrgan", 8),
                                         ("4x-esrgan-old", 4), ("4x-compact", 4), ("2x-compact", 2)])
def test_architecture_and_scale_come_from_the_weights(files, name, scale):
    model, found = load_model(files / "ESRGAN" / f"{name}.safetensors")
    assert found == scale
    with torch.no_grad():
        assert model(torch.rand(1, 3, 12, 20)).shape == (1, 3, 12 * scale, 20 * scale)


def test_old_esrgan_key_names_give_the_same_network(tmp_path):
    new = load_model(write_upscaler(tmp_path / "new.safetensors", "esrgan", 4, seed=5))[0]
    old = load_model(write_upscaler(tmp_path / "old.safetensors", "esrgan-old", 4, seed=5))[0]
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(new(x), old(x))


def test_compact_model_is_a_residual_over_nearest_upsampling(tmp_path):
    path = write_upscaler(tmp_path / "c.safetensors", "compact", 4)
    from safetensors.torch import load_file

    sd = load_file(str(path))
    last = max(int(k.split(".")[1]) for k in sd if k.endswith(".weight") and sd[k].ndim == 4)
    sd[f"body.{last}.weight"].zero_()
    sd[f"body.{last}.bias"].zero_()
    save_file(sd, str(path))
    model, _ = load_model(path)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest"))


def test_basicsr_pickles_load_safely_and_code_is_refused(tmp_path, files):
    from safetensors.torch import load_file

    sd = load_file(str(files / "ESRGAN" / "4x-esrgan.safetensors"))
    torch.save({"params_ema": sd}, tmp_path / "RealESRGAN_x4plus.pth")
    _model, scale = load_model(tmp_path / "RealESRGAN_x4plus.pth")
    assert scale == 4

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"params_ema": Evil()}, f)
    with pytest.raises(ModelFileError, match="refused"):
        load_model(tmp_path / "evil.pth")


def test_files_of_other_kinds_get_a_clear_error(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelFileError, match="not an ESRGAN"):
        load_model(tmp_path / "lora.safetensors")
    (tmp_path / "broken.pth").write_bytes(b"\x00" * 10)
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "broken.pth")


def test_tiles_blend_exactly_for_a_pointwise_network():
    # A 1×1-convolution network has no neighbourhood: tiled and whole must agree to rounding.
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 12, 1)
    model = torch.nn.Sequential(conv, torch.nn.PixelShuffle(2), torch.nn.Sigmoid())
    x = torch.rand(1, 3, 50, 70)
    with torch.no_grad():
        whole = model(x)
        tiled = run_tiled(model, 2, x, tile=16, overlap=4)
    assert torch.allclose(tiled, whole, atol=1e-6)


def test_tiles_stay_close_for_a_real_architecture(files):
    model, scale = load_model(files / "ESRGAN" / "4x-esrgan.safetensors")
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        whole = model(x).clamp(0, 1)
    tiled = run_tiled(model, scale, x, tile=24, overlap=8)
    assert tiled.shape == whole.shape and (tiled - whole).abs().max() < 0.01


def test_upscale_to_an_exact_size_with_repeated_passes(files):
    ups = Upscalers([files / "ESRGAN"])
    names = [u.name for u in ups.available()]
    assert names[:3] == ["None", "Lanczos", "Nearest"] and "4x-esrgan" in names
    model, _ = ups._model(files / "ESRGAN" / "2x-esrgan.safetensors")
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    out = ups.upscale(picture(), 200, 120, "2x-esrgan")  # 5x: the 2x model runs 3 times (8x), then Lanczos
    assert out.size == (200, 120) and len(calls) == 3
    assert ups.upscale(picture(), 80, 48, "Nearest").size == (80, 48)
    assert np.array_equal(np.asarray(ups.upscale(picture(), 80, 48, "Nearest"))[::2, ::2], np.asarray(picture()))
    with pytest.raises(ModelNotFoundError, match="available: None, Lanczos, Nearest"):
        ups.upscale(picture(), 80, 48, "R-ESRGAN 4x+")


@pytest.fixture
def spandrel_archs():
    """spandrel's ESRGAN (RRDBNet) and Real-ESRGAN compact (SRVGGNet) architectures, with its own state-dict
    detection (a registry of those two), as the reference for ours.

    ``import spandrel`` imports every architecture it knows, and one (LaMa) imports torchvision, which has no
    CPU build on PyPI: spandrel is installed without it (scripts/setup.sh). So the package's modules are
    loaded under a bare ``spandrel`` package that skips its top-level registry; afterwards they are removed
    again, so that the engine's own ``import spandrel`` in later tests sees what it would have seen."""
    import importlib.util
    import sys
    import types

    spec = importlib.util.find_spec("spandrel")
    assert spec is not None, "spandrel is a test dependency (scripts/setup.sh installs it)"
    saved = {k: v for k, v in sys.modules.items() if k == "spandrel" or k.startswith("spandrel.")}
    for k in saved:
        del sys.modules[k]
    package = types.ModuleType("spandrel")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["spandrel"] = package
    try:
        from spandrel.__helpers.registry import ArchRegistry, ArchSupport
        from spandrel.architectures.Compact import CompactArch
        from spandrel.architectures.ESRGAN import ESRGANArch

        registry = ArchRegistry()
        registry.add(ArchSupport.from_architecture(ESRGANArch()), ArchSupport.from_architecture(CompactArch()))
        yield registry
    finally:
        for k in [k for k in sys.modules if k == "spandrel" or k.startswith("spandrel.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def lively(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The same layout with weights that keep the activations' size from layer to layer (std 1/sqrt(fan-in)):
    the files' small weights (x0.3 per layer) shrink every inner term below any tolerance."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.ndim == 4:
            out[k] = torch.randn(v.shape, generator=g) / v[0].numel() ** 0.5
        elif k.endswith(".bias"):
            out[k] = torch.randn(v.shape, generator=g) * 0.1
        else:  # PReLU slopes
            out[k] = torch.rand(v.shape, generator=g) * 0.5
    return out


@pytest.mark.parametrize("name, arch", [("4x-esrgan", "ESRGAN"), ("2x-esrgan", "ESRGAN"), ("1x-esrgan", "ESRGAN"),
                                        ("8x-esrgan", "ESRGAN"), ("4x-esrgan-old", "ESRGAN"),
                                        ("4x-compact", "RealESRGAN Compact"), ("2x-compact", "RealESRGAN Compact")])
def test_builtin_architectures_match_spandrel(files, spandrel_archs, name, arch):
    """Our RRDBNet / SRVGGNet forward passes equal spandrel's on the same random-weight state dict (both key
    layouts, every scale, Real-ESRGAN's pixel-unshuffle 1x/2x), and the scale read from the weights agrees."""
    from safetensors.torch import load_file

    from sdstudio.engine.upscalers import _builtin_model

    sd = lively(load_file(str(files / "ESRGAN" / f"{name}.safetensors")))
    ours = _builtin_model(dict(sd)).eval()
    theirs = spandrel_archs.load(dict(sd))
    assert theirs.architecture.name == arch
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs.model.eval()(x)
    assert a.shape == b.shape == (1, 3, 16 * theirs.scale, 24 * theirs.scale)
    assert b.std() > 0.1  # a lively output, not the biases alone
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())), (a - b).abs().max()
    assert ours.scale == theirs.scale
