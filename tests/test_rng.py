"""Seeded noise: the values A1111 draws for each source."""

import torch

from sdstudio.engine.rng import NoiseGenerator, PhiloxGenerator, image_noise, randn, slerp


def test_nv_first_values_match_cuda_randn():
    # Documented first values of torch.randn on an NVIDIA GPU for seed 0 (as A1111's NV source reproduces).
    got = randn(0, (3, 4), "NV").flatten()[:4]
    assert torch.allclose(got, torch.tensor([-0.92466, -0.42534, -2.64385, 0.14518]), atol=1e-5)


def test_cpu_source_is_torch_cpu_generator():
    torch.manual_seed(1234)
    assert torch.equal(randn(1234, (4, 8, 8), "CPU"), torch.randn(4, 8, 8))


def test_gpu_source_without_cuda_is_nv():
    assert torch.equal(randn(99, (4, 4, 4), "GPU"), randn(99, (4, 4, 4), "NV"))


def test_sources_differ_and_seeds_differ():
    assert not torch.equal(randn(5, (4, 8, 8), "CPU"), randn(5, (4, 8, 8), "NV"))
    assert not torch.equal(randn(5, (4, 8, 8), "NV"), randn(6, (4, 8, 8), "NV"))


def test_nv_large_seed_uses_both_key_words():
    assert not torch.equal(randn(5, (16,), "NV"), randn(5 + (1 << 32), (16,), "NV"))


def test_streams_continue():
    g = NoiseGenerator(7, "NV")
    first, second = g.randn((4, 4)), g.randn((4, 4))
    assert torch.equal(first, randn(7, (4, 4), "NV"))
    assert not torch.equal(first, second)
    p = PhiloxGenerator(7)
    p.randn((4, 4))
    assert torch.equal(p.randn((4, 4)), second)
    c = NoiseGenerator(7, "CPU")
    a, b = c.randn((3,)), c.randn((3,))
    torch.manual_seed(7)
    assert torch.equal(torch.cat([a, b]), torch.randn(6))


def test_nv_is_standard_normal():
    x = randn(3, (200_000,), "NV")
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01


def test_variation_seed_blend():
    base, _ = image_noise(1, (4, 8, 8), source="CPU")
    same, _ = image_noise(1, (4, 8, 8), source="CPU", subseed=2, subseed_strength=0.0)
    other, _ = image_noise(2, (4, 8, 8), source="CPU")
    full, _ = image_noise(1, (4, 8, 8), source="CPU", subseed=2, subseed_strength=1.0)
    half, _ = image_noise(1, (4, 8, 8), source="CPU", subseed=2, subseed_strength=0.5)
    assert torch.equal(base, same)
    assert torch.allclose(full, other, atol=1e-5)
    assert not torch.allclose(half, base) and not torch.allclose(half, other)
    assert torch.allclose(half, slerp(0.5, base, other))


def test_resize_seed_pastes_old_noise_centred():
    old, _ = image_noise(11, (4, 8, 8), source="CPU")
    new, _gen = image_noise(11, (4, 12, 16), source="CPU", resize_from=(64, 64))
    assert torch.equal(new[:, 2:10, 4:12], old)
    bigger_from, _ = image_noise(11, (4, 8, 8), source="CPU", resize_from=(128, 96))  # crop from a larger noise
    old_big, _ = image_noise(11, (4, 12, 16), source="CPU")
    assert torch.equal(bigger_from, old_big[:, 2:10, 4:12])
