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


def _activations() -> dict[str, type[torch.nn.Module]]:
    """A1111's table: its own names (``swish`` is Hardswish) plus every class of
    ``torch.nn.modules.activation`` under its lower-cased name (``gelu``, ``mish``, ``softplus``, ``prelu``...)."""
    table = {"relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU,
             "swish": torch.nn.Hardswish, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    module = torch.nn.modules.activation
    table.update({name.lower(): cls for name, cls in vars(module).items()
                  if isinstance(cls, type) and cls.__module__ == module.__name__})
    return table


_ACTIVATIONS = _activations()
_OLD_NAMES = {"linear1.weight": "0.weight", "linear1.bias": "0.bias", "linear2.weight": "1.weight",
              "linear2.bias": "1.bias"}  # the first hypernetworks (two linears, no layer_structure)


def _dropout_after(data: dict, structure: list[float]) -> list[bool]:
    """Which linear layers A1111 follows with a Dropout: per ``dropout_structure`` when the file has one,
    else (its parse_dropout_structure) after every hidden layer but the last when ``use_dropout``, and
    after the last hidden one too with ``last_layer_dropout``."""
    n = len(structure) - 1
    given = data.get("dropout_structure")
    if given is not None:
        return [float(p) > 0 for p in list(given)[1:n + 1]]
    if not data.get("use_dropout", False):
        return [False] * n
    last = bool(data.get("last_layer_dropout", False))
    return [i < n - 2 or (i == n - 2 and last) for i in range(n)]


def _mlp(width: int, state: dict, structure: list[float], activation: str, layer_norm: bool,
         activate_output: bool, dropout_after: list[bool]) -> torch.nn.Sequential:
    """Rebuild the Sequential exactly as A1111 lays it out (Linear, activation, LayerNorm, Dropout per
    layer), so the saved indices line up."""
    layers: list[torch.nn.Module] = []
    for i in range(len(structure) - 1):
        layers.append(torch.nn.Linear(int(width * structure[i]), int(width * structure[i + 1])))
        last = i >= len(structure) - 2
        if activation not in ("linear", None) and not (last and not activate_output):
            if activation not in _ACTIVATIONS:
                raise ModelFileError(f"unknown hypernetwork activation {activation!r}")
            try:
                layers.append(_ACTIVATIONS[activation]())
            except TypeError:  # e.g. threshold, multiheadattention: no file can have used them
                raise ModelFileError(f"unsupported hypernetwork activation {activation!r}") from None
        if layer_norm:
            layers.append(torch.nn.LayerNorm(int(width * structure[i + 1])))
        if dropout_after[i]:
            layers.append(torch.nn.Dropout(p=0.3))  # an identity at inference; it only shifts the indices
    seq = torch.nn.Sequential(*layers)
    own = {_OLD_NAMES.get(k, k).removeprefix("linear."): v for k, v in state.items()}
    try:
        seq.load_state_dict(own)
    except RuntimeError:
        # files whose dropout layout differs from what their flags say: map weights onto our layers in order
        ours = [m for m in seq if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm))]
        try:
            theirs = sorted({int(k.split(".")[0]) for k in own})
            if len(ours) != len(theirs):
                raise ValueError
            for module, idx in zip(ours, theirs):
                module.load_state_dict({"weight": own[f"{idx}.weight"], "bias": own[f"{idx}.bias"]})
        except (ValueError, KeyError, RuntimeError):
            raise ModelFileError("hypernetwork layers do not match its layer_structure") from None
    return seq.eval().requires_grad_(False)


class Hypernetwork:
    def __init__(self, path: Path):
        self.path = Path(path)
        data = load_pickle(self.path)
        structure = data.get("layer_structure") or [1, 2, 1]
        activation = data.get("activation_func") or "linear"
        layer_norm = bool(data.get("is_layer_norm", False))
        activate_output = bool(data.get("activate_output", True))  # A1111's default for files without the key
        dropout_after = _dropout_after(data, structure)
        self.layers: dict[int, tuple[torch.nn.Module, torch.nn.Module]] = {}
        for width, pair in data.items():
            if isinstance(width, int) and isinstance(pair, (list, tuple)) and len(pair) == 2:
                self.layers[width] = tuple(_mlp(width, s, structure, activation, layer_norm, activate_output,
                                                dropout_after) for s in pair)
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
