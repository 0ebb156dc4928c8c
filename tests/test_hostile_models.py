"""The hostile and broken model corpus (sdstudio.testing.hostile) against the loaders: no file runs code (the
marker never appears), and each is refused with one line that names the file.

The corpus is checked first: every payload really runs its code under a plain ``pickle.loads``, so a refusal
below is the loader's doing, not a broken payload's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sdstudio.models.errors import ModelFileError
from sdstudio.models.loader import load_checkpoint
from sdstudio.models.safe_load import open_state_dict
from sdstudio.testing.hostile import payloads, unusable_checkpoints, write_corpus

# What the loaders do not refuse cleanly yet (each entry: the name and why); empty now.
GAPS: dict[str, str] = {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_sd1):
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "MARKER"
    return marker, write_corpus(folder / "files", marker, tiny_sd1.read_bytes())


def test_every_payload_really_runs_code(tmp_path):
    for trick in payloads(tmp_path / "x"):
        marker = tmp_path / f"ran-{len(list(tmp_path.iterdir()))}"
        pkl = payloads(marker)[trick]
        subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"], input=pkl,
                       capture_output=True, timeout=60, check=False)
        assert marker.exists(), f"the payload {trick!r} does not run: the corpus proves nothing with it"


# every file of the corpus, by description (test_the_corpus_is_complete keeps this list whole)
_NAMES = [
    *(f"raw pickle: {t}" for t in payloads(Path("/m"))),
    *(f"torch zip data.pkl: {t}" for t in payloads(Path("/m"))),
    "torch zip, payload inside a dict beside weights-like data", "torch zip under another folder name",
    "torch zip with a second, hostile member", "a zip inside a zip member", "legacy (non-zip) torch format",
    "not a zip, not a pickle", "empty .ckpt", "safetensors: header length past the file",
    "safetensors: offsets past the end", "safetensors: overlapping offsets", "safetensors: backwards offsets",
    "safetensors: shape that does not match its bytes", "safetensors: unknown dtype", "safetensors: header is a list",
    "safetensors: header nested 100,000 deep", "safetensors: entry without offsets",
    "safetensors: offsets that are not numbers", "safetensors: metadata that is not text",
    "safetensors: header not UTF-8", "safetensors: truncated", "safetensors: cut inside its header",
]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=GAPS[n]))
                                  if n in GAPS else n for n in _NAMES])
def test_no_file_runs_code_and_each_is_refused_naming_it(corpus, name):
    marker, files = corpus
    hostile = files[name]
    with pytest.raises(ModelFileError) as info:
        load_checkpoint(hostile.path)
    message = str(info.value)
    assert message.startswith(hostile.path.name + ":") and "\n" not in message, message
    with pytest.raises(ModelFileError):
        sd = open_state_dict(hostile.path)
        if not hostile.runs_code:  # a file that opens must still fail as a checkpoint (above); its tensors read
            for key in list(sd)[:4]:
                sd[key]
            raise ModelFileError(f"{hostile.path.name}: opened")
    assert not marker.exists(), f"{name}: ran code"


def test_the_corpus_is_complete(corpus):
    assert set(corpus[1]) == set(_NAMES)


def test_unusable_weights(tmp_path):
    """A tensor whose shape the architecture does not have is refused naming the file and the tensor."""
    made = unusable_checkpoints(tmp_path)
    with pytest.raises(ModelFileError, match=r"unusable-shape.safetensors: .*conv_in.weight has shape"):
        load_checkpoint(made["shape"])


@pytest.mark.parametrize("kind, problem", [("nan", "holds NaN or infinite values"),
                                           ("inf", "holds NaN or infinite values"),
                                           ("int64", "holds int64 data where the model has floating-point weights"),
                                           ("bool", "holds bool data where the model has floating-point weights")])
def test_weights_that_cannot_make_a_picture_are_refused_naming_the_file(tmp_path, kind, problem):
    path = unusable_checkpoints(tmp_path)[kind]
    with pytest.raises(ModelFileError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"{path.name}: UNet: conv_in.weight {problem}") and "\n" not in message, message


def _edited(tiny_sd1: Path, folder: Path, name: str, change) -> Path:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny_sd1))
    change(sd)
    path = folder / name
    save_file(sd, str(path))
    return path


def test_legitimately_integer_tensors_still_load(tmp_path, tiny_sd1):
    """CLIP's position-ids buffer is int64 in real SD 1.x files (float in some): never a weight, it still loads."""
    import torch

    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    for dtype in (torch.int64, torch.float32):
        path = _edited(tiny_sd1, tmp_path, f"ids-{dtype}.safetensors",
                       lambda sd, dtype=dtype: sd.__setitem__(key, torch.arange(77, dtype=dtype)[None]))
        model = load_checkpoint(path)
        assert model.text_encoders[0].get_input_embeddings().weight.isfinite().all()


def test_a_nan_anywhere_is_found_and_named(tmp_path, tiny_sd1):
    """One NaN deep in a VAE or text-encoder tensor is enough; the message names the component and tensor."""
    import torch

    def poison(key, index):
        def change(sd):
            sd[key].view(-1)[index] = float("nan")
        return change

    vae = "first_stage_model.decoder.conv_out.weight"
    te = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    for key, expected in ((vae, "VAE: decoder.conv_out.weight"), (te, "text encoder: final_layer_norm.weight")):
        path = _edited(tiny_sd1, tmp_path, "one-nan.safetensors", poison(key, -1))
        with pytest.raises(ModelFileError, match=rf"^one-nan.safetensors: {expected} holds NaN"):
            load_checkpoint(path, torch.float32)


def test_values_beyond_half_precision_say_to_load_in_float32(tmp_path, tiny_sd1):
    import torch

    key = "model.diffusion_model.out.2.weight"
    path = _edited(tiny_sd1, tmp_path, "big.safetensors", lambda sd: sd[key].view(-1).__setitem__(0, 1e6))
    with pytest.raises(ModelFileError, match=r"^big.safetensors: UNet: conv_out.weight has values beyond float16's range"):
        load_checkpoint(path, torch.float16)
    assert load_checkpoint(path, torch.float32).unet.conv_out.weight.view(-1)[0] == 1e6


def test_half_to_half_conversion_is_exact_and_still_finds_bad_values(tmp_path, tiny_sd1):
    """float16 <-> bfloat16 goes through float32 in chunks (a faster path): the same bits as PyTorch's direct
    conversion, a NaN or infinity in a later chunk is still found, and bfloat16 values beyond float16's range
    are still refused for a float16 model."""
    import torch

    from sdstudio.models import safe_load

    g = torch.Generator().manual_seed(0)
    half = (torch.randn(3 * safe_load._CHUNK + 17, generator=g) * 100).half()
    for src, dst in ((half, torch.bfloat16), (half.bfloat16(), torch.float16)):
        out, _ = safe_load._converted(src, dst)
        assert out.dtype == dst and torch.equal(out.view(torch.int16), src.to(dst).view(torch.int16))
    for bad in (float("nan"), float("inf")):
        poisoned = half.clone()
        poisoned[2 * safe_load._CHUNK + 5] = bad
        assert safe_load._converted(poisoned, torch.bfloat16)[1] is False
    assert safe_load._converted(half, torch.bfloat16)[1] is True
    big = torch.tensor([1.0, 3e5]).bfloat16()
    with pytest.raises(ModelFileError, match="has values beyond float16's range"):
        safe_load.usable_weight("x", "w", big, torch.empty(2), torch.float16)
    key = "model.diffusion_model.out.2.weight"
    path = _edited(tiny_sd1, tmp_path, "nan16.safetensors",
                   lambda sd: sd.__setitem__(key, sd[key].half()) or sd[key].view(-1).__setitem__(-1, float("nan")))
    with pytest.raises(ModelFileError, match=r"^nan16.safetensors: UNet: conv_out.weight holds NaN"):
        load_checkpoint(path, torch.bfloat16)
