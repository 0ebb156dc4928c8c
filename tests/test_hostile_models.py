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


@pytest.mark.xfail(strict=True, reason="the loader takes integer/bool weights (converting them) and NaN/Inf ones; "
                                       "the change is in the issue-17 helper's report")
@pytest.mark.parametrize("kind", ["nan", "inf", "int64", "bool"])
def test_weights_that_cannot_make_a_picture_are_refused_naming_the_file(tmp_path, kind):
    path = unusable_checkpoints(tmp_path)[kind]
    with pytest.raises(ModelFileError, match=path.name):
        load_checkpoint(path)
