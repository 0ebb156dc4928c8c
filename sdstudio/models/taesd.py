"""Tiny preview decoders (``models/VAE-approx``): madebyollin's TAESD files and A1111's "Approx NN" files.

A TAESD decoder file is the state dict of a plain ``nn.Sequential`` whose first module is a clamp: its
keys are numbers (``1.weight`` the latent convolution, ``3.conv.0.weight`` a block's first convolution,
``19.bias`` the RGB convolution). diffusers' :class:`~diffusers.models.autoencoders.vae.DecoderTiny` is the
same network with the clamp moved into ``forward``, so ``N.`` maps to ``layers.(N-1).``; diffusers-layout
files (``decoder.layers.N.``) are read as they are. The widths and the blocks per level are read from the
tensor shapes, so a narrower decoder (the demo model's) loads the same way.

Which latent space a decoder is for: madebyollin's file names (``taesd_decoder`` SD 1.x/2.x, ``taesdxl_decoder``
SDXL, ``taesd3_decoder`` SD 3.x, ``taef1_decoder`` Flux.1), or a ``sdstudio.latent_space`` metadata key in
the files we write; a decoder trained for one model's own VAE (the demo model's) carries
``sdstudio.vae_fingerprint`` instead and serves only a VAE with that fingerprint (:func:`vae_fingerprint`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DecoderTiny
from torch import nn

from .errors import ModelFileError
from .safe_load import open_state_dict

LATENT_SPACE_KEY = "sdstudio.latent_space"  # "sd1", "sdxl", "sd3", "flux"
FINGERPRINT_KEY = "sdstudio.vae_fingerprint"  # JSON list of floats (vae_fingerprint)

# (prefix, index offset): taesd's own numbering counts the clamp (index 0), diffusers' does not
_LAYOUTS = (("decoder.layers.", 0), ("layers.", 0), ("taesd_decoder.", 1), ("decoder.", 1), ("", 1))
_INDEXED = re.compile(r"(\d+)\.(.+)")
_BLOCK_KEYS = {f"conv.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {"skip.weight"}


def decoder_config(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict[str, str], tuple[str, int]]:
    """``DecoderTiny`` keyword arguments, the ``file key -> DecoderTiny key`` map and the file's layout
    (key prefix, index offset), from the file's shapes. Raises ValueError (a one-line reason) for anything
    that is not a TAESD-layout decoder."""
    for prefix, offset in _LAYOUTS:
        if len(shapes.get(f"{prefix}{offset}.weight", ())) == 4:
            break
    else:
        if len(shapes.get("0.weight", ())) == 4 and shapes["0.weight"][1] == 3:
            raise ValueError("this is a TAESD encoder (it takes RGB), not a decoder")
        raise ValueError("not a TAESD decoder (no latent convolution '1.weight' or 'decoder.layers.0.weight')")
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        found = _INDEXED.fullmatch(key[len(prefix):]) if key.startswith(prefix) else None
        if found is None or int(found[1]) < offset:
            continue
        layers.setdefault(int(found[1]) - offset, {})[found[2]] = shape
    latent_channels = shapes[f"{prefix}{offset}.weight"][1]
    num_blocks, widths, count = [], [], 0
    for index in sorted(layers)[1:]:
        params = layers[index]
        if "conv.0.weight" in params and set(params) <= _BLOCK_KEYS:
            count += 1
        elif "weight" in params and set(params) <= {"weight", "bias"}:
            num_blocks.append(count)
            widths.append(params["weight"][1])
            count = 0
        else:  # e.g. TAEF2's pooled norms (its "pool" keys)
            extra = min(set(params) - _BLOCK_KEYS - {"weight", "bias"})
            raise ValueError(f"unsupported TAESD variant (layer {index + offset} has '{extra}')")
    if count or not num_blocks:
        raise ValueError("not a TAESD decoder (it does not end in an RGB convolution)")
    out_key = f"{prefix}{max(layers) + offset}.weight"
    config = {"in_channels": latent_channels, "out_channels": shapes[out_key][0], "num_blocks": tuple(num_blocks),
              "block_out_channels": tuple(widths), "upsampling_scaling_factor": 2, "act_fn": "relu",
              "upsample_fn": "nearest"}
    mapping = {}
    for index, params in layers.items():
        for name in params:
            mapping[f"{prefix}{index + offset}.{name}"] = f"layers.{index}.{name}"
    return config, mapping, (prefix, offset)


def build_decoder(state, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> DecoderTiny:
    """A ``DecoderTiny`` holding the decoder's weights (``state``: a ``name -> tensor`` mapping)."""
    shapes = dict(state.shapes) if hasattr(state, "shapes") else {k: tuple(v.shape) for k, v in state.items()}
    config, mapping, (prefix, offset) = decoder_config(shapes)
    if len(set(config["block_out_channels"])) != 1:
        raise ValueError(f"unsupported TAESD variant (widths change between levels: {config['block_out_channels']})")
    with torch.device("meta"):
        decoder = DecoderTiny(**config)
    expected = decoder.state_dict()
    converted = {mapping[k]: state[k] for k in mapping}

    def file_key(key: str) -> str:  # the file's own name of a DecoderTiny key, for the messages
        index, rest = key[len("layers."):].split(".", 1)
        return f"{prefix}{int(index) + offset}.{rest}"

    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        what = f"{file_key(missing[0])} is missing" if missing else f"unexpected {file_key(unexpected[0])}"
        raise ValueError(f"not a TAESD decoder layout ({what})")
    for key, tensor in converted.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(f"not a TAESD decoder layout ({file_key(key)}: shape {tuple(tensor.shape)}, "
                             f"expected {tuple(expected[key].shape)})")
    decoder.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, assign=True)
    return decoder.to(device).eval().requires_grad_(False)


def load_decoder(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                 ) -> DecoderTiny:
    """A TAESD decoder file (.safetensors, or a .pth/.pt read by the restricted unpickler).
    Any problem is a :class:`ModelFileError` naming the file."""
    path = Path(path)
    source = open_state_dict(path)
    try:
        decoder = build_decoder(source, device, dtype)
    except ValueError as exc:
        raise ModelFileError(f"{path.name}: {exc}") from None
    except (RuntimeError, OSError) as exc:  # a tensor the header promised but the data does not hold
        raise ModelFileError(f"{path.name}: cannot read the decoder's weights ({str(exc).splitlines()[0][:200]})") from None
    if not all(torch.isfinite(p).all() for p in decoder.parameters()):
        raise ModelFileError(f"{path.name}: the decoder's weights hold NaN or infinite values")
    return decoder


def file_metadata(path: str | Path) -> dict[str, str]:
    """A decoder file's own metadata (safetensors header; empty for pickles)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        return dict(open_state_dict(path).metadata)
    except ModelFileError:
        return {}


def vae_fingerprint(vae: nn.Module, n: int = 32) -> list[float]:
    """A few weights of a VAE's first decoder convolution: which latent space its decoder reads. Compared
    with a tolerance (:func:`same_fingerprint`), so the same VAE in float16 or bfloat16 still matches."""
    weight = vae.decoder.conv_in.weight.detach().flatten()[:n]
    return [float(v) for v in weight.float().cpu()]


def same_fingerprint(a: list[float], b: list[float]) -> bool:
    if not a or len(a) != len(b):
        return False
    scale = max(abs(v) for v in b) or 1.0
    return all(abs(x - y) <= 1e-2 * abs(y) + 2e-3 * scale for x, y in zip(a, b))


def fingerprint_of(metadata: dict[str, str]) -> list[float] | None:
    try:
        values = json.loads(metadata[FINGERPRINT_KEY])
        return [float(v) for v in values]
    except (KeyError, ValueError, TypeError):
        return None


class VAEApprox(nn.Module):
    """A1111's "Approx NN" network (``models/VAE-approx/model.pt``): eight convolutions on the latent upscaled
    2×, a quarter of the picture's size. Output in about [-1, 1]."""

    def __init__(self, latent_channels: int = 4):
        super().__init__()
        widths = (latent_channels, 8, 16, 32, 64, 32, 16, 8, 3)
        kernels = (7, 5, 3, 3, 3, 3, 3, 3)
        for i, k in enumerate(kernels):
            setattr(self, f"conv{i + 1}", nn.Conv2d(widths[i], widths[i + 1], k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.interpolate(x, (x.shape[2] * 2, x.shape[3] * 2))
        x = nn.functional.pad(x, (11, 11, 11, 11))  # the convolutions take 22 pixels away again
        for i in range(8):
            x = nn.functional.leaky_relu(getattr(self, f"conv{i + 1}")(x), 0.1)
        return x


def load_approx_nn(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                   ) -> VAEApprox:
    path = Path(path)
    source = open_state_dict(path)
    first = source.shapes.get("conv1.weight")
    if first is None or len(first) != 4:
        raise ModelFileError(f"{path.name}: not an Approx NN file (no conv1.weight)")
    model = VAEApprox(first[1])
    expected = model.state_dict()
    if set(source.shapes) != set(expected) or any(tuple(source.shapes[k]) != tuple(v.shape) for k, v in expected.items()):
        raise ModelFileError(f"{path.name}: not an Approx NN file (its layers are not A1111's VAEApprox)")
    try:
        model.load_state_dict({k: source[k].float() for k in expected})
    except (RuntimeError, OSError) as exc:
        raise ModelFileError(f"{path.name}: cannot read the weights ({str(exc).splitlines()[0][:200]})") from None
    return model.to(device, dtype).eval().requires_grad_(False)
