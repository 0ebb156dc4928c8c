"""Tiled VAE: the same pixels as a whole-image decode/encode (halos + whole-image GroupNorm statistics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdstudio.core.params import Txt2ImgRequest
from sdstudio.engine import tiled_vae
from sdstudio.models.loader import load_checkpoint


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def vae(request, tiny_dir):
    return load_checkpoint(tiny_dir / f"tiny-{request.param}.safetensors").vae


def test_tiled_decode_equals_whole_decode(vae):
    torch.manual_seed(0)
    z = torch.randn(2, 4, 20, 27)  # a batch, sides that are not multiples of the tile
    before = z.clone()
    with torch.no_grad():
        whole = vae.decode(z).sample
        tiled = tiled_vae.decode(vae, z, core=8)  # 3 × 4 tiles
    assert torch.equal(z, before)  # the in-place norms and activations never touch the caller's latent
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs().max().item() * 127.5
    print(f"tiled vs whole decode: max {diff:.5f} of 255")
    assert diff < 0.01


def test_tile_cores_are_a_quarter_of_the_side_within_bounds():
    # 1024² (128 latent): 4×4 tiles of 32; 2048²: 64 (the most); 512²: 32 (the least)
    assert [tiled_vae.decode_core(s, s) for s in (64, 128, 192, 256, 512)] == [32, 32, 48, 64, 64]
    assert tiled_vae.decode_core(96, 200) == 50


def test_the_halo_is_what_makes_it_exact(vae):
    # A resnet block's second pass reaches two pixels (conv1, then conv2): with a halo of one the
    # tiles' borders show, so the test above can fail.
    torch.manual_seed(0)
    z = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        whole = vae.decode(z).sample
        short = tiled_vae.decode(vae, z, core=8, halo=1)
    assert (short - whole).abs().max().item() * 127.5 > 1


def test_naive_tiling_would_shift_the_tones(vae):
    # What the synchronised GroupNorms avoid: tiles normalised by their own statistics.
    torch.manual_seed(0)
    z = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        whole = vae.decode(z).sample
        vae.enable_tiling()
        vae.tile_latent_min_size, vae.tile_sample_min_size = 8, 64
        naive = vae.decode(z).sample
        vae.disable_tiling()
    assert (naive - whole).abs().max().item() * 127.5 > 10


def test_tiled_encode_equals_whole_encode(vae):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 136, 200) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        moments = tiled_vae.encode_moments(vae, x, core=64)
    whole = torch.cat([dist.mean, dist.logvar], 1)
    assert moments.shape == whole.shape
    assert (moments - whole).abs().max().item() < 1e-4
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    with pytest.raises(ValueError, match="multiple of the VAE's downsampling factor"):
        tiled_vae.encode_moments(vae, x, core=factor * 8 + 1)


def test_engine_with_tiled_vae_gives_the_same_image(session_engine):
    base = {"prompt": "a red circle", "steps": 3, "width": 128, "height": 96, "seed": 5}
    plain = np.asarray(session_engine.generate(Txt2ImgRequest(**base)).images[0].image, dtype=int)
    result = session_engine.generate(Txt2ImgRequest(**base, tiled_vae=True))
    tiled = np.asarray(result.images[0].image, dtype=int)
    assert np.abs(plain - tiled).max() <= 1  # float rounding may flip a truncation
    assert "Tiled VAE: True" in result.images[0].infotext


def test_a_pass_equals_the_layer_on_the_whole_picture_and_frees_its_input():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1)
    x = torch.randn(2, 4, 21, 30)  # 3 bands of 8, 8 and 5 rows
    bands = tiled_vae._bands(x, 8)
    with torch.no_grad():
        out, (mean, var) = tiled_vae._pass(conv, bands, 8, 1, torch.device("cpu"), consume=True)
        whole = conv(x)
    assert bands == []  # the caller's bands were freed as the pass moved down
    assert [b.shape[2] for b in out] == [8, 8, 5]
    assert (torch.cat(out, 2) - whole).abs().max() < 1e-6
    assert torch.allclose(mean, whole.double().mean((2, 3)), atol=1e-6)
    assert torch.allclose(var, whole.double().var((2, 3), unbiased=False), atol=1e-6)
