"""inpaint_only+lama: ControlNetLama.pth in big-lama's layout (the training module's ``generator.model.<i>``
names and shapes, written out here from LaMa's architecture; 51 M weights with its 18 blocks), loaded from a
full checkpoint with a smaller block count, checked against a functional forward pass written here from the
paper (fast Fourier convolutions on the raw state dict), and run through the extension's frame: LaMa at 256,
brought back and blended in by the mask, the unmasked pixels untouched, the mask kept as the fourth channel.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdstudio.core.controlnet import ControlNetError
from sdstudio.engine import annotators, preprocessors
from sdstudio.engine.annotators import common, lama
from tests.test_annotators import fresh_annotator_cache, picture, random_weights, write  # noqa: F401 (autouse)

torch.set_num_threads(1)


def lama_layout(blocks: int) -> dict:
    """big-lama's generator: no convolution biases but the up-sampling and the last one's; BN after each."""
    out: dict[str, tuple] = {}

    def bn(name, c):
        out.update({f"{name}.weight": (c,), f"{name}.bias": (c,), f"{name}.running_mean": (c,),
                    f"{name}.running_var": (c,), f"{name}.num_batches_tracked": ()})

    def conv(name, o, i, k):
        out[f"{name}.weight"] = (o, i, k, k)

    conv("model.1.ffc.convl2l", 64, 4, 7)
    bn("model.1.bn_l", 64)
    conv("model.2.ffc.convl2l", 128, 64, 3)
    bn("model.2.bn_l", 128)
    conv("model.3.ffc.convl2l", 256, 128, 3)
    bn("model.3.bn_l", 256)
    conv("model.4.ffc.convl2l", 128, 256, 3)  # the last down-sampling: a quarter local, three quarters global
    conv("model.4.ffc.convl2g", 384, 256, 3)
    bn("model.4.bn_l", 128)
    bn("model.4.bn_g", 384)
    for i in range(5, 5 + blocks):
        for half in ("conv1", "conv2"):
            p = f"model.{i}.{half}"
            conv(f"{p}.ffc.convl2l", 128, 128, 3)
            conv(f"{p}.ffc.convl2g", 384, 128, 3)
            conv(f"{p}.ffc.convg2l", 128, 384, 3)
            conv(f"{p}.ffc.convg2g.conv1.0", 192, 384, 1)
            bn(f"{p}.ffc.convg2g.conv1.1", 192)
            conv(f"{p}.ffc.convg2g.fu.conv_layer", 384, 384, 1)
            bn(f"{p}.ffc.convg2g.fu.bn", 384)
            conv(f"{p}.ffc.convg2g.conv2", 384, 192, 1)
            bn(f"{p}.bn_l", 128)
            bn(f"{p}.bn_g", 384)
    for j, (cin, cout) in enumerate(((512, 256), (256, 128), (128, 64))):
        i = 6 + blocks + 3 * j
        out[f"model.{i}.weight"], out[f"model.{i}.bias"] = (cin, cout, 3, 3), (cout,)
        bn(f"model.{i + 1}", cout)
    out[f"model.{16 + blocks}.weight"], out[f"model.{16 + blocks}.bias"] = (3, 64, 7, 7), (3,)
    return out


def reference(w: dict, x: torch.Tensor, blocks: int) -> torch.Tensor:
    """LaMa's generator on the raw state dict: reflection-padded convolutions, batch norm, ReLU; the global
    path's Fourier unit as the paper describes it (real FFT, real and imaginary parts as channels, 1×1
    convolution, inverse FFT, both orthonormal)."""
    def bn(t, name):
        return F.batch_norm(t, w[f"{name}.running_mean"], w[f"{name}.running_var"], w[f"{name}.weight"],
                            w[f"{name}.bias"], False, 0.0, 1e-5)

    def conv(t, name, stride=1, pad=1):
        return F.conv2d(F.pad(t, (pad,) * 4, mode="reflect") if pad else t, w[f"{name}.weight"], None, stride)

    def spectral(t, p):
        t = F.relu(bn(F.conv2d(t, w[f"{p}.conv1.0.weight"]), f"{p}.conv1.1"))
        c, (h, wd) = t.shape[1], t.shape[-2:]
        f = torch.fft.rfft2(t, norm="ortho")
        z = torch.stack([f.real, f.imag], 2).flatten(1, 2)  # channel 0 real, 0 imaginary, 1 real...
        z = F.relu(bn(F.conv2d(z, w[f"{p}.fu.conv_layer.weight"]), f"{p}.fu.bn")).unflatten(1, (c, 2))
        back = torch.fft.irfft2(torch.complex(z[:, :, 0], z[:, :, 1]), s=(h, wd), norm="ortho")
        return F.conv2d(t + back, w[f"{p}.conv2.weight"])

    act = F.relu
    local = act(bn(conv(F.pad(x, (3,) * 4, mode="reflect"), "model.1.ffc.convl2l", pad=0), "model.1.bn_l"))
    local = act(bn(conv(local, "model.2.ffc.convl2l", 2), "model.2.bn_l"))
    local = act(bn(conv(local, "model.3.ffc.convl2l", 2), "model.3.bn_l"))
    local, glob = (act(bn(conv(local, "model.4.ffc.convl2l", 2), "model.4.bn_l")),
                   act(bn(conv(local, "model.4.ffc.convl2g", 2), "model.4.bn_g")))
    for i in range(5, 5 + blocks):
        a_l, a_g = local, glob
        for half in ("conv1", "conv2"):
            p = f"model.{i}.{half}"
            new_l = conv(a_l, f"{p}.ffc.convl2l") + conv(a_g, f"{p}.ffc.convg2l")
            new_g = conv(a_l, f"{p}.ffc.convl2g") + spectral(a_g, f"{p}.ffc.convg2g")
            a_l, a_g = act(bn(new_l, f"{p}.bn_l")), act(bn(new_g, f"{p}.bn_g"))
        local, glob = local + a_l, glob + a_g
    x = torch.cat([local, glob], 1)
    for j in range(3):
        i = 6 + blocks + 3 * j
        x = act(bn(F.conv_transpose2d(x, w[f"model.{i}.weight"], w[f"model.{i}.bias"], 2, 1, 1), f"model.{i + 1}"))
    i = 16 + blocks
    return torch.sigmoid(F.conv2d(F.pad(x, (3,) * 4, mode="reflect"), w[f"model.{i}.weight"], w[f"model.{i}.bias"]))


def checkpoint(blocks: int, seed: int = 0) -> tuple[dict, dict]:
    """(the generator's weights, a training checkpoint holding them with a discriminator's tensor)."""
    weights = random_weights(lama_layout(blocks), seed=seed)
    full = {**{f"generator.{k}": v for k, v in weights.items()}, "discriminator.model0.0.weight": torch.zeros(2)}
    return weights, {"state_dict": full, "pytorch-lightning_version": "1.2.9"}


def test_big_lama_has_the_papers_size_and_the_published_names():
    with torch.device("meta"):
        net = lama.LaMa(18)
    assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == lama_layout(18)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6) == 51  # "Big LaMa: 51M parameters"


def test_a_checkpoint_loads_with_its_block_count_and_matches_the_papers_forward_pass(tmp_path):
    weights, full = checkpoint(2, seed=1)
    path = tmp_path / "lama" / "ControlNetLama.pth"
    path.parent.mkdir()
    torch.save(full, path)
    net = lama.load(path)
    assert net.blocks == 2
    x = torch.rand(1, 4, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(net(x), reference(weights, x, 2), rtol=1e-4, atol=1e-5)


def test_inpaint_only_lama_fills_the_mask_and_keeps_the_rest(tmp_path):
    p = {p.name: p for p in annotators.preprocessors(tmp_path)}["inpaint_only+lama"]
    assert p.needs_mask and p.control_types == ("Inpaint",) and p.resolution is None
    assert preprocessors.label_of(p) == "inpaint_only+lama"
    image = picture(h=90, w=120)
    mask = np.zeros((90, 120), np.uint8)
    mask[20:60, 30:100] = 255
    mask[70:80, 5:15] = 128  # a soft edge: blended by its alpha, as the extension blends
    with pytest.raises(ControlNetError, match=f"put ControlNetLama.pth in {tmp_path / 'lama'}"):
        p.run(image, -1, -1, -1, mask)
    weights, full = checkpoint(2, seed=2)
    (tmp_path / "lama").mkdir()
    torch.save(full, tmp_path / "lama" / "ControlNetLama.pth")
    with pytest.raises(ControlNetError, match="needs a mask"):
        preprocessors.detect(p, image, -1, -1, -1)
    out = preprocessors.detect(p, image, -1, -1, -1, mask)
    assert out.shape == (90, 120, 4) and (out[:, :, 3] == mask).all()
    untouched = mask == 0
    assert (out[:, :, :3][untouched] == image[untouched]).all()
    # the expected fill: LaMa at 256 on the padded RGBA, cut, resized back, blended by the mask
    padded, crop = common.resize_with_pad(np.concatenate([image, mask[:, :, None]], 2), 256)
    x = torch.from_numpy(padded).float().div(255).permute(2, 0, 1)[None]
    hole = (x[:, 3:4] > 0.5).float()
    with torch.no_grad():
        filled = reference(weights, torch.cat([x[:, :3] * (1 - hole), hole], 1), 2)
    filled = filled * hole + x[:, :3] * (1 - hole)
    filled = crop((filled[0].permute(1, 2, 0) * 255).clamp(0, 255).byte().numpy())
    filled = cv2.resize(filled, (120, 90)).astype(np.float32)
    alpha = mask.astype(np.float32)[:, :, None] / 255
    expected = (filled * alpha + image * (1 - alpha)).clip(0, 255).astype(np.uint8)
    assert np.abs(out[:, :, :3].astype(int) - expected).max() <= 1
    assert np.abs(out[:, :, :3][mask == 255].astype(int) - image[mask == 255]).mean() > 5  # the hole is filled
