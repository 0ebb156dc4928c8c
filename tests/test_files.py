"""Finding model files and hashing them as A1111 does, with the hash cache."""

import hashlib
import os

from sdstudio.core.paths import Paths
from sdstudio.models.files import HashCache, addnet_hash, find, legacy_model_hash, scan
from sdstudio.models.registry import ModelRegistry


def test_hashes(tmp_path):
    data = bytes(range(256)) * 8192  # 2 MiB
    path = tmp_path / "m.safetensors"
    path.write_bytes(data)
    cache = HashCache(tmp_path / "cache" / "hashes.json")
    entry = scan([tmp_path], (".safetensors",), cache)[0]
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    assert entry.short_hash == entry.sha256[:10]
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert entry.title == f"m.safetensors [{entry.short_hash}]"


def test_hash_cache_is_used_and_invalidated(tmp_path):
    path = tmp_path / "m.ckpt"
    path.write_bytes(b"abc")
    cache_file = tmp_path / "hashes.json"
    cache = HashCache(cache_file)
    real = cache.sha256(path)
    # A new cache object reads the stored value: tamper with it to prove the file is not re-read.
    cache_file.write_text(cache_file.read_text().replace(real, "f" * 64))
    assert HashCache(cache_file).sha256(path) == "f" * 64
    os.utime(path, (1, 1))  # mtime changed: the entry is stale and the file is hashed again
    assert HashCache(cache_file).sha256(path) == real


def test_addnet_hash_skips_header(tmp_path):
    import struct

    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    body = b"\x00\x00\x80\x3f"
    path = tmp_path / "l.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + body)
    assert addnet_hash(path) == hashlib.sha256(body).hexdigest()[:12]


def test_scan_layout_names_and_lookup(tmp_path):
    paths = Paths(tmp_path, ckpt_dirs=[tmp_path / "elsewhere"])
    (tmp_path / "models" / "Stable-diffusion" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for rel in ("models/Stable-diffusion/b.safetensors", "models/Stable-diffusion/sub/a.ckpt",
                "models/Stable-diffusion/b.vae.safetensors", "elsewhere/c.safetensors", "models/Stable-diffusion/x.txt"):
        (tmp_path / rel).write_bytes(rel.encode())
    reg = ModelRegistry(paths)
    assert [m.filename for m in reg.checkpoints] == ["b.safetensors", "c.safetensors", "sub/a.ckpt"]
    assert reg.checkpoint("a").filename == "sub/a.ckpt"
    assert reg.checkpoint(reg.checkpoints[0].title).name == "b"
    assert reg.checkpoint(reg.checkpoints[1].sha256[:10]).name == "c"
    assert reg.vae_for(reg.checkpoint("b"), "Automatic").path.name == "b.vae.safetensors"
    assert reg.vae_for(reg.checkpoint("b"), "None") is None
    assert find(reg.checkpoints, "nope") is None


def test_missing_model_lists_available(tmp_path):
    import pytest

    from sdstudio.models.errors import ModelNotFoundError

    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    reg = ModelRegistry(Paths(tmp_path))
    with pytest.raises(ModelNotFoundError, match="no checkpoints found"):
        reg.checkpoint(None)
    (tmp_path / "models" / "Stable-diffusion" / "real.safetensors").write_bytes(b"x")
    reg.refresh()
    with pytest.raises(ModelNotFoundError, match="available: real"):
        reg.checkpoint("v1-5-pruned-emaonly")
