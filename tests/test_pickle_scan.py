"""The static pickle scan (sdstudio.models.pickle_scan) says what the weights-only loader does: a file it marks safe
loads, one it marks unsafe or unreadable is refused; the hostile corpus is all marked, naming the global."""

from __future__ import annotations

import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdstudio.models.errors import ModelFileError
from sdstudio.models.pickle_scan import (
    ALLOWED_GLOBALS,
    STANDIN_GLOBALS,
    TORCH_ALLOWED_GLOBALS,
    scan_cached,
    scan_file,
)
from sdstudio.models.safe_load import load_pickle
from sdstudio.testing.hostile import payloads, save_lightning_checkpoint, torch_zip, write_corpus

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def test_the_allow_list_is_torchs():
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(TORCH_ALLOWED_GLOBALS) == set(_get_allowed_globals())
    assert ALLOWED_GLOBALS == TORCH_ALLOWED_GLOBALS | set(STANDIN_GLOBALS)


def test_scanning_imports_no_torch():
    code = "import sys; import sdstudio.models.pickle_scan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _loads(path: Path) -> bool:
    try:
        load_pickle(path)
        return True
    except ModelFileError:
        return False


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scan")
    return folder / "MARKER", write_corpus(folder / "files", folder / "MARKER")


def test_every_hostile_pickle_is_marked_and_the_global_named(corpus):
    marker, files = corpus
    pickled = {name: h for name, h in files.items() if h.path.suffix in PICKLE_SUFFIXES}
    assert len(pickled) > 20
    for name, hostile in pickled.items():
        result = scan_file(hostile.path)
        assert result.status in ("unsafe", "unreadable"), (name, result)
        if "hostile member" not in name:  # torch reads data.pkl alone; the scan marks the other member too
            assert not _loads(hostile.path), name  # the loader refuses each too
        if hostile.runs_code or "hostile member" in name:
            assert result.unsafe, (name, result)
            warning = result.warning(hostile.path.name)
            assert warning.startswith(f"{hostile.path.name}: the file may be malicious") and "\n" not in warning
            assert any(r.startswith("imports ") for r in result.reasons), (name, result)
    assert not marker.exists()


def test_the_names_in_the_warning(corpus):
    files = corpus[1]
    assert "imports os.system" in scan_file(files["torch zip data.pkl: os.system (GLOBAL + REDUCE)"].path).reasons
    assert "imports os.system" in scan_file(files["legacy (non-zip) torch format"].path).reasons
    assert "imports os.system" in scan_file(files["a zip inside a zip member"].path).reasons
    assert scan_file(files["not a zip, not a pickle"].path).status == "unreadable"
    assert scan_file(files["empty .ckpt"].path).status == "unreadable"


def test_real_checkpoints_are_safe(tmp_path):
    """torch.save's zip and legacy formats, every dtype, parameters, nested dicts, an old SD 1.x file's
    training state with its pytorch_lightning callback: safe, and they load."""

    sd = {f"w.{d}": torch.ones(2, 3, dtype=getattr(torch, d)) for d in ("float32", "float16", "bfloat16", "int64",
                                                                        "bool", "uint8", "float64")}
    sd["p"] = torch.nn.Parameter(torch.zeros(4))
    obj = {"state_dict": sd, "epoch": 3, "names": ["a", "b"], "t": (1, 2.5, None), "od": {"x": {"y": torch.ones(1)}}}
    made = []
    for zipped in (True, False):
        path = tmp_path / f"real-{zipped}.ckpt"
        torch.save(obj, path, _use_new_zipfile_serialization=zipped)
        made.append(path)
    made.append(save_lightning_checkpoint(tmp_path / "old.ckpt", sd))
    for path in made:
        assert scan_file(path).status == "safe", (path.name, scan_file(path))
        assert _loads(path), path.name
        assert scan_file(path).warning(path.name) is None


def test_safetensors_are_not_pickles(tiny_sd1):
    assert scan_file(tiny_sd1).status == "not a pickle" and scan_file(tiny_sd1).warning("x") is None


def test_the_scan_is_cached_by_file_identity(tmp_path):
    path = tmp_path / "a.ckpt"
    torch.save({"w": torch.ones(1)}, path)
    assert scan_cached(path).status == "safe"
    path.write_bytes(torch_zip(payloads(tmp_path / "m")["os.system (GLOBAL + REDUCE)"]))
    assert scan_cached(path).unsafe  # a new size / time: scanned again


def test_a_huge_argument_is_not_read(tmp_path):
    """A pickle claiming a 4 GiB string is not read whole: the scan stops there (the file is unreadable)."""
    path = tmp_path / "huge.ckpt"
    path.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x02X" + (0xFFFFFFF0).to_bytes(4, "little")
                     + b"abc")
    assert scan_file(path).status in ("unreadable", "unsafe")


_data = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                               st.text(max_size=5), st.binary(max_size=5)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner, inner),
                                             st.dictionaries(st.text(max_size=3), inner, max_size=3),
                                             st.frozensets(st.integers(), max_size=3),
                                             st.sets(st.integers(), max_size=3)),
                     max_leaves=8)


@settings(max_examples=150, deadline=None)
@given(_data, st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_safe_exactly_when_the_loader_reads_it(tmp_path_factory, value, protocol):
    """Plain data pickled with any protocol as a torch zip's data.pkl: the scan says safe exactly when the
    weights-only loader reads it (protocols above 2 use opcodes it refuses: SHORT_BINUNICODE, MEMOIZE, FRAME...)."""
    path = tmp_path_factory.mktemp("p") / "data.ckpt"
    path.write_bytes(torch_zip(pickle.dumps({"state_dict": {}, "v": value}, protocol=protocol)))
    assert zipfile.is_zipfile(path)
    assert (scan_file(path).status == "safe") == _loads(path), (scan_file(path), protocol, value)
