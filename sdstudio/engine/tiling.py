"""Seamless tiling: circular padding in every convolution of the UNet and VAE while a job that asks
for ``tiling`` runs; the modules are restored afterwards so the next job is unaffected."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def circular_padding(modules: list[torch.nn.Module], enabled: bool):
    if not enabled:
        yield
        return
    changed = []
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, torch.nn.Conv2d) and layer.padding_mode != "circular":
                changed.append((layer, layer.padding_mode))
                layer.padding_mode = "circular"
    try:
        yield
    finally:
        for layer, mode in changed:
            layer.padding_mode = mode
