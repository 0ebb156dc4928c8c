"""A1111 hypernetworks (``<hypernet:name:strength>``).

A hypernetwork file holds, per context width (768, 320, 640, 1280...), two small residual MLPs: one
transforms the input of an attention layer's key projection, the other that of its value projection:
``k = to_k(ctx + mlp_k(ctx) * strength)``. A1111 applies them wherever the width matches, in self- and
cross-attention alike. Here they are forward pre-hooks on ``to_k`` / ``to_v`` for the length of a job.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..models.errors import ModelFileError
from ..models.safe_load import load_pickle

_ACTIVATIONS = {
    "relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU, "swish": torch.nn.Hardswish,
    "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign, "mish": torch.nn.Mish,
    "gelu": torch.nn.GELU, "silu": torch.nn.SiLU,
}


def _mlp(width: int, state: dict, structure: list[float], activation: str, layer_norm: bool,
         activate_output: bool) -> torch.nn.Sequential:
    """Rebuild the Sequential exactly as A1111 lays it out, so the saved indices line up."""
    layers: list[torch.nn.Module] = []
    for i in range(len(structure) - 1):
        layers.append(torch.nn.Linear(int(width * structure[i]), int(width * structure[i + 1])))
        last = i >= len(structure) - 2
        if activation not in ("linear", None) and not (last and not activate_output):
            if activation not in _ACTIVATIONS:
                raise ModelFileError(f"unknown hypernetwork activation {activation!r}")
            layers.append(_ACTIVATIONS[activation]())
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(width * structure[i + 1])))
        # dropout layers are identities at inference; A1111 counts them in the indices only when used
    seq = torch.nn.Sequential(*layers)
    own = {k.removeprefix("linear."): v for k, v in state.items()}
    try:
        seq.load_state_dict(own)
    except RuntimeError:
        # files trained with dropout have Dropout entries between layers: map weights onto our layers in order
        ours = [m for m in seq if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
        theirs = sorted({int(k.split(".")[0]) for k in own}, key=int)
        if len(ours) != len(theirs):
            raise ModelFileError("hypernetwork layers do not match its layer_structure") from None
        for module, idx in zip(ours, theirs):
            module.load_state_dict({"weight": own[f"{idx}.weight"], "bias": own[f"{idx}.bias"]})
    return seq.eval().requires_grad_(False)


class Hypernetwork:
    def __init__(self, path: Path):
        self.path = Path(path)
        data = load_pickle(self.path)
        structure = data.get("layer_structure") or [1, 2, 1]
        activation = data.get("activation_func") or "linear"
        layer_norm = bool(data.get("is_layer_norm", False))
        activate_output = bool(data.get("activate_output", False))
        self.layers: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        for width, pair in data.items():
            if isinstance(width, int) and isinstance(pair, (list, tuple)) and len(pair) == 2:
                self.layers[width] = tuple(_mlp(width, s, structure, activation, layer_norm, activate_output)
                                           for s in pair)
        if not self.layers:
            raise ModelFileError(f"{self.path.name}: not an A1111 hypernetwork (no per-width layers)")


@contextlib.contextmanager
def applied(unet: torch.nn.Module, networks: list[tuple[Hypernetwork, float]]) -> Iterator[None]:
    handles = []
    if networks:
        def make_hook(which: int):
            def hook(module, args):
                x = args[0]
                for hn, strength in networks:
                    pair = hn.layers.get(x.shape[-1])
                    if pair is not None:
                        mlp = pair[which].to(x.device, x.dtype)
                        x = x + mlp(x) * strength
                return (x, *args[1:])
            return hook

        for name, module in unet.named_modules():
            if name.endswith((".attn1", ".attn2")) and hasattr(module, "to_k"):
                handles.append(module.to_k.register_forward_pre_hook(make_hook(0)))
                handles.append(module.to_v.register_forward_pre_hook(make_hook(1)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
