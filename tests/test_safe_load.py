"""Model files that are broken or hostile give a clear error naming the file; nothing runs."""

from __future__ import annotations

import json
import pickle
import struct
import zipfile

import pytest
import torch

from sdstudio.models.errors import ModelFileError
from sdstudio.models.loader import load_checkpoint
from sdstudio.models.safe_load import open_state_dict
from sdstudio.testing.hostile import SystemCall
from sdstudio.testing.synthetic import make_checkpoint


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": SystemCall(marker)}, path)
    with pytest.raises(ModelFileError, match="evil.ckpt: refused to load"):
        open_state_dict(path)
    assert not marker.exists()


def test_raw_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(SystemCall(marker)))
    with pytest.raises(ModelFileError, match="evil.pt"):
        open_state_dict(path)
    assert not marker.exists()


def test_old_checkpoint_with_lightning_callback_state_loads(tmp_path):
    """SD 1.x .ckpt files pickle a pytorch_lightning ModelCheckpoint; it is allowed as inert data."""
    from sdstudio.testing.hostile import save_lightning_checkpoint

    path = save_lightning_checkpoint(tmp_path / "old.ckpt", make_checkpoint("sd1", "tiny"))
    assert load_checkpoint(path).spec.family == "sd1"


def test_truncated_safetensors(tmp_path, tiny_sd1):
    data = tiny_sd1.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="cut.safetensors: file is truncated"):
        open_state_dict(path)


@pytest.mark.parametrize("content, needle", [
    (b"", "empty or truncated"),
    (struct.pack("<Q", 10**12) + b"{}", "corrupt safetensors header"),
    (struct.pack("<Q", 5) + b"nojsn", "not JSON"),
])
def test_corrupt_safetensors(tmp_path, content, needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=needle):
        open_state_dict(path)


def test_corrupt_ckpt(tmp_path):
    path = tmp_path / "bad.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage")
    with pytest.raises(ModelFileError, match="bad.ckpt"):
        open_state_dict(path)
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFileError, match="bad.ckpt"):
        open_state_dict(path)


def test_not_a_checkpoint_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)}, str(path))
    with pytest.raises(ModelFileError, match="lora.safetensors: this is a LoRA"):
        load_checkpoint(path)


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ModelFileError, match="unsupported file type"):
        open_state_dict(path)


def test_safetensors_metadata_is_read(tiny_sd1):
    sd = open_state_dict(tiny_sd1)
    assert sd.metadata.get("sdstudio.synthetic") == "sd1-tiny"
    header_len = struct.unpack("<Q", tiny_sd1.read_bytes()[:8])[0]
    assert "__metadata__" in json.loads(tiny_sd1.read_bytes()[8:8 + header_len])
