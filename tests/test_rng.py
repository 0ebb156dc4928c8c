"""Seeded noise: the values A1111 draws for each source, and its variation-seed blend.

References: torch's own CPU generator; the documented first CUDA ``torch.randn`` values for seed 0; and
spherical interpolation written out here per vector (A1111's slerp takes the vectors along dim 1 of a
(C, H, W) noise, i.e. one per channel and column: sin((1-t)W)/sin W * a + sin(tW)/sin W * b with
W = acos(a.b / |a||b|); when the mean cosine exceeds 0.9995 A1111 blends linearly, as
``a * t + b * (1 - t)``).
"""

import math

import numpy as np
import pytest
import torch

from sdstudio.engine.rng import NoiseGenerator, PhiloxGenerator, image_noise, randn, slerp


def reference_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Slerp of every (c, :, w) vector of a onto the same vector of b, in float64, one vector at a time."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    out = np.empty_like(a64)
    for c in range(a64.shape[0]):
        for w in range(a64.shape[2]):
            p, q = a64[c, :, w], b64[c, :, w]
            omega = math.acos(float(np.dot(p, q) / (np.linalg.norm(p) * np.linalg.norm(q))))
            out[c, :, w] = (math.sin((1 - t) * omega) * p + math.sin(t * omega) * q) / math.sin(omega)
    return torch.from_numpy(out).float()


def torch_cpu_noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


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
    assert torch.allclose(half, reference_slerp(0.5, base, other), atol=1e-5)


@pytest.mark.parametrize("strength", [0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_variation_noise_is_the_slerp_of_the_two_seeds(strength, source):
    a = torch_cpu_noise(3, (4, 12, 10)) if source == "CPU" else randn(3, (4, 12, 10), "NV")
    b = torch_cpu_noise(77, (4, 12, 10)) if source == "CPU" else randn(77, (4, 12, 10), "NV")
    got, _ = image_noise(3, (4, 12, 10), source=source, subseed=77, subseed_strength=strength)
    assert torch.allclose(got, reference_slerp(strength, a, b), atol=1e-5)
    assert torch.allclose(slerp(strength, a, b), reference_slerp(strength, a, b), atol=1e-5)


def test_slerp_keeps_the_norm_of_each_vector_between_the_two():
    a, b = torch_cpu_noise(1, (4, 16, 8)), torch_cpu_noise(2, (4, 16, 8))
    mid = slerp(0.5, a, b)
    na, nb, nm = (x.norm(dim=1) for x in (a, b, mid))
    # on the great circle between a and b: the norm stays near theirs (exactly theirs when equal)
    assert torch.all(nm >= torch.minimum(na, nb) * 0.95) and torch.all(nm <= torch.maximum(na, nb) * 1.05)


def test_nearly_parallel_noise_blends_linearly_as_a1111():
    a = torch_cpu_noise(5, (4, 8, 8))
    b = a + 1e-3 * torch_cpu_noise(6, (4, 8, 8))
    assert torch.allclose(slerp(0.3, a, b), a * 0.3 + b * 0.7)  # A1111's weights, as it writes them


def test_variation_with_resized_seed_blends_at_the_old_size_then_pastes():
    a, b = torch_cpu_noise(11, (4, 8, 8)), torch_cpu_noise(12, (4, 8, 8))
    got, _ = image_noise(11, (4, 12, 16), source="CPU", subseed=12, subseed_strength=0.4, resize_from=(64, 64))
    assert torch.allclose(got[:, 2:10, 4:12], reference_slerp(0.4, a, b), atol=1e-5)
    around = torch_cpu_noise(11, (4, 12, 16))  # the rest: the seed's noise at the new size
    assert torch.equal(got[:, :2], around[:, :2]) and torch.equal(got[:, :, :4], around[:, :, :4])


def test_resize_seed_pastes_old_noise_centred():
    old, _ = image_noise(11, (4, 8, 8), source="CPU")
    new, _gen = image_noise(11, (4, 12, 16), source="CPU", resize_from=(64, 64))
    assert torch.equal(new[:, 2:10, 4:12], old)
    bigger_from, _ = image_noise(11, (4, 8, 8), source="CPU", resize_from=(128, 96))  # crop from a larger noise
    old_big, _ = image_noise(11, (4, 12, 16), source="CPU")
    assert torch.equal(bigger_from, old_big[:, 2:10, 4:12])
